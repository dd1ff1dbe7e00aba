"""Visual backbones (open_clip CLIP image towers, timm ViTs) beside the lazily built LLM.

The backbone brings its own weights, so it is built for real even inside `meta_init()` (the `real_init()`
escape hatch), loaded from a local file by the build, frozen by default, and left alone by
`materialize_and_load` (already real) and by `quantize_model` (on the block list: CLIP's attention reads
`.weight` directly). Its features go through a trainable projection, which is built on meta like the LLM and
owns its init. Two ways into the LLM:
- "tokens": projected patch features become image tokens between learnable begin/end markers, placed before
  the text in the LLM input;
- "prefix": the projected pooled feature is added to the LLaMA-Adapter prompts (the multimodal
  LLaMA-Adapter), read through the adapter's zero-initialized gates: an untrained model ignores the image.
The backbone comes with its library's own eval preprocessing (ImagePreprocess, applied by util/images.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.args import ModelArgs
from model.init import real_init
from model.layers.parallel import init_sharded_, normal_fill, uniform_fill


@dataclass(frozen=True)
class ImagePreprocess:
    """How the backbone's own library turns a picture into its input, as a record util/images.py applies.

    Taken from the library's configuration (open_clip's `preprocess_cfg`, timm's `resolve_data_config`), so an
    image reaches the encoder exactly as it would through the library's eval transform (tests compare them)."""

    size: tuple[int, int]  # (height, width) the encoder takes
    resize: str  # "shortest": shortest edge to resize_to (keep ratio); "longest": longest edge; "squash": both
    resize_to: tuple[int, int]  # (h, w) target of the resize: `size`, or size / crop_pct (timm)
    interpolation: str  # torchvision InterpolationMode name: "bicubic", "bilinear", "nearest", ...
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fill: tuple[int, ...] = (0,)  # padding colour where the resized image is smaller than `size` ("longest")
    # open_clip converts to RGB after resizing (Pillow resizes RGBA premultiplied, palette images nearest-
    # neighbour), timm's datasets convert when they open the file, before the transform.
    convert_first: bool = False


_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def _square(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def open_clip_preprocess(cfg: dict) -> ImagePreprocess:
    """open_clip's eval transform (`image_transform` with is_train=False) for a model's `preprocess_cfg`."""
    unknown = sorted(set(cfg) - {"size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color"})
    if unknown:
        raise ValueError(f"open_clip preprocess_cfg has field(s) {unknown} this project does not implement")
    if cfg.get("mode", "RGB") != "RGB":
        raise ValueError(f"open_clip preprocess_cfg mode={cfg['mode']!r}: only 'RGB' is implemented")
    size = _square(cfg.get("size", 224))
    # open_clip reads any interpolation other than 'bilinear' as bicubic
    interpolation = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
    mode = cfg.get("resize_mode") or "shortest"
    if mode not in ("shortest", "longest", "squash"):
        raise ValueError(f"open_clip preprocess_cfg resize_mode={mode!r}: expected shortest, longest or squash")
    if mode == "shortest" and size[0] != size[1]:
        interpolation = "bicubic"  # open_clip's keep-ratio resize for non-square sizes is always bicubic
    mean, std = (
        tuple(float(v) for v in cfg[k]) if isinstance(cfg[k], (list, tuple)) else (float(cfg[k]),) * 3
        for k in ("mean", "std")
    )
    fill = cfg.get("fill_color", 0)
    fill = tuple(int(v) for v in fill) if isinstance(fill, (list, tuple)) else (int(fill),)
    return ImagePreprocess(size, mode, size, interpolation, mean, std, fill, convert_first=False)


def timm_preprocess(data_config: dict) -> ImagePreprocess:
    """timm's eval transform (`create_transform(**resolve_data_config(...))`) for a model's data config, after
    the RGB conversion timm's datasets do when they open an image."""
    size = _square(tuple(data_config["input_size"])[-2:])
    crop_pct = data_config.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT
    resize_to = (math.floor(size[0] / crop_pct), math.floor(size[1] / crop_pct))
    crop_mode = data_config.get("crop_mode") or "center"
    modes = {"center": "shortest", "squash": "squash", "border": "longest"}
    if crop_mode not in modes:
        raise ValueError(f"timm data config crop_mode={crop_mode!r}: expected one of {sorted(modes)}")
    interpolation = data_config.get("interpolation") or "bilinear"
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"timm data config interpolation={interpolation!r}: expected one of {_INTERPOLATIONS}")
    mean, std = tuple(float(v) for v in data_config["mean"]), tuple(float(v) for v in data_config["std"])
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"timm data config mean={mean} std={std}: only 3-channel (RGB) backbones are implemented")
    fill = tuple(round(255 * v) for v in mean)  # timm pads "border" crops with the mean colour
    return ImagePreprocess(size, modes[crop_mode], resize_to, interpolation, mean, std, fill, convert_first=True)


