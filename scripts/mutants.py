"""Mutation check: put one small bug at a time into the code, run the tests that should notice, put the code back.

    python scripts/mutants.py              # all mutants (make mutants); ~10-20 minutes on 2 cores
    python scripts/mutants.py -k clip      # those whose name contains "clip"
    python scripts/mutants.py --list

Each mutant is (name, file, old text, new text, tests). The old text must occur exactly once in the file (else the
mutant is out of date with the code: reported as STALE, and the run fails). A mutant is "caught" when its tests fail
and "missed" when they pass. The file is always restored: in a `finally`, on Ctrl-C and on SIGTERM; a run killed
harder leaves a backup in .mutants-backup/ that the next run restores first. Exit status 1 if any mutant is
missed or stale. Not part of `make test` (slow).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BACKUP = REPO / ".mutants-backup"

TRAIN_REF = "tests/reference/test_train_step.py"
ROPE_INIT = "tests/reference/test_rope_and_init.py"
MEMORY = "tests/util/test_memory_bounds.py"
FSDP_BUILD = "tests/features/test_fsdp_build.py"
LEAN = "tests/model/test_lean.py"
HF_CONFIG = "tests/formats/test_hf_config.py"  # rope scaling against transformers' logits (h-cfg's tests)


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments (paths, node ids, -k expressions)


MUTANTS = [
    # --- the training step (the four the issue found untested) ---
    Mutant(
        "targets not shifted (position t predicts token t)",
        "util/loss.py",
        "    targets = labels[:, 1:].reshape(-1)\n    h = hidden[:, :-1]",
        "    targets = labels[:, :-1].reshape(-1)\n    h = hidden[:, :-1]",
        (TRAIN_REF, "-k", "loss_and_every"),
    ),
    Mutant(
        "loss divided by the batch size, not the step's labelled tokens",
        "util/train.py",
        "        return loss_sum / max(step_targets, 1)",
        "        return loss_sum / tokens.shape[0]",
        (TRAIN_REF, "-k", "loss_and_every"),
    ),
    Mutant(
        "each micro-batch divided by its own labelled tokens (accumulation is not one batch)",
        "util/train.py",
        "        return loss_sum / max(step_targets, 1)",
        "        return loss_sum / max(int((labels[:, 1:] != -100).sum()), 1)",
        (TRAIN_REF, "-k", "loss_and_every"),
    ),
    Mutant(
        "clipping skipped in the step (the norm still measured)",
        "util/train.py",
        "norm = clip_grad_norm_(self.params, self.cfg.clip_grad, mp=self.mp, dp_sharded=dp_sharded, device=",
        "norm = clip_grad_norm_(self.params, 0.0, mp=self.mp, dp_sharded=dp_sharded, device=",
        (TRAIN_REF, "-k", "adamw"),
    ),
    Mutant(
        "the plain loss (the chunked loss's reference) not shifted",
        "util/loss.py",
        "    targets = labels[:, 1:].reshape(-1)\n    loss = F.cross_entropy(",
        "    targets = labels[:, :-1].reshape(-1)\n    loss = F.cross_entropy(",
        ("tests/util/test_loss.py",),
    ),
    Mutant(
        "a chunk of the loss dropped when the rows do not divide evenly",
        "util/loss.py",
        "    for start in range(0, n, rows):",
        "    for start in range(0, n - rows + 1, rows):",
        ("tests/util/test_loss.py",),
    ),
    Mutant(
        "the logged loss is the mean of the micro-batch losses, not the back-propagated sum",
        "util/train.py",
        "            total += loss.detach().double()",
        "            total += loss.detach().double() / len(micro_batches)",
        (TRAIN_REF, "-k", "loss_and_every"),
    ),
    Mutant(
        "gradients synchronized on the first micro-step, not the last",
        "util/train.py",
        "with self._sync_gradients(i == len(micro_batches) - 1):",
        "with self._sync_gradients(i == 0):",
        (TRAIN_REF, "-k", "data-parallel-2"),
    ),
    Mutant(
        "the logged loss summed over data-parallel ranks, not averaged",
        "util/train.py",
        "return float(both[0]) / self.pos.data_parallel_size, float(both[1])",
        "return float(both[0]), float(both[1])",
        (TRAIN_REF, "-k", "data-parallel-2"),
    ),
    Mutant(
        "clip norm: split gradients not summed across model parallel",
        "util/train.py",
        "    if mp_size > 1:\n        dist.all_reduce(split, group=mp)",
        "    if False:\n        dist.all_reduce(split, group=mp)",
        (TRAIN_REF, "-k", "model-parallel-2"),
    ),
    Mutant(
        "clip norm: replicated gradients counted once per model-parallel rank",
        "util/train.py",
        "        if dim is not None and mp_size > 1:\n            split += sq",
        "        if mp_size > 1:\n            split += sq",
        (TRAIN_REF, "-k", "model-parallel-2"),
    ),
    Mutant(
        "clip: scaled by max_norm / norm squared",
        "util/train.py",
        "        coef = max_norm / (total + 1e-6)",
        "        coef = max_norm / (total + 1e-6) ** 2",
        (TRAIN_REF, "-k", "adamw"),
    ),
    Mutant(
        "AdamW betas (0.9, 0.999) instead of the configured (0.9, 0.95)",
        "util/train.py",
        "lr=cfg.lr, betas=(0.9, 0.95))",
        "lr=cfg.lr, betas=(0.9, 0.999))",
        (TRAIN_REF, "-k", "adamw"),
    ),
    Mutant(
        "no weight decay on matrices",
        "util/train.py",
        '        {"params": decay, "weight_decay": weight_decay},',
        '        {"params": decay, "weight_decay": 0.0},',
        (TRAIN_REF, "-k", "adamw"),
    ),
    # --- model ---
    Mutant(
        "rope_theta not passed to the rotary embedding",
        "model/llama.py",
        "RotaryEmbedding(args.head_dim, args.max_seq_len, args.rope_theta, args.rope_scaling_params)",
        "RotaryEmbedding(args.head_dim, args.max_seq_len, scaling=args.rope_scaling_params)",
        (ROPE_INIT, "-k", "rope_theta"),
    ),
    Mutant(
        "rope scaling not passed to the rotary embedding",
        "model/llama.py",
        "RotaryEmbedding(args.head_dim, args.max_seq_len, args.rope_theta, args.rope_scaling_params)",
        "RotaryEmbedding(args.head_dim, args.max_seq_len, args.rope_theta, None)",
        (HF_CONFIG, "-k", "transformers5"),
    ),
    Mutant(
        "linear rope scaling ignored",
        "model/layers/rope.py",
        '        return inv_freq / float(scaling["factor"])',
        "        return inv_freq",
        (HF_CONFIG, "-k", "transformers5"),
    ),
    Mutant(
        "llama3 rope scaling: long wavelengths not interpolated",
        "model/layers/rope.py",
        "            wavelen > context / low, inv_freq / factor,",
        "            wavelen > context / low, inv_freq,",
        (HF_CONFIG, "-k", "transformers5"),
    ),
    Mutant(
        "dynamic rope scaling: the base grows without the head_dim exponent",
        "model/layers/rope.py",
        "        theta = theta * (factor * seq_len / original - (factor - 1)) ** (head_dim / (head_dim - 2))",
        "        theta = theta * (factor * seq_len / original - (factor - 1))",
        (HF_CONFIG, "-k", "dynamic"),
    ),
    Mutant(
        "rope rotates the other way",
        "model/layers/rope.py",
        "out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)",
        "out = torch.stack((x0 * cos + x1 * sin, -x0 * sin + x1 * cos), dim=-1)",
        (ROPE_INIT, "-k", "rope_theta"),
    ),
    Mutant(
        "GQA: key/value heads tiled instead of each serving its group",
        "model/llama.py",
        "        q = q.transpose(1, 2)\n",
        "        q = q.transpose(1, 2)\n        k, v = k.repeat(1, 1, self.n_rep, 1), v.repeat(1, 1, self.n_rep, 1)\n",
        (TRAIN_REF, "-k", "logits"),
    ),
    Mutant(
        "LoRA dropout: backward draws another mask than forward",
        "model/layers/lean.py",
        "        noise = _noise(x, ctx.p, ctx.seed)",
        "        noise = _noise(x, ctx.p, ctx.seed + 1)",
        (TRAIN_REF, "-k", "dropout"),
    ),
    Mutant(
        "LoRA dropout: kept elements not scaled by 1 / (1 - p)",
        "model/layers/lean.py",
        "    return keep.mul_(_WORD / (_WORD - drop)).to(x.dtype).view(x.shape)",
        "    return keep.to(x.dtype).view(x.shape)",
        (LEAN, "-k", "mean"),
    ),
    Mutant(
        "recompute: backward runs without the forward's autocast",
        "model/layers/lean.py",
        "torch.autocast(device, dtype=dtype, enabled=enabled)",
        "torch.autocast(device, dtype=dtype, enabled=False)",
        (LEAN, "-k", "autocast"),
    ),
    Mutant(
        "RMSNorm keeps its fp32 copy for backward again",
        "model/layers/norm.py",
        "        return recompute(self._normalize, x, self.weight)",
        "        return self._normalize(x, self.weight)",
        (LEAN, "-k", "keeps"),
    ),
    Mutant(
        "LoRA scale alpha / sqrt(r) instead of alpha / r",
        "model/peft.py",
        "        self.scale = alpha / rank",
        "        self.scale = alpha / math.sqrt(rank)",
        (TRAIN_REF, "-k", "logits"),
    ),
    Mutant(
        "HF q/k permutation applied instead of undone on reading",
        "util/checkpoint/names.py",
        "    return w.reshape(n_heads, 2, head_dim // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)",
        "    return w.reshape(n_heads, head_dim // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)",
        (TRAIN_REF, "-k", "logits"),
    ),
    # --- init ---
    Mutant(
        "the per-module init seed ignored (every module seeded alike)",
        "util/lazy_init.py",
        "        torch.manual_seed(module_seed(self.seed, mp.name))",
        "        torch.manual_seed(self.seed)",
        (ROPE_INIT, "-k", "share"),
    ),
    Mutant(
        "the per-weight seed of quantized linears ignored",
        "util/lazy_init.py",
        "            torch.manual_seed(module_seed(self.seed, weight.key))\n            packed = module.quantize(",
        "            torch.manual_seed(self.seed)\n            packed = module.quantize(",
        (ROPE_INIT, "-k", "quantized_linears"),
    ),
    Mutant(
        "linear init bound from the output size",
        "model/layers/parallel.py",
        "            linear_weight_fill(self.in_features),",
        "            linear_weight_fill(self.out_features),",
        (ROPE_INIT, "-k", "uniform"),
    ),
    # --- memory and the build's checks ---
    Mutant(
        "no page release on the quantize-on-arrival path",
        "util/lazy_init.py",
        "            weight.source.release(weight.key)\n            self.report.loaded += 1\n        else:\n"
        "            torch.manual_seed(module_seed(self.seed, weight.key))\n            packed",
        "            self.report.loaded += 1\n        else:\n"
        "            torch.manual_seed(module_seed(self.seed, weight.key))\n            packed",
        (MEMORY, "-k", "arrival-from-bf16"),
    ),
    Mutant(
        "no page release on the full-precision path",
        "util/lazy_init.py",
        "        tp.source.release(tp.key)\n        self.report.loaded += 1",
        "        self.report.loaded += 1",
        (MEMORY, "-k", "full-precision"),
    ),
    Mutant(
        "no malloc_trim after each module",
        "util/lazy_init.py",
        "                memory.malloc_trim()",
        "                pass",
        (MEMORY, "-k", "trim"),
    ),
    Mutant(
        "malloc_trim does nothing",
        "util/memory.py",
        "        c.malloc_trim(0)",
        "        pass",
        (MEMORY, "-k", "trim"),
    ),
    Mutant(
        "the final 'nothing left on meta' check disabled",
        "util/lazy_init.py",
        "        _check_nothing_on_meta(model)  # 4. verify",
        "        pass  # 4. verify",
        (MEMORY, "-k", "meta"),
    ),
    # --- FSDP on the lazy path: each rank its rows (tests/features/test_fsdp_build.py) ---
    Mutant(
        "FSDP init: a shard keeps the first rows of the initialized tensor, not its own",
        "util/lazy_init.py",
        "                t.to_local().copy_(getattr(mp.module, name)[a:b])",
        "                t.to_local().copy_(getattr(mp.module, name)[: b - a])",
        (FSDP_BUILD, "-k", "dp2 and not mp2"),
    ),
    Mutant(
        "FSDP load: rows counted from the start of the full tensor, not of this model-parallel slice",
        "util/checkpoint/reader.py",
        "                d, lo, hi = 0, lo + a, lo + b",
        "                d, lo, hi = 0, a, b",
        (FSDP_BUILD, "-k", "mp2"),
    ),
    Mutant(
        "FSDP: the shard's rows as ceil-chunks from the end (another placement rule)",
        "util/lazy_init.py",
        "    a, b = min(rank * per, n), min((rank + 1) * per, n)",
        "    a, b = max(n - (size - rank) * per, 0), n - (size - rank - 1) * per",
        (FSDP_BUILD, "-k", "dp4"),
    ),
    Mutant(
        "FSDP: sharded after materialization (every rank builds the whole model first, the flow before)",
        "util/build.py",
        "            shard(model)\n\n        # 4. allocate, fill (checkpoint or reset_parameters), quantize, release: "
        "one tensor at a time\n        report = materialize_and_load(model, readers, device=device, seed=seed, "
        "strict=strict)\n",
        "            pass\n\n        report = materialize_and_load(model, readers, device=device, seed=seed, "
        "strict=strict)\n        if shard is not None:\n            shard(model)\n",
        (MEMORY, "-k", "fsdp"),
    ),
    Mutant(
        "QLoRA under FSDP: a shard keeps the first rows of the codes, not its own",
        "util/lazy_init.py",
        "        shard.to_local().copy_(codes[a:b])",
        "        shard.to_local().copy_(codes[: b - a])",
        (FSDP_BUILD, "-k", "4bit"),
    ),
    Mutant(
        "data parallel: each rank divides by its own labelled tokens (a mean of per-rank means)",
        "util/train.py",
        "        return float(total) / self.pos.data_parallel_size",
        "        return local_targets",
        (TRAIN_REF, "-k", "data-parallel-2"),
    ),
    Mutant(
        "finiteness checked in the first chunk only",
        "util/lazy_init.py",
        "    for lo in range(0, flat.numel(), chunk):",
        "    for lo in range(0, min(flat.numel(), chunk), chunk):",
        ("tests/util/test_lazy_init_finite.py",),
    ),
    Mutant(
        "finiteness: only the minimum looked at (+Inf passes)",
        "util/quant.py",
        "        return math.isfinite(float(low)) and math.isfinite(float(high))",
        "        return math.isfinite(float(low))",
        ("tests/util/test_lazy_init_finite.py",),
    ),
    Mutant(
        "a pre-quantized checkpoint wins over a later full-precision one",
        "util/lazy_init.py",
        "                packed = None  # a later checkpoint holds it in full precision",
        "                full = None",
        ("tests/features/test_prequantized.py", "-k", "later_full"),
    ),
    # --- config and files ---
    Mutant(
        "config rule: user config files under the checkpoints' configs",
        "util/build.py",
        'args = ModelArgs.from_dict(read_config_json(path, what="--llama_config"), source=str(path), base=args)',
        'args = ModelArgs.from_dict({**read_config_json(path, what="--llama_config"), **(args.to_dict() if args '
        "else {})}, source=str(path))",
        ("tests/util/test_cli.py", "-k", "config_rule"),
    ),
    Mutant(
        "config rule: checkpoints' configs merged last first",
        "util/build.py",
        "    for reader in readers:\n        if reader.config:",
        "    for reader in reversed(readers):\n        if reader.config:",
        ("tests/util/test_cli.py", "tests/util/test_config_order.py"),
    ),
    Mutant(
        "atomic_write leaves its temp file when the write fails",
        "util/checkpoint/files.py",
        "        tmp.unlink(missing_ok=True)\n        raise",
        "        raise",
        ("tests/util/checkpoint/test_files.py",),
    ),
    Mutant(
        "publish_dir copies instead of renaming (a partial directory is visible)",
        "util/checkpoint/files.py",
        "    os.replace(tmp, final)\n    fsync_dir(final.parent)",
        "    shutil.copytree(tmp, final)\n    fsync_dir(final.parent)",
        ("tests/util/checkpoint/test_files.py",),
    ),
    Mutant(
        "truncation keeps the end instead of the beginning",
        "util/data.py",
        "    return tokens[:max_words], labels[:max_words]",
        "    return tokens[-max_words:], labels[-max_words:]",
        ("tests/util/test_data.py", "-k", "truncat"),
    ),
]


def _restore_leftovers() -> None:
    """A run killed without cleanup (SIGKILL) left its backup: put the original back first."""
    if not BACKUP.is_dir():
        return
    for saved in BACKUP.rglob("*"):
        if saved.is_file():
            target = REPO / saved.relative_to(BACKUP)
            shutil.copyfile(saved, target)
            print(f"restored {target.relative_to(REPO)} from an interrupted run", file=sys.stderr)
    shutil.rmtree(BACKUP)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_one(m: Mutant, timeout: float) -> tuple[str, float]:
    path = REPO / m.file
    original = path.read_text()
    if original.count(m.old) != 1:
        return f"STALE (old text found {original.count(m.old)} times)", 0.0
    saved = BACKUP / m.file
    saved.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, saved)
    t0 = time.perf_counter()
    try:
        path.write_text(original.replace(m.old, m.new))
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests]
        try:
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "caught (timeout)", time.perf_counter() - t0
        if done.returncode == 0:
            return "MISSED", time.perf_counter() - t0
        if done.returncode in (1,):
            return "caught", time.perf_counter() - t0
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        return f"ERROR (pytest exit {done.returncode}: {' | '.join(tail)})", time.perf_counter() - t0
    finally:
        path.write_text(original)
        shutil.rmtree(BACKUP, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="only mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant's tests")
    opts = parser.parse_args()
    chosen = [m for m in MUTANTS if opts.k.lower() in m.name.lower()]
    if opts.list:
        for m in chosen:
            print(f"{m.name}  [{m.file}]  -> {' '.join(m.tests)}")
        return 0
    _restore_leftovers()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    rows = []
    try:
        for i, m in enumerate(chosen, 1):
            print(f"[{i}/{len(chosen)}] {m.name} ...", end=" ", flush=True)
            result, seconds = run_one(m, opts.timeout)
            print(f"{result} ({seconds:.0f} s)", flush=True)
            rows.append((m, result))
    except KeyboardInterrupt:
        print("\ninterrupted: the file under mutation was restored", file=sys.stderr)
        return 130
    width = max(len(m.name) for m, _ in rows) if rows else 10
    print(f"\n{'mutant':<{width}}  {'file':<26}  result")
    for m, result in rows:
        print(f"{m.name:<{width}}  {m.file:<26}  {result}")
    bad = [r for _, r in rows if not r.startswith("caught")]
    print(f"\n{len(rows) - len(bad)} caught, {len(bad)} missed or stale/error, of {len(rows)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
