"""Model-agnostic diffusion: EDM, DDPM/DDIM, samplers, guidance and conditioning masks."""
