"""qkclip-train whose checkpoint write of one step never commits, for the
SIGKILL test in test_resume.py.

argv: MARKER STEP then qkclip-train's arguments. When Orbax is about to commit
(rename into place) the checkpoint of STEP, after writing all its files, this
process writes STEP to MARKER and waits; the test then kills it with SIGKILL.
So the process dies at a known point of a checkpoint write, with no sleep.
"""

import asyncio
import pathlib
import sys

from orbax.checkpoint._src.path import atomicity

from qkclip_eqx.cli import train as cli

marker, stop_at = pathlib.Path(sys.argv[1]), int(sys.argv[2])
_finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def _finalize_or_hang(self):
    if self._final_path.name == f"ckpt_{stop_at:08d}":
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(str(stop_at))
        tmp.replace(marker)  # atomic: the test never reads a half-written file
        await asyncio.sleep(3600)  # killed here
    return await _finalize(self)


atomicity.AtomicRenameTemporaryPath.finalize = _finalize_or_hang
sys.exit(cli.main(sys.argv[3:]))
