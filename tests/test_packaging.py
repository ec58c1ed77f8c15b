"""The folders map into one ``mxmoe.*`` namespace, in the built wheel as in the editable install."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"mxmoe.core": "core", "mxmoe.core.harmony": "core/harmony", "mxmoe.backends": "backends",
            "mxmoe.plugins": "plugins", "mxmoe.conformance": "conformance"}


def test_editable_install_maps_every_folder():
    import importlib

    for name, folder in PACKAGES.items():
        mod = importlib.import_module(name)
        assert Path(mod.__file__).resolve().parent == (ROOT / folder).resolve(), name


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-build-isolation: build with this environment's setuptools, no download needed.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True)
    (whl,) = out.glob("mxmoe-*.whl")
    return whl


def test_wheel_contains_every_module_and_no_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for folder in PACKAGES.values():
        for py in (ROOT / folder).glob("*.py"):
            assert f"mxmoe/{py.relative_to(ROOT)}" in names, f"{py.relative_to(ROOT)} missing from the wheel"
    assert "mxmoe/conformance/report_schema.json" in names  # the published report schema ships
    assert not [n for n in names if n.startswith(("tests/", "mxmoe/tests/"))]
    assert any(n.endswith("entry_points.txt") for n in names)


def test_wheel_imports_in_a_clean_target(wheel, tmp_path):
    """Install the wheel alone into an empty folder and import from there (dependencies come from this
    environment, but every mxmoe module must resolve to the wheel's copy, not the source tree)."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    code = ("import importlib, sys\n"
            f"for name in {sorted(PACKAGES)!r}:\n"
            "    m = importlib.import_module(name)\n"
            f"    assert m.__file__.startswith({str(target)!r}), (name, m.__file__)\n"
            "from mxmoe.core.cli import build_parser\n"
            "build_parser()\n"
            "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
