"""Chat formats shared by training (only response tokens are in the loss), demo.py's chat and its web page.

| format    | turn                                                                       | the answer ends at      |
|-----------|----------------------------------------------------------------------------|-------------------------|
| lazyllama | "### Human: {q}\\n### Assistant: {a}\\n" after a one-line header; alpaca    | eos; "### Human:" text  |
|           | records keep the Alpaca prompt                                             |                         |
| llama2    | <s>[INST] {q} [/INST] {a} </s>  (a system prompt: <<SYS>>...<</SYS>> in q)  | eos                     |
| llama3    | <|start_header_id|>{role}<|end_header_id|>\\n\\n{text}<|eot_id|>             | <|eot_id|> (and eos)    |

A format renders a conversation as segments: (text or Special token, is_response). tokenize_segments encodes the
text between two special tokens as one string (so the ids are those of the whole rendered conversation, as
transformers' apply_chat_template gives them) and places special tokens by id (never read out of user text).
chat_format_for picks the format from the tokenizer: its chat template (tokenizer_config.json) when it has one,
Llama 3's header tokens, otherwise this project's own template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
ALPACA_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
CHAT_HEADER = "A chat between a curious human and an artificial intelligence assistant.\n\n"
# Where a model in this project's format starts the next turn by itself: the answer ends before these. (No
# newline in them: tokenizers with sentencepiece's default normalization turn the template's newlines into spaces.)
CHAT_STOP = ("### Human:", "### Assistant:")


@dataclass(frozen=True)
class Special:
    """A special token in a rendered conversation: "bos" / "eos" (the tokenizer's own) or a token's text."""

    name: str


BOS, EOS = Special("bos"), Special("eos")
Segments = list[tuple["str | Special", bool]]  # (text or special token, is_response)
Turns = Sequence[tuple[str, "str | None"]]  # (human, assistant); only the last answer may be None


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The text before the response of an Alpaca-style record."""
    if input:
        return f"{ALPACA_HEADER_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"{ALPACA_HEADER}### Instruction:\n{instruction}\n\n### Response:\n"


def _check_turns(turns: Turns) -> None:
    if not turns:
        raise ValueError("a conversation needs at least one human turn")
    if any(a is None for _, a in turns[:-1]):
        raise ValueError("only the last turn may be unanswered")


class ChatFormat:
    name = ""
    stop_strings: tuple[str, ...] = ()  # text that ends an answer (formats without an end token)
    end_tokens: tuple[str, ...] = ()  # special tokens besides eos that end an answer
    required: tuple[str, ...] = ()  # special tokens the tokenizer must have
    # True: the text between two special tokens is encoded as one string (Meta's and transformers' way for Llama
    # 2 and 3: "[/INST] answer" tokenizes as in the whole conversation). False: each run of prompt text and each
    # answer is encoded by itself (LLaMA2-Accessory's way, which this project's template was trained with: a
    # normalizing tokenizer drops the prompt's trailing space, and the answer starts a word).
    joined = True

    def chat(self, turns: Turns, system: str | None = None) -> Segments:
        """The conversation; an unanswered last turn ends with the prompt for the answer."""
        raise NotImplementedError

    def instruction(self, instruction: str, input: str | None, output: str | None) -> Segments:
        """An Alpaca record (output None: the prompt for it); by default a one-turn conversation."""
        return self.chat([(f"{instruction}\n\n{input}" if input else instruction, output)])

    def encode(self, segments: Segments, tokenizer) -> tuple[list[int], list[bool]]:
        """(ids, is_response per id) of rendered segments."""
        return tokenize_segments(segments, tokenizer, joined=self.joined)

    def end_ids(self, tokenizer) -> tuple[int, ...]:
        """The ids that end an answer: the tokenizer's (eos, generation_config.json's) and the format's."""
        found = [tokenizer.token_id(t) for t in self.end_tokens]
        return tuple(dict.fromkeys([*tokenizer.end_ids, *(i for i in found if i is not None)]))

    def check(self, tokenizer) -> None:
        missing = [t for t in self.required if tokenizer.token_id(t) is None]
        if missing:
            raise ValueError(
                f"the {self.name} chat format needs the special token(s) {', '.join(missing)}, which {tokenizer.path} "
                "does not have: use the tokenizer of that model family or another --chat_format"
            )

    def __repr__(self) -> str:
        return f"<chat format {self.name}>"


class LazyLlamaFormat(ChatFormat):
    """This project's template (LLaMA2-Accessory's): plain text, one bos and one eos per conversation."""

    name = "lazyllama"
    stop_strings = CHAT_STOP
    joined = False

    def chat(self, turns: Turns, system: str | None = None) -> Segments:
        _check_turns(turns)
        segments: Segments = [(BOS, False), (f"{system.strip()}\n\n" if system else CHAT_HEADER, False)]
        for human, assistant in turns:
            segments.append((f"### Human: {human}\n### Assistant: ", False))
            if assistant is not None:
                segments.append((f"{assistant}\n", True))
        if turns[-1][1] is not None:
            segments.append((EOS, True))
        return segments

    def instruction(self, instruction: str, input: str | None, output: str | None) -> Segments:
        segments: Segments = [(BOS, False), (alpaca_prompt(instruction, input), False)]
        return segments + ([(output, True), (EOS, True)] if output is not None else [])


class Llama2Format(ChatFormat):
    """Meta's Llama 2 chat: each answered turn is bos "[INST] q [/INST] a " eos, contents stripped; a system
    prompt goes into the first question inside <<SYS>> markers."""

    name = "llama2"

    def chat(self, turns: Turns, system: str | None = None) -> Segments:
        _check_turns(turns)
        segments: Segments = []
        for i, (human, assistant) in enumerate(turns):
            question = f"<<SYS>>\n{system}\n<</SYS>>\n\n{human}" if system and i == 0 else human
            segments += [(BOS, False), (f"[INST] {question.strip()} [/INST]", False)]
            if assistant is not None:
                segments += [(f" {assistant.strip()} ", True), (EOS, True)]
        return segments


class Llama3Format(ChatFormat):
    """Meta's Llama 3 chat: a header per message (role between start/end header tokens, then two newlines),
    the stripped content, <|eot_id|>; the prompt for an answer is the assistant's header."""

    name = "llama3"
    end_tokens = ("<|eot_id|>",)
    required = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    def chat(self, turns: Turns, system: str | None = None) -> Segments:
        _check_turns(turns)
        segments: Segments = [(BOS, False)]
        if system:
            segments += self._message("system", system)
        for human, assistant in turns:
            segments += self._message("user", human)
            segments += self._header("assistant")
            if assistant is not None:
                segments += [(assistant.strip(), True), (Special("<|eot_id|>"), True)]
        return segments

    def _header(self, role: str) -> Segments:
        return [
            (Special("<|start_header_id|>"), False),
            (role, False),
            (Special("<|end_header_id|>"), False),
            ("\n\n", False),
        ]

    def _message(self, role: str, content: str) -> Segments:
        return [*self._header(role), (content.strip(), False), (Special("<|eot_id|>"), False)]


FORMATS: dict[str, ChatFormat] = {f.name: f for f in (LazyLlamaFormat(), Llama2Format(), Llama3Format())}
DEFAULT_FORMAT = FORMATS["lazyllama"]
CHAT_FORMATS = ("auto", *FORMATS)  # the choices of --chat_format


def chat_format_for(tokenizer, name: str | ChatFormat = "auto") -> ChatFormat:
    """The chat format to use with this tokenizer. auto: the format of its chat template (tokenizer_config.json);
    without one, llama3 if it has Llama 3's header tokens, else lazyllama. A chat template of another format is an
    error (this project would train or prompt the model in a format it was not made for)."""
    if isinstance(name, ChatFormat):
        fmt = name
    elif name != "auto":
        if name not in FORMATS:
            raise ValueError(f"unknown chat format {name!r}: choose one of {', '.join(CHAT_FORMATS)}")
        fmt = FORMATS[name]
    elif tokenizer.chat_template is not None:
        template = tokenizer.chat_template
        if "<|start_header_id|>" in template and "<|eot_id|>" in template:
            fmt = FORMATS["llama3"]
        elif "[INST]" in template:
            fmt = FORMATS["llama2"]
        elif "### Human:" in template:
            fmt = FORMATS["lazyllama"]
        else:
            raise ValueError(
                f"the chat template of {tokenizer.path.parent} (tokenizer_config.json) is neither Llama 2's "
                "([INST]) nor Llama 3's (header tokens and <|eot_id|>), the formats this project implements: pass "
                f"--chat_format {{{','.join(FORMATS)}}} to choose one (or --raw for no template)"
            )
    elif all(tokenizer.token_id(t) is not None for t in FORMATS["llama3"].required):
        fmt = FORMATS["llama3"]
    else:
        fmt = DEFAULT_FORMAT
    fmt.check(tokenizer)
    return fmt


def tokenize_segments(segments: Segments, tokenizer, *, joined: bool = True) -> tuple[list[int], list[bool]]:
    """(ids, is_response per id). joined: the text between two special tokens is encoded as one string (a token
    belongs to the segment holding its last byte); otherwise each run of segments with the same is_response is
    encoded by itself."""
    ids: list[int] = []
    response: list[bool] = []
    texts: list[tuple[str, bool]] = []

    def flush() -> None:
        if not joined:  # runs of prompt text and of answer text, each encoded alone
            runs: list[tuple[str, bool]] = []
            for text, is_response in texts:
                if runs and runs[-1][1] == is_response:
                    runs[-1] = (runs[-1][0] + text, is_response)
                else:
                    runs.append((text, is_response))
            texts[:] = runs
            pieces = [tokenizer.encode(t) for t, _ in texts]
        else:
            pieces = tokenizer.encode_pieces([t for t, _ in texts]) if texts else []
        for piece, (_, is_response) in zip(pieces, texts):
            ids.extend(piece)
            response.extend([is_response] * len(piece))
        texts.clear()

    for item, is_response in segments:
        if isinstance(item, str):
            if item:
                texts.append((item, is_response))
            continue
        flush()
        if item.name in ("bos", "eos"):
            token = tokenizer.bos_id if item.name == "bos" else tokenizer.eos_id
            if token is None:
                continue  # a tokenizer without bos (or eos): the format goes without it
        else:
            token = tokenizer.token_id(item.name)
            if token is None:
                raise ValueError(f"{tokenizer.path} has no special token {item.name}")
        ids.append(token)
        response.append(is_response)
    flush()
    return ids, response


# --- this project's format as plain text (kept for callers that build prompts as strings) ---


def chat_segments(turns: Turns) -> Segments:
    """A conversation in this project's format, without bos/eos: (text, is_response) segments."""
    return [(t, r) for t, r in DEFAULT_FORMAT.chat(turns) if isinstance(t, str)]


def chat_prompt(turns: Turns) -> str:
    """The prompt text for the next answer of a conversation whose last turn has no answer yet."""
    return "".join(text for text, _ in chat_segments(turns))
