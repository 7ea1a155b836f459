"""GPT datasets: Megatron's index maps, splits, blending, caching, samplers and batches."""

import argparse
import os

import numpy as np
import pytest
import torch
from test_indexed_dataset import write_reference_dataset

from megatron.data import helpers, index_cache
from megatron.data.batch import (
    get_batch_from_samples,
    get_ltor_masks_and_position_ids,
    slice_batch_for_sequence_parallel,
)
from megatron.data.blendable_dataset import BlendableDataset
from megatron.data.dataset_utils import parse_blend, split_boundaries
from megatron.data.gpt_dataset import (
    GPTDataset,
    MockGPTDataset,
    build_index_maps,
    build_train_valid_test_datasets,
)
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.samplers import (
    MegatronPretrainingRandomSampler,
    MegatronPretrainingSampler,
    build_pretraining_data_loader,
)
from megatron.errors import UsageError

EOD = 99


def _make_dataset(prefix, num_docs=40, seed=0, eod=EOD):
    """Documents of 0-30 random tokens (some empty) + EOD, written by the independent writer.
    Token values encode (document, position) so samples can be checked."""
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(num_docs):
        n = int(rng.integers(0, 30)) if d % 7 else 0
        docs.append([(d * 31 + i) % 97 for i in range(n)] + ([eod] if n else []))
    write_reference_dataset(prefix, docs, list(range(1, num_docs + 1)), code=8)
    return docs


# --- index maps against a port of Megatron's C++ loop -------------------------------------


