import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from model.llama import Transformer
from model.visual import create_backbone
from tests.helpers import params_of, random_state_dict, tiny_args
from util.build import build_model
from util.checkpoint import CheckpointError, write_meta_checkpoint
from util.images import ImageError, load_image
from util.lazy_init import materialize_and_load, meta_init

ROOT = Path(__file__).resolve().parents[2]
BACKBONES = {
    "timm": (
        "timm:vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2},
    ),
    "open_clip": (
        "open_clip:ViT-B-32",
        {
            "embed_dim": 32,
            "vision_cfg": {
                "image_size": 32,
                "patch_size": 8,
                "width": 48,
                "layers": 2,
                "head_width": 24,
                "mlp_ratio": 2.0,
            },
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
        },
    ),
}
TOKENS = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    args = tiny_args()
    path = tmp_path_factory.mktemp("base")
    write_meta_checkpoint(path, random_state_dict(args, seed=7), params=params_of(args))
    return args, path


def _weights(tmp_path, kind, seed=0):
    """A backbone's weights file, written by the test (random values, as a converted checkpoint would hold)."""
    spec, kwargs = BACKBONES[kind]
    backbone, _ = create_backbone(spec, kwargs)
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in backbone.state_dict().items()}
    path = tmp_path / f"{kind}.safetensors"
    save_file(state, str(path))
    return path, state


def _images(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_backbone_is_real_inside_meta_build_and_bitwise_from_its_file(base, tmp_path, kind):
    args, path = base
    weights, state = _weights(tmp_path, kind)
    spec, kwargs = BACKBONES[kind]
    cfg = args.replace(visual_backbone=spec, visual_kwargs=kwargs, visual_weights=str(weights))
    with meta_init(torch.bfloat16):
        model = Transformer(cfg)
    assert all(p.is_meta for n, p in model.named_parameters() if not n.startswith("visual.backbone."))
    assert not any(p.is_meta for p in model.visual.backbone.parameters())
    assert next(model.visual.backbone.parameters()).dtype == torch.float32  # not the meta build's bf16

    model, report = build_model(cfg, [path], quant="4bit", dtype=torch.bfloat16)
    for key, value in model.visual.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not any(p.requires_grad for p in model.visual.backbone.parameters())  # frozen by default
    assert all(type(m).__name__ != "QuantLinear" for m in model.visual.modules())  # not quantized
    assert model.visual.proj.fc1.weight.requires_grad  # the projection trains
    logits = model(TOKENS, images=_images())
    assert logits.shape == (2, 8, 512) and torch.isfinite(logits).all()


def test_prefix_variant_is_a_noop_until_trained_then_the_image_matters(base, tmp_path):
    args, path = base
    weights, _ = _weights(tmp_path, "timm")
    spec, kwargs = BACKBONES["timm"]
    cfg = args.replace(
        visual_backbone=spec,
        visual_kwargs=kwargs,
        visual_weights=str(weights),
        visual_mode="prefix",
        adapter_len=3,
        adapter_layers=2,
    )
    torch.manual_seed(0)
    model, _ = build_model(cfg, [path], quant="4bit", dtype=torch.float32)
    images = _images()
    with torch.no_grad():
        assert torch.equal(model(TOKENS, images=images), model(TOKENS))  # zero gates: text logits exactly
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):
        logits = model(TOKENS, images=images)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        with_a, with_b = model(TOKENS, images=images), model(TOKENS, images=_images(seed=1))
    assert not torch.equal(with_a, with_b)  # the image now changes the output


