"""Multi-node data splitting, simulated on one CPU machine: 2 "nodes" x 1 rank x 2 DataLoader workers, each
process started with the environment a multi-node launcher gives it - Lightning's own (NODE_RANK/LOCAL_RANK),
torchrun (GROUP_RANK, TORCHELASTIC_RUN_ID) or SLURM (srun's SLURM_* variables) - and a Trainer with
num_nodes=2, devices=1, strategy=ddp. The global rank comes from the node rank; validation and test read every
clip exactly once across nodes and workers (also with fewer shards than readers); training nodes step in
lockstep on different clips."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from tests.callbacks.helpers import free_port
from tests.data.conftest import write_videos
from vdiff.data import batch as B
from vdiff.data.datamodule import VideoDataModule

NODES = 2
TIMEOUT_S = 300
LAUNCHER_VARS = ("NODE_RANK", "LOCAL_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID")  # fmt: skip


def launcher_env(launcher: str, node: int, port: int) -> dict[str, str]:
    """What each launcher puts in the environment of the one process it starts on node ``node``."""
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if launcher == "lightning":  # e.g. `NODE_RANK=1 python train.py` on each node, Lightning launching locally
        return {**common, "NODE_RANK": str(node), "LOCAL_RANK": "0", "WORLD_SIZE": str(NODES)}
    if launcher == "torchrun":  # torchrun --nnodes 2 --nproc-per-node 1 --node-rank N ...
        return {**common, "TORCHELASTIC_RUN_ID": "vdiff-test", "GROUP_RANK": str(node), "RANK": str(node),
                "LOCAL_RANK": "0", "WORLD_SIZE": str(NODES), "LOCAL_WORLD_SIZE": "1"}  # fmt: skip
    if launcher == "slurm":  # srun inside `sbatch --nodes 2 --ntasks-per-node 1`
        return {**common, "SLURM_NTASKS": str(NODES), "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": str(NODES),
                "SLURM_PROCID": str(node), "SLURM_LOCALID": "0", "SLURM_NODEID": str(node),
                "SLURM_JOB_NAME": "vdiff", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "127.0.0.1"}  # fmt: skip
    raise ValueError(launcher)


class Recorder(L.LightningModule):
    """Records the clip keys each stage delivers on this rank."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.seen: dict[str, list] = {"train": [], "val": [], "test": []}

    def _record(self, stage: str, batch) -> None:
        self.seen[stage] += [[k, idx] for k, idx in zip(batch[B.KEY], batch[B.FRAME_INDICES].tolist())]

    def training_step(self, batch, batch_idx):
        self._record("train", batch)
        return self.layer(batch[B.VIDEO].float().mean().view(1, 1)).sum()

    def validation_step(self, batch, batch_idx):
        self._record("val", batch)

    def test_step(self, batch, batch_idx):
        self._record("test", batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _node_main(node: int, launcher: str, port: int, shards: dict[str, str], out: str) -> None:
    for name in [k for k in os.environ if k in LAUNCHER_VARS or k.startswith("SLURM_")]:
        del os.environ[name]
    os.environ.update(launcher_env(launcher, node, port))
    mp.set_start_method("fork", force=True)  # DataLoader workers fork, as under a real launcher
    torch.set_num_threads(1)
    module = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, num_nodes=NODES, strategy="ddp", max_steps=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=out,
    )  # fmt: skip
    data = dict(num_frames=4, size=16, batch_size=2, val_batch_size=2, num_workers=2, shuffle_buffer=4)
    trainer.fit(module, datamodule=VideoDataModule(train=shards["many"], **data))
    trainer.validate(module, datamodule=VideoDataModule(val=shards["few"], **data), verbose=False)
    trainer.test(module, datamodule=VideoDataModule(test=shards["many"], **data), verbose=False)
    result = {
        "environment": type(trainer.strategy.cluster_environment).__name__,
        "ranks": [trainer.node_rank, trainer.local_rank, trainer.global_rank, trainer.world_size],
        "datamodule_rank": list(VideoDataModule(val=shards["few"]).rank_and_world_size()),
        **module.seen,
    }
    Path(out, f"node{node}.json").write_text(json.dumps(result))


def run_nodes(tmp_path: Path, launcher: str, shards: dict[str, str]) -> list[dict]:
    out = tmp_path / "out"
    out.mkdir()
    context = mp.start_processes(
        _node_main, args=(launcher, free_port(), shards, str(out)), nprocs=NODES, join=False, start_method="fork"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{launcher}: two simulated nodes did not finish in {TIMEOUT_S} s (a rank or worker hangs)")
    return [json.loads((out / f"node{n}.json").read_text()) for n in range(NODES)]


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory) -> tuple[dict[str, str], dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("multinode")
    many = write_videos(root / "many", 16, num_frames=6, per_shard=2, key_prefix="m")  # 8 shards >= 2 x 2 readers
    few = write_videos(root / "few", 7, num_frames=6, per_shard=4, key_prefix="f")  # 2 shards < 4 readers
    return {"many": str(root / "many"), "few": str(root / "few")}, {"many": many, "few": few}


ENVIRONMENTS = {"lightning": "LightningEnvironment", "torchrun": "TorchElasticEnvironment", "slurm": "SLURMEnvironment"}


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("launcher", ["lightning", "torchrun", "slurm"])
def test_two_nodes_split_data_by_node_rank_and_worker(tmp_path, shard_sets, launcher):
    shards, keys = shard_sets
    nodes = run_nodes(tmp_path, launcher, shards)
    for node, result in enumerate(nodes):
        assert result["environment"] == ENVIRONMENTS[launcher]
        assert result["ranks"] == [node, 0, node, NODES]  # node rank, local rank, global rank, world size
        assert result["datamodule_rank"] == [node, NODES]
    for stage, wanted in (("val", keys["few"]), ("test", keys["many"])):
        per_node = [[k for k, _ in r[stage]] for r in nodes]
        assert sorted(per_node[0] + per_node[1]) == sorted(wanted), stage  # every clip exactly once, no padding
        assert all(per_node), stage  # both nodes got work
    # Training: lockstep (same number of batches), different clips on the two nodes.
    assert len(nodes[0]["train"]) == len(nodes[1]["train"]) == 2 * 2
    assert nodes[0]["train"] != nodes[1]["train"]
    assert {k for r in nodes for k, _ in r["train"]} <= set(keys["many"])