def _check_local_name(spec: str, name: str) -> None:
    """Only the libraries' built-in model names: a hub id, URL or path would download or read files here."""
    if not name or any(c in name for c in ":/\\") or name.startswith("."):
        raise ValueError(
            f"visual_backbone={spec!r}: expected a built-in model name ('open_clip:ViT-L-14', "
            "'timm:vit_base_patch16_224', optionally '.<pretrained tag>'); hub ids ('hf-hub:'), URLs and paths are "
            "refused because nothing may be downloaded: convert the weights with scripts/convert_visual_weights.py "
            "and point visual_weights at the file"
        )


def create_backbone(spec: str, kwargs: dict | None = None) -> tuple[nn.Module, ImagePreprocess]:
    """Build "open_clip:<model>[.<tag>]" or "timm:<model>[.<tag>]" with random weights (nothing downloaded) and
    return it with the library's own preprocessing for it. The tag (a pretrained weights name, e.g.
    'open_clip:ViT-B-16-SigLIP.webli', 'timm:vit_base_patch16_clip_224.openai') selects that release's
    preprocessing from the library's registry; its weights still come from `visual_weights`. `kwargs` override
    the model config (tiny test backbones)."""
    kind, _, name = spec.partition(":")
    kwargs = dict(kwargs or {})
    if kind not in ("open_clip", "timm"):
        raise ValueError(f"visual_backbone={spec!r}: expected 'open_clip:<model>' or 'timm:<model>'")
    _check_local_name(spec, name)
    if kind == "open_clip":
        return _open_clip_backbone(spec, name, kwargs)
    return _timm_backbone(spec, name, kwargs)


def _build(spec: str, kwargs: dict, create, *args, **kw) -> nn.Module:
    try:
        return create(*args, **kw, **kwargs)
    except Exception as e:  # the library's own error for a bad override (TypeError, AssertionError, ...)
        raise ValueError(
            f"visual_backbone={spec!r} with visual_kwargs={kwargs}: the library cannot build it "
            f"({type(e).__name__}: {e}); fix visual_kwargs"
        ) from e


def _open_clip_backbone(spec: str, name: str, kwargs: dict) -> tuple[nn.Module, ImagePreprocess]:
    import open_clip
    from open_clip.transform import merge_preprocess_dict

    model_name, _, tag = name.partition(".")
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(
            f"visual_backbone={spec!r}: open_clip has no model {model_name!r} (open_clip.list_models() names them)"
        )
    if "hf_model_name" in config.get("text_cfg", {}):  # its text tower's config would come from the hub
        raise ValueError(
            f"visual_backbone={spec!r}: this CLIP's text tower is a Hugging Face model whose config would be "
            "downloaded; choose an open_clip model with a built-in text tower"
        )
    force = {}
    if tag:
        tag_cfg = open_clip.get_pretrained_cfg(model_name, tag)
        if not tag_cfg:
            raise ValueError(
                f"visual_backbone={spec!r}: open_clip has no pretrained tag {tag!r} for {model_name}; its tags: "
                f"{open_clip.list_pretrained_tags_by_model(model_name)}"
            )
        quick_gelu = bool(kwargs.get("quick_gelu", config.get("quick_gelu", False)))
        if bool(tag_cfg.get("quick_gelu", False)) != quick_gelu:  # open_clip only warns: different activations
            raise ValueError(
                f"visual_backbone={spec!r}: the {tag!r} weights were trained with quick_gelu="
                f"{bool(tag_cfg.get('quick_gelu'))}, the model config has quick_gelu={quick_gelu}; use the "
                f"'{model_name}-quickgelu' model (or its plain name) that matches"
            )
        force = merge_preprocess_dict({}, tag_cfg)
    model = _build(
        spec,
        kwargs,
        open_clip.create_model,
        model_name,
        pretrained=None,
        pretrained_image=False,
        pretrained_text=False,
        force_preprocess_cfg=force,
    )
    tower = model.visual
    tower.output_tokens = True  # (pooled, patch tokens)
    return tower, open_clip_preprocess(tower.preprocess_cfg)


