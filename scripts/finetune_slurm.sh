#!/usr/bin/env bash
# Fine-tune under SLURM: one task per GPU; util.dist reads SLURM_PROCID / SLURM_NTASKS / SLURM_JOB_NODELIST.
#   sbatch --nodes 2 --ntasks-per-node 8 --gpus-per-node 8 scripts/finetune_slurm.sh CKPT CONFIG TOKENIZER [options...]
# Environment (exported to the job): MP, QUANT, DATA_CONFIG, OUTPUT_DIR (shared filesystem), MASTER_PORT.
#SBATCH --job-name=lazyllama-finetune
#SBATCH --cpus-per-task=8
#SBATCH --output=slurm-%j.out
USAGE="sbatch [--nodes N --ntasks-per-node G --gpus-per-node G] scripts/finetune_slurm.sh CKPT CONFIG TOKENIZER [options...]"
# sbatch runs a copy of this file: find the repository from the submit directory
REPO_GUESS="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
source "$REPO_GUESS/scripts/common.sh" 2> /dev/null || source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_args 3 "$@"
[[ -n "${SLURM_JOB_ID:-}" ]] || usage "not inside a SLURM job: submit this script with sbatch"
check_paths "$1" "$2" "$3"
CKPT="$1" TOKENIZER="$3"
IFS=',' read -r -a CONFIGS <<< "$2"
shift 3
export MASTER_PORT="${MASTER_PORT:-29500}"
# srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05): pass it on, or each task gets one CPU
cpus=()
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then cpus=(--cpus-per-task "$SLURM_CPUS_PER_TASK"); fi

srun --kill-on-bad-exit=1 "${cpus[@]}" "$PYTHON" "$REPO/main_finetune.py" \
    --pretrained_path "$CKPT" --llama_config "${CONFIGS[@]}" --tokenizer_path "$TOKENIZER" \
    --quant "${QUANT:-none}" --model_parallel_size "${MP:-1}" \
    --data_config "${DATA_CONFIG:-$REPO/data/quickstart.yaml}" --output_dir "${OUTPUT_DIR:-out/finetune}" "$@"
