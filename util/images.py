"""Images from files for a visual backbone: open (any failure is an ImageError naming the file), then the
backbone library's own eval transform (model.visual.ImagePreprocess: resize, crop, RGB, normalize, in its order).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from model.visual import ImagePreprocess

# The largest picture read by default: 8192 x 8192 (a 48 MP photo fits). Decoding one costs 3 bytes a pixel
# (200 MB here) before it is scaled down to a few hundred pixels, and Pillow refuses at 2x its own
# MAX_IMAGE_PIXELS (~179 MP) anyway. Data sources set their own with `max_image_pixels`.
MAX_PIXELS = 8192 * 8192


class ImageError(ValueError):
    """An image file that cannot be used: `path` and the `reason` (what Pillow said, or the size limit)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


def open_image(path: str | Path, *, max_pixels: int = MAX_PIXELS, decode: bool = True) -> Image.Image | None:
    """Check an image file's structure (Pillow's verify: e.g. every PNG chunk's checksum) and size, then decode
    it (decode=False: only the checks, which read the file but decode nothing; returns None). Whatever Pillow
    raises (unknown format, broken or truncated data, its decompression-bomb limit) and a picture over
    max_pixels become an ImageError naming the file, so a check and a read refuse the same files."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "image not found")
    with _opened(path) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(
                path,
                f"{width}x{height} pixels is over the limit of {max_pixels} (max_image_pixels); scale the image "
                "down or raise the limit",
            )
        _pillow(path, img.verify)
    if not decode:
        return None
    img = _opened(path)  # verify leaves the image unusable: open it again
    try:
        _pillow(path, img.load)
    except ImageError:
        img.close()
        raise
    return img


def _opened(path: Path) -> Image.Image:
    from PIL import Image

    with warnings.catch_warnings():  # open_image's max_pixels is the limit that counts, not Pillow's warning
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _pillow(path, Image.open, path)


def _pillow(path: Path, fn, *args):
    """fn(*args), with anything it raises as an ImageError (Pillow raises SyntaxError, struct.error, OSError,
    DecompressionBombError, ... for broken files)."""
    from PIL import Image

    try:
        return fn(*args)
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"too large ({e}); scale the image down") from None
    except Exception as e:
        raise ImageError(
            path, f"not a readable image ({type(e).__name__}: {e}); use a PNG, JPEG or WebP file"
        ) from None


def load_image(path: str | Path, preprocess: ImagePreprocess, *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Read an image file as the backbone expects it -> [3, H, W] fp32 (ImageError for any problem)."""
    img = open_image(path, max_pixels=max_pixels)
    try:
        return preprocess_image(img, preprocess)
    except Exception as e:  # a mode Pillow cannot resize or convert
        raise ImageError(path, f"cannot be converted to RGB pixels ({type(e).__name__}: {e})") from None
    finally:
        img.close()


def preprocess_image(img: Image.Image, preprocess: ImagePreprocess) -> torch.Tensor:
    """The library's eval transform, step for step (tests compare it with open_clip's and timm's own, 0.0):
    [RGB (timm)] -> resize -> center crop (or pad) -> [RGB (open_clip)] -> tensor -> normalize."""
    from torchvision.transforms import functional as TF

    p = preprocess
    if p.convert_first:
        img = img.convert("RGB")
    mode = TF.InterpolationMode(p.interpolation)
    if p.resize == "squash":
        img = TF.resize(img, list(p.resize_to), interpolation=mode)
    elif p.resize == "shortest" and p.resize_to[0] == p.resize_to[1]:
        img = TF.resize(img, p.resize_to[0], interpolation=mode)  # torchvision's shortest-edge sizes (int())
    else:  # both libraries' keep-ratio resize (rounded sizes)
        img = TF.resize(img, _keep_ratio(img, p.resize_to, longest=p.resize == "longest"), interpolation=mode)
    if p.resize == "longest":
        img = _center_crop_or_pad(img, p.size, p.fill[0] if len(p.fill) == 1 else list(p.fill))
    else:
        img = TF.center_crop(img, list(p.size))
    if not p.convert_first:
        img = img.convert("RGB")
    return TF.normalize(TF.to_tensor(img), p.mean, p.std)


def _keep_ratio(img: Image.Image, target: tuple[int, int], *, longest: bool) -> list[int]:
    """(h, w) scaled so that the shortest (or longest) edge meets the target."""
    w, h = img.size
    ratio_h, ratio_w = h / target[0], w / target[1]
    weight = 1.0 if longest else 0.0
    ratio = max(ratio_h, ratio_w) * weight + min(ratio_h, ratio_w) * (1.0 - weight)
    return [round(h / ratio), round(w / ratio)]


def _center_crop_or_pad(img: Image.Image, size: tuple[int, int], fill) -> Image.Image:
    """Pad to at least `size` (left/top get the smaller half), then crop the center."""
    from torchvision.transforms import functional as TF

    crop_h, crop_w = size
    w, h = img.size
    if crop_w > w or crop_h > h:
        pad_w, pad_h = max(crop_w - w, 0), max(crop_h - h, 0)
        img = TF.pad(img, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2], fill=fill)
        w, h = img.size
        if (w, h) == (crop_w, crop_h):
            return img
    return TF.crop(img, int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0)), crop_h, crop_w)
