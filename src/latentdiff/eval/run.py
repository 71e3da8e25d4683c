"""The glue behind `latentdiff eval`, `latentdiff oracle` and benchmarks/quality_vs_steps.py, in one namespace.

    net, info = feature_network("oracle", dataset_name="digits")          # or "inception" + fid_weights
    ref = load_reference(None, net, pipe=pipe)                             # the model's training data, cached
    result = evaluate_model(pipe, net, ref, metrics=["fid", "kid"], num=500)
    print(format_table(result)); write_json(default_json_path("runs/digits", result), result)

Each part lives in its own module: the feature networks and cached oracles (feature_networks), the real
images as statistics (references), sampling, metrics, floors, first-stage ceilings and bits/dim (scoring), a
text model's held-out shapes prompts and their adherence (prompted), the choice between the two (model_eval),
and the table and JSON (report). Devices and image folders are not eval's: ``latentdiff.devices`` and
``latentdiff.data.folder``.

Reference statistics are cached under ``cache_root()/fid_stats`` (``$LATENTDIFF_CACHE``, default
``~/.cache/latentdiff``), the digits oracle under ``cache_root()/oracles/digits``.
"""

from ..data.folder import folder_dataset
from ..devices import default_device
from .feature_networks import (
    FEATURES,
    ORACLE_DATASETS,
    adherence_oracle,
    choose_features,
    digits_oracle_cached,
    feature_network,
    load_any_oracle,
    shapes_oracle_cached,
)
from .model_eval import evaluate_model
from .prompted import evaluate_prompts, heldout_cases
from .references import Reference, dataset_for, load_reference
from .report import default_json_path, format_table, table_rows, write_json
from .scoring import (
    DEFAULT_METRICS,
    FEATURE_METRICS,
    METRICS,
    PROMPT_METRICS,
    SPATIAL_METRICS,
    CountedCalls,
    bits_per_dim,
    bpd_dataset,
    check_metrics,
    dataset_ceiling,
    default_metrics,
    evaluate_folders,
    evaluate_samples,
    feature_metrics,
    floor_metrics,
    has_ceiling,
    parse_metrics,
    reconstructions,
    sample_batches,
    sample_stats,
    scores_prompts,
)
from .stats_cache import CACHE_ENV, cache_root

__all__ = [
    "folder_dataset", "default_device",
    "FEATURES", "ORACLE_DATASETS", "adherence_oracle", "choose_features", "digits_oracle_cached", "feature_network",
    "load_any_oracle", "shapes_oracle_cached",
    "Reference", "dataset_for", "load_reference",
    "default_json_path", "format_table", "table_rows", "write_json",
    "DEFAULT_METRICS", "FEATURE_METRICS", "METRICS", "PROMPT_METRICS", "SPATIAL_METRICS", "CountedCalls",
    "bits_per_dim", "bpd_dataset",
    "check_metrics", "dataset_ceiling", "default_metrics", "evaluate_folders", "evaluate_model", "evaluate_prompts",
    "evaluate_samples", "feature_metrics", "floor_metrics", "has_ceiling", "heldout_cases", "parse_metrics",
    "reconstructions", "sample_batches", "sample_stats", "scores_prompts",
    "CACHE_ENV", "cache_root",
]
