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
