"""A small LLaMA trained to quote its prompt, grafted into the exact 1.1B shape: the model bench/generate_speed.py
measures speculative (prompt-lookup) decoding on. Nothing can be downloaded here, so there is no trained 1.1B; a
random-weight one never repeats itself, so no draft is ever accepted. This gives the 1.1B's real per-forward cost
(every weight of the 1.1B shape is read per forward, zeros cost the same as any value) with the acceptance of a
model that was trained to quote.

    python bench/copy_model.py               # train (~12 min on 2 quiet cores; cached), evaluate, graft to 1.1B
    python bench/copy_model.py --minutes 3   # a quicker, weaker model
    python bench/copy_model.py --hand-built  # no training: the hand-built copier (seconds)

1. Corpus (seeded, generated here, never stored in git), chat-like in this project's `### Human:` format:
   summaries (35%) - a paragraph of 4-7 sentences, each about another person, and "Quote what the text says about A
   and B": the answer repeats those sentences verbatim; code edits (30%) - a function from templates and "Rename x
   to y" or "Change 17 to 42": the answer is the function with that edit; "Repeat this text" (30%); plain
   paragraphs with no quoting (5%).
2. Tokenizer: a 1024-piece BPE sentencepiece model trained on that corpus (LLaMA's ids: unk 0, bos 1, eos 2).
3. The small model: our Transformer, dim 128, 2 heads of 64, 2 layers, ffn 256, fp32 weights (bf16 autocast), RoPE
   as the 1.1B's and norm_eps = 16 x the 1.1B's (see graft), vocabulary = the tokenizer's. Layer 0's head 0 starts,
   and stays, a previous-token head (previous_token_prior_); everything else is trained: AdamW, --steps of 16 x 192
   tokens or --minutes, whichever ends first, the loss weighted to the answers. Cached under
   /tmp/lazyllama-bench/copy-model/ with the tokenizer. On the shared 2-core machine (load 5-7) none of three runs
   learned to copy (~500 steps each; answer-token loss stuck at the no-copy floor, ~1.45 nats; 0/40 exact). On the
   same machine quiet (16 steps/s): 3,000 steps reached 0.64 nats (0/40 exact), the default 12,000 (12.4 min)
   0.37 nats and 16/40 exact.
   --hand-built: hand_built_copier instead, an induction circuit set by hand (no training): it quotes whatever its
   context continues with, follows no instruction, and loops - acceptance as high as prompt lookup can get.
4. Held-out prompts (another seed): greedy answers are compared with the expected ones (exact-match rate printed
   and stored); they are the bench's chat workload.
5. graft(): the small model's function, exactly, in the 1.1B shape (zero padding, see its docstring); written in
   Hugging Face format with bf16 tensors to /tmp/lazyllama-bench/copy-model-1.1B/, with tokenizer.model and
   prompts.json, so that ours and transformers' from_pretrained load the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import CACHE, SHARD_BYTES, read_marker, shape_params, tensor_shapes, write_marker  # noqa: E402

from model.args import ModelArgs, preset  # noqa: E402

SMALL_DIR = CACHE / "copy-model"  # tokenizer, trained small state, its eval
BIG_DIR = CACHE / "copy-model-1.1B"  # the grafted Hugging Face checkpoint + tokenizer + prompts
HAND_DIR = CACHE / "copy-model-hand-1.1B"  # the same for the hand-built copier
VERSION = 1
BIG_SHAPE = "1.1B"


SMALL_SHAPE = {"dim": 128, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "ffn_hidden_dim": 256}


def small_args(vocab_size: int, big: ModelArgs | None = None, **shape) -> ModelArgs:
    """The trained model's shape (SMALL_SHAPE, or `shape`): RoPE and max_seq_len as the big one's, head_dim too, and
    eps scaled so the graft is exact."""
    big = big or preset(BIG_SHAPE)
    shape = {**SMALL_SHAPE, **shape}
    return ModelArgs(
        **shape,
        head_size=big.head_dim,
        vocab_size=vocab_size,
        norm_eps=big.norm_eps * big.dim / shape["dim"],
        rope_theta=big.rope_theta,
        rope_scaling=big.rope_scaling,
        max_seq_len=big.max_seq_len,
        max_batch_size=1,
    )


# ---------------------------------------------------------------------------------------------------------------
# the corpus
# ---------------------------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return text.split()


NAMES = words(
    "Anna Tom Lea Max Sara Paul Nina Omar Ida Hugo Lina Ben Clara Leo Mia Noah Eva Finn Rosa Karl Vera Ivan Zoe "
    "Otto Emil Jana Luca Tara Felix Nora Adam Ella Jonas Maya Theo Lisa Oscar Alma Bruno Greta"
)
VERBS = words(
    "found painted carried sold bought cleaned opened fixed moved hid washed built lost counted watched broke "
    "wrapped dropped lifted measured borrowed baked planted stole filled emptied sorted checked"
)
ADJS = words(
    "red old small heavy green broken shiny wooden tall blue empty strange quiet warm yellow narrow round soft dark "
    "bright cold tiny golden dusty"
)
NOUNS = words(
    "box lamp chair basket bottle ladder clock table boat kettle drum mirror bucket rope coat map bell wheel "
    "window letter bicycle candle jar hammer blanket key vase cart sack"
)
PREPS = words("near behind inside under beside above across")
PLACES = words(
    "kitchen garden station market bridge harbor library school barn river forest tower castle bakery garage "
    "church mill square cellar meadow"
)
TIMES = ("in the morning", "at noon", "after dinner", "on Monday", "before the rain", "at night", "last week", "")

IDENTS = words(
    "count total items value result offset width height score limit price amount index size speed level weight "
    "start stop step delta ratio factor source target buffer values names rows cols left right low high node "
    "depth length number current previous first last page line word text key item entry"
)
FUNC_VERBS = words("compute get update scale merge count find check build load sum clean")

CODE_TEMPLATES = (
    "def {f}({a}, {b}):\n    {v} = {a} + {b}\n    if {v} > {n1}:\n        return {v} * {n2}\n    return {v} - {a}",
    "def {f}({a}):\n    {v} = 0\n    for {i} in range({a}):\n        {v} = {v} + {i} * {n1}\n    return {v}",
    "def {f}({a}, {b}):\n    {v} = []\n    for {i} in {a}:\n        if {i} != {b}:\n            {v}.append({i} + {n1})"
    "\n    return {v}",
    "def {f}({a}, {b}, {c}):\n    {v} = {a} * {b}\n    {w} = {v} - {c}\n    if {w} < {n1}:\n        {w} = {n2}\n"
    "    return max({v}, {w})",
    "def {f}({a}):\n    {v} = {{}}\n    for {i} in {a}:\n        {v}[{i}] = {v}.get({i}, {n1}) + {n2}\n    return {v}",
)


def sentence(rng: random.Random, name: str) -> str:
    when = rng.choice(TIMES)
    words = [name, rng.choice(VERBS), "the", rng.choice(ADJS), rng.choice(NOUNS), rng.choice(PREPS), "the"]
    words.append(rng.choice(PLACES))
    if when:
        words.append(when)
    return " ".join(words) + "."


def join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def summary_example(rng: random.Random) -> tuple[str, str]:
    people = rng.sample(NAMES, rng.randint(4, 7))
    said = {p: sentence(rng, p) for p in people}
    asked = rng.sample(people, rng.randint(1, 3))
    prompt = f"### Human: Quote what the text says about {join_names(asked)}.\n\n{' '.join(said.values())}\n"
    return prompt + "### Assistant:", " ".join(said[p] for p in asked)


def code_example(rng: random.Random) -> tuple[str, str]:
    names = rng.sample(IDENTS, 7)
    fill = dict(zip("abcivw", names), f=f"{rng.choice(FUNC_VERBS)}_{names[6]}")
    n1, n2 = rng.sample(range(2, 100), 2)
    code = rng.choice(CODE_TEMPLATES).format(**fill, n1=n1, n2=n2)
    if rng.random() < 0.6:  # rename one identifier the function uses
        used = [n for n in names[:6] if re.search(rf"\b{n}\b", code)]
        old = rng.choice(used)
        new = rng.choice([n for n in IDENTS if n not in names])
        instruction, edited = f"Rename {old} to {new}", re.sub(rf"\b{old}\b", new, code)
    else:  # change one constant: one line differs
        new = rng.choice([n for n in range(2, 100) if n not in (n1, n2)])
        instruction, edited = f"Change {n1} to {new}", re.sub(rf"\b{n1}\b", str(new), code)
    return f"### Human: {instruction} in this function:\n\n{code}\n### Assistant:", edited


def repeat_example(rng: random.Random) -> tuple[str, str]:
    """The plainest quote: the whole text again (teaches copying fastest; the other kinds then select what to copy)."""
    text = " ".join(sentence(rng, rng.choice(NAMES)) for _ in range(rng.randint(2, 5)))
    return f"### Human: Repeat this text.\n\n{text}\n### Assistant:", text


def plain_example(rng: random.Random) -> tuple[str, str]:
    """Text that never quotes itself (a paragraph of fresh sentences), no template."""
    return " ".join(sentence(rng, rng.choice(NAMES)) for _ in range(rng.randint(4, 8))), ""


KINDS = {"summary": summary_example, "code": code_example, "repeat": repeat_example, "plain": plain_example}
MIX = (("summary", 0.35), ("code", 0.30), ("repeat", 0.30), ("plain", 0.05))


def example(rng: random.Random) -> tuple[str, str, str]:
    """(kind, prompt, answer), kinds drawn by MIX."""
    r, kind = rng.random(), MIX[-1][0]
    for name, share in MIX:
        if r < share:
            kind = name
            break
        r -= share
    return (kind, *KINDS[kind](rng))


def encode_example(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids with bos, answer ids with eos). Prompt and answer are encoded apart, in training as in the
    held-out prompts, so a prompt ends at the same token boundary either way."""
    return [tok.bos_id, *tok.encode(prompt)], [*(tok.encode(answer) if answer else []), tok.eos_id]


