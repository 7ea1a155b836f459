"""Test-session set-up: thread counts, offline hub, Triton interpreter on CPU, shared worlds."""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Must be set before any module imports triton and defines its kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(
    1, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # pretrain_gpt, tools
torch.set_num_threads(1)

import pytest  # noqa: E402
from dist_helper import shutdown_all  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _shutdown_worlds():
    yield
    shutdown_all()
