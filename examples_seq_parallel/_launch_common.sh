# Shared tail of the example launch scripts (sourced, not run): applies the environment
# knobs to the model the caller described, writes the DeepSpeed-style JSON config, checks
# the inputs and launches pretrain_gpt.py with torchrun.
#
# The caller sets HERE, JOB_PREFIX, NUM_LAYERS, HIDDEN_SIZE, NUM_HEADS, SEQ_LEN, LR, MIN_LR,
# INIT_STD, ZERO_STAGE, CHECKPOINT_ACTIVATIONS, MODEL_ARGS (array: style flags such as
# RMSNorm/SwiGLU), MOCK_VOCAB (NullTokenizer vocabulary for MOCK_DATA=1), TOKENIZER_ARGS
# (array, real data) and optionally NUM_KV_HEADS, FFN_HIDDEN_SIZE, RECOMPUTE_FLAGS (array).
#
# Environment knobs (all optional):
#   GPUS_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT   launch layout
#   SP_SIZE         Ulysses degree [GPUS_PER_NODE]; data parallel = world / SP_SIZE
#   MICRO_BATCH [1]  GLOBAL_BATCH [MICRO_BATCH x data-parallel size]
#   TRAIN_ITERS     stop after this many iterations (else --train-samples as in Megatron-DeepSpeed's example)
#   TRAIN_TOKENS LR_WARMUP_TOKENS LR_DECAY_TOKENS   token-based schedule
#   ZERO_STAGE  CHECKPOINT_ACTIVATIONS (1/0)  ATTN (flash | triton | classic)
#   PRECISION       bf16 | fp16 | fp32 [bf16 where the GPU has it, else fp16]
#   FUSED [1; 0 with CPU_SMOKE]  1: --cross-entropy-loss-fusion --fused-residual-norm (Triton
#                   kernels on CUDA; elsewhere the unfused paths); 0: neither
#   MOCK_DATA=1     synthetic tokens: no dataset, vocabulary or tokenizer file needed
#   DATA_PATH VOCAB_FILE MERGE_FILE TOKENIZER_MODEL   real data
#   OUTPUT_DIR [output]  CHECKPOINT_PATH  TENSORBOARD_DIR  SAVE_INTERVAL  LOG_INTERVAL
#   EXTRA_ARGS      appended to the pretrain_gpt.py command line (word-split)
#   CPU_SMOKE=1     tiny model (2 layers, hidden 64, 8 heads, seq 256, vocabulary 1000),
#                   MOCK_DATA, CPU,
#                   CPU_NPROC processes [2], 3 iterations: checks that the flag set runs
#   DRY_RUN=1       print the command instead of running it
#   PYTHON [python3]

REPO=$(cd "$HERE/.." && pwd)
PYTHON=${PYTHON:-python3}

die() {
    printf 'error: %s\n' "$*" >&2
    exit 2
}

is_pos_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

CPU_SMOKE=${CPU_SMOKE:-0}
if [[ "$CPU_SMOKE" == 1 ]]; then
    # Same flag set, tiny shapes: a few seconds on CPU processes.
    NUM_LAYERS=2 HIDDEN_SIZE=64 NUM_HEADS=8 SEQ_LEN=256
    if [[ -n "${NUM_KV_HEADS:-}" ]]; then NUM_KV_HEADS=2; fi
    FFN_HIDDEN_SIZE=
    MOCK_DATA=1 MOCK_VOCAB=1000 DEVICE=cpu PRECISION=fp32
    GPUS_PER_NODE=${CPU_NPROC:-2} NNODES=1 NODE_RANK=0
    TRAIN_ITERS=${TRAIN_ITERS:-3}
    LOG_INTERVAL=${LOG_INTERVAL:-1} EVAL_ITERS=${EVAL_ITERS:-1}
    OUTPUT_DIR=${OUTPUT_DIR:-output/cpu_smoke}
    # Warm-up and decay lengths the tiny run can reach (the real ones are billions of tokens).
    LR_WARMUP_TOKENS=${LR_WARMUP_TOKENS:-256}
    LR_DECAY_TOKENS=${LR_DECAY_TOKENS:-2560}
    export OMP_NUM_THREADS=1
