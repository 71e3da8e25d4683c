"""Scoring a model: sample it, run the feature network, compute the metrics and their floor; bits/dim.

    result = evaluate_samples(pipe, net, ref, metrics=["fid", "kid"], num=500)   # a JSON-able dict

Every figure comes with its floor: the same metric between two disjoint parts of the real reference
(``split_stats``), the second part as large as the sample set (or half the reference when that is
smaller), so that a model's FID can be read against what real data scores at that sample size. The class
accuracy's floor is the oracle's accuracy on held-out real images. Bits per dimension have no floor.

A latent model scored with an oracle's features also gets its first stage's ceiling: the floor recomputed with
each real image of its second part x replaced by the autoencoder's reconstruction D(E(x)), what a perfect model
of the latents would score (``dataset_ceiling``). Precision and recall are computed with the real set cut to
the sample count (``equal_size_precision_recall``): the k-NN radii then do not depend on the reference's size.

A text model of the shapes world is scored on held-out prompts instead (eval/prompted.py; eval/model_eval.py
chooses): prompt adherence, and the feature metrics against the real images of those prompts.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..errors import RequestError
from .ceiling import equal_size_precision_recall
from .evaluate import split_stats
from .features import _image_of, extract_stats, quantize_8bit
from .metrics import FeatureStats, class_accuracy, fid_from_stats, inception_score, kid
from .references import Reference, dataset_for

METRICS = ("adherence", "fid", "kid", "is", "pr", "bpd", "layout", "miou")
SPATIAL_METRICS = ("layout", "miou")  # layout-to-image and semantic synthesis (eval/spatial_scores.py), on their own
DEFAULT_METRICS = ("fid", "kid", "is", "pr")
PROMPT_METRICS = ("adherence", "fid", "kid", "pr")  # the default of a text model of the shapes world
FEATURE_METRICS = ("fid", "kid", "is", "pr")


def parse_metrics(text) -> list[str]:
    """"fid,kid" (or a list) -> ["fid", "kid"], in METRICS order; unknown or empty is a ValueError."""
    names = [m.strip().lower() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise RequestError(f"unknown metric(s) {', '.join(map(repr, unknown))}; expected a comma-separated "
                           f"list of {', '.join(METRICS)}")
    if not names:
        raise RequestError(f"no metric given; expected a comma-separated list of {', '.join(METRICS)}")
    return [m for m in METRICS if m in names]


def scores_prompts(pipe) -> bool:
    """Whether ``pipe`` is scored on held-out prompts of the shapes world: a text model trained on shapes."""
    return pipe.conditioning == "text" and pipe.config.data.name == "shapes"


def default_metrics(pipe) -> list[str]:
    """adherence, fid, kid, pr for a text model of the shapes world; layout for a layout model, miou for a
    segmentation-conditioned one; else fid, kid, is, pr."""
    if pipe.conditioning == "layout":
        return ["layout"]
    if "segmentation" in pipe.condition_fields:
        return ["miou"]
    return list(PROMPT_METRICS if scores_prompts(pipe) else DEFAULT_METRICS)


def check_metrics(pipe, metrics) -> None:
    """RequestError (before any work) for a metric this model does not have: adherence needs a text model
    trained on shapes (the shapes oracle reads its prompts back); bits/dim a model that is not text-conditioned."""
    spatial = [m for m in metrics if m in SPATIAL_METRICS]
    if spatial and len(spatial) != len(metrics):
        raise RequestError(f"{', '.join(spatial)} is scored on its own (held-out layouts or maps, read back); "
                           "give the other metrics in another call")
    if "layout" in metrics and (pipe.conditioning != "layout" or pipe.config.data.name != "shapes"):
        raise RequestError("the layout metric scores a layout model of the shapes world; this model is "
                           f"{pipe.conditioning or 'unconditional'}-conditioned on {pipe.config.data.name!r}")
    if "miou" in metrics and ("segmentation" not in pipe.condition_fields or pipe.config.data.name != "shapes"):
        raise RequestError("miou scores a model of the shapes world conditioned on segmentation maps; this model "
                           "takes no map")
    if "adherence" in metrics:
        kind = pipe.conditioning
        if kind != "text":
            what = "class-conditional (its oracle reports class accuracy)" if kind == "class" else "unconditional"
            raise RequestError(f"adherence scores how a text model follows its prompts; this model is {what}")
        if pipe.config.data.name != "shapes":
            raise RequestError(f"adherence needs the shapes oracle, which reads scenes of the shapes world only; this "
                               f"text model was trained on {pipe.config.data.name!r} data, not shapes (drop "
                               "adherence from --metrics)")
    if "bpd" in metrics and pipe.conditioning == "text":
        raise RequestError("bpd is computed here for unconditional and class-conditional models; this model is "
                           "text-conditioned (drop bpd from --metrics)")


def _progress(total, desc, unit, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, leave=False)


class CountedCalls:
    """A model_fn that counts its calls: one call is one network evaluation of a whole batch (a guided
    conditional/unconditional pair is one batched call)."""

    def __init__(self, model_fn):
        self.model_fn, self.calls = model_fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model_fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- samples

def sample_batches(pipe, num: int, *, sampler=None, steps=None, guidance=None, seed=None, batch_size=None,
                   progress: bool = False, record: dict | None = None, **options):
    """Yield (B, C, H, W) samples, ``batch_size`` at a time: image i from seed + i and, for a class-
    conditional model, class i mod num_classes. ``record`` (if given) receives labels (N,), seconds (of
    sampling alone) and nfe (network calls per image). None settings are the config's (Pipeline.sample_options)."""
    s = pipe.sample_options(num=num, sampler=sampler, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size)
    k = pipe.num_classes
    labels = None if k is None else np.arange(num) % k
    counted = CountedCalls(pipe.model_fn)
    rec = record if record is not None else {}
    rec.update(labels=labels, seconds=0.0, nfe=0.0)
    bar = _progress(num, f"sampling {s.sampler} x{s.steps}", "img", progress)
    batches = 0
    try:
        for start in range(0, num, s.batch_size):
            n = min(s.batch_size, num - start)
            t0 = time.perf_counter()
            x = pipe.sample(n, labels=None if k is None else labels[start:start + n].tolist(), sampler=s.sampler,
                            steps=s.steps, guidance=s.guidance, seed=s.seed + start, batch_size=n, output="tensor",
                            model_fn=counted, **options)
            rec["seconds"] += time.perf_counter() - t0
            batches += 1
            rec["nfe"] = counted.calls / batches
            if bar is not None:
                bar.update(n)
            yield x
    finally:
        if bar is not None:
            bar.close()


