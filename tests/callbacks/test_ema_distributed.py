"""EMA on two CPU processes (gloo): under DDP every rank's average equals one process's with the same
global batch; under ModelParallelStrategy + fully_shard every rank averages its own shards (uneven ones
included), validation swaps the shards in and out, the saved checkpoint holds full tensors, and a run
resumed from the sharded checkpoint equals an unsharded run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.callbacks.helpers import Regression, quiet_trainer, run_two_ranks
from vdiff.callbacks.ema import EMA
from vdiff.lit.checkpointing import EMA_KEY
from vdiff.lit.scaling import is_dtensor


def ema(placement: str = "device") -> EMA:
    return EMA(decay=0.8, warmup=True, update_every=2, placement=placement)


def single_process(root: Path, epochs: int, placement: str = "device", **module_kwargs) -> tuple[EMA, Regression]:
    callback = ema(placement)
    module = Regression(**module_kwargs)
    quiet_trainer(root, max_epochs=epochs, callbacks=[callback], val_check_interval=3).fit(module)
    return callback, module


def _ddp_rank(rank: int, root: str) -> dict:
    callback = ema("cpu")
    module = Regression(rank_split=True, val=True, n=24)
    trainer = quiet_trainer(
        Path(root),
        max_epochs=1,
        devices=2,
        strategy="ddp",
        use_distributed_sampler=False,
        val_check_interval=3,
        callbacks=[callback],
    )
    trainer.fit(module)
    return {
        "ema": {n: s.clone() for n, s in callback.shadow.items()},
        "weights": module.tracked(),
        "world_size": trainer.world_size,
    }


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    ranks = run_two_ranks(tmp_path, _ddp_rank, str(tmp_path))
    reference, module = single_process(tmp_path / "single", 1, "cpu", val=True, n=24)
    assert ranks[0]["world_size"] == 2
    for result in ranks:
        for name, shadow in reference.shadow.items():
            torch.testing.assert_close(result["ema"][name], shadow, rtol=1e-5, atol=1e-6)
        for name, weight in module.tracked().items():
            torch.testing.assert_close(result["weights"][name], weight, rtol=1e-5, atol=1e-6)


class ShardedRegression(Regression):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if is_dtensor(self.layer[0].weight):
            return
        mesh = self.device_mesh["data_parallel"]
        for sub in (self.frozen, self.layer[0], self.layer[2]):
            fully_shard(sub, mesh=mesh)
        fully_shard(self, mesh=mesh)  # the root group holds layer.4: FSDP keeps it unsharded after a forward


def _sharded_rank(rank: int, root: str) -> dict:
    from lightning.pytorch.strategies import ModelParallelStrategy

    def trainer(epochs: int, callback: EMA):
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        return quiet_trainer(
            Path(root),
            max_epochs=epochs,
            devices=2,
            strategy=strategy,
            use_distributed_sampler=False,
            val_check_interval=3,
            callbacks=[callback],
        )

    first = ema()
    module = ShardedRegression(rank_split=True, val=True, n=24)
    run = trainer(1, first)
    run.fit(module)
    shards = {n: tuple(s.shape) for n, s in first.shadow.items()}
    sharded = all(is_dtensor(p) for n, p in module.named_parameters() if n in first.shadow)
    path = Path(root) / "sharded.ckpt"
    run.save_checkpoint(path)  # a folder of .distcp shards plus meta.pt
    after_one = first.ema_state_dict(module)  # gathered (a collective)

    second = ema()
    resumed = ShardedRegression(rank_split=True, val=True, n=24)
    trainer(2, second).fit(resumed, ckpt_path=path)
    return {
        "shards": shards,
        "sharded": sharded,
        "after_one": after_one,
        "after_two": second.ema_state_dict(resumed),
        "counters": (second.steps, second.num_updates, second.steps_averaged),
        "meta": torch.load(path / "meta.pt", weights_only=False).get(EMA_KEY) if rank == 0 else None,
    }


def test_sharded_ema_equals_unsharded_and_resumes_from_a_sharded_checkpoint(tmp_path):
    ranks = run_two_ranks(tmp_path, _sharded_rank, str(tmp_path))
    one, _ = single_process(tmp_path / "one", 1, val=True, n=24)
    two, _ = single_process(tmp_path / "two", 2, val=True, n=24)
    assert all(r["sharded"] for r in ranks)
    # Each rank holds its own shard of every average: dim 0 split over the ranks (5 rows -> 3 + 2).
    for name, full in one.shadow.items():
        local = [r["shards"][name] for r in ranks]
        assert sum(shape[0] for shape in local) == full.shape[0], name
    assert ranks[0]["shards"]["layer.2.weight"] == (3, 6) and ranks[1]["shards"]["layer.2.weight"] == (2, 6)
    for r in ranks:
        for name in one.shadow:
            torch.testing.assert_close(r["after_one"][name], one.shadow[name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r["after_two"][name], two.shadow[name], rtol=1e-5, atol=1e-6)
        assert r["counters"] == (two.steps, two.num_updates, two.steps_averaged)
    meta = ranks[0]["meta"]  # the checkpoint holds full tensors, by name
    assert set(meta) == set(one.shadow) and all(meta[n].shape == one.shadow[n].shape for n in meta)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
