"""Write docs/flags.md from the training entry point's argument parser.

    python tools/gen_flags_doc.py            # rewrite docs/flags.md
    python tools/gen_flags_doc.py --check    # exit 1 if docs/flags.md is out of date

The parser is read at run time: defaults, aliases and the compatibility-only flags
(``COMPAT_ONLY`` in ``megatron/initialize/arguments.py``) come from it. What a flag changes
relative to Megatron-LM / Megatron-DeepSpeed is noted below, one line per flag; a noted flag
the parser no longer has is an error, and a flag with help text that is not noted here is
listed under "Other flags with notes" with its help text, so new flags show up by themselves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUTPUT = ROOT / "docs" / "flags.md"

# Flags this project adds ("new") or whose meaning or default differs from Megatron-LM /
# Megatron-DeepSpeed ("changed"), by their first option string.
NOTES: dict[str, tuple[str, str]] = {
    # sequence parallelism and attention
    "--ds-sequence-parallel-size": (
        "changed",
        "Ulysses degree; SP groups are contiguous ranks; at most the head count (uneven head "
        "splits and sequence padding where they do not divide)",
    ),
    "--context-parallel-size": (
        "changed",
        "ring attention degree R; composes with Ulysses: world = DP x R x U, load-balanced chunks",
    ),
    "--no-sp-rank-major-qkv": (
        "new",
        "project Q/K/V in Megatron's layout and pack them, instead of straight into the send buffer",
    ),
    "--use-flash-attn": (
        "changed",
        "`flash_attn` v2 if importable, else the measured fastest kernel per mask "
        "(`megatron/ops/attention_choice.py`): PyTorch SDPA (cuDNN) for causal attention, "
        "our Triton kernel for packed documents on GPUs",
    ),
    "--use-flash-attn-triton": (
        "changed",
        "this project's Triton FlashAttention-2 kernels on current Triton (GQA, packed documents)",
    ),
    "--sdpa-block-size": (
        "new",
        "SDPA causal attention over >= 2 blocks of N tokens per GPU runs blockwise; 0: one call",
    ),
    # memory and recompute
    "--checkpoint-in-cpu": (
        "changed",
        "with full recompute, keep each recomputed group's input in pinned host memory",
    ),
    "--loss-chunk-size": (
        "new",
        "tokens per chunk of the output layer + cross entropy (0: unchunked)",
    ),
    "--no-loss-grad-in-forward": (
        "new",
        "recompute each chunk's logits in backward instead of computing its gradients in forward",
    ),
    "--fp32-param-gather": (
        "new",
        "ZeRO: gather the layers' weights in fp32 (default: in the compute dtype)",
    ),
    "--zero-stage": (
        "changed",
        "0-3 through PyTorch FSDP2 over the SP x DP group, not the DeepSpeed engine",
    ),
    "--no-overlap-param-gather": (
        "changed",
        "ZeRO: gather each layer's weights when its forward starts (default: prefetched)",
    ),
    "--no-overlap-param-gather-with-optimizer-step": (
        "changed",
        "ZeRO: first all-gathers after the optimizer step (default: during it)",
    ),
    # fused kernels
    "--fused-residual-norm": (
        "new",
        "each residual add and the norm after it in one Triton pass each way (CUDA)",
    ),
    "--cross-entropy-loss-fusion": (
        "changed",
        "the chunked loss's softmax, loss and logit gradient in one Triton pass per chunk",
    ),
    "--no-bias-gelu-fusion": (
        "changed",
        "turn off the Triton bias + GeLU kernel (on by default, CUDA)",
    ),
    "--no-bias-dropout-fusion": (
        "changed",
        "keep the output biases in their linears instead of the fused residual add + norm",
    ),
    "--no-gradient-accumulation-fusion": (
        "changed",
        "ZeRO 1: let FSDP2 cast and add weight gradients per micro-batch",
    ),
    "--delay-wgrad-compute": (
        "changed",
        "with SP, weight-gradient GEMMs run while the backward all-to-alls are in flight",
    ),
    "--fp32-residual-connection": (
        "changed",
        "fp32 residual stream under --bf16/--fp16 (default: the compute dtype, as Megatron-LM)",
    ),
    # model
    "--normalization": ("changed", "LayerNorm or RMSNorm, any case"),
    # training loop, data, checkpoints
    "--max-nan-iterations": (
        "new",
        "stop after this many non-finite iterations in a row (bf16/fp32)",
    ),
    "--device": ("new", "auto (cuda when available), cuda or cpu"),
    "--keep-last-n-checkpoints": ("new", "delete older checkpoints once a newer one is complete"),
    "--deepspeed_config": (
        "changed",
        "read natively, every field honoured, refused or named in one warning; a conflict "
        "with a flag is an error",
    ),
    # refused
    "--sequence-parallel": (
        "refused",
        "Megatron-LM's tensor-parallel variant; use --ds-sequence-parallel-size",
    ),
    "--tensor-model-parallel-size": ("refused", "above 1: tensor parallelism is not built"),
    "--pipeline-model-parallel-size": ("refused", "above 1: pipeline parallelism is not built"),
    "--ds-sequence-parallel-fpdt": (
        "refused",
        "FPDT is not built; use --checkpoint-activations --checkpoint-in-cpu, --loss-chunk-size "
        "and tools/estimate_memory.py",
    ),
    "--ds-sequence-parallel-fpdt-chunk-size": ("refused", "FPDT is not built (as above)"),
    "--ds-sequence-parallel-fpdt-offloading": (
        "refused",
        "FPDT is not built; --checkpoint-in-cpu keeps recomputed layers' inputs in host memory",
    ),
    # logging
    "--tensorboard-log-interval": (
        "changed",
        "default: every --log-interval (Megatron: 1), so TensorBoard adds no step synchronisation",
    ),
}

KIND_TITLES = [
    ("new", "Flags this project adds"),
    ("changed", "Megatron flags that work differently here"),
    ("refused", "Megatron flags refused with a pointer to the alternative"),
]


def _parser() -> argparse.ArgumentParser:
    from megatron.initialize.arguments import build_parser

    return build_parser()


def _compat_only() -> dict[str, str]:
    from megatron.initialize import arguments

    return dict(getattr(arguments, "COMPAT_ONLY", {}))


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """First option string -> action, for every flag but --help."""
    out = {}
    for action in parser._actions:  # argparse has no public listing
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        out[action.option_strings[0]] = action
    return out


def _default(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return ""
    if action.default is None or action.default == argparse.SUPPRESS:
        return ""
    return f" (default `{action.default}`)"


def _names(action: argparse.Action) -> str:
    return ", ".join(f"`{o}`" for o in action.option_strings)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def render() -> str:
    parser = _parser()
    actions = _actions(parser)
    compat = _compat_only()
    by_dest = {a.dest: a for a in actions.values()}

    missing = [flag for flag in NOTES if flag not in actions]
    if missing:
        raise SystemExit(f"gen_flags_doc: flags noted but not in the parser: {', '.join(missing)}")
    unknown = [dest for dest in compat if dest not in by_dest]
    if unknown:
        raise SystemExit(f"gen_flags_doc: COMPAT_ONLY names unknown flags: {', '.join(unknown)}")

    lines = [
        "# Command-line flags",
        "",
        "Generated by `python tools/gen_flags_doc.py` from the parser of `pretrain_gpt.py`;",
        "`tests/test_flags_doc.py` fails when this file is out of date.",
        "",
        "Flag names and defaults follow Megatron-LM / Megatron-DeepSpeed, so their launch",
        "scripts run unchanged. This page lists only what differs: the flags this project adds,",
        "those that work differently, those refused, and those accepted but ignored.",
        "`python pretrain_gpt.py --help` lists every flag.",
    ]
    for kind, title in KIND_TITLES:
        lines += ["", f"## {title}", ""]
        for flag, (k, note) in NOTES.items():
            if k == kind:
                action = actions[flag]
                lines.append(f"- {_names(action)}{_default(action)}: {note}")

    noted_dests = {actions[f].dest for f in NOTES} | set(compat)
    extra = [
        a
        for a in actions.values()
        if a.help and a.help != argparse.SUPPRESS and a.dest not in noted_dests
    ]
    if extra:
        lines += ["", "## Other flags with notes", ""]
        for action in extra:
            lines.append(f"- {_names(action)}{_default(action)}: {_one_line(action.help)}")

    lines += [
        "",
        "## Accepted for compatibility, ignored",
        "",
        "Each one that is set gives one warning at start-up.",
        "",
    ]
    for dest, why in compat.items():
        lines.append(f"- {_names(by_dest[dest])}: {why}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/flags.md is out of date")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(
                "docs/flags.md is out of date: run python tools/gen_flags_doc.py", file=sys.stderr
            )
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
