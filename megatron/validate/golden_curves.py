"""Stored golden curves: file names, moving averages, the tolerance and the comparison."""

from __future__ import annotations

import json
import os
from typing import Any

Curve = dict[str, Any]
SETTINGS = ("model", "layers", "hidden", "heads", "kv_heads", "seq", "micro_batch")
SETTINGS += (
    "global_batch",
    "iterations",
    "log_interval",
    "window",
    "lr",
    "vocab_size",
    "max_files",
)
TOLERANCE_FACTOR = 3.0
VERSION_KEYS = ("gpu", "torch", "cudnn", "triton")


def curve_path(directory: str, name: str, precision: str, seed: int) -> str:
    return os.path.join(directory, f"{name}_{precision}_seed{seed}.json")


def tolerance_path(directory: str, name: str) -> str:
    return os.path.join(directory, f"{name}_tolerance.json")


def load(path: str) -> Curve | None:
    """A stored JSON file, or None when there is none."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save(path: str, data: Curve) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def moving_averages(curve: Curve) -> dict[int, float]:
    """Mean loss of the ``window`` iterations up to each logged iteration (1-based)."""
    losses, window = curve["losses"], curve["window"]
    return {
        i: sum(losses[max(0, i - window) : i]) / len(losses[max(0, i - window) : i])
        for i in range(curve["log_interval"], len(losses) + 1, curve["log_interval"])
    }


def largest_gap(a: Curve, b: Curve) -> tuple[float, int, dict[int, tuple[float, float]]]:
    """(largest gap, its iteration, {iteration: (a, b)}) of the two moving averages."""
    ma, mb = moving_averages(a), moving_averages(b)
    pairs = {i: (ma[i], mb[i]) for i in ma if i in mb}
    worst = max(pairs, key=lambda i: abs(pairs[i][0] - pairs[i][1]))
    return abs(pairs[worst][0] - pairs[worst][1]), worst, pairs


def not_comparable(reference: Curve, now: dict[str, Any]) -> str | None:
    """Why a run described by ``now`` (hashes and settings) cannot be compared to
    ``reference``, if so: another corpus, tokenizer or recipe."""
    for key in ("corpus_sha256", "tokenizer_sha256", *SETTINGS):
        if reference.get(key) != now.get(key):
            return f"{key} recorded {reference.get(key)}, now {now.get(key)}"
    return None


def version_notes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [
        f"{k} recorded {recorded.get(k)}, now {now.get(k)}"
        for k in VERSION_KEYS
        if recorded.get(k) != now.get(k)
    ]


def update_tolerance(directory: str, name: str, seeds: tuple[int, int]) -> int:
    """Store 3 x the largest gap between the fp32 curves of ``seeds`` once both exist."""
    a, b = (load(curve_path(directory, name, "fp32", s)) for s in seeds)
    if a is None or b is None:
        print(f"tolerance: waiting for the fp32 curve of seed {seeds[1] if a else seeds[0]}")
        return 0
    if why := not_comparable(a, b):
        print(f"error: the fp32 curves of seeds {seeds} differ: {why}")
        return 3
    gap, at, _ = largest_gap(a, b)
    tolerance = {
        "tolerance": TOLERANCE_FACTOR * gap,
        "factor": TOLERANCE_FACTOR,
        "largest_seed_gap": gap,
        "at_iteration": at,
        "seeds": list(seeds),
        "window": a["window"],
        "corpus_sha256": a["corpus_sha256"],
        "tokenizer_sha256": a["tokenizer_sha256"],
    }
    save(tolerance_path(directory, name), tolerance)
    print(
        f"tolerance {tolerance['tolerance']:.4f} = {TOLERANCE_FACTOR:g} x the largest gap "
        f"{gap:.4f} (iteration {at}) between seeds {seeds[0]} and {seeds[1]}"
    )
    return 0


def compare(run: Curve, reference: Curve, tolerance: Curve) -> int:
    """0 when the run's moving average stays within the tolerance of the reference's at every
    logged iteration, else 1 (printing every logged iteration, then the summary)."""
    limit = tolerance["tolerance"]
    what = f"{run['model']} {run['precision']} seed {run['seed']} vs fp32 seed {reference['seed']}"
    if len(run["losses"]) != len(reference["losses"]):
        ran, was = len(run["losses"]), len(reference["losses"])
        print(f"FAIL {what}: {ran} iterations ran, {was} recorded")
        return 1
    gap, at, pairs = largest_gap(run, reference)
    ok = gap <= limit  # False for NaN
    if not ok:
        for i, (now, was) in pairs.items():
            mark = "" if abs(now - was) <= limit else "  over"
            gap_i = abs(now - was)
            print(f"iteration {i:5d}: {now:.4f} now, {was:.4f} recorded, gap {gap_i:.4f}{mark}")
    verdict = "PASS" if ok else "FAIL"
    print(f"{verdict} {what}: largest gap {gap:.4f} at iteration {at}, tolerance {limit:.4f}")
    return 0 if ok else 1
