"""What produced a run: the package and library versions, the git commit of
a checkout, the devices and mesh, and the start time. `qkclip-train` writes it
into `config.json` and every checkpoint's metadata (key `provenance`)."""

from __future__ import annotations

import datetime
import importlib.metadata
import pathlib
import platform
import subprocess
from typing import Any

import jax

#: The libraries whose versions a run records.
LIBRARIES = ("qkclip_eqx", "jax", "jaxlib", "equinox", "optax")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(path: pathlib.Path | None = None) -> dict[str, Any] | None:
    """`{"sha": ..., "dirty": bool}` of the git checkout holding `path` (this
    package's source by default), or None when it is not in one (an
    installed wheel) or git is missing."""
    where = pathlib.Path(__file__).parent if path is None else path

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(where), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "__init__.py")  # our source, not a venv in a repo
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"sha": sha, "dirty": dirty}


def provenance(mesh: str | None = None) -> dict[str, Any]:
    """The record of what runs now: `versions` (Python and `LIBRARIES`),
    `git` (sha and dirty flag, None outside a checkout), `devices` (the
    backend, device kinds, device and process counts), `mesh`, and
    `started` (UTC, ISO 8601)."""
    devices = jax.devices()
    return {
        "versions": {"python": platform.python_version()}
        | {name: _version(name) for name in LIBRARIES},
        "git": git_state(),
        "devices": {
            "backend": jax.default_backend(),
            "kinds": sorted({d.device_kind for d in devices}),
            "count": len(devices),
            "processes": jax.process_count(),
        },
        "mesh": mesh,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
