"""Decoding with the model's KV cache: greedy and sampled, batched, streamed as text, and a chat on top.

One loop (`decode`) serves everything: prompts of different lengths share the cache's positions (start_pos is
one int), so decoding starts at the shortest prompt and the longer prompts' tokens are forced while they last -
the cache then only ever holds real tokens and no padding mask is needed. Model parallel: every rank runs the
same loop on the same (gathered) logits; the chosen tokens are broadcast from the group's first rank, so
sampling agrees even if the ranks' generators or logits differed in the last bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from model.llama import Transformer
from util.dist import mp_group, mp_src_rank, position
from util.templates import ChatFormat, chat_format_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy (argmax); otherwise logits / temperature, then top-k / top-p
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p (1: all)
    top_k: int = 0  # keep the k most likely tokens (0: all)
    repetition_penalty: float = 1.0  # CTRL's: divide positive / multiply negative logits of seen tokens (1: off)
    seed: int | None = None  # sampling generator seed (None: a fresh one)
    draft_tokens: int = 0  # speculative decoding: up to this many prompt-lookup drafts per forward (util.speculative)

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0 keeps all tokens)")
        if self.draft_tokens < 0:
            problems.append(f"draft_tokens={self.draft_tokens} must be >= 0 (0: no speculative decoding)")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 is off)")
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))

    def replace(self, **changes) -> SamplingParams:
        return replace(self, **changes)


# --- logits processing (pure functions on [batch, vocab] fp32 logits) ---


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in `seen` [batch, n] less likely: positive logits / penalty, negative * penalty."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(1, seen)
    return logits.scatter(1, seen, torch.where(picked > 0, picked / penalty, picked * penalty))


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the most likely tokens until their probability reaches p (at least one); the rest -inf."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= p  # the first token always stays (before = 0 < p)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(
    logits: torch.Tensor, params: SamplingParams, *, seen: torch.Tensor | None = None, generator=None
) -> torch.Tensor:
    """One token per row of logits [batch, vocab]: greedy when temperature is 0, else sampled."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = filter_top_p(filter_top_k(logits / params.temperature, params.top_k), params.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


# --- the decoding loop ---


