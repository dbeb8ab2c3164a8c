"""Fréchet distance (eigh route) against scipy's sqrtm formula and closed forms; float64 statistics that
merge across ranks with exact counts (simulated, and a real 2-process gloo run); uint8 quantisation; the
on-disk statistics cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vdiff.metrics.frechet import (
    FrechetMetric,
    FrechetStats,
    StatsCache,
    frechet_distance,
    stats_key,
    to_uint8,
)

TOLERANCE = 1e-8


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The textbook formula (StyleGAN-V / clean-fid): |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.square(mu1 - mu2).sum() + np.trace(s1 + s2 - 2 * np.real(covmean)))


def random_gaussian(rng: np.random.Generator, dim: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of ``samples`` correlated feature vectors (full rank when samples > dim)."""
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    x = rng.normal(size=(samples, dim)) @ mix + rng.normal(size=dim)
    return x.mean(axis=0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("dim, pairs", [(8, 3), (64, 3), (400, 1)])  # measured: <= 6e-10 up to D=2048
def test_matches_scipy_sqrtm_formula_within_1e_8(dim, pairs):
    rng = np.random.default_rng(dim)
    worst = 0.0
    for _ in range(pairs):
        mu1, s1 = random_gaussian(rng, dim, 4 * dim)
        mu2, s2 = random_gaussian(rng, dim, 4 * dim)
        ours, ref = frechet_distance(mu1, s1, mu2, s2), scipy_frechet(mu1, s1, mu2, s2)
        worst = max(worst, abs(ours - ref))
    assert worst < TOLERANCE, f"max |eigh - sqrtm| = {worst:.3e} at D={dim}"


def test_symmetric_and_zero_on_itself():
    rng = np.random.default_rng(1)
    mu1, s1 = random_gaussian(rng, 32, 100)
    mu2, s2 = random_gaussian(rng, 32, 100)
    assert abs(frechet_distance(mu1, s1, mu2, s2) - frechet_distance(mu2, s2, mu1, s1)) < TOLERANCE
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < TOLERANCE


def test_closed_forms():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    a, b = rng.uniform(0.1, 3.0, size=16), rng.uniform(0.1, 3.0, size=16)
    # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
    expected = np.square(mu1 - mu2).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    assert abs(frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) - expected) < TOLERANCE
    # A pure mean shift: the covariance terms cancel, whatever the (shared) covariance.
    _, shared = random_gaussian(rng, 16, 64)
    assert abs(frechet_distance(mu1, shared, mu2, shared) - np.square(mu1 - mu2).sum()) < TOLERANCE