def held_out_prompts(tok, n: int, seed: int) -> list[dict]:
    """n prompts alternating summary and code edit, from another seed than training."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        kind, prompt, answer = example(rng)
        if kind != ("summary", "code")[len(out) % 2]:
            continue
        p, a = encode_example(tok, prompt, answer)
        out.append({"kind": kind, "prompt": prompt, "answer": answer, "prompt_ids": p, "answer_ids": a})
    return out


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------


BATCH, SEQ, LR = 16, 192, 3e-3


def previous_token_prior_(model, *, pairs: int = 5, scale: float = 9.0, const: float = 8.0) -> list:
    """Start layer 0's head 0 as a previous-token head, and keep it: the half of an induction (copying) circuit that
    is slowest to emerge; the rest (matching, what to quote) is left to training.

    Residual dim 0 of every embedding holds `const`, so after RMSNorm it is a near-constant input. Head 0's query and
    key read it into the `pairs` fastest rotary pairs, the key rotated one position ahead: their dot product after
    RoPE is sum_p cos(theta_p (i - j - 1)), largest at j = i - 1 by a margin of ~0.9 of `pairs` over a 1k context.
    Its value copies the token's embedding dims 1..dim/2-1; its output writes them to dims dim/2.., which the
    embedding leaves at zero. Returns gradient hooks that keep these entries fixed during training."""
    import torch

    args, layer = model.args, model.layers[0].attention
    hd, half = args.head_dim, args.dim // 2
    theta = 1.0 / args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64)[:pairs] / hd)
    with torch.no_grad():
        emb = model.tok_embeddings.weight
        emb[:, 0] = const
        emb[:, half:] = 0
        for w in (layer.wq.weight, layer.wk.weight, layer.wv.weight):
            w[:hd] = 0
        layer.wo.weight[:, :hd] = 0
        a = scale / const
        for p in range(pairs):
            layer.wq.weight[2 * p, 0] = a
            layer.wk.weight[2 * p, 0] = a * math.cos(theta[p])
            layer.wk.weight[2 * p + 1, 0] = a * math.sin(theta[p])
        width = min(half - 1, hd)
        layer.wv.weight[:width, 1 : 1 + width] = torch.eye(width)
        layer.wo.weight[half : half + width, :width] = torch.eye(width)

    def keep(rows=None, cols=None):
        def hook(grad):
            grad = grad.clone()
            if rows is not None:
                grad[rows] = 0
            if cols is not None:
                grad[:, cols] = 0
            return grad

        return hook

    return [
        model.tok_embeddings.weight.register_hook(keep(cols=0)),
        layer.wq.weight.register_hook(keep(rows=slice(0, hd))),
        layer.wk.weight.register_hook(keep(rows=slice(0, hd))),
        layer.wv.weight.register_hook(keep(rows=slice(0, hd))),
        layer.wo.weight.register_hook(keep(cols=slice(0, hd))),
    ]


PROMPT_WEIGHT = 0.1  # loss weight of prompt tokens (random prose: noise); answers (the quotes) weigh 1


def batches(tok, seed: int, batch: int, seq: int):
    """Endless ([batch, seq + 1] tokens, [batch, seq] target weights) of packed examples (bos prompt answer eos)."""
    import torch

    rng, stream, weights = random.Random(seed), [], []
    n = batch * (seq + 1)
    while True:
        while len(stream) < n:
            _, prompt, answer = example(rng)
            p, a = encode_example(tok, prompt, answer)
            stream += p + a
            weights += [PROMPT_WEIGHT] * len(p) + [1.0] * len(a)
        block, stream = torch.tensor(stream[:n]).view(batch, seq + 1), stream[n:]
        w, weights = torch.tensor(weights[:n]).view(batch, seq + 1), weights[n:]
        yield block, w[:, 1:]  # a target's weight is its own token's


def train(tok, steps: int, minutes: float, seed: int, log) -> tuple[dict, ModelArgs, dict]:
    """AdamW for `steps` steps of BATCH x SEQ tokens, or `minutes` of wall time if that comes first (the schedule
    follows whichever is further along: reproducible on a quiet machine, bounded on a busy one)."""
    import torch
    import torch.nn.functional as F

    from model.llama import Transformer

    torch.manual_seed(seed)
    args = small_args(tok.vocab_size)
    model = Transformer(args)  # real init, fp32 (each module's own reset_parameters)
    hooks = previous_token_prior_(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.01)
    budget, t0, step, ema, ema_answer = minutes * 60, time.perf_counter(), 0, None, None
    for block, weight in batches(tok, seed, batch=BATCH, seq=SEQ):
        done = max(step / steps, (time.perf_counter() - t0) / budget)
        if done >= 1:
            break
        # warm-up over the first 40 steps, then cosine to 10%
        lr = LR * min(1.0, (step + 1) / 40) * (0.1 + 0.45 * (1 + math.cos(math.pi * done)))
        for g in opt.param_groups:
            g["lr"] = lr
        # bf16 autocast: 1.8x faster on this CPU (AVX512-BF16); the weights and the optimizer stay fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(block[:, :-1])
        per_token = F.cross_entropy(logits.float().flatten(0, 1), block[:, 1:].flatten(), reduction="none")
        w = weight.flatten()
        loss = (per_token * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        answer = float((per_token * (w == 1)).sum() / (w == 1).sum().clamp(min=1))
        ema = float(loss.detach()) if ema is None else 0.95 * ema + 0.05 * float(loss.detach())
        ema_answer = answer if ema_answer is None else 0.95 * ema_answer + 0.05 * answer
        step += 1
        if step % 50 == 0:
            seconds = time.perf_counter() - t0
            log(f"step {step}  loss {ema:.3f}  answer tokens {ema_answer:.3f}  lr {lr:.2e}  {seconds:.0f} s")
    for h in hooks:
        h.remove()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stats = {"steps": step, "loss_ema": ema, "answer_loss_ema": ema_answer, "train_s": time.perf_counter() - t0}
    return state, args, stats


def evaluate(state: dict, args: ModelArgs, prompts: list[dict]) -> dict:
    """Greedy answers of the fp32 small model on the held-out prompts: exact-match rate per kind."""
    import torch

    from model.llama import Transformer
    from util.generate import SamplingParams, generate

    model = Transformer(args.replace(max_seq_len=1024))
    model.load_state_dict(state)
    model.eval()
    hits: dict[str, list[int]] = {}
    with torch.no_grad():
        for p in prompts:
            want = p["answer_ids"]
            got = generate(model, [p["prompt_ids"]], SamplingParams(max_new_tokens=len(want) + 8), eos_id=2)[0]
            hits.setdefault(p["kind"], []).append(int(got + [2] == want))
    return {k: f"{sum(v)}/{len(v)}" for k, v in hits.items()}


# ---------------------------------------------------------------------------------------------------------------
# the graft
# ---------------------------------------------------------------------------------------------------------------


def graft_problems(small: ModelArgs, big: ModelArgs) -> list[str]:
    p = []
    if small.head_dim != big.head_dim:
        p.append(f"head_dim {small.head_dim} != {big.head_dim}")
    if small.n_kv_heads > big.n_kv_heads:
        p.append(f"n_kv_heads {small.n_kv_heads} > {big.n_kv_heads} (small kv head i becomes big kv head i)")
    elif small.n_heads // small.n_kv_heads > big.n_heads // big.n_kv_heads:
        p.append("the small model has more query heads per kv head than the big one")
    for name in ("dim", "n_layers", "hidden_dim", "vocab_size"):
        if getattr(small, name) > getattr(big, name):
            p.append(f"{name} {getattr(small, name)} > {getattr(big, name)}")
    if not math.isclose(small.norm_eps, big.norm_eps * big.dim / small.dim, rel_tol=1e-6):
        p.append(
            f"norm_eps {small.norm_eps} != big norm_eps x big dim / small dim = {big.norm_eps * big.dim / small.dim}"
        )
    if (small.rope_theta, small.rope_scaling_params) != (big.rope_theta, big.rope_scaling_params):
        p.append("RoPE (rope_theta / rope_scaling) differs")
    if small.tie_word_embeddings or big.tie_word_embeddings:
        p.append("tied embeddings are not supported")
    return p


def graft(small_state: dict, small: ModelArgs, big: ModelArgs, *, dtype=None, filler_token: int = 0):
    """Yield (Meta name, tensor) of a `big`-shaped model that computes `small`'s function exactly.

    - Residual width: the small model lives in dims [0, small.dim); every weight that writes into the residual
      (embedding columns, wo and w2 rows) is zero beyond it, so those dims stay zero through every layer.
    - RMSNorm over big.dim dims of which small.dim are non-zero: the mean square is small.dim / big.dim of the
      small model's, so with norm_eps_small = norm_eps_big * big.dim / small.dim the normalized value is
      sqrt(big.dim / small.dim) times the small one - norm weights are scaled by sqrt(small.dim / big.dim).
    - Heads: small query head h (kv group g = h // rep_s) becomes big head g * rep_b + h % rep_b, which reads big kv
      head g = small kv head g; the other heads' wq rows are zero and their wo columns are zero (a zero query still
      attends, uniformly, but nothing it reads reaches the residual).
    - FFN hidden units beyond the small model's: zero rows of w1/w3 and zero columns of w2 (silu(0) * 0 = 0).
    - Layers beyond the small model's: all zero, norms included (a zero block adds nothing: the identity).
    - Vocabulary: extra embedding rows are zero; extra head rows copy the head row of `filler_token` (a token the
      trained model never predicts), so no extra id ever wins an argmax the small model's ids would not.
    """
    import torch

    problems = graft_problems(small, big)
    if problems:
        raise ValueError("graft: the small model does not fit the big shape: " + "; ".join(problems))
    ds, db, hd = small.dim, big.dim, big.head_dim
    rep_s, rep_b = small.n_heads // small.n_kv_heads, big.n_heads // big.n_kv_heads
    heads = [(h // rep_s) * rep_b + h % rep_s for h in range(small.n_heads)]
    norm_scale = math.sqrt(ds / db)
    dtype = dtype or torch.float32

    def zeros(shape):
        return torch.zeros(shape, dtype=torch.float32)

    for key, shape in tensor_shapes(big):
        out = zeros(shape)
        layer = int(key.split(".")[1]) if key.startswith("layers.") else None
        if layer is not None and layer >= small.n_layers:
            yield key, out.to(dtype)
            continue
        w = small_state[key].float()
        name = key.rsplit(".", 2)[-2]
        if name == "tok_embeddings":
            out[: small.vocab_size, :ds] = w
        elif name == "output":
            out[: small.vocab_size, :ds] = w
            out[small.vocab_size :, :ds] = w[filler_token]
        elif name in ("attention_norm", "ffn_norm", "norm"):
            out[:ds] = w * norm_scale
        elif name == "wq":
            for h, b in enumerate(heads):
                out[b * hd : (b + 1) * hd, :ds] = w[h * hd : (h + 1) * hd]
        elif name in ("wk", "wv"):
            out[: w.shape[0], :ds] = w  # small kv head g is big kv head g; the big one's others read nothing
        elif name == "wo":
            for h, b in enumerate(heads):
                out[:ds, b * hd : (b + 1) * hd] = w[:, h * hd : (h + 1) * hd]
        elif name in ("w1", "w3"):
            out[: small.hidden_dim, :ds] = w
        elif name == "w2":
            out[:ds, : small.hidden_dim] = w
        else:
            raise KeyError(f"graft: no rule for {key}")
        yield key, out.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# the cached artifacts
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# the hand-built copier (--hand-built): the fallback when training finds no copying in the CPU budget
# ---------------------------------------------------------------------------------------------------------------


def _codes(vocab: int, seed: int):
    """Unit token codes [vocab, 64]: 16 dims from an extended Hamming code (any two codewords differ in >= 4 of 16
    signs, so their match score is at most half a token's own) and 48 random dims (the output's discrimination)."""
    import torch

    words = []
    for v in range(1 << 16):
        bits = [(v >> i) & 1 for i in range(16)]
        syndrome = 0
        for i in range(1, 16):
            if bits[i]:
                syndrome ^= i
        if syndrome == 0 and sum(bits) % 2 == 0:  # [16, 11, 4]: Hamming(15, 11) on bits 1..15, parity in bit 0
            words.append(bits)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(words), generator=g)[:vocab]
    match = (torch.tensor(words, dtype=torch.float64)[pick] * 2 - 1) / math.sqrt(32)  # norm^2 0.5
    rest = torch.randn(vocab, 48, generator=g, dtype=torch.float64)
    rest = rest / rest.norm(dim=1, keepdim=True) * math.sqrt(0.5)
    return torch.cat([match, rest], dim=1)


def hand_built_copier(vocab: int, seed: int = 0) -> tuple[dict, ModelArgs]:
    """A 2-layer model whose weights are set, not trained, to copy: the next token is the one that followed the most
    recent earlier occurrence of the current token (an induction circuit). Residual dims: 0 a constant, 1..64 the
    token's code, 65..128 the previous token's (layer 0, head 0: the previous-token head of previous_token_prior_),
    129..192 the copied token's (layer 1, head 0: query = own code, key = previous token's code, both on the 8
    slowest rotary pairs so that RoPE barely moves the match over a few hundred positions, plus a recency term on
    a slow pair; value = the key position's own code). The head reads dims 129..192 against each token's code; the
    unk id scores a constant -10 (the graft's filler row). Feed-forwards are zero. It answers by quoting whatever
    its context continues with: an upper bound on how much of an answer prompt lookup can draft."""
    import torch

    from model.llama import Transformer

    args = small_args(vocab, dim=256, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden_dim=64)
    model = Transformer(args)
    state = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in model.state_dict().items()}
    code = _codes(vocab, seed)
    c = s = 8.0
    hd = args.head_dim
    theta = 1.0 / args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    for key in state:
        if key.endswith("norm.weight"):
            state[key].fill_(1.0)
    emb = state["tok_embeddings.weight"]
    emb[:, 0] = c
    emb[:, 1:65] = s * code
    # layer 0 (input rms sqrt((c^2 + s^2) / 256)): head 0 attends to the previous position, copies the code up
    r0 = math.sqrt((c * c + s * s) / args.dim)
    a = 10.2 / (c / r0)
    wq, wk, wv, wo = (state[f"layers.0.attention.{n}.weight"] for n in ("wq", "wk", "wv", "wo"))
    for p in range(5):
        wq[2 * p, 0] = a
        wk[2 * p, 0], wk[2 * p + 1, 0] = a * math.cos(theta[p]), a * math.sin(theta[p])
    wv[:64, 1:65] = torch.eye(64)
    wo[65:129, :64] = torch.eye(64) * r0
    # layer 1 (input rms sqrt(3 s^2 + c^2) / 16 ~): head 0 matches own code against the previous token's code
    r1 = math.sqrt((c * c + 2 * s * s) / args.dim)
    b, rec = 2.4, 1.4
    wq, wk, wv, wo = (state[f"layers.1.attention.{n}.weight"] for n in ("wq", "wk", "wv", "wo"))
    for i in range(16):  # pairs 24..31: head dims 48..63
        wq[48 + i, 1 + i] = b * r1 / s * 4
        wk[48 + i, 65 + i] = b * r1 / s * 4
    wq[40, 0] = rec * r1 / c * 8  # pair 20: cos(theta_20 * distance) falls over the context: prefer recent matches
    wk[40, 0] = rec * r1 / c * 8
    wv[:64, 1:65] = torch.eye(64)
    wo[129:193, :64] = torch.eye(64) * r1
    out = state["output.weight"]
    out[:, 129:193] = 3.0 * code / (s / math.sqrt((c * c + 3 * s * s) / args.dim))
    out[0] = 0
    out[0, 0] = -10.0 / (c / math.sqrt((c * c + 3 * s * s) / args.dim))
    return {k: v.float() for k, v in state.items()}, args


def corpus_sample(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{p} {a}".strip() for _, p, a in (example(rng) for _ in range(n))]


def ensure_small(steps: int, minutes: float, seed: int, n_eval: int, log=print) -> tuple[dict, ModelArgs, dict]:
    """The tokenizer and the trained small model: cached in SMALL_DIR, trained when missing or made otherwise."""
    import torch
    from safetensors.torch import load_file, save_file

    from util.tokenizer.sentencepiece_model import train_tokenizer

    recipe = {"version": VERSION, "seed": seed, "steps": steps}  # --minutes only caps it (the marker says if it did)
    info = read_marker(SMALL_DIR, **recipe)
    if info is not None:
        log(f"small model: reusing {SMALL_DIR} (exact answers {info['exact']})")
        return load_file(str(SMALL_DIR / "small.safetensors")), ModelArgs.from_dict(info["args"]), info
    if SMALL_DIR.exists():
        shutil.rmtree(SMALL_DIR)
    SMALL_DIR.mkdir(parents=True)
    tok = train_tokenizer(
        corpus_sample(seed + 7, 4000), SMALL_DIR / "tokenizer.model", vocab_size=1024, llama_normalization=True
    )
    log(
        f"tokenizer: {tok.vocab_size} pieces; training {steps} steps (at most {minutes} min) on "
        f"{torch.get_num_threads()} threads"
    )
    state, args, stats = train(tok, steps, minutes, seed, log)
    save_file(state, str(SMALL_DIR / "small.safetensors"))
    prompts = held_out_prompts(tok, n_eval, seed + 1000)
    exact = evaluate(state, args, prompts)
    log(f"small model: {stats}; exact greedy answers on held-out prompts: {exact}")
    info = write_marker(SMALL_DIR, {**recipe, "args": args.to_dict(), "exact": exact, **stats})
    return state, args, info


def write_big(
    state: dict, args: ModelArgs, small_info: dict, n_prompts: int, seed: int, log=print, out_dir: Path = BIG_DIR
) -> Path:
    """The grafted 1.1B-shape checkpoint (Hugging Face format, bf16), tokenizer.model and prompts.json."""
    import torch

    from util.checkpoint import write_hf_checkpoint
    from util.tokenizer import Tokenizer

    big = preset(BIG_SHAPE)
    # the small model's training record too: a retrained model has the same file sizes, and must be grafted again
    trained = {k: small_info.get(k) for k in ("steps", "seed", "train_s", "answer_loss_ema")}
    recipe = {"version": VERSION, "small_files": small_info["files"], "small": trained, "n_prompts": n_prompts}
    recipe["seed"] = seed
    if read_marker(out_dir, **recipe) is not None:
        log(f"grafted checkpoint: reusing {out_dir}")
        return out_dir
    tok = Tokenizer(SMALL_DIR / "tokenizer.model")
    # the filler head row: the unk id, which byte-fallback text never contains (checked below against the max)
    check_filler(state, args, tok, filler=0)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    tensors = graft(state, args, big, dtype=torch.bfloat16, filler_token=0)
    write_hf_checkpoint(tmp, tensors, params=shape_params(big), max_shard_bytes=SHARD_BYTES)
    shutil.copy(SMALL_DIR / "tokenizer.model", tmp / "tokenizer.model")
    prompts = held_out_prompts(tok, n_prompts, seed + 1000)
    (tmp / "prompts.json").write_text(json.dumps({"small_vocab_size": args.vocab_size, "prompts": prompts}))
    write_marker(tmp, {**recipe, "small_exact": small_info["exact"]})
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log(f"grafted checkpoint: {out_dir} in {time.perf_counter() - t0:.0f} s")
    return out_dir


def check_filler(state: dict, args: ModelArgs, tok, filler: int) -> None:
    """The filler token's logit must be far below the winner's on real text, or padded ids could be chosen."""
    import torch

    from model.llama import Transformer

    model = Transformer(args.replace(max_seq_len=512))
    model.load_state_dict(state)
    with torch.no_grad():
        ids = torch.tensor([[tok.bos_id, *tok.encode(corpus_sample(99, 1)[0])][:256]])
        logits = model(ids)[0]
    gap = float((logits.max(-1).values - logits[:, filler]).min())
    if gap < 5:
        raise SystemExit(f"filler token {filler}'s logit comes within {gap:.1f} of the max: pick another filler")


def ensure(
    steps: int = 3000,
    minutes: float = 12,
    seed: int = 0,
    n_prompts: int = 8,
    n_eval: int = 40,
    log=None,
    hand_built: bool = False,
) -> Path:
    log = log or (lambda msg: print(msg, flush=True))
    if not hand_built:
        state, args, info = ensure_small(steps, minutes, seed, n_eval, log)
        return write_big(state, args, info, n_prompts, seed, log)
    from util.tokenizer import Tokenizer
    from util.tokenizer.sentencepiece_model import train_tokenizer

    path = SMALL_DIR / "tokenizer.model"
    if path.is_file():
        tok = Tokenizer(path)
    else:
        tok = train_tokenizer(corpus_sample(seed + 7, 4000), path, vocab_size=1024, llama_normalization=True)
    state, args = hand_built_copier(tok.vocab_size, seed)
    exact = evaluate(state, args, held_out_prompts(tok, n_eval, seed + 1000))
    log(f"hand-built copier: exact answers on held-out prompts {exact} (it quotes; it does not follow instructions)")
    info = {"files": {"hand_built": VERSION}, "exact": exact}
    return write_big(state, args, info, n_prompts, seed, log, out_dir=HAND_DIR)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12000, help="training steps of 16 x 192 tokens")
    p.add_argument("--minutes", type=float, default=12, help="wall-clock cap on training (ends it early)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts for the bench's chat workload")
    p.add_argument("--hand-built", action="store_true", help="the hand-built copier instead of training (HAND_DIR)")
    p.add_argument("--eval", type=int, default=40, help="held-out prompts for the exact-match rate")
    opts = p.parse_args()
    ensure(opts.steps, opts.minutes, opts.seed, opts.prompts, opts.eval, hand_built=opts.hand_built)


if __name__ == "__main__":
    main()
