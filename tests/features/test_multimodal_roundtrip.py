"""The whole multimodal path: fine-tune on pictures with main_finetune, reload base + fine-tune in a new build,
and ask about each picture: greedy answers follow the image, in-process and through demo.py --image; a bad or
huge picture given to the demo is one line and rc 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.features.test_multimodal import ANSWERS, COLORS, _image_set, _visual_args
from tests.finetune_env import make_env
from tests.util.test_images import bad_images
from util.build import build_model
from util.generate import Chat, SamplingParams
from util.images import load_image
from util.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What color is the picture?"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """main_finetune on the four colour pictures: image tokens before the text, the whole LLM and the visual
    projection trained (the backbone stays frozen). Prefix mode learns too slowly from a random tiny base to
    answer in a test's time; its generation path is compared with recompute in tests/features/test_multimodal.py."""
    import main_finetune

    root = tmp_path_factory.mktemp("mm_roundtrip")
    env = make_env(root / "env")
    data = _image_set(root / "data")
    args = _visual_args(root)
    visual = root / "visual.json"
    visual.write_text(json.dumps({k: getattr(args, k) for k in ("visual_backbone", "visual_kwargs", "visual_weights")}))
    argv = env.argv(
        root / "out",
        "--data_config",
        str(data),
        "--max_iters",
        "100",
        "--lr",
        "3e-3",
        "--save_interval",
        "0",
        lora=False,
    )
    argv[argv.index("--pretrained_path") : argv.index("--pretrained_path")] = ["--llama_config", str(visual)]
    res = main_finetune.main(argv)
    assert res.losses[-1] < 0.2 * res.losses[0], res.losses
    return env, res.final_dir, root / "data" / "images"


def _answers(model, tokenizer, pictures: Path) -> list[str]:
    out = []
    for i in range(len(COLORS)):
        image = load_image(pictures / f"{i}.png", model.visual.preprocess).unsqueeze(0)
        reply = Chat(model, tokenizer).send(QUESTION, SamplingParams(max_new_tokens=16, temperature=0), images=image)
        out.append("".join(reply).strip())
    return out


def test_a_reloaded_multimodal_finetune_answers_about_the_picture(finetuned):
    env, final, pictures = finetuned
    model, _ = build_model(None, [env.base, final], dtype=torch.float32)  # the config comes with the fine-tune
    assert model.visual is not None
    model.eval()
    tokenizer = Tokenizer(env.tokenizer)
    answers = _answers(model, tokenizer, pictures)
    assert answers == ANSWERS, answers  # each picture gets its own colour back: the answer follows the image


def _demo(*argv: str):
    return subprocess.run(
        [sys.executable, str(ROOT / "demo.py"), *argv], cwd=ROOT, capture_output=True, text=True, timeout=180
    )


def test_demo_answers_about_the_picture_and_refuses_bad_ones_in_one_line(finetuned, tmp_path):
    env, final, pictures = finetuned
    common = [
        "--tokenizer_path",
        str(env.tokenizer),
        "--pretrained_path",
        str(env.base),
        str(final),
        "--quant",
        "none",
        "--dtype",
        "fp32",
        "--temperature",
        "0",
        "--max_new_tokens",
        "16",
        "--prompt",
        QUESTION,
    ]
    for i in (0, 2):
        done = _demo(*common, "--image", str(pictures / f"{i}.png"))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == ANSWERS[i], (done.stdout, done.stderr)
    reasons = {
        "text": "cannot identify image file",
        "bad_crc": "broken PNG file",
        "bomb": "too large",
        "big": "9000x9000 pixels is over the limit",
        "truncated": "image file is truncated",
        "missing": "not found",
    }
    for name, (path, _) in bad_images(tmp_path / "bad").items():
        if name not in reasons:
            continue
        done = _demo(*common, "--image", str(path))
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and done.stdout == "", (name, done.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and path.name in lines[0], lines
        assert reasons[name] in lines[0], lines
