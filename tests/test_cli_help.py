"""`vdiff fit --help` starts with what a user looks for (printed before Lightning loads), then every option,
without Sphinx markup; `vdiff --version`."""

from __future__ import annotations

import pytest

import vdiff.cli
from vdiff.cli import LIGHTNING_HELP, main
from vdiff.lit.cli import plain_text

MARKUP = ("``", ":class:`", ":func:`", ":meth:`", ":mod:`", ":attr:`", ".. warning::", ".. note::")


@pytest.mark.parametrize("command", ["fit", "test"])
def test_help_starts_with_the_common_options_then_lists_every_option(command, capsys, monkeypatch):
    seen_before_lightning = []
    run = vdiff.cli.VdiffCLI.run

    def recording_run(argv):
        seen_before_lightning.append(capsys.readouterr().out)
        return run(argv)

    monkeypatch.setattr(vdiff.cli.VdiffCLI, "run", staticmethod(recording_run))
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    (header,) = seen_before_lightning
    assert header.startswith(LIGHTNING_HELP[command]) and "--ckpt_path" in header
    full = capsys.readouterr().out
    assert full.startswith(f"usage: vdiff {command} -c RECIPE [--KEY VALUE ...]\n")  # not 60 lines of [--option]
    assert "--trainer.max_steps MAX_STEPS" in full and "--data.help" in full  # the full list follows
    for markup in MARKUP:
        assert markup not in full, markup
    if command == "fit":
        for option in ("--trainer.max_steps", "--trainer.max_time", "--ckpt_path last", "--print_config",
                       "--data.init_args.train", "recipes/quickstart.yaml"):  # fmt: skip
            assert option in header, option


def test_plain_text_drops_sphinx_markup():
    assert plain_text("a :class:`~lightning.pytorch.Trainer` and :func:`torch.no_grad`") == (
        "a Trainer and torch.no_grad"
    )
    assert plain_text('Default: ``"auto"``; see :ref:`the guide <guide>`. .. warning:: slow') == (
        'Default: "auto"; see the guide. Warning: slow'
    )
    assert plain_text(":py:meth:`~a.B.log` keeps `single` ticks") == "log keeps `single` ticks"


def test_version(capsys):
    from vdiff import __version__

    assert main(["--version"]) == 0 and main(["-V"]) == 0
    assert capsys.readouterr().out == f"vdiff {__version__}\n" * 2
