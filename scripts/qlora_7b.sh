#!/usr/bin/env bash
# QLoRA on LLaMA-2 7B with 24 GB cards: nf4 base (each rank quantizes its own shard), LoRA r16, bf16 autocast.
# 4-bit 7B: ~3.9 GB of weights; one 24 GB card holds it with activations for 512-token batches of 4.
#   scripts/qlora_7b.sh CKPT CONFIG TOKENIZER [main_finetune.py options...]
# CONFIG: the LoRA config (comma-separate more JSON files), merged over the checkpoint's params.json, e.g.
#   scripts/qlora_7b.sh llama-2-7b configs/lora_r16.json llama-2-7b/tokenizer.model
# GPUs: a multiple of the model parallel size (1); NGPUS (default: all) sets it, the rest is data parallel.
USAGE="scripts/qlora_7b.sh CKPT CONFIG TOKENIZER [main_finetune.py options...]"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_args 3 "$@"
check_paths "$1" "$2" "$3"
n="$(gpu_count)"
(( n % 1 == 0 )) || usage "7b needs a multiple of 1 GPUs (model parallel 1), found $n; set NGPUS"
export QUANT=4bit MP=1 OUTPUT_DIR="${OUTPUT_DIR:-out/qlora-7b}"
# the presets first: options given after CKPT CONFIG TOKENIZER come later and win
exec "$(dirname "${BASH_SOURCE[0]}")/finetune.sh" "$1" "$2" "$3" --precision bf16 --checkpointing --max_words 512 \
    --batch_size 4 --accum_iter 4 --lr 2e-4 --min_lr 2e-5 --warmup_epochs 0.05 --clip_grad 0.3 \
    --save_iteration_interval 500 --keep_last 3 "${@:4}"
