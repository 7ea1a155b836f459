"""MMIDIDX indexed datasets: our reader/writer against an independent one, and every
corruption giving a clear error that names the file."""

import logging
import pickle
import struct

import numpy as np
import pytest

from megatron.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder
from megatron.errors import UsageError

# --- an independent reader and writer, from the format description alone -----------------

REF_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


def write_reference_dataset(prefix, sequences, doc_ends, code=8):
    """Write ``<prefix>.bin/.idx`` byte by byte like Megatron. ``doc_ends`` are the sequence
    counts after each document (the document index is ``[0] + doc_ends``)."""
    dtype = np.dtype(REF_DTYPES[code])
    sizes, pointers, address = [], [], 0
    with open(f"{prefix}.bin", "wb") as f:
        for seq in sequences:
            f.write(np.asarray(seq, dtype=dtype).tobytes())
            sizes.append(len(seq))
            pointers.append(address)
            address += len(seq) * dtype.itemsize
    doc_idx = [0] + list(doc_ends)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))


def read_reference_dataset(prefix):
    """``(dtype, sequences, doc_idx)`` read with struct from the format description."""
    with open(f"{prefix}.idx", "rb") as f:
        data = f.read()
    assert data[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", data, 9)
    assert version == 1
    (code,) = struct.unpack_from("<B", data, 17)
    count, doc_count = struct.unpack_from("<QQ", data, 18)
    offset = 34
    sizes = struct.unpack_from(f"<{count}i", data, offset)
    offset += 4 * count
    pointers = struct.unpack_from(f"<{count}q", data, offset)
    offset += 8 * count
    doc_idx = list(struct.unpack_from(f"<{doc_count}q", data, offset))
    assert offset + 8 * doc_count == len(data)
    dtype = np.dtype(REF_DTYPES[code])
    with open(f"{prefix}.bin", "rb") as f:
        raw = f.read()
    sequences = [
        np.frombuffer(raw, dtype=dtype, count=n, offset=p).tolist() for n, p in zip(sizes, pointers)
    ]
    return dtype, sequences, doc_idx


# --- fixtures -------------------------------------------------------------------------------

SEQS = [[5, 6, 7], [1], [], [9, 8, 7, 6, 5], [65535, 0, 42]]
DOC_ENDS = [2, 3, 5]  # documents: seqs 0-1, seq 2 (empty), seqs 3-4


def _write_ours(prefix, seqs=SEQS, doc_ends=DOC_ENDS, dtype=np.uint16):
    builder = MMapIndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for i, seq in enumerate(seqs):
        builder.add_item(seq)
        if i + 1 in doc_ends:
            builder.end_document()
    builder.finalize(f"{prefix}.idx")


def test_ours_written_reads_back_independently(tmp_path):
    prefix = str(tmp_path / "ours")
    _write_ours(prefix)
    dtype, seqs, doc_idx = read_reference_dataset(prefix)
    assert dtype == np.uint16 and seqs == SEQS and doc_idx == [0] + DOC_ENDS


@pytest.mark.parametrize("code", sorted(REF_DTYPES))
def test_reference_written_reads_with_ours(tmp_path, code):
    prefix = str(tmp_path / f"ref{code}")
    seqs = [[1, 2, 3], [4], [], [5, 6, 120]]
    write_reference_dataset(prefix, seqs, [1, 4], code=code)
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == np.dtype(REF_DTYPES[code])
    assert len(ds) == 4 and ds.sizes.tolist() == [3, 1, 0, 3]
    assert ds.doc_idx.tolist() == [0, 1, 4]
    assert [ds[i].tolist() for i in range(4)] == seqs
    assert [s.tolist() for s in ds[1:4]] == seqs[1:4]
    assert ds[-1].tolist() == [5, 6, 120]
    assert ds.get(3, offset=1).tolist() == [6, 120]
    assert ds.get(0, offset=1, length=1).tolist() == [2]
    assert ds.get(0, length=2).tolist() == [1, 2]
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=2)
    with pytest.raises(IndexError):
        ds[4]


def test_both_writers_are_byte_identical(tmp_path):
    ours, ref = str(tmp_path / "ours"), str(tmp_path / "ref")
    _write_ours(ours)
    write_reference_dataset(ref, SEQS, DOC_ENDS, code=8)
    for ext in (".bin", ".idx"):
        assert open(ours + ext, "rb").read() == open(ref + ext, "rb").read()


