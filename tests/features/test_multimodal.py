"""Image-text fine-tuning and serving: the image_conversation data type, training with images through util.train,
generation with an image (KV cache vs full recompute), and demo.py --image. Tiny backbones as in
tests/model/test_visual.py."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.visual import ImagePreprocess
from tests.finetune_env import make_env
from tests.helpers import tiny_args
from tests.model.test_visual import BACKBONES, _weights
from tests.util.test_images import bad_images
from util.build import build_model
from util.data import DataError, InstructionDataset, collate, load_data_config
from util.generate import Chat, SamplingParams, generate
from util.images import load_image
from util.tokenizer import Tokenizer
from util.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[2]
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
ANSWERS = ["It is red.", "It is green.", "It is blue.", "It is yellow."]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("mm_env"))


def _image_set(root: Path, *, bad: bool = False) -> Path:
    """PNGs in root/images and a JSON (relative image paths) + YAML config; bad: add broken records."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, color in enumerate(COLORS):
        Image.new("RGB", (40, 36), color).save(root / "images" / f"{i}.png")
        records.append(
            {
                "image": f"images/{i}.png",
                "conversations": [
                    {"from": "human", "value": "What color is the picture?"},
                    {"from": "gpt", "value": ANSWERS[i]},
                ],
            }
        )
    if bad:
        bad_images(root / "images")  # files Pillow refuses in different ways
        conv = records[0]["conversations"]
        records += [{"image": f"images/{name}", "conversations": conv} for name in BAD]  # [4] ... [10]
        records += [
            {"conversations": conv},  # [11]: no image
            {"image": "images/truncated.jpg", "conversations": conv},  # [12]: passes the check, fails to decode
        ]
    (root / "mm.json").write_text(json.dumps(records))
    cfg = root / "mm.yaml"
    cfg.write_text("sources:\n  - {path: mm.json, type: image_conversation, ratio: 1.0}\n")
    return cfg


def _visual_args(tmp_path, kind="timm", **overrides):
    weights, _ = _weights(tmp_path, kind)
    spec, kwargs = BACKBONES[kind]
    return tiny_args(
        vocab_size=384, visual_backbone=spec, visual_kwargs=kwargs, visual_weights=str(weights), **overrides
    )