def sample_stats(pipe, net, num: int, *, device=None, progress: bool = False, **sampling):
    """(FeatureStats of ``num`` samples (all features kept), record) with record = labels, seconds, nfe."""
    record: dict = {}
    stats = extract_stats(net, sample_batches(pipe, num, progress=progress, record=record, **sampling),
                          device=device)
    return stats, record


# ---------------------------------------------------------------------------------------------- metrics

def feature_metrics(real: FeatureStats, fake: FeatureStats, metrics, *, fake_labels=None, pr_k: int = 3,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, is_splits: int = 10, seed: int = 0) -> dict:
    """The asked-for metrics of ``fake`` against ``real`` (what evaluate.compare computes, restricted):
    fid; kid_mean, kid_std; is_mean, is_std; precision, recall (k-NN manifolds, Kynkaanniemi et al. 2019, with
    the real rows cut at random (``seed``) to as many as ``fake`` has: pr_real, the real rows used); accuracy
    when ``fake_labels`` are given."""
    out = {"n_real": real.n, "n_fake": fake.n}
    need_feats = [m for m in ("kid", "pr") if m in metrics]
    if need_feats and (len(real.features) < 2 or len(fake.features) < 2):
        raise RequestError(f"{' and '.join(need_feats)} need the features themselves, and the reference keeps "
                           f"{len(real.features)}: recompute its statistics (a folder or dataset reference)")
    if "fid" in metrics:
        out["fid"] = fid_from_stats(real, fake)
    if "kid" in metrics:
        out["kid_mean"], out["kid_std"] = kid(real.features, fake.features, num_subsets=kid_subsets,
                                              subset_size=kid_subset_size, seed=seed)
    if "pr" in metrics:
        out["precision"], out["recall"] = equal_size_precision_recall(real.features, fake.features, k=pr_k,
                                                                      seed=seed)
        out["pr_real"] = min(len(real.features), len(fake.features))
    if "is" in metrics and fake.logits is not None and len(fake.logits):
        out["is_mean"], out["is_std"] = inception_score(logits=fake.logits,
                                                        splits=max(1, min(is_splits, len(fake.logits))))
    if fake_labels is not None and fake.logits is not None:
        out["accuracy"] = class_accuracy(fake.logits, fake_labels)
    return out


