"""Reading Megatron-LM and DeepSpeed ``.pt`` files without running code from them.

Their files are pickles. Each is opened with ``torch.load(weights_only=True, mmap=True)``
inside a scoped :func:`torch.serialization.safe_globals` context that admits, besides
tensors and plain containers, only:

- ``argparse.Namespace`` (Megatron's ``args``);
- numpy's array reconstruction, under both ``numpy.core`` and ``numpy._core`` (numpy 1 and
  2 write different names), for the RNG states;
- stand-ins registered under the names of DeepSpeed's and megatron-core's classes that their
  checkpoints hold (loss scalers, enums, fragment addresses). The stand-ins only record what
  the pickle gave them; neither deepspeed nor megatron-core is imported.

Any other class refuses the file with one line naming the classes
(``torch.serialization.get_unsafe_globals_in_checkpoint``).
"""

from __future__ import annotations

import argparse
import collections
import os
from typing import Any

import numpy as np
import torch

from megatron.errors import UsageError


class StandIn:
    """A foreign object kept as the arguments and state its pickle held (nothing runs)."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def value(self) -> Any:
        """An enum member's value (enums pickle as ``Class(value)``)."""
        return self.args[0] if self.args else None


def _stand_in(qualified: str) -> tuple[type, str]:
    name = qualified.rsplit(".", 1)[1]
    return type(name, (StandIn,), {"__qualname__": name}), qualified


# Classes found in the pickles of Megatron-DeepSpeed/DeepSpeed and Megatron-LM checkpoints.
STAND_IN_NAMES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "megatron.core.enums.ModelType",
    "megatron.core.transformer.enums.AttnBackend",
)
_STAND_INS = [_stand_in(n) for n in STAND_IN_NAMES]
# DeepSpeed's (numel, start) of a parameter inside a flat partition: a namedtuple.
FragmentAddress = collections.namedtuple("fragment_address", ["numel", "start"])


def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    reconstruct, scalar = core.multiarray._reconstruct, core.multiarray.scalar
    out: list = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(reconstruct, f"{module}._reconstruct"), (scalar, f"{module}.scalar")]
    for kind in (np.uint32, np.int64, np.float64, np.float32, np.int32, np.uint8, np.bool_):
        dtype_class = type(np.dtype(kind))
        out.append((dtype_class, f"numpy.dtypes.{dtype_class.__name__}"))
    return out


def allowed_globals() -> list:
    """What the scoped ``safe_globals`` context admits (besides torch's own defaults)."""
    return [
        argparse.Namespace,
        *_numpy_globals(),
        *_STAND_INS,
        (FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
    ]


def safe_torch_load(path: str, what: str = "checkpoint file") -> Any:
    """``torch.load`` of a foreign ``.pt`` file as data only (one line naming the file if not)."""
    if os.path.islink(path):
        raise UsageError(
            f"{path}: a symbolic link; {what}s are read only from the directory itself"
        )
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except OSError as e:
        raise UsageError(f"{path}: cannot read this {what} ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise UsageError(f"{path}: {_refusal(path, e)}") from None


def _refusal(path: str, error: Exception) -> str:
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not even a readable zip: say what torch said
        unsafe = []
    allowed = {n for _, n in (g for g in allowed_globals() if isinstance(g, tuple))}
    unsafe = [u for u in unsafe if u not in allowed and u != "argparse.Namespace"]
    if unsafe:
        return (
            f"refused to load: it holds classes that are not plain data ({', '.join(unsafe[:4])}"
            f"{' ...' if len(unsafe) > 4 else ''}); loading never runs code from a checkpoint"
        )
    return f"not a readable torch checkpoint file ({type(error).__name__}: {str(error)[:160]})"


def namespace_dict(args: Any) -> dict[str, Any]:
    """Megatron's ``args`` (a Namespace, or a dict) as a plain dict; enums by their values."""
    if args is None:
        return {}
    items = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {k: (v.value if isinstance(v, StandIn) else v) for k, v in items.items()}
