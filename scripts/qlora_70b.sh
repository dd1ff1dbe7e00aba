#!/usr/bin/env bash
# QLoRA on LLaMA-2 70B with 24 GB cards: nf4 base (each rank quantizes its own shard), LoRA r16, bf16 autocast.
# 4-bit 70B: ~37 GB of weights; model parallel 4 puts ~9.3 GB on each 24 GB card (mp 2 would leave too little for activations).
#   scripts/qlora_70b.sh CKPT CONFIG TOKENIZER [main_finetune.py options...]
# CONFIG: the LoRA config (comma-separate more JSON files), merged over the checkpoint's params.json, e.g.
#   scripts/qlora_70b.sh llama-2-70b configs/lora_r16.json llama-2-70b/tokenizer.model
# GPUs: a multiple of the model parallel size (4); NGPUS (default: all) sets it, the rest is data parallel.
USAGE="scripts/qlora_70b.sh CKPT CONFIG TOKENIZER [main_finetune.py options...]"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_args 3 "$@"
check_paths "$1" "$2" "$3"
n="$(gpu_count)"
(( n % 4 == 0 )) || usage "70b needs a multiple of 4 GPUs (model parallel 4), found $n; set NGPUS"
export QUANT=4bit MP=4 OUTPUT_DIR="${OUTPUT_DIR:-out/qlora-70b}"
# the presets first: options given after CKPT CONFIG TOKENIZER come later and win
exec "$(dirname "${BASH_SOURCE[0]}")/finetune.sh" "$1" "$2" "$3" --precision bf16 --checkpointing --max_words 512 \
    --batch_size 4 --accum_iter 4 --lr 2e-4 --min_lr 2e-5 --warmup_epochs 0.05 --clip_grad 0.3 \
    --save_iteration_interval 500 --keep_last 3 "${@:4}"
