"""Golden loss curves: train a small model on the GPU and compare its loss curve to a stored one.

``python -m megatron.validate.golden --model {gpt,llama} --precision {fp32,bf16}`` trains
through ``pretrain_gpt.main`` on a corpus built on this machine (``golden_corpus``) and
compares the 10-iteration moving average of the loss, at every logged iteration, to the fp32
curve of the same seed under ``tests/golden/``. fp32 is the reference (classic attention, no
fused kernels, TF32 off); bf16 runs the fastest flags of the example scripts.

``--record`` stores the curve instead. Recording fp32 with ``--seed 1234`` and ``--seed 4321``
also stores the tolerance: 3 x the largest gap between the two curves' moving averages.

Exit codes: 0 PASS (or recorded), 1 FAIL, 2 cannot run (no CUDA device, corpus too small, no
stored curve), 3 not comparable (the stored curve used another corpus, tokenizer or recipe).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from megatron.validate import golden_corpus
from megatron.validate.golden_curves import (
    Curve,
    compare,
    curve_path,
    load,
    not_comparable,
    save,
    tolerance_path,
    update_tolerance,
    version_notes,
)

SEEDS = (1234, 4321)  # the seed of record, and the second seed that sets the tolerance
CORPUS_FIELDS = ("files", "documents", "characters", "tokens", "stdlib")
RATE_TFLOPS = {"fp32": 50.0, "bf16": 400.0}  # one H100: fp32 without TF32, bf16 effective


@dataclass(frozen=True)
class Recipe:
    """Shapes, batch and schedule of one model size (full or --tiny)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    seq: int
    micro_batch: int
    global_batch: int
    iterations: int
    log_interval: int
    window: int
    lr: float
    vocab_size: int
    max_files: int | None


FULL = Recipe(12, 768, 12, 4, 2048, 2, 4, 300, 10, 10, 6e-4, 4096, None)
TINY = Recipe(2, 64, 4, 2, 128, 2, 4, 30, 10, 10, 3e-3, 512, 12)

STYLE = {  # GPT-3 (learned positions, LayerNorm, GeLU, biases) and Llama (the rest)
    "gpt": [],
    "llama": [
        "--position-embedding-type",
        "rope",
        "--normalization",
        "RMSNorm",
        "--swiglu",
        "--disable-bias-linear",
        "--untie-embeddings-and-output-weights",
    ],
}
LLAMA_CONFIG = {  # the ModelConfig of STYLE["llama"]
    "position_embedding_type": "rope",
    "normalization": "RMSNorm",
    "swiglu": True,
    "add_bias_linear": False,
    "untie_embeddings_and_output_weights": True,
}
PRECISION = {
    "fp32": [
        "--no-bias-gelu-fusion",
        "--no-bias-dropout-fusion",
        "--no-gradient-accumulation-fusion",
        "--no-embedding-grads-in-place",
        "--no-loss-grad-in-forward",
    ],
    "bf16": ["--bf16", "--use-flash-attn", "--fused-residual-norm", "--cross-entropy-loss-fusion"],
}


