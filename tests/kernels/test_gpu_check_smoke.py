import subprocess
import sys
from pathlib import Path

CHECK = Path(__file__).resolve().parents[1] / "gpu" / "check.py"


def test_gpu_check_script_passes_its_cpu_smoke_run():
    result = subprocess.run(
        [sys.executable, str(CHECK), "--cpu-smoke"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cpu smoke: all checks passed" in result.stdout
