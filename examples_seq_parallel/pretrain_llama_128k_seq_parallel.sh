#!/usr/bin/env bash
# A Llama-style 1B model (the shape of Llama 3.2 1B) on 128K-token sequences with
# DeepSpeed-Ulysses sequence parallelism, full activation recompute and ZeRO-3.
#
#   MOCK_DATA=1 TRAIN_ITERS=20 bash examples_seq_parallel/pretrain_llama_128k_seq_parallel.sh
#   DATA_PATH=data/corpus_text_document TOKENIZER_MODEL=llama3/tokenizer.json bash ...
#   SP_SIZE=4 bash ...            # 8 GPUs as SP 4 x DP 2
#   CPU_SMOKE=1 bash ...          # tiny model on 2 CPU processes: checks the flag set
#
# Style: RMSNorm, SwiGLU, RoPE with theta 500000, grouped-query attention (32 query heads
# share 8 key/value heads), no linear biases, untied input/output embeddings. With SP
# larger than the 8 K/V heads, each rank gets a copy of the K/V head its queries use.
# Each GPU holds 131072 / SP tokens of every sequence. Every knob is in _launch_common.sh.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---- model ----
JOB_PREFIX=llama_1B
NUM_LAYERS=${NUM_LAYERS:-16}
HIDDEN_SIZE=${HIDDEN_SIZE:-2048}
NUM_HEADS=${NUM_HEADS:-32}
NUM_KV_HEADS=${NUM_KV_HEADS:-8}
FFN_HIDDEN_SIZE=${FFN_HIDDEN_SIZE:-8192}
SEQ_LEN=${SEQ_LEN:-131072}
LR=${LR:-3.0e-4}
MIN_LR=${MIN_LR:-3.0e-5}
INIT_STD=${INIT_STD:-0.02}
MODEL_ARGS=(
    --normalization RMSNorm --norm-epsilon 1e-5 --swiglu
    --position-embedding-type rope --rotary-base 500000
    --disable-bias-linear --untie-embeddings-and-output-weights
    --attention-dropout 0 --hidden-dropout 0
)

# ---- memory: full recompute (Megatron-LM's spelling) and ZeRO-3 ----
ZERO_STAGE=${ZERO_STAGE:-3}
CHECKPOINT_ACTIVATIONS=${CHECKPOINT_ACTIVATIONS:-1}
RECOMPUTE_FLAGS=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1)

# ---- tokenizer: a Hugging Face tokenizer.json (Llama 3: 128256 ids) ----
MOCK_VOCAB=128255 # NullTokenizer adds the end-of-document id: 128256 in all
TOKENIZER_MODEL=${TOKENIZER_MODEL:-tokenizer.json}
TOKENIZER_ARGS=(--tokenizer-type HFTokenizer --tokenizer-model "$TOKENIZER_MODEL")

source "$HERE/_launch_common.sh"
