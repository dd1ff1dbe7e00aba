"""Tokenizer directories for the tests, made offline in seconds by the real libraries:

- llama3_json: a byte-level BPE trained by `tokenizers` with Llama 3's split pattern, its 256 special tokens after
  the vocabulary, and a post-processor adding <|begin_of_text|> (how Llama 3's Hugging Face tokenizer.json is built);
- llama3_tiktoken: the same ranks as Meta ships Llama 3 (tokenizer.model, "base64-token rank" lines);
- llama2_sentencepiece: a sentencepiece BPE with LLaMA's normalization (text kept as is, byte fallback).

Each may get a tokenizer_config.json with a chat template written here after the model family's documented format
(Llama 3: header tokens, two newlines, stripped content, <|eot_id|>; Llama 2: [INST] ... [/INST] per turn, bos/eos
around each answered turn, a system prompt in <<SYS>> markers inside the first question).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

TEXTS = [
    "Hello world! It's a test, isn't it? We'll see: 12345 numbers, 3.14159 and 2024-01-01.\nNew line\n\n  indented",
    "ünïcödé façade naïve café, 中文字符 and 日本語 text; emoji 😀 and 🎉.",
    "The quick brown fox jumps over the lazy dog.\tTabs\r\nand CRLF lines.",
    "def f(x):\n    return x * 2  # code with    runs of spaces",
    "[INST] What is the capital of France? [/INST] Paris is the capital of France.",
]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = none %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system %}"
    "{% set question = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set question = message['content'] %}{% endif %}"
    "{{ bos_token + '[INST] ' + question | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def _write_config(folder: Path, **config) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": False, **config}))


def llama3_json(folder: Path, *, config: bool = True, vocab_size: int = 420) -> Path:
    from tokenizers import Regex, decoders, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import BPE

    from util.tokenizer.tiktoken_model import LLAMA3_PATTERN, llama3_special_tokens

    folder.mkdir(parents=True, exist_ok=True)
    tk = RustTokenizer(BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(TEXTS * 20, trainer)
    specials = llama3_special_tokens(tk.get_vocab_size())
    tk.add_special_tokens(list(specials))  # numbered after the vocabulary, as in Llama 3 (128000...)
    bos = specials["<|begin_of_text|>"]
    tk.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    tk.save(str(folder / "tokenizer.json"))
    if config:
        _write_config(
            folder,
            tokenizer_class="PreTrainedTokenizerFast",
            bos_token="<|begin_of_text|>",
            eos_token="<|end_of_text|>",
            chat_template=LLAMA3_TEMPLATE,
        )
    return folder


def llama3_tiktoken(folder: Path, json_folder: Path, *, config: bool = True) -> Path:
    """Meta's tokenizer.model layout of the byte-level BPE in json_folder: each token's bytes, base64, and its id
    as the rank (merged tokens come after their parts, so tiktoken builds them)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from util.tokenizer.tiktoken_model import llama3_special_tokens

    folder.mkdir(parents=True, exist_ok=True)
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab = json.loads((json_folder / "tokenizer.json").read_text())["model"]["vocab"]
    lines = [
        f"{base64.b64encode(bytes(to_byte[c] for c in token)).decode()} {rank}"
        for token, rank in sorted(vocab.items(), key=lambda kv: kv[1])
    ]
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n")
    if config:
        added = {
            str(i): {
                "content": t,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for t, i in llama3_special_tokens(len(vocab)).items()
        }
        _write_config(
            folder,
            tokenizer_class="PreTrainedTokenizerFast",
            bos_token="<|begin_of_text|>",
            eos_token="<|end_of_text|>",
            chat_template=LLAMA3_TEMPLATE,
            added_tokens_decoder=added,
        )
    return folder


def llama2_sentencepiece(folder: Path, *, config: bool = True) -> Path:
    from util.tokenizer import train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(TEXTS * 20, folder / "tokenizer.model", vocab_size=420, llama_normalization=True)
    if config:
        _write_config(
            folder,
            tokenizer_class="LlamaTokenizer",
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            add_bos_token=True,
            legacy=True,
            chat_template=LLAMA2_TEMPLATE,
        )
    return folder
