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


class ConvertError(Exception):
    """A problem with the arguments or the input file; main prints it as one `error:` line (exit status 2)."""


def read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConvertError(f"--input {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConvertError(f"--input {path}: not a readable safetensors file ({e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a non-zip/legacy file, a pickle with code, a truncated file, not a checkpoint at all
        first = (str(e).splitlines() or [""])[0]  # torch's weights_only message runs to many lines
        raise ConvertError(
            f"--input {path}: not a checkpoint that can be read safely ({type(e).__name__}: {first}); "
            "expected a .safetensors file or a zip-format torch file of tensors"
        ) from None
    for wrapper in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"--input {path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def convert(state: dict[str, torch.Tensor], backbone: torch.nn.Module, spec: str = "") -> dict[str, torch.Tensor]:
    expected = backbone.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):  # a whole CLIP model: keep the image tower
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(("head.", "fc."))}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ConvertError(
            f"the checkpoint does not fit --backbone {spec}: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} of another shape {wrong[:3]}; "
            "is --backbone (and --kwargs) the model these weights belong to?"
        )
    backbone.load_state_dict(state, strict=True)
    return {k: v.contiguous() for k, v in backbone.state_dict().items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", required=True, help="open_clip:<model> or timm:<model> (as visual_backbone)")
    ap.add_argument("--kwargs", default="{}", help="JSON backbone config overrides (as visual_kwargs)")
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--output", type=Path, required=True)
    opts = ap.parse_args(argv)
    try:
        try:
            kwargs = json.loads(opts.kwargs)
        except json.JSONDecodeError as e:
            raise ConvertError(f"--kwargs {opts.kwargs!r}: not JSON ({e})") from None
        if not isinstance(kwargs, dict):
            raise ConvertError(f"--kwargs {opts.kwargs!r}: expected a JSON object")
        state = read_state(opts.input)  # before the build: a wrong file is reported at once
        try:
            backbone, _ = create_backbone(opts.backbone, kwargs)
        except ValueError as e:
            raise ConvertError(f"--backbone: {e}") from None
        tensors = convert(state, backbone, opts.backbone)
        _write(tensors, opts)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(tensors)} tensors to {opts.output}")
    return 0


def _write(tensors: dict[str, torch.Tensor], opts: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    tmp = opts.output.with_name(f".{opts.output.name}.{os.getpid()}.tmp")
    try:
        opts.output.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={"visual_backbone": opts.backbone, "visual_kwargs": opts.kwargs})
        os.replace(tmp, opts.output)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConvertError(f"--output {opts.output}: cannot be written ({e})") from None


if __name__ == "__main__":
    sys.exit(main())
