#!/usr/bin/env python
"""Convert checkpoints between megatron-ulysses and Hugging Face (GPT-2 and Llama).

Export (any SP/DP/ZeRO layout; runs on one CPU process)::

    python tools/checkpoint_convert.py export --load ckpts --output hf_out --format hf
    python tools/checkpoint_convert.py export --load ckpts --output flat --format consolidated

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
        choices=("hf", "consolidated"),
        default="hf",
        help="hf: GPT2LMHeadModel or LlamaForCausalLM files; consolidated: one "
        "model.safetensors with our parameter names and a config.json of our model flags",
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
    imp = sub.add_parser("import", help="local HF GPT-2 / Llama directory -> checkpoint")
    imp.add_argument("--hf-dir", required=True, help="holds config.json and *.safetensors")
    imp.add_argument("--save", required=True, help="new checkpoint directory")
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
    from megatron.checkpointing.hf_conversion_io import export_checkpoint, import_hf

    try:
        if args.command == "export":
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
        else:
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
