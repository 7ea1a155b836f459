#!/usr/bin/env bash
# Quickstart: train a small GPT with Ulysses sequence parallelism on real text that is
# already on this machine (the docstrings of the Python standard library), then sample
# from it. Runs from a fresh clone; no network except `pip install -e .` when needed.
#
#   bash examples_seq_parallel/quickstart.sh
#
# Steps: set-up, corpus, tokenizer, preprocess, train, generate. A re-run reuses what the
# work directory already holds (delete a file there to rebuild that step).
#
# Environment knobs (defaults in brackets):
#   QUICKSTART_WORK          work directory [./quickstart_work]
#   QUICKSTART_ITERS         training iterations [500: ~3-4 minutes on 2 CPU cores]
#   QUICKSTART_NPROC         processes = sequence-parallel size; 1, 2, 4 or 8 [2]
#   QUICKSTART_DEVICE        auto, cpu or cuda [auto: GPUs when at least NPROC are visible]
#   QUICKSTART_CORPUS_MB     cap on the corpus size in MB [0: every docstring, ~1.6 MB]
#   QUICKSTART_VOCAB         SentencePiece vocabulary size [3000]
#   QUICKSTART_LOG_INTERVAL  iterations between log lines [10]
#   QUICKSTART_GEN_TOKENS    tokens generated per prompt [48]
#   PYTHON                   interpreter [python3]
set -euo pipefail

export OMP_NUM_THREADS=1
export TOKENIZERS_PARALLELISM=false

ITERS=${QUICKSTART_ITERS:-500}
NPROC=${QUICKSTART_NPROC:-2}
DEVICE=${QUICKSTART_DEVICE:-auto}
CORPUS_MB=${QUICKSTART_CORPUS_MB:-0}
VOCAB=${QUICKSTART_VOCAB:-3000}
LOG_INTERVAL=${QUICKSTART_LOG_INTERVAL:-10}
GEN_TOKENS=${QUICKSTART_GEN_TOKENS:-48}
PYTHON=${PYTHON:-python3}

step() { printf '\n==> step: %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

case "$NPROC" in 1 | 2 | 4 | 8) ;; *) die "QUICKSTART_NPROC=$NPROC: use 1, 2, 4 or 8 (it must divide the 8 attention heads)" ;; esac
[[ "$ITERS" =~ ^[1-9][0-9]*$ ]] || die "QUICKSTART_ITERS=$ITERS: give a positive number of iterations"
case "$DEVICE" in auto | cpu | cuda) ;; *) die "QUICKSTART_DEVICE=$DEVICE: use auto, cpu or cuda" ;; esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${QUICKSTART_WORK:-./quickstart_work}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
cd "$REPO"

step "set-up: check that megatron and its dependencies import"
if (cd / && "$PYTHON" -c "import megatron, torch, numpy, sentencepiece, tokenizers") >/dev/null 2>&1; then
    echo "    megatron-ulysses is installed"
else
    echo "    installing this repository: $PYTHON -m pip install -q -e $REPO"
    "$PYTHON" -m pip install -q -e "$REPO"
fi
if [[ "$DEVICE" == auto ]]; then
    NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
    if ((NGPU >= NPROC)); then DEVICE=cuda; else DEVICE=cpu; fi
fi
echo "    device: $DEVICE, $NPROC process(es), sequence-parallel size $NPROC; work dir: $WORK"

# ---- (a) corpus ----
TAG=$([[ "$CORPUS_MB" == 0 ]] && echo "" || echo "_${CORPUS_MB}mb")
CORPUS=$WORK/docstrings$TAG.jsonl
CORPUS_TXT=$WORK/docstrings$TAG.txt
step "corpus: docstrings of the Python standard library -> $CORPUS"
if [[ -s "$CORPUS" && -s "$CORPUS_TXT" ]]; then
    echo "    reusing $CORPUS"
else
    "$PYTHON" examples_seq_parallel/build_docstring_corpus.py \
        --output "$CORPUS" --text-output "$CORPUS_TXT" --max-mb "$CORPUS_MB"
fi

