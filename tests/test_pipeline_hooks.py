"""What `latentdiff serve` needs from ``Pipeline.sample``: one seed per sample (batched requests keep their
images), a step callback (progress, x̂_0 previews, cancellation), and image-to-image / training-free inpainting
(RePaint) from pixel-space inputs, encoded by the first stage for latent models."""

import math

import pytest
import torch

import latentdiff
from latentdiff.errors import RequestError
from latentdiff.sample_inputs import edit_options

from helpers.serve_models import latent_text_model, text_model

PROMPT = ["a red circle at the top left"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("hooks")
    return latentdiff.load(text_model(root / "text")), latentdiff.load(latent_text_model(root / "latent"))


def test_one_seed_per_sample_gives_each_sample_its_own_image(pipes):
    pipe = pipes[0]
    batched = pipe.sample(3, prompts=PROMPT, seed=[5, 9, 2], output="tensor")
    for row, seed in zip(batched, [5, 9, 2]):
        assert torch.allclose(row, pipe.sample(1, prompts=PROMPT, seed=seed, output="tensor")[0], atol=1e-5)
    assert torch.equal(pipe.sample(2, prompts=PROMPT, seed=[4, 5], output="tensor"),
                       pipe.sample(2, prompts=PROMPT, seed=4, output="tensor"))
    with pytest.raises(RequestError, match="got 2 seeds for 3 samples"):
        pipe.sample(3, prompts=PROMPT, seed=[1, 2])


def test_the_callback_sees_every_step_of_every_batch_and_can_stop_it(pipes):
    pipe, calls = pipes[0], []
    pipe.sample(3, prompts=PROMPT, steps=4, batch_size=2, output="tensor",
                callback=lambda start, i, t, x, x0: calls.append((start, i, tuple(x0.shape))))
    assert calls == [(0, i, (2, 3, 16, 16)) for i in range(4)] + [(2, i, (1, 3, 16, 16)) for i in range(4)]

    class Stop(Exception):
        pass

    def stop(start, i, t, x, x0):
        if i == 1:
            raise Stop

    with pytest.raises(Stop):
        pipe.sample(1, prompts=PROMPT, steps=4, callback=stop)


def counting(pipe):
    calls = []

    def fn(x, t, **cond):
        calls.append(1)
        return pipe.model_fn(x, t, **cond)

    return fn, calls


def test_image_to_image_runs_the_strength_share_of_the_grid(pipes):
    for pipe in pipes:
        image = torch.rand(1, 3, 16, 16) * 2 - 1
        fn, calls = counting(pipe)
        out = pipe.sample(2, prompts=PROMPT, guidance=1.0, steps=10, init_image=image, strength=0.35, model_fn=fn,
                          output="tensor")
        assert out.shape == (2, 3, 16, 16) and len(calls) == math.ceil(0.35 * 10)


def test_training_free_inpainting_keeps_the_unmasked_pixels(pipes):
    pixel, latent = pipes
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    fill = torch.zeros(1, 1, 16, 16)
    fill[..., 4:12, 2:9] = 1.0
    out = pixel.sample(2, prompts=PROMPT, seed=0, init_image=image, mask=fill, output="tensor")
    keep = fill.expand_as(out) == 0
    assert torch.allclose(out[keep], image.expand_as(out)[keep]) and not torch.allclose(out[~keep], image.expand_as(
        out)[~keep], atol=1e-3)
    # a latent model: one filled pixel makes its whole 4x4 latent cell generated; the others keep ℰ(image)
    fill = torch.zeros(1, 1, 16, 16)
    fill[..., 5, 6] = 1.0
    opts = edit_options(latent, image, None, fill, 0, 1, seed=0)
    expected = torch.ones(1, 1, 4, 4)
    expected[..., 1, 1] = 0.0
    assert torch.equal(opts["mask"], expected) and opts["known"].shape == (1, 4, 4, 4) and "init_image" not in opts
    assert latent.sample(1, prompts=PROMPT, init_image=image, mask=fill, output="tensor").shape == (1, 3, 16, 16)


@pytest.mark.parametrize("kwargs, message", [
    ({"mask": torch.zeros(1, 1, 16, 16)}, "give init_image"),
    ({"init_image": torch.zeros(1, 3, 16, 16)}, "needs a strength"),
    ({"init_image": torch.zeros(1, 3, 16, 16), "strength": 0.0}, r"strength must lie in \(0, 1\]"),
    ({"init_image": torch.zeros(1, 1, 16, 16), "strength": 0.5}, r"init_image must be a \(N or 1, 3, H, W\)"),
    ({"init_image": torch.zeros(1, 3, 16, 16), "mask": torch.zeros(1, 1, 8, 8)}, r"mask must be a float"),
    ({"init_image": torch.zeros(1, 3, 16, 16), "mask": torch.full((1, 1, 16, 16), 2.0)}, r"in \[0, 1\]"),
    ({"init_image": torch.zeros(1, 3, 16, 16), "strength": 0.5, "size": (32, 32)}, "init_image is 16x16"),
])
def test_bad_editing_inputs_are_request_errors(pipes, kwargs, message):
    with pytest.raises(RequestError, match=message):
        pipes[0].sample(1, prompts=PROMPT, **kwargs)
