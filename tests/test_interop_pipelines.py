"""Whole pipelines against diffusers: tiny random Stable Diffusion folders (SD1 ε, SD2 v-prediction with linear
projections, the 9-channel inpainting U-Net; every vector parameter randomised) give the same latents through
latentdiff as through diffusers' StableDiffusionPipeline, Img2Img and Inpaint pipelines, for each scheduler, within
1e-4 relative (float32, CPU): the same seeds, prompts, negative prompt, guidance and steps."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import latentdiff  # noqa: E402
from latentdiff.interop.editing import generate  # noqa: E402
from latentdiff.interop.schedulers import from_scheduler_config  # noqa: E402

from helpers.tiny_sd import build  # noqa: E402

SCHEDULERS = {
    "ddim": {"_class_name": "DDIMScheduler", "clip_sample": False},
    "pndm": {"_class_name": "PNDMScheduler", "skip_prk_steps": True},
    "euler": {"_class_name": "EulerDiscreteScheduler"},
    "euler_karras": {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing",
                     "use_karras_sigmas": True},
    "euler_ancestral": {"_class_name": "EulerAncestralDiscreteScheduler"},
    "dpmpp_2m_karras": {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True},
    "unipc": {"_class_name": "UniPCMultistepScheduler"},
}
PROMPTS = ["a red circle", "a square on"]
STEPS, GUIDANCE, SEED = 5, 3.0, 5
CLASSES = {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
           "inpaint": "StableDiffusionInpaintPipeline"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {layout: build(root / layout, layout) for layout in ("sd1", "sd2", "inpaint")}


@pytest.fixture(scope="module")
def loaded(folders):
    """Per layout: (latentdiff's Pipeline, diffusers' pipeline of that folder), each loaded once."""
    out = {}
    for layout, folder in folders.items():
        cls = CLASSES["inpaint" if layout == "inpaint" else "txt2img"]
        theirs = getattr(diffusers, cls).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        theirs.set_progress_bar_config(disable=True)
        out[layout] = (latentdiff.load(folder), theirs, dict(theirs.scheduler.config))  # the folder's scheduler
    return out


def _inputs():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 4:20] = 1
    return image, mask


def run_both(pipe, base, base_config: dict, mode: str, scheduler: dict):
    """(latentdiff's final latents, diffusers') for one pipeline and scheduler (``scheduler`` changes
    ``base_config``, the folder's: DDIM, leading spacing, offset 1, set_alpha_to_one false)."""
    theirs_pipe = getattr(diffusers, CLASSES[mode])(**base.components) if mode == "img2img" else base
    theirs_pipe.set_progress_bar_config(disable=True)
    theirs_pipe.scheduler = getattr(diffusers, scheduler["_class_name"]).from_config({**base_config, **scheduler})
    image, mask = _inputs()
    extra = {"img2img": dict(image=image, strength=0.6), "inpaint": dict(image=image, mask_image=mask, height=32,
                                                                          width=32), "txt2img": {}}[mode]
    gens = [torch.Generator().manual_seed(SEED + i) for i in range(2)]
    theirs = theirs_pipe(PROMPTS, negative_prompt=["red"] * 2, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                         generator=gens, output_type="latent", **extra).images
    _, sample, sampler_options = from_scheduler_config(dict(theirs_pipe.scheduler.config))
    ours_extra = {"img2img": dict(image=image, strength=0.6), "inpaint": dict(image=image, mask=mask),
                  "txt2img": {}}[mode]
    ours = generate(pipe, PROMPTS, negative_prompt="red", steps=STEPS, guidance=GUIDANCE, seed=SEED,
                    output="latent", sampler_options=sampler_options or None, **sample, **ours_extra)
    return ours, theirs


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = [("sd1", "txt2img", s) for s in SCHEDULERS] + [("sd2", "txt2img", s) for s in ("ddim", "pndm", "euler")]
CASES += [("sd1", "img2img", s) for s in SCHEDULERS if s != "pndm"]  # diffusers' PNDM img2img: docs/interop.md
CASES += [("inpaint", "inpaint", s) for s in SCHEDULERS]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("layout,mode,scheduler", CASES)
def test_pipeline_matches_diffusers(loaded, layout, mode, scheduler):
    ours, theirs = run_both(*loaded[layout], mode, SCHEDULERS[scheduler])
    err = rel(ours, theirs)
    print(f"{layout} {mode} {scheduler}: worst relative difference {err:.2e}")
    assert err < 1e-4


@pytest.mark.slow
def test_pipeline_sample_road_matches_diffusers(folders):
    """The Pipeline.sample road (what `latentdiff sample FOLDER` runs) with the imported scheduler's defaults."""
    folder = folders["sd1"]
    base = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    base.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(SEED + i) for i in range(2)]
    theirs = base(PROMPTS, negative_prompt=["red"] * 2, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  generator=gens, output_type="latent").images
    pipe = latentdiff.load(folder)
    assert pipe.config.sample.sampler == "ddim" and pipe.config.sample.offset == 1
    ours = pipe.sample(2, prompts=PROMPTS, negative_prompt="red", steps=STEPS, guidance=GUIDANCE, seed=SEED,
                       output="latent")
    assert rel(ours, theirs) < 1e-4
    images = pipe.sample(2, prompts=PROMPTS, steps=2, seed=SEED, output="tensor")
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    # The conditioning matters: another prompt changes the latents.
    other = pipe.sample(2, prompts=["a circle"] * 2, negative_prompt="red", steps=STEPS, guidance=GUIDANCE,
                        seed=SEED, output="latent")
    assert rel(other, theirs) > 1e-3


