"""``evaluate_model``: one entry point for scoring a diffusion model, whatever it is conditioned on.

    result = evaluate_model(pipe, net, ref, metrics=["fid", "pr"], num=500)            # a JSON-able dict

A text model of the shapes world is scored on held-out prompts (eval/prompted.py: adherence read by the shapes
oracle, and the feature metrics against the real images of the prompts); every other model on samples against
a reference of real images (eval/scoring.py: class i mod K for class models).
"""

from __future__ import annotations

from .prompted import evaluate_prompts
from .references import Reference
from .scoring import check_metrics, evaluate_samples, scores_prompts


def evaluate_model(pipe, net, ref: Reference | None, *, metrics, num: int, sampler=None, steps=None,
                   guidance=None, seed=None, batch_size=None, device=None, progress: bool = False,
                   bpd_split: str | None = None, net_info: dict | None = None, oracle=None, ceiling: bool = True,
                   **options) -> dict:
    """Score ``num`` samples of ``pipe`` with feature network ``net`` (and ``oracle``, the shapes oracle, for
    adherence): ``evaluate_prompts`` for a text model of the shapes world (``ref`` None: the real images of the
    prompts), else ``evaluate_samples`` against ``ref``. ``ceiling`` False skips the first stage's ceiling."""
    check_metrics(pipe, metrics)
    common = {"metrics": metrics, "num": num, "sampler": sampler, "steps": steps, "guidance": guidance, "seed": seed,
              "batch_size": batch_size, "device": device, "progress": progress, "net_info": net_info,
              "ceiling": ceiling, **options}
    if scores_prompts(pipe):
        return evaluate_prompts(pipe, net, oracle, ref=ref, **common)
    return evaluate_samples(pipe, net, ref, bpd_split=bpd_split, **common)
