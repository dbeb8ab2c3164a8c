"""Every ``vdiff ...`` command the docs show parses against today's CLI, so the next renamed option, tool or
recipe key fails CI instead of the user who copies the command.

Where commands are found: README.md, docs/*.md and benchmarks/README.md (in ```bash blocks every line that runs
vdiff; in prose every `...` span that does) and the comments of recipes/**/*.yaml (a comment line indented by two
or more spaces that runs vdiff is a command line, ``#   vdiff fit -c recipes/x.yaml``; elsewhere in comments,
`...` spans). The shell around a command is read as a shell would: ``.venv/bin/vdiff`` and ``$(which vdiff)``,
``NAME=value`` prefixes (set while the command is parsed), ``srun``/``torchrun`` launchers, ``\\`` continuations,
``&&``/``||``/``;``/``|`` chains, ``> file`` redirections, trailing ``# comments`` and ``${VAR:+words}`` (expanded
as when VAR is set: a requeued SLURM job).

Placeholders: a word that stands for a value of a kind the parser checks gets a concrete one (:data:`PLACEHOLDERS`:
RECIPE and recipes/<model>.yaml are a recipe file, N a number, version_N a version folder); ``...`` in a
``fit|validate|test|predict`` command without ``-c`` stands for the recipe (quickstart's), elsewhere for more
options the reader adds (dropped). Paths such as ``/path/to/x``, CKPT or FOLDER are values already: argparse does
not look at files. ``a|b`` in the command word is a summary of several commands, each checked. A span in prose may
show one option of a tool without its required arguments: it is parsed with the required arguments made optional,
and as strictly as a command line otherwise. Lines that are syntax, not commands: :data:`SYNTAX_SUMMARIES`.

What is checked: argparse tools (``vdiff data TOOL``, ``vdiff sample|encode|export|evaluate|consolidate|weights``)
parse with the parser ``vdiff`` builds (:func:`vdiff.cli.tool_parser`) and are never run; for
``fit|validate|test|predict`` the recipes given to ``-c`` exist (fast), and (slow: Lightning) the recipes and
overrides parse as ``vdiff COMMAND ... --print_config`` parses them, which validates every class's init_args and
exits before anything is built. A failure names the file and line of the command.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from vdiff.cli import DATA_TOOLS, LIGHTNING_COMMANDS, TOP_TOOLS, tool_parser

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/quickstart.yaml"  # the recipe a placeholder for "your recipe" becomes

# A word that stands for a value of a kind the parser checks -> a concrete value of that kind.
PLACEHOLDERS = {"RECIPE": RECIPE, "N": "2"}
PLACEHOLDER_PARTS = (
    (re.compile(r"^recipes/(?:<\w+>|[A-Z]+)\.yaml$"), RECIPE),  # recipes/<model>.yaml, recipes/X.yaml
    (re.compile(r"version_N\b"), "version_0"),
    (re.compile(r"^\[(-[^\]]+)\]$"), r"\1"),  # a usage line's optional [--flag]
)

# Spans that show the syntax of vdiff's output or of several commands at once, not a command (text as written).
SYNTAX_SUMMARIES = {
    "vdiff COMMAND: error: MESSAGE",  # the form of every error line (docs/architecture.md, "Errors")
    "vdiff TOOL: error: ...",  # the same, for the argparse tools (README)
}

SHELL_FENCES = {"bash", "sh", "shell", "console", "zsh"}
LAUNCHERS = {"srun", "torchrun", "mpirun"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
VDIFF_WORD = re.compile(r"(?:^|/)vdiff$")
CHAIN = re.compile(r"\s*(?:&&|\|\||;|\s\|\s)\s*")
REDIRECTION = re.compile(r"^(?:\d?>>?|&>|<|\d>&\d)")
SPAN = re.compile(r"`([^`]+)`")
HELP = {"-h", "--help"}


@dataclass(frozen=True)
class DocCommand:
    """One vdiff command shown in a doc: where, as written, and the arguments after ``vdiff`` (placeholders
    substituted)."""

    where: str  # FILE:LINE (the first line)
    text: str  # as written, continuation lines joined
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    mention: bool = False  # a span in prose: it may leave out required arguments
    last: int = 0  # the last line it is written on

    @property
    def lines(self) -> range:
        first = int(self.where.rsplit(":", 1)[1])
        return range(first, max(first, self.last) + 1)

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


# ---------------------------------------------------------------------------------------------- extraction


def _concrete(argv: list[str]) -> list[str]:
    """Placeholders -> concrete values of their kind (module docstring)."""
    lightning = argv[0] in LIGHTNING_COMMANDS
    has_recipe = any(a in ("-c", "--config") or a.startswith("--config=") for a in argv)
    out = [argv[0]]
    for word in argv[1:]:
        if word == "...":
            if lightning and not has_recipe:  # `vdiff fit ... --trainer.num_nodes 2`: the recipe and the rest
                out += ["-c", RECIPE]
                has_recipe = True
            continue
        word = PLACEHOLDERS.get(word, word)
        for pattern, value in PLACEHOLDER_PARTS:
            word = pattern.sub(value, word)
        out.append(word)
    if lightning and not has_recipe and len(out) > 1 and not HELP & set(out):
        out[1:1] = ["-c", RECIPE]  # a span showing one option of `vdiff fit`: on your recipe
    return out


def _alternatives(argv: list[str]) -> Iterator[list[str]]:
    """``vdiff fit|validate ...``, ``vdiff data shards|opendv ...``, ``vdiff weights list|verify``: one command per
    alternative."""
    for head in argv[0].split("|"):
        if len(argv) > 1 and "|" in argv[1] and not argv[1].startswith("-"):
            for second in argv[1].split("|"):
                yield [head, second, *argv[2:]]
        else:
            yield [head, *argv[1:]]


def commands_in_shell(text: str, where: str, mention: bool, last: int = 0) -> list[DocCommand]:
    """The vdiff commands of one shell line (a chain of commands), as a shell would run them."""
    if text.strip() in SYNTAX_SUMMARIES:
        return []
    line = text.replace("$(which vdiff)", "vdiff")
    line = re.sub(r"\$\{\w+:\+([^}]*)\}", r"\1", line)  # ${SLURM_RESTART_COUNT:+--ckpt_path last}: the restart
    found = []
    for segment in CHAIN.split(line):
        try:
            words = shlex.split(segment, comments=True)
        except ValueError as err:  # unbalanced quotes: only worth a failure where vdiff runs
            if re.search(r"(?:^|[\s/])vdiff\s", segment):
                found.append(DocCommand(where, text.strip(), ("<unreadable>", str(err)), (), mention, last))
            continue
        cut = next((i for i, w in enumerate(words) if REDIRECTION.match(w)), len(words))
        words = words[:cut]
        at = next((i for i, w in enumerate(words) if VDIFF_WORD.search(w)), None)
        if at is None:
            continue
        prefix = words[:at]
        env = tuple((w.split("=", 1)[0], w.split("=", 1)[1]) for w in prefix if ENV_ASSIGNMENT.match(w))
        others = [w for w in prefix if not ENV_ASSIGNMENT.match(w)]
        if (others and others[0] not in LAUNCHERS) or len(words) == at + 1:
            continue  # `pip install vdiff`, `~/.cache/vdiff`: not a vdiff command
        for argv in _alternatives(words[at + 1 :]):
            found.append(DocCommand(where, text.strip(), tuple(_concrete(argv)), env, mention, last))
    return found


def _spans(paragraph: list[tuple[int, str]], name: str) -> list[DocCommand]:
    """Commands in the `...` spans of a paragraph (lines joined: a span may continue on the next line)."""
    starts, parts, offset = [], [], 0
    for lineno, line in paragraph:
        starts.append((offset, lineno))
        parts.append(line.strip())
        offset += len(parts[-1]) + 1
    joined = " ".join(parts)
    found = []
    for match in SPAN.finditer(joined):
        lineno = max(n for o, n in starts if o <= match.start())
        last = max(n for o, n in starts if o < match.end())
        span = match.group(1).replace("\\|", "|")  # a `|` escaped in a markdown table
        found += commands_in_shell(span, f"{name}:{lineno}", mention=True, last=last)
    return found


def _command_line(
    pending: tuple[int, str] | None, lineno: int, line: str, name: str
) -> tuple[tuple[int, str] | None, list[DocCommand]]:
    """One more line of a command line: (the command still continued with `\\`, or None; the commands completed)."""
    start, command = pending if pending else (lineno, "")
    command = f"{command} {line.strip()}".strip()
    if command.endswith("\\"):
        return (start, command[:-1].rstrip()), []
    return None, commands_in_shell(command, f"{name}:{start}", mention=False, last=lineno)


def commands_in_markdown(text: str, name: str) -> list[DocCommand]:
    found: list[DocCommand] = []
    paragraph: list[tuple[int, str]] = []
    fence: str | None = None  # the language of the open ``` block
    pending: tuple[int, str] | None = None  # a command continued with `\`
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            found += _spans(paragraph, name)
            paragraph = []
            fence = None if fence is not None else line.strip()[3:].strip().lower()
            continue
        if fence is None:
            if line.strip():
                paragraph.append((lineno, line))
            else:
                found += _spans(paragraph, name)
                paragraph = []
        elif fence in SHELL_FENCES:
            pending, done = _command_line(pending, lineno, line, name)
            found += done
    return found + _spans(paragraph, name)


RECIPE_COMMAND_LINE = re.compile(r"^\s{2,}(?:[A-Za-z_]\w*=\S*\s+)*(?:(?:srun|torchrun)\s+)?\S*vdiff\s")


def commands_in_recipe(text: str, name: str) -> list[DocCommand]:
    """Command lines (``#   vdiff ...``) and `...` spans in a recipe's comments."""
    found: list[DocCommand] = []
    paragraph: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if not stripped.startswith("#"):
            found += _spans(paragraph, name)
            paragraph = []
            trailing = re.search(r"\s#\s(.*)$", line)  # `key: value  # ... `vdiff validate` ...`
            if trailing:
                found += _spans([(lineno, trailing.group(1))], name)
            continue
        body = stripped[1:]
        if pending or RECIPE_COMMAND_LINE.match(body):
            pending, done = _command_line(pending, lineno, body, name)
            found += done
        else:
            paragraph.append((lineno, body))
    return found + _spans(paragraph, name)


MODULE_HEADER = re.compile(r"^#\s*((?:\w+/)+\w+\.py)\s*$")


def modules_shown(text: str) -> dict[str, str]:
    """The Python files a markdown doc shows (a ```python block whose first line is ``# mypkg/modules.py``), which
    its commands then name (``--model.class_path mypkg.modules.MyVDT``): path -> code."""
    shown = {}
    for block in re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S):
        header = MODULE_HEADER.match(block.splitlines()[0]) if block.strip() else None
        if header:
            shown[header.group(1)] = block
    return shown


