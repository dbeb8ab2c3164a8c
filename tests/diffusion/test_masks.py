"""Conditioning masks: given/generated counts of every mode for several clip lengths, edge
parameters, validation errors, and the mixture."""

from __future__ import annotations

import pytest
import torch

from vdiff.diffusion.masks import MASK_MODES, MaskMixture, MaskSpec, sample_given_mask, task_mask

H, W = 8, 8


def _given_frames(mask: torch.Tensor) -> list[int]:
    """Indices of fully given frames of clip 0."""
    per_frame = mask[0, :, 0].flatten(1).all(dim=1)
    return per_frame.nonzero().flatten().tolist()


def _gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("num_frames", [8, 16, 30])
def test_frame_modes_counts(num_frames):
    T = num_frames
    for sampler in (lambda spec: sample_given_mask(spec, 3, T, H, W, _gen()), lambda spec: task_mask(spec, T, H, W, batch=3)):
        m = sampler(MaskSpec("prediction", given_frames=2))
        assert m.shape == (3, T, 1, H, W) and m.dtype == torch.bool
        assert _given_frames(m) == [0, 1]
        m = sampler(MaskSpec("prediction"))  # half, VDT's 8 of 16 scaled to T
        assert _given_frames(m) == list(range(round(T / 2)))
        m = sampler(MaskSpec("backward", given_frames=3))
        assert _given_frames(m) == [T - 3, T - 2, T - 1]
        m = sampler(MaskSpec("interpolation", step=4))
        expected = sorted(set(range(0, T, 4)) | {T - 1})
        assert _given_frames(m) == expected
        m = sampler(MaskSpec("unconditional"))
        assert not bool(m.any())
        m = sampler(MaskSpec("single_frame"))
        assert _given_frames(m) == [0] and int(m[0].sum()) == H * W
        m = sampler(MaskSpec("single_frame", frame=-1))
        assert _given_frames(m) == [T - 1]
        # every clip of the batch is the same for frame modes
        assert torch.equal(m[0], m[2])


def test_interpolation_counts():
    assert _given_frames(task_mask("interpolation", 16, H, W, step=4)) == [0, 4, 8, 12, 15]
    assert _given_frames(task_mask("interpolation", 17, H, W, step=4)) == [0, 4, 8, 12, 16]
    assert _given_frames(task_mask("interpolation", 30, H, W, step=100)) == [0, 29]  # step past the clip
    assert _given_frames(task_mask("interpolation", 3, H, W, step=2)) == [0, 2]