def _megatron_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch):
    """Megatron's helpers.cpp build_sample_idx, line for line in Python."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    sample_index, doc_idx_index, doc_offset = 1, 0, 0
    while sample_index <= num_samples:
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = sizes[doc_idx[doc_idx_index]] - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                doc_idx_index += 1
                doc_offset = 0
        out[sample_index] = (doc_idx_index, doc_offset)
        sample_index += 1
    return out


@pytest.mark.parametrize("seq_length", [1, 5, 16, 64])
def test_sample_idx_matches_megatron_loop(seq_length):
    rng = np.random.default_rng(seq_length)
    sizes = rng.integers(0, 20, size=50).astype(np.int32)
    sizes[0] = 0  # an empty first document too
    documents = np.arange(50)
    tokens = int(sizes.sum())
    for epochs in (1, 3):
        doc_idx = helpers.build_doc_idx(documents, epochs, np.random.RandomState(1), epochs > 1)
        ours = helpers.build_sample_idx(sizes, doc_idx, seq_length, epochs * tokens)
        ref = _megatron_sample_idx(sizes, doc_idx, seq_length, epochs, tokens)
        np.testing.assert_array_equal(ours, ref)


def test_doc_idx_and_shuffle_follow_megatron():
    documents = np.arange(3, 13)
    rng = np.random.RandomState(5)
    doc_idx = helpers.build_doc_idx(documents, 3, rng, separate_last=True)
    # Megatron: epochs 1-2 shuffled together, then the last epoch on its own.
    assert sorted(doc_idx[:20].tolist()) == sorted(documents.tolist() * 2)
    assert sorted(doc_idx[20:].tolist()) == documents.tolist()
    expected = np.random.RandomState(5)
    first = np.tile(documents.astype(np.int32), 2)
    expected.shuffle(first)
    np.testing.assert_array_equal(doc_idx[:20], first)
    shuffle = helpers.build_shuffle_idx(7, 10, np.random.RandomState(2))
    assert sorted(shuffle[:7].tolist()) == list(range(7))
    assert sorted(shuffle[7:].tolist()) == [7, 8, 9]
    assert helpers.num_epochs_needed(100, 10, 9) == 1  # (100 - 1) // 10 = 9 samples
    assert helpers.num_epochs_needed(100, 10, 10) == 2


def _stream(docs, doc_idx):
    return np.concatenate([np.asarray(docs[d], dtype=np.int64) for d in doc_idx])


def test_gpt_dataset_samples_cross_documents(tmp_path):
    prefix = str(tmp_path / "data")
    docs = _make_dataset(prefix)
    indexed = MMapIndexedDataset(prefix)
    documents = np.arange(5, 35)
    ds = GPTDataset("train", prefix, indexed, documents, 100, 16, seed=3)
    assert len(ds) >= 100
    # Unshuffled sample k is tokens k*16 .. k*16+16 of the documents laid end to end.
    stream = _stream(docs, ds.doc_idx)
    for idx in range(len(ds)):
        k = int(ds.shuffle_idx[idx])
        text = ds[idx]["text"]
        assert text.dtype == np.int64 and text.shape == (17,)
        np.testing.assert_array_equal(text, stream[k * 16 : k * 16 + 17])
    assert sorted(set(ds.doc_idx.tolist())) == documents.tolist()  # empty ones included
    assert any(len(docs[d]) == 0 for d in documents)
    assert sorted(ds.shuffle_idx.tolist()) == list(range(len(ds)))


def test_cache_files_reused_and_keyed_by_parameters(tmp_path):
    prefix = str(tmp_path / "data")
    _make_dataset(prefix)
    indexed = MMapIndexedDataset(prefix)
    cache = str(tmp_path / "cache")
    docs = np.arange(0, 30)
    a = GPTDataset("train", prefix, indexed, docs, 50, 8, seed=1, cache_dir=cache)
    files = sorted(os.listdir(cache))
    assert len([f for f in files if f.endswith(".npy")]) == 3
    assert not any(".tmp" in f for f in files)
    b = GPTDataset("train", prefix, indexed, docs, 50, 8, seed=1, cache_dir=cache)
    assert sorted(os.listdir(cache)) == files  # loaded, not rebuilt
    np.testing.assert_array_equal(a.shuffle_idx, b.shuffle_idx)
    for kw in (dict(seed=2), dict(num_samples=60), dict(seq_length=9)):
        params = dict(num_samples=50, seq_length=8, seed=1) | kw
        GPTDataset("train", prefix, indexed, docs, cache_dir=cache, **params)
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 12
    # A fresh build elsewhere (another node, another run) gives identical samples.
    c = GPTDataset("train", prefix, indexed, docs, 50, 8, seed=1, cache_dir=str(tmp_path / "c2"))
    d = GPTDataset("train", prefix, indexed, docs, 50, 8, seed=2)
    assert all(np.array_equal(a[i]["text"], c[i]["text"]) for i in range(len(a)))
    assert not all(np.array_equal(a[i]["text"], d[i]["text"]) for i in range(len(a)))


def test_non_builder_rank_waits_and_loads(tmp_path, monkeypatch):
    prefix = str(tmp_path / "data")
    _make_dataset(prefix)
    indexed = MMapIndexedDataset(prefix)
    cache = str(tmp_path / "cache")
    monkeypatch.setattr(index_cache, "is_local_builder", lambda: False)
    with pytest.raises(UsageError, match="index-cache file missing"):
        GPTDataset("train", prefix, indexed, np.arange(30), 20, 8, seed=1, cache_dir=cache)
    monkeypatch.undo()
    built = GPTDataset("train", prefix, indexed, np.arange(30), 20, 8, seed=1, cache_dir=cache)
    monkeypatch.setattr(index_cache, "is_local_builder", lambda: False)
    loaded = GPTDataset("train", prefix, indexed, np.arange(30), 20, 8, seed=1, cache_dir=cache)
    assert all(np.array_equal(built[i]["text"], loaded[i]["text"]) for i in range(len(built)))


def _rank_samples(prefix, cache):
    """On each rank of a gloo world: rank 0 builds the cache while rank 1 waits."""
    indexed = MMapIndexedDataset(prefix)
    ds = GPTDataset("train", prefix, indexed, np.arange(30), 40, 8, seed=4, cache_dir=cache)
    return [ds[i]["text"].tolist() for i in range(len(ds))]


def test_ranks_share_one_cache_build(tmp_path):
    from dist_helper import get_world

    prefix = str(tmp_path / "data")
    _make_dataset(prefix)
    cache = str(tmp_path / "cache")
    rank0, rank1 = get_world(2).run(_rank_samples, prefix, cache)
    assert rank0 == rank1
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 3


def test_index_maps_of_a_large_corpus_build_fast():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 2000, size=200_000).astype(np.int32)  # ~200M tokens
    tokens = int(sizes.sum(dtype=np.int64))
    maps = build_index_maps(sizes, np.arange(len(sizes)), tokens // 32768, 32768, 1, tokens, 1)
    assert maps["sample_idx"].shape == (tokens // 32768 + 1, 2)


# --- splits and the args entry point ------------------------------------------------------


def test_split_boundaries():
    assert split_boundaries("949,50,1", 1000) == [0, 949, 999, 1000]
    assert split_boundaries("98,2,0", 100) == [0, 98, 100, 100]
    assert split_boundaries("98/2/0", 100) == [0, 98, 100, 100]
    assert split_boundaries("1", 17) == [0, 17, 17, 17]
    assert split_boundaries("969, 30, 1", 10) == [0, 10, 10, 10]
    assert split_boundaries("1,1,1", 7) == [0, 3, 5, 7]  # rounding excess moves boundaries
    for bad in ("a,b", "0,0,0", "-1,2"):
        with pytest.raises(UsageError, match="--split"):
            split_boundaries(bad, 10)


def _args(**kw):
    base = dict(
        data_path=None,
        train_data_path=None,
        valid_data_path=None,
        test_data_path=None,
        split="969, 30, 1",
        data_cache_path=None,
        seq_length=8,
        seed=1234,
        mock_data=False,
    )
    return argparse.Namespace(**(base | kw))


class _Tok:
    vocab_size = 128
    eod = EOD


def test_build_with_split(tmp_path):
    prefix = str(tmp_path / "data")
    _make_dataset(prefix, num_docs=100)
    args = _args(data_path=[prefix], split="80,10,10")
    train, valid, test = build_train_valid_test_datasets(args, [200, 20, 10], _Tok())
    assert len(train) >= 200 and len(valid) >= 20 and len(test) >= 10
    assert set(np.unique(train.doc_idx)) <= set(range(0, 80))
    assert set(np.unique(valid.doc_idx)) <= set(range(80, 90))
    assert set(np.unique(test.doc_idx)) <= set(range(90, 100))
    assert os.path.isdir(tmp_path / "index-cache")  # default cache beside the data
    train2, valid2, test2 = build_train_valid_test_datasets(
        _args(data_path=[prefix], split="98,2,0", data_cache_path=str(tmp_path / "c")),
        [50, 5, 5],
        _Tok(),
    )
    assert test2 is None and valid2 is not None
    assert os.listdir(tmp_path / "c")


def test_build_with_separate_paths_and_errors(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _make_dataset(a, seed=1)
    _make_dataset(b, seed=2)
    train, valid, test = build_train_valid_test_datasets(
        _args(train_data_path=[a], valid_data_path=[b]), [30, 10, 0], _Tok()
    )
    assert test is None and valid.name == "valid"
    assert len(np.unique(train.doc_idx)) == len(np.unique(valid.doc_idx))  # whole prefixes
    with pytest.raises(UsageError, match="--data-path .*nope.idx not found"):
        build_train_valid_test_datasets(
            _args(data_path=[str(tmp_path / "nope")]), [1, 1, 1], _Tok()
        )
    with pytest.raises(UsageError, match="both given"):
        build_train_valid_test_datasets(
            _args(data_path=[a], train_data_path=[b]), [1, 1, 1], _Tok()
        )
    with pytest.raises(UsageError, match="no training data"):
        build_train_valid_test_datasets(_args(), [1, 1, 1], _Tok())
    with pytest.raises(UsageError, match="weight prefix"):
        build_train_valid_test_datasets(_args(data_path=["0.5", a, b]), [1, 1, 1], _Tok())


def test_mock_data_is_deterministic():
    args = _args(mock_data=True, seq_length=32)
    train, valid, test = build_train_valid_test_datasets(args, [10, 4, 0], _Tok())
    assert test is None and len(train) == 10
    again = build_train_valid_test_datasets(args, [10, 4, 0], _Tok())[0]
    samples = np.stack([train[i]["text"] for i in range(10)])
    assert samples.shape == (10, 33) and samples.min() >= 0 and samples.max() < 128
    assert np.array_equal(samples, np.stack([again[i]["text"] for i in range(10)]))
    assert not np.array_equal(train[0]["text"], valid[0]["text"])
    assert (samples == EOD).any()
    assert isinstance(train, MockGPTDataset)


# --- blending -------------------------------------------------------------------------------


def _megatron_blending(weights, size):
    """Megatron's helpers.cpp build_blending_indices in Python."""
    index, sample, current = [], [], [0] * len(weights)
    for t in range(size):
        scale = max(float(t), 1.0)
        errors = [w * scale - c for w, c in zip(weights, current)]
        best = max(range(len(weights)), key=lambda d: (errors[d], -d))
        index.append(best)
        sample.append(current[best])
        current[best] += 1
    return index, sample


