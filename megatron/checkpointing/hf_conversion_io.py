"""Files of the HF conversion: our DCP checkpoints, safetensors directories, tokenizer files.

Our checkpoints are read on one CPU process whatever layout (SP, DP, ZeRO sharding) wrote
them: torch.distributed.checkpoint reassembles every tensor from the global shapes in its
metadata (``no_dist``), through the allow-listed reader of :mod:`megatron.checkpointing.safety`.
Tokenizer files are exported from the checkpoint's ``tokenizer/`` copy or from flags, never
from a path in ``meta.json``. HF weights are read only from safetensors files inside the HF
directory (pickled ``pytorch_model.bin`` is refused).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron.checkpointing.checkpointing import (
    FORMAT_VERSION,
    META,
    ONE_PROCESS_LAYOUT,
    TRACKER,
    checkpoint_dir,
    find_checkpoint,
    is_complete,
    publish_checkpoint,
    read_meta,
)
from megatron.checkpointing.checks import probe_writable, save_failure
from megatron.checkpointing.hf_conversion import (
    MODEL_ARG_KEYS,
    Tensors,
    args_from_config,
    config_from_args,
    key_mismatch,
    model_flags,
    to_hf,
)
from megatron.checkpointing.hf_conversion_import import from_hf, resize_vocab
from megatron.checkpointing.safety import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    check_storage_files,
    load_failure,
)
from megatron.errors import UsageError
from megatron.model.config import ModelConfig
from megatron.tokenizer.files import (
    FILE_ARGS,
    TOKENIZER_DIR,
    checkpoint_tokenizer_args,
    copy_tokenizer_files,
    tokenizer_args_in,
    tokenizer_sources,
)

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- our checkpoints ----
def load_model_state(load: str, iteration: int | None = None) -> tuple[Tensors, dict, str]:
    """Full CPU tensors of the model in checkpoint ``load`` (tracker or ``iteration``).

    Returns (state dict keyed by GPTModel FQNs, meta.json, checkpoint directory).
    """
    if iteration is None:
        path = find_checkpoint(load, announce=True)
        if path is None:
            raise UsageError(
                f"--load {load}: no {TRACKER} and no complete iter_* checkpoint there; not a "
                "checkpoint directory"
            )
    else:
        path = checkpoint_dir(load, iteration)
        if not is_complete(path):
            raise UsageError(f"--iteration {iteration}: {path} is missing or incomplete")
    meta = read_meta(path)
    reader = SafeFileSystemReader(path)
    check_storage_files(reader, path)
    metadata = reader.read_metadata()
    sd: Tensors = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            sd[key[len("model.") :]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not sd:
        raise UsageError(f"checkpoint {path}: no model tensors in it")
    try:
        with warnings.catch_warnings():  # "assuming ... a single process": that is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": sd}, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    except UsageError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps errors
        raise load_failure(e, path) from None
    return sd, meta, path


def checkpoint_config(sd: Tensors, meta: dict, path: str) -> ModelConfig:
    """The ModelConfig of a loaded checkpoint; its tensors must match its meta.json args."""
    config = config_from_args(meta["args"], sd["embedding.word_embeddings.weight"].shape[0])
    if mismatch := key_mismatch(sd, config):
        raise UsageError(
            f"checkpoint {path}: its tensors do not match its {META} args ({mismatch}); was it "
            "written by another model version?"
        )
    return config


def save_model_checkpoint(sd: Tensors, save: str, args: dict[str, Any], iteration: int = 0) -> str:
    """Write ``sd`` as a weights-only checkpoint of our format (load it with --finetune).

    Same layout and atomic publish as :func:`megatron.checkpointing.checkpointing.save_checkpoint`:
    DCP tensors under ``model``, the tokenizer files that ``args`` name, then meta.json,
    rename, then the tracker.
    """
    if os.path.isfile(os.path.join(save, TRACKER)) or is_complete(checkpoint_dir(save, iteration)):
        raise UsageError(f"--save {save} already holds a checkpoint; choose an empty directory")
    probe_writable(save, 0)
    final = checkpoint_dir(save, iteration)
    tmp = final + ".inprogress"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": sd}, checkpoint_id=tmp, no_dist=True)
        copy_tokenizer_files(args, tmp)
        return publish_checkpoint(save, tmp, _weights_only_meta(args, iteration))
    except (OSError, CheckpointException) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = save_failure(e, save, iteration)
        if error is None:
            raise
        raise error from None


def _weights_only_meta(args: dict[str, Any], iteration: int) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "train_state": {"iteration": iteration},
        "scheduler": {"num_steps": 0},
        "grad_scaler": {},
        "param_groups": None,  # weights only: the optimizer starts fresh
        "layout": dict(ONE_PROCESS_LAYOUT),
        "args": args,
    }


# ---- safetensors directories ----
def read_hf_dir(hf_dir: str) -> tuple[dict[str, Any], Tensors]:
    """config.json and every tensor of a local HF model directory (safetensors only)."""
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise UsageError(f"--hf-dir {hf_dir}: no config.json; give a local HF model directory")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{config_path}: cannot read ({e})") from None
    index = os.path.join(hf_dir, WEIGHTS_INDEX)
    if os.path.isfile(index):
        files = _index_files(index)
    elif os.path.isfile(os.path.join(hf_dir, WEIGHTS)):
        files = [WEIGHTS]
    else:
        pickled = [n for n in os.listdir(hf_dir) if n.endswith((".bin", ".pt", ".pth"))]
        why = f"only pickled weights ({pickled[0]}), which are never loaded" if pickled else "none"
        raise UsageError(
            f"--hf-dir {hf_dir}: no {WEIGHTS} or {WEIGHTS_INDEX} ({why}); save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    tensors: Tensors = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            raise UsageError(f"{path}: missing ({WEIGHTS_INDEX} names it); restore the file")
        try:
            tensors.update(load_file(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise UsageError(
                f"{path}: not a safetensors file ({type(e).__name__}: {str(e)[:120]}); "
                "save the model with save_pretrained(..., safe_serialization=True)"
            ) from None
    return config, tensors


def _index_files(index: str) -> list[str]:
    """The weight files ``model.safetensors.index.json`` names: safetensors beside it."""
    try:
        with open(index, "rb") as f:
            weight_map = json.loads(f.read().decode("utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"{index}: not a JSON object ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UsageError(f"{index}: no 'weight_map' of tensor names to files; restore the file")
    files = sorted(set(weight_map.values()), key=str)
    for name in files:
        if not isinstance(name, str) or not name.endswith(".safetensors"):
            raise UsageError(
                f"{index}: names {name!r} as a weight file; only .safetensors files are read"
            )
        if os.path.isabs(name) or ".." in PurePosixPath(name).parts:
            raise UsageError(f"{index}: names {name!r}, outside the HF directory; refused")
    return files


def write_safetensors_dir(
    out: str, tensors: Tensors, config: dict[str, Any], max_shard_bytes: int | None = None
) -> list[str]:
    """config.json plus model.safetensors, or shards and an index past ``max_shard_bytes``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, os.path.join(out, WEIGHTS), metadata={"format": "pt"})
        return [WEIGHTS]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    with open(os.path.join(out, WEIGHTS_INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


# ---- tokenizer files ----
def export_tokenizer(
    args: dict[str, Any],
    checkpoint: str,
    out: str,
    model_max_length: int,
    flags: Mapping[str, str | None] | None = None,
) -> tuple[list[str], Any]:
    """Copy the tokenizer files into ``out`` (HF files where we can make them): from ``flags``
    (--tokenizer-model, --vocab-file, --merge-file) if any is given, else from the
    checkpoint's ``tokenizer/`` directory; never from a path in ``meta.json``.

    Returns (files written, our tokenizer or None). A missing file is a warning, not an error:
    the weights are still worth exporting.
    """
    kind = args.get("tokenizer_type")
    given = {k: v for k, v in (flags or {}).items() if v}
    found = given or checkpoint_tokenizer_args(kind, checkpoint)
    written = []
    for src, name in tokenizer_sources(dict(found, tokenizer_type=kind)):
        if not src or not os.path.isfile(src):
            logger.warning(
                "WARNING: tokenizer file %s is missing; pass --tokenizer-model, or --vocab-file "
                "and --merge-file, to export the tokenizer",
                src or os.path.join(checkpoint, TOKENIZER_DIR, name),
            )
            continue
        shutil.copyfile(src, os.path.join(out, name))
        written.append(name)
    if not written or kind == "NullTokenizer":
        return written, None
    from megatron.tokenizer import create_tokenizer

    try:
        tokenizer = create_tokenizer(_tokenizer_namespace(args, out))
    except UsageError as e:
        logger.warning("WARNING: cannot rebuild the tokenizer (%s); eos/bos ids not set", e)
        return written, None
    if kind == "GPT2BPETokenizer":
        written += _gpt2_hf_tokenizer(out, model_max_length)
    elif kind != "HFTokenizer":
        logger.warning(
            "WARNING: copied the sentencepiece model as tokenizer.model; no HF tokenizer.json was "
            "made (load it with the transformers tokenizer class of your model family)"
        )
    return written, tokenizer


def _tokenizer_namespace(args: dict[str, Any], out: str) -> argparse.Namespace:
    """The attributes the tokenizer factory reads: the type and vocabulary size from
    meta.json args, the files as copied into ``out``."""
    kind = args.get("tokenizer_type")
    files = dict.fromkeys(FILE_ARGS) | tokenizer_args_in(kind, out)
    return argparse.Namespace(tokenizer_type=kind, vocab_size=args.get("vocab_size"), **files)


def _gpt2_hf_tokenizer(out: str, model_max_length: int) -> list[str]:
    """tokenizer.json + tokenizer_config.json from the copied vocab.json/merges.txt.

    Byte-level BPE as our GPT2BPETokenizer, with <|endoftext|> a special token as in HF GPT-2.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from megatron.tokenizer.gpt2_tokenizer import EOD_TOKEN

    bpe = models.BPE.from_file(os.path.join(out, "vocab.json"), os.path.join(out, "merges.txt"))
    fast = Tokenizer(bpe)
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    fast.decoder = decoders.ByteLevel()
    fast.add_special_tokens([AddedToken(EOD_TOKEN, special=True, normalized=False)])
    fast.save(os.path.join(out, "tokenizer.json"))
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": EOD_TOKEN,
        "eos_token": EOD_TOKEN,
        "unk_token": EOD_TOKEN,
        "add_prefix_space": False,
        "model_max_length": model_max_length,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return ["tokenizer.json", "tokenizer_config.json"]


def _special_token_ids(tokenizer, vocab: int) -> dict[str, int]:
    """bos/eos ids for config.json: the tokenizer's own eos/bos (sentencepiece), else its
    end-of-document id (GPT-2: bos = eos = <|endoftext|>); ids past the vocabulary are left out."""
    eos = getattr(tokenizer, "eos", tokenizer.eod)
    bos = getattr(tokenizer, "bos", eos if tokenizer.name == "GPT2BPETokenizer" else None)
    ids = {"eos_token_id": eos, "bos_token_id": bos}
    return {k: v for k, v in ids.items() if v is not None and 0 <= v < vocab}


# ---- the two conversions ----
def export_checkpoint(
    load: str,
    output: str,
    fmt: str,
    iteration: int | None = None,
    vocab_size: int | None = None,
    dtype: str | None = None,
    max_shard_bytes: int | None = 5 * 2**30,
    tokenizer_flags: Mapping[str, str | None] | None = None,
) -> list[str]:
    """Export checkpoint ``load`` to ``output`` as ``fmt`` ("hf" or "consolidated");
    ``tokenizer_flags``: tokenizer files given on the command line (else the checkpoint's)."""
    if os.path.exists(os.path.join(output, "config.json")):
        raise UsageError(f"--output {output} already holds a config.json; choose a new directory")
    sd, meta, path = load_model_state(load, iteration)
    config = checkpoint_config(sd, meta, path)
    cast = _DTYPES[dtype or "fp32"]
    if fmt == "consolidated":
        args = {k: v for k, v in (meta["args"]).items() if k in MODEL_ARG_KEYS}
        args.update(args_from_config(config))
        os.makedirs(output, exist_ok=True)
        files = export_tokenizer(meta["args"], path, output, config.seq_length, tokenizer_flags)[0]
        tensors = {k: v.to(cast) for k, v in sd.items()}
        files += write_safetensors_dir(output, tensors, {"megatron_ulysses_args": args})
        return files + ["config.json"]
    hf_sd, hf_config = to_hf(sd, config, vocab_size)  # refuses unmappable models first
    os.makedirs(output, exist_ok=True)
    files, tokenizer = export_tokenizer(
        meta["args"], path, output, config.seq_length, tokenizer_flags
    )
    if tokenizer is not None:
        hf_config.update(_special_token_ids(tokenizer, hf_config["vocab_size"]))
    hf_config["dtype"] = str(cast).replace("torch.", "")
    tensors = {k: v.to(cast).contiguous() for k, v in hf_sd.items()}
    files += write_safetensors_dir(output, tensors, hf_config, max_shard_bytes)
    return files + ["config.json"]


def import_hf(
    hf_dir: str, save: str, divisible_by: int = 128, seq_length: int | None = None
) -> tuple[str, list[str]]:
    """Import a local HF GPT-2/Llama directory into our checkpoint format at ``save``.

    The vocabulary is padded (zero rows) to what pretrain_gpt.py will compute from the
    tokenizer: the HF directory's own tokenizer when it has one, else config.json's vocab_size.
    Returns (checkpoint directory, the pretrain_gpt.py flags that rebuild the model).
    """
    if divisible_by < 1:
        raise UsageError(f"--make-vocab-size-divisible-by {divisible_by} must be >= 1")
    hf_config, hf_tensors = read_hf_dir(hf_dir)
    sd, config = from_hf(hf_tensors, hf_config, hf_dir)
    vocab, tokenizer_flags = config.padded_vocab_size, []
    if any(
        os.path.isfile(os.path.join(hf_dir, n)) for n in ("tokenizer.json", "tokenizer_config.json")
    ):
        from megatron.tokenizer.hf_tokenizer import HFTokenizer

        try:
            vocab = HFTokenizer(hf_dir).vocab_size
            tokenizer_flags = [
                "--tokenizer-type HFTokenizer",
                f"--tokenizer-model {os.path.abspath(hf_dir)}",
            ]
        except UsageError as e:
            logger.warning(
                "WARNING: %s: its tokenizer cannot be used (%s); pass your own", hf_dir, e
            )
    rows = -(-vocab // divisible_by) * divisible_by
    if rows < config.padded_vocab_size:
        logger.warning(
            "WARNING: %s: embedding rows %d..%d lie beyond the tokenizer's %d ids; dropped",
            hf_dir,
            rows,
            config.padded_vocab_size - 1,
            vocab,
        )
    sd = resize_vocab(sd, rows)
    config = dataclasses.replace(config, padded_vocab_size=rows)
    if seq_length is not None:
        learned = config.position_embedding_type == "learned_absolute"
        limit = config.max_position_embeddings if learned else None
        if seq_length < 1 or (limit is not None and seq_length > limit):
            raise UsageError(
                f"--seq-length {seq_length} must be >= 1"
                + (f" and <= the model's {limit} learned positions" if limit else "")
            )
        config = dataclasses.replace(config, seq_length=seq_length)
    extra = {"make_vocab_size_divisible_by": divisible_by, "imported_from": os.path.abspath(hf_dir)}
    if tokenizer_flags:
        extra.update(tokenizer_type="HFTokenizer", tokenizer_model=os.path.abspath(hf_dir))
    args = args_from_config(config, **extra)
    path = save_model_checkpoint(sd, save, args)
    flags = model_flags(args) + [f"--seq-length {config.seq_length}"] + tokenizer_flags
    return path, flags
