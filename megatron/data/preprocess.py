"""Tokenizing JSONL into indexed datasets: the engine of tools/preprocess_data.py.

Chunks of lines go to worker processes (bounded in flight, in input order), each parses its
lines and tokenizes the documents in one batch call; the parent appends the results to one
``MMapIndexedDatasetBuilder`` per JSON key. ``--partitions N`` cuts the input into N
contiguous ranges processed by N processes at once, then merges their outputs in order, so
the result equals a single-partition run.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import queue
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from megatron.data.indexed_dataset import (
    MMapIndexedDatasetBuilder,
    best_fitting_dtype,
    data_file_path,
    index_file_path,
)
from megatron.data.preprocess_io import (
    InputRange,
    Progress,
    is_gzip,
    iter_chunks,
    plain_partitions,
    split_gzip,
)
from megatron.errors import UsageError
from megatron.tokenizer import create_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeConfig:
    """What a worker needs to encode chunks (picklable)."""

    tokenizer_args: argparse.Namespace
    json_keys: tuple[str, ...]
    append_eod: bool
    skip_malformed: bool
    dtype: str


@dataclass
class KeyOutput:
    """Encoded documents of one JSON key in one chunk."""

    tokens: np.ndarray  # all tokens back to back
    sizes: np.ndarray  # int32 [n_sequences]
    sequences_per_doc: np.ndarray  # int64 [n_documents written]
    empty: int = 0  # documents with no tokens, skipped


@dataclass
class ChunkResult:
    keys: dict[str, KeyOutput] = field(default_factory=dict)
    documents: int = 0
    malformed: int = 0
    blank: int = 0
    nbytes: int = 0
    fraction: float = float("nan")
    error: str | None = None


_worker: dict = {}


def init_worker(cfg: EncodeConfig) -> None:
    """Build this process's tokenizer once."""
    _worker["cfg"] = cfg
    _worker["tokenizer"] = create_tokenizer(cfg.tokenizer_args)


def _parse(lines: list[bytes], first_line: int, name: str, cfg: EncodeConfig, res: ChunkResult):
    """Per-key values of the chunk's documents, or None after setting ``res.error``."""
    values: dict[str, list] = {key: [] for key in cfg.json_keys}
    for i, line in enumerate(lines):
        where = f"{name} line {first_line + i}"
        if not line.strip():
            res.blank += 1
            continue
        try:
            obj = json.loads(line)
            problem = None if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
        except UnicodeDecodeError:
            problem = "not valid UTF-8"
        except json.JSONDecodeError as exc:
            problem = f"malformed JSON ({exc.msg} at column {exc.colno})"
        if problem is not None:
            if cfg.skip_malformed:
                res.malformed += 1
                continue
            res.error = (
                f"{where}: {problem}, expected one JSON object per line; fix it or pass "
                "--skip-malformed to skip such lines"
            )
            return None
        for key in cfg.json_keys:
            if key not in obj:
                keys = ", ".join(sorted(obj)[:8]) or "none"
                res.error = (
                    f"{where}: missing key {key!r} (keys there: {keys}); pick the keys with "
                    "--json-keys"
                )
                return None
            value = obj[key]
            if not (
                isinstance(value, str)
                or (isinstance(value, list) and all(isinstance(v, str) for v in value))
            ):
                res.error = (
                    f"{where}: key {key!r} holds a {type(value).__name__}, expected a string "
                    "(or a list of strings)"
                )
                return None
        res.documents += 1
        for key in cfg.json_keys:
            values[key].append(obj[key])
    return values


def _encode_key(docs: list, tokenizer, cfg: EncodeConfig) -> KeyOutput:
    """Tokenize one key's documents in one batch; a list value is one sequence per string."""
    texts: list[str] = []
    owner: list[int] = []
    for d, value in enumerate(docs):
        parts = [value] if isinstance(value, str) else value
        texts.extend(parts)
        owner.extend([d] * len(parts))
    ids = tokenizer.tokenize_batch(texts) if texts else []
    per_doc: list[list[list[int]]] = [[] for _ in docs]
    for d, seq in zip(owner, ids):
        if len(seq):
            per_doc[d].append(list(seq))
    flat: list[int] = []
    sizes: list[int] = []
    counts: list[int] = []
    empty = 0
    for seqs in per_doc:
        if not seqs:
            empty += 1
            continue
        if cfg.append_eod:
            seqs[-1].append(tokenizer.eod)  # counted in the sequence's size
        for seq in seqs:
            flat.extend(seq)
            sizes.append(len(seq))
        counts.append(len(seqs))
    return KeyOutput(
        np.array(flat, dtype=cfg.dtype),
        np.array(sizes, dtype=np.int32),
        np.array(counts, dtype=np.int64),
        empty,
    )


