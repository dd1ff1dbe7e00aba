#!/usr/bin/env bash
# The GPU paths in one run (issue 16): about 12 minutes on one GPU at the step limits (--no-bench: under 9, so it
# fits one 10-minute device call); one summary table at the end.
#   scripts/gpu_check.sh              # on a GPU machine
#   scripts/gpu_check.sh --dry-run    # print the steps and run nothing
#   scripts/gpu_check.sh --no-bench   # leave out the 7B build (with the multiprocess step, the longest)
# Without a GPU it says so, runs the CPU halves of the GPU tests (tests/gpu/test_device_paths.py) and prints the table.
# Steps, each under its own time limit:
#   1. pytest -m gpu: every item of the issue on the device (tests/gpu/test_cuda.py and the other gpu-marked tests):
#      multimodal build + generate with an image, QLoRA steps with/without activation checkpointing, fp16 +
#      GradScaler, resume on CUDA, greedy tokens equal to the CPU's, 8-bit to("cuda"), init equal to the CPU's, the
#      idle-follower test with NCCL's timeout shortened to 5 s (needs 2 GPUs: NCCL refuses two ranks on one GPU)
#   2. the CPU suite's multiprocess tests (gloo workers) on this GPU machine: MULTIPROCESS_TESTS below
#   3. bench/build_memory.py --shape 7B --flows lazy --device cuda: peak GPU memory, peak CPU RSS, wall
# Results (junit XML, logs, bench JSON) go to $GPU_CHECK_OUT (default out/gpu-check).
USAGE="scripts/gpu_check.sh [--dry-run] [--no-bench]"
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The CPU suite's tests that start processes (run_multiprocess or torchrun); tests/gpu/test_device_paths.py checks
# that every test file using them is listed here.
MULTIPROCESS_TESTS=(
    tests/features/test_model_parallel.py
    tests/features/test_fsdp_build.py
    tests/features/test_fsdp_finetune.py
    tests/util/test_memory_bounds.py::test_fsdp_rank_grows_by_its_shard_not_the_model
    tests/features/test_fsdp_checkpoint.py
    tests/util/test_generate.py::test_model_parallel_2_decodes_the_same_on_every_rank
    tests/features/test_prequantized.py::test_model_parallel_2_round_trip_and_size_mismatch
    tests/formats/test_hf_config.py::test_tied_scaled_checkpoint_under_model_parallel_2
    tests/util/test_qlora_fsdp.py
    tests/test_main_finetune.py::test_qlora_two_processes_reduce_the_loss_and_reload_with_the_same_logits
    tests/test_main_finetune.py::test_data_parallel_ranks_hold_identical_adapters
    tests/test_main_finetune.py::test_model_parallel_ranks_hold_their_shards
    tests/test_main_finetune.py::test_fsdp_full_finetuning_matches_ddp
    tests/test_main_finetune.py::test_model_parallel_grad_norm_counts_replicated_parameters_once
    tests/test_demo.py::test_model_parallel_2_under_torchrun
    tests/formats/test_accessory.py::test_an_accessory_lora_and_bias_delta_runs_at_model_parallel_2
    tests/reference/test_train_step.py::test_clipping_under_two_processes_equals_torch_clip_grad_norm
    tests/util/test_loss.py::test_model_parallel_2_chunked_equals_plain_and_model_parallel_1
    tests/gpu/test_device_paths.py::test_demo_followers_wait_for_rank_0_longer_than_the_world_timeout
    tests/gpu/test_device_paths.py::test_test_workers_use_gloo_and_the_cpu_on_a_gpu_machine
    tests/gpu/test_device_paths.py::test_an_overflow_on_one_rank_skips_the_step_on_every_rank
)

dry_run=0 bench=1
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        --no-bench) bench=0 ;;
        -h | --help) usage ;;
        *) usage "unknown option $arg" ;;
    esac
done

OUT="${GPU_CHECK_OUT:-$REPO/out/gpu-check}"
BENCH_CKPT="${GPU_CHECK_BENCH_CKPT:-/tmp/lazyllama-bench/7B}" # written once (~13 GiB), reused by later runs
cd "$REPO"

have_gpu() {
    "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2> /dev/null
}

# step NAME LIMIT_S COMMAND...: run it under a time limit, its output in $OUT/NAME.log; never stops the script
step() {
    local name="$1" limit="$2" start rc=0
    shift 2
    if ((dry_run)); then
        echo "[$name] (limit ${limit} s) $*"
        return 0
    fi
    echo "[$name] $* (limit ${limit} s)"
    start=$SECONDS
    timeout --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    echo "$name $rc $((SECONDS - start))" >> "$OUT/steps.txt"
    tail -n 3 "$OUT/$name.log" | sed "s/^/[$name]   /"
}

