#!/usr/bin/env bash
# Fine-tune on several machines: run this same command on every node (torchrun's c10d rendezvous).
#   MASTER_ADDR=node0 NNODES=2 scripts/finetune_multinode.sh CKPT CONFIG TOKENIZER [main_finetune.py options...]
# Environment: MASTER_ADDR (required: a host every node reaches), NNODES (required), MASTER_PORT (29500),
# RDZV_ID (a job name shared by the nodes, default lazyllama), NGPUS per node (default: all), MP, QUANT,
# DATA_CONFIG, OUTPUT_DIR (on a filesystem every node sees: checkpoints are written by several nodes).
USAGE="MASTER_ADDR=HOST NNODES=N scripts/finetune_multinode.sh CKPT CONFIG TOKENIZER [main_finetune.py options...]"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_args 3 "$@"
[[ -n "${MASTER_ADDR:-}" ]] || usage "set MASTER_ADDR to the rendezvous host (e.g. the first node)"
[[ -n "${NNODES:-}" ]] || usage "set NNODES to the number of machines"
check_paths "$1" "$2" "$3"
CKPT="$1" TOKENIZER="$3"
IFS=',' read -r -a CONFIGS <<< "$2"
shift 3
ngpus="$(gpu_count)"  # an assignment: set -e stops here when no GPU is found

exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$ngpus" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-lazyllama}" \
    "$REPO/main_finetune.py" \
    --pretrained_path "$CKPT" --llama_config "${CONFIGS[@]}" --tokenizer_path "$TOKENIZER" \
    --quant "${QUANT:-none}" --model_parallel_size "${MP:-1}" \
    --data_config "${DATA_CONFIG:-$REPO/data/quickstart.yaml}" --output_dir "${OUTPUT_DIR:-out/finetune}" "$@"
