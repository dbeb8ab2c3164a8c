"""Parts a LightningModule keeps frozen in eval mode on purpose, and Lightning's check of modules in eval mode.

At the start of training Lightning warns ``Found N module(s) in eval mode at the start of training`` when any
submodule is in eval mode. vdiff's modules keep their frozen parts there on purpose (the autoencoder between pixels
and latents, SVD's CLIP image encoder, the LPIPS network of the autoencoder loss), so the warning told every user
about a choice vdiff made. :func:`expect_frozen_in_eval_mode` counts the modules inside those parts: when they are
every module in eval mode, Lightning's warning for exactly that count is not shown (from ``on_fit_start`` until
``on_train_start``, around Lightning's check only); any other module in eval mode (a network someone left in
``.eval()``) makes the count differ, and the warning shows as before.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from lightning.fabric.utilities.warnings import PossibleUserWarning
from torch import nn


def modules_in_eval_mode(module: nn.Module) -> list[nn.Module]:
    """The submodules of ``module`` (itself included) in eval mode, as Lightning counts them."""
    return [m for _, m in module.named_modules() if not m.training]


def expect_frozen_in_eval_mode(module: nn.Module, parts: Iterable[nn.Module | None]) -> tuple | None:
    """Call in ``on_fit_start``: when every module of ``module`` in eval mode lies inside one of the frozen
    ``parts``, Lightning's "Found N module(s) in eval mode" warning for that N is not shown until
    :func:`stop_expecting` (call it in ``on_train_start``, which runs right after Lightning's check). Returns the
    warnings filter it added, or None (no module in eval mode, or some outside ``parts``: the warning shows)."""
    inside = {id(m) for part in parts if part is not None for m in part.modules()}
    in_eval = modules_in_eval_mode(module)
    if not in_eval or any(id(m) not in inside for m in in_eval):
        return None
    warnings.filterwarnings(
        "ignore",
        message=rf"Found {len(in_eval)} module\(s\) in eval mode at the start of training",
        category=PossibleUserWarning,
    )
    return warnings.filters[0]


def stop_expecting(entry: tuple | None) -> None:
    """Remove the filter :func:`expect_frozen_in_eval_mode` added, so it does not outlive the check it was for."""
    if entry is not None and entry in warnings.filters:
        warnings.filters.remove(entry)
        mutated = getattr(warnings, "_filters_mutated", None)  # CPython: invalidate the per-module caches
        if mutated is not None:
            mutated()


class FrozenPartsInEvalMode:
    """LightningModule hooks (put this class before ``L.LightningModule`` in the bases): the parts
    :meth:`frozen_parts` names are in eval mode on purpose, so Lightning's check at the start of training does not
    warn about them (:func:`expect_frozen_in_eval_mode`); any other module in eval mode still makes it warn."""

    _expected_eval_filter: tuple | None = None

    def frozen_parts(self) -> list[nn.Module | None]:
        """The submodules kept frozen in eval mode while the rest trains (None entries are skipped)."""
        return []

    def on_fit_start(self) -> None:
        super().on_fit_start()  # type: ignore[misc]
        self._expected_eval_filter = expect_frozen_in_eval_mode(self, self.frozen_parts())  # type: ignore[arg-type]

    def on_train_start(self) -> None:
        super().on_train_start()  # type: ignore[misc]
        stop_expecting(self._expected_eval_filter)
        self._expected_eval_filter = None
