"""Two objectives trained the same way in one process and in two (``accelerate launch --multi_gpu --num_processes 2``
on CPU gives gloo DDP), launched by test_ddp.py as

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/helpers/ddp_launch_script.py ROOT OUT

or called in one process (``run_all``). ROOT holds latent shards (``lat/``), their first stage (``ae/``) and the
text-to-image config (``cfg.yaml``) made by test_ddp.py. Each run's randomness is made a function of the sample:
the timestep and ε of a sample come from a generator seeded by its latent (``per_sample_noise``), posterior
sampling and conditioning dropout are off, so 2 processes × batch B must update the weights as 1 × 2B does. Adam's
ε is raised to 1e-4: its first step moves every weight by ±lr whatever the size of the gradient, so with the default
1e-8 a gradient of 1e-9 that rounds differently in a 2-process sum would move a weight the other way.
"""

import contextlib
import hashlib
import sys
from pathlib import Path

import torch

from latentdiff.config import load_config
from latentdiff.diffusion import GaussianDiffusion
from latentdiff.train.run import train_from_config

GAN = """
autoencoder: {regularizer: kl, ch: 8, ch_mult: [1, 2], num_res_blocks: 1, z_channels: 3, embed_dim: 3, norm_groups: 8}
loss: {rec_loss: l1, disc_start: 0, sample_posterior: false, disc_weight: 0.5}
discriminator: {ndf: 8, n_layers: 1, norm: group}
data: {name: shapes, size: 16, options: {length: 32}}
train: {steps: 2, batch_size: 8, lr: 2.0e-3, adam_eps: 1.0e-4, ema_decay: 0.0, checkpoint_every: 0, log_every: 1,
        mixed_precision: "no", find_unused_parameters: true}
eval_num: 4
"""


@contextlib.contextmanager
def per_sample_noise():
    """t and ε of each sample from a generator seeded by the sample's bytes."""
    inner = GaussianDiffusion.training_losses

    def losses(self, model_fn, x0, t=None, noise=None, **kw):
        ts, ns = [], []
        for x in x0:
            seed = int(hashlib.sha256(x.detach().cpu().numpy().tobytes()).hexdigest()[:15], 16)
            g = torch.Generator().manual_seed(seed)
            ts.append(torch.randint(0, self.num_steps, (1,), generator=g))
            ns.append(torch.randn(x.shape, generator=g))
        return inner(self, model_fn, x0, torch.cat(ts).to(x0.device), torch.stack(ns).to(x0.device), **kw)

    GaussianDiffusion.training_losses = losses
    try:
        yield
    finally:
        GaussianDiffusion.training_losses = inner


def run_all(root: Path, out: Path, *stream_overrides: str):
    """Train both objectives into out/txt2img and out/gan. A stream's order depends on its global worker count
    N = processes × loader workers and the micro-batch: one process matches two with ``train.num_workers=2
    train.grad_accum=2`` (``stream_overrides``)."""
    root, out = Path(root), Path(out)
    cfg = load_config(root / "cfg.yaml", [f"data.root={root / 'lat'}", f"latent.first_stage={root / 'ae'}",
                                          "train.cond_drop_prob=0", "latent.sample_posterior=false",
                                          "train.steps=2", "train.batch_size=8", "train.deterministic=false",
                                          "train.adam_eps=1e-4",
                                          *stream_overrides])
    with per_sample_noise():
        train_from_config(cfg, out / "txt2img", progress=False)
    (root / "gan.yaml").write_text(GAN)
    train_from_config(load_config(root / "gan.yaml"), out / "gan", progress=False)


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_all(Path(sys.argv[1]), Path(sys.argv[2]))
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() == 0:
        print(f"launched: world={dist.get_world_size()} backend={dist.get_backend()}", flush=True)