@torch.inference_mode()
def decode(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams = SamplingParams(),
    *,
    eos_id: int | Collection[int] | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
    vocab_size: int | None = None,
    prefix: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[list[int | None]]:
    """Yield, per decoding step, the new token of each prompt (None for a prompt not yet generating or finished).

    A prompt finishes at eos_id (not yielded; a collection: any of them, e.g. Llama 3's eot and end of text),
    after max_new_tokens, or when stop(row, its tokens so far) is true.
    vocab_size: never produce ids at or above it (a model whose embedding is larger than its tokenizer).
    prefix: the LLaMA-Adapter prefix (multimodal), passed to every forward.
    images: [batch, 3, S, S] (or one [3, S, S] for every prompt), preprocessed for the model's visual backbone
    (util.images.load_image). "tokens" mode: the image goes before the text with the prompt's forward, and the
    decoding steps continue after its positions; "prefix" mode: the image is encoded once, before the prompt's
    forward, and its prefix goes with every forward (the same values the model would compute from the image).
    Every prompt must fit: image positions + len(prompt) + max_new_tokens <= max_seq_len (see fit_prompt).
    """
    lengths = [len(p) for p in prompts]
    end_ids = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    offset = 0
    if images is not None:
        if getattr(model, "visual", None) is None:
            raise ValueError("images given to a text-only model: set visual_backbone in the config")
        if images.dim() == 3:
            images = images.unsqueeze(0).expand(len(prompts), -1, -1, -1)
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} image(s) for {len(prompts)} prompt(s): give one per prompt")
        offset = model.image_positions()
        if model.visual.mode == "prefix":
            # The prefix depends on the image alone: computed once and reused by every step, like the KV cache,
            # instead of one image-encoder pass per generated token. The same call and dtype as the model's
            # forward makes it, so the logits are those of a forward given the image.
            visual = model.visual(images, dtype=model.tok_embeddings.weight.dtype)
            prefix, images = (visual if prefix is None else prefix + visual), None
    max_seq_len = model.args.max_seq_len - offset
    if not prompts or min(lengths) == 0:
        raise ValueError("every prompt needs at least one token (e.g. the tokenizer's BOS)")
    too_long = [i for i, n in enumerate(lengths) if n + params.max_new_tokens > max_seq_len]
    if too_long:
        raise ValueError(
            f"prompt(s) {too_long} of {[lengths[i] for i in too_long]} tokens + max_new_tokens="
            f"{params.max_new_tokens} exceed max_seq_len={max_seq_len}: shorten them (util.generate.fit_prompt "
            "truncates from the left) or ask for fewer new tokens"
        )
    device = model.norm.weight.device
    batch, shortest, total = len(prompts), min(lengths), max(lengths) + params.max_new_tokens
    tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(list(p), dtype=torch.long)
    lengths_t = torch.tensor(lengths, device=device)
    mp = mp_group() if position().model_parallel_size > 1 else None  # several ranks decode one batch
    if generator is None and params.temperature > 0:
        generator = make_generator(params.seed, device)

    model.setup_cache(batch, total + offset)
    # the prefill needs only its last position's logits: the head runs on one row, not the whole prompt
    hidden = model(tokens[:, :shortest], start_pos=0, prefix=prefix, images=images, return_hidden=True)
    logits = model.logits(hidden[:, -1:]).float()[:, -1]
    if params.draft_tokens > 0 and batch == 1 and mp is None:
        from util.speculative import decode_one  # noqa: PLC0415 - util.speculative imports this module

        def forward(ids: torch.Tensor, start: int) -> torch.Tensor:
            return model(ids, start_pos=start + offset, prefix=prefix)[0]

        yield from decode_one(
            forward,
            prompts[0],
            logits[0],
            params,
            max_draft=params.draft_tokens,
            eos_id=eos_id,
            stop=stop,
            vocab_size=vocab_size,
            generator=generator,
        )
        return
    produced: list[list[int]] = [[] for _ in prompts]
    done = [False] * batch
    for pos in range(shortest, total):
        if vocab_size is not None and vocab_size < logits.shape[-1]:
            logits[:, vocab_size:] = float("-inf")
        seen = tokens[:, :pos] if params.repetition_penalty != 1.0 else None
        chosen = next_tokens(logits, params, seen=seen, generator=generator)
        if mp is not None:  # the group's first rank decides for everyone
            dist.broadcast(chosen, src=mp_src_rank(), group=mp)
        forced = pos < lengths_t
        tokens[:, pos] = torch.where(forced, tokens[:, pos], chosen)
        step: list[int | None] = [None] * batch
        for i in range(batch):
            if done[i] or pos < lengths[i]:
                continue
            token = int(tokens[i, pos])
            if token in end_ids:
                done[i] = True
                continue
            produced[i].append(token)
            step[i] = token
            stopped = stop is not None and stop(i, produced[i])
            if stopped or len(produced[i]) >= params.max_new_tokens:
                done[i] = True
        if any(t is not None for t in step):
            yield step
        if all(done):
            return
        logits = model(tokens[:, pos : pos + 1], start_pos=pos + offset, prefix=prefix)[:, -1]


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams = SamplingParams(),
    **kwargs,
) -> list[list[int]]:
    """The new tokens of each prompt (without the prompt and without EOS). kwargs: as `decode`."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in decode(model, prompts, params, **kwargs):
        for i, token in enumerate(step):
            if token is not None:
                out[i].append(token)
    return out


def fit_prompt(
    ids: Sequence[int], max_seq_len: int, max_new_tokens: int, *, min_new_tokens: int | None = None
) -> tuple[list[int], int, list[str]]:
    """Make a prompt and its answer fit the model: (ids, max_new_tokens, notes saying what was cut).

    The answer's budget shrinks first, down to min_new_tokens (default: a quarter of the context); a prompt that
    still does not fit loses its oldest tokens."""
    floor = min(max_new_tokens, max(1, max_seq_len // 4) if min_new_tokens is None else min_new_tokens)
    notes = []
    room = max_seq_len - len(ids)
    if room < max_new_tokens:
        new = max(room, floor)
        if new < max_new_tokens:
            notes.append(f"max new tokens lowered from {max_new_tokens} to {new} to fit max_seq_len={max_seq_len}")
        max_new_tokens = new
    keep = max_seq_len - max_new_tokens
    if len(ids) > keep:
        notes.append(
            f"prompt of {len(ids)} tokens truncated from the left to its last {keep} "
            f"(max_seq_len={max_seq_len} - {max_new_tokens} new tokens)"
        )
        ids = ids[-keep:]
    return list(ids), max_new_tokens, notes


# --- text ---


class TextStream:
    """Turns generated ids into text deltas: holds back an incomplete UTF-8 character and any tail that could
    be the start of a stop string; `push` returns the new text and whether a stop string was reached."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids)
        for s in self.stop:
            cut = full.find(s)
            if cut != -1:
                self.stopped = True
                full = full[:cut]
        if not self.stopped:
            full = full.rstrip("\ufffd")  # bytes of a character still to come
            full = full[: len(full) - self._stop_prefix(full)]
        if not full.startswith(self.text):  # decoding is not always prefix-stable; never take text back
            return ""
        delta, self.text = full[len(self.text) :], full
        return delta

    def flush(self) -> str:
        """The held-back tail at the end of generation (no stop string followed)."""
        if self.stopped:
            return ""
        full = self.tokenizer.decode(self.ids)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        return delta

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