def doc_files() -> list[Path]:
    """README.md, docs/*.md, benchmarks/README.md and every recipe."""
    markdown = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
    return markdown + sorted((ROOT / "recipes").rglob("*.yaml"))


def doc_commands() -> list[DocCommand]:
    """Every vdiff command shown in README.md, docs/*.md, benchmarks/README.md and the recipes' comments."""
    found = []
    for path in doc_files():
        reader = commands_in_recipe if path.suffix == ".yaml" else commands_in_markdown
        found += reader(path.read_text(), str(path.relative_to(ROOT)))
    return found


# ------------------------------------------------------------------------------------------------ checks


def _relaxed(parser: argparse.ArgumentParser) -> None:
    """Make every required argument optional (a span in prose shows one option of a tool)."""
    for group in parser._mutually_exclusive_groups:
        group.required = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.required = False
            for sub in action.choices.values():
                _relaxed(sub)
        elif action.option_strings:
            action.required = False
        elif action.nargs is None:
            action.nargs = "?"
        elif action.nargs == "+":
            action.nargs = "*"


def is_lightning(command: DocCommand) -> bool:
    return command.argv[0] in LIGHTNING_COMMANDS


def argparse_error(command: DocCommand) -> str | None:
    """Why a non-Lightning command does not parse (the message argparse or vdiff prints), or None."""
    argv = list(command.argv)
    head = argv[0]
    if head == "<unreadable>":
        return f"the shell cannot split it: {argv[1]}"
    if head in ("--debug",) and len(argv) > 1:
        return argparse_error(DocCommand(command.where, command.text, tuple(argv[1:]), command.env, command.mention))
    if head in HELP | {"-V", "--version"}:
        return None
    if head == "data":
        if len(argv) == 1 or argv[1] in HELP:
            return None
        if argv[1] not in DATA_TOOLS:
            return f"unknown data tool {argv[1]!r} (vdiff data has: {', '.join(sorted(DATA_TOOLS))})"
        (module_path, text), prog, rest = DATA_TOOLS[argv[1]], f"vdiff data {argv[1]}", argv[2:]
    elif head in TOP_TOOLS:
        (module_path, text), prog, rest = TOP_TOOLS[head], f"vdiff {head}", argv[1:]
    else:
        known = ["data", *TOP_TOOLS, *LIGHTNING_COMMANDS]
        return f"unknown command {head!r} (vdiff has: {', '.join(known)})"
    parser = tool_parser(module_path, prog, text)
    if command.mention:
        _relaxed(parser)
        action = parser._option_string_actions.get(rest[-1]) if rest else None
        if action is not None and action.nargs != 0:
            rest = rest[:-1]  # `vdiff sample --ckpt` in prose names the option, not its value
    stderr = io.StringIO()
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(stderr):
            args = parser.parse_args(rest)
    except SystemExit as exit_info:
        if exit_info.code:
            lines = stderr.getvalue().strip().splitlines()
            return lines[-1] if lines else f"exit status {exit_info.code}"
        return None  # --help
    return weights_names_error(args) if prog == "vdiff weights" else None


