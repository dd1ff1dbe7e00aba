#!/usr/bin/env bash
# Fine-tune on one machine with all its GPUs (torchrun, one process per GPU).
#   scripts/finetune.sh CKPT CONFIG TOKENIZER [main_finetune.py options...]
# CONFIG: one or more JSON files, comma-separated, merged over the checkpoint's params.json
# (e.g. configs/lora_r16.json). Environment: NGPUS (default: all), MP (model parallel size, default 1),
# DATA_CONFIG (default data/quickstart.yaml), OUTPUT_DIR (default out/finetune), QUANT (default none).
USAGE="scripts/finetune.sh CKPT CONFIG TOKENIZER [main_finetune.py options...]
  e.g. NGPUS=8 QUANT=4bit scripts/finetune.sh llama-2-7b configs/lora_r16.json llama-2-7b/tokenizer.model --epochs 3"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_args 3 "$@"
check_paths "$1" "$2" "$3"
CKPT="$1" TOKENIZER="$3"
IFS=',' read -r -a CONFIGS <<< "$2"
shift 3
ngpus="$(gpu_count)"  # an assignment: set -e stops here when no GPU is found

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$ngpus" "$REPO/main_finetune.py" \
    --pretrained_path "$CKPT" --llama_config "${CONFIGS[@]}" --tokenizer_path "$TOKENIZER" \
    --quant "${QUANT:-none}" --model_parallel_size "${MP:-1}" \
    --data_config "${DATA_CONFIG:-$REPO/data/quickstart.yaml}" --output_dir "${OUTPUT_DIR:-out/finetune}" "$@"
