import subprocess
import sys


def test_importing_core_does_not_import_vllm():
    code = (
        "import sys, vllm_expertflow.core.pool, vllm_expertflow.core.disk_store, "
        "vllm_expertflow.core.config, vllm_expertflow.core.step_plan; "
        "print(any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
