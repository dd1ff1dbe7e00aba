"""Shared material for the fine-tuning tests: a real sentencepiece tokenizer trained on the bundled data, a tiny
random base in Meta's format, and a small data config (a slice of the bundled data, so an epoch is a few steps)."""

from __future__ import annotations

import queue
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.helpers import params_of, random_state_dict, tiny_args
from util.checkpoint import write_meta_checkpoint
from util.data import load_data_config, source_texts
from util.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "data" / "quickstart.yaml"
TOKENS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(5))  # probe for logits


@dataclass(frozen=True)
class FinetuneEnv:
    root: Path
    tokenizer: Path
    base: Path
    data_config: Path

    def argv(self, output_dir: Path, *extra: str, lora: bool = True) -> list[str]:
        """main_finetune arguments for a run of a few steps (fp32 on CPU: exact and reproducible); LoRA r16 on the
        base unless lora=False (full fine-tuning)."""
        config = ["--llama_config", str(REPO / "configs" / "lora_r16.json")] if lora else []
        paths = ["--pretrained_path", str(self.base), "--tokenizer_path", str(self.tokenizer)]
        paths += ["--data_config", str(self.data_config), "--output_dir", str(output_dir)]
        fixed = "--precision fp32 --num_workers 0 --no_tensorboard --batch_size 2 --lr 1e-2 --max_words 96 --seed 3"
        return [*paths, *config, *fixed.split(), *extra]


def make_env(root: Path, *, ratio: float = 0.05) -> FinetuneEnv:
    """ratio 0.05: 9 Alpaca records + 7 conversations = 16 examples."""
    root.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(source_texts(load_data_config(BUNDLED)), root / "tokenizer.model", vocab_size=384)
    args = tiny_args(vocab_size=tok.vocab_size)
    write_meta_checkpoint(root / "base", random_state_dict(args, seed=2), params=params_of(args))
    cfg = root / "data.yaml"
    cfg.write_text(
        f"sources:\n  - {{path: {REPO / 'data' / 'alpaca_tiny.json'}, type: alpaca, ratio: {ratio}}}\n"
        f"  - {{path: {REPO / 'data' / 'conversations_tiny.json'}, type: conversation, ratio: {ratio}}}\n"
    )
    return FinetuneEnv(root, root / "tokenizer.model", root / "base", cfg)


def wait_until_paused(proc: subprocess.Popen, *, timeout: float, what: str = "pausing") -> None:
    """Read the run's stdout (a text pipe) until a line starts with "pausing" (util.train's SAVE_PAUSE_ENV hook says
    so once it holds the save). A run that ends first fails the test with its stderr tail where that was piped; one
    that prints nothing for `timeout` s raises queue.Empty (a hang, not a slow machine)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
    while True:
        line = lines.get(timeout=timeout)
        if line is None:
            stderr = f": {proc.stderr.read()[-2000:]}" if proc.stderr is not None else ""
            pytest.fail(f"the run ended (rc {proc.wait()}) without {what}{stderr}")
        if line.startswith("pausing"):
            return
