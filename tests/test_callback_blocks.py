"""Callback blocks (recipes/callbacks/*.yaml) added with a second -c append to the recipe's callbacks (EMA stays),
so does --trainer.callbacks+=CLASS; a run whose recipe listed an EMA but ends up without one says so in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vdiff.cli import main
from vdiff.lit.cli import VdiffLightningCLI

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SVD_TINY = RECIPES / "svd_tiny.yaml"
EMA, LORA = "vdiff.callbacks.EMA", "vdiff.callbacks.LoRA"


def printed_callbacks(args: list[str], capsys) -> list[dict]:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]


def test_the_lora_block_appends_to_the_recipes_callbacks(capsys):
    callbacks = printed_callbacks(["-c", str(SVD_TINY), "-c", str(RECIPES / "callbacks" / "lora.yaml")], capsys)
    assert [c["class_path"] for c in callbacks] == [EMA, LORA]
    assert callbacks[0]["init_args"]["decay"] == 0.99  # the recipe's EMA, unchanged
    assert callbacks[1]["init_args"]["preset"] == "attention" and callbacks[1]["init_args"]["target_modules"] is None
    # a setting of the appended callback from the command line (the block's comment says how)
    callbacks = printed_callbacks(["-c", str(SVD_TINY), "-c", str(RECIPES / "callbacks" / "lora.yaml"),
                                   "--trainer.callbacks.init_args.rank", "8"], capsys)  # fmt: skip
    assert [c["class_path"] for c in callbacks] == [EMA, LORA] and callbacks[1]["init_args"]["rank"] == 8
    # the same from the command line (LoRA's defaults: the network's attention preset)
    callbacks = printed_callbacks(["-c", str(SVD_TINY), f"--trainer.callbacks+={LORA}"], capsys)
    assert [c["class_path"] for c in callbacks] == [EMA, LORA] and callbacks[1]["init_args"]["preset"] is None


def test_the_ema_block_adds_an_ema_and_keeps_the_recipes_callbacks(capsys):
    callbacks = printed_callbacks(["-c", str(RECIPES / "vae_kl.yaml"), "-c", str(RECIPES / "callbacks" / "ema.yaml")],
                                  capsys)
    assert [c["class_path"] for c in callbacks] == ["vdiff.callbacks.SampleVideos", EMA]


class Parsed(Exception):
    """Stops `vdiff fit` right after parsing (nothing is built or trained)."""


def parse_fit(args: list[str], monkeypatch, capsys) -> str:
    def stop(self):
        raise Parsed

    monkeypatch.setattr(VdiffLightningCLI, "before_instantiate_classes", stop)
    with pytest.raises(Parsed):
        main(["fit", *args])
    return capsys.readouterr().err


def test_dropping_the_recipes_ema_is_said_in_one_line(tmp_path, monkeypatch, capsys):
    replacing = tmp_path / "lora_only.yaml"  # `callbacks:` (no +) replaces the recipe's list
    replacing.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": LORA}]}}))
    err = parse_fit(["-c", str(SVD_TINY), "-c", str(replacing)], monkeypatch, capsys)
    (line,) = [each for each in err.splitlines() if "EMA" in each]
    assert "warning" in line and str(SVD_TINY) in line and "lists an EMA callback but this run has none" in line
    assert "EMA" not in parse_fit(["-c", str(SVD_TINY), "-c", str(RECIPES / "callbacks" / "lora.yaml")], monkeypatch,
                                  capsys)  # appended: the EMA stays, nothing to say
