# Shared by the launch scripts (sourced, not run). Each script sets USAGE before sourcing.
# shellcheck shell=bash
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3

usage() {
    echo "usage: $USAGE" >&2
    [[ -n "${1:-}" ]] && echo "error: $1" >&2
    exit 2
}

# need_args N "$@": at least N positional arguments, and no -h/--help among the first N
need_args() {
    local n="$1"
    shift
    if [[ $# -lt $n ]]; then usage "expected $n arguments, got $#"; fi
    local a
    for a in "${@:1:$n}"; do
        if [[ "$a" == "-h" || "$a" == "--help" ]]; then usage; fi
    done
}

# check_paths CKPT CONFIG TOKENIZER: each must exist (CONFIG may be several paths separated by commas)
check_paths() {
    [[ -e "$1" ]] || usage "checkpoint not found: $1"
    local c
    IFS=',' read -r -a CONFIGS <<< "$2"
    for c in "${CONFIGS[@]}"; do [[ -f "$c" ]] || usage "config not found: $c"; done
    [[ -e "$3" ]] || usage "tokenizer not found: $3"
}

# gpu_count: how many processes this node starts, one per GPU it may use: NGPUS if set, else the devices
# CUDA_VISIBLE_DEVICES lists (CUDA stops at a -1), else nvidia-smi's GPUs (GPUs, not its MIG lines), else 1 (no
# nvidia-smi: a CPU machine). Never a silent 0: no GPU where one is expected is an error. Call it as n="$(gpu_count)"
# (an assignment, so that set -e stops the script when it fails).
gpu_count() {
    local n=0 d
    if [[ -n "${NGPUS:-}" ]]; then
        n="$NGPUS"
    elif [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        local devices=()
        IFS=',' read -r -a devices <<< "$CUDA_VISIBLE_DEVICES"
        for d in "${devices[@]}"; do
            d="${d//[[:space:]]/}"
            [[ -z "$d" || "$d" == "-1" ]] && break
            n=$((n + 1))
        done
        ((n > 0)) || usage "CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' hides every GPU; unset it, or set NGPUS"
    elif command -v nvidia-smi > /dev/null; then
        local listed
        listed="$(nvidia-smi --query-gpu=index --format=csv,noheader 2> /dev/null)" \
            || usage "nvidia-smi failed (driver not loaded?): fix it, or set NGPUS"
        n="$(grep -c '[0-9]' <<< "$listed" || true)"
        ((n > 0)) || usage "nvidia-smi lists no GPU: set NGPUS (or run on a GPU node)"
    else
        n=1
    fi
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || usage "NGPUS must be a positive integer, got '$n'"
    echo "$n"
}