# the bad files of tests/util/test_images.py, each with the reason its record is reported with
BAD = {
    "missing.png": "image not found",
    "text.png": "not a readable image \\(UnidentifiedImageError",
    "bad_crc.png": "not a readable image \\(SyntaxError: broken PNG file",  # escaped the handler before
    "bomb.png": "too large \\(Image size \\(196000000 pixels\\) exceeds limit",  # Pillow's DecompressionBombError
    "big.png": "9000x9000 pixels is over the limit of 67108864 \\(max_image_pixels\\)",
    "cut.jpg": "not a readable image \\(OSError: Truncated File Read",
    "full.jpg": None,  # a good one (JPEG)
}
PRE = ImagePreprocess((32, 32), "shortest", (32, 32), "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_every_bad_image_is_a_skipped_record_named_by_file_index_and_path(env, tmp_path, caplog):
    cfg = _image_set(tmp_path, bad=True)
    with caplog.at_level(logging.WARNING):
        ds = InstructionDataset(load_data_config(cfg), env.tokenizer, max_words=64, preprocess=PRE)
    assert len(ds) == 6 and ds.has_images  # 4 colours, full.jpg, truncated.jpg
    warning = caplog.text
    assert f"{tmp_path / 'mm.json'}: skipped 7 of 13 bad image_conversation record(s)" in warning
    for index, (name, reason) in enumerate(BAD.items(), start=4):
        if reason is not None:
            assert re.search(rf"\[{index}\]: image {re.escape(str(tmp_path / 'images' / name))}: {reason}", warning)
    assert '[11]: missing field "image"' in warning
    tokens, labels, image = ds[0]
    assert image.shape == (3, 32, 32) and tokens.shape == labels.shape
    batch = collate([ds[i] for i in range(3)])
    assert len(batch) == 3 and batch[2].shape == (3, 3, 32, 32)
    # truncated.jpg passes the check (Pillow verifies no JPEG data) and fails to decode: skipped when read,
    # reported the same way, and its item takes the next record (wrapping to the first)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tokens, labels, image = ds[5]
    first = ds[0]
    assert torch.equal(tokens, first[0]) and torch.equal(image, first[2])
    truncated = tmp_path / "images" / "truncated.jpg"
    assert f"{tmp_path / 'mm.json'}: [12]: image {truncated}: not a readable image" in caplog.text
    assert "skipped (item 5 takes the next record)" in caplog.text
    with pytest.raises(DataError, match=r"mm.json: 7 of 13 image_conversation record\(s\) are bad"):
        InstructionDataset(load_data_config(cfg), env.tokenizer, max_words=64, strict=True)
    records = json.loads((tmp_path / "mm.json").read_text())
    (tmp_path / "late.json").write_text(json.dumps([records[0], records[12]]))
    (tmp_path / "late.yaml").write_text("sources:\n  - {path: late.json, type: image_conversation}\n")
    strict = InstructionDataset(
        load_data_config(tmp_path / "late.yaml"), env.tokenizer, max_words=64, strict=True, preprocess=PRE
    )
    with pytest.raises(DataError, match=r"late.json: \[1\]: image .*truncated.jpg: not a readable image"):
        strict[1]
    # the size limit is a per-source option
    (tmp_path / "small.yaml").write_text(
        "sources:\n  - {path: mm.json, type: image_conversation, max_image_pixels: 1000}\n"
    )
    with caplog.at_level(logging.WARNING), pytest.raises(DataError, match="no usable image_conversation records"):
        InstructionDataset(load_data_config(tmp_path / "small.yaml"), env.tokenizer, max_words=64)
    assert "40x36 pixels is over the limit of 1000 (max_image_pixels)" in caplog.text
    (tmp_path / "wrong.yaml").write_text(
        f"sources:\n  - {{path: {ROOT / 'data' / 'alpaca_tiny.json'}, type: alpaca, max_image_pixels: 1000}}\n"
    )
    with pytest.raises(DataError, match="max_image_pixels must be an integer > 0 on an image_conversation source"):
        load_data_config(tmp_path / "wrong.yaml")


def test_image_data_needs_a_visual_model_and_is_not_mixed_with_text(env, tmp_path):
    cfg = _image_set(tmp_path)
    # no preprocessing config (no visual model): a clear error when an item is read
    with pytest.raises(DataError, match="visual"):
        InstructionDataset(load_data_config(cfg), env.tokenizer, max_words=64)[0]
    # images and text-only data cannot share batches
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(
        "sources:\n  - {path: mm.json, type: image_conversation}\n"
        f"  - {{path: {ROOT / 'data' / 'conversations_tiny.json'}, type: conversation}}\n"
    )
    with pytest.raises(DataError, match="mixes image_conversation"):
        InstructionDataset(load_data_config(mixed), env.tokenizer, max_words=64)


def test_training_with_images_through_the_trainer_reduces_loss(env, tmp_path):
    cfg = _image_set(tmp_path)
    args = _visual_args(tmp_path, lora_rank=4, lora_alpha=8.0)
    torch.manual_seed(0)
    model, _ = build_model(args, [env.base], quant="4bit", dtype=torch.float32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.proj.") for n in trainable) and any("lora" in n for n in trainable)
    assert not any("backbone" in n for n in trainable)
    dataset = InstructionDataset(load_data_config(cfg), env.tokenizer, max_words=200)
    config = TrainConfig(output_dir=tmp_path / "out", batch_size=2, lr=1e-2, max_iters=12, tensorboard=False)
    trainer = Trainer(model, args, dataset, config)
    assert trainer.dataset.preprocess == model.visual.preprocess  # taken from the model
    assert trainer.dataset.max_words == args.max_seq_len - model.image_positions()  # room for the image tokens
    assert dataset.preprocess is None and dataset.max_words == 200  # the caller's dataset is left as it was
    seen = []
    forward = model.forward
    model.forward = lambda *a, **kw: (seen.append(kw.get("images")), forward(*a, **kw))[1]
    losses = trainer.fit()
    assert all(x is not None and x.shape == (2, 3, 32, 32) for x in seen)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("mode", ["tokens", "prefix"])
def test_greedy_generation_with_an_image_and_cache_equals_full_recompute(env, tmp_path, mode):
    extra = {"visual_mode": "prefix", "adapter_len": 3, "adapter_layers": 2} if mode == "prefix" else {}
    args = _visual_args(tmp_path, **extra)
    torch.manual_seed(0)
    model, _ = build_model(args, [env.base], dtype=torch.float32)
    if mode == "prefix":  # open the zero-initialized gates so the image matters
        for name, p in model.named_parameters():
            if "gate" in name:
                p.data.fill_(0.5)
    model.eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    image = images[:1]
    prompts = [[1, 17, 42, 99, 7], [1, 17, 42, 99, 7]]  # the same text, two images
    passes = []
    hook = model.visual.register_forward_hook(lambda module, args, out: passes.append(args[0].shape[0]))
    cached = generate(model, prompts, SamplingParams(max_new_tokens=8), images=images)
    hook.remove()
    assert passes == [2]  # the image encoder ran once for the whole generation (both modes), not once a token
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        with torch.no_grad():  # the reference: the whole sequence and its image through the model at every step
            for _ in range(8):
                seq.append(int(model(torch.tensor([seq]), images=images[row : row + 1])[0, -1].argmax()))
        assert cached[row] == seq[len(prompt) :]
    with torch.no_grad():  # the image is read
        x = torch.tensor([prompt])
        assert not torch.allclose(model(x, images=image), model(x, images=torch.zeros_like(image) + 2))
    with pytest.raises(ValueError, match="exceed max_seq_len"):  # the image's positions count against the context
        generate(
            model,
            [prompt],
            SamplingParams(max_new_tokens=args.max_seq_len - 5 - model.image_positions() + 1),
            images=image,
        )


def _demo(*argv: str):
    return subprocess.run(
        [sys.executable, str(ROOT / "demo.py"), *argv], cwd=ROOT, capture_output=True, text=True, timeout=180
    )


def test_demo_prompt_with_an_image(env, tmp_path):
    args = _visual_args(tmp_path)
    config = tmp_path / "visual.json"
    config.write_text(json.dumps(args.to_dict()))  # the base's shapes plus the visual backbone
    Image.new("RGB", (50, 40), (10, 200, 30)).save(tmp_path / "pic.png")
    common = [
        "--tokenizer_path",
        str(env.tokenizer),
        "--pretrained_path",
        str(env.base),
        "--quant",
        "none",
        "--dtype",
        "fp32",
        "--temperature",
        "0",
        "--repetition_penalty",
        "1",
        "--max_new_tokens",
        "6",
        "--prompt",
        "What is this?",
    ]
    done = _demo(*common, "--llama_config", str(config), "--image", str(tmp_path / "pic.png"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n") and "error" not in done.stderr.lower()
    # the answer is the one the same model gives in-process for that picture (greedy, fp32: exactly)
    model, _ = build_model(args, [env.base], dtype=torch.float32)
    image = load_image(tmp_path / "pic.png", model.visual.preprocess).unsqueeze(0)
    reply = Chat(model, Tokenizer(env.tokenizer)).send(
        "What is this?", SamplingParams(max_new_tokens=6, temperature=0), images=image
    )
    expected = "".join(reply)
    assert expected.strip() and done.stdout == expected + "\n", (done.stdout, expected)
    # a text-only model with --image: a clear message
    done = _demo(*common, "--image", str(tmp_path / "pic.png"))
    assert done.returncode == 2 and "text-only" in done.stderr and "--image" in done.stderr
    # an unreadable image: reported before the model loads
    (tmp_path / "bad.png").write_bytes(b"nope")
    done = _demo(*common, "--llama_config", str(config), "--image", str(tmp_path / "bad.png"))
    assert done.returncode == 2 and "could not read the image bad.png" in done.stderr


def test_main_finetune_trains_on_images_and_a_text_model_is_refused(env, tmp_path):
    import main_finetune

    data = _image_set(tmp_path / "data")
    args = _visual_args(tmp_path)
    visual = tmp_path / "visual.json"
    visual.write_text(json.dumps({k: getattr(args, k) for k in ("visual_backbone", "visual_kwargs", "visual_weights")}))
    argv = env.argv(tmp_path / "out", "--data_config", str(data), "--quant", "4bit", "--max_iters", "6")
    argv.insert(argv.index("--llama_config") + 2, str(visual))  # after lora_r16.json
    res = main_finetune.main(argv)
    assert res.model.visual is not None and len(res.losses) == 6
    assert res.losses[-1] < res.losses[0], res.losses
    assert not any(p.requires_grad for p in res.model.visual.backbone.parameters())
    text_only = env.argv(tmp_path / "out2", "--data_config", str(data), "--max_iters", "1")
    with pytest.raises(ValueError, match="image_conversation data needs a model with a visual backbone"):
        main_finetune.main(text_only)


def test_web_page_takes_an_image_for_a_multimodal_model(env, tmp_path):
    import socket
    import time
    import urllib.request

    from gradio_client import Client, handle_file

    args = _visual_args(tmp_path)
    config = tmp_path / "visual.json"
    config.write_text(json.dumps(args.to_dict()))
    Image.new("RGB", (50, 40), (10, 200, 30)).save(tmp_path / "pic.png")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [
        sys.executable,
        str(ROOT / "demo.py"),
        "--tokenizer_path",
        str(env.tokenizer),
        "--pretrained_path",
        str(env.base),
        "--llama_config",
        str(config),
        "--quant",
        "none",
        "--dtype",
        "fp32",
        "--web",
        "--port",
        str(port),
        "--temperature",
        "0",
    ]
    log = tmp_path / "web.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        client = Client(url, verbose=False)
        history, _, status = client.predict(
            "What is this?", [], handle_file(str(tmp_path / "pic.png")), 0, 1, 0, 6, 1, api_name="/respond"
        )
        assert "takes no images" not in status and "could not read" not in status, status
        assert history and history[-1]["role"] == "assistant", history
        (tmp_path / "bad.png").write_bytes(b"nope")
        _, _, status = client.predict(
            "again", [], handle_file(str(tmp_path / "bad.png")), 0, 1, 0, 6, 1, api_name="/respond"
        )
        assert "could not read the image" in status and proc.poll() is None  # and the server keeps serving
    finally:
        proc.terminate()
        proc.wait(timeout=10)
