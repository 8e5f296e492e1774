"""The wheel `python -m build` makes holds the whole package, the Triton kernels under
`vllm_expertflow.kernels`, and the `vllm.general_plugins` entry point vLLM loads the plugin by.

Offline and without vLLM: the wheel is built without build isolation from a copy of the sources
(nothing is written into the checkout), installed with `pip install --no-deps --target`, and
its metadata read by a Python that sees only that folder (`-S`: no site-packages).
"""

import configparser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "vllm_expertflow", "kernels")
PLUGIN = "vllm_expertflow.integration.plugin:register"


def package_files() -> set[str]:
    """The .py files the wheel must hold, by their path inside it."""
    files = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "vllm_expertflow").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    files |= {f"vllm_expertflow/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    for module in ("build", "setuptools", "wheel"):
        assert importlib.util.find_spec(module), f"no {module}: pip install -e '.[dev]'"
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    dist = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)]
    out = subprocess.run(
        [*command, str(source)], capture_output=True, text=True, timeout=120, cwd=source
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (built,) = dist.glob("vllm_expertflow-*.whl")
    return built


def test_wheel_holds_the_package_the_kernels_and_the_plugin_entry_point(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = archive.read(entry_points).decode()
    missing = package_files() - names
    assert not missing, f"not in the wheel (setup.cfg `packages`?): {sorted(missing)}"
    assert "vllm_expertflow/kernels/__init__.py" in names
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # keep names as written
    parser.read_string(text)
    assert dict(parser["vllm.general_plugins"]) == {"expertflow": PLUGIN}
    assert parser["console_scripts"]["vllm-expertflow"] == "vllm_expertflow.cli:main"


def test_installed_wheel_exposes_the_entry_point_to_importlib_metadata(wheel, tmp_path):
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    out = subprocess.run(
        [*install, "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    code = (
        "import importlib.metadata as m, importlib.util as u, json\n"
        "(ep,) = m.entry_points(group='vllm.general_plugins', name='expertflow')\n"
        "spec = u.find_spec(ep.module)\n"
        "print(json.dumps({'value': ep.value, 'dist': ep.dist.name, 'module': spec.origin,\n"
        "    'kernels': u.find_spec('vllm_expertflow.kernels').origin,\n"
        "    'version': m.version('vllm-expertflow')}))\n"
    )
    # -S: no site-packages, so neither the editable install nor vLLM is visible.
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["value"] == PLUGIN
    assert found["dist"] == "vllm-expertflow"
    assert Path(found["module"]) == target / "vllm_expertflow" / "integration" / "plugin.py"
    assert Path(found["kernels"]) == target / "vllm_expertflow" / "kernels" / "__init__.py"
    assert found["version"] == setup_cfg_version()


def setup_cfg_version() -> str:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser["metadata"]["version"]
