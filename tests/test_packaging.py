"""The built wheel ships what a user's tools need: the PEP 561 `py.typed` marker
(so pyright and mypy read the package's annotations) next to the package's modules."""

import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).parent.parent


def test_wheel_contains_the_py_typed_marker(tmp_path):
    # A fresh copy of the sources: setuptools reuses a checkout's stale build/ folder.
    # No build isolation: the build backend is the test environment's (the `test`
    # extra pins setuptools), so this needs no network and takes about a second.
    src = tmp_path / "src_copy"
    shutil.copytree(
        ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(tmp_path), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("qkclip_eqx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "qkclip_eqx/py.typed" in names
    assert "qkclip_eqx/__init__.py" in names and "qkclip_eqx/cli/generate.py" in names
    assert zipfile.ZipFile(wheel).read("qkclip_eqx/py.typed") == b""