def stream_text(
    model: Transformer,
    tokenizer,
    prompt: Sequence[int],
    params: SamplingParams = SamplingParams(),
    *,
    stop: Sequence[str] = (),
    prefix: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    end_ids: Collection[int] | None = None,
) -> Iterator[str]:
    """Generate from one tokenized prompt, yielding text deltas as they are decoded, ending before a stop
    string or an end id (default: the tokenizer's eos; a chat format's: ChatFormat.end_ids)."""
    text = TextStream(tokenizer, stop)
    deltas: list[str] = []

    def push(_row: int, ids: list[int]) -> bool:  # decode asks after each token whether to stop
        deltas.append(text.push(ids[-1]))
        return text.stopped

    for _ in decode(
        model,
        [prompt],
        params,
        eos_id=tokenizer.eos_id if end_ids is None else end_ids,
        stop=push,
        vocab_size=tokenizer.vocab_size,
        prefix=prefix,
        images=images,
        generator=generator,
    ):
        delta = deltas.pop()
        if delta:
            yield delta
    tail = text.flush()
    if tail:
        yield tail


# --- chat ---


class Reply:
    """One streamed answer: iterate for text deltas; `notes` says what was cut to fit; `text` is the answer so
    far. `close()` stops early - or, under model parallel, runs to the end, since every rank must take part in
    every step."""

    def __init__(self, deltas: Iterator[str], notes: list[str], on_done: Callable[[str], None], must_finish: bool):
        self._deltas, self.notes, self._on_done, self._must_finish = deltas, notes, on_done, must_finish
        self.text = ""
        self._finished = False

    def __iter__(self) -> Iterator[str]:
        for delta in self._deltas:
            self.text += delta
            yield delta
        self._finish()

    def close(self) -> None:
        if self._finished:
            return
        if self._must_finish:
            for delta in self._deltas:
                self.text += delta
        self._finish()

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._on_done(self.text)


class Chat:
    """A conversation with history in a chat format (util.templates; "auto": the tokenizer's): `send` returns a
    streamed Reply that ends at the format's end tokens (Llama 3: eot) or stop strings (this project's template).

    raw=True: no template and no history, each message is the whole prompt (a base model)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer,
        *,
        raw: bool = False,
        stop: Sequence[str] | None = None,
        chat_format: str | ChatFormat = "auto",
    ):
        self.model, self.tokenizer, self.raw = model, tokenizer, raw
        self.format = None if raw else chat_format_for(tokenizer, chat_format)
        self.stop = () if raw else tuple(self.format.stop_strings if stop is None else stop)
        self.end_ids = (tokenizer.eos_id,) if raw else self.format.end_ids(tokenizer)
        self.turns: list[tuple[str, str]] = []

    def clear(self) -> None:
        self.turns = []

    def prompt_ids(
        self, message: str, max_new_tokens: int, *, image_positions: int = 0
    ) -> tuple[list[int], int, list[str]]:
        """The tokenized prompt for `message` that fits the context, and the answer's budget: the oldest turns
        go first, then the budget shrinks (to a quarter of the context at least), then the prompt's oldest tokens.
        image_positions: context taken by an image before the text."""
        notes = []
        turns = list(self.turns)
        max_seq_len = self.model.args.max_seq_len - image_positions
        min_new = min(max_new_tokens, max(1, max_seq_len // 4))  # the answer's budget may shrink to this first
        while True:
            if self.raw:
                ids = self.tokenizer.encode(message, bos=self.tokenizer.add_bos)
            else:
                ids, _ = self.format.encode(self.format.chat([*turns, (message, None)]), self.tokenizer)
            if len(ids) + min_new <= max_seq_len or not turns:
                break
            turns.pop(0)
        if len(turns) < len(self.turns):
            notes.append(f"the oldest {len(self.turns) - len(turns)} turn(s) left out to fit max_seq_len={max_seq_len}")
        ids, max_new_tokens, cut = fit_prompt(ids, max_seq_len, max_new_tokens, min_new_tokens=min_new)
        return ids, max_new_tokens, notes + cut

    def send(self, message: str, params: SamplingParams = SamplingParams(), *, prefix=None, images=None) -> Reply:
        """images: a preprocessed image [1, 3, S, S] for the prompt (a model with a visual backbone); in a
        conversation, pass it with every message (the prompt holds the whole history after the image)."""
        message = message.strip()
        if not message:
            raise ValueError("empty message: type something to send")
        taken = self.model.image_positions() if images is not None else 0
        ids, max_new, notes = self.prompt_ids(message, params.max_new_tokens, image_positions=taken)
        deltas = stream_text(
            self.model,
            self.tokenizer,
            ids,
            params.replace(max_new_tokens=max_new),
            stop=self.stop,
            prefix=prefix,
            images=images,
            end_ids=self.end_ids,
        )

        def remember(answer: str) -> None:
            if not self.raw:
                self.turns.append((message, answer.strip()))

        return Reply(deltas, notes, remember, must_finish=position().model_parallel_size > 1)