def weights_names_error(args: argparse.Namespace) -> str | None:
    """``vdiff weights download|verify NAME``: the names the tool checks before fetching (a preset, a preset's file
    or a hub id), so that a renamed preset is a stale doc too."""
    from vdiff.weights.hub import is_hub_id, parse_hub_id
    from vdiff.weights.registry import get_preset

    for name in getattr(args, "names", None) or []:
        try:
            parse_hub_id(name) if is_hub_id(name) else get_preset(name)
        except ValueError as err:
            return str(err)
    return None


def recipe_files_error(command: DocCommand) -> str | None:
    """A recipe of the repository given to ``-c`` that does not exist."""
    argv = command.argv
    values = [b for a, b in zip(argv, argv[1:]) if a in ("-c", "--config")]
    values += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    missing = [v for v in values if v.startswith("recipes/") and not (ROOT / v).is_file()]
    return f"no such recipe: {', '.join(missing)}" if missing else None


@contextmanager
def _environment(env: tuple[tuple[str, str], ...]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name, _ in env}
    os.environ.update(dict(env))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def lightning_error(argv: tuple[str, ...], env: tuple[tuple[str, str], ...] = ()) -> str | None:
    """Why ``vdiff fit|validate|test|predict ARGV`` does not parse, or None: run in-process with
    ``--print_config`` (jsonargparse parses the recipes and overrides, validates every class's init_args, prints
    and exits before anything is built)."""
    from vdiff.cli import main
    from vdiff.lit.cli import RecipeError

    args = list(argv)
    if not HELP & set(args) and not any(a.startswith("--print_config") for a in args):
        args.append("--print_config")
    stderr = io.StringIO()
    try:
        with _environment(env), redirect_stdout(io.StringIO()), redirect_stderr(stderr):
            main(args)
    except SystemExit as exit_info:
        if not exit_info.code:
            return None
        lines = stderr.getvalue().strip().splitlines()
        return lines[-1] if lines else f"exit status {exit_info.code}"
    except RecipeError as err:
        return str(err)
    except Exception as err:  # a recipe that cannot even be read, a class that does not import ...
        return f"{type(err).__name__}: {err}"
    return "it did not stop at --print_config"


