"""`make demo-digits`: a class-conditional diffusion model learns scikit-learn's handwritten digits on a CPU.

1. trains the digits_ddpm recipe (pixel space, 10% label dropout for classifier-free guidance);
2. samples a grid, one row per digit, with a fast sampler and guidance;
3. trains a classifier on the real digits (scikit-learn) and prints the fraction of samples it assigns to the
   digit that was asked for, beside its accuracy on held-out real digits.

Writes outputs/demo_digits/digits_grid.png, outputs/demo_digits/summary.json and the run folder outputs/demo_digits/run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def digit_classifier(seed: int = 0):
    """An SVM on the 8x8 digits (the 'train' split of data/digits.py); returns (classifier, held-out accuracy)."""
    from sklearn.svm import SVC

    from .data import make_dataset

    def arrays(split):
        ds = make_dataset("digits", size=8, split=split)
        x = torch.stack([ds[i]["image"] for i in range(len(ds))]).reshape(len(ds), -1).numpy()
        y = np.array([ds[i]["label"] for i in range(len(ds))])
        return x, y

    x_train, y_train = arrays("train")
    x_test, y_test = arrays("test")
    clf = SVC(gamma="scale", C=10.0, random_state=seed).fit(x_train, y_train)
    return clf, float((clf.predict(x_test) == y_test).mean())


def to_8x8(images: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) samples in [-1, 1] -> (N, 64) features on the classifier's 8x8 grid (area average)."""
    if images.shape[-1] != 8:
        images = F.adaptive_avg_pool2d(images, 8)
    return images.reshape(images.shape[0], -1).numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="digits_ddpm", help="training config: a recipe name or a YAML file")
    p.add_argument("--out", default="outputs/demo_digits", help="output folder")
    p.add_argument("--per-class", type=int, default=10, help="samples per digit in the grid")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. train.steps=500)")
    args = p.parse_args(argv)

    from .config import load_config
    from .pipeline import load
    from .recipes import find_recipe
    from .train.logging import save_grid
    from .train.run import train_from_config

    out = Path(args.out)
    run = out / "run"
    if run.exists():
        shutil.rmtree(run)  # a fresh run each time: the timing below is the whole training
    config = load_config(find_recipe(args.config), args.overrides)
    print(f"[demo] training {args.config} for {config.train.steps} steps on {torch.get_num_threads()} CPU threads ...",
          flush=True)
    t0 = time.perf_counter()
    train_from_config(config, run, progress=True)
    t_train = time.perf_counter() - t0

    pipe = load(run)
    s = pipe.config.sample
    labels = [d for d in range(10) for _ in range(args.per_class)]  # one row per digit
    t1 = time.perf_counter()
    images = pipe.sample(len(labels), labels=labels, output="tensor", progress=True)
    t_sample = time.perf_counter() - t1
    grid = out / "digits_grid.png"
    # Upscale (nearest) to 64 px per digit so the grid is visible.
    save_grid(F.interpolate(images, scale_factor=max(1, 64 // images.shape[-1]), mode="nearest"), grid,
              nrow=args.per_class)

    clf, real_acc = digit_classifier()
    pred = clf.predict(to_8x8(images))
    acc = float((pred == np.array(labels)).mean())
    per_digit = {d: float((pred[d * args.per_class : (d + 1) * args.per_class] == d).mean()) for d in range(10)}
    summary = {
        "train_seconds": round(t_train, 1), "sample_seconds": round(t_sample, 1),
        "total_seconds": round(t_train + t_sample, 1), "steps": pipe.config.train.steps,
        "sampler": s.sampler, "sampling_steps": s.steps, "guidance": s.guidance,
        "class_accuracy": acc, "per_digit_accuracy": per_digit, "classifier_accuracy_on_real_test_digits": real_acc,
        "grid": str(grid),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[demo] training {t_train:.0f} s, sampling {len(labels)} images "
          f"({s.sampler}, {s.steps} steps, guidance {s.guidance}) {t_sample:.1f} s")
    print(f"[demo] grid: {grid}")
    print(f"[demo] {acc:.1%} of samples are classified as the digit asked for "
          f"(classifier accuracy on real held-out digits: {real_acc:.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
