"""Flags for the longest sequences: the tiled MLP and host (CPU) offload of the optimizer
and the parameters, their checks, and DeepSpeed's ``offload_optimizer`` / ``offload_param``.

What each offload name means here (other projects' meanings differ slightly; the start-up
log says so once for each name used):

* ``--cpu-optimizer`` (Megatron-DeepSpeed), ``--optimizer-cpu-offload`` (Megatron-LM) and
  ``zero_optimization.offload_optimizer.device: cpu`` (DeepSpeed): the optimizer state and
  an fp32 copy of the parameters in host memory, the step on the CPU, the parameters and
  gradients on the GPU (:class:`megatron.optimizer.host_offload.HostOffloadAdamW`).
* ``--cpu-offload-params`` and ``zero_optimization.offload_param.device: cpu``: FSDP2's
  ``CPUOffloadPolicy``: parameters, gradients and optimizer state in host memory, the step
  on the CPU; each layer's weights are copied to the GPU for its forward and backward.

Both need ZeRO through FSDP2 (the state is sharded as the parameters): ``--zero-stage 0``
becomes 1 with the optimizer offload (logged); the parameter offload needs stage 3, as in
DeepSpeed. Collectives over host tensors need gloo next to NCCL: the process group's backend
is ``cpu:gloo,cuda:nccl`` then (:func:`distributed_backend`).
"""

from __future__ import annotations

import argparse

from megatron.errors import UsageError

OPTIMIZER_OFFLOAD_NOTES = {
    "cpu_optimizer": "--cpu-optimizer: optimizer state and an fp32 parameter copy in host "
    "memory, the step on the CPU, the parameters on the GPU (as Megatron-DeepSpeed); "
    "FSDP2's CPUOffloadPolicy, which also moves the parameters, is --cpu-offload-params",
    "optimizer_cpu_offload": "--optimizer-cpu-offload: all of the optimizer state is offloaded "
    "(Megatron-LM's --optimizer-offload-fraction is not read) and AdamW steps on the CPU; "
    "the parameters stay on the GPU",
}
PARAM_OFFLOAD_NOTE = (
    "--cpu-offload-params: FSDP2's CPUOffloadPolicy moves parameters, gradients and optimizer "
    "state to host memory and steps on the CPU (DeepSpeed's offload_param moves the "
    "parameters only; its optimizer state follows offload_optimizer)"
)
# DeepSpeed's offload knobs that tune its own engine; read and reported, nothing to change.
_ENGINE_KNOBS = ("buffer_count", "buffer_size", "max_in_cpu", "fast_init", "pipeline_read")


def add_long_context_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("long context")
    g.add_argument(
        "--tiled-mlp-chunk-size",
        type=int,
        default=0,
        metavar="TOKENS",
        help="run each MLP over tiles of this many local tokens, recomputing one tile at a time "
        "in backward: no [s, ffn] tensor for the whole sequence (0: off; "
        "tools/estimate_memory.py --find-max-seq recommends a value)",
    )
    g.add_argument(
        "--cpu-optimizer",
        action="store_true",
        help="optimizer state and fp32 parameter copy in host memory, step on the CPU, "
        "parameters on the GPU (Megatron-DeepSpeed's name; needs ZeRO >= 1, set if 0)",
    )
    g.add_argument(
        "--optimizer-cpu-offload",
        action="store_true",
        help="Megatron-LM's name of --cpu-optimizer (the whole state is offloaded)",
    )
    g.add_argument(
        "--cpu-offload-params",
        action="store_true",
        help="ZeRO 3: parameters, gradients and optimizer state in host memory, the step on "
        "the CPU (FSDP2's CPUOffloadPolicy; DeepSpeed's offload_param)",
    )
    parser.set_defaults(offload_pin_memory=True)  # DeepSpeed's pin_memory: false turns it off


def optimizer_offloaded(args: argparse.Namespace) -> bool:
    """The optimizer state lives on the host, parameters on the GPU."""
    return bool(args.cpu_optimizer or args.optimizer_cpu_offload) and not args.cpu_offload_params


def any_offload(args: argparse.Namespace) -> bool:
    return bool(args.cpu_optimizer or args.optimizer_cpu_offload or args.cpu_offload_params)


