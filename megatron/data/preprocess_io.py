"""Input side of tools/preprocess_data.py: opening (plain or gzip) JSONL, cutting it into
byte ranges for partitions, reading chunks of lines, and progress logging."""

from __future__ import annotations

import gzip
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

logger = logging.getLogger(__name__)

CHUNK_LINES = 512  # lines per unit of work sent to a worker
CHUNK_BYTES = 1 << 20  # ... or fewer when the lines are long
_BLOCK = 1 << 24


def is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def open_input(path: str) -> BinaryIO:
    """The decompressed bytes of ``path`` (gzip detected by its magic number)."""
    if is_gzip(path):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


@dataclass(frozen=True)
class InputRange:
    """Lines of ``path`` from byte ``start`` to ``end`` (None: to the end), which are
    numbered from ``first_line`` in ``display_name`` (the file the user named)."""

    path: str
    start: int
    end: int | None
    first_line: int
    display_name: str
    label: str = ""


def plain_partitions(path: str, parts: int) -> list[InputRange]:
    """``parts`` contiguous ranges of whole lines of about equal size."""
    size = os.path.getsize(path)
    starts = [0]
    with open(path, "rb") as f:
        for k in range(1, parts):
            target = k * size // parts
            if target <= starts[-1]:
                starts.append(starts[-1])
                continue
            f.seek(target - 1)
            f.readline()  # finish the line holding byte target-1
            starts.append(max(f.tell(), starts[-1]))
    ends = starts[1:] + [size]
    ranges, line = [], 1
    for k, (start, end) in enumerate(zip(starts, ends)):
        ranges.append(InputRange(path, start, end, line, path, f"partition {k + 1}/{parts}"))
        line += count_newlines_between(path, start, end)
    return ranges


def count_newlines_between(path: str, start: int, end: int) -> int:
    count = 0
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            block = f.read(min(_BLOCK, left))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count


def split_gzip(path: str, parts: int, out_prefix: str) -> list[InputRange]:
    """Decompress ``path`` into ``parts`` plain files of whole lines (cut where the
    compressed position passes each ``k/parts``), for partitions to read in parallel."""
    compressed = max(os.path.getsize(path), 1)
    ranges: list[InputRange] = []
    line = 1
    with gzip.open(path, "rb") as f:
        raw = f.fileobj  # type: ignore[attr-defined]
        for k in range(parts):
            part_path = f"{out_prefix}.partition{k}.jsonl"
            lines = 0
            with open(part_path, "wb") as out:
                limit = (k + 1) * compressed / parts
                while k == parts - 1 or raw.tell() < limit:
                    chunk = f.readlines(CHUNK_BYTES)
                    if not chunk:
                        break
                    out.writelines(chunk)
                    lines += len(chunk)
            ranges.append(InputRange(part_path, 0, None, line, path, f"partition {k + 1}/{parts}"))
            line += lines
    return ranges


def iter_chunks(rng: InputRange) -> Iterator[tuple[int, list[bytes], float]]:
    """``(first line number, lines, fraction of the range read)`` for chunks of the range."""
    with open_input(rng.path) as f:
        raw = getattr(f, "fileobj", None)  # gzip: progress from the compressed position
        total_raw = os.path.getsize(rng.path) if raw is not None else 0
        if rng.start:
            f.seek(rng.start)
        pos = rng.start
        line_no = rng.first_line
        span = (rng.end - rng.start) if rng.end is not None else None
        while rng.end is None or pos < rng.end:
            lines: list[bytes] = []
            size = 0
            while len(lines) < CHUNK_LINES and size < CHUNK_BYTES:
                if rng.end is not None and pos + size >= rng.end:
                    break
                line = f.readline()
                if not line:
                    break
                lines.append(line)
                size += len(line)
            if not lines:
                return
            pos += size
            if span:
                fraction = (pos - rng.start) / span
            elif raw is not None and total_raw:
                fraction = min(raw.tell() / total_raw, 1.0)
            else:
                fraction = float("nan")
            yield line_no, lines, fraction
            line_no += len(lines)


class Progress:
    """Logs documents, throughput and ETA every ``interval`` documents."""

    def __init__(self, interval: int, label: str = "") -> None:
        self.interval = interval
        self.label = f"[{label}] " if label else ""
        self.start = time.monotonic()
        self.docs = 0
        self.bytes = 0
        self._next = interval

    def update(self, docs: int, nbytes: int, fraction: float) -> None:
        self.docs += docs
        self.bytes += nbytes
        if self.docs < self._next:
            return
        self._next = (self.docs // self.interval + 1) * self.interval
        elapsed = max(time.monotonic() - self.start, 1e-9)
        msg = (
            f"{self.label}processed {self.docs} documents "
            f"({self.docs / elapsed:.0f} docs/s, {self.bytes / elapsed / 1e6:.2f} MB/s)"
        )
        if fraction == fraction and 0 < fraction < 1:  # known, not NaN
            eta = elapsed * (1 - fraction) / fraction
            msg += f", {100 * fraction:.1f}% of input, ETA {_hms(eta)}"
        logger.info(msg)

    def rate(self) -> float:
        """MB/s so far."""
        return self.bytes / max(time.monotonic() - self.start, 1e-9) / 1e6


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
