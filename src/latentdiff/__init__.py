"""latentdiff: denoising diffusion (DDPM, improved DDPM, DDIM, fast solvers) and latent diffusion in PyTorch."""

__version__ = "0.1.0"
