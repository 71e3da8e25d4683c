"""A text model of the shapes world scored on held-out prompts (issue 12, "Prompt adherence as a metric").

    result = evaluate_prompts(pipe, net, oracle, metrics=["adherence", "fid", "pr"], num=300)

The prompts are ``num`` scenes of the *test* split of the model's own shapes world (``heldout_cases``: its
``data.options``, so ``split_by: composition`` makes them compositions never seen in training), shared evenly
by object count. Image i is drawn from prompt i with seed + i.

- adherence (eval/adherence.py): the shapes oracle reads each image back; it passes only if every object of
  the prompt is there (shape, colour, cell) and no other. Per tag ("one object", ...) and overall, beside the
  oracle's score on the real images of the same prompts.
- FID / KID / precision / recall on the feature network (the oracle's features by default): the samples
  against the real images of their prompts, beside the floor: the same prompts drawn again with other sizes and
  positions in their cells (``rerendered``, seed + 1) against the same real images. Sets of equal size, so precision and
  recall compare like with like (Kynkaanniemi et al. 2019). With ``ref`` (``--reference``) the samples are
  scored against it instead, and the floor splits it (as for other models).
- for a latent model, the first stage's ceiling: each real set that plays the samples in a floor, replaced by
  its reconstructions D(E(x)): adherence of the reconstructed real images of the prompts, and the feature
  metrics of the reconstructed second set (with oracle features). A perfect model of the latents scores this.
"""

from __future__ import annotations

import time

import torch

from ..errors import RequestError
from .adherence import adherence_report, evaluate_adherence, heldout_prompts, real_images, rerendered, score
from .features import extract_stats
from .references import Reference
from .scoring import (
    FEATURE_METRICS,
    CountedCalls,
    _progress,
    dataset_ceiling,
    feature_metrics,
    floor_metrics,
    has_ceiling,
    reconstructions,
)


def world_options(pipe) -> dict:
    """The ShapesConfig fields of the model's training world (its ``data.options`` without ``length``)."""
    return {k: v for k, v in dict(pipe.config.data.options or {}).items() if k != "length"}


def heldout_cases(pipe, num: int, seed: int = 0) -> tuple[list, list]:
    """(cases, others): ``num`` held-out prompts of the model's world (test-split scenes of world seed ``seed``)
    and the same prompts drawn again with other sizes and positions in their cells (``rerendered``, seed + 1),
    whose real images are the floor: two real images of one prompt."""
    opts = {"size": pipe.config.data.size, "unique": False, **world_options(pipe)}
    try:
        cases = heldout_prompts(num, seed=seed, **opts)
        return cases, rerendered(cases, seed=seed + 1)
    except (TypeError, ValueError) as e:  # an option the shapes world does not know, a bad count
        raise RequestError(f"held-out prompts of the model's world (data.options {world_options(pipe)}): {e}") from None


class PromptSampler:
    """``generate(prompts, seeds)`` for evaluate_adherence: the samples of ``prompts`` (image j with seeds[0] + j,
    one batch), in [-1, 1] on the CPU, kept in ``images``; counts sampling seconds and network calls."""

    def __init__(self, pipe, *, progress: bool = False, total: int | None = None, **sampling):
        self.pipe, self.sampling, self.batches, self.seconds = pipe, sampling, [], 0.0
        self.counted = CountedCalls(pipe.model_fn)
        self.bar = _progress(total, f"sampling {sampling.get('sampler')} x{sampling.get('steps')}", "img", progress)

    def __call__(self, prompts, seeds):
        t0 = time.perf_counter()
        x = self.pipe.sample(len(prompts), prompts=list(prompts), seed=seeds[0], batch_size=len(prompts),
                             output="tensor", model_fn=self.counted, **self.sampling)
        self.seconds += time.perf_counter() - t0
        self.batches.append(x)
        if self.bar is not None:
            self.bar.update(len(prompts))
        return x

    @property
    def images(self) -> torch.Tensor:
        return torch.cat(self.batches)

    @property
    def nfe(self) -> float:
        """Network calls per image (one call evaluates a whole batch, a guided pair included)."""
        return self.counted.calls / max(1, len(self.batches))

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _real_info(pipe, num: int) -> dict:
    world = world_options(pipe)
    return {"kind": "heldout-prompts", "name": "real images of the held-out prompts", "split": "test", "n": num,
            "split_by": world.get("split_by", "layout")}


