"""Images from files for a visual backbone: read, convert, resize, crop, normalize (the backbone's config)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_image(path: str | Path, preprocess: dict) -> torch.Tensor:
    """Read an image file as the backbone expects it: RGB, shortest side resized (bicubic), center crop,
    normalized with the backbone's mean/std -> [3, size, size] fp32."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e}); use a PNG/JPEG/WebP file") from None
    return preprocess_image(img, preprocess)


def preprocess_image(img, preprocess: dict) -> torch.Tensor:
    from torchvision.transforms import functional as TF

    size = preprocess["size"]
    img = img.convert("RGB")
    img = TF.resize(img, size, interpolation=TF.InterpolationMode.BICUBIC)
    img = TF.center_crop(img, [size, size])
    x = TF.to_tensor(img)
    return TF.normalize(x, preprocess["mean"], preprocess["std"])