def encode_chunk(item: tuple[int, list[bytes], float, str]) -> ChunkResult:
    """Parse and tokenize one chunk of lines (runs in a worker)."""
    first_line, lines, fraction, name = item
    cfg: EncodeConfig = _worker["cfg"]
    res = ChunkResult(nbytes=sum(len(line) for line in lines), fraction=fraction)
    values = _parse(lines, first_line, name, cfg, res)
    if values is None:
        return res
    try:
        for key in cfg.json_keys:
            res.keys[key] = _encode_key(values[key], _worker["tokenizer"], cfg)
    except (UsageError, OverflowError) as exc:
        res.error = f"{name} lines {first_line}-{first_line + len(lines) - 1}: {exc}"
    return res


def _mp_context():
    # fork keeps workers cheap and works for scripts loaded from a path; elsewhere spawn.
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _results(items: Iterable, cfg: EncodeConfig, workers: int) -> Iterator[ChunkResult]:
    """Encoded chunks in input order, at most ~2 per worker in flight."""
    if workers == 1:
        init_worker(cfg)
        yield from map(encode_chunk, items)
        return
    pool = _mp_context().Pool(workers, initializer=init_worker, initargs=(cfg,))
    try:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(encode_chunk, (item,)))
            if len(pending) >= 2 * workers + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()


def process_range(
    rng: InputRange, cfg: EncodeConfig, workers: int, outputs: dict[str, str], log_interval: int
) -> dict:
    """Encode one input range into ``outputs[key]`` datasets; returns counts."""
    builders = {
        k: MMapIndexedDatasetBuilder(data_file_path(p), cfg.dtype) for k, p in outputs.items()
    }
    stats = {"documents": 0, "malformed": 0, "blank": 0, "bytes": 0}
    per_key = {k: {"written": 0, "empty": 0, "tokens": 0} for k in outputs}
    progress = Progress(log_interval, rng.label)
    items = ((line, lines, frac, rng.display_name) for line, lines, frac in iter_chunks(rng))
    results = _results(items, cfg, workers)
    try:
        for res in results:
            if res.error is not None:
                raise UsageError(res.error)
            for key, out in res.keys.items():
                builders[key].add_documents(out.tokens, out.sizes, out.sequences_per_doc)
                per_key[key]["written"] += len(out.sequences_per_doc)
                per_key[key]["empty"] += out.empty
                per_key[key]["tokens"] += out.tokens.size
            stats["documents"] += res.documents
            stats["malformed"] += res.malformed
            stats["blank"] += res.blank
            stats["bytes"] += res.nbytes
            progress.update(res.documents, res.nbytes, res.fraction)
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    finally:
        results.close()  # stops the worker pool
    for key, builder in builders.items():
        builder.finalize(index_file_path(outputs[key]))
    stats["keys"] = per_key
    return stats


def _partition_main(k, rng, cfg, workers, outputs, log_interval, results) -> None:
    try:
        results.put((k, None, process_range(rng, cfg, workers, outputs, log_interval)))
    except UsageError as exc:
        results.put((k, str(exc), None))
    except BaseException as exc:  # report instead of dying silently
        results.put((k, f"{rng.label} failed: {exc!r}", None))


