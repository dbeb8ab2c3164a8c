"""Fréchet distance between feature distributions (FVD, FID) and the float64 statistics behind it.

Distance. For Gaussians N(mu1, S1) and N(mu2, S2):

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)

:func:`frechet_distance` computes ``tr((S1 S2)^1/2)`` through symmetric eigendecompositions only, in
float64: ``S1 = V diag(l) V^T`` (``eigh``), ``S1^1/2 = V diag(sqrt l) V^T``, ``M = S1^1/2 S2 S1^1/2``
(symmetric positive semi-definite, with the same eigenvalues as ``S1 S2``), and the trace is the sum of
the square roots of M's eigenvalues. M is formed in S1's numerical range only (``B^T S2 B`` with
``B = V_r diag(sqrt l_r)``, r x r, the same nonzero eigenvalues), which makes the small-N case (rank
r <= N - 1 of 2048 Inception features) cheap. Eigenvalues below the round-off floor (``D * eps * max``,
negative ones included) count as 0 in both steps, as ``pinv`` does with small singular values: a square
root would turn an unresolvable 1e-15 into 3e-8 per direction. It needs no complex arithmetic and none of
scipy ``sqrtm``'s iterations, and handles the singular covariances of small sample sets (N below the
feature dimension).

Statistics. :class:`FrechetStats` holds a float64 feature sum, outer-product sum and an exact sample
count. Sets of statistics merge by adding them, so every process scores only what it holds and the
sums over ranks equal one pass over everything (vdiff's evaluation loaders never pad). The covariance
divisor is part of the protocol: ``"N"`` (StyleGAN-V's FVD) or ``"N-1"`` (``np.cov``: clean-fid,
torchmetrics, TATS).

:class:`FrechetMetric` is the torchmetrics ``Metric`` over two such sets (real and generated), with
every state a float64 / int64 sum reduced by ``"sum"`` across ranks; FVD and FID subclass it.
:class:`StatsCache` keeps real-data statistics on disk, keyed by a hash of the protocol and the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from vdiff.cache import cache_root

CovDivisor = Literal["N", "N-1"]
COV_DIVISORS: tuple[str, ...] = ("N", "N-1")
STATS_FORMAT = "vdiff-frechet-stats-1"


def _as_float64(x: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().to("cpu", torch.float64)


def _noise_floor(evals: Tensor) -> float:
    """Eigenvalues below this are round-off of a PSD matrix (``eigh`` is accurate to ~D eps |A|)."""
    return float(evals.abs().max()) * evals.numel() * torch.finfo(torch.float64).eps if evals.numel() else 0.0


def _clean(evals: Tensor) -> Tensor:
    """Eigenvalues of a PSD matrix with round-off (negative or below the noise floor) set to 0. A square
    root turns an error e into sqrt(e): an unresolved 1e-15 would add 3e-8 to the trace per direction."""
    return torch.where(evals > _noise_floor(evals), evals, torch.zeros_like(evals))


def trace_sqrt_product(sigma1: Tensor | np.ndarray, sigma2: Tensor | np.ndarray) -> float:
    """``tr((S1 S2)^1/2)`` for symmetric PSD ``S1``, ``S2`` through ``eigh`` (float64)."""
    s1, s2 = _as_float64(sigma1), _as_float64(sigma2)
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    evals, evecs = torch.linalg.eigh(s1)
    keep = evals > _noise_floor(evals)  # S1's numerical range: r directions (r <= N - 1 for N samples)
    b = evecs[:, keep] * evals[keep].sqrt()  # (D, r): S1^1/2 = b V_r^T, so M = V_r (b^T S2 b) V_r^T
    m = b.T @ s2 @ b  # (r, r), symmetric PSD, the nonzero eigenvalues of S1 S2
    m = (m + m.T) / 2
    return float(_clean(torch.linalg.eigvalsh(m)).sqrt().sum())


def frechet_distance(
    mu1: Tensor | np.ndarray, sigma1: Tensor | np.ndarray, mu2: Tensor | np.ndarray, sigma2: Tensor | np.ndarray
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64, eigh route; see the module)."""
    m1, m2 = _as_float64(mu1).flatten(), _as_float64(mu2).flatten()
    s1, s2 = _as_float64(sigma1), _as_float64(sigma2)
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.numel(), m1.numel()):
        raise ValueError(
            f"frechet_distance: shapes do not match: mu {tuple(m1.shape)} / {tuple(m2.shape)}, "
            f"sigma {tuple(s1.shape)} / {tuple(s2.shape)}"
        )
    mean_term = float((m1 - m2).square().sum())
    return mean_term + float(torch.trace(s1) + torch.trace(s2)) - 2.0 * trace_sqrt_product(s1, s2)


