"""The LLaMA transformer (Meta's layout and tensor names), model-parallel and buildable on meta.

Each module initializes only the tensors it owns (see `reset_parameters` of the layers); a meta build leaves
every tensor without storage until `util.lazy_init.materialize_and_load` allocates and fills it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.adapter import AdapterGate, AdapterPrompt
from model.args import ModelArgs
from model.layers import ColumnParallelLinear, ParallelEmbedding, RMSNorm, RotaryEmbedding, RowParallelLinear
from model.layers.lean import recompute
from model.layers.parallel import divide, mp_world_size, reduce_from_mp, scatter_to_mp
from model.visual import VisualEncoder


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, *, adapter: bool = False) -> None:
        super().__init__()
        ws = mp_world_size()
        self.head_dim = args.head_dim
        self.n_local_heads = divide(args.n_heads, ws, "n_heads")
        self.n_local_kv_heads = divide(args.n_kv_heads, ws, "n_kv_heads")
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, gather_output=False)
        self.wk = ColumnParallelLinear(args.dim, args.n_kv_heads * self.head_dim, gather_output=False)
        self.wv = ColumnParallelLinear(args.dim, args.n_kv_heads * self.head_dim, gather_output=False)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, input_is_parallel=True)
        self.adapter_gate = AdapterGate(args.n_heads) if adapter else None
        # KV cache for incremental decoding: plain attributes, not buffers, so it is never part of a
        # checkpoint, never built on meta, and costs nothing until generation asks for it (setup_cache).
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None

    def setup_cache(self, batch: int, seq_len: int, *, device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch, seq_len, self.n_local_kv_heads, self.head_dim)
        self.cache_k = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_v = torch.zeros(shape, device=device, dtype=dtype)

    def forward(
        self, x: torch.Tensor, rope: RotaryEmbedding, start_pos: int | None, prompt: torch.Tensor | None = None
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = self.wq(x).view(bsz, seq, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(bsz, seq, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seq, self.n_local_kv_heads, self.head_dim)
        q, k = rope(q, start_pos or 0), rope(k, start_pos or 0)

        mask = None
        is_causal = seq > 1
        if start_pos is not None:  # decoding: append to the cache, attend over everything so far
            if self.cache_k is None:
                raise RuntimeError("the KV cache is not set up: call Transformer.setup_cache() before decoding")
            if bsz > self.cache_k.shape[0]:
                raise ValueError(f"batch of {bsz} exceeds the KV cache's {self.cache_k.shape[0]} (max_batch_size)")
            end = start_pos + seq
            self.cache_k[:bsz, start_pos:end] = k
            self.cache_v[:bsz, start_pos:end] = v
            k, v = self.cache_k[:bsz, :end], self.cache_v[:bsz, :end]
            if seq > 1 and start_pos > 0:  # causal with an offset: query i sees keys <= start_pos + i
                pos_q = torch.arange(start_pos, end, device=x.device)[:, None]
                mask = torch.arange(end, device=x.device)[None, :] <= pos_q
                is_causal = False
        q = q.transpose(1, 2)
        # grouped-query attention: each KV head serves n_rep query heads inside the kernel, so backward keeps
        # k and v at their own size, not repeated n_rep times
        out = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_rep > 1
        )
        if prompt is not None and self.adapter_gate is not None:
            out = out + self.adapter_gate(self._attend_prompt(q, prompt.to(x.dtype)))
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))

    def _attend_prompt(self, q: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """LLaMA-Adapter: every query also attends (separately, unmasked, no rotary) to the layer's prompt."""
        pb, plen, _ = prompt.shape
        pk = self.wk(prompt).view(pb, plen, self.n_local_kv_heads, self.head_dim)
        pv = self.wv(prompt).view(pb, plen, self.n_local_kv_heads, self.head_dim)
        if self.n_rep > 1:
            pk, pv = pk.repeat_interleave(self.n_rep, dim=2), pv.repeat_interleave(self.n_rep, dim=2)
        pk, pv = pk.transpose(1, 2).expand(q.shape[0], -1, -1, -1), pv.transpose(1, 2).expand(q.shape[0], -1, -1, -1)
        return F.scaled_dot_product_attention(q, pk, pv)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, gather_output=False)
        self.w2 = RowParallelLinear(hidden_dim, dim, input_is_parallel=True)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, gather_output=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # backward keeps the two projections, not silu's output as well (silu runs again there)
        return self.w2(recompute(_swiglu, self.w1(x), self.w3(x)))