def test_singular_covariances_of_small_sample_sets():
    """N < D (FVD at small N): covariances are singular; the eigh route stays real and exact on itself."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 50))
    stats = FrechetStats.of(x)
    assert abs(stats.distance(stats)) < 1e-9
    shifted = FrechetStats.of(x + 0.5)
    assert abs(stats.distance(shifted) - 50 * 0.25) < 1e-9


@pytest.mark.parametrize("divisor, bias", [("N", True), ("N-1", False)])
def test_streaming_statistics_match_numpy(divisor, bias):
    x = np.random.default_rng(4).normal(size=(37, 6)) * 3 + 5
    stats = FrechetStats.of(torch.from_numpy(x[:10])) + FrechetStats.of(x[10:])
    assert stats.count == 37
    np.testing.assert_allclose(stats.mean().numpy(), x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance(divisor).numpy(), np.cov(x, rowvar=False, bias=bias), rtol=1e-10)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # `merged` gets its states by assignment
def test_two_simulated_ranks_split_unevenly_merge_to_one_pass():
    rng = np.random.default_rng(5)
    real, fake = torch.from_numpy(rng.normal(size=(23, 8))), torch.from_numpy(rng.normal(size=(17, 8)) + 0.3)
    one = FrechetMetric(8, cov_divisor="N")
    one.update(real, real=True)
    one.update(fake, real=False)
    ranks = [FrechetMetric(8, cov_divisor="N"), FrechetMetric(8, cov_divisor="N")]
    ranks[0].update(real[:4], real=True)  # rank 0: 4 real, 15 generated in two batches
    ranks[0].update(fake[:9], real=False)
    ranks[0].update(fake[9:15], real=False)
    ranks[1].update(real[4:], real=True)  # rank 1: 19 real, 2 generated
    ranks[1].update(fake[15:], real=False)
    merged = FrechetMetric(8, cov_divisor="N")
    for name in ("real_total", "real_outer", "real_count", "fake_total", "fake_outer", "fake_count"):
        setattr(merged, name, sum(getattr(r, name) for r in ranks))  # what dist_reduce_fx="sum" does
    assert int(merged.real_count) == 23 and int(merged.fake_count) == 17
    torch.testing.assert_close(merged.real_outer, one.real_outer, rtol=1e-13, atol=1e-12)
    assert abs(float(merged.compute()) - float(one.compute())) < 1e-10


# ------------------------------------------------------------------------------------------------ real DDP

WORLD = 2
SPLITS = {"real": [5, 14], "fake": [11, 0]}  # rank 1 scores no generated sample at all


def _features(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(19, 8, generator=g, dtype=torch.float64), torch.randn(
        11, 8, generator=g, dtype=torch.float64
    ) + 0.5


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        real, fake = _features(0)
        metric = FrechetMetric(8, cov_divisor="N-1")
        for side, data in (("real", real), ("fake", fake)):
            start = sum(SPLITS[side][:rank])
            part = data[start : start + SPLITS[side][rank]]
            for chunk in part.split(3):  # several batches per rank
                metric.update(chunk, real=side == "real")
        value = float(metric.compute())  # syncs the states over both processes
        merged = metric.synced_stats(real=True)
        local = metric.stats(real=True)  # unsynced again afterwards
        torch.save({"value": value, "real_count": merged.count, "real_outer": merged.outer, "local": local.count},
                   os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_real_two_process_gloo_merge_equals_one_pass(tmp_path):
    # fork: the children need no fresh interpreter and imports (spawn costs ~20 s on 2 busy cores)
    mp.start_processes(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="fork")
    real, fake = _features(0)
    one = FrechetMetric(8, cov_divisor="N-1")
    one.update(real, real=True)
    one.update(fake, real=False)
    expected = float(one.compute())
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["real_count"] == 19 and out["local"] == SPLITS["real"][rank]
        torch.testing.assert_close(out["real_outer"], one.real_outer, rtol=1e-13, atol=1e-12)
        assert abs(out["value"] - expected) < 1e-10


# ------------------------------------------------------------------------------------------------ uint8, cache


def test_uint8_quantisation_round_trips_pipeline_values_and_matches_stylegan_v():
    values = torch.arange(256, dtype=torch.uint8)
    as_float = values.float() / 127.5 - 1.0  # vdiff's normalize_video
    assert torch.equal(to_uint8(as_float), values)
    x = torch.linspace(-1.2, 1.2, 1001)
    stylegan_v = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)  # metric_utils.compute_feature_stats_for_generator
    assert torch.equal(to_uint8(x), stylegan_v)


def test_stats_cache_round_trip_and_keys(tmp_path):
    cache = StatsCache(tmp_path / "cache")
    stats = FrechetStats.of(np.random.default_rng(6).normal(size=(9, 4)))
    key = stats_key({"num_frames": 16, "weights_sha256": "ab"}, "data-1")
    assert cache.load("fvd", key) is None
    path = cache.save("fvd", key, stats, {"note": "test"})
    loaded = cache.load("fvd", key)
    assert loaded.count == 9 and torch.equal(loaded.outer, stats.outer) and path.is_file()
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]
    assert stats_key({"num_frames": 16, "weights_sha256": "ab"}, "data-2") != key
    assert stats_key({"num_frames": 9, "weights_sha256": "ab"}, "data-1") != key
