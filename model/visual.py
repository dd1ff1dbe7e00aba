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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.args import ModelArgs
from model.init import real_init
from model.layers.parallel import init_sharded_, normal_fill, uniform_fill


def create_backbone(spec: str, kwargs: dict | None = None) -> tuple[nn.Module, dict]:
    """Build "open_clip:<model>" or "timm:<model>" with random weights (no download) and return it with its
    preprocessing config {size, mean, std}. `kwargs` override the model config (tiny test backbones)."""
    kind, _, name = spec.partition(":")
    kwargs = dict(kwargs or {})
    if kind == "open_clip":
        import open_clip

        model = open_clip.create_model(name, pretrained=None, **kwargs)
        tower = model.visual
        tower.output_tokens = True  # (pooled, patch tokens)
        cfg = tower.preprocess_cfg
        size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
        return tower, {"size": int(size), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
    if kind == "timm":
        import timm

        tower = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        cfg = tower.pretrained_cfg
        size = kwargs.get("img_size", cfg.get("input_size", (3, 224, 224))[-1])
        return tower, {"size": int(size), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
    raise ValueError(f"visual_backbone={spec!r}: expected 'open_clip:<model>' or 'timm:<model>'")


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
            probe = torch.zeros(1, 3, self.preprocess["size"], self.preprocess["size"])
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