def _swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, adapter=layer_id >= args.n_layers - adapter_depth(args))
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self, x: torch.Tensor, rope: RotaryEmbedding, start_pos: int | None, prompt: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, start_pos, prompt)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError(
                f"vocab_size={args.vocab_size}: fill it from the tokenizer or the checkpoint before building "
                "(ModelArgs.with_vocab_size)"
            )
        self.args = args
        self.tok_embeddings = ParallelEmbedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        # Tied (Llama 3.2 1B/3B): the head is the embedding itself, one parameter, trained as one (see logits)
        self.output = (
            None if args.tie_word_embeddings else ColumnParallelLinear(args.dim, args.vocab_size, gather_output=True)
        )
        self.rope = RotaryEmbedding(args.head_dim, args.max_seq_len, args.rope_theta, args.rope_scaling_params)
        depth = adapter_depth(args)
        self.adapter = AdapterPrompt(depth, args.adapter_len, args.dim) if depth else None
        self.visual = VisualEncoder(args) if args.visual_backbone else None

    def setup_cache(self, max_batch_size: int | None = None, max_seq_len: int | None = None) -> None:
        """Allocate the KV caches on the model's device, in its activation dtype (after materialization)."""
        ref = self.norm.weight
        if ref.is_meta:
            raise RuntimeError("materialize the model (materialize_and_load) before setting up its KV cache")
        for layer in self.layers:
            layer.attention.setup_cache(
                max_batch_size or self.args.max_batch_size,
                max_seq_len or self.args.max_seq_len,
                device=ref.device,
                dtype=ref.dtype,
            )

    def image_positions(self) -> int:
        """Positions an image occupies before the text (visual 'tokens' mode); 0 otherwise. Decoding steps
        after a prompt with an image continue at start_pos = image_positions() + text length."""
        return self.visual.image_tokens() if self.visual is not None else 0

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int | None = None,
        prefix: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        *,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """tokens [batch, seq] -> fp32 logits [batch, seq, vocab] (for the text positions).

        return_hidden=True: the final-norm hidden states [batch, seq, dim] instead (in the activation dtype), for
        callers that apply the head to only some positions (`logits(h)`): a chunked loss (util.loss), a prefill
        that needs only the last position (util.generate).

        start_pos=None: training forward (causal, no cache). start_pos=int: decoding step that reads and
        extends the KV cache from that position. prefix: [batch, adapter_len, dim] added to the LLaMA-Adapter
        prompts (the multimodal variant's visual tokens); needs an adapter config. images: [batch, 3, H, W]
        preprocessed for the visual backbone (util.images.load_image): image tokens before the text
        ("tokens" mode; only with start_pos None or 0) or the adapter prefix ("prefix" mode).
        """
        h = self.tok_embeddings(tokens)
        n_image = 0
        if images is not None:
            if self.visual is None:
                raise ValueError("images given to a text-only model: set visual_backbone in the config")
            visual = self.visual(images, dtype=h.dtype)
            if self.visual.mode == "prefix":
                prefix = visual if prefix is None else prefix + visual
            else:
                if start_pos not in (None, 0):
                    raise ValueError("images go with the prompt (start_pos 0), not with later decoding steps")
                n_image = visual.shape[1]
                h = torch.cat([visual.to(h.dtype), h], dim=1)
        if prefix is not None and self.adapter is None:
            raise ValueError("a prefix needs a LLaMA-Adapter config (adapter_len > 0 and adapter_layers > 0)")
        prompts = self.adapter.prompts(prefix) if self.adapter is not None else None
        first_adapted = len(self.layers) - (prompts.shape[0] if prompts is not None else 0)
        for i, layer in enumerate(self.layers):
            prompt = prompts[i - first_adapted] if prompts is not None and i >= first_adapted else None
            h = layer(h, self.rope, start_pos, prompt)
        h = self.norm(h[:, n_image:])
        return h if return_hidden else self.logits(h).float()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output head: its own weight, or the token embedding's when tied. The embedding is split along
        its width across model-parallel ranks, so the tied head is a row-parallel product: each rank multiplies
        its slice of h by its slice of the embedding and the partial logits are summed."""
        if self.output is not None:
            return self.output(h)
        return reduce_from_mp(F.linear(scatter_to_mp(h), self.tok_embeddings.weight))


def adapter_depth(args: ModelArgs) -> int:
    """How many top layers carry LLaMA-Adapter prompts (0: no adapter)."""
    if args.adapter_len <= 0 or args.adapter_layers <= 0:
        return 0
    if args.adapter_layers > args.n_layers:
        raise ValueError(f"adapter_layers={args.adapter_layers} exceeds n_layers={args.n_layers}")
    return args.adapter_layers
