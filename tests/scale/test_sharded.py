"""Sharded training on 2 CPU processes (gloo): Lightning's ModelParallelStrategy and the base module's
configure_model, which FSDP2-shards every network block and then the network. It trains exactly like one
process with the whole batch, saves a sharded checkpoint folder, resumes from it exactly, and
``vdiff consolidate`` turns the folder into a normal checkpoint whose weights are the gathered ones, whose
optimizer state resumes an unsharded run exactly, and which load_module reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.callbacks.helpers import run_two_ranks
from tests.scale.helpers import cpu_trainer, full_state, placeholder_loader, step_module
from vdiff.callbacks.checkpoint_eval import load_module
from vdiff.callbacks.ema import EMA, is_dtensor
from vdiff.cli import main as vdiff_main
from vdiff.lit.scaling import is_sharded, is_sharded_checkpoint

STEPS, SAVE_AT = 4, 2
TOL = dict(rtol=1e-5, atol=2e-6)


def sharded_trainer(root: Path, steps: int, **kwargs):
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return cpu_trainer(root, steps, devices=2, strategy=strategy, **kwargs)


def _rank(rank: int, root: str) -> dict:
    root = Path(root)
    out: dict = {}
    # A: uninterrupted.
    module = step_module()
    sharded_trainer(root / "a", STEPS).fit(module, train_dataloaders=placeholder_loader())
    params = dict(module.net.named_parameters())
    out["all_dtensor"] = all(is_dtensor(p) for p in params.values())
    out["blocks_sharded"] = [is_sharded(b) for b in module.net.blocks] + [is_sharded(module.net)]
    out["local_numel"] = sum(p.to_local().numel() for p in params.values())
    out["numel"] = sum(p.numel() for p in params.values())
    out["a"], out["a_losses"] = full_state(module), module.losses
    # B: stop after SAVE_AT steps and save a sharded checkpoint (a folder), with an EMA beside.
    module = step_module()
    trainer = sharded_trainer(root / "b", SAVE_AT, callbacks=[EMA(decay=0.5)])
    trainer.fit(module, train_dataloaders=placeholder_loader())
    trainer.save_checkpoint(root / "b.ckpt")
    out["b_saved"] = full_state(module)
    # C: a module with other initial weights resumes from the folder and trains to STEPS.
    module = step_module(seed=7)
    trainer = sharded_trainer(root / "c", STEPS, callbacks=[EMA(decay=0.5)])
    trainer.fit(module, train_dataloaders=placeholder_loader(), ckpt_path=str(root / "b.ckpt"))
    out["c"], out["c_losses"], out["c_step"] = full_state(module), module.losses, trainer.global_step
    return out


def test_sharded_training_checkpoint_resume_and_consolidation(tmp_path):
    ranks = run_two_ranks(tmp_path, _rank, str(tmp_path))
    first = ranks[0]
    # Sharded: every parameter a DTensor, each block and the network an FSDP2 module, half the values a rank.
    assert all(r["all_dtensor"] for r in ranks)
    assert all(all(r["blocks_sharded"]) for r in ranks)
    assert ranks[0]["local_numel"] + ranks[1]["local_numel"] == first["numel"]
    assert 0 < ranks[0]["local_numel"] < first["numel"]

    # Same training as one process with the whole batch.
    single = step_module()
    cpu_trainer(tmp_path / "single", STEPS).fit(single, train_dataloaders=placeholder_loader())
    reference = full_state(single)
    for name, value in reference.items():
        torch.testing.assert_close(first["a"][name], value, **TOL, msg=name)
    mean = [(x + y) / 2 for x, y in zip(ranks[0]["a_losses"], ranks[1]["a_losses"])]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)

    # The checkpoint is a folder of shards; resuming it continues exactly where it stopped.
    folder = tmp_path / "b.ckpt"
    assert is_sharded_checkpoint(folder) and len(list(folder.glob("*.distcp"))) == 2
    assert first["c_step"] == STEPS and len(first["c_losses"]) == STEPS - SAVE_AT
    torch.testing.assert_close(torch.tensor(first["c_losses"]), torch.tensor(first["a_losses"][SAVE_AT:]), **TOL)
    for name, value in first["a"].items():
        torch.testing.assert_close(first["c"][name], value, **TOL, msg=name)

    # vdiff consolidate: one normal checkpoint with the gathered weights (and the EMA's full tensors).
    out = tmp_path / "full.ckpt"
    assert vdiff_main(["consolidate", str(folder), str(out)]) == 0
    checkpoint = torch.load(out, weights_only=False)
    assert checkpoint["global_step"] == SAVE_AT and "ema_state_dict" in checkpoint
    for name, value in first["b_saved"].items():
        assert torch.equal(checkpoint["state_dict"][f"net.{name}"].double(), value), name
    loaded = load_module(str(out), use_ema=False)
    for name, value in first["b_saved"].items():
        assert torch.equal(loaded.net.get_parameter(name).detach().double(), value), name
    assert load_module(str(out)).net is not None  # with the EMA weights too

    # Its optimizer state (keyed by position) resumes an unsharded run exactly.
    resumed = step_module(seed=7)
    cpu_trainer(tmp_path / "d", STEPS).fit(resumed, train_dataloaders=placeholder_loader(), ckpt_path=str(out))
    for name, value in first["a"].items():
        torch.testing.assert_close(full_state(resumed)[name], value, **TOL, msg=name)


def test_consolidate_refuses_what_is_not_a_sharded_folder(tmp_path, capsys):
    (tmp_path / "file.ckpt").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    for source, error in (("file.ckpt", "already a single checkpoint file"), ("empty", "not a sharded checkpoint")):
        with pytest.raises((ValueError, FileNotFoundError), match=error):  # one line from the shell: test_cli_errors
            vdiff_main(["consolidate", str(tmp_path / source), str(tmp_path / "out.ckpt")])
    assert not (tmp_path / "out.ckpt").exists()


def test_consolidate_reads_fsdp1_folders_and_names_optimizer_parameters(tmp_path):
    """FSDPStrategy's sharded layout (``model`` + ``optimizer_0`` keyed by parameter name) becomes the same
    single file: weights under state_dict, the optimizer state numbered in group order."""
    import torch.distributed.checkpoint as dcp

    from vdiff.lit.scaling import load_sharded_checkpoint

    weights = {"net.a": torch.arange(6.0).view(2, 3), "net.b": torch.ones(3)}
    optimizer = {
        "state": {"net.b": {"exp_avg": torch.full((3,), 2.0)}, "net.a": {"exp_avg": torch.zeros(2, 3)}},
        "param_groups": [{"lr": 0.1, "params": ["net.a"]}, {"lr": 0.2, "params": ["net.b"]}],
    }
    folder = tmp_path / "fsdp1.ckpt"
    dcp.save({"model": weights, "optimizer_0": optimizer}, checkpoint_id=folder, no_dist=True)
    torch.save({"global_step": 7, "vdiff_module": "x.Y"}, folder / "meta.pt")
    checkpoint = load_sharded_checkpoint(folder)
    assert checkpoint["global_step"] == 7 and checkpoint["vdiff_module"] == "x.Y"
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in weights.items())
    (state,) = checkpoint["optimizer_states"]
    assert [g["params"] for g in state["param_groups"]] == [[0], [1]]
    assert [g["lr"] for g in state["param_groups"]] == [0.1, 0.2]
    assert torch.equal(state["state"][1]["exp_avg"], torch.full((3,), 2.0))
    assert "optimizer_states" not in load_sharded_checkpoint(folder, optimizer=False)
