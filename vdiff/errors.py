"""Which exceptions are a user's mistake (printed as one line) and which are bugs (keep their traceback).

``vdiff`` (:mod:`vdiff.cli`) prints a user error as ``vdiff TOOL: error: MESSAGE`` and exits with status 2;
anything else propagates with its traceback, so that a bug stays visible. A **user error** is

* an :class:`OSError` (a file or folder that is missing, unreadable or in the way: the message names it), or
* a ``ValueError`` / ``TypeError`` / ``LookupError`` / ``ImportError`` raised by a ``raise`` statement in
  vdiff's own code: a checked input (``ConversionError``, ``SchemaError``, ``ResumeError``, a bad option...).

The same classes raised inside a library by a failing call (``torch``'s shape checks, a ``KeyError`` from a
subscript, an ``ImportError`` of a broken install) are bugs. While a recipe is built
(:mod:`vdiff.lit.cli`) the libraries check the recipe's own values, so there ``library_checks=True`` also
accepts their explicit ``raise``\\ s.

This module imports nothing from vdiff (any layer may use it) and nothing heavy (``vdiff data`` pays no
import for it).
"""

from __future__ import annotations

import linecache
import os
from pathlib import Path

# Exception classes whose message is the whole story when vdiff raised them on purpose.
MESSAGE_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, LookupError, ImportError)
PACKAGE_DIR = Path(__file__).resolve().parent
DEBUG_ENV = "VDIFF_DEBUG"


def debug_requested() -> bool:
    """``$VDIFF_DEBUG`` is set to something other than empty / 0 / false / no: show tracebacks."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of ``err``'s chain (``__cause__``, else an unsuppressed ``__context__``)."""
    seen = {id(err)}
    while True:
        nxt = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if nxt is None or id(nxt) in seen:
            return err
        seen.add(id(nxt))
        err = nxt


def _raise_site(err: BaseException) -> tuple[str, str] | None:
    """``(file, source line)`` of the innermost traceback frame, or None without a traceback."""
    tb = err.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    return filename, linecache.getline(filename, tb.tb_lineno).strip()


def raised_by_raise_statement(err: BaseException) -> bool:
    """Whether ``err`` comes from an explicit ``raise`` (a checked error), not from a failing call or
    attribute access inside code (a bug)."""
    site = _raise_site(err)
    return site is None or site[1].startswith("raise")


def raised_in_vdiff(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is vdiff's own code."""
    site = _raise_site(err)
    return site is not None and Path(site[0]).resolve().is_relative_to(PACKAGE_DIR)


def is_user_error(err: BaseException, library_checks: bool = False) -> bool:
    """Whether ``err`` is a user's mistake (see the module docstring); ``library_checks`` also accepts
    the checked errors libraries raise (used while a recipe's values are handed to them)."""
    if isinstance(err, OSError):
        return True
    if not isinstance(err, MESSAGE_ERRORS) or not raised_by_raise_statement(err):
        return False
    return library_checks or raised_in_vdiff(err)


def error_message(err: BaseException, prog: str | None = None) -> str:
    """The text a user reads for ``err``: its message (a ``KeyError``'s without quotes; an OS error as
    ``FILE: reason``), without a leading ``"{prog}: "`` the raiser already put there."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror and len(err.args) == 2:
        text = f"{err.filename}: {err.strerror}"  # as the OS raised it: "[Errno 2] ..." reads worse
    elif isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    else:
        text = str(err) or type(err).__name__
    if prog and text.startswith(f"{prog}: "):
        text = text[len(prog) + 2 :]
    return text


__all__ = [
    "DEBUG_ENV",
    "MESSAGE_ERRORS",
    "debug_requested",
    "error_message",
    "is_user_error",
    "raised_by_raise_statement",
    "raised_in_vdiff",
    "root_cause",
]
