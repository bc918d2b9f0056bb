"""Helpers for tests that start servers as child processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen, first: signal.Signals, timeout_s: float) -> None:
    """Sends `first` to the process's group (started with start_new_session=True), waits up to
    `timeout_s`, then SIGKILLs the group."""
    os.killpg(process.pid, first)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
