import os

# Triton decides when a function is decorated whether it runs in its interpreter, for its own
# library (tl.max, ...) as much as for this project's kernels. So triton and the kernels are
# imported here, under TRITON_INTERPRET=1, before any test module can import triton otherwise
# (compressed-tensors does, at import); the variable is restored afterwards and set again only
# around each kernel test (tests/kernels/conftest.py), so it never leaks into other tests or
# the engines they start.
_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
from vllm_expertflow.kernels import fused_moe_uva  # noqa: E402, F401

if _previous is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _previous