def floor_metrics(ref: FeatureStats, metrics, n: int, *, seed: int = 0) -> dict | None:
    """The metrics between two disjoint real parts: the second of min(n, half the kept reference) images, the
    first the rest. None when the reference keeps too few features to split."""
    total = len(ref.features)
    n = min(int(n), total // 2)
    if n < 2 or total - n < 2:
        return None
    rest, part = split_stats(ref, n, seed)
    return feature_metrics(rest, part, [m for m in metrics if m in FEATURE_METRICS], seed=seed)


@torch.no_grad()
def reconstructions(pipe, images: torch.Tensor, *, batch_size: int = 64, seed: int = 0) -> torch.Tensor:
    """D(E(x)) in [-1, 1] on the CPU through ``pipe``'s first stage, as its model saw the latents: a posterior
    sample (``seed``) when it trained on samples (latent.sample_posterior, KL), else the posterior mean."""
    from .reconstruction import reconstruct_timed

    ae = pipe.autoencoder
    sample = bool(pipe.config.latent.sample_posterior) and ae.config.regularizer == "kl"
    return reconstruct_timed(ae, images, batch_size=batch_size, sample=sample, seed=seed)[0]


def has_ceiling(pipe, net_info: dict | None) -> bool:
    """A first-stage ceiling is reported for latent models scored with an oracle's features (shapes, digits)."""
    return pipe.autoencoder is not None and str((net_info or {}).get("name", "")).startswith("oracle:")


def dataset_ceiling(pipe, net, ref: Reference, metrics, n: int, *, seed: int = 0, labels: bool = False,
                    batch_size: int = 64, device=None) -> dict | None:
    """The floor (``floor_metrics``) with its second part of real images x replaced by their reconstructions
    D(E(x)): the same rows of the reference (``split_stats``' permutation), scored against the same first part.
    It needs the reference's images (a dataset or folder; None for a statistics file). ``labels``: also the
    oracle's class accuracy on the reconstructions, against the images' own labels."""
    if ref.dataset is None:
        return None
    total = len(ref.stats.features)
    n = min(int(n), total // 2)
    if n < 2 or total - n < 2:
        return None
    rest, _ = split_stats(ref.stats, n, seed)
    part = np.random.default_rng(seed).permutation(total)[:n]  # the rows split_stats gives the second part
    items = [ref.dataset[int(i)] for i in part]
    rec = reconstructions(pipe, torch.stack([_image_of(it) for it in items]), batch_size=batch_size, seed=seed)
    fake = extract_stats(net, rec, batch_size=batch_size, device=device)
    y = np.array([it.get("label", -1) if isinstance(it, dict) else -1 for it in items])
    y = y if labels and (y >= 0).all() else None
    return feature_metrics(rest, fake, [m for m in metrics if m in FEATURE_METRICS], fake_labels=y, seed=seed)


def bits_per_dim(pipe, dataset, num: int, *, batch_size: int = 64, seed: int = 0, device=None,
                 progress: bool = False) -> dict:
    """The variational bound (DDPM eq. 5) in bits per dimension over the first ``num`` images of
    ``dataset`` (8-bit quantised): mean total, its standard error, and the prior L_T, the diffusion terms
    L_1..L_{T-1} and the decoder L_0 (mean over images; total = prior + diffusion + decoder)."""
    if getattr(pipe, "conditioning", None) == "text":
        raise RequestError("bits per dimension are computed here for unconditional and class-conditional models; "
                           "this model is text-conditioned")
    if getattr(pipe, "autoencoder", None) is not None:
        raise RequestError("bits per dimension are defined here for pixel-space models; this model diffuses in an "
                           "autoencoder's latent space (its bound is not a bound on image likelihood)")
    n = min(int(num), len(dataset))
    if n < 1:
        raise RequestError("bpd needs at least one real image")
    device = device or pipe.device
    gen = torch.Generator().manual_seed(seed)
    T, k = pipe.diffusion.num_steps, pipe.num_classes
    batches = math.ceil(n / batch_size)
    bar = _progress(batches * T, "bits/dim", "step", progress)
    parts = {"total": [], "prior": [], "decoder": [], "diffusion": []}
    clip = pipe.config.sample.clip_x0
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, n))]
        x0 = quantize_8bit(torch.stack([it["image"] for it in items])).to(device)
        cond = {}
        if k is not None:  # p(x | y) with the true class; the null class when the data has none
            cond["y"] = torch.tensor([it.get("label", k) for it in items], dtype=torch.long, device=device)
        r = pipe.diffusion.bits_per_dim(pipe.model_fn, x0, clip_x0=clip, generator=gen,
                                        progress=(lambda i, t: bar.update(1)) if bar is not None else None, **cond)
        parts["total"].append(r["total"].cpu())
        parts["prior"].append(r["prior"].cpu())
        parts["decoder"].append(r["terms"][:, 0].cpu())
        parts["diffusion"].append(r["terms"][:, 1:].sum(1).cpu())
    if bar is not None:
        bar.close()
    v = {name: torch.cat(p).double() for name, p in parts.items()}
    sem = float(v["total"].std() / math.sqrt(n)) if n > 1 else float("nan")
    return {"n": n, "total": float(v["total"].mean()), "total_sem": sem, "prior": float(v["prior"].mean()),
            "diffusion": float(v["diffusion"].mean()), "decoder": float(v["decoder"].mean()), "clip_x0": clip,
            "conditional": k is not None}


