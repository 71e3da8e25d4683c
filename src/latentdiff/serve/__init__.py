"""``latentdiff serve``: a web page and an HTTP API for one or several models.

    latentdiff serve outputs/demo/run                       # http://127.0.0.1:7860
    latentdiff serve runs/a models/b --host 0.0.0.0 --token s3cret --max-queue 32

The page (``page.html``, one self-contained file) adapts to what the chosen model takes; the API is documented in
docs/serve.md. Modules: :mod:`.schema` (request schema and limits), :mod:`.inputs` (what a model takes; the one
mapping from a request to ``Pipeline.sample``), :mod:`.jobs` (the queue and one worker thread per model),
:mod:`.app` (the FastAPI application). FastAPI, uvicorn and python-multipart come with the ``serve`` extra.
"""

from __future__ import annotations

from pathlib import Path

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")  # binding elsewhere needs a token

__all__ = ["LOCAL_HOSTS", "load_models", "create_app"]


def load_models(paths, *, device=None) -> list:
    """Each run or model folder loaded as a :class:`~latentdiff.serve.inputs.ServedModel` named after its folder."""
    from ..pipeline import load
    from .inputs import ServedModel, model_name

    models, taken = [], set()
    for path in paths:
        name = model_name(str(path), taken)
        taken.add(name)
        models.append(ServedModel(name=name, path=str(Path(path).resolve()), pipe=load(path, device=device)))
    return models


def create_app(*args, **kwargs):
    """See :func:`latentdiff.serve.app.create_app` (imported on use: FastAPI is an optional dependency)."""
    from .app import create_app as create

    return create(*args, **kwargs)
