"""The `vdiff` command line: help for every command, recipe printing, bad recipes fail early with
one readable message (the full traceback behind VDIFF_DEBUG=1 / --debug)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vdiff.cli import DATA_TOOLS, TOP_TOOLS, main
from vdiff.lit.cli import RecipeError, argument_error_message

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
HINT = "See `vdiff fit --help` for the options; VDIFF_DEBUG=1 shows the full traceback."


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
def test_mistyped_recipe_key_fails_before_training(tmp_path, capsys, monkeypatch, section, bad_key):
    recipe = yaml.safe_load(QUICKSTART.read_text())
    target = recipe[section]["init_args"] if section in ("model", "data") else recipe[section]
    target[bad_key] = 3
    recipe["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=bad_key):  # called from Python, the error propagates
        main(["fit", "-c", str(path)])
    # from the shell, one message and exit status 2
    monkeypatch.setattr(sys, "argv", ["vdiff", "fit", "-c", str(path)])
    monkeypatch.delenv("VDIFF_DEBUG", raising=False)
    assert main() == 2
    err = capsys.readouterr().err
    assert err.count(bad_key) == 1 and err.endswith(HINT + "\n") and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing was trained or logged


def _vdiff(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("VDIFF_DEBUG", "VDIFF_WEIGHTS")}
    vdiff = Path(sys.executable).with_name("vdiff")
    return subprocess.run([str(vdiff), *args], cwd=cwd, env={**environ, **env}, capture_output=True, text=True,
                          timeout=300)


def test_mistyped_key_on_the_command_line_prints_one_line_and_the_help_hint(tmp_path):
    result = _vdiff(["fit", "-c", str(QUICKSTART), "--model.init_args.lrr", "1"], tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "vdiff fit: error: model: vdiff.lit.vdt.VDTModule: Option 'lrr' is not accepted\n" + HINT + "\n"
    )
    assert result.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_an_abbreviated_option_is_an_error_not_another_option(tmp_path):
    """argparse would silently read `--trainer.max_step` as `--trainer.max_steps`."""
    result = _vdiff(["fit", "-c", str(QUICKSTART), "--trainer.max_step", "1", "--print_config"], tmp_path)
    assert result.returncode == 2
    assert result.stderr == "vdiff fit: error: unrecognized arguments: --trainer.max_step 1\n" + HINT + "\n"


def test_missing_vae_weights_print_the_message_once_without_a_traceback(tmp_path):
    # The recipe names sd-vae-ft-mse by hub id; offline and not in the (empty) Hugging Face cache of the tests.
    result = _vdiff(["fit", "-c", str(REPO / "recipes" / "vdt_cityscapes.yaml")], tmp_path, HF_HUB_OFFLINE="1",
                    HF_HOME=str(tmp_path / "hf"))  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert len(lines) == 3, result.stderr
    assert lines[0] == "Seed set to 0"  # Lightning's line, before the recipe is built
    # the recipe's weights are looked up before anything is built (vdiff.lit.weights_check): named by the option
    assert lines[1].startswith(
        "vdiff fit: error: model.init_args.autoencoder.init_args.path: hf://stabilityai/sd-vae-ft-mse ")
    for needle in ("is not in the Hugging Face cache", "HF_HUB_OFFLINE=1", "vdiff weights download", "$VDIFF_WEIGHTS",
                   'README section "Pretrained weights"'):  # fmt: skip
        assert result.stderr.count(needle) == 1, needle
    assert lines[2] == HINT


def test_debug_switch_shows_the_full_traceback(tmp_path, monkeypatch, capsys):
    args = ["fit", "-c", str(QUICKSTART), "--model.init_args.lrr", "1"]
    for argv, env in ((["vdiff", *args], "1"), (["vdiff", "--debug", *args], ""), (["vdiff", *args, "--debug"], "")):
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.setenv("VDIFF_DEBUG", env)
        with pytest.raises(RecipeError) as info:  # the traceback, with jsonargparse's error as the cause
            main()
        assert "Option 'lrr' is not accepted" in str(info.value.__cause__)
    assert capsys.readouterr().err == ""


def test_unexpected_errors_while_training_keep_their_traceback(tmp_path, monkeypatch):
    class Boom(RuntimeError):
        pass

    def explode(*args, **kwargs):
        raise Boom("a bug")

    monkeypatch.setattr("vdiff.lit.cli.VdiffLightningCLI._run_subcommand", explode)
    monkeypatch.setattr(sys, "argv", ["vdiff", "fit", "-c", str(QUICKSTART), "--trainer.logger.init_args.save_dir",
                                      str(tmp_path / "runs")])
    monkeypatch.delenv("VDIFF_DEBUG", raising=False)
    with pytest.raises(Boom):
        main()


def test_jsonargparse_errors_shrink_to_the_leaf_message():
    nested = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.module.LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'vdiff.lit.vdt.VDTModule':
        Parser key "mask_specs":
          Does not validate against any of the Union subtypes
          Subtypes: [dict[str, vdiff.diffusion.masks.MaskSpec], <class 'NoneType'>]
          Errors:
            - Problem with given class_path 'vdiff.diffusion.MaskSpec':
                Option 'given_framez' is not accepted
            - Expected a <class 'NoneType'>
          Given value type: <class 'dict'>
          Given value: {'predict': {'mode': 'prediction', 'given_framez': 2}}
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='mask_specs', val={'predict': {'mode': 'prediction', 'given_framez': 2}})"""
    assert argument_error_message(nested) == (
        "model: vdiff.lit.vdt.VDTModule: mask_specs: vdiff.diffusion.MaskSpec: Option 'given_framez' is not accepted"
    )
    assert argument_error_message('Parser key "trainer.max_steps":\n  Expected a <class \'int\'>. Got value: abc') == (
        "trainer.max_steps: Expected a <class 'int'>. Got value: abc"
    )
    assert argument_error_message("something else entirely") == "something else entirely"
