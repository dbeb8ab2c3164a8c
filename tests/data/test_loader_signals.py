"""VideoLoader's workers survive a SIGTERM sent to the whole job (as SLURM sends it before a time limit), so
the training process, which handles it, is not stopped mid-checkpoint by "DataLoader worker ... is killed by
signal: Terminated"; a worker_init_fn of the caller still runs."""

from __future__ import annotations

import multiprocessing
import subprocess
import time

import torch
from torch.utils.data import IterableDataset

from vdiff.data.loader import VideoLoader


class Numbers(IterableDataset):
    def __iter__(self):
        yield from range(20)


def mark_started(worker_id: int) -> None:
    torch.utils.data.get_worker_info().dataset.started = worker_id + 100


def test_workers_ignore_a_sigterm_from_another_process_and_run_the_callers_init():
    loader = VideoLoader(Numbers(), epoch_fn=lambda: 0, batch_size=1, num_workers=1,
                         multiprocessing_context="fork", worker_init_fn=mark_started)
    before = set(multiprocessing.active_children())
    it = iter(loader)
    first = next(it)
    (worker,) = set(multiprocessing.active_children()) - before
    # from another process (SLURM's slurmstepd, not the worker's parent, sends it)
    subprocess.run(["kill", "-s", "TERM", str(worker.pid)], check=True)
    time.sleep(1.0)
    assert worker.is_alive()
    rest = [int(batch) for batch in it]
    assert [int(first), *rest] == list(range(20))


def test_the_callers_worker_init_fn_runs_in_the_worker():
    class Started(IterableDataset):
        started = None

        def __iter__(self):
            yield self.started

    loader = VideoLoader(Started(), epoch_fn=lambda: 0, batch_size=None, num_workers=1,
                         multiprocessing_context="fork", worker_init_fn=mark_started)
    assert list(loader) == [100]