def _run_partitions(
    ranges: list[InputRange], cfg: EncodeConfig, workers: int, outputs: dict[str, str], opts
) -> list[dict]:
    """Process ``ranges`` at once (one process each), then merge their outputs in order."""
    ctx = _mp_context()
    results = ctx.Queue()
    per_part = max(1, workers // len(ranges))
    part_outputs = [{k: f"{p}.part{i}" for k, p in outputs.items()} for i in range(len(ranges))]
    procs = [
        ctx.Process(
            target=_partition_main,
            args=(i, rng, cfg, per_part, part_outputs[i], opts.log_interval, results),
        )
        for i, rng in enumerate(ranges)
    ]
    for proc in procs:
        proc.start()
    done: dict[int, tuple] = {}
    try:
        while len(done) < len(procs):
            try:
                k, error, stats = results.get(timeout=1.0)
                done[k] = (error, stats)
            except queue.Empty:
                for i, proc in enumerate(procs):
                    if i not in done and proc.exitcode not in (None, 0):
                        done[i] = (f"{ranges[i].label} died (exit code {proc.exitcode})", None)
        errors = [done[i][0] for i in range(len(procs)) if done[i][0]]
        if errors:
            raise UsageError(errors[0])
        for key, prefix in outputs.items():
            builder = MMapIndexedDatasetBuilder(data_file_path(prefix), cfg.dtype)
            for part in part_outputs:
                builder.merge_file_(part[key])
            builder.finalize(index_file_path(prefix))
        return [done[i][1] for i in range(len(procs))]
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        for part in part_outputs:
            for prefix in part.values():
                for path in (data_file_path(prefix), index_file_path(prefix)):
                    if os.path.exists(path):
                        os.remove(path)


def run_preprocess(opts: argparse.Namespace) -> dict:
    """Tokenize ``opts.input`` into ``<output_prefix>_<key>_document.bin/.idx``."""
    start = time.monotonic()
    tokenizer = create_tokenizer(opts)  # checks the tokenizer files before any work
    dtype = np.dtype(best_fitting_dtype(tokenizer.vocab_size)).name
    cfg = EncodeConfig(
        tokenizer_args=argparse.Namespace(
            tokenizer_type=opts.tokenizer_type,
            vocab_file=opts.vocab_file,
            merge_file=opts.merge_file,
            tokenizer_model=opts.tokenizer_model,
            vocab_size=opts.vocab_size,
        ),
        json_keys=tuple(opts.json_keys),
        append_eod=opts.append_eod,
        skip_malformed=opts.skip_malformed,
        dtype=dtype,
    )
    out_dir = os.path.dirname(os.path.abspath(opts.output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"--output-prefix {opts.output_prefix}: cannot create {out_dir} ({exc})"
        ) from None
    outputs = {key: f"{opts.output_prefix}_{key}_document" for key in opts.json_keys}
    logger.info(
        "tokenizing %s with %s (vocab %d, tokens as %s), %d worker(s), %d partition(s)",
        opts.input,
        tokenizer.name,
        tokenizer.vocab_size,
        dtype,
        opts.workers,
        opts.partitions,
    )
    temp_inputs: list[str] = []
    try:
        if opts.partitions == 1:
            end = None if is_gzip(opts.input) else os.path.getsize(opts.input)
            rng = InputRange(opts.input, 0, end, 1, opts.input)
            parts = [process_range(rng, cfg, opts.workers, outputs, opts.log_interval)]
        else:
            if is_gzip(opts.input):
                ranges = split_gzip(opts.input, opts.partitions, opts.output_prefix)
                temp_inputs = [r.path for r in ranges]
            else:
                ranges = plain_partitions(opts.input, opts.partitions)
            parts = _run_partitions(ranges, cfg, opts.workers, outputs, opts)
    finally:
        for path in temp_inputs:
            if os.path.exists(path):
                os.remove(path)
    total = _summarize(parts, outputs, time.monotonic() - start)
    empty = [key for key, counts in total["keys"].items() if counts["written"] == 0]
    if empty:
        for prefix in outputs.values():
            for path in (data_file_path(prefix), index_file_path(prefix)):
                if os.path.exists(path):
                    os.remove(path)
        raise UsageError(
            f"--input {opts.input}: no document has text under --json-keys {empty[0]} (the file "
            "is empty, or every line is blank, malformed or without text); nothing was written"
        )
    return total


def _summarize(parts: list[dict], outputs: dict[str, str], elapsed: float) -> dict:
    total = {
        name: sum(p[name] for p in parts) for name in ("documents", "malformed", "blank", "bytes")
    }
    total["seconds"] = elapsed
    total["mb_per_s"] = total["bytes"] / max(elapsed, 1e-9) / 1e6
    total["keys"] = {}
    for key, prefix in outputs.items():
        counts = {n: sum(p["keys"][key][n] for p in parts) for n in ("written", "empty", "tokens")}
        total["keys"][key] = counts
        logger.info(
            "%s: %d documents, %d tokens written to %s.bin/.idx; %d empty documents skipped",
            key,
            counts["written"],
            counts["tokens"],
            prefix,
            counts["empty"],
        )
    logger.info(
        "done: %d documents (%.1f MB) in %.1f s, %.2f MB/s; %d malformed lines skipped, "
        "%d blank lines skipped",
        total["documents"],
        total["bytes"] / 1e6,
        elapsed,
        total["mb_per_s"],
        total["malformed"],
        total["blank"],
    )
    return total
