"""The result of an evaluation as a text table (each figure beside its real floor) and as a JSON file.

    print(format_table(result)); write_json(default_json_path("runs/digits", result), result)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..fileio import atomic_write_text


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


def _rate(entry) -> str:
    return "-" if not entry else f"{entry['rate']:.1%} ({entry['passed']}/{entry['count']})"


def adherence_rows(adherence: dict | None) -> list[tuple[str, str, str, str]]:
    """(metric, model, real images, first-stage ceiling) per tag and overall of an adherence result."""
    if not adherence:
        return []
    m, r, c = adherence.get("model") or {}, adherence.get("real") or {}, adherence.get("ceiling") or {}
    tags = [t for t in m if t != "overall"] + ["overall"]
    return [(f"adherence: {t}", _rate(m.get(t)), _rate(r.get(t)), _rate(c.get(t))) for t in tags]


def table_rows(result: dict) -> list[tuple[str, str, str, str]]:
    """(metric, model, floor, first-stage ceiling) text rows of a result ("-" where a column has no figure)."""
    m, f, c = result.get("model") or {}, result.get("floor") or {}, result.get("ceiling") or {}
    rows = adherence_rows(result.get("adherence"))
    if "fid" in m:
        rows.append(("FID", _num(m["fid"]), _num(f.get("fid")), _num(c.get("fid"))))
    if "kid_mean" in m:
        rows.append(("KID x 1e3", _pm(m, "kid_mean", "kid_std", 1e3), _pm(f, "kid_mean", "kid_std", 1e3),
                     _pm(c, "kid_mean", "kid_std", 1e3)))
    if "is_mean" in m:
        rows.append(("IS", _pm(m, "is_mean", "is_std"), _pm(f, "is_mean", "is_std"), _pm(c, "is_mean", "is_std")))
    if "precision" in m:
        rows.append(("precision", _num(m["precision"], 3), _num(f.get("precision"), 3), _num(c.get("precision"), 3)))
        rows.append(("recall", _num(m["recall"], 3), _num(f.get("recall"), 3), _num(c.get("recall"), 3)))
    if "accuracy" in m:
        rows.append(("class accuracy", _num(m["accuracy"], 3), _num(f.get("accuracy"), 3),
                     _num(c.get("accuracy"), 3)))
    b = result.get("bpd")
    if b:
        rows.append(("bits/dim", f"{b['total']:.4f} ± {_sig2(b['total_sem'])}", "-", "-"))
        rows.append(("  prior L_T", f"{b['prior']:.4f}", "-", "-"))
        rows.append(("  diffusion L_1..L_T-1", f"{b['diffusion']:.4f}", "-", "-"))
        rows.append(("  decoder L_0", f"{b['decoder']:.4f}", "-", "-"))
    return rows


def has_ceiling_column(result: dict) -> bool:
    return bool(result.get("ceiling") or (result.get("adherence") or {}).get("ceiling"))


def _head(result: dict) -> list[str]:
    head = []
    s, ref = result.get("sampling"), result.get("reference") or {}
    if s and (result.get("model") or result.get("adherence")):
        head.append(f"{result['num']} samples: {s['sampler']}, {s['steps']} steps, guidance {s['guidance']:g}, "
                    f"seed {s['seed']}; {result.get('sample_seconds', 0):.1f} s sampling, "
                    f"{result.get('nfe', 0):.0f} network calls per image")
    elif "fake" in result:
        head.append(f"{result['num']} images from {result['fake']}")
    p = result.get("prompts")
    if p:
        counts = ", ".join(f"{n} {tag}" for tag, n in p["counts"].items())
        head.append(f"prompts: held-out scenes of the shapes test split (split by {p['split_by']}, world seed "
                    f"{p['seed']}): {counts}")
    if ref:
        split = f" ({ref['split']})" if ref.get("split") else ""
        head.append(f"reference: {ref['name']}{split}, {ref['n']} images; features: "
                    f"{(result.get('features') or {}).get('name', '?')}")
    return head


def _notes(result: dict) -> list[str]:
    f, notes = result.get("floor"), []
    if result.get("model") and f is None:
        notes.append("no floor: the reference keeps too few features to split in two")
    if result.get("adherence"):
        notes.append("adherence: an image passes when the shapes oracle reads back exactly the prompt's objects "
                     "(shape, colour and cell of each, no other); its floor column is the oracle's score on the "
                     "real images of the same prompts")
    if result.get("prompts") and f and (result.get("reference") or {}).get("kind") == "heldout-prompts":
        notes.append(f"FID / KID / precision / recall: the samples against the real images of their prompts; the "
                     f"floor: {f['n_fake']} real images of the same prompts drawn again (other sizes and positions "
                     "in their cells) against them")
    if f and "accuracy" in f:
        notes.append("the accuracy floor is the oracle's accuracy on held-out real images")
    if (result.get("model") or {}).get("precision") is not None:
        m = result["model"]
        notes.append(f"precision / recall: k = 3 nearest neighbours, the real set cut at random to "
                     f"{m.get('pr_real', m['n_fake'])} rows, as many as the samples (Kynkaanniemi et al. 2019)")
    if has_ceiling_column(result):
        notes.append("first-stage ceiling: each floor recomputed with its real images x (those in the place of the "
                     "samples) replaced by the autoencoder's reconstructions D(E(x)): what a perfect model of the "
                     "latents would score")
    elif "ceiling" in result and result.get("model"):
        notes.append("no first-stage ceiling: the reference is a statistics file and keeps no images to reconstruct")
    if result.get("bpd"):
        b = result["bpd"]
        notes.append(f"bits/dim over {b['n']} real {b['split']} images"
                     f"{' given their class' if b['conditional'] else ''} (uniform 8-bit coding: 8)")
    return notes


def format_table(result: dict) -> str:
    """The result as an aligned text table: metric | model | real floor [| first-stage ceiling], with a heading
    (sampling, prompts, reference) and notes on how to read the columns."""
    head, f = _head(result), result.get("floor")
    if f:
        floor_name = f"real floor ({f['n_fake']} vs {f['n_real']})"
    else:
        floor_name = "real images" if result.get("adherence") else "real floor"
    ceiling = has_ceiling_column(result)
    rows = [("metric", "model", floor_name, "first-stage ceiling")] + table_rows(result)
    if not ceiling:
        rows = [r[:3] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(f"{v:<{w}}" if i == 0 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "-" * (sum(widths) + 2 * (len(widths) - 1)))
    return "\n".join(head + lines + [f"note: {n}" for n in _notes(result)])


def default_json_path(model_dir, result: dict) -> Path:
    """model_dir/eval/eval_<sampler>_<steps>_g<guidance>_<features>.json (eval_bpd.json for bpd alone)."""
    s = result.get("sampling") or {}
    if not (result.get("model") or result.get("adherence")):
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
