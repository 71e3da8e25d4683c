"""The FastAPI application: the page, the HTTP API, the token, the limits and the request log.

    GET  /                        the page (one self-contained HTML file: no font, script or style from elsewhere)
    GET  /api/models              what each model takes, its samplers and defaults
    POST /api/generate            JSON, or multipart (``params`` JSON + image files); 202 with the job id
    GET  /api/jobs/{id}           state, step and total (and the image URLs when done)
    GET  /api/jobs/{id}/events    server-sent events: state, progress, preview (x̂_0 as a PNG data URL)
    POST /api/jobs/{id}/cancel    stop a job (queued: at once; running: at its next step)
    GET  /api/images/{name}       a finished PNG (its text chunks hold the generation parameters)

A bad field is a 422 that names it; a request past a limit is a 400; a full queue is a 429 with Retry-After; with
a token, an API call without it is a 401. Image names and job ids are made by the server and checked against
what it made: no client-supplied text ever becomes a path.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import random
import re
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..errors import UserError
from .inputs import EDIT_UPLOADS, FIELD_INPUTS, ServedModel, describe, sample_arguments, upload_fields
from .jobs import FINAL, Job, QueueFull, Scheduler
from .schema import GenerateRequest, LimitError, Limits, check_limits

log = logging.getLogger("latentdiff.serve")

JOB_ID = re.compile(r"[0-9a-f]{32}")
IMAGE_NAME = re.compile(r"[0-9a-f]{32}\.png")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
HEARTBEAT_S = 15.0      # an SSE comment line this often keeps proxies from closing an idle stream


def _error(loc: str, msg: str) -> RequestValidationError:
    """A 422 in FastAPI's format, naming the field ``loc``."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", loc), "msg": msg, "input": None}])