def test_add_doc_add_documents_and_merge(tmp_path):
    a, b, merged = (str(tmp_path / n) for n in ("a", "b", "merged"))
    builder = MMapIndexedDatasetBuilder(f"{a}.bin", dtype=np.int32)
    builder.add_doc([1, 2, 3, 4], [3, 1])
    builder.add_documents(np.array([5, 6, 7]), np.array([2, 1]), np.array([1, 1]))
    builder.finalize(f"{a}.idx")
    _write_ours(b, dtype=np.int32)
    builder = MMapIndexedDatasetBuilder(f"{merged}.bin", dtype=np.int32)
    builder.merge_file_(a)
    builder.merge_file_(b)
    builder.finalize(f"{merged}.idx")
    ds = MMapIndexedDataset(merged)
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 3], [4], [5, 6], [7]] + SEQS
    assert ds.doc_idx.tolist() == [0, 2, 3, 4] + [4 + e for e in DOC_ENDS]
    with pytest.raises(UsageError, match="cannot merge"):
        other = MMapIndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.uint16)
        other.merge_file_(a)


def test_builder_rejects_ids_outside_dtype(tmp_path):
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.uint16)
    with pytest.raises(UsageError, match="does not fit uint16"):
        builder.add_item(np.array([1, 70000], dtype=np.int64))


def test_pickles_as_path(tmp_path):
    prefix = str(tmp_path / "p")
    _write_ours(prefix)
    ds = MMapIndexedDataset(prefix)
    blob = pickle.dumps(ds)
    assert len(blob) < 200 + len(prefix)
    assert pickle.loads(blob)[3].tolist() == SEQS[3]


# --- corruption -----------------------------------------------------------------------------


def _corrupt(tmp_path, edit_idx=None, edit_bin=None):
    prefix = str(tmp_path / "c")
    write_reference_dataset(prefix, SEQS, DOC_ENDS, code=8)
    for ext, edit in ((".idx", edit_idx), (".bin", edit_bin)):
        if edit is not None:
            data = bytearray(open(prefix + ext, "rb").read())
            open(prefix + ext, "wb").write(bytes(edit(data)))
    return prefix


def _set(offset, value):
    def edit(data):
        data[offset : offset + len(value)] = value
        return data

    return edit


@pytest.mark.parametrize(
    "edit_idx, edit_bin, ext, message",
    [
        (_set(0, b"XXIDIDX"), None, ".idx", "not a Megatron MMIDIDX index"),
        (_set(9, struct.pack("<Q", 2)), None, ".idx", "version 2 is not supported"),
        (_set(17, b"\x09"), None, ".idx", "unknown dtype code 9"),
        (lambda d: d[:-3], None, ".idx", "index truncated"),
        (lambda d: d[:20], None, ".idx", "truncated index"),
        (lambda d: d + b"\x00" * 8, None, ".idx", "trailing bytes"),
        (_set(34 + 4 * 5 + 8, struct.pack("<q", 4)), None, ".idx", "byte pointer of sequence 1"),
        (_set(34, struct.pack("<i", -1)), None, ".idx", "negative sequence size"),
        (lambda d: d[:-8] + struct.pack("<q", 9), None, ".idx", "document index"),
        (None, lambda d: d[:-2], ".bin", "truncated"),
    ],
)
def test_corruption_errors_name_the_file(tmp_path, edit_idx, edit_bin, ext, message):
    prefix = _corrupt(tmp_path, edit_idx, edit_bin)
    with pytest.raises(UsageError, match=message) as info:
        MMapIndexedDataset(prefix)
    assert str(info.value).startswith(prefix + ext)


def test_missing_files_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="nope.idx: no such index file"):
        MMapIndexedDataset(str(tmp_path / "nope"))
    prefix = _corrupt(tmp_path)
    (tmp_path / "c.bin").unlink()
    with pytest.raises(UsageError, match=r"c\.bin: no such data file"):
        MMapIndexedDataset(prefix)


def test_long_bin_loads_with_one_warning(tmp_path, caplog):
    # Megatron-DeepSpeed's --append-eod wrote the EOD tokens without counting them.
    prefix = _corrupt(tmp_path, edit_bin=lambda d: d + b"\x00\x01" * 3)
    with caplog.at_level(logging.WARNING, logger="megatron.data.indexed_dataset"):
        ds = MMapIndexedDataset(prefix)
        MMapIndexedDataset(prefix)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{prefix}.bin" in warnings[0].getMessage()
    assert [ds[i].tolist() for i in range(len(ds))] == SEQS
