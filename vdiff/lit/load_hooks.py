"""A step of one's own inside Lightning's ``load_from_checkpoint``.

``cls.load_from_checkpoint(path)`` builds the module from the checkpoint's hyperparameters, calls
``configure_model`` (which builds the network, without the network hook: there is no trainer), then
``on_load_checkpoint(checkpoint)``, then loads ``checkpoint["state_dict"]``. :func:`after_on_load_checkpoint`
runs a function right after ``on_load_checkpoint`` for the duration of a block, so a loader can change the
network (inject the LoRA adapters a checkpoint recorded) or complete the state dict (an export's network
weights) before the strict load.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_PATCH_LOCK = threading.RLock()  # one patched load at a time (the patch is on the class)
_MISSING = object()


@contextmanager
def after_on_load_checkpoint(cls: type, step: Callable[[Any, dict[str, Any]], None]) -> Iterator[None]:
    """Within the block, ``cls.load_from_checkpoint`` calls ``step(module, checkpoint)`` right after the
    module's own ``on_load_checkpoint`` (which may rebuild the network, e.g. for an autoencoder rebuilt from
    the checkpoint) and before the state dict is loaded. The class is restored when the block ends."""
    with _PATCH_LOCK:
        own = cls.__dict__.get("on_load_checkpoint", _MISSING)
        inherited = cls.on_load_checkpoint

        def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            inherited(self, checkpoint)
            step(self, checkpoint)

        cls.on_load_checkpoint = on_load_checkpoint
        try:
            yield
        finally:
            if own is _MISSING:
                del cls.on_load_checkpoint
            else:
                cls.on_load_checkpoint = own
