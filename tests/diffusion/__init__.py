"""Tests of the model-agnostic diffusion core (vdiff/diffusion)."""