def evaluate_prompts(pipe, net, oracle, *, metrics, num: int, ref: Reference | None = None, sampler=None,
                     steps=None, guidance=None, seed=None, batch_size=None, device=None, progress: bool = False,
                     net_info: dict | None = None, ceiling: bool = True, **options) -> dict:
    """Sample one image per held-out prompt and score it (see the module docstring); a JSON-able dict with
    num, metrics_asked, sampling, features, reference, prompts, adherence {model, real, ceiling, cases}, model,
    floor, ceiling (feature metrics), sample_seconds, nfe."""
    feats = [m for m in metrics if m in FEATURE_METRICS]
    if "adherence" in metrics and oracle is None:
        raise RequestError("adherence needs the shapes oracle (pass oracle=)")
    if feats and net is None:
        raise RequestError("feature metrics need a feature network")
    s = pipe.sample_options(sampler=sampler, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size,
                            prompts=[""])  # the prompts are the held-out ones; "" only lets the check pass
    setting = {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance, "seed": s.seed,
               "batch_size": s.batch_size, **options}
    cases, others = heldout_cases(pipe, num, s.seed)
    try:  # every prompt fits the model's context, checked before any sampling
        pipe.conditioner.tokenizer.encode([c.prompt for c in cases])
    except ValueError as e:
        raise RequestError(f"a held-out prompt of the model's world does not fit its text encoder: {e} (its context "
                           "length is the longest training caption's unless conditioning.context_length sets it)"
                           ) from None
    counts = {}
    for c in cases:
        counts[c.tag] = counts.get(c.tag, 0) + 1
    result = {"num": num, "metrics_asked": list(metrics), "sampling": setting, "features": net_info or {},
              "reference": ref.info if ref is not None else _real_info(pipe, num),
              "prompts": {"source": "shapes test split", "split_by": world_options(pipe).get("split_by", "layout"),
                          "seed": s.seed, "floor_seed": s.seed + 1, "counts": counts}}
    draw = {k: v for k, v in setting.items() if k not in ("seed", "batch_size")}
    generate = PromptSampler(pipe, progress=progress, total=num, **draw)
    latent = ceiling and pipe.autoencoder is not None
    real_x = real_images(cases)
    try:
        if "adherence" in metrics:
            adh = evaluate_adherence(generate, oracle, cases, batch_size=s.batch_size, seed=s.seed)
            if latent:
                rec = reconstructions(pipe, real_x, batch_size=s.batch_size, seed=s.seed)
                adh["ceiling"] = adherence_report(score(oracle, rec, torch.stack([c.cells for c in cases])), cases)
            result["adherence"] = {"model": adh["model"], "real": adh["real"], "ceiling": adh.get("ceiling"),
                                   "cases": adh["cases"]}
        else:
            for start in range(0, num, s.batch_size):
                n = min(s.batch_size, num - start)
                generate([c.prompt for c in cases[start:start + n]], list(range(s.seed + start, s.seed + start + n)))
    finally:
        generate.close()
    if feats:
        result.update(_feature_scores(pipe, net, ref, feats, generate.images, real_x, others, num=num,
                                      latent=latent, net_info=net_info, seed=s.seed, batch_size=s.batch_size,
                                      device=device))
    result["sample_seconds"], result["nfe"] = generate.seconds, generate.nfe
    return result


def _feature_scores(pipe, net, ref: Reference | None, feats, images, real_x, others, *, num: int, latent: bool,
                    net_info: dict | None, seed: int, batch_size: int, device) -> dict:
    """model, floor and (latent models, where the features allow) ceiling of the feature metrics ``feats``:
    against the real images of the held-out prompts ``real_x`` (floor: those of ``others``), or against ``ref``."""
    kw = {"batch_size": batch_size, "device": device}
    fake = extract_stats(net, images, **kw)
    result = {}
    if ref is None:
        real, other_x = extract_stats(net, real_x, **kw), real_images(others)
        result["model"] = feature_metrics(real, fake, feats, seed=seed)
        result["floor"] = feature_metrics(real, extract_stats(net, other_x, **kw), feats, seed=seed)
        if latent and has_ceiling(pipe, net_info):
            rec = reconstructions(pipe, other_x, batch_size=batch_size, seed=seed + 1)
            result["ceiling"] = feature_metrics(real, extract_stats(net, rec, **kw), feats, seed=seed)
    else:
        result["model"] = feature_metrics(ref.stats, fake, feats, seed=seed)
        result["floor"] = floor_metrics(ref.stats, feats, num, seed=seed)
        if latent and has_ceiling(pipe, net_info):
            result["ceiling"] = dataset_ceiling(pipe, net, ref, feats, num, seed=seed,
                                                batch_size=batch_size, device=device)
    return result
