"""The official nuScenes scene-level splits (train 700, val 150, test 150, mini_train 8, mini_val 2).

Taken from nuscenes-devkit when it is installed (``nuscenes.utils.splits.create_splits_scenes``),
otherwise from the bundled ``nuscenes_splits.json``, a copy of the lists in nutonomy/nuscenes-devkit
``python-sdk/nuscenes/utils/splits.py``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

SPLITS_FILE = Path(__file__).with_name("nuscenes_splits.json")
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test", "mini_train", "mini_val")
VERSION_SPLITS: dict[str, tuple[str, ...]] = {
    "v1.0-trainval": ("train", "val"),
    "v1.0-test": ("test",),
    "v1.0-mini": ("mini_train", "mini_val"),
}


@lru_cache(maxsize=1)
def scene_splits() -> dict[str, frozenset[str]]:
    """``{split name: scene names}`` for every official split."""
    try:  # the devkit is the reference where present
        from nuscenes.utils.splits import create_splits_scenes  # type: ignore[import-not-found]

        lists = create_splits_scenes(verbose=False)
    except ImportError:
        lists = json.loads(SPLITS_FILE.read_text())
    return {name: frozenset(lists[name]) for name in SPLIT_NAMES}


def default_splits(version: str) -> tuple[str, ...]:
    """The splits a dataset version holds (``v1.0-trainval`` -> train, val)."""
    if version not in VERSION_SPLITS:
        raise ValueError(f"unknown nuScenes version {version!r}; known: {sorted(VERSION_SPLITS)}")
    return VERSION_SPLITS[version]


def scenes_in_split(split: str) -> frozenset[str]:
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown nuScenes split {split!r}; known: {list(SPLIT_NAMES)}")
    return scene_splits()[split]
