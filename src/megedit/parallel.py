"""Work split across forked CPU processes: the model is shared copy-on-write, not loaded again.

On a CPU, small models leave threads idle (a 135M model's matrices are too small to split
well), so k processes of 1 thread each can get through more than 1 process of k threads. Used by
stage A (`fit_neurons(processes=k)`) and the evaluation (`evaluate(processes=k)`); each part
writes what it finishes to a file of its own, so a part that stops loses only its unwritten work.
Each part runs on one thread: torch's OpenMP (GNU libgomp) cannot start a thread pool again in
a forked child, so a part with more threads could hang.
"""

from __future__ import annotations

import logging
import multiprocessing
from typing import Callable

import torch

from .errors import ConfigError, MeGError
from .lm import model_device

log = logging.getLogger(__name__)


def check_forkable(model, processes: int) -> None:
    """A one-line ConfigError where `processes` forked parts cannot run: not a CPU, or no fork."""
    if processes < 1:
        raise ConfigError(f"processes must be >= 1, found {processes}")
    if processes == 1:
        return
    if model_device(model).type != "cpu":
        raise ConfigError("processes > 1 is for a CPU: on an accelerator one process uses it better")
    if "fork" not in multiprocessing.get_all_start_methods():
        raise ConfigError("processes > 1 needs the 'fork' start method (Linux); use processes=1 here")


def run_forked(work: Callable[[int], None], n: int, what: str, rerun: str = "") -> None:
    """`work(k)` for each part k of n, each in a forked one-thread process; waits for all. A part
    that stops (exit code other than 0) is a one-line MeGError naming it, `what`, and `rerun` (what
    a rerun picks up). Interrupting this process stops the parts; killing it stops them too (Linux)."""

    def part(k: int) -> None:
        _stop_with_parent()
        torch.set_num_threads(1)
        work(k)

    log.info("%s: %d one-thread processes", what, n)
    context = multiprocessing.get_context("fork")
    parts = [context.Process(target=part, args=(k,), name=f"megedit-{what}-{k + 1}") for k in range(n)]
    for p in parts:
        p.start()
    try:
        for p in parts:
            p.join()
    finally:  # interrupted (Ctrl-C): stop the parts too; what they wrote stays for the rerun
        for p in parts:
            if p.is_alive():
                p.terminate()
                p.join()
    stopped = [f"part {k + 1} (exit code {p.exitcode})" for k, p in enumerate(parts) if p.exitcode != 0]
    if stopped:
        raise MeGError(f"{what}: {', '.join(stopped)} of {n} stopped" + (f"; rerun to resume from {rerun}" if rerun else ""))


def _stop_with_parent() -> None:
    """Ask Linux to end this forked part if its parent dies (a killed run leaves no orphans)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux's libc: the parts then finish on their own
        pass