fi

# ---- layout ----
if [[ -z "${GPUS_PER_NODE:-}" || -z "${PRECISION:-}" ]] && [[ "$CPU_SMOKE" != 1 ]]; then
    read -r N_VISIBLE HAS_BF16 < <("$PYTHON" -c "
import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(n, int(n > 0 and torch.cuda.is_bf16_supported()))")
    GPUS_PER_NODE=${GPUS_PER_NODE:-$N_VISIBLE}
    if [[ -z "${PRECISION:-}" ]]; then
        if [[ "$HAS_BF16" == 1 ]]; then PRECISION=bf16; else PRECISION=fp16; fi
    fi
fi
DEVICE=${DEVICE:-cuda}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_PORT=${MASTER_PORT:-6000}
is_pos_int "$GPUS_PER_NODE" ||
    die "GPUS_PER_NODE=$GPUS_PER_NODE: no GPU is visible here; set GPUS_PER_NODE, or CPU_SMOKE=1 for a tiny CPU run"
is_pos_int "$NNODES" || die "NNODES=$NNODES: give a positive number of nodes"
WORLD=$((GPUS_PER_NODE * NNODES))
SP_SIZE=${SP_SIZE:-$GPUS_PER_NODE}
is_pos_int "$SP_SIZE" || die "SP_SIZE=$SP_SIZE: give a positive sequence-parallel size"
((WORLD % SP_SIZE == 0)) ||
    die "SP_SIZE=$SP_SIZE does not divide the $WORLD processes (GPUS_PER_NODE=$GPUS_PER_NODE x NNODES=$NNODES)"
DP_SIZE=$((WORLD / SP_SIZE))
MICRO_BATCH=${MICRO_BATCH:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-$((MICRO_BATCH * DP_SIZE))}
is_pos_int "$MICRO_BATCH" && is_pos_int "$GLOBAL_BATCH" ||
    die "MICRO_BATCH=$MICRO_BATCH GLOBAL_BATCH=$GLOBAL_BATCH: give positive numbers"
((GLOBAL_BATCH % (MICRO_BATCH * DP_SIZE) == 0)) ||
    die "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of MICRO_BATCH=$MICRO_BATCH x data-parallel size $DP_SIZE"
GAS=$((GLOBAL_BATCH / (MICRO_BATCH * DP_SIZE)))

# ---- schedule (Megatron-DeepSpeed's token-based one) ----
TRAIN_TOKENS=${TRAIN_TOKENS:-300000000000}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-$((TRAIN_TOKENS * 2 / SEQ_LEN))}
LR_WARMUP_TOKENS=${LR_WARMUP_TOKENS:-3000000000}
LR_DECAY_TOKENS=${LR_DECAY_TOKENS:-$TRAIN_TOKENS}
if [[ -n "${TRAIN_ITERS:-}" ]]; then
    is_pos_int "$TRAIN_ITERS" || die "TRAIN_ITERS=$TRAIN_ITERS: give a positive number"
    LENGTH_ARGS=(--train-iters "$TRAIN_ITERS")
else
    LENGTH_ARGS=(--train-samples "$TRAIN_SAMPLES")
fi
LOG_INTERVAL=${LOG_INTERVAL:-10}
EVAL_ITERS=${EVAL_ITERS:-10}
EVAL_INTERVAL=${EVAL_INTERVAL:-100}
SAVE_INTERVAL=${SAVE_INTERVAL:-100}
CLIP_GRAD=1.0

