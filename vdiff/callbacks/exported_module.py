"""Moved: the ``vdiff export`` module entries are :mod:`vdiff.lit.exported_module`, and loading an export is
:func:`vdiff.lit.module_loading.load_exported_module`. These names stay importable from here for older code."""

from vdiff.lit.exported_module import ENTRIES_KEY, export_entries, is_export, module_entries  # noqa: F401
from vdiff.lit.module_loading import load_exported_module  # noqa: F401
