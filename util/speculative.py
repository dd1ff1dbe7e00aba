"""Speculative decoding without a second model: drafts looked up in the text so far (prompt lookup), verified in
one forward.

Why it is faster: decoding one token reads every weight once; on CPU (and on small GPU batches) that read is the
cost, not the arithmetic. A forward over the pending token plus k drafted tokens reads the weights once too and
says, at every one of those positions, what the model would have produced - so each accepted draft token is a
token decoded without a weight read of its own. Chat answers quote their prompt (summaries, code edits, names,
lists), so the draft comes from the context itself: the tokens that followed the most recent earlier occurrence
of the last n tokens (`NgramDrafter`).

Exactness:
- greedy: a draft token is kept only while it equals the argmax at its position, and the first mismatch is
  replaced by that argmax - the output is plain greedy's (up to the last-bit differences between a multi-token
  and a one-token forward, which matter only for exact ties).
- sampling: the draft is a point mass q = [d], so the speculative-sampling rule (keep d with probability
  min(1, p(d) / q(d)) = p(d); on rejection sample from (p - q)+ renormalized = p without d) leaves the
  distribution of every token exactly p - the same temperature / top-k / top-p / repetition-penalty distribution
  plain decoding samples from.
- the KV cache: the verify forward writes the drafts' keys and values; on rejection the position simply does not
  advance past the accepted ones. Attention at start_pos s reads cache[:s + seq] and every forward writes its own
  positions first, so the rejected entries are overwritten before anything could read them: rolling back is
  resetting the position.

Only batch 1 on one model-parallel rank (a chat); `util.generate.decode` falls back to the plain loop otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from util.generate import SamplingParams, apply_repetition_penalty, filter_top_k, filter_top_p

# Longest and shortest context suffix looked up; longer matches are tried first (they predict better). A
# one-token match is too weak to pay for the verify forward on its own (it is what random text produces).
NGRAM_MAX, NGRAM_MIN = 4, 2


class NgramDrafter:
    """Prompt lookup over a growing token list: `propose(k)` returns up to k tokens that followed the most
    recent earlier occurrence of the list's last n tokens (n from NGRAM_MAX down to NGRAM_MIN), [] if none.

    An index from each n-gram to the position after its latest occurrence is updated as tokens arrive, so a
    lookup costs O(NGRAM_MAX) whatever the context length."""

    def __init__(self, tokens: Sequence[int] = (), *, ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"ngram_min={ngram_min}, ngram_max={ngram_max}: need 1 <= ngram_min <= ngram_max")
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            i = len(self.tokens)  # the n-grams ending just before token i are followed by it
            for n in range(self.ngram_min, self.ngram_max + 1):
                if i >= n:
                    self._next[tuple(self.tokens[i - n : i])] = i
            self.tokens.append(int(t))

    def propose(self, k: int) -> list[int]:
        if k <= 0:
            return []
        length = len(self.tokens)
        for n in range(min(self.ngram_max, length), self.ngram_min - 1, -1):
            j = self._next.get(tuple(self.tokens[length - n :]))
            if j is not None:
                return self.tokens[j : j + k]
        return []


def _probs(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """The distribution plain decoding samples from (util.generate.next_tokens), for one row [vocab]."""
    logits = logits.float()[None]
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen[None], params.repetition_penalty)
    logits = filter_top_p(filter_top_k(logits / params.temperature, params.top_k), params.top_p)
    return logits.softmax(-1)[0]


def verify(
    logits: torch.Tensor,
    draft: Sequence[int],
    params: SamplingParams,
    *,
    seen: Callable[[int], torch.Tensor | None],
    generator: torch.Generator | None = None,
) -> list[int]:
    """The tokens decoding produces from a verify forward: the accepted prefix of `draft`, then one more token (the
    correction at the first rejection, or the token after the last draft when all are accepted).

    logits [len(draft) + 1, vocab]: row i predicts the token after draft[:i] (row 0: after the pending token).
    seen(i): the tokens before row i's prediction, for the repetition penalty (None when it is off)."""
    out: list[int] = []
    for i in range(len(draft) + 1):
        row = logits[i].float()
        if params.temperature == 0:
            s = seen(i)
            if s is not None:
                row = apply_repetition_penalty(row[None], s[None], params.repetition_penalty)[0]
            token = int(row.argmax())
            out.append(token)
            if i == len(draft) or token != draft[i]:
                return out
            continue
        p = _probs(row, params, seen(i))
        if i < len(draft):
            d = draft[i]
            if float(torch.rand((), generator=generator, device=p.device)) < float(p[d]):
                out.append(d)
                continue
            p = p.clone()
            p[d] = 0.0  # (p - point mass at d)+, renormalized by multinomial
            if float(p.sum()) <= 0:  # p was all on d (then the draft is always accepted; guard rounding)
                out.append(d)
                continue
        out.append(int(torch.multinomial(p, 1, generator=generator)))
        return out
    return out


