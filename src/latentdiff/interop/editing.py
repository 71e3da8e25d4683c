"""Text-to-image, image-to-image and inpainting with diffusers' conventions, so that a Stable Diffusion model gives
the images that diffusers' StableDiffusionPipeline, StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline
give for the same seeds, prompts, steps and scheduler.

What differs from :meth:`Pipeline.sample` is the order in which each sample's generator is drawn from (diffusers:
img2img draws the posterior sample of the image's latent, then the noise; inpainting draws x_T, then the posterior
sample of the masked image's latent; ancestral samplers then draw their step noise) and the img2img grid: diffusers
runs the last ⌊strength · N⌋ points (latentdiff's ``strength`` option: ⌈strength · N⌉). The 9-channel inpainting U-Net
sees [z_t, m, s·ℰ(x ⊙ (1 − m))] (m = 1 where the image is repainted, nearest-downsampled to the latent size), which
enters latentdiff's U-Net as its concatenated channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import RequestError
from ..guidance import classifier_free_guidance
from ..samplers import SAMPLER_OPTIONS, SAMPLERS, make_generators, options_for
from ..samplers.common import make_timesteps, randn


def _encode(pipe, images: torch.Tensor, gens) -> torch.Tensor:
    """s·z with z a posterior sample of each image's latent, drawn from that sample's generator."""
    ae = pipe.autoencoder
    z = [ae.encode(images[i : i + 1], sample=True, generator=gens[i]) for i in range(images.shape[0])]
    return torch.cat(z) * pipe.latent_scale


@torch.no_grad()
def generate(pipe, prompts, *, negative_prompt: str | None = None, image: torch.Tensor | None = None,
             mask: torch.Tensor | None = None, strength: float = 1.0, sampler: str | None = None,
             steps: int | None = None, guidance: float | None = None, seed: int = 0, output: str = "tensor",
             sampler_options: dict | None = None, **options):
    """Sample ``pipe`` (an imported Stable Diffusion model) on ``prompts`` (one per sample), as diffusers' pipelines do.

    image: (B, 3, H, W) in [-1, 1]: img2img (strength in (0, 1]) or, with ``mask``, the image to inpaint.
    mask: (B, 1, H, W) in [0, 1], 1 = repaint (diffusers' convention), binarised at 0.5; needs the 9-channel U-Net.
    Options not given come from the pipeline's config (the scheduler it was imported with). Returns decoded images
    (B, 3, H, W) in [-1, 1] (``output="tensor"``) or the final latents (``output="latent"``).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    b = len(prompts)
    s = pipe.sample_options(num=b, prompts=prompts, negative_prompt=negative_prompt, sampler=sampler, steps=steps,
                            guidance=guidance, seed=seed,
                            **{k: options.pop(k) for k in list(options) if hasattr(pipe.config.sample, k)})
    if options:
        raise RequestError(f"unknown option(s) {sorted(options)}")
    inpaint = pipe.unet.config.concat_channels > 0
    if inpaint != (mask is not None) or (mask is not None and image is None):
        raise RequestError("inpainting needs image and mask and the 9-channel U-Net; the other models take no mask")
    if image is not None and tuple(image.shape[:1]) != (b,):
        raise RequestError(f"image has batch {image.shape[0]}; expected one per prompt ({b})")
    if not 0.0 < strength <= 1.0 or (strength != 1.0 and (image is None or inpaint)):
        raise RequestError(f"strength must lie in (0, 1] and needs an image (img2img; inpainting runs at strength 1), "
                           f"got {strength}")
    gens = make_generators(seed, b)
    d = pipe.diffusion
    ts = make_timesteps(d, s.steps, spacing=s.spacing, offset=s.offset, karras=s.karras,
                        karras_range=s.karras_range, extra_point=s.extra_point)
    if strength < 1.0:
        keep = min(int(s.steps * strength), s.steps)  # diffusers' get_timesteps: the last ⌊strength · N⌋ points
        if keep < 1:
            raise RequestError(f"strength {strength} keeps no step of {s.steps}")
        ts = ts[-keep:]
    h, w = (image.shape[2], image.shape[3]) if image is not None else (pipe.config.data.size,) * 2
    template = torch.empty(b, *pipe.sample_shape_at((h, w)))
    cond = pipe.conditioner({"prompt": prompts})
    uncond = pipe.conditioner({"prompt": [s.negative_prompt or ""] * b})
    ab0 = float(d.alpha_bar(ts[0]))
    if image is not None and not inpaint:
        z0 = _encode(pipe, image, gens)
        x = ab0**0.5 * z0 + (1 - ab0) ** 0.5 * randn(template, gens)  # q(x_t | x_0) at the first kept point (eq. 4)
    else:
        x = randn(template, gens)
        if s.init_noise == "sigma":
            x = x * (1 - ab0) ** 0.5
    if inpaint:
        m = (mask >= 0.5).to(image.dtype)
        z_masked = _encode(pipe, image * (1 - m), gens)
        m_lat = F.interpolate(m, size=template.shape[2:])
        cond["concat"] = uncond["concat"] = torch.cat([m_lat, z_masked], dim=1)
    model = pipe.model_fn
    if s.guidance != 1.0:
        model = classifier_free_guidance(model, s.guidance, uncond, rescale=s.guidance_rescale)

    def bound(x_, t_):  # conditioning bound; integer model timesteps on Karras grids when round_model_t
        if s.round_model_t and t_.is_floating_point():
            t_ = t_.round().long()
        return model(x_, t_, **cond)

    takes_one = "set_alpha_to_one" in SAMPLER_OPTIONS[s.sampler] and s.set_alpha_to_one is not None
    one = {"set_alpha_to_one": s.set_alpha_to_one} if takes_one else {}
    opts = options_for(s.sampler, eta=s.eta, **one, extra=sampler_options)
    z = SAMPLERS[s.sampler](bound, x, ts, diffusion=d, generator=gens, clip_x0=s.clip_x0, **opts)
    if output == "latent":
        return z
    return pipe.decode(z)
