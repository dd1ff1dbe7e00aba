"""Prompt templates shared by training (only response tokens are in the loss) and chat."""

from __future__ import annotations

from collections.abc import Sequence

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
ALPACA_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
CHAT_HEADER = "A chat between a curious human and an artificial intelligence assistant.\n\n"


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The text before the response of an Alpaca-style record."""
    if input:
        return f"{ALPACA_HEADER_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"{ALPACA_HEADER}### Instruction:\n{instruction}\n\n### Response:\n"


def chat_segments(turns: Sequence[tuple[str, str | None]]) -> list[tuple[str, bool]]:
    """A multi-turn conversation as (text, is_response) segments: the human turns and the template are context,
    the assistant turns are what a model learns to produce. The last answer may be None (to be generated)."""
    segments: list[tuple[str, bool]] = [(CHAT_HEADER, False)]
    for i, (human, assistant) in enumerate(turns):
        segments.append((f"### Human: {human}\n### Assistant: ", False))
        if assistant is None:
            if i != len(turns) - 1:
                raise ValueError("only the last turn may be unanswered")
            break
        segments.append((f"{assistant}\n", True))
    return segments


def chat_prompt(turns: Sequence[tuple[str, str | None]]) -> str:
    """The prompt for the next answer of a conversation whose last turn has no answer yet."""
    return "".join(text for text, _ in chat_segments(turns))
