"""The feature network that scores samples: the FID Inception (from a local weights file) or an oracle
classifier of the data (digits and shapes built in, trained into the cache on first use).

    features = choose_features("auto", data_name="digits", reference=None, oracle_path=None)   # -> "oracle"
    net, info = feature_network(features, dataset_name="digits")

``info`` is what a result records about the network: its name, fingerprint and (oracles) its accuracy on
held-out real images, which is the floor of the class accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RequestError
from .stats_cache import cache_root, load_stats

FEATURES = ("auto", "inception", "oracle")
ORACLE_DATASETS = ("digits", "shapes")


def digits_oracle_cached(cache=None, *, device=None, epochs: int = 30, verbose: bool = True):
    """The digits oracle from ``cache_root(cache)/oracles/digits``, trained and saved there on first use."""
    from .oracle import CONFIG_FILE, digits_oracle

    folder = cache_root(cache) / "oracles" / "digits"
    if verbose and not (folder / CONFIG_FILE).is_file():
        print(f"training the digits oracle (first use) into {folder} ...", flush=True)
    return digits_oracle(folder, device=device, epochs=epochs, verbose=verbose)


def shapes_oracle_cached(cache=None, *, device=None, verbose: bool = True):
    """The shapes oracle from ``cache_root(cache)/oracles/shapes``, trained and saved there on first use."""
    from .shapes_oracle import CONFIG_FILE, load_shapes_oracle, train_shapes_oracle

    folder = cache_root(cache) / "oracles" / "shapes"
    if not (folder / CONFIG_FILE).is_file():
        if verbose:
            print(f"training the shapes oracle (first use, a few minutes) into {folder} ...", flush=True)
        train_shapes_oracle(folder, verbose=verbose)
    return load_shapes_oracle(folder, device=device)


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


def adherence_oracle(net=None, *, oracle_path=None, cache=None, device=None, verbose: bool = True):
    """The shapes oracle that reads prompts back (it has ``cell_logits``): ``net`` when it is one (the feature
    network), else the oracle folder ``oracle_path`` (which must then be a shapes oracle), else the cached one."""
    if net is not None and hasattr(net, "cell_logits"):
        return net
    if oracle_path is not None:
        oracle = load_any_oracle(oracle_path, device=device)
        if not hasattr(oracle, "cell_logits"):
            raise RequestError(f"adherence needs a shapes oracle (it reads every cell of a scene); {oracle_path} is a "
                               f"classifier of another kind ({getattr(oracle.config, 'name', '?')!r})")
        return oracle
    return shapes_oracle_cached(cache, device=device, verbose=verbose)


def feature_network(features: str, *, fid_weights=None, oracle_path=None, dataset_name: str | None = None,
                    cache=None, device=None, verbose: bool = True):
    """(network, info) for ``features`` "inception" (needs the FID weights file: ``fid_weights`` or
    $LATENTDIFF_FID_WEIGHTS) or "oracle" (``oracle_path``, else the built-in oracle of ``dataset_name``)."""
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
        raise RequestError(f"no built-in oracle for dataset {dataset_name!r} (there are for "
                           f"{', '.join(ORACLE_DATASETS)}); pass an oracle folder (--oracle PATH) or use "
                           "--features inception")
    name = getattr(net.config, "name", "shapes")
    acc = net.info.get("test_accuracy", (net.info.get("test") or {}).get("image_accuracy"))
    if verbose:
        shown = f"{acc:.2%}" if acc is not None else "unknown"
        print(f"oracle {name!r}: accuracy {shown} on held-out real images", flush=True)
    return net, {"name": f"oracle:{name}", "fingerprint": net.fingerprint(), "oracle_accuracy": acc}


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
