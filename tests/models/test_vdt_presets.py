"""Every named VDT size builds on the meta device (no memory) with its recorded parameter count."""

from __future__ import annotations

import pytest
import torch

from vdiff.models.vdt import VDT, VDT_CONFIGS, VDTConfig

# Parameters with 4 latent channels and learned variance (the paper's setup on SD-VAE latents).
# VDT-L/2's 859.7M matches the RERV/VDT key manifest (vdiff/weights/manifests/vdt_keys.json).
PARAMETERS = {"VDT-S/2": 41_360_288, "VDT-B/2": 165_000_992, "VDT-L/2": 859_701_920}


@pytest.mark.parametrize("name", sorted(VDT_CONFIGS))
def test_every_preset_builds_on_meta_with_its_parameter_count(name):
    config = VDTConfig.from_name(name, in_channels=4, learn_sigma=True)
    with torch.device("meta"):
        model = VDT(config)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]
    assert model.config == config and len(model.blocks) == config.depth


def test_presets_are_data_and_overrides_do_not_change_them():
    assert set(PARAMETERS) == set(VDT_CONFIGS)
    small = VDTConfig.from_name("VDT-L/2", depth=2)
    assert small.depth == 2 and VDT_CONFIGS["VDT-L/2"].depth == 28  # the preset is not mutated
