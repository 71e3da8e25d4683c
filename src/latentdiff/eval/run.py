"""The glue behind `latentdiff eval`, `latentdiff oracle` and benchmarks/quality_vs_steps.py.

    net, info = feature_network("oracle", dataset_name="digits")          # or "inception" + fid_weights
    ref = load_reference(None, net, pipe=pipe)                             # the model's training data, cached
    result = evaluate_model(pipe, net, ref, metrics=["fid", "kid"], num=500)
    print(format_table(result)); write_json(default_json_path("runs/digits", result), result)

Every figure comes with its floor: the same metric between two disjoint parts of the real reference
(``split_stats``), the second part as large as the sample set (or half the reference when that is
smaller), so that a model's FID can be read against what real data scores at that sample size. The class
accuracy's floor is the oracle's accuracy on held-out real images. Bits per dimension have no floor.

Reference statistics are cached under ``cache_root()/fid_stats`` (``$LATENTDIFF_CACHE``, default
``~/.cache/latentdiff``), the digits oracle under ``cache_root()/oracles/digits``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.folder import folder_dataset
from ..devices import default_device  # noqa: F401  (re-exported: eval.run.default_device)
from ..errors import MissingFileError, RequestError
from ..fileio import atomic_write_text
from .evaluate import split_stats
from .features import extract_stats, quantize_8bit
from .metrics import FeatureStats, class_accuracy, fid_from_stats, inception_score, kid, precision_recall
from .stats_cache import cache_path, dataset_identity, files_fingerprint, load_stats, reference_stats

METRICS = ("fid", "kid", "is", "pr", "bpd")
DEFAULT_METRICS = ("fid", "kid", "is", "pr")
FEATURES = ("auto", "inception", "oracle")
CACHE_ENV = "LATENTDIFF_CACHE"


def cache_root(path=None) -> Path:
    """``path``, else ``$LATENTDIFF_CACHE``, else ``~/.cache/latentdiff``."""
    return Path(path or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "latentdiff").expanduser()


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


def _progress(total, desc, unit, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, leave=False)


# ---------------------------------------------------------------------------------------------- feature networks

def digits_oracle_cached(cache=None, *, device=None, epochs: int = 30, verbose: bool = True):
    """The digits oracle from ``cache_root(cache)/oracles/digits``, trained and saved there on first use."""
    from .oracle import CONFIG_FILE, digits_oracle

    folder = cache_root(cache) / "oracles" / "digits"
    if verbose and not (folder / CONFIG_FILE).is_file():
        print(f"training the digits oracle (first use) into {folder} ...", flush=True)
    return digits_oracle(folder, device=device, epochs=epochs, verbose=verbose)


def feature_network(features: str, *, fid_weights=None, oracle_path=None, dataset_name: str | None = None,
                    cache=None, device=None, verbose: bool = True):
    """(network, info) for ``features`` "inception" (needs the FID weights file: ``fid_weights`` or
    $LATENTDIFF_FID_WEIGHTS) or "oracle" (``oracle_path``, else the built-in digits oracle)."""
    if features == "inception":
        from ..nn.inception import load_fid_inception
        net = load_fid_inception(fid_weights, device=device)
        return net, {"name": "inception", "fingerprint": net.fingerprint()}
    if features != "oracle":
        raise RequestError(f"unknown features {features!r}; expected inception or oracle")
    if oracle_path is not None:
        net = load_any_oracle(oracle_path, device=device)
    elif dataset_name in (None, "digits"):
        net = digits_oracle_cached(cache, device=device, verbose=verbose)
    elif dataset_name == "shapes":
        net = shapes_oracle_cached(cache, device=device, verbose=verbose)
    else:
        raise RequestError(f"no built-in oracle for dataset {dataset_name!r} (there are for {', '.join(ORACLE_DATASETS)}); "
                         "pass an oracle folder (--oracle PATH) or use --features inception")
    name = getattr(net.config, "name", "shapes")
    acc = net.info.get("test_accuracy", (net.info.get("test") or {}).get("image_accuracy"))
    if verbose:
        shown = f"{acc:.2%}" if acc is not None else "unknown"
        print(f"oracle {name!r}: accuracy {shown} on held-out real images", flush=True)
    return net, {"name": f"oracle:{name}", "fingerprint": net.fingerprint(), "oracle_accuracy": acc}


ORACLE_DATASETS = ("digits", "shapes")


def load_any_oracle(path, device=None):
    """A digits-style Oracle or a ShapesOracle folder, told apart by the ``kind`` in its config.json."""
    from .oracle import CONFIG_FILE, load_oracle
    from .shapes_oracle import load_shapes_oracle

    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    try:
        kind = json.loads((folder / CONFIG_FILE).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None  # load_oracle names the missing or corrupt file
    return load_shapes_oracle(folder, device=device) if kind == "shapes-oracle" else load_oracle(folder, device=device)


def shapes_oracle_cached(cache=None, *, device=None, verbose: bool = True):
    """The shapes oracle from ``cache_root(cache)/oracles/shapes``, trained and saved there on first use."""
    from .shapes_oracle import CONFIG_FILE, load_shapes_oracle, train_shapes_oracle

    folder = cache_root(cache) / "oracles" / "shapes"
    if not (folder / CONFIG_FILE).is_file():
        if verbose:
            print(f"training the shapes oracle (first use, a few minutes) into {folder} ...", flush=True)
        train_shapes_oracle(folder, verbose=verbose)
    return load_shapes_oracle(folder, device=device)


def choose_features(features: str, *, data_name: str | None, reference, oracle_path) -> str:
    """Resolve "auto": for a .npz reference, the kind of network its statistics came from; else the oracle
    when one is given or the data is the digits; else Inception."""
    if features not in FEATURES:
        raise RequestError(f"unknown features {features!r}; expected one of {', '.join(FEATURES)}")
    if features != "auto":
        return features
    if reference is not None and str(reference).endswith(".npz") and Path(reference).is_file():
        network = str(load_stats(reference)[1].get("network", ""))
        if network:
            return "oracle" if network.startswith("oracle:") else "inception"
    if oracle_path is not None or data_name in ORACLE_DATASETS:
        return "oracle"
    return "inception"


# ---------------------------------------------------------------------------------------------- references

@dataclass
class Reference:
    stats: FeatureStats   # features (all kept) of the real images
    info: dict = field(default_factory=dict)  # kind (dataset | folder | stats), name, split, n, stats_file


def dataset_for(data_section, split: str | None):
    """The dataset of a config's data section at ``split`` (None: the section's own), with random crops and
    flips off: the reference images, as the model saw them."""
    from ..data import make_dataset

    section = dataclasses.replace(data_section, flip=False, crop="center",
                                  **({} if split is None else {"split": split}))
    return make_dataset(section), section


def _cached_reference(net, source, ident, *, kind, cache, max_items, batch_size, device, progress) -> Reference:
    cache_dir = cache_root(cache) / "fid_stats"
    stats = reference_stats(net, source, dataset_id=ident, cache_dir=cache_dir, max_items=max_items,
                            batch_size=batch_size, device=device, progress=progress)
    # The file reference_stats wrote or read (the same key it uses), to be reused as --reference FILE.
    path = cache_path(cache_dir, dict(ident, indices=None, max_items=max_items, max_kept=None), net.fingerprint())
    return Reference(stats, {"kind": kind, "name": ident["name"], "split": ident.get("split"), "n": stats.n,
                             "stats_file": str(path) if path.is_file() else None})


def load_reference(spec, net, *, pipe=None, split: str | None = None, size: int | None = None,
                   channels: int | None = None, cache=None, max_items: int | None = None, batch_size: int = 64,
                   device=None, progress: bool = False) -> Reference:
    """Reference statistics from ``spec``: None (the training data of ``pipe``'s config), a .npz statistics
    file (used as it is; it must come from the same feature network), an image folder, or a dataset name
    (data.DATASETS). Folders and datasets are cached by their identity and the network's."""
    from ..data import DATASETS

    if pipe is not None:
        size = pipe.config.data.size if size is None else size
        channels = pipe.config.data.channels if channels is None else channels
    if spec is None or (isinstance(spec, str) and spec in DATASETS and not Path(spec).exists()):
        if spec is None and pipe is None:
            raise RequestError("no reference: give a model, or a reference folder, statistics file or dataset")
        if pipe is not None and (spec is None or spec == pipe.config.data.name):
            section = pipe.config.data
        else:
            from ..config import DataSection
            section = DataSection(name=spec, size=size, channels=channels)
        try:
            ds, section = dataset_for(section, split)
        except FileNotFoundError as e:
            raise MissingFileError(f"{e} (the reference defaults to the model's training data; pass "
                                    "--reference FOLDER, STATS.npz or a dataset name)") from None
        ident = dataset_identity(section.name, len(ds), section.size, section.split,
                                 data=json.loads(json.dumps(dataclasses.asdict(section), default=str)))
        return _cached_reference(net, ds, ident, kind="dataset", cache=cache, max_items=max_items,
                                 batch_size=batch_size, device=device, progress=progress)
    path = Path(spec).expanduser()
    if not path.exists():
        raise MissingFileError(f"reference {str(spec)!r} not found: expected an image folder, a .npz statistics "
                                f"file or a dataset name ({', '.join(sorted(DATASETS))})")
    if path.is_dir():
        if channels is None:  # the oracle's channels; Inception takes RGB
            channels = getattr(getattr(net, "config", None), "in_channels", 3)
        ds = folder_dataset(path, size=size, channels=channels)
        ident = dataset_identity(f"folder:{path.resolve()}", len(ds), list(ds.size), None, channels=channels,
                                 files=files_fingerprint(ds.paths))
        return _cached_reference(net, ds, ident, kind="folder", cache=cache, max_items=max_items,
                                 batch_size=batch_size, device=device, progress=progress)
    if path.suffix != ".npz":
        raise RequestError(f"reference {path} is a file but not a .npz statistics file")
    stats, meta = load_stats(path)
    want = net.fingerprint()
    if meta.get("network") not in (None, want):
        raise RequestError(f"statistics file {path} was computed with another feature network "
                         f"({meta['network']}), not this one ({want})")
    if stats.dim != getattr(net, "feature_dim", stats.dim):
        raise RequestError(f"statistics file {path} has {stats.dim}-d features; the network gives {net.feature_dim}")
    ds_meta = meta.get("dataset", {})
    return Reference(stats, {"kind": "stats", "name": ds_meta.get("name", str(path)), "split": ds_meta.get("split"),
                             "n": stats.n, "stats_file": str(path)})


# ---------------------------------------------------------------------------------------------- samples

def sample_batches(pipe, num: int, *, sampler=None, steps=None, guidance=None, seed=None, batch_size=None,
                   progress: bool = False, record: dict | None = None, **options):
    """Yield (B, C, H, W) samples, ``batch_size`` at a time: image i from seed + i and, for a class-
    conditional model, class i mod num_classes. ``record`` (if given) receives labels (N,), seconds (of
    sampling alone) and nfe (network calls per image)."""
    s = pipe.config.sample
    batch_size = batch_size or s.batch_size
    seed = s.seed if seed is None else seed
    if num < 1 or batch_size < 1:
        raise RequestError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
    k = pipe.num_classes
    labels = None if k is None else np.arange(num) % k
    calls = [0]
    model_fn = pipe.model_fn

    def counted(*a, **kw):  # one call = one network evaluation of the whole batch (guided ones batched)
        calls[0] += 1
        return model_fn(*a, **kw)

    rec = record if record is not None else {}
    rec.update(labels=labels, seconds=0.0, nfe=0.0)
    bar = _progress(num, f"sampling {sampler or s.sampler} x{steps or s.steps}", "img", progress)
    batches = 0
    try:
        pipe.model_fn = counted  # instance attribute: Pipeline.sample calls self.model_fn
        for start in range(0, num, batch_size):
            n = min(batch_size, num - start)
            t0 = time.perf_counter()
            x = pipe.sample(n, labels=None if k is None else labels[start:start + n].tolist(), sampler=sampler,
                            steps=steps, guidance=guidance, seed=seed + start, batch_size=n, output="tensor",
                            **options)
            rec["seconds"] += time.perf_counter() - t0
            batches += 1
            rec["nfe"] = calls[0] / batches
            if bar is not None:
                bar.update(n)
            yield x
    finally:
        del pipe.model_fn
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
    fid; kid_mean, kid_std; is_mean, is_std; precision, recall; accuracy when ``fake_labels`` are given."""
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
        out["precision"], out["recall"] = precision_recall(real.features, fake.features, k=pr_k)
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
    return feature_metrics(rest, part, [m for m in metrics if m != "bpd"], seed=seed)


def bits_per_dim(pipe, dataset, num: int, *, batch_size: int = 64, seed: int = 0, device=None,
                 progress: bool = False) -> dict:
    """The variational bound (DDPM eq. 5) in bits per dimension over the first ``num`` images of
    ``dataset`` (8-bit quantised): mean total, its standard error, and the prior L_T, the diffusion terms
    L_1..L_{T-1} and the decoder L_0 (mean over images; total = prior + diffusion + decoder)."""
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

def evaluate_model(pipe, net, ref: Reference | None, *, metrics, num: int, sampler=None, steps=None,
                   guidance=None, seed=None, batch_size=None, device=None, progress: bool = False,
                   bpd_split: str | None = None, net_info: dict | None = None, **options) -> dict:
    """Sample ``num`` images from ``pipe``, score them against ``ref`` with ``net`` (feature metrics and
    their floor), and/or compute bits per dimension on real images; returns the result as a JSON-able dict."""
    s = pipe.config.sample
    setting = {"sampler": sampler or s.sampler, "steps": steps or s.steps,
               "guidance": s.guidance if guidance is None else guidance, "seed": s.seed if seed is None else seed,
               "batch_size": batch_size or s.batch_size}
    setting.update(options)
    result = {"num": num, "metrics_asked": list(metrics), "sampling": setting, "features": net_info or {},
              "reference": ref.info if ref is not None else None}
    feats = [m for m in metrics if m != "bpd"]
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
    if "bpd" in metrics:
        raise RequestError("bpd needs a model: it is not a metric between two image sets")
    fake = extract_stats(net, fake_dataset, batch_size=batch_size, device=device, progress=progress)
    return {"num": fake.n, "metrics_asked": list(metrics), "features": net_info or {}, "reference": real.info,
            "fake": str(getattr(fake_dataset, "root", "")),
            "model": feature_metrics(real.stats, fake, metrics, seed=seed),
            "floor": floor_metrics(real.stats, metrics, fake.n, seed=seed)}


# ---------------------------------------------------------------------------------------------- output

def _num(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"


def _sig2(v) -> str:
    """Two significant figures without exponent for ordinary magnitudes: 213.4 -> 210, 0.0456 -> 0.046."""
    return f"{float(f'{v:.2g}'):g}" if math.isfinite(v) else str(v)


def _pm(d, mean, std, scale=1.0) -> str:
    if not d or d.get(mean) is None:
        return "-"
    return f"{_num(d[mean] * scale)} ± {_sig2(d[std] * scale)}"


def table_rows(result: dict) -> list[tuple[str, str, str]]:
    """(metric, model, floor) text rows of a result."""
    m, f = result.get("model") or {}, result.get("floor") or {}
    rows = []
    if "fid" in m:
        rows.append(("FID", _num(m["fid"]), _num(f.get("fid"))))
    if "kid_mean" in m:
        rows.append(("KID x 1e3", _pm(m, "kid_mean", "kid_std", 1e3), _pm(f, "kid_mean", "kid_std", 1e3)))
    if "is_mean" in m:
        rows.append(("IS", _pm(m, "is_mean", "is_std"), _pm(f, "is_mean", "is_std")))
    if "precision" in m:
        rows.append(("precision", _num(m["precision"], 3), _num(f.get("precision"), 3)))
        rows.append(("recall", _num(m["recall"], 3), _num(f.get("recall"), 3)))
    if "accuracy" in m:
        rows.append(("class accuracy", _num(m["accuracy"], 3), _num(f.get("accuracy"), 3)))
    b = result.get("bpd")
    if b:
        rows.append(("bits/dim", f"{b['total']:.4f} ± {_sig2(b['total_sem'])}", "-"))
        rows.append(("  prior L_T", f"{b['prior']:.4f}", "-"))
        rows.append(("  diffusion L_1..L_T-1", f"{b['diffusion']:.4f}", "-"))
        rows.append(("  decoder L_0", f"{b['decoder']:.4f}", "-"))
    return rows


def format_table(result: dict) -> str:
    """The result as an aligned text table, with a heading line and notes on the floor."""
    head = []
    s, ref = result.get("sampling"), result.get("reference") or {}
    if s and result.get("model"):
        head.append(f"{result['num']} samples: {s['sampler']}, {s['steps']} steps, guidance {s['guidance']:g}, "
                    f"seed {s['seed']}; {result.get('sample_seconds', 0):.1f} s sampling, "
                    f"{result.get('nfe', 0):.0f} network calls per image")
    elif "fake" in result:
        head.append(f"{result['num']} images from {result['fake']}")
    if ref:
        split = f" ({ref['split']})" if ref.get("split") else ""
        head.append(f"reference: {ref['name']}{split}, {ref['n']} images; features: "
                    f"{(result.get('features') or {}).get('name', '?')}")
    f = result.get("floor")
    floor_name = (f"real floor ({f['n_fake']} vs {f['n_real']})" if f else "real floor")
    rows = [("metric", "model", floor_name)] + table_rows(result)
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = head + [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    lines.insert(len(head) + 1, "-" * (w0 + w1 + len(floor_name) + 4))
    notes = []
    if result.get("model") and f is None:
        notes.append("no floor: the reference keeps too few features to split in two")
    if f and "accuracy" in f:
        notes.append("the accuracy floor is the oracle's accuracy on held-out real images")
    if result.get("bpd"):
        b = result["bpd"]
        notes.append(f"bits/dim over {b['n']} real {b['split']} images"
                     f"{' given their class' if b['conditional'] else ''} (uniform 8-bit coding: 8)")
    return "\n".join(lines + [f"note: {n}" for n in notes])


def default_json_path(model_dir, result: dict) -> Path:
    """model_dir/eval/eval_<sampler>_<steps>_g<guidance>_<features>.json (eval_bpd.json for bpd alone)."""
    s = result.get("sampling") or {}
    if not result.get("model"):
        name = "eval_bpd.json"
    else:
        feats = (result.get("features") or {}).get("name", "features").replace(":", "-")
        name = f"eval_{s['sampler']}_{s['steps']}_g{s['guidance']:g}_{feats}.json"
    return Path(model_dir) / "eval" / name


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return o


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically (temporary file in the same folder, then rename)."""
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")
