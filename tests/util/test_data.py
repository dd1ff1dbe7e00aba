"""Instruction data: prompts and loss masks, validation of bad input, ratios, the resumable sampler."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch

from util.data import (
    IGNORE_INDEX,
    DataError,
    DataSource,
    InstructionDataset,
    ResumableDistributedSampler,
    collate,
    encode_segments,
    load_data_config,
    make_loader,
    read_source,
)
from util.templates import alpaca_prompt, chat_prompt
from util.tokenizer import Tokenizer, train_tokenizer

ALPACA = [
    {"instruction": "What is the opposite of hot?", "input": "", "output": "The opposite of hot is cold."},
    {"instruction": "Write the word in capital letters.", "input": "river", "output": "RIVER"},
    {"instruction": "Say hello.", "output": "Hello! How can I help you today?"},  # no input field: fine
]
CONVERSATION = [
    {
        "conversations": [
            {"from": "human", "value": "Hi!"},
            {"from": "gpt", "value": "Hello! How can I help you today?"},
            {"from": "human", "value": "What sound does a cow make?"},
            {"from": "gpt", "value": "A cow says moo."},
        ]
    },
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    texts = [alpaca_prompt(r["instruction"], r.get("input")) + r["output"] for r in ALPACA] * 20
    texts += [chat_prompt([("Hi!", None)]) + "Hello! A cow says moo."] * 20
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=320)


def _write(path, records):
    path.write_text(json.dumps(records))
    return path


def _decode_labels(tok, labels):
    return tok.decode([t for t in labels if t != IGNORE_INDEX])


def test_alpaca_only_the_response_is_in_the_loss(tmp_path, tok):
    (segments,) = read_source(DataSource(_write(tmp_path / "a.json", ALPACA[1:2]), "alpaca"))
    tokens, labels = encode_segments(segments, tok, max_words=512)
    prompt = tok.encode(alpaca_prompt("Write the word in capital letters.", "river"))
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id and labels[-1] == tok.eos_id
    assert tokens[1 : 1 + len(prompt)] == prompt  # the template from util.templates, input included
    assert labels[: 1 + len(prompt)] == [IGNORE_INDEX] * (1 + len(prompt))
    assert labels[1 + len(prompt) :] == tokens[1 + len(prompt) :]
    assert _decode_labels(tok, labels) == "RIVER"


def test_conversation_only_the_assistant_turns_are_in_the_loss(tmp_path, tok):
    (segments,) = read_source(DataSource(_write(tmp_path / "c.json", CONVERSATION), "conversation"))
    tokens, labels = encode_segments(segments, tok, max_words=512)
    answer_ids = [t for t, lab in zip(tokens, labels) if lab != IGNORE_INDEX]
    assert answer_ids == tok.encode("Hello! How can I help you today?\n") + tok.encode("A cow says moo.\n") + [
        tok.eos_id
    ]
    # the chat demo's template (this small tokenizer's normalizer turns newlines into spaces)
    assert tok.decode(tokens).startswith(" ".join(chat_prompt([("Hi!", None)]).split()))


def test_max_words_truncates(tmp_path, tok):
    (segments,) = read_source(DataSource(_write(tmp_path / "a.json", ALPACA[:1]), "alpaca"))
    full, full_labels = encode_segments(segments, tok, max_words=10_000)
    tokens, labels = encode_segments(segments, tok, max_words=len(full) - 3)
    # the end is cut (eos and the response's last tokens), in tokens and labels alike; the rest is unchanged
    assert tokens == full[:-3] and labels == full_labels[:-3]
    assert full[-1] == full_labels[-1] == tok.eos_id and tok.eos_id not in tokens
    response = [i for i, lab in enumerate(full_labels) if lab != IGNORE_INDEX]
    assert len(response) > 4 and labels[response[0] :] == tokens[response[0] :]  # response tokens still learnt
    assert set(labels[: response[0]]) == {IGNORE_INDEX}
    # cut inside the prompt: nothing left to learn
    tokens, labels = encode_segments(segments, tok, max_words=response[0])
    assert tokens == full[: response[0]] and set(labels) == {IGNORE_INDEX}


def test_bad_records_are_reported_with_file_and_index_and_skipped(tmp_path, tok, caplog):
    records = [
        ALPACA[0],
        {"instruction": "No output here"},
        {"instruction": 7, "output": "x"},
        {"instruction": "Empty answer", "output": "   "},
        "not an object",
        ALPACA[1],
    ]
    path = _write(tmp_path / "mixed.json", records)
    with caplog.at_level(logging.WARNING, logger="util.data"):
        good = read_source(DataSource(path, "alpaca"))
    assert len(good) == 2
    message = caplog.text
    assert str(path) in message and "skipped 4 of 6" in message
    for expected in (
        "[1]: missing field 'output'",
        "[2]: field 'instruction' must be a string, got int",
        "[3]: field 'output' is empty",
        "[4]: expected an object",
    ):
        assert expected in message
    with pytest.raises(DataError, match=r"mixed\.json: 4 of 6 alpaca record\(s\) are bad: \[1\]: missing"):
        read_source(DataSource(path, "alpaca"), strict=True)


def test_bad_conversations(tmp_path):
    records = [
        {"conversations": [{"from": "gpt", "value": "I speak first"}, {"from": "human", "value": "no"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "beep"}]},
        {"conversations": [{"from": "human", "value": "unanswered"}]},
        {"dialog": []},
        CONVERSATION[0],
        {"conversations": CONVERSATION[0]["conversations"] + [{"from": "human", "value": "trailing"}]},  # fine
    ]
    path = _write(tmp_path / "conv.json", records)
    with pytest.raises(DataError) as e:
        read_source(DataSource(path, "conversation"), strict=True)
    msg = str(e.value)
    assert "4 of 6" in msg and "[0]: conversations[0]: expected a human turn" in msg
    assert '[1]: conversations[1]: "from" must be' in msg and "[2]: no answered human turn" in msg
    assert len(read_source(DataSource(path, "conversation"))) == 2


def test_unreadable_files_and_configs_name_the_path(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": ')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON \(.* line 2 column"):
        read_source(DataSource(broken, "alpaca"))
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON list of records, got a dict"):
        read_source(DataSource(_write(tmp_path / "obj.json", {"instruction": "a"}), "alpaca"))
    with pytest.raises(DataError, match=r"none\.json: no usable alpaca records"):
        read_source(DataSource(_write(tmp_path / "none.json", CONVERSATION), "alpaca"))
    jsonl = tmp_path / "lines.jsonl"
    jsonl.write_text(json.dumps(ALPACA[0]) + "\n{oops\n" + json.dumps(ALPACA[1]) + "\n")
    assert len(read_source(DataSource(jsonl, "alpaca"))) == 2
    with pytest.raises(DataError, match=r"lines\.jsonl: 1 of 3 .* line 2: not valid JSON"):
        read_source(DataSource(jsonl, "alpaca"), strict=True)

    config = tmp_path / "data.yaml"
    config.write_text("sources:\n  - {path: missing.json, type: alpaca, ratio: 1.0}\n")
    with pytest.raises(DataError, match=r"data\.yaml: sources\[0\]: data file 'missing\.json' not found") as e:
        load_data_config(config)
    assert str(tmp_path / "missing.json") in str(e.value)
    with pytest.raises(DataError, match=r"data config not found: .*nope\.yaml"):
        load_data_config(tmp_path / "nope.yaml")
    _write(tmp_path / "a.json", ALPACA)
    for body, expected in [
        ("sources:\n  - {path: a.json, type: sharegpt}\n", r"type 'sharegpt' is not one of"),
        ("sources:\n  - {path: a.json, type: alpaca, ratio: 0}\n", r"ratio must be a number > 0"),
        ("sources:\n  - {path: a.json, type: alpaca, weight: 2}\n", r"unknown key\(s\) \['weight'\]"),
        ("- a.json\n", r"expected a mapping with a non-empty 'sources' list"),
        ("sources: [\n", r"not valid YAML"),
    ]:
        config.write_text(body)
        with pytest.raises(DataError, match=expected):
            load_data_config(config)


def test_config_paths_and_ratios(tmp_path, tok):
    data = tmp_path / "d"
    data.mkdir()
    _write(data / "a.json", [dict(ALPACA[0], output=f"Answer {i}.") for i in range(10)])
    _write(data / "c.json", CONVERSATION * 4)
    config = data / "mix.yaml"
    config.write_text(
        "sources:\n  - {path: a.json, type: alpaca, ratio: 0.5}\n  - {path: c.json, type: conversation, ratio: 2}\n"
    )
    sources = load_data_config(config)
    assert [s.path for s in sources] == [data / "a.json", data / "c.json"]  # relative to the YAML's directory
    ds = InstructionDataset(sources, tok.path, max_words=256, seed=1)
    assert len(ds) == 5 + 8 and list(ds.counts.values()) == [5, 8]
    again = InstructionDataset(sources, tok.path, max_words=256, seed=1)
    assert again.items == ds.items  # the subset is seeded: the same on every rank
    tokens, labels = ds[0]
    assert tokens.dtype == torch.long and tokens.shape == labels.shape
    restored = pickle.loads(pickle.dumps(ds))  # DataLoader workers get it pickled (spawn) and reload the tokenizer
    assert torch.equal(restored[3][0], ds[3][0])


def test_collate_pads_right_with_ignored_labels():
    batch = [(torch.tensor([1, 5, 6]), torch.tensor([-100, 5, 6])), (torch.tensor([1, 7]), torch.tensor([-100, 7]))]
    tokens, labels = collate(batch)
    assert tokens.tolist() == [[1, 5, 6], [1, 7, 0]] and labels.tolist() == [[-100, 5, 6], [-100, 7, -100]]


def test_sampler_shards_by_data_parallel_rank_and_reshuffles_per_epoch():
    samplers = [ResumableDistributedSampler(10, rank=r, world_size=3, seed=4) for r in range(3)]
    shards = [list(s) for s in samplers]
    assert all(len(s) == 4 for s in shards)  # 10 padded to 12 by wrapping
    dealt = sorted(i for s in shards for i in s)
    assert set(dealt) == set(range(10)) and len(dealt) == 12  # every sample, two of them twice
    assert shards[0] == list(ResumableDistributedSampler(10, rank=0, world_size=3, seed=4))  # deterministic
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != shards[0]


def test_sampler_resumes_mid_epoch():
    full = ResumableDistributedSampler(17, rank=1, world_size=2, seed=9)
    full.set_epoch(2)
    expected = list(full)
    part = ResumableDistributedSampler(17, rank=1, world_size=2, seed=9)
    part.set_epoch(2)
    part.advance(3)
    state = part.state_dict()
    assert state == {"epoch": 2, "position": 3, "num_samples": 17, "world_size": 2, "seed": 9}
    resumed = ResumableDistributedSampler(17, rank=1, world_size=2, seed=9)
    resumed.load_state_dict(state)
    assert list(resumed) == expected[3:] and len(resumed) == len(expected) - 3
    with pytest.raises(ValueError, match="world_size=2, this run 4"):
        ResumableDistributedSampler(17, rank=0, world_size=4, seed=9).load_state_dict(state)


def test_loader_batches_do_not_depend_on_workers_and_skip_a_partial_batch(tmp_path, tok):
    path = _write(tmp_path / "a.json", [dict(ALPACA[0], output=f"Answer {i}.") for i in range(7)])
    ds = InstructionDataset([DataSource(path, "alpaca")], tok.path, max_words=128)
    rng_before = torch.get_rng_state()
    batches = {}
    for workers in (0, 1):
        sampler = ResumableDistributedSampler(len(ds), seed=2)
        batches[workers] = [t for t, _ in make_loader(ds, sampler, batch_size=3, num_workers=workers)]
    assert len(batches[0]) == 2  # 7 examples, whole batches of 3
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[1]))
    assert torch.equal(torch.get_rng_state(), rng_before)  # iterating does not draw from the global RNG
