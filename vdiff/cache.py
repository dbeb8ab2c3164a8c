"""Where vdiff keeps what it makes or fetches: one root for synthetic shards, Frechet statistics and weights.

Standard library only, so every layer may use it (``tests/test_layering.py``: layer 0).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$VDIFF_CACHE``, else ``$XDG_CACHE_HOME/vdiff``, else ``~/.cache/vdiff``."""
    root = os.environ.get("VDIFF_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vdiff"
