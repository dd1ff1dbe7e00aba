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

gpu_count() {
    if [[ -n "${NGPUS:-}" ]]; then echo "$NGPUS"; return; fi
    if command -v nvidia-smi > /dev/null; then nvidia-smi -L | wc -l; else echo 1; fi
}
