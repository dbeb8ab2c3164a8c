"""Frame sizes: one meaning of ``--size`` in every vdiff tool, and of a data module's ``size``.

* ``--size N``: an N x N square;
* ``--size H W``: height, then width (torch's order, and a recipe's ``size: [H, W]``);
* ``--size WxH``: one token the way image sizes are written, width first (``1024x576`` is H 576, W 1024).

:func:`add_size_argument` adds the option to a tool (``args.size`` is ``(H, W)`` or the default; a bad value is
argparse's one-line error), :func:`frame_size` reads any of these forms (and a data module's ``int`` or
``(H, W)``) into ``(H, W)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

SIZE_FORMS = "H W, one number for a square, or WxH (e.g. 1024x576)"


def frame_size(value: int | str | Sequence[int | str]) -> tuple[int, int]:
    """``(H, W)`` from ``N``, ``(H, W)``, ``[N]``, ``"WxH"`` or the tokens of ``--size``; ValueError naming the
    forms otherwise (sides must be positive integers)."""
    tokens = [value] if isinstance(value, (int, float, str)) or not isinstance(value, Sequence) else list(value)
    try:
        if len(tokens) == 1 and isinstance(tokens[0], str) and "x" in tokens[0].lower():
            width, _, height = tokens[0].lower().partition("x")
            sides = (int(height), int(width))
        elif len(tokens) in (1, 2) and not any(isinstance(t, (bool, float)) for t in tokens):
            sides = (int(tokens[0]), int(tokens[-1]))
        else:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"a frame size is {SIZE_FORMS}; got {' '.join(map(str, tokens))!r}") from None
    if min(sides) < 1:
        raise ValueError(f"frame sides must be positive, got {' '.join(map(str, tokens))!r}")
    return sides


class _SizeAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option=None):
        try:
            setattr(namespace, self.dest, frame_size(values))
        except ValueError as err:
            parser.error(f"argument --size: {err}")


def add_size_argument(
    parser: argparse.ArgumentParser, default: int | tuple[int, int] | None, help: str
) -> None:
    """Add ``--size`` (:func:`frame_size`'s forms; ``args.size`` is ``(H, W)``, or ``default`` as ``(H, W)`` /
    None). ``help`` says what the size is for; the forms are appended."""
    parser.add_argument(
        "--size",
        nargs="+",
        metavar="SIZE",
        action=_SizeAction,
        default=None if default is None else frame_size(default),
        help=f"{help}: {SIZE_FORMS}",
    )


__all__ = ["SIZE_FORMS", "add_size_argument", "frame_size"]
