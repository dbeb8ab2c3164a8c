"""The adapter folders beside a checkpoint (``last_lora/``) are replaced so that a kill at any step of the
replacement leaves a complete adapter folder that loads (old or new), and the next write cleans up."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.callbacks.test_lora import tiny_net
from vdiff.lit.adapters import (
    VDT_TEMPORAL_ATTENTION,
    LoRAAdapter,
    adapter_parameters,
    adapter_state_dict,
    inject_adapters,
    load_adapter,
)
from vdiff.weights import peft_files
from vdiff.weights.peft_files import ADAPTER_WEIGHTS, write_adapter_folders

SPATIAL_ATTENTION = r"blocks\.\d+\.attn\.(qkv|proj)"
ADAPTERS = {"temporal": VDT_TEMPORAL_ATTENTION, "spatial": SPATIAL_ATTENTION}


class Killed(BaseException):
    """The process dies here (nothing after this step runs)."""


def adapters(value: float) -> tuple[dict, dict]:
    """(configs, states) of two adapters whose every weight is ``value``."""
    net = tiny_net()
    inject_adapters(net, {name: LoRAAdapter(target, rank=2).peft_config() for name, target in ADAPTERS.items()})
    with torch.no_grad():
        for name in ADAPTERS:
            for _, param in adapter_parameters(net, name).values():
                param.fill_(value)
    return {name: net.peft_config[name] for name in ADAPTERS}, {name: adapter_state_dict(net, name) for name in ADAPTERS}


def loaded_value(folder) -> float:
    """The value of every weight of the adapters loaded from ``folder/<adapter>`` onto a fresh network
    (:func:`load_adapter`, as a ``LoRAAdapter(path=...)`` or a user does); all of them must agree."""
    values = set()
    for name in ADAPTERS:
        net = load_adapter(tiny_net(), folder / name, name)
        for _, param in adapter_parameters(net, name).values():
            values.update(param.detach().unique().tolist())
    assert len(values) == 1, values
    return values.pop()


class KillAt:
    """Raises :class:`Killed` at the ``k``-th file-system step of a folder replacement (renames, deletions,
    adapter writes); a deletion or an adapter write is cut half-way, as a real kill would."""

    def __init__(self, monkeypatch, k: int) -> None:
        self.k, self.steps = k, 0
        real_rename, real_replace, real_rmtree, real_write = os.rename, os.replace, shutil.rmtree, peft_files.write_adapter

        def step(partial=None):
            self.steps += 1
            if self.steps == self.k:
                if partial is not None:
                    partial()
                raise Killed(f"step {self.k}")

        def rename(src, dst, *args, **kwargs):
            step()
            return real_rename(src, dst, *args, **kwargs)

        def replace(src, dst, *args, **kwargs):
            step()
            return real_replace(src, dst, *args, **kwargs)

        def rmtree(path, *args, **kwargs):
            def half():  # one file of the folder is gone
                files = sorted(p for p in Path(path).rglob("*") if p.is_file())
                if files:
                    files[0].unlink()

            step(half)
            return real_rmtree(path, *args, **kwargs)

        def write_adapter(folder, config, state):
            def half():  # the config is there, the weights file is cut
                real_write(folder, config, state)
                weights = folder / ADAPTER_WEIGHTS
                weights.write_bytes(weights.read_bytes()[:64])

            step(half)
            return real_write(folder, config, state)

        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(shutil, "rmtree", rmtree)
        monkeypatch.setattr(peft_files, "write_adapter", write_adapter)


def test_a_kill_at_any_step_of_the_replacement_leaves_a_complete_folder(tmp_path, monkeypatch):
    old_configs, old_states = adapters(1.0)
    new_configs, new_states = adapters(2.0)
    next_configs, next_states = adapters(3.0)
    k = 1
    while True:
        run = tmp_path / f"kill_{k}"
        folder = run / "last_lora"
        write_adapter_folders(folder, old_configs, old_states)
        with monkeypatch.context() as patch:
            killer = KillAt(patch, k)
            try:
                write_adapter_folders(folder, new_configs, new_states)
                finished = True
            except Killed:
                finished = False
        # At every step a complete folder loads: the old adapters or the new ones.
        assert loaded_value(folder) in (1.0, 2.0), f"killed at step {k}"
        if finished:
            assert loaded_value(folder) == 2.0
            assert sorted(p.name for p in run.iterdir()) == ["last_lora"]
            break
        # The next write (the next checkpoint) finishes or discards the interrupted one and leaves no leftovers.
        write_adapter_folders(folder, next_configs, next_states)
        assert loaded_value(folder) == 3.0, f"killed at step {k}"
        assert sorted(p.name for p in run.iterdir()) == ["last_lora"], f"killed at step {k}"
        k += 1
    assert killer.steps >= 6 and k == killer.steps + 1  # every step of a full replacement was interrupted once


def test_a_kill_between_the_renames_reads_the_new_folder_and_the_next_write_recovers(tmp_path, monkeypatch):
    folder = tmp_path / "last_lora"
    write_adapter_folders(folder, *adapters(1.0))
    real_replace = os.replace

    def replace(src, dst):
        if str(src) == str(folder):  # the old folder moves aside, then the process dies
            real_replace(src, dst)
            raise Killed

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        write_adapter_folders(folder, *adapters(2.0))
    monkeypatch.setattr(os, "replace", real_replace)
    assert not folder.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["last_lora.old", "last_lora.tmp"]
    assert loaded_value(folder) == 2.0  # the new, complete folder (it matches the checkpoint written before it)
    peft_files.recover_adapter_folders(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_lora"] and loaded_value(folder) == 2.0


@pytest.mark.parametrize("name", ["../escaped", "/abs/adapter", "sub/dir", "..", "a.b"])
def test_an_adapter_name_never_chooses_a_folder_outside_its_own(tmp_path, name):
    """Adapter names come from recipes and from checkpoints someone sent: a name that is not plain is refused
    (naming it) before anything is written, by the checkpoint writer and by `vdiff export`/loading alike."""
    configs, states = adapters(0.5)
    configs = {name: configs["temporal"]}
    states = {name: states["temporal"]}
    folder = tmp_path / "box" / "last_lora"
    with pytest.raises(ValueError, match="cannot name a folder"):
        write_adapter_folders(folder, configs, states)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.resolve().is_relative_to((tmp_path / "box").resolve()) for p in written), written
    assert not any(p.name == ADAPTER_WEIGHTS for p in written)
    assert peft_files.named_adapter_folder(folder, "spatial-2_x") == folder / "spatial-2_x"
