"""Captions of a dataset without loading its images: the text a tokenizer's vocabulary is built from."""

from __future__ import annotations

from ..errors import DataError


def dataset_captions(dataset, num: int, key: str = "caption") -> list[str]:
    """The captions of the first ``num`` items of ``dataset`` (all of them when it is shorter).

    Datasets that know their captions answer without decoding an image: an image folder's ``captions`` list, the
    procedural shapes world's ``caption(i)``; any other dataset is read item by item (its ``key`` field).
    """
    n = min(int(num), len(dataset))
    if key == "caption" and isinstance(getattr(dataset, "captions", None), list):
        captions = dataset.captions[:n]
    elif key == "caption" and callable(getattr(dataset, "caption", None)):
        captions = [dataset.caption(i) for i in range(n)]
    else:
        captions = []
        for i in range(n):
            item = dataset[i]
            if key not in item:
                raise DataError(f"the dataset's items have no {key!r} field (fields: {', '.join(sorted(item))}); "
                                "a text-conditioned model needs captions (conditioning.key names the field)")
            captions.append(item[key])
    if any(c is None for c in captions):
        raise DataError(f"the dataset has items without a caption ({key!r} is missing for some images)")
    bad = [c for c in captions if not isinstance(c, str)]
    if bad:
        raise DataError(f"captions must be strings; the {key!r} field holds {type(bad[0]).__name__}")
    return list(captions)
