#!/usr/bin/env bash
# GPT-3 30B on 32K-token sequences with DeepSpeed-Ulysses sequence parallelism and ZeRO-3:
# the configuration of Megatron-DeepSpeed's examples_deepspeed/sequence_parallel script of
# the same name, launched with torchrun.
#
#   bash examples_seq_parallel/ds_pretrain_gpt_30B_seq_parallel_32k.sh           # all GPUs here
#   NUM_LAYERS=8 MOCK_DATA=1 TRAIN_ITERS=10 bash ...   # a slice of the model that fits 4 GPUs
#   CPU_SMOKE=1 bash ...                               # tiny model on 2 CPU processes
#
# Memory: weights, gradients and Adam state are fp32 (16 bytes a parameter, sharded over
# all ranks by ZeRO-3), so the full 64 layers need about 480 GB across the GPUs before
# activations: use several nodes of 80 GB GPUs, or lower NUM_LAYERS (each layer is ~0.45B
# parameters). Every knob is listed in _launch_common.sh.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---- model: GPT-3 30B ----
JOB_PREFIX=gpt_30B
NUM_LAYERS=${NUM_LAYERS:-64}
HIDDEN_SIZE=${HIDDEN_SIZE:-6144}
NUM_HEADS=${NUM_HEADS:-64}
SEQ_LEN=${SEQ_LEN:-32768}
LR=${LR:-1.0e-4}
MIN_LR=${MIN_LR:-1.0e-6}
INIT_STD=${INIT_STD:-0.008}
MODEL_ARGS=() # GPT-3 style: LayerNorm, GeLU, learned absolute positions, biases

# ---- memory: parameters, gradients and optimizer state sharded; full recompute ----
ZERO_STAGE=${ZERO_STAGE:-3}
CHECKPOINT_ACTIVATIONS=${CHECKPOINT_ACTIVATIONS:-1}

# ---- tokenizer: GPT-2 BPE (50257 ids) ----
MOCK_VOCAB=50257
VOCAB_FILE=${VOCAB_FILE:-gpt2-vocab.json}
MERGE_FILE=${MERGE_FILE:-gpt2-merges.txt}
TOKENIZER_ARGS=(--tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE")

source "$HERE/_launch_common.sh"
