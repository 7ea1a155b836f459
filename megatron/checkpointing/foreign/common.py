"""What a reader of a foreign checkpoint hands to the import: weights and Adam state under
our FQNs (tensor-parallel ranks merged, QKV rows still in the source's order)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from megatron.errors import UsageError

Tensors = dict[str, torch.Tensor]


@dataclasses.dataclass
class ForeignCheckpoint:
    layout: str  # what was recognised, e.g. "Megatron-LM legacy torch (TP 2, PP 1)"
    directory: str  # the directory of the iteration read
    args: dict[str, Any]  # Megatron's args
    iteration: int
    weights: Tensors  # our FQNs; fp32 master weights where the checkpoint has them
    qkv_interleaved: bool  # Megatron's per-group QKV rows (else [q | k | v] already)
    exp_avg: Tensors | None = None
    exp_avg_sq: Tensors | None = None
    step: int | None = None
    scheduler_steps: int | None = None  # the LR scheduler's num_steps (samples)
    vocab_divisor: int = 1  # Megatron pads the vocabulary to a multiple of this


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts of tensors (Megatron's state_dict_for_save_checkpoint) -> dotted keys."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif prefix:
        out[prefix[:-1]] = tree
    return out


def as_int(value: Any) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return int(value.item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    return None


def read_text_tracker(path: str, pattern: str) -> str:
    """A tracker file's content (``latest``: a tag; Megatron's: a number or ``release``)."""
    try:
        with open(path, "rb") as f:
            text = f.read(256).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read the tracker ({type(e).__name__})") from None
    if not re.fullmatch(pattern, text):
        raise UsageError(f"{path}: expected {pattern}, found {text[:40]!r}; fix or delete the file")
    return text


def pipe_names(names: list[str]) -> dict[str, str]:
    """DeepSpeed PipelineModule names (``tied_modules.embed.X``, ``<layer index>.X``) ->
    Megatron-DeepSpeed's legacy names (``language_model.embedding.X``, ``...encoder.layers.N.X``).

    The layer indices count GPTModelPipe's specs (functions included); transformer layers
    are numbered in index order, and the norm after the last of them is the final norm.
    """
    out: dict[str, str] = {}
    layer_idx: set[int] = set()
    for name in names:
        m = re.fullmatch(
            r"(\d+)\.(self_attention|mlp|input_layernorm|post_attention_layernorm)\..*", name
        )
        if m:
            layer_idx.add(int(m.group(1)))
    order = {idx: n for n, idx in enumerate(sorted(layer_idx))}
    last = max(layer_idx, default=-1)
    for name in names:
        if name.startswith("tied_modules.embed."):
            out[name] = "language_model.embedding." + name[len("tied_modules.embed.") :]
            continue
        m = re.fullmatch(r"(\d+)\.(.*)", name)
        if not m:
            out[name] = name  # not a pipeline name
            continue
        idx, rest = int(m.group(1)), m.group(2)
        if idx in order:
            out[name] = f"language_model.encoder.layers.{order[idx]}.{rest}"
        elif rest.startswith(("word_embeddings.", "position_embeddings.")):
            out[name] = "language_model.embedding." + rest
        elif rest == "lm_head.weight":
            out[name] = "language_model.output_layer.weight"
        elif rest in ("weight", "bias") and idx > last:
            out[name] = "language_model.encoder.final_layernorm." + rest
        else:
            raise UsageError(f"pipeline parameter {name!r}: not a layer of GPTModelPipe")
    return out