def test_blending_indices_match_megatron_and_weights():
    for weights in ([0.3, 0.7], [0.5, 0.25, 0.25], [0.1, 0.6, 0.05, 0.25]):
        index, sample = helpers.build_blending_indices(weights, 2000)
        ref_index, ref_sample = _megatron_blending(weights, 2000)
        assert index.tolist() == ref_index and sample.tolist() == ref_sample
        for n in (100, 1000, 2000):
            shares = np.bincount(index[:n], minlength=len(weights)) / n
            assert np.abs(shares - weights).max() < 0.01


def test_blend_from_data_path(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _make_dataset(a, seed=1)
    _make_dataset(b, seed=2)
    assert parse_blend(["0.3", a, "0.7", b], "--data-path") == ([a, b], [0.3, 0.7])
    args = _args(data_path=["3", a, "7", b], split="1", seq_length=4)
    train, valid, test = build_train_valid_test_datasets(args, [1000, 0, 0], _Tok())
    assert isinstance(train, BlendableDataset) and valid is None and test is None
    assert len(train) == 1000
    shares = np.bincount(train.dataset_index, minlength=2) / 1000
    assert abs(shares[0] - 0.3) < 0.01 and abs(shares[1] - 0.7) < 0.01
    # Components were asked for 1.005x their share; each sample comes from its component.
    assert len(train.datasets[0]) >= 302 and len(train.datasets[1]) >= 704
    for i in (0, 1, 500, 999):
        d, s = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        assert np.array_equal(train[i]["text"], train.datasets[d][s]["text"])
    again = build_train_valid_test_datasets(args, [1000, 0, 0], _Tok())[0]
    assert np.array_equal(again.dataset_index, train.dataset_index)


# --- samplers -------------------------------------------------------------------------------


def test_pretraining_sampler_resumes_exactly():
    total, mbs, dp = 103, 2, 3
    full = [list(MegatronPretrainingSampler(total, 0, mbs, r, dp)) for r in range(dp)]
    seen = sorted(i for rank in full for batch in rank for i in batch)
    assert seen == list(range(total // (mbs * dp) * mbs * dp))
    assert full[1][0] == [2, 3] and full[2][1] == [10, 11]
    for step in (1, 5, 16):
        for r in range(dp):
            resumed = list(MegatronPretrainingSampler(total, step * mbs * dp, mbs, r, dp))
            assert resumed == full[r][step:]
    tail = list(MegatronPretrainingSampler(total, 0, mbs, 0, dp, drop_last=False))
    assert tail[-1] == [102]


def test_random_sampler_resumes_exactly():
    ds = list(range(50))
    for sharding in (True, False):
        full = [
            list(MegatronPretrainingRandomSampler(ds, 50, 0, 2, r, 2, data_sharding=sharding))
            for r in range(2)
        ]
        epoch = sorted(i for rank in full for batch in rank for i in batch)
        assert epoch == sorted(set(epoch)) and len(epoch) == 48
        for step in (3, 7):
            for r in range(2):
                resumed = MegatronPretrainingRandomSampler(ds, 50, step * 4, 2, r, 2, sharding)
                assert list(resumed) == full[r][step:]
        # The next pass over the sampler is the next epoch, shuffled differently.
        sampler = MegatronPretrainingRandomSampler(ds, 50, 0, 2, 0, 2, sharding)
        first, second = list(sampler), list(sampler)
        assert first != second and sampler.epoch == 1


@pytest.mark.parametrize("num_workers", [0, 1])
def test_data_loader(tmp_path, num_workers):
    prefix = str(tmp_path / "data")
    _make_dataset(prefix)
    ds = GPTDataset("train", prefix, MMapIndexedDataset(prefix), np.arange(40), 40, 8, seed=0)
    args = argparse.Namespace(micro_batch_size=4, num_workers=num_workers, dataloader_type="single")
    loader = build_pretraining_data_loader(ds, 8, args, dp_rank=1, dp_size=2)
    batches = list(loader)
    assert batches[0]["text"].shape == (4, 9) and batches[0]["text"].dtype == torch.int64
    expected = np.stack([ds[i]["text"] for i in (12, 13, 14, 15)])
    assert np.array_equal(batches[0]["text"].numpy(), expected)
    assert build_pretraining_data_loader(None, 0, args, 0, 1) is None
    args.dataloader_type = "bogus"
    with pytest.raises(UsageError, match="--dataloader-type"):
        build_pretraining_data_loader(ds, 0, args, 0, 1)


# --- batches --------------------------------------------------------------------------------


def _megatron_masks(tokens, eod, reset_position_ids, reset_attention_mask, eod_mask_loss):
    """Megatron's get_ltor_masks_and_position_ids loop with its dense mask, in plain Python."""
    b, s = len(tokens), len(tokens[0])
    allowed = [[[j <= i for j in range(s)] for i in range(s)] for _ in range(b)]
    loss = [[0.0 if (eod_mask_loss and t == eod) else 1.0 for t in row] for row in tokens]
    positions = [list(range(s)) for _ in range(b)]
    for r in range(b):
        prev = 0
        for i in [i for i in range(s) if tokens[r][i] == eod]:
            if reset_attention_mask:
                for row in range(i + 1, s):
                    for col in range(i + 1):
                        allowed[r][row][col] = False
            if reset_position_ids:
                for k in range(i + 1, s):
                    positions[r][k] -= i + 1 - prev
                prev = i + 1
    return allowed, loss, positions


@pytest.mark.parametrize("flags", [(False, False, False), (True, True, True), (True, False, True)])
def test_masks_and_positions_match_megatron(flags):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 6, size=(3, 24))
    tokens[0, -1] = 5  # EOD at the very end
    tokens[1, 0] = 5  # and at the very start
    eod = 5
    masks = get_ltor_masks_and_position_ids(torch.from_numpy(tokens), eod, *flags)
    allowed, loss, positions = _megatron_masks(tokens.tolist(), eod, *flags)
    assert masks.loss_mask.dtype == torch.float and masks.position_ids.dtype == torch.long
    assert masks.loss_mask.tolist() == loss and masks.position_ids.tolist() == positions
    if flags[1]:
        doc = masks.doc_ids
        assert doc.dtype == torch.int32 and doc.shape == (3, 24)
        dense = (doc[:, :, None] == doc[:, None, :]) & torch.ones(24, 24, dtype=torch.bool).tril()
        assert dense.tolist() == allowed
    else:
        assert masks.doc_ids is None


def test_batch_and_sequence_parallel_slices():
    text = torch.arange(2 * 17).reshape(2, 17) % 7  # EOD 6 appears inside
    batch = get_batch_from_samples(text, 6, True, True, True)
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    sp = 4
    slices = [slice_batch_for_sequence_parallel(batch, r, sp) for r in range(sp)]
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert all(s[key].shape == (2, 4) for s in slices)
        assert torch.equal(torch.cat([s[key] for s in slices], dim=1), batch[key])
    assert all(s["doc_ids"] is batch["doc_ids"] for s in slices)  # kept whole: [b, s]
    with pytest.raises(UsageError, match="not divisible"):
        slice_batch_for_sequence_parallel(batch, 0, 3)


def test_padding_for_sharding():
    """17 tokens over 4 ranks: 3 padding tokens at the end, out of the loss, in a document of
    their own, at a valid position."""
    from megatron.data.batch import pad_batch_for_sharding, sequence_shard_unit

    text = torch.arange(2 * 18).reshape(2, 18) % 7
    batch = get_batch_from_samples(text, 6, True, True, True)
    assert sequence_shard_unit(4) == 4 and sequence_shard_unit(4, cp=2) == 16
    assert pad_batch_for_sharding(batch, 1) is batch
    padded = pad_batch_for_sharding(batch, 4)
    for key in ("tokens", "labels", "loss_mask", "position_ids", "doc_ids"):
        assert padded[key].shape == (2, 20)
        assert torch.equal(padded[key][:, :17], batch[key])
    assert (padded["loss_mask"][:, 17:] == 0).all()
    assert (padded["position_ids"][:, 17:] == 0).all()
    assert torch.equal(padded["doc_ids"][:, 17:], batch["doc_ids"][:, -1:].expand(2, 3) + 1)
    slices = [slice_batch_for_sequence_parallel(padded, r, 4) for r in range(4)]
    assert all(s["tokens"].shape == (2, 5) for s in slices)
