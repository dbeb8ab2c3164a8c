"""Video quality metrics: per-frame PSNR/SSIM/LPIPS wrappers, Frechet distances."""
