"""Decoding: KV cache == full recompute (fp32, 4-bit, 8-bit, batched, model parallel 2), sampling filters on
crafted logits, seeded reproducibility, streaming text with stop strings, and fitting prompts to the context."""

import pytest
import torch

from tests.helpers import greedy_generate, write_tiny_checkpoint
from tests.multiprocess import run_multiprocess
from util.build import build_model
from util.dist import init_distributed
from util.generate import (
    Chat,
    SamplingParams,
    TextStream,
    apply_repetition_penalty,
    decode,
    filter_top_k,
    filter_top_p,
    fit_prompt,
    generate,
    next_tokens,
    stream_text,
)
from util.tokenizer import train_tokenizer

PROMPTS = [[1, 17, 42, 7, 99, 3, 250], [1, 5], [1, 300, 301, 302, 8]]  # different lengths, shortest in the middle
NEW = 9


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen_ckpt")
    write_tiny_checkpoint(path, seed=7)
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["Eat well, sleep enough, and exercise.", "### Human: hello\n### Assistant: hi there", "naïve café"] * 40
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=300)


def recompute_greedy(model, prompt, new):
    """The reference: the whole sequence through the no-cache forward at every step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("quant", [None, "4bit", "8bit"])
def test_greedy_with_cache_equals_full_recompute_for_a_batch_of_different_lengths(ckpt, quant):
    model, _ = build_model(None, [ckpt], quant=quant, dtype=torch.float32)
    model.eval()
    expected = [recompute_greedy(model, p, NEW) for p in PROMPTS]
    assert generate(model, PROMPTS, SamplingParams(max_new_tokens=NEW)) == expected
    assert greedy_generate(model, PROMPTS[0], NEW) == expected[0]
    # EOS ends a sequence without being returned; the others go on
    eos = expected[1][3]
    cut = generate(model, PROMPTS, SamplingParams(max_new_tokens=NEW), eos_id=eos)
    assert cut[1] == expected[1][: expected[1].index(eos)]
    for got, want in zip(cut, expected):
        assert got == (want[: want.index(eos)] if eos in want else want)


def _mp_worker(rank, ckpt):
    init_distributed(model_parallel_size=2)
    out = {}
    for quant in (None, "4bit"):
        model, _ = build_model(None, [ckpt], quant=quant, dtype=torch.float32)
        model.eval()
        out[quant] = generate(model, PROMPTS, SamplingParams(max_new_tokens=NEW))
        out[f"{quant}-recompute"] = [recompute_greedy(model, p, NEW) for p in PROMPTS]
    # each rank seeds its own generator differently: the tokens still agree (rank 0's choice is broadcast)
    sampled = SamplingParams(max_new_tokens=NEW, temperature=1.5, seed=100 + rank)
    out["sampled"] = generate(model, PROMPTS, sampled)
    return out


def test_model_parallel_2_decodes_the_same_on_every_rank(ckpt):
    ranks = run_multiprocess(_mp_worker, 2, ckpt)
    for quant in (None, "4bit"):
        for out in ranks:
            assert out[quant] == out[f"{quant}-recompute"], f"cache != recompute at model parallel 2 ({quant})"
        assert ranks[0][quant] == ranks[1][quant]
    single, _ = build_model(None, [ckpt], dtype=torch.float32)
    assert ranks[0][None] == generate(single.eval(), PROMPTS, SamplingParams(max_new_tokens=NEW))
    # (4-bit is not compared with model parallel 1: row-parallel shards have their own quantization blocks)
    assert ranks[0]["sampled"] == ranks[1]["sampled"]


def test_sampling_is_reproducible_with_a_seed(ckpt):
    model, _ = build_model(None, [ckpt], quant="4bit", dtype=torch.float32)
    params = SamplingParams(max_new_tokens=12, temperature=1.2, top_p=0.95, top_k=50, seed=5)
    first = generate(model.eval(), PROMPTS, params)
    assert generate(model, PROMPTS, params) == first
    assert generate(model, PROMPTS, params.replace(seed=6)) != first
    assert all(len(s) == 12 for s in first)


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])  # unsorted on purpose: the filters must map back
    logits = probs.log().expand(2, -1).clone()

    def kept(filtered):
        return set(torch.isfinite(filtered[0]).nonzero().flatten().tolist())

    assert kept(filter_top_k(logits, 2)) == {1, 3}
    assert kept(filter_top_k(logits, 0)) == kept(filter_top_k(logits, 9)) == {0, 1, 2, 3, 4}
    assert kept(filter_top_p(logits, 0.5)) == {1}  # 0.5 alone reaches 0.5
    assert kept(filter_top_p(logits, 0.6)) == {1, 3}
    assert kept(filter_top_p(logits, 0.81)) == {1, 3, 4}  # 0.5 + 0.2 + 0.15 = 0.85 reaches it
    assert kept(filter_top_p(logits, 0.86)) == {1, 3, 4, 2}
    assert kept(filter_top_p(logits, 0.01)) == {1}  # never empty
    assert kept(filter_top_k(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), 1)) == {1, 2}  # ties at the k-th are kept

    # sampling draws only kept tokens, in proportion to their renormalized probabilities
    g = torch.Generator().manual_seed(0)
    many = probs.log().expand(4000, -1)
    draws = next_tokens(many, SamplingParams(temperature=1.0, top_k=2), generator=g)
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).float().mean().item() - 0.5 / 0.7) < 0.03
    draws = next_tokens(many, SamplingParams(temperature=1.0, top_p=0.81), generator=g)
    assert set(draws.tolist()) == {1, 3, 4}
    # a low temperature sharpens towards the argmax, greedy is the argmax
    cold = next_tokens(many, SamplingParams(temperature=0.05), generator=g)
    assert (cold == 1).float().mean() > 0.99
    assert next_tokens(logits, SamplingParams()).tolist() == [1, 1]


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -1.0, 1.5, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 0]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 1.5, 0.5]]
    assert next_tokens(logits, SamplingParams(repetition_penalty=2.0), seen=torch.tensor([[0]])).item() == 2


def test_a_strong_repetition_penalty_stops_greedy_loops(ckpt):
    model, _ = build_model(None, [ckpt], dtype=torch.float32)
    prompt = [1, 9, 9, 9]
    plain = generate(model.eval(), [prompt], SamplingParams(max_new_tokens=24))[0]
    assert len(set(plain)) < len(plain), "the test needs a model that repeats itself without the penalty"
    penalized = generate(model, [prompt], SamplingParams(max_new_tokens=24, repetition_penalty=1e4))[0]
    assert len(set(penalized + prompt)) == len(penalized) + len(set(prompt))


def test_text_stream_holds_back_stop_strings_and_partial_characters(tokenizer):
    # (this tokenizer normalizes newlines to spaces, as sentencepiece's default rules do; LLaMA's keeps them)
    text = "naïve café, sleep enough. ### Human: more please"
    stream = TextStream(tokenizer, stop=["### Human:"])
    deltas = []
    for token in tokenizer.encode(text):
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    assert stream.stopped
    assert "".join(deltas) == "naïve café, sleep enough. "
    assert not any("\ufffd" in d or "#" in d for d in deltas)
    assert sum(1 for d in deltas if d) > 5  # it streams, not everything at the end

    stream = TextStream(tokenizer, stop=["### Human:"])
    text = "unseen bytes: ✓ ok ### Hum"  # ends in a prefix of the stop string: held back, flushed at the end
    deltas = [stream.push(t) for t in tokenizer.encode(text)]
    assert "".join(deltas) == "unseen bytes: ✓ ok " and not any("\ufffd" in d for d in deltas)
    assert stream.flush() == "### Hum" and not stream.stopped


def test_stream_text_yields_the_generated_text_piece_by_piece(ckpt, tokenizer):
    model, _ = build_model(None, [ckpt], quant="4bit", dtype=torch.float32)  # vocab 512 > tokenizer's 300
    prompt = tokenizer.encode("hello", bos=True)
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=3)
    ids = generate(model.eval(), [prompt], params, vocab_size=tokenizer.vocab_size)[0]
    assert max(ids) < tokenizer.vocab_size
    deltas = list(stream_text(model, tokenizer, prompt, params))
    assert len(deltas) > 1
    assert "".join(deltas) == tokenizer.decode(ids)


def test_bad_prompts_are_refused_clearly(ckpt):
    model, _ = build_model(None, [ckpt], dtype=torch.float32)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []])
    with pytest.raises(ValueError, match="max_seq_len=128.*fit_prompt"):
        generate(model, [[1] * 120], SamplingParams(max_new_tokens=9))
    with pytest.raises(ValueError, match="temperature=-1.*top_p=0"):
        SamplingParams(top_p=0, temperature=-1)


def test_fit_prompt_truncates_from_the_left():
    ids, new, notes = fit_prompt(list(range(100)), 64, 16)
    assert (ids, new) == (list(range(52, 100)), 16) and "truncated from the left" in notes[0]
    ids, new, notes = fit_prompt(list(range(10)), 64, 200)
    assert (ids, new) == (list(range(10)), 54) and "lowered" in notes[0]
    ids, new, notes = fit_prompt(list(range(40)), 64, 32)  # the answer's budget shrinks first...
    assert (ids, new) == (list(range(40)), 24) and len(notes) == 1
    ids, new, notes = fit_prompt(list(range(60)), 64, 32)  # ...to a quarter of the context, then the prompt goes
    assert (ids, new) == (list(range(12, 60)), 16) and "lowered" in notes[0] and "truncated" in notes[1]
    assert fit_prompt([1, 2], 64, 16) == ([1, 2], 16, [])


def test_chat_drops_the_oldest_turns_then_truncates(ckpt, tokenizer):
    model, _ = build_model(None, [ckpt], dtype=torch.float32)
    chat = Chat(model.eval(), tokenizer)
    with pytest.raises(ValueError, match="empty message"):
        chat.send("   ")
    reply = chat.send("hello", SamplingParams(max_new_tokens=6))
    answer = "".join(reply)
    assert chat.turns == [("hello", answer.strip())]
    chat.turns = [("sleep enough " * 6, "eat well " * 6)] * 3 + [("hi", "hello")]
    ids, new, notes = chat.prompt_ids("hello again", 16)
    assert len(ids) + new <= model.args.max_seq_len and "oldest 3 turn(s)" in notes[0]
    assert tokenizer.decode(ids).endswith("### Human: hi ### Assistant: hello ### Human: hello again ### Assistant:")
    ids, new, notes = chat.prompt_ids("exercise " * 200, 16)
    assert len(ids) == model.args.max_seq_len - 16 and any("truncated from the left" in n for n in notes)
    assert len(chat.turns) == 4  # prompt_ids only chooses; the history stays


def test_decode_yields_each_step_and_marks_finished_rows(ckpt):
    model, _ = build_model(None, [ckpt], dtype=torch.float32)
    steps = list(decode(model.eval(), PROMPTS, SamplingParams(max_new_tokens=3)))
    # the shortest prompt (2 tokens) generates from position 2; the 7-token one only from position 7
    assert [s[1] is not None for s in steps[:3]] == [True, True, True]
    assert steps[0][0] is None and steps[0][2] is None
    assert [sum(t is not None for t in col) for col in zip(*steps)] == [3, 3, 3]
