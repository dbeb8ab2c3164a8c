"""vdiff's sgm converter against sgm's OWN code: golden outputs of a tiny SVD-style autoencoder.

``fixtures/sgm_tiny_vae.safetensors`` was made by ``fixtures/make_sgm_golden.py`` from Stability-AI/generative-models
at commit 0ad7de9a5cb53fd63d6d30a4f385485e72e08597 (sgm's ``Encoder`` + ``VideoDecoder``, every parameter random;
see the script for how to regenerate it). The key manifest test in ``test_autoencoder_convert.py`` checks names
and shapes only; this one checks what the converted model computes, so a converter that maps a tensor to the
wrong place of the right shape (e.g. a time stack's norm1 and norm2 swapped) fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vdiff.models.autoencoder import AutoencoderConfig
from vdiff.weights.autoencoder import load_autoencoder, read_autoencoder
from vdiff.weights.autoencoder_convert import SGM_PREFIX, to_sgm

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "sgm_tiny_vae.safetensors"
COMMIT = "0ad7de9a5cb53fd63d6d30a4f385485e72e08597"
TOL = 1e-5


@pytest.fixture(scope="module")
def golden() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(FIXTURE), framework="pt") as f:
        metadata = dict(f.metadata())
    return load_file(str(FIXTURE)), metadata


def fixture_config(metadata: dict[str, str]) -> AutoencoderConfig:
    """The vdiff config of the fixture's sgm ``ddconfig`` (SVD layout: temporal decoder, no post_quant_conv)."""
    dd = json.loads(metadata["ddconfig"])
    assert dd["attn_type"] == "vanilla" and dd["double_z"] and dd["attn_resolutions"] == []
    assert json.loads(metadata["video_kernel_size"]) == [3, 1, 1]
    return AutoencoderConfig.from_name(
        "svd", in_channels=dd["in_channels"], out_channels=dd["out_ch"], ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]),
        num_res_blocks=dd["num_res_blocks"], z_channels=dd["z_channels"],
    )


def test_fixture_provenance(golden):
    tensors, metadata = golden
    assert metadata["repo"] == "Stability-AI/generative-models" and metadata["commit"] == COMMIT
    assert FIXTURE.stat().st_size < 700 * 1024
    weights = {k: v for k, v in tensors.items() if k.startswith(SGM_PREFIX)}
    assert len(weights) > 150 and all(v.dtype == torch.float16 for v in weights.values())
    # The time stacks' norms really differ (else a norm1/norm2 swap could not show).
    p = SGM_PREFIX + "decoder.mid.block_1.time_stack."
    assert not torch.equal(tensors[p + "in_layers.0.weight"], tensors[p + "out_layers.0.weight"])


def test_sgm_converter_reproduces_sgm_outputs(golden):
    tensors, metadata = golden
    clips, frames = int(metadata["clips"]), int(metadata["frames"])
    config = fixture_config(metadata)
    # The fixture file itself is an sgm checkpoint (its golden.* tensors sit outside first_stage_model.).
    weights = read_autoencoder(FIXTURE, config=config)
    assert weights.layout == "sgm"
    model = load_autoencoder(FIXTURE, config=config).eval()
    video = tensors["golden.video"].unflatten(0, (clips, frames))  # (B, T, 3, H, W)
    with torch.no_grad():
        posterior = model.encode(video)
        decoded = model.decode(tensors["golden.posterior_mean"].unflatten(0, (clips, frames)))
    mean_err = (posterior.mean.flatten(0, 1) - tensors["golden.posterior_mean"]).abs().max().item()
    logvar_err = (posterior.logvar.flatten(0, 1) - tensors["golden.posterior_logvar"]).abs().max().item()
    decode_err = (decoded.flatten(0, 1) - tensors["golden.decoded"]).abs().max().item()
    assert mean_err < TOL and logvar_err < TOL and decode_err < TOL, (mean_err, logvar_err, decode_err)
    assert tensors["golden.decoded"].std() > 0.1  # not a degenerate output
    # Export: every sgm tensor comes back, value for value (quant_conv, sgm's missing stand-in, is dropped).
    exported = to_sgm(model.state_dict(), config)
    sgm = {k: v for k, v in tensors.items() if k.startswith(SGM_PREFIX)}
    assert set(exported) == set(sgm)
    for name, value in sgm.items():
        assert torch.equal(exported[name], value.float()), name
