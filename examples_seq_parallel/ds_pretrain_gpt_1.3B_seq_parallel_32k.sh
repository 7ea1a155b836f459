#!/usr/bin/env bash
# GPT-3 XL (1.3B) on 32K-token sequences with DeepSpeed-Ulysses sequence parallelism: the
# configuration of Megatron-DeepSpeed's examples_deepspeed/sequence_parallel script of the
# same name, launched with torchrun.
#
#   bash examples_seq_parallel/ds_pretrain_gpt_1.3B_seq_parallel_32k.sh          # all GPUs here
#   MOCK_DATA=1 TRAIN_ITERS=20 bash examples_seq_parallel/ds_pretrain_gpt_1.3B_seq_parallel_32k.sh
#   SP_SIZE=4 bash ...            # 8 GPUs as SP 4 x DP 2
#   PRECISION=fp16 bash ...       # Megatron-DeepSpeed's example precision (default: bf16 where supported)
#   CPU_SMOKE=1 bash ...          # tiny model on 2 CPU processes: checks the flag set
#
# Real data: DATA_PATH (prefix written by tools/preprocess_data.py), VOCAB_FILE and
# MERGE_FILE (GPT-2 BPE). Every knob is listed in _launch_common.sh.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---- model: GPT-3 XL; init std ~ sqrt(1 / (3 * hidden)) (MT-NLG's heuristic) ----
JOB_PREFIX=gpt_1.3B
NUM_LAYERS=${NUM_LAYERS:-24}
HIDDEN_SIZE=${HIDDEN_SIZE:-2048}
NUM_HEADS=${NUM_HEADS:-16}
SEQ_LEN=${SEQ_LEN:-32768}
LR=${LR:-2.0e-4}
MIN_LR=${MIN_LR:-1.0e-6}
INIT_STD=${INIT_STD:-0.013}
MODEL_ARGS=() # GPT-3 style: LayerNorm, GeLU, learned absolute positions, biases

# ---- memory: activation recompute and ZeRO stage ----
ZERO_STAGE=${ZERO_STAGE:-1}
CHECKPOINT_ACTIVATIONS=${CHECKPOINT_ACTIVATIONS:-1}

# ---- tokenizer: GPT-2 BPE (50257 ids) ----
MOCK_VOCAB=50257
VOCAB_FILE=${VOCAB_FILE:-gpt2-vocab.json}
MERGE_FILE=${MERGE_FILE:-gpt2-merges.txt}
TOKENIZER_ARGS=(--tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE")

source "$HERE/_launch_common.sh"
