"""The weights layer's errors: one family under :class:`WeightsError`, every message naming the file and the problem.

- :class:`WeightsError` (a ``ValueError``): a weights file, folder or config that vdiff refuses to read or
  write: keys of no known layout, a layout asked for that the keys contradict, an SVD file whose parts do not
  agree. The readers' own names for it (``InflationError``, ``SVDWeightsError``) are aliases.
- :class:`WeightsConfigError`: a config (a diffusers / transformers ``config.json``, a config stored with the
  weights, a passed one) vdiff cannot represent, or one that contradicts another; the message names the file and
  the field. Aliases: ``AutoencoderConfigError``, ``UNetSVDConfigError``, ``CLIPConfigError``.
- :class:`KeyMappingError`: tensors that do not fit the model: every missing, mis-shaped and unused key at once
  (:func:`vdiff.weights.template.map_keys`). Aliases: ``ConversionError``, ``UNetSVDConversionError``,
  ``CLIPConversionError``, ``I3DConversionError``.

``WeightsFileError`` (:mod:`vdiff.weights.safetensors_io`: a file that is not readable safetensors) is a
``WeightsError`` too; a file that is not there is a ``FileNotFoundError`` (``MissingWeightsError``).
"""

from __future__ import annotations

SHOWN = 60  # names listed per kind of problem; the rest are counted


class WeightsError(ValueError):
    """Weights (a file, a folder, a config) that vdiff refuses; the message names the file and the problem."""


class WeightsConfigError(WeightsError):
    """A config vdiff cannot represent, or one that contradicts another; the message names the file and the field."""


class KeyMappingError(WeightsError):
    """Tensors that do not fit the model: every ``missing``, ``mismatched`` (shape) and ``unexpected`` (unused)
    key by name, under one heading ``"{source}: {subject} do not fit {target}; {hint}"``.

    The lists follow the heading one name a line (at most :data:`SHOWN` of each kind), or, ``compact``, on the
    heading's line (at most 12 of each kind).
    """

    def __init__(
        self,
        source: str,
        missing: list[str],
        mismatched: list[str],
        unexpected: list[str],
        hint: str = "",
        target: str = "the model",
        subject: str = "weights",
        compact: bool = False,
    ) -> None:
        self.source, self.missing, self.mismatched, self.unexpected = source, missing, mismatched, unexpected
        self.hint, self.target, self.subject, self.compact = hint, target, subject, compact
        heading = f"{source}: {subject} do not fit {target}" + (f"; {hint}" if hint else "")
        kinds = (("missing", missing), ("shape mismatch", mismatched), ("unexpected", unexpected))
        if compact:
            parts = [heading] + [
                f"{title}: " + ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
                for title, names in kinds
                if names
            ]
            super().__init__("; ".join(parts))
            return
        parts = [heading]
        for title, names in kinds:
            if names:
                more = f"\n    ... and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
                parts.append(f"  {title} ({len(names)}):\n    " + "\n    ".join(names[:SHOWN]) + more)
        super().__init__("\n".join(parts))

    def __reduce__(self):  # picklable (e.g. across DataLoader workers) despite the extra constructor arguments
        return type(self), self._arguments()

    def _arguments(self) -> tuple:
        return (self.source, self.missing, self.mismatched, self.unexpected, self.hint, self.target, self.subject,
                self.compact)  # fmt: skip

    def with_context(self, source: str, hint: str = "") -> KeyMappingError:
        """The same lists under a more specific heading (e.g. naming the file they came from, and a hint)."""
        args = list(self._arguments())
        args[0], args[4] = source, hint
        return type(self)(*args)


__all__ = ["SHOWN", "KeyMappingError", "WeightsConfigError", "WeightsError"]