# ---- precision: the JSON blocks and the flags say the same thing ----
case "${PRECISION:-fp32}" in
    bf16) PREC_ARGS=(--bf16) FP16_ON=false BF16_ON=true ;;
    fp16)
        PREC_ARGS=(--fp16) # the loss scaler's settings come from the JSON's fp16 block
        FP16_ON=true BF16_ON=false
        ;;
    fp32) PREC_ARGS=() FP16_ON=false BF16_ON=false ;;
    *) die "PRECISION=$PRECISION: use bf16, fp16 or fp32" ;;
esac

case "${ATTN:-flash}" in
    flash) ATTN_ARGS=(--use-flash-attn) ;; # flash_attn v2 if installed, else SDPA (cuDNN/flash)
    triton) ATTN_ARGS=(--use-flash-attn-triton) ;;
    classic) ATTN_ARGS=() ;;
    *) die "ATTN=$ATTN: use flash, triton or classic" ;;
esac

# CUDA kernels: a CPU smoke run would take the unfused paths anyway (or, under the test
# suite's TRITON_INTERPRET=1, the slow interpreter).
[[ "$CPU_SMOKE" == 1 ]] && FUSED=${FUSED:-0}
case "${FUSED:-1}" in
    1) FUSED_ARGS=(--cross-entropy-loss-fusion --fused-residual-norm) ;;
    0) FUSED_ARGS=() ;;
    *) die "FUSED=$FUSED: use 1 (fused loss and residual norm) or 0" ;;
esac

# ---- data ----
if [[ "${MOCK_DATA:-0}" == 1 ]]; then
    DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size "$MOCK_VOCAB")
else
    DATA_PATH=${DATA_PATH:-BookCorpusDataset_text_document}
    read -ra DATA_WORDS <<<"$DATA_PATH"
    if ((${#DATA_WORDS[@]} == 1)) && [[ ! -f "$DATA_PATH.bin" || ! -f "$DATA_PATH.idx" ]]; then
        die "DATA_PATH=$DATA_PATH: no $DATA_PATH.bin/.idx; give the prefix written by tools/preprocess_data.py, or MOCK_DATA=1 for synthetic data"
    fi
    DATA_ARGS=(--data-path "${DATA_WORDS[@]}" --split 949,50,1 "${TOKENIZER_ARGS[@]}")
fi

# ---- outputs ----
OUTPUT_DIR=${OUTPUT_DIR:-output}
JOBNAME="${JOB_PREFIX}_seq${SEQ_LEN}_lr${LR}_gbs${GLOBAL_BATCH}_mbs${MICRO_BATCH}_g${WORLD}_sp${SP_SIZE}_z${ZERO_STAGE}"
STAMP="${HOSTNAME:-host}_$(date +%Y.%m.%d_%H.%M.%S)"
CHECKPOINT_PATH=${CHECKPOINT_PATH:-$OUTPUT_DIR/checkpoint/$JOBNAME}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$OUTPUT_DIR/tensorboard/${JOBNAME}_$STAMP}
LOG_DIR=$OUTPUT_DIR/log
DS_CONFIG=$OUTPUT_DIR/ds_config_gbs${GLOBAL_BATCH}_mbs${MICRO_BATCH}_log${LOG_INTERVAL}_zero${ZERO_STAGE}_${PRECISION:-fp32}.json
mkdir -p "$LOG_DIR" "$CHECKPOINT_PATH" "$TENSORBOARD_DIR"

# The DeepSpeed JSON Megatron-DeepSpeed's example scripts generate; pretrain_gpt.py reads the batch sizes,
# ZeRO stage, clipping, precision and the fp16 loss scaler (initial scale 2^11 = 2048) from it and
# refuses any field that contradicts the flags.
cat >"$DS_CONFIG" <<EOF
{
  "train_batch_size": $GLOBAL_BATCH,
  "train_micro_batch_size_per_gpu": $MICRO_BATCH,
  "gradient_accumulation_steps": $GAS,
  "steps_per_print": $LOG_INTERVAL,
  "zero_optimization": {"stage": $ZERO_STAGE},
  "gradient_clipping": $CLIP_GRAD,
  "prescale_gradients": false,
  "fp16": {
    "enabled": $FP16_ON,
    "loss_scale": 0,
    "loss_scale_window": 500,
    "hysteresis": 2,
    "min_loss_scale": 1,
    "initial_scale_power": 11
  },
  "bf16": {"enabled": $BF16_ON},
  "wall_clock_breakdown": false
}
EOF

# ---- the command line ----
SHAPE_ARGS=(--num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN_SIZE" --num-attention-heads "$NUM_HEADS"
    --seq-length "$SEQ_LEN" --max-position-embeddings "$SEQ_LEN")
if [[ -n "${NUM_KV_HEADS:-}" ]]; then SHAPE_ARGS+=(--num-key-value-heads "$NUM_KV_HEADS"); fi
if [[ -n "${FFN_HIDDEN_SIZE:-}" ]]; then SHAPE_ARGS+=(--ffn-hidden-size "$FFN_HIDDEN_SIZE"); fi
# Full recompute of every layer in backward; the caller may spell it Megatron-LM's way.
declare -p RECOMPUTE_FLAGS &>/dev/null || RECOMPUTE_FLAGS=(--checkpoint-activations)
RECOMPUTE_ARGS=()
case "$CHECKPOINT_ACTIVATIONS" in
    1) RECOMPUTE_ARGS=("${RECOMPUTE_FLAGS[@]}") ;;
    0) ;;
    *) die "CHECKPOINT_ACTIVATIONS=$CHECKPOINT_ACTIVATIONS: use 1 (recompute) or 0" ;;