def fast_failures(commands: list[DocCommand]) -> list[str]:
    """Every argparse command that does not parse and every missing recipe, one entry per command."""
    failures = []
    for command in commands:
        error = recipe_files_error(command) if is_lightning(command) else argparse_error(command)
        if error:
            failures.append(f"{command}\n    -> {error}")
    return failures


def lightning_failures(commands: list[DocCommand]) -> list[str]:
    """Every Lightning command whose recipes and overrides do not parse; each distinct command is parsed once."""
    by_argv: dict[tuple, list[DocCommand]] = {}
    for command in commands:
        if is_lightning(command) and not (command.mention and len(command.argv) == 1):  # `vdiff fit` in prose
            by_argv.setdefault((command.argv, command.env), []).append(command)
    failures = []
    for (argv, env), where in by_argv.items():
        error = recipe_files_error(where[0]) or lightning_error(argv, env)
        if error:
            failures += [f"{command}\n    -> {error}" for command in where]
    return failures


def _report(failures: list[str]) -> str:
    return f"{len(failures)} command(s) in the docs do not parse against today's CLI:\n" + "\n".join(failures)


# ------------------------------------------------------------------------------------------------- tests


NAMES_A_COMMAND = re.compile(rf"\bvdiff (?:{'|'.join(['data', *TOP_TOOLS, *LIGHTNING_COMMANDS])})\b")