def test_generate_refuses_inputs_that_do_not_fit(loaded):
    from latentdiff.errors import RequestError

    image, mask = _inputs()
    sd1, inpaint = loaded["sd1"][0], loaded["inpaint"][0]  # latentdiff's pipelines
    for pipe, kwargs, message in [
        (sd1, dict(image=image, mask=mask), "9-channel U-Net"),
        (inpaint, dict(image=image), "9-channel U-Net"),
        (sd1, dict(strength=0.5), "needs an image"),
        (inpaint, dict(image=image, mask=mask, strength=0.5), "inpainting runs at strength 1"),
        (sd1, dict(image=image[:1]), "expected one per prompt"),
        (sd1, dict(image=image, strength=0.1), "keeps no step"),
        (sd1, dict(bogus=1), "unknown option"),
    ]:
        with pytest.raises(RequestError, match=message):
            generate(pipe, PROMPTS, steps=STEPS, **kwargs)


def test_a_scheduler_convention_binds_its_own_sampler_only(loaded):
    """An Euler folder (x_T = σ_max·ε on trailing grids) sampled with DDIM starts from unit noise, as diffusers'
    DDIMScheduler.from_config(euler_config) does."""
    import dataclasses

    ours, base, base_config = loaded["sd1"]
    euler = {**base_config, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing", "steps_offset": 0}
    _, sample, _ = from_scheduler_config(euler)
    assert sample["init_noise"] == "sigma"
    original = ours.config
    ours.config = dataclasses.replace(original, sample=dataclasses.replace(original.sample, **sample))  # as imported
    try:
        base.scheduler = diffusers.DDIMScheduler.from_config(euler)
        gens = [torch.Generator().manual_seed(SEED + i) for i in range(2)]
        theirs = base(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=gens,
                      output_type="latent").images
        got = ours.sample(2, prompts=PROMPTS, sampler="ddim", steps=STEPS, guidance=GUIDANCE, seed=SEED,
                          output="latent", set_alpha_to_one=base.scheduler.config.set_alpha_to_one)
        assert rel(got, theirs) < 1e-4
    finally:
        ours.config = original
