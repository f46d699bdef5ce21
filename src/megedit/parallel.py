"""Work split into parts, run by processes that share a folder: forked here, or started by a launcher.

Stage A and the evaluation cut their work into parts that each write what they finish to files of
their own, so a part that stops loses only its unwritten work. The parts run one of two ways:

- forked on this machine (`fit_neurons(processes=k)`, `evaluate(processes=k)`, `--processes k`):
  the model is shared copy-on-write, not loaded again. On a CPU, small models leave threads idle
  (a 135M model's matrices are too small to split well), so k processes of 1 thread each get
  through more than 1 process of k threads. Each part runs on one thread: torch's OpenMP (GNU
  libgomp) cannot start a thread pool again in a forked child, so a part with more threads could hang.
- as the ranks of a torch.distributed group (`torchrun`, `accelerate launch`; gloo on CPU, NCCL
  on CUDA), on any number of machines that share the work folder: each rank runs its part, waits
  for the others at a barrier, then reads every part's files.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from datetime import timedelta
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


# a rank may wait at a barrier while the others finish their parts: hours at 10,000 edits
GROUP_TIMEOUT_S = float(os.environ.get("MEGEDIT_GROUP_TIMEOUT_S", 7 * 24 * 3600))


def launched() -> int:
    """How many ranks the launcher that started this process asked for (WORLD_SIZE; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_group() -> tuple[int, int]:
    """Join the torch.distributed group a launcher describes in the environment (WORLD_SIZE > 1;
    gloo on CPU, NCCL with CUDA, each rank on its LOCAL_RANK's GPU) unless joined already; returns
    `ranks()`. Outside a launcher: nothing, (0, 1)."""
    import torch.distributed as dist

    if launched() > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=GROUP_TIMEOUT_S))
        log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return ranks()


def ranks() -> tuple[int, int]:
    """(this process's rank, the number of ranks) in its torch.distributed group; (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def leave_group() -> int:
    """Leave the torch.distributed group once every rank gets here (what follows runs in each process on its own);
    returns the rank this process had."""
    import torch.distributed as dist

    rank, world = ranks()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return rank


def barrier() -> None:
    """Wait until every rank gets here (nothing outside a group)."""
    import torch.distributed as dist

    if ranks()[1] > 1:
        dist.barrier()


def run_parts(work: Callable[[int, int], None], processes: int, what: str, rerun: str = "") -> None:
    """`work(k, n)` for each part k of n: on `processes` forked processes here (run_forked), or, in a
    torch.distributed group, this rank's part, then a barrier (every rank's files are written after it)."""
    rank, world = ranks()
    if world > 1:
        if processes > 1:
            raise ConfigError(f"{what}: processes={processes} inside a group of {world} ranks; the ranks are the parts")
        work(rank, world)
        barrier()
    else:
        run_forked(lambda k: work(k, processes), processes, what, rerun)