def test_every_line_that_shows_a_command_is_checked():
    """A command the extraction misses is a command nobody checks: every doc line naming `vdiff COMMAND` is part
    of an extracted command (write commands in ```bash blocks, recipe comment lines or `...` spans)."""
    commands = doc_commands()
    checked: dict[str, set[int]] = {}
    for command in commands:
        checked.setdefault(command.where.rsplit(":", 1)[0], set()).update(command.lines)
    missed = []
    for path in doc_files():
        name = str(path.relative_to(ROOT))
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if NAMES_A_COMMAND.search(line) and lineno not in checked.get(name, set()):
                missed.append(f"{name}:{lineno}: {line.strip()}")
    assert not missed, "vdiff commands the test does not see:\n" + "\n".join(missed)
    kinds = {(c.where.split("/")[0].split(":")[0], c.mention, is_lightning(c)) for c in commands}
    for kind in [("README.md", False, False), ("README.md", False, True), ("recipes", False, True),
                 ("recipes", False, False), ("docs", True, True), ("recipes", True, False)]:  # fmt: skip
        assert kind in kinds, kind  # command lines and prose spans, Lightning and argparse, in docs and recipes
    assert any(c.env for c in commands) and len(commands) > 100


def test_shell_forms_and_placeholders():
    doc = "\n".join([
        "Run `vdiff sample --rounds N --overlap 1` or `vdiff fit ... --trainer.num_nodes 2` or",  # 1
        "`vdiff validate|test -c RECIPE --ckpt_path runs/x/version_N/checkpoints/last.ckpt`,"  # 2
        " `vdiff weights list\\|verify` (escaped in a table)",
        "```bash",  # 3
        "A=1 B=2 .venv/bin/vdiff fit -c recipes/quickstart.yaml \\",  # 4
        "    --trainer.max_steps 20 && echo done  # trailing comment",  # 5
        "$(which vdiff) data synth --out d > log.txt; vdiff fit -c recipes/<model>.yaml ...",  # 6
        "pip install vdiff",  # 7
        "```",  # 8
        "```",  # 9: not a shell block
        "vdiff fit: resuming from x",  # 10
        "```",  # 11
    ])  # fmt: skip
    got = [(c.where, c.argv, c.env, c.mention) for c in commands_in_markdown(doc, "doc.md")]
    assert got == [
        ("doc.md:1", ("sample", "--rounds", "2", "--overlap", "1"), (), True),
        ("doc.md:1", ("fit", "-c", RECIPE, "--trainer.num_nodes", "2"), (), True),
        ("doc.md:2", ("validate", "-c", RECIPE, "--ckpt_path", "runs/x/version_0/checkpoints/last.ckpt"), (), True),
        ("doc.md:2", ("test", "-c", RECIPE, "--ckpt_path", "runs/x/version_0/checkpoints/last.ckpt"), (), True),
        ("doc.md:2", ("weights", "list"), (), True),
        ("doc.md:2", ("weights", "verify"), (), True),
        ("doc.md:4", ("fit", "-c", RECIPE, "--trainer.max_steps", "20"), (("A", "1"), ("B", "2")), False),
        ("doc.md:6", ("data", "synth", "--out", "d"), (), False),
        ("doc.md:6", ("fit", "-c", RECIPE), (), False),
    ]
    recipe = "\n".join([
        "# vdiff quickstart: prose, not a command",  # 1
        "#   vdiff data shards x --out y \\",  # 2
        "#       --fps 8   # why",  # 3
        "# see `vdiff consolidate FOLDER OUT`",  # 4
        "model:",  # 5
        "  x: 1  # after `vdiff validate`",  # 6
    ])  # fmt: skip
    got = [(c.where, c.argv, c.mention) for c in commands_in_recipe(recipe, "r.yaml")]
    assert got == [
        ("r.yaml:2", ("data", "shards", "x", "--out", "y", "--fps", "8"), False),
        ("r.yaml:4", ("consolidate", "FOLDER", "OUT"), True),
        ("r.yaml:6", ("validate",), True),
    ]


