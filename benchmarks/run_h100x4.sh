#!/usr/bin/env bash
# The GPU benchmark suite of docs/performance.md on one 4-GPU node (NPROC=8 for an 8-GPU one),
# stage by stage:
#
#   bash benchmarks/run_h100x4.sh env a2a attention attention_breakdown e2e weak maxseq examples \
#       bias_gelu fused_ops_tests triton_tests
#
# Results (JSON + logs) go to $RES [results/]; with $OUT set (the device tool) they are also
# packed into $OUT/results.tgz after every stage. Each stage has a wall-clock cap so one hang cannot eat the
# rest; a failed stage is reported and the next one runs. DeepSpeed (for the attention
# comparison) is installed from wheels in .whl/ when present.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
RES=${RES:-results}
mkdir -p "$RES"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
PY=${PYTHON:-python3}
RUN=(torchrun --standalone --nproc-per-node)
NPROC=${NPROC:-4}

install_wheels() {
    [[ -d .whl ]] || return 0
    local tag
    tag=cp$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl .whl/"$tag"/*.whl && export PYTHONPATH=/tmp/site
}

stage_env() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    nvidia-smi topo -m
    "$PY" - <<'EOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "nccl", ".".join(map(str, torch.cuda.nccl.version())), "triton", triton.__version__)
try:
    import deepspeed
    print("deepspeed", deepspeed.__version__)
except Exception as err:
    print("deepspeed not importable:", err)
EOF
}

stage_attention() {
    timeout 300 "${RUN[@]}" "$NPROC" benchmarks/bench_attention_core.py \
        --seqlens 32768,131072,262144 --json "$RES/attention_core_sp$NPROC.json"
    timeout 120 "${RUN[@]}" 2 benchmarks/bench_attention_core.py \
        --seqlens 32768,131072 --json "$RES/attention_core_sp2.json"
}

stage_a2a() {
    # NCCL's collectives, then the all-to-all under a few tuning settings (one process each).
    timeout 90 "${RUN[@]}" "$NPROC" benchmarks/bench_all_to_all.py --json "$RES/a2a_defaults.json"
    local i=0 knobs
    for knobs in "NCCL_MIN_NCHANNELS=32" "NCCL_MIN_P2P_NCHANNELS=32 NCCL_MAX_P2P_NCHANNELS=32" \
        "NCCL_NCHANNELS_PER_PEER=8" "NCCL_P2P_NVL_CHUNKSIZE=2097152" "NCCL_BUFFSIZE=16777216" \
        "NCCL_PROTO=Simple"; do
        i=$((i + 1))
        # shellcheck disable=SC2086
        env $knobs timeout 60 "${RUN[@]}" "$NPROC" benchmarks/bench_all_to_all.py --impls nccl \
            --no-overlap --json "$RES/a2a_nccl_$i.json"
    done
}

stage_attention_breakdown() {
    timeout 120 "${RUN[@]}" "$NPROC" benchmarks/bench_attention_core.py --seqlens 32768 \
        --methods single,ulysses-sdpa,ulysses-sdpa-sendorder,deepspeed,ring,local-contig,local-ulysses,a2a-only \
        --json "$RES/attention_breakdown_sp$NPROC.json"
    # The same with a barrier and host sync before every call (the earlier timing).
    timeout 120 "${RUN[@]}" "$NPROC" benchmarks/bench_attention_core.py --seqlens 32768 \
        --methods single,ulysses-sdpa,ulysses-sdpa-sendorder,deepspeed,ring,a2a-only --timing synced \
        --json "$RES/attention_breakdown_synced_sp$NPROC.json"
}

# The defaults at global batch 1, 2 and 4, against the first all-gathers after the optimizer
# step (nooptag), the gradients accumulated by FSDP2 and autograd instead of in place (nogaf)
# and the chunked loss recomputing its logits (nolgf); then no fusions, full recompute and ZeRO 3.
E2E_DEFAULT=z1-nobgf,z1-cefuse-fusednorm-dwgrad,z1-cefuse-fusednorm-dwgrad-nolgf
E2E_DEFAULT+=,z1-cefuse-fusednorm-dwgrad-ga2,z1-cefuse-fusednorm-dwgrad-ga2-nooptag
E2E_DEFAULT+=,z1-cefuse-fusednorm-dwgrad-ga2-nogaf,z1-cefuse-fusednorm-dwgrad-ga4
E2E_DEFAULT+=,z1-full-cefuse-fusednorm,z3-cefuse-fusednorm

stage_e2e() {
    # SM clock and power once a second beside the runs (power capping slows the kernels).
    nvidia-smi dmon -s pc -d 1 > "$RES/dmon_e2e.txt" 2>&1 &
    local dmon=$!
    timeout 400 "${RUN[@]}" "$NPROC" benchmarks/bench_end_to_end.py --profile \
        --sweep "${E2E_SWEEP:-$E2E_DEFAULT}" \
        --trace "$RES/traces/e2e.json.gz" --json "$RES/e2e_1p3b_32k.json"
    local rc=$?
    kill "$dmon" 2>/dev/null
    return $rc
}

stage_weak() {
    timeout 200 "${RUN[@]}" "$NPROC" benchmarks/bench_end_to_end.py --weak-scaling --seq-length 16384 \
        --position-embedding-type rope --json "$RES/weak_scaling.json"
}

stage_maxseq() {
    # MAXSEQ_EXTRA: flags for bench_end_to_end.py, e.g. --checkpoint-in-cpu
    local budget=${MAXSEQ_BUDGET_S:-420}
    # shellcheck disable=SC2086
    timeout $((budget + 30)) "$PY" benchmarks/bench_max_seqlen.py --nproc "$NPROC" \
        --seqlens "${MAXSEQ_LENGTHS:-524288}" --budget-s "$budget" \
        --attempt-timeout-s "${MAXSEQ_ATTEMPT_S:-400}" \
        --json "$RES/max_seqlen.json" ${MAXSEQ_EXTRA:+-- $MAXSEQ_EXTRA}
}

stage_examples() {
    local common=(MOCK_DATA=1 TRAIN_ITERS=6 LOG_INTERVAL=1 EVAL_ITERS=1 OUTPUT_DIR=/tmp/ex)
    env "${common[@]}" timeout 180 bash examples_seq_parallel/ds_pretrain_gpt_1.3B_seq_parallel_32k.sh
    env "${common[@]}" EXTRA_ARGS="--save=" timeout 150 \
        bash examples_seq_parallel/pretrain_llama_128k_seq_parallel.sh
    env "${common[@]}" NUM_LAYERS=16 EXTRA_ARGS="--save=" timeout 180 \
        bash examples_seq_parallel/ds_pretrain_gpt_30B_seq_parallel_32k.sh
}

stage_bias_gelu() {
    # The bias-GeLU kernels' tilings against PyTorch's unfused ops, one GPU.
    timeout 120 "$PY" benchmarks/bench_bias_gelu.py --json "$RES/bias_gelu.json"
}

stage_fused_ops_tests() {
    # The fused cross-entropy, add + norm and bias-GeLU kernels on the GPU, bf16, real sizes.
    timeout 300 "$PY" -m pytest tests/test_fused_ops_cuda.py -v -p no:cacheprovider 2>&1 |
        tee "$RES/fused_ops_tests.log"
}

stage_triton_tests() {
    # Compilation dominates on a fresh machine (6-7 minutes for the whole file); TRITON_K
    # selects cases (pytest -k). TRITON_GROUPS="sel1;sel2;..." runs each selection in its own
    # process on its own GPU at once (compiling is CPU-bound). Logs are written as they go.
    local limit=${TRITON_TIMEOUT_S:-540}
    if [[ -z "${TRITON_GROUPS:-}" ]]; then
        timeout "$limit" "$PY" -m pytest tests/test_triton_flash_attn.py -v \
            -p no:cacheprovider ${TRITON_K:+-k "$TRITON_K"} 2>&1 | tee "$RES/triton_tests.log"
        return
    fi
    local sels sel i=0 rc=0 pids=()
    IFS=';' read -ra sels <<<"$TRITON_GROUPS"
    for sel in "${sels[@]}"; do
        CUDA_VISIBLE_DEVICES=$((i % NPROC)) timeout "$limit" "$PY" -m pytest \
            tests/test_triton_flash_attn.py -v -p no:cacheprovider -k "$sel" \
            >"$RES/triton_tests_$i.log" 2>&1 &
        pids+=($!)
        i=$((i + 1))
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || rc=1
        echo "--- group $i: ${sels[$i]}"
        grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|error" "$RES/triton_tests_$i.log"
    done
    return $rc
}

install_wheels || echo "=== wheel install failed: DeepSpeed rows will be skipped"
for stage in "$@"; do
    echo "=== stage $stage: $(date -u +%H:%M:%S)"
    SECONDS=0
    if ! "stage_$stage"; then echo "=== stage $stage FAILED"; fi
    echo "=== stage $stage took ${SECONDS}s"
    # Packed after every stage, so a call cut off at its time limit keeps what finished.
    if [[ -n "${OUT:-}" ]]; then tar czf "$OUT/results.tgz" "$RES"; fi
done
