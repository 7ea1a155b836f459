"""Megatron-compatible flags parse, and every inconsistent combination is one clear error."""

import json
import shlex

import pytest
import torch

from megatron.errors import UsageError
from megatron.initialize.argument_checks import validate_args
from megatron.initialize.arguments import parse_args

# The flag set of Megatron-DeepSpeed's ds_pretrain_gpt_1.3B_seq_parallel_32k.sh (values as there).
ANCHOR_1_3B = """
--override-opt_param-scheduler --adam-beta1 0.9 --adam-beta2 0.95 --tensor-model-parallel-size 1
--ds-sequence-parallel-size 4 --init-method-std 0.013 --lr-decay-tokens 300000000000
--lr-warmup-tokens 3000000000 --micro-batch-size 1 --exit-duration-in-mins 30000000
--global-batch-size 8 --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 32768
--max-position-embeddings 32768 --train-tokens 300000000000 --train-samples 9155273 --lr 2.0e-4
--min-lr 1.0e-6 --lr-decay-style cosine --split 949,50,1 --log-interval 10 --eval-interval 100
--eval-iters 10 --save-interval 1000 --weight-decay 0.1 --clip-grad 1.0 --hysteresis 2 --num-workers 0
--fp16 --seed 1234 --load ckpt --save ckpt --no-async-tensor-model-parallel-allreduce
--use-flash-attn-triton --tensorboard-queue-size 1 --log-timers-to-tensorboard
--log-batch-size-to-tensorboard --log-validation-ppl-to-tensorboard --tensorboard-dir tb
--log-optimizer-states-to-tensorboard --checkpoint-activations --deepspeed-activation-checkpointing
--vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt --data-path BookCorpusDataset_text_document
--data-impl mmap --deepspeed --deepspeed_config {ds_config} --zero-stage 1
--pipeline-model-parallel-size 1 --no-pipeline-parallel
"""

TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 8 --seq-length 64 --micro-batch-size 1"
)


def args_for(cmdline: str, world_size: int = 1, monkeypatch=None):
    args = parse_args(args_list=shlex.split(cmdline))
    args.world_size = world_size
    return validate_args(args)


@pytest.fixture
def ds_config(tmp_path):
    cfg = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 1,
        "steps_per_print": 1,
        "zero_optimization": {"stage": 1},
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "fp16": {
            "enabled": True,
            "loss_scale": 0,
            "loss_scale_window": 500,
            "hysteresis": 2,
            "min_loss_scale": 1,
            "initial_scale_power": 11,
        },
        "bf16": {"enabled": False},
        "wall_clock_breakdown": False,
    }
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_anchor_script_flags_parse(ds_config):
    args = args_for(ANCHOR_1_3B.format(ds_config=ds_config), world_size=8)
    assert args.ds_sequence_parallel_size == 4 and args.data_parallel_size == 2
    assert args.zero_stage == 1 and args.global_batch_size == 8 and args.fp16
    assert args.params_dtype == torch.float16
    assert args.recompute_granularity == "full" and args.use_flash_attn_triton
    assert args.override_opt_param_scheduler and args.kv_channels == 128
    # Every compatibility-only flag that was set says so once.
    warned = " ".join(args.compat_warnings)
    for flag in (
        "--no-async-tensor-model-parallel-allreduce",
        "--data-impl",
        "--deepspeed ",
        "--no-pipeline-parallel",
        "--deepspeed-activation-checkpointing",
    ):
        assert flag.strip() in warned


def test_common_spellings():
    a = args_for(
        TINY
        + " --normalization rmsnorm --use-flash-attn-v2 --position-embedding-type rope --rotary-base 500000 --local-rank 3"
    )
    assert a.normalization == "RMSNorm" and a.use_flash_attn and a.use_rotary_position_embeddings
    assert a.rotary_position_embeddings_theta == 500000 and a.local_rank == 3
    b = args_for(TINY + " --group-query-attention --num-query-groups 2 --local_rank 1")
    assert b.num_key_value_heads == 2 and b.local_rank == 1
    c = args_for(
        TINY
        + " --use-rotary-position-embeddings --normalization RMSNorm --swiglu --disable-bias-linear"
    )
    assert (
        c.position_embedding_type == "rope" and not c.add_bias_linear and c.ffn_hidden_size == 192
    )