def test_every_argparse_command_in_the_docs_parses_and_every_named_recipe_exists():
    failures = fast_failures(doc_commands())
    assert not failures, _report(failures)


def test_a_renamed_option_tool_or_recipe_fails_naming_the_file_and_line():
    doc = "\n".join([
        "```bash",
        "vdiff data shards x --out y --clip-framez 16",  # 2: a renamed option
        "vdiff data shard x --out y",  # 3: a renamed tool
        "vdiff fit -c recipes/quickstart_v2.yaml",  # 4: a renamed recipe
        "vdiff sample --ckpt c.ckpt --input d --out o --rounds",  # 5: a missing value
        "vdiff data shards x",  # 6: a command line without a required option
        "vdiff weights download svd-xtt",  # 7: a renamed weights preset
        "```",
        "A span may show one option: `vdiff data shards --clip-frames 16`, not a wrong one: `vdiff sample --sede 1`.",
    ])  # fmt: skip
    commands = commands_in_markdown(doc, "docs/new.md")
    failures = fast_failures(commands)
    assert len(failures) == 7, _report(failures)
    expected = [
        ("docs/new.md:2", "--clip-framez"),
        ("docs/new.md:3", "'shard'"),
        ("docs/new.md:4", "recipes/quickstart_v2.yaml"),
        ("docs/new.md:5", "--rounds"),
        ("docs/new.md:6", "--out"),
        ("docs/new.md:7", "'svd-xtt'"),
        ("docs/new.md:9", "--sede"),
    ]
    for failure, (where, name) in zip(failures, expected):
        assert failure.startswith(where + ": vdiff") and name in failure.split("->", 1)[1], failure
    header = "#   vdiff data cityscapes /path/to/cityscapes --out data/cityscapes --split train vall\n"
    (failure,) = fast_failures(commands_in_recipe(header, "recipes/data/x.yaml"))
    assert failure.startswith("recipes/data/x.yaml:1: ") and "'vall'" in failure


@pytest.mark.slow
def test_every_lightning_command_in_the_docs_parses_with_its_recipes(tmp_path, monkeypatch):
    shown = {}
    for path in doc_files():
        shown.update(modules_shown(path.read_text()) if path.suffix == ".md" else {})
    assert "mypkg/modules.py" in shown  # README's subclass, which its `--model.class_path mypkg.modules.MyVDT` trains
    for name, code in shown.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    packages = {name.split("/")[0] for name in shown}
    try:
        failures = lightning_failures(doc_commands())
    finally:  # the docs' packages live in tmp_path: no later test imports them
        for module in [m for m in sys.modules if m.split(".")[0] in packages]:
            del sys.modules[module]
    assert not failures, _report(failures)


@pytest.mark.slow
def test_a_renamed_recipe_key_fails_naming_the_file_and_line():
    doc = "\n".join([
        "```bash",
        "vdiff fit -c recipes/quickstart.yaml --model.init_args.lrr 1",  # 2: a renamed model argument
        "vdiff fit -c recipes/quickstart.yaml --trainer.max_stepz 3",  # 3: a renamed trainer option
        "vdiff fit -c recipes/quickstart.yaml --trainer.max_steps 3",  # 4: fine
        "```",
    ])  # fmt: skip
    failures = lightning_failures(commands_in_markdown(doc, "README.md"))
    assert len(failures) == 2, _report(failures)
    assert failures[0].startswith("README.md:2: vdiff fit") and "'lrr'" in failures[0], failures[0]
    assert failures[1].startswith("README.md:3: vdiff fit") and "--trainer.max_stepz" in failures[1], failures[1]