if ((!dry_run)); then
    mkdir -p "$OUT"
    rm -f "$OUT"/*.xml "$OUT/steps.txt"
fi

if ((dry_run)) || have_gpu; then
    ((dry_run)) && echo "dry run: the steps on a GPU machine would be"
    step gpu 190 "$PYTHON" -m pytest -q -m gpu -rs tests --junitxml="$OUT/gpu.xml"
    step multiprocess 300 "$PYTHON" -m pytest -q -rs "${MULTIPROCESS_TESTS[@]}" --junitxml="$OUT/multiprocess.xml"
    if ((bench)); then
        step bench 210 "$PYTHON" bench/build_memory.py --shape 7B --flows lazy --device cuda --timeout 180 \
            --ckpt-dir "$BENCH_CKPT" --results-dir "$OUT/bench"
    fi
    ((dry_run)) && exit 0
else
    echo "no CUDA GPU here (torch.cuda.is_available() is False): nothing runs on a device. Running the CPU halves"
    echo "of the GPU tests instead; run this script on a GPU machine for the real check."
    step cpu-halves 300 "$PYTHON" -m pytest -q -rs tests/gpu/test_device_paths.py --junitxml="$OUT/cpu.xml"
fi

# One table: every test of the steps (the issue's item it proves), then the 7B build's numbers.
"$PYTHON" - "$OUT" << 'EOF'
import glob, json, os, sys
import xml.etree.ElementTree as ET

out = sys.argv[1]
ITEM = {  # a test name fragment -> the issue-16 item it proves
    "multimodal": "1 backbone on the device", "backbone": "1 backbone on the device",
    "idle": "2 idle followers", "follower": "2 idle followers", "control_group": "2 idle followers",
    "workers": "3 CPU suite on a GPU machine", "backend": "3 CPU suite on a GPU machine",
    "gpu_index": "4 GPU index", "local_rank": "4 GPU index",
    "gpu_count": "5 GPU count", "no_gpu": "5 GPU count", "finetune_sh": "5 GPU count", "slurm": "8 srun cpus",
    "overflow": "6 fp16 scaler", "group_scaler": "6 fp16 scaler", "qlora_steps": "6 QLoRA / checkpointing",
    "rng": "7 RNG per device", "resume": "7 resume on CUDA",
    "grad_norm": "8 clipping device", "8bit": "8 8-bit scales", "init": "8 init = CPU's",
    "greedy": "greedy = CPU's", "build_on_cuda": "build on CUDA",
}
rows = []
for xml in sorted(glob.glob(os.path.join(out, "*.xml"))):
    step = os.path.basename(xml)[:-4]
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("name")
        result = "PASS"
        for tag, word in (("failure", "FAIL"), ("error", "ERROR"), ("skipped", "skip")):
            el = case.find(tag)
            if el is not None:
                result = word
                detail = (el.get("message") or "").splitlines()[0][:70] if el.get("message") else ""
                result += f": {detail}" if detail and word == "skip" else ""
        item = next((v for k, v in ITEM.items() if k in name), "-" if step != "multiprocess" else "3 (suite)")
        rows.append((step, item, name[:70], result, f"{float(case.get('time') or 0):.1f}"))
steps = {}
if os.path.exists(os.path.join(out, "steps.txt")):
    for line in open(os.path.join(out, "steps.txt")):
        name, rc, secs = line.split()
        steps[name] = (int(rc), int(secs))
for bench in sorted(glob.glob(os.path.join(out, "bench", "*.json"))):
    for r in json.load(open(bench)).get("records", []):
        if r.get("flow") == "lazy":
            if r.get("status") == "ok":
                detail = (f"peak GPU {r.get('peak_device_memory', 0) / 2**30:.2f} GiB, peak CPU RSS "
                          f"{r['peak_rss'] / 2**30:.2f} GiB, model {r['model_bytes'] / 2**30:.2f} GiB")
                rows.append(("bench", "7B lazy build on cuda", detail, "PASS", f"{r['wall_s']:.1f}"))
            else:
                rows.append(("bench", "7B lazy build on cuda", r.get("error", "")[:70], r.get("status", "?"), "-"))
for name, (rc, secs) in steps.items():
    if rc not in (0, 5):  # 5: pytest collected nothing
        why = "timed out" if rc in (124, 137) else f"exit {rc}"
        rows.append((name, "-", f"step {why} (see {name}.log)", "FAIL", str(secs)))
print()
print("| step | item | check | result | s |")
print("|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
total = sum(s for _, s in steps.values())
failed = [r for r in rows if r[3].startswith(("FAIL", "ERROR"))]
print(f"\n{len(rows)} rows, {len(failed)} failed; steps took {total} s")
sys.exit(1 if failed else 0)
EOF
