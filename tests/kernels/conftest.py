import os

import pytest
import torch

# tests/conftest.py imported the kernels under TRITON_INTERPRET=1, before anything else could
# import triton; this folder's tests set the variable again around each test (the interpreter
# reads it while running too).
import triton.language as tl
from vllm_expertflow.kernels import fused_moe_uva

interpreted = (fused_moe_uva._moe_up_kernel, tl.max)  # ours and triton's own library
assert all(type(fn).__name__ == "InterpretedFunction" for fn in interpreted), (
    "triton or the kernels were imported before tests/conftest.py; run them in their own "
    "pytest process or import them after it"
)


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def generator() -> torch.Generator:
    """Fresh inputs every run; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("EXPERTFLOW_TEST_SEED", torch.seed() % 2**31))
    print(f"EXPERTFLOW_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)
