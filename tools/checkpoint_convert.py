#!/usr/bin/env python
"""Convert checkpoints between megatron-ulysses, Hugging Face (GPT-2 and Llama), Megatron-LM
and Megatron-DeepSpeed.

Export (any SP/DP/ZeRO layout; runs on one CPU process)::

    python tools/checkpoint_convert.py export --load ckpts --output hf_out --format hf
    python tools/checkpoint_convert.py export --load ckpts --output flat --format consolidated
    python tools/checkpoint_convert.py export --load ckpts --output mlm --to-format megatron-lm

Import a Megatron-LM (legacy torch or torch_dist) or Megatron-DeepSpeed (ZeRO 0-3, pipeline
layers, universal) checkpoint, weights plus Adam state and iteration; ``--load`` continues it::

    python tools/checkpoint_convert.py import --from megatron_ckpts --to ckpts

Import a local HF directory (safetensors), then continue pretraining from it::

    python tools/checkpoint_convert.py import --hf-dir llama_dir --save ckpts
    python pretrain_gpt.py --load ckpts --finetune <the printed model flags> ...
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.errors import UsageError  # noqa: E402


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert megatron-ulysses checkpoints to and from Hugging Face format.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="checkpoint -> HF (GPT-2 / Llama) or consolidated")
    exp.add_argument("--load", required=True, help="checkpoint directory (holds the tracker)")
    exp.add_argument("--output", required=True, help="new directory for the exported model")
    exp.add_argument(
        "--format",
        "--to-format",
        dest="format",
        choices=("hf", "consolidated", "megatron-lm"),
        default="hf",
        help="hf: GPT2LMHeadModel or LlamaForCausalLM files; consolidated: one "
        "model.safetensors with our parameter names and a config.json of our model flags; "
        "megatron-lm: Megatron-LM's legacy torch layout (iter_*/mp_rank_*/model_optim_rng.pt)",
    )
    exp.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="megatron-lm format: split into this many tensor-parallel ranks",
    )
    exp.add_argument("--iteration", type=int, default=None, help="default: the tracker's")
    exp.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="trim the padded vocabulary to the tokenizer's true size (hf format)",
    )
    exp.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    for flag, what in (
        ("--tokenizer-model", "SentencePiece model, or HF tokenizer.json / directory"),
        ("--vocab-file", "GPT-2 vocab.json"),
        ("--merge-file", "GPT-2 merges.txt"),
    ):
        exp.add_argument(
            flag, default=None, help=f"{what} to export (default: the checkpoint's tokenizer/ copy)"
        )
    exp.add_argument(
        "--max-shard-size-gb",
        type=float,
        default=5.0,
        help="hf format: split model.safetensors into shards of at most this size",
    )
    imp = sub.add_parser(
        "import", help="local HF GPT-2 / Llama directory, or Megatron-LM / -DeepSpeed -> checkpoint"
    )
    imp.add_argument("--hf-dir", default=None, help="holds config.json and *.safetensors")
    imp.add_argument("--save", default=None, help="new checkpoint directory (with --hf-dir)")
    imp.add_argument(
        "--from",
        dest="from_dir",
        default=None,
        help="a Megatron-LM or Megatron-DeepSpeed checkpoint directory (its save directory, "
        "or one iteration's)",
    )
    imp.add_argument("--to", dest="to_dir", default=None, help="new checkpoint directory")
    imp.add_argument("--no-optim", action="store_true", help="with --from: import the weights only")
    imp.add_argument(
        "--qkv-layout",
        choices=("auto", "interleaved", "contiguous"),
        default="auto",
        help="with --from: the fused QKV rows' order in the source (auto: Megatron's per-group "
        "interleave, or [q|k|v] for Megatron-DeepSpeed checkpoints written since 2024-12)",
    )
    imp.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="pad the vocabulary as pretrain_gpt.py will (pass the same value there)",
    )
    imp.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="recorded training length; default: max positions",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron.checkpointing.foreign.convert import export_megatron_lm, import_foreign
    from megatron.checkpointing.hf_conversion_io import export_checkpoint, import_hf

    try:
        if args.command == "export" and args.format == "megatron-lm":
            files = export_megatron_lm(
                args.load, args.output, args.tensor_model_parallel_size, args.iteration
            )
            print(f"wrote {args.output}: {', '.join(files)}")
        elif args.command == "export":
            if args.max_shard_size_gb <= 0:
                raise UsageError(f"--max-shard-size-gb {args.max_shard_size_gb} must be > 0")
            if args.vocab_size is not None and args.format != "hf":
                raise UsageError("--vocab-size applies to --format hf only")
            files = export_checkpoint(
                args.load,
                args.output,
                args.format,
                iteration=args.iteration,
                vocab_size=args.vocab_size,
                dtype=args.dtype,
                max_shard_bytes=int(args.max_shard_size_gb * 2**30),
                tokenizer_flags={
                    "tokenizer_model": args.tokenizer_model,
                    "vocab_file": args.vocab_file,
                    "merge_file": args.merge_file,
                },
            )
            print(f"wrote {args.output}: {', '.join(files)}")
        elif args.from_dir is not None or args.to_dir is not None:
            if args.from_dir is None or args.to_dir is None or args.hf_dir or args.save:
                raise UsageError(
                    "import --from DIR needs --to DIR (and neither --hf-dir nor --save)"
                )
            path, flags, layout = import_foreign(
                args.from_dir, args.to_dir, not args.no_optim, args.qkv_layout, args.seq_length
            )
            print(f"imported {layout} into {path}")
            print("continue training with:")
            print(f"  pretrain_gpt.py --load {args.to_dir} {' '.join(flags)} ...")
        else:
            if args.hf_dir is None or args.save is None:
                raise UsageError("import needs --hf-dir DIR --save DIR, or --from DIR --to DIR")
            path, flags = import_hf(
                args.hf_dir, args.save, args.make_vocab_size_divisible_by, args.seq_length
            )
            print(f"wrote {path}")
            print("continue pretraining with:")
            print(f"  pretrain_gpt.py --load {args.save} --finetune {' '.join(flags)} ...")
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
