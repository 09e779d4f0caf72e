"""qkclip-train with a pause at a known step, for the SIGINT test in test_train.py.

argv: MARKER STEP then qkclip-train's arguments. After training step STEP
(``on_step`` sees STEP steps done) the process writes STEP to the file MARKER
and waits in ``signal.pause()`` until a signal arrives; the test sends SIGINT
when it sees the file. So the signal lands at a known step, with no sleep.
"""

import pathlib
import signal
import sys

from qkclip_eqx.cli import train as cli

marker, stop_at = pathlib.Path(sys.argv[1]), int(sys.argv[2])
_train = cli.train


def _train_with_pause(cfg, *, on_step=None, **kwargs):
    def pause_at(step, metrics):
        if on_step is not None:  # the CLI's own (--log-to)
            on_step(step, metrics)
        if step == stop_at:
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(str(step))
            tmp.replace(marker)  # atomic: the test never reads a half-written file
            signal.pause()  # returns once the SIGINT handler has run

    return _train(cfg, on_step=pause_at, **kwargs)


cli.train = _train_with_pause
sys.exit(cli.main(sys.argv[3:]))
