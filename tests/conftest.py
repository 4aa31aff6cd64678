"""Test setup: run Triton kernels under the interpreter when no CUDA GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MIXQ_OFFLINE", "1")  # tests never download


@pytest.fixture
def device() -> torch.device:
    """The device kernels run on: CUDA when present, else CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def seed() -> int:
    """A fresh seed per test run, printed on failure so a failing draw can be replayed."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed={s}")
    return s
