"""Jobs and the workers that run them: one worker thread per model, off the event loop, jobs in order.

A job is one accepted request (a :class:`~latentdiff.serve.inputs.Plan`). The :class:`Scheduler` bounds the jobs
queued or running (all models together; past ``max_queue`` a request is refused, HTTP 429), and each model's
:class:`Worker` takes its oldest job together with the queued jobs of the same batch key (equal settings, any
prompts, labels and seeds) up to ``max_batch`` images, and draws them in one ``Pipeline.sample`` call: each image
keeps its own seed, so it is the image the request would get alone. Progress and x̂_0 previews reach the job's
event list from the sampler's callback, which also stops a batch whose jobs are all cancelled. Finished images
are written atomically (``pngmeta.save_png``) under server-made names; a cancelled or failed job writes none.
"""

from __future__ import annotations

import base64
import collections
import io
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..pipeline import to_pil
from ..pngmeta import save_png
from .inputs import Plan, ServedModel

log = logging.getLogger("latentdiff.serve")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINAL = (DONE, FAILED, CANCELLED)
PREVIEWS = 5            # x̂_0 previews per job (every total/5 steps), made only while someone follows its events
KEEP_FINISHED = 1000    # finished jobs remembered for GET /api/jobs/{id}


class Cancelled(Exception):
    """Raised from the sampler's callback to stop a batch whose jobs are all cancelled."""


@dataclass
class Job:
    id: str
    model: str
    plan: Plan
    state: str = QUEUED
    step: int = 0
    error: str | None = None
    images: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    batch: int = 1                      # images drawn in the batch this job ran in
    events: list[dict] = field(default_factory=list)
    cancel_requested: bool = False
    listeners: int = 0                  # open event streams; previews are decoded only while there is one

    @property
    def total(self) -> int:
        return self.plan.total

    def summary(self) -> dict:
        """What ``GET /api/jobs/{id}`` answers."""
        out = {"id": self.id, "model": self.model, "state": self.state, "step": self.step, "total": self.total,
               "num": self.plan.num, "images": [f"/api/images/{name}" for name in self.images],
               "params": self.plan.params, "created": self.created, "batch": self.batch}
        if self.started is not None:
            out["queued_s"] = round(self.started - self.created, 4)
        if self.finished is not None and self.started is not None:
            out["run_s"] = round(self.finished - self.started, 4)
        if self.error is not None:
            out["error"] = self.error
        return out


class QueueFull(Exception):
    """The scheduler holds ``max_queue`` unfinished jobs; ``retry_after`` is a guess in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class Scheduler:
    """All jobs, the bound on unfinished ones, one :class:`Worker` per model, and the images written."""

    def __init__(self, models: dict[str, ServedModel], out_dir: Path, *, max_queue: int, max_batch: int):
        self.models, self.out_dir = models, Path(out_dir)
        self.max_queue, self.max_batch = max_queue, max_batch
        self.lock = threading.Condition()
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.images: dict[str, Path] = {}
        self.unfinished = 0
        self.accepting = True
        self.run_seconds = collections.deque(maxlen=20)  # recent seconds per job, for Retry-After
        self.workers = {name: Worker(self, m) for name, m in models.items()}

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for w in self.workers.values():
            w.start()

    # -- called from the event loop (fast, under the lock) ----------------------------------------------------

    def submit(self, model: str, plan: Plan) -> Job:
        with self.lock:
            if not self.accepting:
                raise RuntimeError("the server is shutting down")
            if self.unfinished >= self.max_queue:
                per_job = sum(self.run_seconds) / len(self.run_seconds) if self.run_seconds else 1.0
                raise QueueFull(max(1, round(per_job * self.unfinished / max(1, len(self.workers)))))
            job = Job(id=uuid.uuid4().hex, model=model, plan=plan)
            self.jobs[job.id] = job
            self.unfinished += 1
            self._event(job, "state", state=QUEUED)
            self.workers[model].queue.append(job)
            self._forget_old()
            self.lock.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """A queued job ends at once (its slot is free); a running one stops at the next sampler step."""
        with self.lock:
            if job.state in FINAL:
                return
            job.cancel_requested = True
            if job.state == QUEUED:
                self.workers[job.model].queue.remove(job)
                self._finish(job, CANCELLED)
            self.lock.notify_all()

    def image_path(self, name: str) -> Path | None:
        with self.lock:
            return self.images.get(name)

    # -- shared -------------------------------------------------------------------------------------------

    def _event(self, job: Job, kind: str, **data) -> None:
        job.events.append({"event": kind, **data})
        self.lock.notify_all()

    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        """Under the lock: the job's final state; its slot is freed."""
        job.state, job.error, job.finished = state, error, time.time()
        self.unfinished -= 1
        payload = {"state": state, "step": job.step, "total": job.total}
        if state == DONE:
            payload["images"] = [f"/api/images/{name}" for name in job.images]
            payload["params"] = job.plan.params
        if error is not None:
            payload["error"] = error
        for ev in job.events:  # a finished job keeps its record, not its preview images (they can be large)
            if ev["event"] == "preview":
                ev["image"] = None
        self._event(job, "state", **payload)

    def _forget_old(self) -> None:
        while len(self.jobs) > KEEP_FINISHED:
            old = next((j for j in self.jobs.values() if j.state in FINAL), None)
            if old is None:
                break
            del self.jobs[old.id]

    def shutdown(self, grace: float) -> None:
        """Refuse new jobs, cancel the queued ones, give the running ones ``grace`` seconds to finish, cancel
        what still runs (no image of it is written), and stop the workers."""
        with self.lock:
            self.accepting = False
            for w in self.workers.values():
                for job in list(w.queue):
                    w.queue.remove(job)
                    job.cancel_requested = True
                    self._finish(job, CANCELLED, "the server shut down")
                w.stopping = True
            self.lock.notify_all()
            self.lock.wait_for(lambda: self.unfinished == 0, timeout=grace)
            for job in self.jobs.values():
                if job.state == RUNNING:
                    job.cancel_requested = True
        for w in self.workers.values():
            w.join(timeout=grace + 30)


