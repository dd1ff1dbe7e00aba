"""Generation with an image in "prefix" mode: the visual prefix encoded once (util.generate) against once per
generated token (what decoding did before: the image went with every forward).

    python bench/visual_prefix_speed.py                       # open_clip ViT-B-32 (random weights), tiny LLM, 32 new
    python bench/visual_prefix_speed.py --backbone timm:vit_base_patch16_224 --new-tokens 64

Both run greedy decoding with the KV cache from the same prompt and image (batch 1, fp32, CPU unless --device);
the table gives the best of --repeat wall times (and the same generation without an image, for scale) and checks
that both produce the same tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def per_token_encoding(model, prompt, images, new_tokens):
    """The former decoding loop: images passed to every forward, so the encoder runs once per step."""
    import torch

    with torch.inference_mode():
        tokens = list(prompt)
        model.setup_cache(1, len(prompt) + new_tokens)
        logits = model(torch.tensor([tokens]), start_pos=0, images=images)[:, -1]
        for pos in range(len(prompt), len(prompt) + new_tokens):
            tokens.append(int(logits.argmax(-1)))
            if len(tokens) == len(prompt) + new_tokens:
                break
            logits = model(torch.tensor([tokens[pos:]]), start_pos=pos, images=images)[:, -1]
    return tokens[len(prompt) :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="open_clip:ViT-B-32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")
    opts = ap.parse_args()
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)

    from model.args import preset
    from util.build import build_model
    from util.generate import SamplingParams, generate

    args = preset(
        "tiny", vocab_size=512, visual_backbone=opts.backbone, visual_mode="prefix", adapter_len=4, adapter_layers=2
    )
    torch.manual_seed(0)
    model, _ = build_model(args, None, dtype=torch.float32, device=opts.device)
    for name, p in model.named_parameters():  # open the zero-initialized gates: the image changes the answer
        if "gate" in name:
            p.data.fill_(0.5)
    model.eval()
    size = model.visual.preprocess.size
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1)).to(opts.device)
    prompt = [1, 17, 42, 99, 7, 3, 250, 11]
    params = SamplingParams(max_new_tokens=opts.new_tokens)

    def cached():
        return generate(model, [prompt], params, images=images)[0]

    def recomputed():
        return per_token_encoding(model, prompt, images, opts.new_tokens)

    def text_only():
        return generate(model, [prompt], params)[0]

    rows = {}
    runs = (
        ("prefix once (util.generate)", cached),
        ("prefix every step (before)", recomputed),
        ("no image", text_only),
    )
    for name, fn in runs:
        out = fn()  # warm-up
        times = []
        for _ in range(opts.repeat):
            if opts.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if opts.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rows[name] = (min(times), out)
    (t_once, once), (t_every, every), _ = rows.values()
    threads = torch.get_num_threads()
    where = f"{opts.device} ({threads} threads)"
    print(f"{opts.backbone}, tiny LLM, {opts.new_tokens} new tokens, {where}, best of {opts.repeat}")
    print("| decoding | wall s | tokens/s |\n|---|---|---|")
    for name, (t, _) in rows.items():
        print(f"| {name} | {t:.3f} | {opts.new_tokens / t:.1f} |")
    print(f"speedup {t_every / t_once:.1f}x; same tokens: {once == every}")
    if once != every:
        sys.exit("the two decodings disagree")


if __name__ == "__main__":
    main()
