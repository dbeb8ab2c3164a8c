"""The `vdiff` command line: help for every command, recipe printing, bad recipes fail early."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vdiff.cli import DATA_TOOLS, TOP_TOOLS, main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "sample", "encode", *DATA_TOOLS):
        assert name in out, name


@pytest.mark.parametrize("tool", sorted(DATA_TOOLS))
def test_every_data_tool_has_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", tool, "--help"])
    assert exit_info.value.code == 0
    assert f"vdiff data {tool}" in capsys.readouterr().out


@pytest.mark.parametrize("tool", sorted(TOP_TOOLS))
def test_top_tools_have_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([tool, "--help"])
    assert exit_info.value.code == 0
    assert f"vdiff {tool}" in capsys.readouterr().out


def test_unknown_command_and_tool_fail(capsys):
    assert main(["fitt"]) == 2
    assert "unknown command 'fitt'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "synthh"])
    assert exit_info.value.code == 2


def test_fit_help_and_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(QUICKSTART), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "vdiff.lit.vdt.VDTModule"
    assert printed["data"]["class_path"] == "vdiff.data.synthetic_datamodule.SyntheticDrivingDataModule"
    assert printed["checkpoint"]["save_last"] is True
    assert printed["model"]["init_args"]["mask_specs"]["predict"]["given_frames"] == 2


@pytest.mark.parametrize(
    "section, bad_key",
    [("model", "hiden_size"), ("data", "num_frame"), ("trainer", "max_step")],
)
def test_mistyped_recipe_key_fails_before_training(tmp_path, capsys, section, bad_key):
    recipe = yaml.safe_load(QUICKSTART.read_text())
    target = recipe[section]["init_args"] if section in ("model", "data") else recipe[section]
    target[bad_key] = 3
    recipe["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(path)])
    assert exit_info.value.code != 0
    assert bad_key in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was trained or logged