class Worker(threading.Thread):
    """Runs one model's jobs in order (batching equal settings), in its own thread."""

    def __init__(self, scheduler: Scheduler, model: ServedModel):
        super().__init__(name=f"latentdiff-serve-{model.name}", daemon=True)
        self.scheduler, self.model = scheduler, model
        self.queue: collections.deque[Job] = collections.deque()
        self.stopping = False

    def run(self) -> None:
        sched = self.scheduler
        while True:
            with sched.lock:
                sched.lock.wait_for(lambda: self.queue or self.stopping)
                if not self.queue:
                    return
                batch = self._take_batch()
                for job in batch:
                    job.state, job.started = RUNNING, time.time()
                    job.batch = sum(j.plan.num for j in batch)
                    sched._event(job, "state", state=RUNNING, batch=job.batch)
            self._run(batch)

    def _take_batch(self) -> list[Job]:
        """The oldest job and, behind it, the queued jobs with its batch key, up to ``max_batch`` images."""
        first = self.queue.popleft()
        batch, images = [first], first.plan.num
        if first.plan.batch_key is not None:
            for job in list(self.queue):
                if job.plan.batch_key == first.plan.batch_key and images + job.plan.num <= self.scheduler.max_batch:
                    self.queue.remove(job)
                    batch.append(job)
                    images += job.plan.num
        return batch

    def _run(self, batch: list[Job]) -> None:
        sched, pipe = self.scheduler, self.model.pipe
        kwargs = merge_plans([j.plan for j in batch])
        rows, start = [], 0
        for job in batch:
            rows.append((job, start, start + job.plan.num))
            start += job.plan.num
        total = batch[0].total
        every = max(1, total // PREVIEWS)

        def callback(batch_start, i, t, x, x0):
            if all(job.cancel_requested for job in batch):
                raise Cancelled
            step = i + 1
            preview = None
            if step % every == 0 and step < total and any(job.listeners for job in batch):
                preview = pipe.decode(x0)  # x̂_0 in pixels (a first-stage decode for latent models)
            with sched.lock:
                for job, a, b in rows:
                    job.step = step
                    sched._event(job, "progress", step=step, total=total)
                    if preview is not None and not job.cancel_requested:
                        sched._event(job, "preview", step=step, image=preview_data_url(preview[a:b]))

        t0 = time.perf_counter()
        try:
            images = pipe.sample(**kwargs, output="tensor", callback=callback)
        except Cancelled:
            with sched.lock:
                for job in batch:
                    sched._finish(job, CANCELLED)
            log.info("cancelled %s", ", ".join(j.id for j in batch))
            return
        except Exception as e:  # a failed job frees its slot; a bug keeps its traceback in the log
            message = str(e) if isinstance(e, (UserError, ValueError)) else f"{type(e).__name__}: {e}"
            if not isinstance(e, UserError):
                log.exception("job(s) %s failed", ", ".join(j.id for j in batch))
            with sched.lock:
                for job in batch:
                    sched._finish(job, FAILED, message)
            return
        seconds = time.perf_counter() - t0
        for job, a, b in rows:
            if job.cancel_requested:  # cancelled while its batch finished: no image written
                with sched.lock:
                    sched._finish(job, CANCELLED)
                continue
            names = []
            for pil, params in zip(to_pil(images[a:b]), job.plan.params):
                name = f"{uuid.uuid4().hex}.png"
                save_png(pil, sched.out_dir / name, params)
                names.append(name)
            with sched.lock:
                for name in names:
                    sched.images[name] = sched.out_dir / name
                job.images, job.step = names, job.total
                sched.run_seconds.append(seconds)
                sched._finish(job, DONE)
        log.info("drew %d image(s) for %d job(s) of %s in %.2f s", len(images), len(batch), self.model.name, seconds)


def merge_plans(plans: list[Plan]) -> dict:
    """One ``Pipeline.sample`` call for plans of one batch key: their per-image prompts, labels and seeds in order."""
    kwargs = dict(plans[0].kwargs)
    if len(plans) == 1:
        return kwargs
    kwargs["num"] = kwargs["batch_size"] = sum(p.num for p in plans)
    for key in ("prompts", "labels", "seed"):
        if key in kwargs:
            kwargs[key] = [v for p in plans for v in p.kwargs[key]]
    return kwargs


def preview_data_url(images: torch.Tensor) -> str:
    """(N, C, H, W) in [-1, 1] -> a PNG data URL of the images side by side (the page scales it up)."""
    from PIL import Image

    pils = to_pil(images.float().cpu())
    w, h = pils[0].size
    strip = Image.new(pils[0].mode, (w * len(pils), h))
    for k, im in enumerate(pils):
        strip.paste(im, (k * w, 0))
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
