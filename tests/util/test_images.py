"""Image preprocessing equals the backbone library's own eval transform (0.0) on pictures of every mode and odd
sizes, for open_clip and timm; every unreadable or oversized file is an ImageError naming it."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.visual import ImagePreprocess, create_backbone, open_clip_preprocess, timm_preprocess
from util.images import ImageError, load_image, open_image

WIDE, TALL = (400, 12), (9, 300)


def _noise(size, channels, seed):
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)


def _pictures(root: Path) -> dict[str, Path]:
    """Noise (every pixel differs, so any resampling difference shows) in the modes and sizes people upload."""
    rgb = Image.fromarray(_noise((64, 48), 3, 0))
    rgba = Image.fromarray(_noise((50, 70), 4, 1))  # alpha varies: Pillow resizes RGBA premultiplied
    pictures = {
        "rgb": rgb,
        "rgba": rgba,
        "palette": rgb.quantize(colors=37),  # Pillow resizes "P" nearest-neighbour
        "gray": Image.fromarray(_noise((33, 41), 1, 2)[..., 0]),
        "gray_alpha": Image.fromarray(_noise((40, 40), 4, 3)).convert("LA"),
        "tiny": Image.fromarray(_noise((10, 10), 3, 4)),
        "one_pixel": Image.fromarray(_noise((1, 1), 3, 5)),
        "very_wide": Image.fromarray(_noise(WIDE, 3, 6)),
        "very_tall_rgba": Image.fromarray(_noise(TALL, 4, 7)),
    }
    paths = {}
    for name, img in pictures.items():
        paths[name] = root / f"{name}.png"
        img.save(paths[name])
    return paths


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    return _pictures(tmp_path_factory.mktemp("pictures"))


def _open_clip_reference(cfg: dict):
    """open_clip's own eval pipeline: its transform applied to the file as opened (open_clip's datasets do not
    convert first)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    return lambda path: transform(Image.open(path))


def _timm_reference(data_config: dict):
    """timm's own eval pipeline: its datasets open the file as RGB, then create_transform(**data config)."""
    from timm.data import create_transform

    transform = create_transform(**data_config)
    return lambda path: transform(Image.open(path).convert("RGB"))


def _assert_same(pictures, preprocess: ImagePreprocess, reference) -> None:
    for name, path in pictures.items():
        ours, theirs = load_image(path, preprocess), reference(path)
        assert ours.shape == theirs.shape == (3, *preprocess.size), name
        assert (ours - theirs).abs().max().item() == 0.0, name


def test_open_clip_vit_b_32_preprocessing_is_open_clips_own(pictures):
    import open_clip

    tower, preprocess = create_backbone("open_clip:ViT-B-32")  # random weights, nothing downloaded
    assert preprocess.size == (224, 224) and preprocess.interpolation == "bicubic" and not preprocess.convert_first
    _, _, transform = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)  # the library's own
    _assert_same(pictures, preprocess, lambda path: transform(Image.open(path)))


def test_timm_vit_tiny_preprocessing_is_timms_own(pictures):
    from timm.data import resolve_data_config

    tower, preprocess = create_backbone("timm:vit_tiny_patch16_224")
    config = resolve_data_config(model=tower)
    assert config["crop_pct"] == 0.9 and preprocess.resize_to == (248, 248)  # not 224: timm's crop_pct
    _assert_same(pictures, preprocess, _timm_reference(config))


def test_a_pretrained_tag_brings_its_own_preprocessing(pictures):
    # CLIPA's release squashes, resizes bilinear and normalizes with ImageNet's mean: known from open_clip's
    # registry of pretrained tags, not from the model config (tiny overrides keep the build fast)
    kwargs = {
        "vision_cfg": {"image_size": 48, "patch_size": 16, "width": 32, "head_width": 16, "layers": 1},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    _, preprocess = create_backbone("open_clip:ViT-L-14-CLIPA.datacomp1b", kwargs)
    assert preprocess.resize == "squash" and preprocess.interpolation == "bilinear" and preprocess.size == (48, 48)
    cfg = {
        "size": 48,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "interpolation": "bilinear",
        "resize_mode": "squash",
    }
    _assert_same(pictures, preprocess, _open_clip_reference(cfg))
    _, clip_tag = create_backbone("timm:vit_base_patch16_clip_224.openai", {"depth": 1})
    assert clip_tag.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    with pytest.raises(ValueError, match="no pretrained tag 'nope' for ViT-B-32; its tags: .*'openai'"):
        create_backbone("open_clip:ViT-B-32.nope")
    with pytest.raises(ValueError, match="quick_gelu=True.*'ViT-B-32-quickgelu'"):
        create_backbone("open_clip:ViT-B-32.openai")  # open_clip only warns: the activations would differ


@pytest.mark.parametrize(
    "cfg",
    [
        {"size": (160, 224), "resize_mode": "shortest"},  # non-square: open_clip's keep-ratio resize
        {"size": 96, "resize_mode": "longest", "fill_color": 0},  # pad to square
        {"size": (80, 64), "resize_mode": "longest", "fill_color": 255},
        {"size": 96, "resize_mode": "squash", "interpolation": "bilinear"},
        {"size": 96, "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.5, 0.75)},
    ],
)
def test_every_open_clip_resize_mode_matches(pictures, cfg):
    full = {
        "mode": "RGB",
        "mean": (0.48, 0.45, 0.4),
        "std": (0.26, 0.26, 0.27),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
        **cfg,
    }
    _assert_same(pictures, open_clip_preprocess(full), _open_clip_reference(full))


@pytest.mark.parametrize(
    "config",
    [
        {"crop_pct": 0.875, "crop_mode": "center", "interpolation": "bilinear"},
        {"crop_pct": 1.0, "crop_mode": "center", "interpolation": "bicubic"},
        {"crop_pct": 0.95, "crop_mode": "squash", "interpolation": "bicubic"},
        {"crop_pct": 1.0, "crop_mode": "border", "interpolation": "bicubic"},  # pads with the mean colour
        {"crop_pct": 0.9, "crop_mode": "center", "interpolation": "lanczos", "input_size": (3, 72, 96)},
        {"crop_pct": 0.9, "crop_mode": "border", "interpolation": "nearest", "input_size": (3, 96, 64)},
    ],
)
def test_every_timm_crop_mode_matches(pictures, config):
    full = {"input_size": (3, 96, 96), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), **config}
    _assert_same(pictures, timm_preprocess(full), _timm_reference(full))


def test_a_tiny_test_backbone_is_fed_its_own_input_size(pictures):
    from timm.data import resolve_data_config

    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}
    tower, preprocess = create_backbone("timm:vit_tiny_patch16_224", kwargs)
    assert preprocess.size == (32, 32)  # timm's pretrained_cfg still says 224; the built model takes 32
    _assert_same(pictures, preprocess, _timm_reference(resolve_data_config({"input_size": (3, 32, 32)}, model=tower)))


