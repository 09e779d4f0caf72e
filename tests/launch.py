"""Launching the local processes of a multi-process test."""

import contextlib
import os
import socket
import subprocess
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A free port, held for as long as the block runs. The socket is bound
    (not listening) with SO_REUSEPORT, which the JAX coordinator's gRPC server
    sets too: the coordinator can bind the port while we hold it, and no other
    process can take it between our choosing it and the coordinator binding it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def run_processes(
    argv: Callable[[str, int], list[str]],
    *,
    env: dict[str, str] | None = None,
    n: int = 2,
    timeout: float = 300,
) -> list[str]:
    """Run ``argv(coordinator_address, process_id)`` for process ids 0..n-1 at
    once, with a reserved coordinator port; assert that every process exits
    with 0 (the message holds the end of their output) and return their
    outputs. A process still running when the others are done or time out is
    killed."""
    env = dict(os.environ) if env is None else env
    with reserved_port() as port:
        address = f"127.0.0.1:{port}"
        procs = [
            subprocess.Popen(
                argv(address, i),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(n)
        ]
        try:
            logs = [p.communicate(timeout=timeout)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    return logs