def decode_one(
    forward: Callable[[torch.Tensor, int], torch.Tensor],
    prompt: Sequence[int],
    first_logits: torch.Tensor,
    params: SamplingParams,
    *,
    max_draft: int,
    eos_id: int | Sequence[int] | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[list[int | None]]:
    """The decoding loop of `util.generate.decode` for one prompt, with drafted tokens verified in one forward.

    forward(tokens [1, n], start_pos) -> logits [n, vocab] from the KV cache (the prompt already in it);
    first_logits [vocab]: the prefill's last position. The cache must hold len(prompt) + max_new_tokens.
    Yields [token] per produced token, like decode."""
    end_ids = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())  # Llama 3 ends on eot or eos
    drafter = NgramDrafter(prompt)
    produced: list[int] = []
    # Drafting pauses for 1, 3, 7, ... 31 steps after 1, 2, 3, ... drafts in a row with nothing accepted: text
    # that does not repeat itself (or a model that does not follow it) then decodes as plainly as without
    # drafts. Which steps draft never changes the output (greedy) or its distribution (sampling).
    misses = pause = 0
    device = first_logits.device
    penalize = params.repetition_penalty != 1.0

    def mask(logits: torch.Tensor) -> torch.Tensor:
        if vocab_size is not None and vocab_size < logits.shape[-1]:
            logits = logits.clone()
            logits[..., vocab_size:] = float("-inf")
        return logits

    # the first token, from the prefill's logits (no draft can precede it)
    history = list(prompt)
    first = verify(mask(first_logits)[None], [], params, seen=_seen(history, penalize, device), generator=generator)
    pending = first[0]
    while True:
        # emit the pending token: it is decided
        if pending in end_ids:
            return
        produced.append(pending)
        stopped = stop is not None and stop(0, produced)  # asked before the yield, as decode does
        yield [pending]
        if stopped or len(produced) >= params.max_new_tokens:
            return
        drafter.extend([pending])
        start = len(history)
        history.append(pending)
        # drafts never run past the answer's budget - nor past the cache, which holds prompt + max_new_tokens
        draft = drafter.propose(min(max_draft, params.max_new_tokens - len(produced))) if not pause else []
        pause = max(0, pause - 1)
        logits = mask(forward(torch.tensor([[pending, *draft]], device=device), start))
        tokens = verify(logits, draft, params, seen=_seen(history, penalize, device, draft), generator=generator)
        accepted, pending = tokens[:-1], tokens[-1]
        if draft:  # a draft nothing of which is accepted cost a wider forward for nothing: back off
            misses = 0 if accepted else misses + 1
            pause = (1 << min(misses, 5)) - 1 if misses else 0
        for t in accepted:
            if t in end_ids:
                return
            produced.append(t)
            stopped = stop is not None and stop(0, produced)
            yield [t]
            if stopped or len(produced) >= params.max_new_tokens:
                return
        drafter.extend(accepted)
        history.extend(accepted)


def _seen(
    history: list[int], penalize: bool, device: torch.device, draft: Sequence[int] = ()
) -> Callable[[int], torch.Tensor | None]:
    """seen(i) for verify: the context before row i's prediction (history, then the first i draft tokens)."""
    if not penalize:
        return lambda i: None
    return lambda i: torch.tensor([*history, *draft[:i]], dtype=torch.long, device=device)
