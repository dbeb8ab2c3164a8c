"""VDT against golden outputs of the reference implementation (RERV/VDT ``models.py``).

The manifest test in ``test_vdt.py`` checks names and shapes only; this one checks what the weights
compute. ``fixtures/vdt_tiny_golden.safetensors`` holds a tiny reference VDT with random weights (every
adaLN shift/scale/gate non-zero), a seeded input and the reference's output; it was written by
``fixtures/make_vdt_golden.py`` from RERV/VDT at the commit stored in its metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vdiff.models.vdt import CLASS_LABEL_KEY, VDT, VDTConfig
from vdiff.weights.vdt import load_vdt_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "vdt_tiny_golden.safetensors"
REFERENCE_COMMIT = "cdbad2b1613a3ccc7121bf949bd8940f67e1ab2b"


def read_fixture() -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    with safe_open(str(FIXTURE), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(FIXTURE))
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    io = {k[len("io.") :]: v for k, v in tensors.items() if k.startswith("io.")}
    return metadata, state, io


def vdiff_model(config: dict) -> VDT:
    """vdiff's VDT with the reference's sizes (``config`` holds the reference constructor's arguments)."""
    return VDT(VDTConfig(**config)).eval()


def reference_call(model: VDT, io: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference's ``forward(x, t)``: x (B, T, C, H, W), t (B,), class label always 0."""
    x, t = io["x"], io["t"]
    return model(x, t, {CLASS_LABEL_KEY: torch.zeros(x.shape[0], dtype=torch.long)}, None)


def test_fixture_is_small_and_from_the_recorded_reference_commit():
    metadata, state, io = read_fixture()
    assert FIXTURE.stat().st_size < 512 * 1024
    assert metadata["commit"] == REFERENCE_COMMIT
    assert set(io) == {"x", "t", "out"}
    # Every adaLN modulation (shift, scale, gate) is non-trivial, so a swap or a dropped term shows.
    adaln = [v for k, v in state.items() if "adaLN_modulation" in k]
    assert adaln and all(v.abs().mean() > 0.05 for v in adaln)


@torch.no_grad()
def test_reference_weights_compute_the_reference_outputs(tmp_path):
    metadata, state, io = read_fixture()
    config = json.loads(metadata["config"])
    checkpoint = tmp_path / "reference.safetensors"
    save_file(state, str(checkpoint))
    model = load_vdt_checkpoint(vdiff_model(config), checkpoint)  # strict: every key, every shape
    out = reference_call(model, io)
    assert out.shape == io["out"].shape
    # The stored float32 output is itself up to 1.2e-5 from the float64 answer (outputs reach 4.5), and float32
    # kernels round differently on other CPUs (AVX2 vs AVX-512): 5e-5 covers rounding; a wrong term moves >1e-2.
    torch.testing.assert_close(out, io["out"], rtol=0, atol=5e-5)


@torch.no_grad()
def test_golden_output_depends_on_the_class_label_and_the_timestep():
    """Guards the comparison itself: the label-0 convention and t are both visible in the output."""
    metadata, state, io = read_fixture()
    model = vdiff_model(json.loads(metadata["config"]))
    model.load_state_dict(state, strict=True)
    null = model(io["x"], io["t"])  # no label: the null class, which the reference never uses
    assert (null - io["out"]).abs().max() > 1e-2
    later = model(io["x"], io["t"] + 100.0, {CLASS_LABEL_KEY: torch.zeros(2, dtype=torch.long)})
    assert (later - io["out"]).abs().max() > 1e-2
