"""Two real processes (gloo) x 2 DataLoader workers each, running VideoDataModule's loaders with the
real rank and world size: evaluation sees every sample exactly once (also with fewer shards than
readers, without hanging), skip counts from all workers of all ranks add up to what was injected,
and training ranks step in lockstep on different data."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.data.conftest import write_videos
from vdiff.data import batch as B
from vdiff.data.datamodule import VideoDataModule

WORLD_SIZE = 2
TIMEOUT_S = 240  # a hang fails the test instead of blocking the suite


def _signature(loader) -> list[list]:
    return [[k, idx] for b in loader for k, idx in zip(b[B.KEY], b[B.FRAME_INDICES].tolist())]


def _rank_main(rank: int, init_file: str, cases: dict[str, str], out_dir: str) -> None:
    # Workers fork, as under Lightning's DDP launcher (ranks are fresh scripts); a spawned rank
    # would otherwise spawn its workers too, re-importing torch in each.
    mp.set_start_method("fork", force=True)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        result: dict[str, object] = {}
        for name, folder in cases.items():
            dm = VideoDataModule(val=folder, num_frames=8 if name == "corrupt" else 4, size=16, val_batch_size=2,
                                 num_workers=2)
            assert dm.rank_and_world_size() == (rank, WORLD_SIZE)
            result[name] = _signature(dm.val_dataloader())
            counts = dm.skips.counts.sum(dim=0)
            dist.all_reduce(counts)  # what DataHealthMonitor does through the strategy
            result[name + "_skips"] = {r: int(n) for r, n in zip(dm.skips.reasons, counts.tolist()) if n}
        dm = VideoDataModule(train=cases["many_shards"], num_frames=4, size=16, batch_size=2, num_workers=2,
                             shuffle_buffer=4)
        result["train"] = _signature(dm.train_dataloader())
        result["train_batches"] = dm.train_num_batches()
        dist.barrier()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _run_two_ranks(tmp_path: Path, cases: dict[str, str], start_method: str) -> list[dict]:
    out = tmp_path / "out"
    out.mkdir()
    context = mp.start_processes(
        _rank_main,
        args=(str(tmp_path / "dist_init"), cases, str(out)),
        nprocs=WORLD_SIZE,
        join=False,
        # Forked ranks (as Lightning's "ddp_fork" strategy makes them) start in milliseconds; spawned
        # ones re-import torch (about a minute on 2 busy cores).
        start_method=start_method,
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"distributed data test did not finish in {TIMEOUT_S} s (a rank or worker hangs)")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("start_method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_two_ranks_two_workers_every_sample_once(tmp_path, video_shards, corrupt_corpus, start_method):
    many, keys = video_shards  # 6 shards >= 2 ranks x 2 workers
    few = tmp_path / "few"
    few_keys = write_videos(few, 7, num_frames=6, per_shard=4, key_prefix="f")  # 2 shards < 4 readers
    corrupt, good, expected = corrupt_corpus
    ranks = _run_two_ranks(tmp_path, {"many_shards": str(many), "few_shards": str(few), "corrupt": str(corrupt)},
                           start_method)

    for name, wanted in (("many_shards", keys), ("few_shards", few_keys), ("corrupt", good)):
        per_rank = [[k for k, _ in r[name]] for r in ranks]
        assert sorted(per_rank[0] + per_rank[1]) == sorted(wanted), name  # exactly once, no padding
        assert all(per_rank), name  # both ranks got work
        assert all(idx[0] == 0 for r in ranks for _, idx in r[name])
    # Skip counts of all workers on all ranks, summed, equal what was injected.
    assert ranks[0]["corrupt_skips"] == ranks[1]["corrupt_skips"] == expected
    assert ranks[0]["many_shards_skips"] == {}

    # Training: the default epoch length splits the manifest's samples over ranks; same number of
    # batches on every rank (lockstep), different clips.
    assert ranks[0]["train_batches"] == ranks[1]["train_batches"] == len(keys) // (2 * WORLD_SIZE)
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == len(keys) // WORLD_SIZE
    assert ranks[0]["train"] != ranks[1]["train"]
    assert {k for r in ranks for k, _ in r["train"]} <= set(keys)
