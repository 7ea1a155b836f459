"""Megatron's memory-mapped indexed dataset (``MMIDIDX``): a reader that checks the files and a
writer, byte-compatible with Megatron-LM and Megatron-DeepSpeed.

``<prefix>.idx`` layout (little-endian)::

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    uint64    version (1)
    uint8     dtype code (see DTYPE_CODES)
    uint64    sequence count N
    uint64    document-index length D
    int32[N]  sizes (tokens per sequence)
    int64[N]  byte offsets of each sequence in the .bin
    int64[D]  document index: 0, then the sequence count after each document

``<prefix>.bin`` holds the tokens of all sequences back to back.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from array import array
from collections.abc import Iterable

import numpy as np

from megatron.errors import UsageError

logger = logging.getLogger(__name__)

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): code for code, t in DTYPE_CODES.items()}
_warned_long_bin: set[str] = set()


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def best_fitting_dtype(vocab_size: int | None) -> type:
    """uint16 for vocabularies under 65500 ids (Megatron's rule), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def dtype_code(dtype: np.dtype | type) -> int:
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF:
        raise ValueError(f"dtype {dtype} has no MMIDIDX code")
    return _CODE_OF[dtype]


def _map(path: str) -> np.ndarray:
    """Read-only memory map of a whole file as bytes (an empty array for an empty file)."""
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


class MMapIndex:
    """The parsed and checked ``.idx`` of a dataset (arrays are views of a memory map)."""

    def __init__(self, idx_path: str) -> None:
        if not os.path.isfile(idx_path):
            raise UsageError(f"{idx_path}: no such index file; check the dataset prefix")
        self.path = idx_path
        file_bytes = os.path.getsize(idx_path)
        if file_bytes < HEADER_BYTES:
            raise UsageError(
                f"{idx_path}: truncated index ({file_bytes} bytes, the header alone is "
                f"{HEADER_BYTES}); rebuild it with tools/preprocess_data.py"
            )
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_BYTES)
        if header[: len(MAGIC)] != MAGIC:
            raise UsageError(
                f"{idx_path}: not a Megatron MMIDIDX index (magic {header[:9]!r}, expected "
                f"{MAGIC!r}); rebuild it with tools/preprocess_data.py"
            )
        version, code, count, doc_count = struct.unpack("<QBQQ", header[len(MAGIC) :])
        if version != VERSION:
            raise UsageError(
                f"{idx_path}: index version {version} is not supported (expected {VERSION})"
            )
        if code not in DTYPE_CODES:
            raise UsageError(
                f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER_BYTES + count * (4 + 8) + doc_count * 8
        if file_bytes != expected:
            what = "truncated" if file_bytes < expected else "has trailing bytes"
            raise UsageError(
                f"{idx_path}: index {what}: {file_bytes} bytes, but {count} sequences and "
                f"{doc_count} document-index entries need {expected}; rebuild it"
            )
        buffer = _map(idx_path)
        offset = HEADER_BYTES
        self.sizes = np.frombuffer(buffer, dtype=np.int32, count=count, offset=offset)
        offset += self.sizes.nbytes
        self.pointers = np.frombuffer(buffer, dtype=np.int64, count=count, offset=offset)
        offset += self.pointers.nbytes
        self.doc_idx = np.frombuffer(buffer, dtype=np.int64, count=doc_count, offset=offset)
        self._check_arrays()

    def _check_arrays(self) -> None:
        count = len(self.sizes)
        if count and int(self.sizes.min()) < 0:
            raise UsageError(f"{self.path}: negative sequence size in the index; rebuild it")
        expected = np.zeros(count, dtype=np.int64)
        if count > 1:
            np.cumsum(self.sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=expected[1:])
        if not np.array_equal(expected, self.pointers):
            bad = int(np.argmax(expected != self.pointers))
            raise UsageError(
                f"{self.path}: byte pointer of sequence {bad} is {int(self.pointers[bad])}, "
                f"but the sizes before it put it at {int(expected[bad])}; the index is corrupt"
            )
        doc_idx = self.doc_idx
        if len(doc_idx) and (
            int(doc_idx[0]) < 0
            or int(doc_idx[-1]) > count
            or (len(doc_idx) > 1 and bool(np.any(np.diff(doc_idx) < 0)))
        ):
            raise UsageError(
                f"{self.path}: document index is not an increasing list of sequence counts "
                f"within 0..{count}; the index is corrupt"
            )

    @property
    def data_bytes(self) -> int:
        """Bytes of .bin that the index covers."""
        if len(self.sizes) == 0:
            return 0
        return int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.sizes)