# ---- (b) tokenizer ----
SPM_PREFIX=$WORK/spm${TAG}_v${VOCAB}
SPM=$SPM_PREFIX.model
step "tokenizer: SentencePiece BPE, vocabulary $VOCAB -> $SPM"
if [[ -s "$SPM" ]]; then
    echo "    reusing $SPM"
else
    "$PYTHON" examples_seq_parallel/train_sentencepiece.py \
        --input "$CORPUS_TXT" --model-prefix "$SPM_PREFIX" --vocab-size "$VOCAB"
fi

# ---- (c) preprocess ----
DATA=$WORK/data/docstrings${TAG}_v${VOCAB}
step "preprocess: tokenize into ${DATA}_text_document.bin/.idx"
if [[ -s "${DATA}_text_document.bin" && -s "${DATA}_text_document.idx" ]]; then
    echo "    reusing ${DATA}_text_document"
else
    mkdir -p "$WORK/data"
    "$PYTHON" tools/preprocess_data.py --input "$CORPUS" --output-prefix "$DATA" \
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$SPM" \
        --append-eod --workers 2 --log-interval 100000
fi

# ---- (d) train ----
CKPT=$WORK/checkpoints/gpt${TAG}_v${VOCAB}_it${ITERS}
LOG=$CKPT.log
WARMUP=$(((ITERS + 9) / 10))
step "train: 4-layer GPT (hidden 128, 8 heads, sequence 256), $ITERS iterations, SP $NPROC on $DEVICE -> $CKPT"
DONE=$(cat "$CKPT/latest_checkpointed_iteration.txt" 2>/dev/null || echo 0)
if ((DONE >= ITERS)); then
    echo "    reusing the checkpoint at iteration $DONE (delete $CKPT to train again)"
else
    LOAD_ARGS=()
    if ((DONE > 0)); then
        echo "    resuming from iteration $DONE"
        LOAD_ARGS=(--load "$CKPT")
    fi
    mkdir -p "$(dirname "$CKPT")"
    if ((DONE == 0)); then : >"$LOG"; fi # the log of a resumed run continues the old one
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" pretrain_gpt.py \
        --num-layers 4 --hidden-size 128 --num-attention-heads 8 \
        --seq-length 256 --max-position-embeddings 256 \
        --micro-batch-size 8 --global-batch-size 8 \
        --train-iters "$ITERS" --lr 3e-3 --min-lr 1e-4 --lr-decay-style cosine \
        --lr-warmup-iters "$WARMUP" --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 \
        --hidden-dropout 0 --attention-dropout 0 \
        --ds-sequence-parallel-size "$NPROC" --use-flash-attn --device "$DEVICE" \
        --data-path "${DATA}_text_document" --split 100,0,0 --eval-iters 0 --eval-interval 0 \
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$SPM" \
        --num-workers 0 --seed 1234 --log-interval "$LOG_INTERVAL" \
        --save "$CKPT" "${LOAD_ARGS[@]}" --save-interval 100 \
        --tensorboard-dir "$WORK/tensorboard" \
        2>&1 | tee -a "$LOG"
fi

# ---- (e) generate ----
step "generate: sample from the checkpoint with tools/generate_text.py"
"$PYTHON" tools/generate_text.py --load "$CKPT" --use-checkpoint-args \
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$SPM" --device "$DEVICE" \
    --prompt "Return the number of" --prompt "This module provides" --prompt "Raise ValueError if" \
    --max-new-tokens "$GEN_TOKENS" --temperature 0.7 --top-k 40 --seed 1234

LOSSES=$(grep -o 'lm loss: [0-9.eE+-]*' "$LOG" 2>/dev/null | awk '{print $3}' || true)
if [[ -n "$LOSSES" ]]; then
    printf '\n==> done: lm loss %.2f at the first log line -> %.2f at the last (log: %s)\n' \
        "$(head -n1 <<<"$LOSSES")" "$(tail -n1 <<<"$LOSSES")" "$LOG"
fi
echo "    checkpoint: $CKPT; tensorboard --logdir $WORK/tensorboard"