ERRORS = [
    (
        TINY + " --ds-sequence-parallel-size 4",
        6,
        "world size 6 is not divisible by tensor-parallel (1) x pipeline-parallel (1) x sequence-parallel (4)",
    ),
    (
        TINY.replace("heads 8", "heads 6") + " --kv-channels 8 --ds-sequence-parallel-size 8",
        8,
        "--ds-sequence-parallel-size 8 is larger than --num-attention-heads 6: every "
        "sequence-parallel rank needs at least one head",
    ),
    (
        TINY + " --global-batch-size 3",
        2,
        "--global-batch-size 3 is not divisible by --micro-batch-size 1 x data-parallel size 2 = 2",
    ),
    (TINY + " --fp16 --bf16", 1, "--fp16 and --bf16 were both given"),
    (
        TINY + " --num-key-value-heads 3",
        1,
        "--num-key-value-heads 3 does not divide --num-attention-heads 8",
    ),
    (
        TINY + " --tensor-model-parallel-size 2",
        2,
        "--tensor-model-parallel-size 2: tensor parallelism is not built yet",
    ),
    (
        TINY + " --pipeline-model-parallel-size 2",
        2,
        "--pipeline-model-parallel-size 2: pipeline parallelism is not built yet",
    ),
    (TINY + " --sequence-parallel", 1, "use --ds-sequence-parallel-size"),
    (
        TINY + " --context-parallel-size 2 --ds-sequence-parallel-size 2",
        6,
        "world size 6 is not divisible by tensor-parallel (1) x pipeline-parallel (1) x "
        "sequence-parallel (2) x context-parallel (2) = 4",
    ),
    (
        TINY + " --context-parallel-size 2",
        2,
        "--attention-dropout 0.1 and --context-parallel-size 2: ring attention has no attention "
        "dropout; use --attention-dropout 0",
    ),
    (TINY.replace("--micro-batch-size 1", ""), 1, "--micro-batch-size is required"),
    (
        TINY + " --checkpoint-in-cpu",
        1,
        "--checkpoint-in-cpu moves the inputs of fully recomputed layers to host memory; "
        "add --checkpoint-activations",
    ),
    (
        TINY + " --bf16 --fp32-param-gather",
        1,
        "--fp32-param-gather changes only --zero-stage 1/2/3 runs with --bf16 or --fp16 "
        "(here: --zero-stage 0, bfloat16)",
    ),
    (
        TINY + " --zero-stage 1 --fp32-param-gather",
        1,
        "(here: --zero-stage 1, float32)",
    ),
    (
        TINY + " --cross-entropy-loss-fusion --loss-chunk-size 0",
        1,
        "--cross-entropy-loss-fusion fuses the chunked loss: set --loss-chunk-size > 0",
    ),
    (
        TINY + " --sdpa-block-size -1",
        1,
        "--sdpa-block-size -1 must be >= 0 (0: one attention call)",
    ),
]


@pytest.mark.parametrize("cmdline,world,message", ERRORS)
def test_validation_errors(cmdline, world, message):
    with pytest.raises(UsageError) as err:
        args_for(cmdline, world_size=world)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_uneven_heads_and_padded_sequence_are_accepted(caplog):
    """6 heads over 4 ranks (2/2/1/1), 3 K/V heads for 12 over 4, and a sequence length that
    does not split over 4 ranks (padded, with one log line)."""
    six = TINY.replace("heads 8", "heads 6") + " --kv-channels 8 --ds-sequence-parallel-size 4"
    assert args_for(six, world_size=4).ds_sequence_parallel_size == 4
    gqa3 = TINY.replace("heads 8", "heads 12") + " --num-key-value-heads 3 --kv-channels 8"
    assert args_for(gqa3 + " --ds-sequence-parallel-size 4", world_size=4).num_key_value_heads == 3
    with caplog.at_level("INFO"):
        args = args_for(
            TINY.replace("length 64", "length 66") + " --ds-sequence-parallel-size 4", world_size=4
        )
    assert args.seq_length == 66
    padded = [r.getMessage() for r in caplog.records if "padded" in r.getMessage()]
    assert padded == [
        "> --seq-length 66 is padded to 68 (2 padding tokens per sample, out of the loss) so it "
        "splits over --ds-sequence-parallel-size 4"
    ]


def test_deepspeed_config_conflict(ds_config):
    with pytest.raises(UsageError, match="sets train_batch_size=8 but --global-batch-size is 16"):
        args_for(TINY + f" --global-batch-size 16 --deepspeed_config {ds_config}", world_size=1)


def test_deepspeed_config_fills_batch(ds_config):
    a = args_for(
        "--num-layers 2 --hidden-size 64 --num-attention-heads 8 --seq-length 64 "
        f"--deepspeed_config {ds_config}",
        world_size=2,
    )
    assert a.micro_batch_size == 1 and a.global_batch_size == 8 and a.fp16 and a.zero_stage == 1


def test_launcher_environments(monkeypatch):
    from megatron.initialize.arguments import launch_env

    for var in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_LOCALID",
    ):
        monkeypatch.delenv(var, raising=False)
    assert launch_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launch_env() == (5, 8, 1)
    # torchrun and the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK, which win.
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert launch_env() == (3, 4, 3)


def test_zero_param_dtype():
    from megatron.training.training import zero_param_dtype

    assert zero_param_dtype(args_for(TINY + " --bf16 --zero-stage 1")) == torch.bfloat16
    assert zero_param_dtype(args_for(TINY + " --fp16 --zero-stage 3")) == torch.float16
    assert zero_param_dtype(args_for(TINY + " --bf16 --zero-stage 1 --fp32-param-gather")) is None
    assert zero_param_dtype(args_for(TINY + " --zero-stage 1")) is None