def _timm_backbone(spec: str, name: str, kwargs: dict) -> tuple[nn.Module, ImagePreprocess]:
    import timm
    from timm.data import resolve_data_config

    if not timm.is_model(name):
        raise ValueError(f"visual_backbone={spec!r}: timm has no model {name!r} (timm.list_models() names them)")
    tower = _build(spec, kwargs, timm.create_model, name, pretrained=False, num_classes=0)
    # An img_size override is the model's real input size; timm's own override path for the data config.
    size = kwargs.get("img_size")
    overrides = {} if size is None else {"input_size": (3, *_square(size))}
    return tower, timm_preprocess(resolve_data_config(overrides, model=tower))


class ImageMarkers(nn.Module):
    """Learnable begin/end-of-image embeddings around the image tokens."""

    init_when_missing = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.begin = nn.Parameter(torch.empty(dim))
        self.end = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.begin.is_meta:
            for t in (self.begin, self.end):  # like a token embedding row, at the scale of the projection
                init_sharded_(t, normal_fill(0.02), shard_dim=None, rank=0, world_size=1)


class Dense(nn.Module):
    """A full-precision linear with its own init (nn.Linear's distribution, zero bias), new to any checkpoint."""

    init_when_missing = True

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        bound = 1 / math.sqrt(self.weight.shape[1])
        init_sharded_(self.weight, uniform_fill(bound), shard_dim=None, rank=0, world_size=1)
        with torch.no_grad():
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class Projection(nn.Module):
    """Visual features [.., in_dim] -> LLM width [.., dim]: one linear, or a 2-layer GELU MLP."""

    def __init__(self, in_dim: int, dim: int, kind: str = "mlp") -> None:
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"visual_proj={kind!r}: expected 'linear' or 'mlp'")
        self.fc1 = Dense(in_dim, dim)
        self.fc2 = Dense(dim, dim) if kind == "mlp" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(F.gelu(x)) if self.fc2 is not None else x


class VisualEncoder(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.mode = args.visual_mode
        if self.mode not in ("tokens", "prefix"):
            raise ValueError(f"visual_mode={self.mode!r}: expected 'tokens' or 'prefix'")
        if self.mode == "prefix" and (args.adapter_len <= 0 or args.adapter_layers <= 0):
            raise ValueError("visual_mode='prefix' feeds the LLaMA-Adapter prompts: set adapter_len and adapter_layers")
        # Built for real, fp32, whatever meta_init says: it brings its own weights (loaded by the build).
        with real_init(torch.float32):
            self.backbone, self.preprocess = create_backbone(args.visual_backbone, args.visual_kwargs)
        self.backbone.requires_grad_(args.visual_trainable)
        with torch.no_grad(), real_init(torch.float32):
            probe = torch.zeros(1, 3, *self.preprocess.size)
            pooled, tokens = self._features(probe)
        self.num_tokens = tokens.shape[1]
        self.adapter_len = args.adapter_len
        in_dim = tokens.shape[-1] if self.mode == "tokens" else pooled.shape[-1]
        self.proj = Projection(in_dim, args.dim, args.visual_proj)
        self.markers = ImageMarkers(args.dim) if self.mode == "tokens" else None

    def _features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled [B, C'], patch tokens [B, N, C]) from either backbone family."""
        if hasattr(self.backbone, "forward_features"):  # timm
            feats = self.backbone.forward_features(images)
            prefix = getattr(self.backbone, "num_prefix_tokens", 1)
            return self.backbone.forward_head(feats, pre_logits=True), feats[:, prefix:]
        pooled, tokens = self.backbone(images)  # open_clip with output_tokens
        return pooled, tokens

    def image_tokens(self) -> int:
        """How many positions an image takes in the LLM input (tokens mode), else 0."""
        return self.num_tokens + 2 if self.mode == "tokens" else 0

    def forward(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """tokens mode: [B, N + 2, dim] embeddings; prefix mode: [B, adapter_len, dim] prompt additions."""
        param = next(self.backbone.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and param.requires_grad):
            pooled, tokens = self._features(images.to(device=param.device, dtype=param.dtype))
        if self.mode == "prefix":
            return self.proj(pooled.to(dtype)).unsqueeze(1).expand(-1, self.adapter_len, -1)
        x = self.proj(tokens.to(dtype))
        b = x.shape[0]
        begin = self.markers.begin.to(dtype).expand(b, 1, -1)
        end = self.markers.end.to(dtype).expand(b, 1, -1)
        return torch.cat([begin, x, end], dim=1)
