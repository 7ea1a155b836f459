#!/usr/bin/env python
"""Sample text from a checkpoint written by ``pretrain_gpt.py`` (one process, no SP).

Example::

    python tools/generate_text.py --load checkpoints/gpt --use-checkpoint-args \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model spm.model \\
        --prompt "Return the" --max-new-tokens 40 --temperature 0.8 --top-k 40

Takes Megatron's model and tokenizer flags, or ``--use-checkpoint-args`` to read the
model's shape from the checkpoint's meta.json; the tokenizer flags given on the command
line win, and the checkpoint's own copy of its tokenizer files (``iter_*/tokenizer/``) is
used when none is given. Only the weights are loaded (``--finetune`` semantics): no
optimizer is built, and the checkpoint's optimizer state, scheduler and RNG are ignored.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron.checkpointing import checkpointing  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.random import set_random_seed  # noqa: E402
from megatron.errors import UsageError  # noqa: E402
from megatron.global_vars import set_args  # noqa: E402
from megatron.inference.text_generation import SamplingParams, generate  # noqa: E402
from megatron.initialize.argument_checks import validate_args  # noqa: E402
from megatron.initialize.arguments import parse_args  # noqa: E402
from megatron.initialize.initialize import (  # noqa: E402
    exit_with_usage_error,
    resolve_device,
    setup_logging,
)

logger = logging.getLogger("megatron")


def add_generation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("text generation")
    g.add_argument("--prompt", action="append", default=None, help="text to continue (repeatable)")
    g.add_argument("--prompt-file", default=None, help="one prompt per non-empty line")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=1.0, help="0: greedy (argmax)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    g.add_argument(
        "--no-stop-at-eod", dest="stop_at_eod", action="store_false",
        help="keep generating after the end-of-document token",
    )  # fmt: skip
    return parser


def initialize_for_generation(args_list: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the flags and start a one-process group (gloo, or nccl on GPU)."""
    args = parse_args(add_generation_args, False, args_list)
    setup_logging(0)
    if args.world_size != 1:
        raise UsageError(
            f"generate_text.py runs as one process, but the launcher started {args.world_size}; "
            "run it with plain python (no torchrun/srun)"
        )
    for flag, value in (
        ("--ds-sequence-parallel-size", args.ds_sequence_parallel_size),
        ("--context-parallel-size", args.context_parallel_size),
    ):
        if value != 1:
            raise UsageError(
                f"{flag} {value}: generation runs without sequence parallelism; drop the flag "
                "(any checkpoint layout loads)"
            )
    if not args.load:
        raise UsageError("--load DIR is required: the checkpoint directory to sample from")
    if checkpointing.find_checkpoint(args.load) is None:
        raise UsageError(
            f"--load {args.load}: no {checkpointing.TRACKER} and no complete iter_* checkpoint "
            "there; point it at the --save directory of a training run"
        )
    if args.use_checkpoint_args:
        checkpointing.load_args_from_checkpoint(args)
    elif args.num_layers is None:
        raise UsageError(
            "--num-layers is required: give the model flags the checkpoint was trained with, "
            "or --use-checkpoint-args to read them from its meta.json"
        )
    if args.micro_batch_size is None:
        args.micro_batch_size = 1
    # Weights only; no optimizer, scheduler or RNG state from the checkpoint.
    args.finetune, args.no_load_optim, args.no_load_rng = True, True, True
    args.exit_on_missing_checkpoint = True
    args.hidden_dropout = args.attention_dropout = 0.0
    args.recompute_granularity = None
    args.checkpoint_activations = False
    validate_args(args)
    args.device_obj = resolve_device(args)
    SamplingParams(args.temperature, args.top_k, args.top_p)  # check the flags early
    set_args(args)
    if not dist.is_initialized():
        backend = "nccl" if args.device_obj.type == "cuda" else "gloo"
        if args.device_obj.type == "cuda":
            torch.cuda.set_device(args.device_obj)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(device_type=args.device_obj.type)
    set_random_seed(args.seed)
    return args


def load_model(args: argparse.Namespace):
    """(model in eval mode with the checkpoint's weights, tokenizer)."""
    from megatron.model import GPTModel, ModelConfig
    from megatron.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(args)  # sets args.padded_vocab_size
    model = GPTModel(ModelConfig.from_args(args), sp_group=None, device=args.device_obj)
    # Weights only (--finetune semantics): no optimizer, scheduler, scaler or train state.
    checkpointing.load_checkpoint(
        args, parallel_state.get_parallel_state(), model, None, None, None, None
    )
    model.eval()
    return model, tokenizer


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise UsageError(
                f"--prompt-file {args.prompt_file}: cannot read ({e.strerror})"
            ) from None
    if not prompts:
        raise UsageError("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def generate_all(args: argparse.Namespace, model, tokenizer, prompts: Sequence[str]) -> list[str]:
    """Each prompt followed by its continuation, as text (decoded in one piece, so the
    tokenizer's spacing at the seam is right)."""
    from megatron.training.training import autocast_context

    params = SamplingParams(args.temperature, args.top_k, args.top_p)
    generator = torch.Generator(device=args.device_obj).manual_seed(args.seed)
    stop_ids = (tokenizer.eod,) if args.stop_at_eod else ()
    outputs = []
    for prompt in prompts:
        prompt_ids = tokenizer.tokenize(prompt)
        with autocast_context(args.params_dtype, args.device_obj.type):
            new_ids = generate(
                model, prompt_ids, args.max_new_tokens, tokenizer.vocab_size,
                params, max_context=args.seq_length, stop_ids=stop_ids, generator=generator,
                device=args.device_obj,
            )  # fmt: skip
        if new_ids and new_ids[-1] in stop_ids:
            new_ids = new_ids[:-1]
        outputs.append(tokenizer.detokenize(list(prompt_ids) + new_ids))
    return outputs


def main(args_list: Sequence[str] | None = None) -> list[str]:
    """Generate for every prompt; print and return each prompt with its continuation."""
    try:
        args = initialize_for_generation(args_list)
        model, tokenizer = load_model(args)
        prompts = read_prompts(args)
        outputs = generate_all(args, model, tokenizer, prompts)
    except UsageError as err:
        exit_with_usage_error(err)
    for prompt, text in zip(prompts, outputs):
        print(f"--- prompt: {prompt!r}\n{text}\n", flush=True)
    return outputs


if __name__ == "__main__":
    main()