def pretrain_args(
    r: Recipe, model: str, precision: str, seed: int, corpus: golden_corpus.Corpus, device: str
) -> list[str]:
    """The ``pretrain_gpt.py`` command line of one curve."""
    kv = ["--num-key-value-heads", str(r.kv_heads)] if model == "llama" else []
    return [
        "--num-layers",
        str(r.layers),
        "--hidden-size",
        str(r.hidden),
        "--num-attention-heads",
        str(r.heads),
        *kv,
        *STYLE[model],
        "--seq-length",
        str(r.seq),
        "--max-position-embeddings",
        str(r.seq),
        "--micro-batch-size",
        str(r.micro_batch),
        "--global-batch-size",
        str(r.global_batch),
        "--train-iters",
        str(r.iterations),
        "--log-interval",
        str(r.log_interval),
        "--lr",
        str(r.lr),
        "--min-lr",
        str(r.lr / 10),
        "--lr-decay-style",
        "cosine",
        "--lr-warmup-iters",
        str(r.iterations // 10),
        "--lr-decay-iters",
        str(r.iterations),
        "--weight-decay",
        "0.1",
        "--adam-beta1",
        "0.9",
        "--adam-beta2",
        "0.95",
        "--clip-grad",
        "1.0",
        "--init-method-std",
        "0.02",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        *PRECISION[precision],
        "--data-path",
        corpus.data_prefix,
        "--split",
        "100,0,0",
        "--data-cache-path",
        os.path.join(corpus.directory, "index_cache"),
        "--tokenizer-type",
        "GPTSentencePieceTokenizer",
        "--tokenizer-model",
        corpus.tokenizer_model,
        "--eval-iters",
        "0",
        "--eval-interval",
        "0",
        "--num-workers",
        "0",
        "--seed",
        str(seed),
        "--device",
        device,
    ]


def estimate_minutes(r: Recipe, model: str, precision: str) -> tuple[float, float]:
    """(training TFLOP, minutes on one H100): model FLOPs, plus the classic attention's
    masked upper half in fp32, at the rates of ``RATE_TFLOPS``."""
    from megatron.model.config import ModelConfig
    from megatron.model.flops import model_flops_per_token

    style = {} if model == "gpt" else LLAMA_CONFIG | {"num_key_value_heads": r.kv_heads}
    cfg = ModelConfig(r.layers, r.hidden, r.heads, r.vocab_size, r.seq, **style)
    per_token = model_flops_per_token(cfg, r.seq)
    if precision == "fp32":
        per_token += 6.0 * r.layers * r.seq * r.hidden
    tflop = per_token * r.seq * r.global_batch * r.iterations / 1e12
    return tflop, tflop / RATE_TFLOPS[precision] / 60.0


def environment(device: str) -> dict[str, str | None]:
    """GPU, library versions, date and commit of this run."""
    triton = None
    with contextlib.suppress(ImportError):
        import triton as _triton

        triton = _triton.__version__
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    commit = _git("rev-parse", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    return {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "cudnn": str(cudnn) if cudnn else None,
        "triton": triton,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": commit or None,
    }


def _git(*args: str) -> str:
    """Output of a git command in the repository ('' without git or a repository)."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=golden_corpus.REPO)
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def train(argv: list[str]) -> list[float]:
    """Per-iteration losses of ``pretrain_gpt.main(argv)``, with TF32 off."""
    if str(golden_corpus.REPO) not in sys.path:
        sys.path.insert(0, str(golden_corpus.REPO))
    import pretrain_gpt

    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default
    torch.backends.cudnn.allow_tf32 = False  # default True (convolutions; none here)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    return [float(x) for x in pretrain_gpt.main(argv)]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m megatron.validate.golden", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", choices=sorted(STYLE), required=True)
    p.add_argument("--precision", choices=sorted(PRECISION), required=True)
    p.add_argument("--seed", type=int, default=SEEDS[0])
    p.add_argument("--record", action="store_true", help="store the curve (fp32: the tolerance)")
    p.add_argument("--work", default="golden_work", help="corpus cache [./golden_work]")
    p.add_argument("--golden-dir", default=str(golden_corpus.REPO / "tests" / "golden"))
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny model and corpus (CPU tests)")
    p.add_argument("--corpus-files", type=int, default=None, help="the first N stdlib files only")
    return p.parse_args(argv)


def stored(a: argparse.Namespace, name: str) -> tuple[Curve | None, Curve | None, str | None]:
    """(fp32 curve of the seed, tolerance, error line): what this run is compared to."""
    ref_path, tol_path = (
        curve_path(a.golden_dir, name, "fp32", a.seed),
        tolerance_path(a.golden_dir, name),
    )
    reference = None if a.record and a.precision == "fp32" else load(ref_path)
    tolerance = load(tol_path) if reference else None
    if a.record or (reference is not None and tolerance is not None):
        return reference, tolerance, None
    missing = ref_path if reference is None else tol_path
    seeds = f"--record --precision fp32 --seed {SEEDS[0]}, then --seed {SEEDS[1]}"
    return None, None, f"error: no stored {missing}: record it first ({seeds})"


def main(argv: list[str] | None = None) -> int:
    """Run one curve; the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible here", file=sys.stderr)
        return 2
    r = TINY if a.tiny else FULL
    name = f"{a.model}-tiny" if a.tiny else a.model
    reference, tolerance, error = stored(a, name)
    if error:
        print(error, file=sys.stderr)
        return 2

    spec = golden_corpus.CorpusSpec(r.vocab_size, a.corpus_files or r.max_files)
    corpus, reused = golden_corpus.prepare(a.work, spec, min(8, os.cpu_count() or 1))
    how = "reused" if reused else f"built in {corpus.build_seconds:.1f} s"
    print(
        f"corpus: {corpus.files} stdlib files, {corpus.documents} documents, "
        f"{corpus.tokens} tokens, {how} ({corpus.directory})"
    )
    samples, needed = (corpus.tokens - 1) // r.seq, r.iterations * r.global_batch
    if needed > samples:
        print(
            f"error: the corpus has {corpus.tokens} tokens, {samples} samples of {r.seq}; "
            f"{r.iterations} iterations x {r.global_batch} need {needed} (one epoch at most)",
            file=sys.stderr,
        )
        return 2
    settings = {**asdict(r), "model": a.model, "precision": a.precision, "seed": a.seed}
    settings |= {"corpus_sha256": corpus.corpus_sha256, "tokenizer_sha256": corpus.tokenizer_sha256}
    if reference is not None and (why := not_comparable(reference, settings)):
        print(f"not comparable: {why}")
        return 3

    args = pretrain_args(r, a.model, a.precision, a.seed, corpus, a.device)
    tflop, minutes = estimate_minutes(r, a.model, a.precision)
    print(
        f"train: {name} {a.precision} seed {a.seed}, {r.iterations} iterations x {r.global_batch} "
        f"x {r.seq} tokens ({needed / samples:.0%} of an epoch): {tflop:.0f} TFLOP, ~{minutes:.1f} "
        f"min of compute on one H100 at {RATE_TFLOPS[a.precision]:.0f} TFLOP/s"
    )
    env = environment(a.device)
    start = time.time()
    try:
        losses = train(args)
    except SystemExit as exc:  # pretrain's one-line usage errors
        return exc.code if isinstance(exc.code, int) else 2
    seconds = time.time() - start
    print(f"trained in {seconds:.0f} s: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    run = {
        **settings,
        "losses": losses,
        "seconds": round(seconds, 1),
        "command": shlex.join(["python", "-m", "megatron.validate.golden", *argv]),
        "pretrain_args": args,
        "corpus": {k: getattr(corpus, k) for k in CORPUS_FIELDS},
        "environment": env,
    }
    if a.record:
        out = curve_path(a.golden_dir, name, a.precision, a.seed)
        save(out, run)
        print(f"recorded {out}")
        if a.precision == "fp32":
            return update_tolerance(a.golden_dir, name, SEEDS)
    if reference is None or tolerance is None:
        print("not compared: the fp32 curves of both seeds (and the tolerance) are not stored yet")
        return 0
    for note in version_notes(reference["environment"], env):
        print(f"note: {note} (compared anyway)")
    return compare(run, reference, tolerance)


if __name__ == "__main__":
    sys.exit(main())
