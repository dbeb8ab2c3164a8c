"""LightningModules: one per model family, sharing a diffusion base."""
