"""Chat formats (util.templates): Llama 3 and Llama 2 conversations tokenize exactly as transformers'
apply_chat_template does with those families' chat templates; the format is chosen from the tokenizer; the data
pipeline puts only the answers (and their end token) in the loss; Chat prompts alike and stops on the end ids."""

import json

import pytest
import torch

from model.args import ModelArgs
from tests.util import tokenizer_files
from util.build import build_model
from util.data import IGNORE_INDEX, DataSource, InstructionDataset
from util.generate import Chat, SamplingParams, generate
from util.templates import FORMATS, chat_format_for
from util.tokenizer import Tokenizer, copy_tokenizer

SYSTEM = "  You answer briefly.\n"
TURNS = [("Hello!  ", " Hi. How can I help?"), ("What is 2+2?\nThink.", "4 😀\n\n"), ("And 3+3?", None)]
MESSAGES = [{"role": "system", "content": SYSTEM}] + [
    m for q, a in TURNS for m in [{"role": "user", "content": q}] + ([{"role": "assistant", "content": a}] if a else [])
]
LLAMA3_TEXT = (  # Meta's documented Llama 3 prompt, written out by hand
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou answer briefly.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHi. How can I help?<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?\nThink.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4 😀<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
LLAMA2_TEXT = (  # Meta's Llama 2 chat_completion, written out (it strips the question with the system prompt in it)
    "<s>[INST] <<SYS>>\n  You answer briefly.\n\n<</SYS>>\n\nHello! [/INST] Hi. How can I help? </s>"
    "<s>[INST] What is 2+2?\nThink. [/INST] 4 😀 </s><s>[INST] And 3+3? [/INST]"
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_tokenizers")
    json_dir = tokenizer_files.llama3_json(root / "llama3_json")
    return {
        "llama3_json": json_dir,
        "llama3_tiktoken": tokenizer_files.llama3_tiktoken(root / "llama3_tiktoken", json_dir),
        "llama3_bare": tokenizer_files.llama3_tiktoken(root / "llama3_bare", json_dir, config=False),
        "llama2": tokenizer_files.llama2_sentencepiece(root / "llama2"),
        "plain": tokenizer_files.llama2_sentencepiece(root / "plain", config=False),
    }


def _reference(folder, messages, **kw):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(folder)
    return ref, list(ref.apply_chat_template(messages, tokenize=True, **kw)["input_ids"])


@pytest.mark.parametrize(
    "kind, name, text",
    [
        ("llama3_json", "llama3", LLAMA3_TEXT),
        ("llama3_tiktoken", "llama3", LLAMA3_TEXT),
        ("llama2", "llama2", LLAMA2_TEXT),
    ],
)
def test_conversation_ids_equal_transformers_apply_chat_template(files, kind, name, text):
    tok = Tokenizer(files[kind])
    fmt = chat_format_for(tok)
    assert fmt.name == name
    ids, _ = fmt.encode(fmt.chat(TURNS, system=SYSTEM), tok)
    ref, expected = _reference(files[kind], MESSAGES, add_generation_prompt=True)
    assert ids == expected
    assert ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == text  # documented format
    answered = TURNS[:2]  # a finished conversation (training data) ends with the last answer's end token
    ids, _ = fmt.encode(fmt.chat(answered, system=SYSTEM), tok)
    assert ids == _reference(files[kind], MESSAGES[:5])[1]


def test_the_format_is_chosen_from_the_tokenizer(files, tmp_path):
    assert chat_format_for(Tokenizer(files["llama3_bare"])).name == "llama3"  # no config: Llama 3's header tokens
    assert chat_format_for(Tokenizer(files["plain"])).name == "lazyllama"  # sentencepiece, no template
    assert chat_format_for(Tokenizer(files["plain"]), "llama2").name == "llama2"  # asked for
    with pytest.raises(ValueError, match=r"llama3 chat format needs the special token\(s\) <\|start_header_id\|>"):
        chat_format_for(Tokenizer(files["plain"]), "llama3")
    with pytest.raises(ValueError, match="unknown chat format 'chatml'"):
        chat_format_for(Tokenizer(files["plain"]), "chatml")
    other = tmp_path / "chatml"
    other.mkdir()
    copy_tokenizer(files["plain"], other)
    (other / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}<|im_start|>"}))
    with pytest.raises(ValueError, match=r"chatml \(tokenizer_config.json\) is neither Llama 2's.*--chat_format"):
        chat_format_for(Tokenizer(other))
    assert chat_format_for(Tokenizer(other), "llama2").name == "llama2"


def _conversation_data(tmp_path):
    records = [
        {
            "conversations": [
                {"from": "human" if i % 2 == 0 else "gpt", "value": v}
                for i, v in enumerate(["Hello!", "Hi. How can I help?", "What is 2+2?", "4 😀"])
            ]
        }
    ]
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(records))
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"}]))
    return DataSource(path, "conversation"), DataSource(alpaca, "alpaca")


@pytest.mark.parametrize("kind", ["llama3_json", "llama3_tiktoken", "llama2"])
def test_training_data_puts_only_the_answers_and_their_end_tokens_in_the_loss(files, tmp_path, kind):
    conv, alpaca = _conversation_data(tmp_path)
    ds = InstructionDataset([conv, alpaca], files[kind], max_words=512)
    tok = ds.tokenizer
    end = tok.token_id("<|eot_id|>") if kind.startswith("llama3") else tok.eos_id
    tokens, labels = (t.tolist() for t in ds[0])
    messages = [
        {"role": r, "content": c}
        for r, c in zip(["user", "assistant"] * 2, ["Hello!", "Hi. How can I help?", "What is 2+2?", "4 😀"])
    ]
    assert tokens == _reference(files[kind], messages)[1]  # the whole conversation as transformers renders it
    answers = [t for t, lab in zip(tokens, labels) if lab != IGNORE_INDEX]
    assert [t for t, lab in zip(tokens, labels) if lab != IGNORE_INDEX] == [
        lab for lab in labels if lab != IGNORE_INDEX
    ]
    assert answers.count(end) == 2 and answers[-1] == end  # each answer's end token is learned
    assert tok.decode(answers).replace(" ", "") == "Hi.HowcanIhelp?4😀"
    tokens, labels = (t.tolist() for t in ds[1])  # an alpaca record: one turn, instruction and input as the question
    user = [{"role": "user", "content": "Add the numbers.\n\n2 and 2"}, {"role": "assistant", "content": "4"}]
    assert tokens == _reference(files[kind], user)[1]
    assert tok.decode([lab for lab in labels if lab != IGNORE_INDEX]).strip() == "4"


def test_chat_prompts_in_the_format_and_stops_on_its_end_ids(files):
    tok = Tokenizer(files["llama3_json"])
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, max_seq_len=256)
    model, _ = build_model(args, None, dtype=torch.float32)
    chat = Chat(model.eval(), tok)
    assert chat.format is FORMATS["llama3"] and chat.stop == ()
    assert set(chat.end_ids) == {tok.eos_id, tok.token_id("<|eot_id|>")}
    chat.turns = [(q, a.strip()) for q, a in TURNS[:2]]
    ids, _, _ = chat.prompt_ids(TURNS[2][0], 8)
    assert ids == _reference(files["llama3_json"], MESSAGES[1:], add_generation_prompt=True)[1]
    # decoding ends at any of the end ids (not yielded)
    free = generate(model, [ids], SamplingParams(max_new_tokens=6))[0]
    assert generate(model, [ids], SamplingParams(max_new_tokens=6), eos_id={free[2], -5})[0] == free[:2]
    reply = chat.send("And 3+3?", SamplingParams(max_new_tokens=4))  # streams through stream_text with end ids
    answer = "".join(reply)
    assert chat.turns[-1] == ("And 3+3?", answer.strip()) and len(chat.turns) == 3
    assert Chat(model, Tokenizer(files["plain"])).stop == ("### Human:", "### Assistant:")
    assert Chat(model, Tokenizer(files["llama2"])).end_ids == (Tokenizer(files["llama2"]).eos_id,)