def test_edge_parameters_keep_something_to_generate_and_something_given():
    assert _given_frames(task_mask("prediction", 2, H, W, given_frames=1)) == [0]
    assert _given_frames(task_mask("prediction", 2, H, W, given_frames=0.99)) == [0]  # fraction capped at T - 1
    assert _given_frames(task_mask("backward", 30, H, W, given_frames=0.01)) == [29]  # ... and at least 1
    assert _given_frames(task_mask("prediction", 30, H, W, given_frames=29)) == list(range(29))
    with pytest.raises(ValueError, match="given_frames=16 leaves nothing to generate in a 16-frame clip"):
        task_mask("prediction", 16, H, W, given_frames=16)
    with pytest.raises(ValueError, match="given_frames=8 leaves nothing"):
        sample_given_mask(MaskSpec("backward", given_frames=8), 2, 8, H, W)
    with pytest.raises(ValueError, match="at least 3 frames"):
        task_mask("interpolation", 2, H, W)
    with pytest.raises(ValueError, match="at least 2 frames"):
        task_mask("single_frame", 1, H, W)
    with pytest.raises(ValueError, match="outside a 8-frame clip"):
        task_mask("single_frame", 8, H, W, frame=8)
    assert not bool(task_mask("unconditional", 1, H, W).any())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="inpaint"), "mode must be one of"),
        (dict(mode="prediction", given_frames=0), "given_frames must be >= 1"),
        (dict(mode="prediction", given_frames=1.0), r"fractional given_frames must be in \(0, 1\)"),
        (dict(mode="prediction", given_frames=True), "int or a float"),
        (dict(mode="interpolation", step=1), "step must be an int >= 2"),
        (dict(mode="random_frames", p_generate=0.0), r"p_generate must be in \(0, 1\]"),
        (dict(mode="completion", spatial_ratio=1.0), r"spatial_ratio must be in \(0, 1\)"),
        (dict(mode="completion", span=(3, 3)), "span must be"),
        (dict(mode="completion", max_span_trim=0.5), "max_span_trim"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MaskSpec(**kwargs)


@pytest.mark.parametrize("num_frames", [8, 16, 30])
def test_random_frames(num_frames):
    spec = MaskSpec("random_frames", p_generate=0.8)
    m = sample_given_mask(spec, 2000, num_frames, 2, 2, _gen())
    frames_given = m[:, :, 0, 0, 0]
    assert torch.equal(m, frames_given.reshape(2000, num_frames, 1, 1, 1).expand_as(m))  # whole frames
    assert float(frames_given.float().mean()) == pytest.approx(0.2, abs=0.02)  # VDT: a frame is generated w.p. 0.8
    assert bool((~frames_given).any(dim=1).all())  # never all given
    # p_generate close to 0: the fix keeps exactly one generated frame when the draw gave them all
    rare = sample_given_mask(MaskSpec("random_frames", p_generate=1e-6), 50, num_frames, 2, 2, _gen())
    assert (~rare[:, :, 0, 0, 0]).sum(dim=1).tolist() == [1] * 50
    assert not bool(sample_given_mask(MaskSpec("random_frames", p_generate=1.0), 4, num_frames, 2, 2, _gen()).any())
    # deterministic task version: seeded, same for every call
    assert torch.equal(task_mask("random_frames", num_frames, 2, 2, batch=2), task_mask("random_frames", num_frames, 2, 2, batch=2))


@pytest.mark.parametrize("num_frames", [8, 16, 30])
@pytest.mark.parametrize("height, width", [(8, 8), (16, 9), (2, 1)])
def test_completion(num_frames, height, width):
    spec = MaskSpec("completion", spatial_ratio=0.5)
    area = height * width
    m = sample_given_mask(spec, 200, num_frames, height, width, _gen())
    generated = ~m[:, :, 0]  # (B, T, H, W)
    frames_with_block = generated.flatten(2).any(dim=2)  # (B, T)
    assert bool(frames_with_block.any(dim=1).all())  # the span is never empty (VDT bug: end == 0)
    spans = frames_with_block.sum(dim=1)
    trim = round(0.2 * num_frames)
    assert int(spans.min()) >= num_frames - 2 * trim and int(spans.max()) == num_frames
    assert int(spans.min()) < num_frames  # trimming happens
    for b in range(0, 200, 37):  # one rectangle, the same in every frame of the span, contiguous span
        idx = frames_with_block[b].nonzero().flatten()
        assert idx.tolist() == list(range(int(idx[0]), int(idx[-1]) + 1))
        block = generated[b, idx[0]]
        assert all(torch.equal(generated[b, i], block) for i in idx.tolist())
        rows, cols = block.any(dim=1).nonzero().flatten(), block.any(dim=0).nonzero().flatten()
        assert int(block.sum()) == len(rows) * len(cols)
        assert 0 < int(block.sum()) < area  # something generated, something given in the frame
    if area >= 64:
        ratio = generated.flatten(2).sum(dim=2)[frames_with_block].float().mean() / area
        assert float(ratio) == pytest.approx(0.5, abs=0.1)

    task = task_mask("completion", num_frames, height, width, spatial_ratio=0.25, span=(2, 5))
    gen_task = ~task[0, :, 0]
    assert gen_task.flatten(1).any(dim=1).nonzero().flatten().tolist() == [2, 3, 4]
    assert 0 < int(gen_task[2].sum()) < area


def test_completion_task_is_centred_and_span_validated():
    m = task_mask("completion", 4, 8, 8, spatial_ratio=0.25)
    generated = ~m[0, 0, 0]
    assert generated[2:6, 2:6].all() and int(generated.sum()) == 16
    assert bool((~m).flatten(2).any(dim=2).all())  # all frames by default
    with pytest.raises(ValueError, match="ends past"):
        task_mask("completion", 4, 8, 8, span=(1, 6))
    with pytest.raises(ValueError, match="at least 2 elements"):
        task_mask("completion", 4, 1, 1)


def test_every_mode_generates_something_for_many_draws():
    for mode in MASK_MODES:
        for T in (2, 3, 8, 16, 30):
            if mode == "interpolation" and T < 3:
                continue
            m = sample_given_mask(MaskSpec(mode), 16, T, 4, 4, _gen())
            assert bool((~m).flatten(1).any(dim=1).all()), mode
            if mode not in ("unconditional", "random_frames"):  # random_frames may give nothing, as in VDT
                assert bool(m.flatten(1).any(dim=1).all()), mode


def test_single_frame_random_index_per_clip():
    m = sample_given_mask(MaskSpec("single_frame", frame=None), 500, 10, 1, 1, _gen())
    per_clip = m[:, :, 0, 0, 0]
    assert per_clip.sum(dim=1).tolist() == [1] * 500
    assert len(set(per_clip.float().argmax(dim=1).tolist())) == 10
    assert _given_frames(task_mask("single_frame", 10, 1, 1, frame=None)) == [0]


def test_mixture_draws_modes_by_weight_and_reproducibly():
    mixture = MaskMixture(
        {"prediction": 2.0, "predict_one": 1.0, "unconditional": 1.0, "completion": 0.0},
        specs={"predict_one": MaskSpec("prediction", given_frames=1)},
    )
    masks, names = mixture.sample(4000, 8, 4, 4, _gen())
    assert masks.shape == (4000, 8, 1, 4, 4)
    counts = {n: names.count(n) for n in set(names)}
    assert "completion" not in counts
    assert counts["prediction"] / 4000 == pytest.approx(0.5, abs=0.03)
    assert counts["predict_one"] / 4000 == pytest.approx(0.25, abs=0.03)
    for i in range(0, 4000, 97):  # each clip's mask matches its drawn mode
        expected = {"prediction": [0, 1, 2, 3], "predict_one": [0], "unconditional": []}[names[i]]
        assert _given_frames(masks[i : i + 1]) == expected
    again = mixture(4000, 8, 4, 4, _gen())
    assert torch.equal(masks, again)


def test_mixture_validation():
    with pytest.raises(ValueError, match="not a mask mode"):
        MaskMixture({"predict2": 1.0})
    with pytest.raises(ValueError, match="no weight"):
        MaskMixture({"prediction": 1.0}, specs={"other": MaskSpec("backward")})
    with pytest.raises(ValueError, match="must not all be zero"):
        MaskMixture({"prediction": 0.0})
    with pytest.raises(ValueError, match=">= 0"):
        MaskMixture({"prediction": -1.0})
    with pytest.raises(TypeError, match="must be a MaskSpec"):
        MaskMixture({"x": 1.0}, specs={"x": {"mode": "prediction"}})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="unknown parameters"):
        task_mask("prediction", 8, 4, 4, k=2)