def bpd_dataset(pipe, split: str | None = None):
    """The model's data at ``split``, default its test split when the dataset has one (else the config's)."""
    from ..data import DATASETS

    entry = DATASETS.get(pipe.config.data.name)
    if split is None:
        split = "test" if entry is not None and "test" in entry.splits else None
    ds, section = dataset_for(pipe.config.data, split)
    return ds, section.split


# ---------------------------------------------------------------------------------------------- orchestration

def evaluate_samples(pipe, net, ref: Reference | None, *, metrics, num: int, sampler=None, steps=None,
                     guidance=None, seed=None, batch_size=None, device=None, progress: bool = False,
                     bpd_split: str | None = None, net_info: dict | None = None, ceiling: bool = True,
                     **options) -> dict:
    """Sample ``num`` images from ``pipe`` (class i mod K for a class model; a text model takes its config's
    prompts), score them against ``ref`` with ``net`` (feature metrics, their floor and, for a latent model with
    oracle features unless ``ceiling`` is False, the first stage's ceiling), and/or compute bits per dimension
    on real images; returns the result as a JSON-able dict. ``evaluate_model`` (eval/model_eval.py) calls this,
    or scores a text model of the shapes world on held-out prompts."""
    check_metrics(pipe, metrics)
    s = pipe.sample_options(sampler=sampler, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size)
    setting = {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance, "seed": s.seed,
               "batch_size": s.batch_size}
    setting.update(options)
    result = {"num": num, "metrics_asked": list(metrics), "sampling": setting, "features": net_info or {},
              "reference": ref.info if ref is not None else None}
    feats = [m for m in metrics if m in FEATURE_METRICS]
    if feats:
        if net is None or ref is None:
            raise RequestError("feature metrics need a feature network and a reference")
        fake, rec = sample_stats(pipe, net, num, device=device, progress=progress, **setting)
        # Class accuracy: an oracle with the model's classes judges whether each sample shows its class.
        is_oracle = "oracle_accuracy" in (net_info or {})
        labels = rec["labels"] if is_oracle and rec["labels"] is not None and net.num_classes == pipe.num_classes \
            else None
        result["model"] = feature_metrics(ref.stats, fake, feats, fake_labels=labels, seed=setting["seed"])
        result["floor"] = floor_metrics(ref.stats, feats, num, seed=setting["seed"])
        if result["floor"] is not None and labels is not None:
            result["floor"]["accuracy"] = (net_info or {}).get("oracle_accuracy")
        if ceiling and has_ceiling(pipe, net_info):
            result["ceiling"] = dataset_ceiling(pipe, net, ref, feats, num, seed=setting["seed"],
                                                labels=labels is not None, batch_size=setting["batch_size"],
                                                device=device)
        result["sample_seconds"], result["nfe"] = rec["seconds"], rec["nfe"]
    if "bpd" in metrics:
        ds, split = bpd_dataset(pipe, bpd_split)
        result["bpd"] = bits_per_dim(pipe, ds, num, batch_size=setting["batch_size"], seed=setting["seed"],
                                     device=device, progress=progress)
        result["bpd"]["split"] = split
    return result


def evaluate_folders(real: Reference, fake_dataset, net, *, metrics, batch_size: int = 64, device=None,
                     progress: bool = False, net_info: dict | None = None, seed: int = 0) -> dict:
    """The feature metrics of the images of ``fake_dataset`` against ``real``, with the floor."""
    if "bpd" in metrics or "adherence" in metrics:
        raise RequestError(f"{'bpd' if 'bpd' in metrics else 'adherence'} needs a model: it is not a metric "
                           "between two image sets")
    fake = extract_stats(net, fake_dataset, batch_size=batch_size, device=device, progress=progress)
    return {"num": fake.n, "metrics_asked": list(metrics), "features": net_info or {}, "reference": real.info,
            "fake": str(getattr(fake_dataset, "root", "")),
            "model": feature_metrics(real.stats, fake, metrics, seed=seed),
            "floor": floor_metrics(real.stats, metrics, fake.n, seed=seed)}
