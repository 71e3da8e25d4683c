"""latentdiff: denoising diffusion (DDPM, improved DDPM, DDIM, fast solvers) and latent diffusion in PyTorch.

    import latentdiff
    pipe = latentdiff.load("runs/digits")     # a run folder or a model folder (latentdiff export)
    pipe = latentdiff.load("sd-1-5/")         # a diffusers folder or an SD .safetensors file (latentdiff.interop)
    images = pipe.sample(10, labels=range(10), seed=0)

``load`` and ``Pipeline`` are imported on first use (PEP 562 module ``__getattr__``), so that ``import
latentdiff`` and ``latentdiff --help`` do not import torch.
"""

__version__ = "0.1.0"

_LAZY = {"load": "latentdiff.interop", "Pipeline": "latentdiff.pipeline"}

__all__ = ["Pipeline", "__version__", "load"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'latentdiff' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