def test_configuration_the_project_does_not_implement_is_refused():
    with pytest.raises(ValueError, match="crop_mode='random'"):
        timm_preprocess({"input_size": (3, 32, 32), "mean": (0,) * 3, "std": (1,) * 3, "crop_mode": "random"})
    with pytest.raises(ValueError, match="interpolation='random'"):
        timm_preprocess({"input_size": (3, 32, 32), "mean": (0,) * 3, "std": (1,) * 3, "interpolation": "random"})
    with pytest.raises(ValueError, match=r"\['crop_pct'\]"):
        open_clip_preprocess({"size": 32, "mean": (0,) * 3, "std": (1,) * 3, "crop_pct": 0.9})
    with pytest.raises(ValueError, match="resize_mode='fit'"):
        open_clip_preprocess({"size": 32, "mean": (0,) * 3, "std": (1,) * 3, "resize_mode": "fit"})


def _png_with_bad_checksum(path: Path) -> None:
    Image.fromarray(_noise((20, 20), 3, 9)).save(path)
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT")
    length = int.from_bytes(data[at - 4 : at], "big")
    data[at + 4 + length] ^= 0xFF  # first byte of the IDAT chunk's CRC
    path.write_bytes(bytes(data))


def _huge_png(path: Path, width: int, height: int) -> None:
    """A valid PNG header claiming width x height (Pillow checks the size when it opens the file)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])  # 8-bit gray
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def bad_images(root: Path) -> dict[str, tuple[Path, str]]:
    """Files that Pillow refuses in different ways, each with (part of) the reason ImageError gives."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "text.png").write_text("not a picture")
    _png_with_bad_checksum(root / "bad_crc.png")
    _huge_png(root / "bomb.png", 14000, 14000)  # over Pillow's own limit: DecompressionBombError
    _huge_png(root / "big.png", 9000, 9000)  # under Pillow's, over ours
    full = root / "full.jpg"
    Image.fromarray(_noise((128, 128), 3, 10)).save(full)
    (root / "cut.jpg").write_bytes(full.read_bytes()[:300])  # cut in the header
    (root / "truncated.jpg").write_bytes(full.read_bytes()[:5000])  # cut in the pixel data: only decoding fails
    return {
        "text": (root / "text.png", "UnidentifiedImageError"),
        "bad_crc": (root / "bad_crc.png", "broken PNG file"),
        "bomb": (root / "bomb.png", "too large .*196000000 pixels"),
        "big": (root / "big.png", r"9000x9000 pixels is over the limit of 67108864 \(max_image_pixels\)"),
        "cut": (root / "cut.jpg", "Truncated File Read"),
        "truncated": (root / "truncated.jpg", "image file is truncated"),
        "missing": (root / "missing.png", "image not found"),
        "folder": (root, "image not found"),
    }


def test_every_unreadable_or_oversized_image_is_an_image_error_naming_the_file(tmp_path):
    _, preprocess = create_backbone(
        "timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}
    )
    for name, (path, reason) in bad_images(tmp_path / "bad").items():
        with pytest.raises(ImageError, match=reason) as caught:
            load_image(path, preprocess)
        assert caught.value.path == path and str(path) in str(caught.value), name
    # the limit is an option: the 9000x9000 header passes a higher one (and then fails on its empty data)
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(tmp_path / "bad" / "big.png", max_pixels=9000 * 9000)
    assert open_image(tmp_path / "bad" / "full.jpg", max_pixels=128 * 128).size == (128, 128)
    with pytest.raises(ImageError, match="128x128 pixels is over the limit of 16383"):
        open_image(tmp_path / "bad" / "full.jpg", max_pixels=128 * 128 - 1)
    assert open_image(tmp_path / "bad" / "truncated.jpg", decode=False) is None  # the check alone passes it
    assert isinstance(load_image(tmp_path / "bad" / "full.jpg", preprocess), torch.Tensor)