# ------------------------------------------------------------------------------------------------ statistics


@dataclass
class FrechetStats:
    """Float64 sufficient statistics of a feature set: ``total`` (D,), ``outer`` (D, D), ``count``."""

    total: Tensor
    outer: Tensor
    count: int

    @classmethod
    def empty(cls, num_features: int) -> FrechetStats:
        return cls(
            torch.zeros(num_features, dtype=torch.float64),
            torch.zeros(num_features, num_features, dtype=torch.float64),
            0,
        )

    @classmethod
    def of(cls, features: Tensor | np.ndarray) -> FrechetStats:
        """Statistics of ``features`` (N, D)."""
        f = _as_float64(features)
        if f.ndim != 2:
            raise ValueError(f"FrechetStats.of: features must be (N, D), got {tuple(f.shape)}")
        return cls(f.sum(dim=0), f.T @ f, int(f.shape[0]))

    @property
    def num_features(self) -> int:
        return int(self.total.numel())

    def __add__(self, other: FrechetStats) -> FrechetStats:
        if self.num_features != other.num_features:
            raise ValueError(f"FrechetStats: cannot merge {self.num_features} and {other.num_features} features")
        return FrechetStats(self.total + other.total, self.outer + other.outer, self.count + other.count)

    def mean(self) -> Tensor:
        if self.count < 1:
            raise ValueError("FrechetStats: no samples")
        return self.total / self.count

    def covariance(self, divisor: CovDivisor = "N") -> Tensor:
        """``(sum x x^T - N mu mu^T) / N`` or ``/ (N - 1)``."""
        if divisor not in COV_DIVISORS:
            raise ValueError(f"covariance divisor must be one of {COV_DIVISORS}, got {divisor!r}")
        n = self.count
        if n < 2:
            raise ValueError(f"FrechetStats: a covariance needs at least 2 samples, got {n}")
        mu = self.mean()
        scatter = self.outer - n * torch.outer(mu, mu)
        cov = scatter / (n if divisor == "N" else n - 1)
        return (cov + cov.T) / 2

    def distance(self, other: FrechetStats, divisor: CovDivisor = "N") -> float:
        return frechet_distance(self.mean(), self.covariance(divisor), other.mean(), other.covariance(divisor))

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total.cpu(), "outer": self.outer.cpu(), "count": int(self.count)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FrechetStats:
        return cls(_as_float64(d["total"]), _as_float64(d["outer"]), int(d["count"]))


# ------------------------------------------------------------------------------------------------ metric