esac
read -ra EXTRA <<<"${EXTRA_ARGS:-}"

ARGS=(
    "${SHAPE_ARGS[@]}" "${MODEL_ARGS[@]}"
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
    --ds-sequence-parallel-size "$SP_SIZE"
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
    "${LENGTH_ARGS[@]}" --train-tokens "$TRAIN_TOKENS"
    --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine
    --lr-warmup-tokens "$LR_WARMUP_TOKENS" --lr-decay-tokens "$LR_DECAY_TOKENS"
    --override-opt_param-scheduler
    --init-method-std "$INIT_STD" --adam-beta1 0.9 --adam-beta2 0.95
    --weight-decay 0.1 --clip-grad "$CLIP_GRAD"
    "${PREC_ARGS[@]}" "${ATTN_ARGS[@]}" "${FUSED_ARGS[@]}" "${RECOMPUTE_ARGS[@]}"
    --zero-stage "$ZERO_STAGE" --deepspeed_config "$DS_CONFIG"
    "${DATA_ARGS[@]}" --num-workers 0 --seed 1234 --device "$DEVICE"
    --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
    --save-interval "$SAVE_INTERVAL" --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH"
    --exit-duration-in-mins 30000000
    --tensorboard-dir "$TENSORBOARD_DIR" --tensorboard-queue-size 1
    --log-timers-to-tensorboard --log-batch-size-to-tensorboard --log-validation-ppl-to-tensorboard
    "${EXTRA[@]}"
)

if [[ "$NNODES" == 1 && -z "${MASTER_ADDR:-}" ]]; then
    RDZV=(--standalone) # one node: torchrun picks a free port
else
    RDZV=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "${MASTER_ADDR:-127.0.0.1}"
        --master-port "$MASTER_PORT")
fi
CMD=("$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node "$GPUS_PER_NODE"
    "$REPO/pretrain_gpt.py" "${ARGS[@]}")

echo "==> $JOBNAME: $WORLD processes = SP $SP_SIZE x DP $DP_SIZE, $DEVICE, ${PRECISION:-fp32}, ZeRO $ZERO_STAGE"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi
LOG_FILE=$LOG_DIR/${JOBNAME}_$STAMP.log
echo "    log: $LOG_FILE"
"${CMD[@]}" 2>&1 | tee "$LOG_FILE"
