"""Write a visual backbone's weights in the layout model/visual.py loads (one safetensors file).

    python scripts/convert_visual_weights.py --backbone open_clip:ViT-L-14 \\
        --input open_clip_pytorch_model.bin --output weights/clip-vit-l-14.safetensors

Input: a local open_clip CLIP checkpoint (the image tower's `visual.*` keys are taken, the text tower dropped),
or a timm checkpoint (the classifier head dropped), as .safetensors or a zip-format torch file (read with
weights_only=True: no pickled code runs). The result is checked by loading it into the backbone built from
--backbone (and --kwargs), then written atomically. Point the config's `visual_weights` at it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.visual import create_backbone  # noqa: E402


def read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a non-zip/legacy file, a pickle with code, a truncated file
        raise SystemExit(f"{path}: cannot be read safely ({type(e).__name__}: {e})") from None
    for wrapper in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise SystemExit(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def convert(state: dict[str, torch.Tensor], backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    expected = backbone.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):  # a whole CLIP model: keep the image tower
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(("head.", "fc."))}
    backbone.load_state_dict(state, strict=True)  # names the missing/unexpected keys if it does not fit
    return {k: v.contiguous() for k, v in backbone.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", required=True, help="open_clip:<model> or timm:<model> (as visual_backbone)")
    ap.add_argument("--kwargs", default="{}", help="JSON backbone config overrides (as visual_kwargs)")
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--output", type=Path, required=True)
    opts = ap.parse_args()
    from safetensors.torch import save_file

    backbone, _ = create_backbone(opts.backbone, json.loads(opts.kwargs))
    tensors = convert(read_state(opts.input), backbone)
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = opts.output.with_name(f".{opts.output.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"visual_backbone": opts.backbone, "visual_kwargs": opts.kwargs})
    os.replace(tmp, opts.output)
    print(f"wrote {len(tensors)} tensors to {opts.output}")


if __name__ == "__main__":
    main()