class FrechetMetric(Metric):
    """Fréchet distance between real and generated features: float64 sums merged across ranks by ``sum``.

    ``update_features(features (N, D), real)`` adds a batch to one side. :meth:`compute` returns the
    distance (float64 tensor) with the covariance divisor ``cov_divisor``. ``real_stats`` may be set to
    precomputed real statistics (e.g. from :class:`StatsCache`); the real states are then ignored.
    Subclasses add ``update(...)`` that turns their inputs into features.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, num_features: int, cov_divisor: CovDivisor = "N", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if cov_divisor not in COV_DIVISORS:
            raise ValueError(f"cov_divisor must be one of {COV_DIVISORS}, got {cov_divisor!r}")
        self.num_features = int(num_features)
        self.cov_divisor = cov_divisor
        self.real_stats: FrechetStats | None = None
        d = self.num_features
        for side in ("real", "fake"):
            self.add_state(f"{side}_total", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, features: Tensor, real: bool) -> None:  # overridden by FVD / FID
        self.update_features(features, real)

    def update_features(self, features: Tensor, real: bool) -> None:
        """Add ``features`` (N, D) to the real or the generated side (as float64)."""
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: features must be (N, {self.num_features}), got {tuple(features.shape)}"
            )
        side = "real" if real else "fake"
        f = features.detach().to(device=self.real_total.device, dtype=torch.float64)
        setattr(self, f"{side}_total", getattr(self, f"{side}_total") + f.sum(dim=0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + f.T @ f)
        setattr(self, f"{side}_count", getattr(self, f"{side}_count") + f.shape[0])

    def stats(self, real: bool) -> FrechetStats:
        """This rank's statistics of one side (synced ones inside :meth:`sync_context` / :meth:`compute`)."""
        side = "real" if real else "fake"
        return FrechetStats(
            getattr(self, f"{side}_total").detach().cpu().clone(),
            getattr(self, f"{side}_outer").detach().cpu().clone(),
            int(getattr(self, f"{side}_count")),
        )

    def synced_stats(self, real: bool) -> FrechetStats:
        """One side's statistics summed over every rank (a collective call under DDP: every rank calls it)."""
        with self.sync_context(should_sync=True, should_unsync=True):
            return self.stats(real)

    def compute(self) -> Tensor:
        real = self.real_stats if self.real_stats is not None else self.stats(True)
        fake = self.stats(False)
        return torch.tensor(real.distance(fake, self.cov_divisor), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ uint8


def to_uint8(video: Tensor) -> Tensor:
    """``[-1, 1]`` floats -> uint8 as StyleGAN-V does: ``floor(x * 127.5 + 128)`` clamped to [0, 255].

    That is ``round(127.5 (x + 1))`` with halves rounded up, and it gives back exactly the uint8 values
    that vdiff's data pipeline maps to ``v / 127.5 - 1``. uint8 input is returned unchanged.
    """
    if video.dtype == torch.uint8:
        return video
    return (video.detach().float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------------ cache


def default_stats_dir() -> Path:
    """``$VDIFF_CACHE/frechet_stats`` (else ``$XDG_CACHE_HOME/vdiff`` or ``~/.cache/vdiff``)."""
    return cache_root() / "frechet_stats"


def stats_key(protocol: Mapping[str, Any], data_id: str) -> str:
    """Hex sha256 of the protocol fields that define real statistics plus an identifier of the data."""
    text = json.dumps({"protocol": dict(protocol), "data": data_id}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class StatsCache:
    """Real-data statistics on disk: ``<folder>/<name>-<key[:16]>.pt`` (torch.save of tensors and json-able
    metadata, read back with ``weights_only=True``). Writes are atomic (temporary file + ``os.replace``)."""

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_stats_dir()

    def path(self, name: str, key: str) -> Path:
        return self.folder / f"{name}-{key[:16]}.pt"

    def load(self, name: str, key: str) -> FrechetStats | None:
        path = self.path(name, key)
        if not path.is_file():
            return None
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != STATS_FORMAT or payload.get("key") != key:
            return None  # another format or a (16-hex) prefix collision: recompute
        return FrechetStats.from_dict(payload["stats"])

    def save(self, name: str, key: str, stats: FrechetStats, meta: Mapping[str, Any] | None = None) -> Path:
        path = self.path(name, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": STATS_FORMAT, "key": key, "stats": stats.to_dict(),
                   "meta": json.loads(json.dumps(dict(meta or {}), default=str))}  # fmt: skip
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path