def _device(block: dict, key: str, source: str) -> str:
    device = str(block.get("device", "none")).lower()
    if device == "nvme":
        raise UsageError(
            f"--deepspeed_config {source}: zero_optimization.{key}.device nvme is not supported "
            "(host memory only); use device cpu"
        )
    if device not in ("cpu", "none"):
        raise UsageError(
            f"--deepspeed_config {source}: zero_optimization.{key}.device {device!r}: "
            "expected cpu or none"
        )
    return device


def apply_offload_fields(zero_cfg: dict, args: argparse.Namespace, source: str) -> list[str]:
    """Honour ``zero_optimization.offload_optimizer`` and ``.offload_param`` of a DeepSpeed
    config (``zero_cfg`` is the ``zero_optimization`` dict, ``source`` the file's name) on
    ``args``; returns lines to log once. ``device: cpu`` sets ``--cpu-optimizer`` /
    ``--cpu-offload-params``; ``none`` or an absent block changes nothing but contradicts
    those flags if given; ``pin_memory: false`` turns pinning off; ``ratio`` < 1 (a partial
    offload) and ``device: nvme`` are refused; engine tuning knobs are reported as unused."""
    notes: list[str] = []
    for key, attr in (
        ("offload_optimizer", "cpu_optimizer"),
        ("offload_param", "cpu_offload_params"),
    ):
        block = zero_cfg.get(key)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise UsageError(
                f"--deepspeed_config {source}: zero_optimization.{key} must be an object "
                '(e.g. {"device": "cpu"})'
            )
        device = _device(block, key, source)
        if device == "none":
            if getattr(args, attr):
                raise UsageError(
                    f"--deepspeed_config {source} sets zero_optimization.{key}.device none but "
                    f"--{attr.replace('_', '-')} was given; make them agree or drop one"
                )
            continue
        setattr(args, attr, True)
        if block.get("pin_memory") is False:
            args.offload_pin_memory = False
        ratio = float(block.get("ratio", 1.0))
        if ratio != 1.0:
            raise UsageError(
                f"--deepspeed_config {source}: zero_optimization.{key}.ratio {ratio}: only a "
                "full offload (1.0) is supported"
            )
        unused = [k for k in _ENGINE_KNOBS if k in block]
        if unused:
            notes.append(
                f"--deepspeed_config {source}: zero_optimization.{key}.{', '.join(unused)} "
                "tune DeepSpeed's engine and change nothing here"
            )
    return notes


def check_long_context_args(args: argparse.Namespace) -> list[str]:
    """Checks after the DeepSpeed config is applied (``args.zero_stage`` known); returns
    the lines to log once (what each offload name means here, a ZeRO stage set)."""
    notes = []
    if args.tiled_mlp_chunk_size < 0:
        raise UsageError(
            f"--tiled-mlp-chunk-size {args.tiled_mlp_chunk_size} must be >= 0 (0: off)"
        )
    if not any_offload(args):
        return notes
    if args.optimizer == "sgd":
        raise UsageError(
            "--optimizer sgd with an optimizer offload flag: the offloaded optimizer is AdamW; "
            "drop the offload flag or use --optimizer adam"
        )
    if args.cpu_offload_params:
        if args.zero_stage != 3:
            raise UsageError(
                f"--cpu-offload-params (DeepSpeed's offload_param) needs --zero-stage 3, got "
                f"{args.zero_stage}; set --zero-stage 3 (or zero_optimization.stage 3)"
            )
        notes.append(PARAM_OFFLOAD_NOTE)
        return notes
    for name, note in OPTIMIZER_OFFLOAD_NOTES.items():
        if getattr(args, name):
            notes.append(note)
    if args.zero_stage == 0:
        args.zero_stage = 1
        notes.append(
            "--zero-stage 0 with the optimizer offload: set to 1 (the offloaded state is "
            "sharded as FSDP2 shards the parameters, also on one GPU)"
        )
    return notes


def distributed_backend(args: argparse.Namespace, device_type: str) -> str:
    """The process group's backend: ``--distributed-backend`` or NCCL on CUDA, gloo on CPU;
    with an offload on CUDA, ``cpu:gloo,cuda:nccl`` (collectives over host tensors)."""
    backend = args.distributed_backend or ("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda" and backend == "nccl" and any_offload(args):
        return "cpu:gloo,cuda:nccl"
    return backend