def test_training_projection_and_lora_on_4bit_reduces_loss(base, tmp_path):
    args, path = base
    weights, _ = _weights(tmp_path, "open_clip")
    spec, kwargs = BACKBONES["open_clip"]
    cfg = args.replace(visual_backbone=spec, visual_kwargs=kwargs, visual_weights=str(weights), lora_rank=4)
    torch.manual_seed(0)
    model, _ = build_model(cfg, [path], quant="4bit", dtype=torch.float32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.proj.") for n in trainable) and not any("backbone" in n for n in trainable)
    # a tiny synthetic image-text set: the caption token sequence depends on the image
    images = _images(4)
    captions = torch.stack([torch.arange(8) * (i + 1) % 512 for i in range(4)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        logits = model(captions, images=images)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), captions[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_default_state_restored_when_the_backbone_constructor_raises():
    spec, kwargs = BACKBONES["timm"]
    before = (torch.get_default_dtype(), torch.get_default_device())
    message = r"visual_kwargs=.*'depth': 'two'.*the library cannot build it \(TypeError"
    with pytest.raises(ValueError, match=message), meta_init(torch.bfloat16):
        Transformer(tiny_args(visual_backbone=spec, visual_kwargs=dict(kwargs, depth="two")))
    assert (torch.get_default_dtype(), torch.get_default_device()) == before
    assert not torch.empty(1).is_meta


def test_materialize_leaves_the_real_backbone_alone(tmp_path):
    spec, kwargs = BACKBONES["timm"]
    with meta_init():
        model = Transformer(tiny_args(visual_backbone=spec, visual_kwargs=kwargs))
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.visual.backbone.state_dict().items()}
    materialize_and_load(model, None, seed=0)
    for key, value in model.visual.backbone.state_dict().items():
        assert value.data_ptr() == before[key][0] and torch.equal(value, before[key][1]), key


def test_image_preprocessing_and_bad_files(tmp_path):
    _, pre = create_backbone(*BACKBONES["open_clip"])
    assert pre.size == (32, 32) and pre.resize == "shortest" and not pre.convert_first  # open_clip: convert last
    img = Image.new("RGB", (64, 48), (255, 0, 0))
    img.save(tmp_path / "red.png")
    x = load_image(tmp_path / "red.png", pre)
    assert x.shape == (3, 32, 32)
    expected = [(1.0 - pre.mean[0]) / pre.std[0], -pre.mean[1] / pre.std[1], -pre.mean[2] / pre.std[2]]
    torch.testing.assert_close(x[:, 16, 16], torch.tensor(expected), rtol=1e-6, atol=1e-6)
    Image.new("L", (40, 40), 128).save(tmp_path / "gray.png")  # grayscale converts to RGB: three equal channels
    gray = (
        load_image(tmp_path / "gray.png", pre) * torch.tensor(pre.std)[:, None, None]
        + torch.tensor(pre.mean)[:, None, None]
    )
    torch.testing.assert_close(gray, torch.full_like(gray, 128 / 255), rtol=0, atol=1e-6)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError, match="broken.png: not a readable image"):
        load_image(tmp_path / "broken.png", pre)
    with pytest.raises(ImageError, match="nope.jpg: image not found"):
        load_image(tmp_path / "nope.jpg", pre)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("open_clip:hf-hub:timm/ViT-B-16-SigLIP", "hub ids .* are refused because nothing may be downloaded"),
        ("timm:hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", "refused because nothing may be downloaded"),
        ("timm:hf_hub:timm/vit_tiny_patch16_224", "refused because nothing may be downloaded"),
        ("open_clip:local-dir:/tmp/clip", "refused because nothing may be downloaded"),
        ("timm:https://example.com/vit.pth", "refused because nothing may be downloaded"),
        ("open_clip:weights/ViT-B-32", "refused because nothing may be downloaded"),
        ("open_clip:NoSuchModel", "open_clip has no model 'NoSuchModel'"),
        ("timm:no_such_vit", "timm has no model 'no_such_vit'"),
        ("keras:ResNet50", "expected 'open_clip:<model>' or 'timm:<model>'"),
        ("open_clip:xlm-roberta-base-ViT-B-32", "text tower is a Hugging Face model whose config would be downloaded"),
    ],
)
def test_backbones_that_would_download_or_do_not_exist_are_refused(spec, message, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(ValueError, match=message) as caught:
        create_backbone(spec)
    assert spec in str(caught.value)


def test_images_on_a_text_model_and_wrong_weights_are_clear_errors(base, tmp_path):
    args, path = base
    model, _ = build_model(args, [path], dtype=torch.float32)
    with pytest.raises(ValueError, match="visual_backbone"):
        model(TOKENS, images=_images())
    weights, _ = _weights(tmp_path, "timm")
    spec, kwargs = BACKBONES["open_clip"]
    with pytest.raises(CheckpointError, match="does not fit the visual backbone"):
        build_model(args.replace(visual_backbone=spec, visual_kwargs=kwargs, visual_weights=str(weights)), [path])


def test_converter_takes_the_image_tower_of_a_clip_checkpoint(tmp_path):
    import open_clip

    spec, kwargs = BACKBONES["open_clip"]
    clip = open_clip.create_model(spec.split(":")[1], pretrained=None, **kwargs)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")  # the whole CLIP: text tower included
    out = tmp_path / "visual.safetensors"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/convert_visual_weights.py"),
            "--backbone",
            spec,
            "--kwargs",
            __import__("json").dumps(kwargs),
            "--input",
            str(tmp_path / "clip.pt"),
            "--output",
            str(out),
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    from safetensors.torch import load_file

    converted = load_file(str(out))
    assert converted.keys() == clip.visual.state_dict().keys()
    assert all(torch.equal(v, clip.visual.state_dict()[k]) for k, v in converted.items())


def _convert(*argv: str):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/convert_visual_weights.py"), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_converter_errors_are_one_line_with_status_2(tmp_path):
    import json

    spec, kwargs = BACKBONES["timm"]
    good, _ = _weights(tmp_path, "timm")
    (tmp_path / "notes.pt").write_text("these are not weights")
    torch.save({"step": 3, "lr": 0.1}, tmp_path / "counters.pt")  # a torch file, not tensors
    out = tmp_path / "out.safetensors"
    cases = {
        "wrong backbone": (
            ["--backbone", "keras:vit", "--input", str(good)],
            "--backbone: visual_backbone='keras:vit'",
        ),
        "unknown model": (["--backbone", "timm:no_such_vit", "--input", str(good)], "timm has no model 'no_such_vit'"),
        "hub backbone": (["--backbone", "open_clip:hf-hub:a/b", "--input", str(good)], "nothing may be downloaded"),
        "not a checkpoint": (
            ["--backbone", spec, "--kwargs", json.dumps(kwargs), "--input", str(tmp_path / "notes.pt")],
            "notes.pt: not a checkpoint that can be read safely",
        ),
        "no tensors": (
            ["--backbone", spec, "--kwargs", json.dumps(kwargs), "--input", str(tmp_path / "counters.pt")],
            "counters.pt: expected a dict of tensors",
        ),
        "missing file": (["--backbone", spec, "--input", str(tmp_path / "gone.pt")], "gone.pt: no such file"),
        "other model's weights": (  # tiny timm weights into the default-size timm model
            ["--backbone", spec, "--input", str(good)],
            "does not fit --backbone timm:vit_tiny_patch16_224: .* of another shape",
        ),
        "bad kwargs": (["--backbone", spec, "--kwargs", "{depth: 2}", "--input", str(good)], "--kwargs .*not JSON"),
    }
    for name, (argv, message) in cases.items():
        done = _convert(*argv, "--output", str(out))
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (name, done.stderr)
        assert lines[0].startswith("error: ") and re.search(message, lines[0]), (name, lines[0])
        assert not out.exists()
    done = _convert("--backbone", spec, "--kwargs", json.dumps(kwargs), "--input", str(good), "--output", str(out))
    assert done.returncode == 0 and out.is_file(), done.stderr
