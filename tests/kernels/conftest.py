import os

import pytest
import torch

# Triton picks the interpreter when a kernel is decorated, so the kernel modules are imported
# here under TRITON_INTERPRET=1. The variable is restored afterwards and set again only around
# each test of this folder (the interpreter reads it while running too), so it never leaks
# into other tests or the engines they start.
_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
from vllm_expertflow.kernels import fused_moe_uva  # noqa: E402

if _previous is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _previous

assert type(fused_moe_uva._moe_up_kernel).__name__ == "InterpretedFunction", (
    "the kernels were imported before tests/kernels/conftest.py; run them in their own "
    "pytest process or import them after this conftest"
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
