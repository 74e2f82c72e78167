"""`--executor local` (the default): the cells run on this machine, one at a time or in `--jobs` worker processes
that die with the study's process; Ctrl-C stops them at once (their cells stay unfinished, to be run again)."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import sys
import threading
import time

from gradest.errors import GradestError
from gradest.study.executor import Executor, ExecutorOption, positive_int, register_executor
from gradest.study.runner import RunSummary, _check_devices, cell_progress, execute


JOBS = ExecutorOption("jobs", positive_int("jobs", 1, 1024), 1, "cells run in parallel, each in its own process with "
                      "--threads torch threads [default: 1]", metavar="N")


def run_here(cells, options: dict, threads: int, *, runner=None, command=None, progress=True, where="", results=None,
             label="study") -> RunSummary:
    _check_devices(cells, where)
    summary = RunSummary(total=len(cells), skipped=0)
    jobs = options["jobs"]
    with cell_progress(summary, len(cells), label, progress) as record:
        if jobs <= 1 or len(cells) <= 1:
            import torch
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                for cell in cells:
                    record(cell, *execute(cell, runner, command))
            finally:
                torch.set_num_threads(previous)
            return summary
        context = multiprocessing.get_context("spawn")
        try:
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                                        initargs=(os.getpid(), threads)) as pool:
                try:
                    futures = {pool.submit(execute, cell, runner, command): cell for cell in cells}
                    for future in concurrent.futures.as_completed(futures):
                        record(futures[future], *future.result())
                except BaseException:  # Ctrl-C (KeyboardInterrupt), a worker that died
                    _stop_workers(pool)
                    raise
        except concurrent.futures.process.BrokenProcessPool:
            raise GradestError("a worker process died (killed or out of memory); run the study again to finish "
                               "the remaining cells") from None
    return summary


def _init_worker(parent: int, threads: int):
    """A worker process: `threads` torch threads (the study's, see `run_study`); it dies with the study's process
    (else, that one killed, it would run the queued cells and then wait forever), and leaves Ctrl-C to it (which
    stops the workers, `_stop_workers`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: the kernel sends SIGTERM when the parent dies
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    else:  # elsewhere a watchdog thread notices the parent is gone (the worker is re-parented)
        def watch():
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)
        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the worker asked to die with it
        os._exit(1)
    import torch
    torch.set_num_threads(threads)


def _stop_workers(pool: concurrent.futures.ProcessPoolExecutor):
    """Cancel the queued cells and end the running ones now, instead of waiting for them (as leaving the pool's
    `with` would): their cells stay unfinished (no done.json), to be run again."""
    for process in list((pool._processes or {}).values()):  # no public way before Python 3.14's terminate_workers
        process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


register_executor(Executor("local", "the cells run on this machine (--jobs at once)", run_here, options=(JOBS,),
                           threads=lambda options: 1))