class MMapIndexedDataset:
    """Read-only access to the sequences of ``<path_prefix>.bin/.idx`` without loading them.

    ``ds[i]`` is sequence ``i`` as a numpy array (a read-only view of the memory map);
    ``ds.get(i, offset, length)`` reads part of it. Pickles as its path (safe for DataLoader
    workers), not as its data.
    """

    def __init__(self, path_prefix: str) -> None:
        self._open(path_prefix)

    def _open(self, path_prefix: str) -> None:
        self.path_prefix = path_prefix
        self.index = MMapIndex(index_file_path(path_prefix))
        bin_path = data_file_path(path_prefix)
        if not os.path.isfile(bin_path):
            raise UsageError(f"{bin_path}: no such data file (its index exists); rebuild both")
        bin_bytes = os.path.getsize(bin_path)
        need = self.index.data_bytes
        if bin_bytes < need:
            raise UsageError(
                f"{bin_path}: data file is {bin_bytes} bytes but its index needs {need}; "
                "it is truncated: rebuild it"
            )
        if bin_bytes > need and bin_path not in _warned_long_bin:
            _warned_long_bin.add(bin_path)
            logger.warning(
                "%s: data file is %d bytes, longer than the %d its index covers (files from "
                "Megatron-DeepSpeed's --append-eod look like this: sequences may be shifted); "
                "loading anyway",
                bin_path,
                bin_bytes,
                need,
            )
        self._bin = _map(bin_path)

    def __getstate__(self) -> str:
        return self.path_prefix

    def all_tokens(self) -> np.ndarray:
        """Every token the index covers, as one read-only view of the memory map."""
        count = self.index.data_bytes // self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=count)

    def __setstate__(self, state: str) -> None:
        self._open(state)

    @property
    def dtype(self) -> np.dtype:
        return self.index.dtype

    @property
    def sizes(self) -> np.ndarray:
        """Tokens per sequence, ``int32 [N]``."""
        return self.index.sizes

    @property
    def doc_idx(self) -> np.ndarray:
        """Document boundaries as sequence counts, ``int64 [docs + 1]``."""
        return self.index.doc_idx

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            return [self.get(i) for i in range(start, stop, step)]
        return self.get(int(idx))

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``idx`` (to its end by default)."""
        count = len(self)
        if idx < 0:
            idx += count
        if not 0 <= idx < count:
            raise IndexError(f"sequence {idx} out of range for {self.path_prefix} ({count})")
        size = int(self.index.sizes[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"tokens {offset}:{offset + length} out of range for sequence {idx} of "
                f"{self.path_prefix} (size {size})"
            )
        start = int(self.index.pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)


class MMapIndexedDatasetBuilder:
    """Writes ``.bin`` as sequences arrive and ``.idx`` at ``finalize``.

    ``add_item`` appends one sequence, ``end_document`` closes a document (a document can
    hold several sequences), ``merge_file_`` appends another dataset of the same dtype.
    """

    def __init__(self, out_file: str, dtype: np.dtype | type = np.int64) -> None:
        self._dtype = np.dtype(dtype)
        dtype_code(self._dtype)  # fail early on an unsupported dtype
        self._bin_path = out_file
        self._data_file = open(out_file, "wb")  # closed in finalize
        self._sizes = array("i")  # int32 per sequence (compact even for 100M sequences)
        self._doc_idx = array("q", [0])  # int64 sequence count after each document

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def _as_tokens(self, tokens: Iterable[int] | np.ndarray) -> np.ndarray:
        values = np.asarray(tokens)
        if values.ndim != 1:
            values = values.reshape(-1)
        if values.size and values.dtype != self._dtype and np.issubdtype(self._dtype, np.integer):
            info = np.iinfo(self._dtype)
            low, high = int(values.min()), int(values.max())
            if low < info.min or high > info.max:
                raise UsageError(
                    f"{self._bin_path}: token id range {low}..{high} does not fit {self._dtype}"
                )
        return values.astype(self._dtype, copy=False)

    def add_item(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one sequence."""
        values = self._as_tokens(tokens)
        if values.size >= 2**31:
            raise UsageError(f"{self._bin_path}: a sequence of {values.size} tokens is too long")
        self._data_file.write(values.tobytes(order="C"))
        self._sizes.append(int(values.size))

    def end_document(self) -> None:
        """Close the current document."""
        self._doc_idx.append(len(self._sizes))

    def add_doc(self, tokens: Iterable[int] | np.ndarray, lengths: Iterable[int]) -> None:
        """Append one document made of sequences of ``lengths`` tokens, back to back."""
        values = self._as_tokens(tokens)
        lengths = [int(n) for n in lengths]
        if sum(lengths) != values.size:
            raise ValueError(f"lengths sum to {sum(lengths)} but the document has {values.size}")
        self._data_file.write(values.tobytes(order="C"))
        self._sizes.extend(lengths)
        self._doc_idx.append(len(self._sizes))

    def add_documents(
        self, tokens: np.ndarray, sizes: np.ndarray, sequences_per_doc: np.ndarray
    ) -> None:
        """Append many documents at once: ``tokens`` back to back, ``sizes [n_seq]`` tokens per
        sequence, ``sequences_per_doc [n_doc]`` sequences in each document."""
        tokens = self._as_tokens(tokens)
        sizes = np.asarray(sizes, dtype=np.int32)
        per_doc = np.asarray(sequences_per_doc, dtype=np.int64)
        if int(sizes.sum(dtype=np.int64)) != tokens.size or int(per_doc.sum()) != sizes.size:
            raise ValueError("sizes / sequences_per_doc do not match the tokens")
        self._data_file.write(tokens.tobytes(order="C"))
        base = len(self._sizes)
        self._sizes.frombytes(sizes.tobytes())
        self._doc_idx.frombytes((base + np.cumsum(per_doc)).astype(np.int64).tobytes())

    def merge_file_(self, another_prefix: str) -> None:
        """Append the dataset at ``another_prefix`` (same dtype) after what is written."""
        index = MMapIndex(index_file_path(another_prefix))
        if index.dtype != self._dtype:
            raise UsageError(
                f"{index_file_path(another_prefix)}: dtype {index.dtype} differs from "
                f"{self._dtype} of {self._bin_path}; cannot merge"
            )
        offset = len(self._sizes)
        self._sizes.frombytes(np.ascontiguousarray(index.sizes).tobytes())
        self._doc_idx.frombytes((offset + index.doc_idx[1:]).astype(np.int64).tobytes())
        with open(data_file_path(another_prefix), "rb") as f:
            shutil.copyfileobj(f, self._data_file)

    def abort(self) -> None:
        """Close and delete the partly written .bin (after an error)."""
        self._data_file.close()
        if os.path.exists(self._bin_path):
            os.remove(self._bin_path)

    def finalize(self, index_file: str) -> None:
        """Close the .bin and write the .idx (to a temporary name, then renamed)."""
        self._data_file.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int32) if self._sizes else []
        write_index(index_file, self._dtype, sizes, np.frombuffer(self._doc_idx, dtype=np.int64))


def write_index(
    index_file: str,
    dtype: np.dtype | type,
    sizes: Iterable[int] | np.ndarray,
    doc_idx: Iterable[int] | np.ndarray,
) -> None:
    """Write an ``.idx`` for sequences of ``sizes`` tokens of ``dtype`` stored back to back."""
    dtype = np.dtype(dtype)
    sizes_np = np.asarray(sizes, dtype=np.int32)
    doc_idx_np = np.asarray(doc_idx, dtype=np.int64)
    pointers = np.zeros(len(sizes_np), dtype=np.int64)
    if len(sizes_np) > 1:
        np.cumsum(sizes_np[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    tmp = f"{index_file}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<QBQQ", VERSION, dtype_code(dtype), len(sizes_np), len(doc_idx_np)))
        f.write(sizes_np.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc_idx_np.tobytes(order="C"))
    os.replace(tmp, index_file)