class RequestLog:
    """ASGI middleware: one log line per request with its status and duration (to the last byte sent)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status[0], 1e3 * (time.perf_counter() - t0))


def create_app(models: list[ServedModel], *, out_dir, limits: Limits | None = None, token: str | None = None,
               grace: float = 10.0) -> FastAPI:
    """The application serving ``models`` (loaded already; see :func:`latentdiff.serve.load_models`), writing
    images into ``out_dir``. ``token``: every API call must carry it (``Authorization: Bearer T``, ``X-Token: T``
    or ``?token=T``). ``grace``: seconds that running jobs get to finish at shutdown before they are cancelled."""
    if not models:
        raise ValueError("create_app needs at least one model")
    limits = limits or Limits()
    served = {m.name: m for m in models}
    scheduler = Scheduler(served, Path(out_dir), max_queue=limits.max_queue, max_batch=limits.max_images)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        log.info("serving %s; images go to %s", ", ".join(served), scheduler.out_dir)
        yield
        await run_in_threadpool(scheduler.shutdown, grace)

    app = FastAPI(title="latentdiff", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(RequestLog)
    app.state.scheduler, app.state.limits = scheduler, limits
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    def check_token(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("x-token") or request.query_params.get("token") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong token (send Authorization: Bearer TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    api = APIRouter(prefix="/api", dependencies=[Depends(check_token)])

    def find_job(job_id: str) -> Job:
        job = scheduler.jobs.get(job_id) if JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @api.get("/models")
    def list_models():
        return {"models": [describe(m, limits) for m in served.values()]}

    @api.post("/generate", status_code=202)
    async def generate(request: Request):
        fields, files = await _read_request(request, limits)
        try:
            req = GenerateRequest.model_validate(fields)
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)
                                          ]) from None
        try:
            check_limits(req, limits)
        except LimitError as e:
            raise HTTPException(400, str(e)) from None
        name = req.model or next(iter(served))
        if name not in served:
            raise _error("model", f"unknown model {name!r}; served: {', '.join(served)}")
        model = served[name]
        allowed = upload_fields(model.pipe)
        uploads = {}
        for key, data in files.items():
            if key not in allowed:
                raise _error(key, f"unexpected file field {key!r}; model {name!r} takes {', '.join(allowed)}")
            uploads[key] = _open_image(key, data, limits)
        seed = req.seed if req.seed is not None else random.randrange(2**31)
        try:
            plan = await run_in_threadpool(sample_arguments, model, req, uploads, seed=seed)
        except UserError as e:
            raise _error(_named_field(str(e)), str(e)) from None
        try:
            job = scheduler.submit(name, plan)
        except QueueFull as e:
            return JSONResponse({"detail": str(e)}, status_code=429, headers={"Retry-After": str(e.retry_after)})
        except RuntimeError as e:
            raise HTTPException(503, str(e)) from None
        return {"id": job.id, "state": job.state, "seed": seed, "num": plan.num, "total": plan.total,
                "status": f"/api/jobs/{job.id}", "events": f"/api/jobs/{job.id}/events"}

    @api.get("/jobs/{job_id}")
    def job_status(job_id: str):
        return find_job(job_id).summary()

    @api.post("/jobs/{job_id}/cancel")
    def cancel(job_id: str):
        job = find_job(job_id)
        scheduler.cancel(job)
        return job.summary()

    @api.get("/jobs/{job_id}/events")
    async def events(job_id: str, request: Request):
        job = find_job(job_id)

        async def stream():
            job.listeners += 1
            try:
                async for chunk in _events(job):
                    yield chunk
                    if await request.is_disconnected():
                        return
            finally:
                job.listeners -= 1

        async def _events(job):
            seen, last = 0, time.monotonic()
            while True:
                new = job.events[seen:]
                seen += len(new)
                for ev in new:
                    data = {k: v for k, v in ev.items() if k != "event"}
                    yield f"event: {ev['event']}\ndata: {json.dumps(data)}\n\n"
                    last = time.monotonic()
                if job.state in FINAL and seen >= len(job.events):
                    return
                if time.monotonic() - last > HEARTBEAT_S:
                    yield ": heartbeat\n\n"
                    last = time.monotonic()
                await asyncio.sleep(0.05)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @api.get("/images/{name}")
    def image(name: str):
        path = scheduler.image_path(name) if IMAGE_NAME.fullmatch(name) else None
        if path is None or not path.is_file():
            raise HTTPException(404, "no such image")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "max-age=86400"})

    app.include_router(api)
    return app


async def _read_request(request: Request, limits: Limits) -> tuple[dict, dict[str, bytes]]:
    """The request's fields and its uploaded files (field -> bytes): a JSON body, or a multipart form whose
    ``params`` part is JSON (other text parts are fields too, and files are uploads). Past the upload limit: 400."""
    ctype = request.headers.get("content-type", "")
    length = request.headers.get("content-length")
    body_limit = 4 * limits.max_upload_bytes + 2**20
    if length is not None and length.isdigit() and int(length) > body_limit:
        raise HTTPException(400, f"the request has {int(length)} bytes; this server takes at most {body_limit}")
    if not ctype.startswith("multipart/form-data"):
        body, size = [], 0
        async for chunk in request.stream():  # bounded also when the client sends no Content-Length
            size += len(chunk)
            if size > body_limit:
                raise HTTPException(400, f"the request has more than {body_limit} bytes; this server takes at most "
                                         f"{body_limit}")
            body.append(chunk)
        try:
            fields = json.loads(b"".join(body) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _error("body", f"not valid JSON ({e})") from None
        if not isinstance(fields, dict):
            raise _error("body", "the request body must be a JSON object")
        return fields, {}
    form = await request.form(max_files=8, max_fields=32)
    fields, files = {}, {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            data = await value.read(limits.max_upload_bytes + 1)
            if len(data) > limits.max_upload_bytes:
                raise HTTPException(400, f"upload {key!r} exceeds this server's limit of "
                                         f"{limits.max_upload_bytes} bytes")
            if data:  # an empty file input of a form sends an empty part
                files[key] = data
        elif key == "params":
            try:
                params = json.loads(value or "{}")
            except json.JSONDecodeError as e:
                raise _error("params", f"not valid JSON ({e})") from None
            if not isinstance(params, dict):
                raise _error("params", "must be a JSON object")
            fields.update(params)
        else:
            fields[key] = value
    return fields, files


def _open_image(key: str, data: bytes, limits: Limits):
    """An uploaded file -> a loaded PIL image; 422 naming ``key`` when it is no image, 400 when it is too large."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as e:
        raise _error(key, f"{key}: not a readable image ({e})") from None
    if im.format not in IMAGE_FORMATS:
        raise _error(key, f"{key}: {im.format} images are not accepted ({', '.join(IMAGE_FORMATS)})")
    side = 4 * limits.max_size  # an upload may be larger than the output (it is resized), within reason
    if max(im.size) > side:
        raise HTTPException(400, f"{key} is {im.size[0]}x{im.size[1]} pixels; this server takes at most {side} a side")
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise _error(key, f"{key}: a truncated or corrupt image ({e})") from None
    return im


def _named_field(message: str) -> str:
    """The request field a model's error message names (its first word, else the first option name in it)."""
    refused = re.search(r"takes no (?:class )?(prompts|labels|layout)", message)  # "this model ... takes no X"
    if refused:
        return {"prompts": "prompt", "labels": "label"}.get(refused[1], refused[1])
    first = re.match(r"\w+", message)
    if first and (first[0] in GenerateRequest.model_fields or first[0] in (*EDIT_UPLOADS, *FIELD_INPUTS)):
        return first[0]
    for name in ("prompt", "label", "guidance", "sampler", "steps", "size", "seed", "eta", "layout", "class"):
        if name in message:
            return "label" if name == "class" else name
    return "body"
