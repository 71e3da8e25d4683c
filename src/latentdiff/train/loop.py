"""The training loop: one function for every objective, on 1 CPU, 1 GPU or many processes (accelerate / DDP).

The loop knows nothing about the models it trains. It asks the objective for its models, which optimizer
updates which of them, and the losses of a batch; it does the rest: AdamW with warm-up, gradient accumulation
and clipping, EMA, mixed precision, logs, sample grids, and checkpoints that resume exactly.

One optimizer step::

    zero the grads of every optimizer
    for each of grad_accum micro-batches (DDP gradient sync only on the last):
        losses = objective.losses(batch, step)
        for each optimizer, in order: backward(loss / grad_accum) into that optimizer's parameters only
    stop (TrainingDiverged) if any loss or gradient norm is not finite, before any weight changes
    clip each optimizer's gradient norm, step it and its lr schedule; update the EMAs
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, UserError
from ..nn.speed import FirstCallTimer, optimize
from .checkpoint import (
    capture_rng_state,
    find_resume_checkpoint,
    list_checkpoints,
    load_training_state,
    restore_rng_state,
    save_checkpoint,
    step_name,
    verify_checkpoint,
    write_text_atomic,
)
from .config import TrainConfig, lr_factor
from .data import BatchStream, EpochBatchSampler
from .ema import EMA
from .guards import TrainingInterrupted, launch_rank, run_folder_lock, stop_requested, stop_signals
from .logging import MetricsLogger, save_grid


class TrainingDiverged(UserError, ValueError):
    """A loss or gradient norm became NaN or inf; no weights were updated from it and no checkpoint written."""

    def __init__(self, message: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


@dataclass
class TrainResult:
    step: int                                     # optimizer steps done
    checkpoint: Path | None                       # the last checkpoint written (or resumed from)
    metrics: dict = field(default_factory=dict)   # the last logged metrics


def train(
    objective,
    data,
    config: TrainConfig | dict,
    out_dir,
    *,
    resume: bool | str | os.PathLike = False,  # True / "latest" / a checkpoint path
    collate_fn: Callable | None = None,
    callback: Callable[[int, dict], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``objective`` on ``data`` (a map-style Dataset, or a DataLoader used as given) for ``config.steps``.

    ``resume=True`` (or "latest") continues from the newest complete checkpoint in ``out_dir`` (starting fresh if
    there is none); a path continues from that checkpoint. Without ``resume``, an ``out_dir`` that already holds
    checkpoints is an error (nothing is overwritten). ``callback(step, metrics)`` runs on every process after each
    step. Run it in one process, or in several under ``accelerate launch`` / ``torchrun``: the global batch
    ``config.batch_size`` is split over processes and accumulation steps.
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig or dict, got {type(config).__name__}")
    _check_objective(objective)
    out_dir = Path(out_dir)
    restore_flags = _set_determinism(config.deterministic)
    raw_models = dict(objective.models)
    try:
        with run_folder_lock(out_dir, enabled=launch_rank() == 0), stop_signals():
            return _run(objective, data, config, out_dir, resume, collate_fn, callback, progress, raw_models)
    finally:
        objective.models.clear()
        objective.models.update(raw_models)  # the caller gets its own (unwrapped) modules back
        restore_flags()


# -------------------------------------------------------------------------------------------------------------


def _run(objective, data, config, out_dir, resume, collate_fn, callback, progress, raw_models) -> TrainResult:
    """Set up (accelerator, data, optimizers, EMAs, resume), then train to ``config.steps``."""
    accelerator, mp = _make_accelerator(config, [raw_models[n] for n in _trained_names(objective)])
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    seed_everything(config.seed + rank)  # different noise on each process; data order comes from config.seed
    if config.deterministic and config.num_workers > 0:
        warnings.warn("deterministic=True with num_workers > 0: random transforms in workers will not repeat "
                      "exactly after a resume", stacklevel=3)
    found = _resume_target(resume, out_dir)  # before anything is written into out_dir
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "train_config.json", _json(config.to_dict()))
    stream = BatchStream(data, config, world_size=world, rank=rank, device=device, collate_fn=collate_fn)

    # Optimizers over the raw parameters, EMAs from the raw models, then wrap (device, DDP, autocast).
    params, optimizers = _make_optimizers(objective, raw_models, config)
    ema = {n: EMA(raw_models[n], config.ema_decay, warmup=config.ema_warmup).to(device)
           for n in objective.ema} if config.ema_decay > 0 else {}
    _check_distributed_type(accelerator)
    trained = _prepare(objective, raw_models, optimizers, accelerator, config)
    run = _Run(objective, config, out_dir, accelerator, mp, stream, params, optimizers, ema,
               unwrapped={n: accelerator.unwrap_model(m) for n, m in objective.models.items()})

    step, last_ckpt, rng = _resume(run, found)
    logger = MetricsLogger(out_dir, enabled=main)
    logger.truncate_after(step)  # rows after the resumed step (or all, on a fresh start) are written anew
    for n in trained:
        objective.models[n].train()
    if rng is not None:
        restore_rng_state(rng)  # last: nothing above may draw random numbers after this
    return _train_steps(run, logger, step, last_ckpt, callback, progress)


@dataclass
class _Run:
    """What the steps of one training run share: the objective with its prepared models, the data stream, the
    optimizers (name -> [optimizer, lr schedule]) with their parameters, the EMAs and the unwrapped models."""
    objective: object
    config: TrainConfig
    out_dir: Path
    accelerator: object
    mp: str                          # the resolved mixed precision: "no", "bf16" or "fp16"
    stream: BatchStream
    params: dict
    optimizers: dict
    ema: dict
    unwrapped: dict


def _train_steps(run: _Run, logger, step: int, last_ckpt, callback, progress) -> TrainResult:
    """Optimizer steps from ``step`` to config.steps (or until the time budget is spent), with logs, sample
    grids and checkpoints at their intervals."""
    config, accelerator, main = run.config, run.accelerator, run.accelerator.is_main_process
    pbar = tqdm(total=config.steps, initial=step, disable=not (progress and main), dynamic_ncols=True, desc="train")
    averager, metrics = MetricsAverager(), {}
    grids = main and config.sample_every and hasattr(run.objective, "sample_images")  # sample grids on the way
    t_start, steps_here, time_up = time.perf_counter(), 0, False
    first = FirstCallTimer() if config.compile else None
    try:
        while step < config.steps and not time_up:
            t_step = time.perf_counter()
            step_losses, logs, norms, lrs = _optimizer_step(run.objective, accelerator, run.stream, run.optimizers,
                                                            run.params, config, step, run.mp, last_ckpt)
            for n, e in run.ema.items():
                e.update(run.unwrapped[n])
            step += 1
            steps_here += 1
            if first is not None:
                _report_compile(first, time.perf_counter() - t_step, main)
            if config.max_minutes:
                time_up = _time_is_up(t_start, steps_here, config.max_minutes, accelerator)
            step_metrics = _step_metrics(step_losses, norms, lrs, logs)
            averager.add(step_metrics)
            pbar.update(1)
            last = step == config.steps or time_up
            if step % config.log_every == 0 or last:
                metrics = averager.mean(accelerator)
                metrics["epoch"] = run.stream.epoch
                logger.log(step, metrics)
                pbar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k.startswith("loss")})
            if callback is not None:
                callback(step, step_metrics)
            if grids and step % config.sample_every == 0:
                _sample_grid(run.objective, run.unwrapped, run.ema, config, run.out_dir, step, logger,
                             accelerator.device)
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or last:
                last_ckpt = _save(run.out_dir, step, run.unwrapped, run.ema, run.optimizers, run.objective, run.stream,
                                  config, accelerator, run.mp)
            if not last and _stop_asked(accelerator):
                _checkpoint_and_stop(run, step, last_ckpt)
        if time_up and main:
            print(f"stopped at step {step} of {config.steps}: the time budget train.max_minutes={config.max_minutes:g} "
                  f"is spent ({(time.perf_counter() - t_start) / 60:.2f} min)", flush=True)
    finally:
        pbar.close()
        logger.close()
        for m in run.objective.models.values():
            accelerator.unwrap_model(m, keep_fp32_wrapper=False)  # removes the autocast forward from the raw model
    return TrainResult(step=step, checkpoint=last_ckpt, metrics=metrics)


def _report_compile(timer: FirstCallTimer, seconds: float, main: bool) -> None:
    """With train.compile: the first step's time (compilation included), printed apart from the steady step time."""
    timer.record(seconds)
    if timer.rest_calls == 2 and main:
        print(f"compile: first step {timer.first_s:.2f} s, steady step {timer.steady_s:.3f} s, so about "
              f"{timer.compile_s:.2f} s compiling", flush=True)


def _trained_names(objective) -> list[str]:
    return [n for names in objective.optimizers.values() for n in names]


def _make_accelerator(config: TrainConfig, trained: list):
    """(Accelerator, resolved mixed precision) for the run: CPU unless a GPU or MPS device is present. DDP
    broadcasts rank 0's buffers before every forward only when a trained model has state in them (BatchNorm's
    running statistics, a codebook's usage): constants (non-persistent buffers such as the timestep frequencies)
    are the same everywhere, and the broadcast is a collective a step that the processes wait on."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    mp = resolve_mixed_precision(config.mixed_precision)
    stateful = any(set(dict(m.named_buffers())) & set(m.state_dict()) for m in trained)  # persistent buffers
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters,
                                        broadcast_buffers=stateful, gradient_as_bucket_view=True)
    accelerator = Accelerator(mixed_precision=mp, cpu=not _has_accelerator(), kwargs_handlers=[ddp])
    return accelerator, mp


def _make_optimizers(objective, raw_models: dict, config: TrainConfig) -> tuple[dict, dict]:
    """(params, optimizers): each optimizer's trainable parameters (disjoint), and for each an AdamW with its
    warm-up + decay lr schedule, as name -> [optimizer, schedule]."""
    params = {name: _parameters(raw_models, names, name) for name, names in objective.optimizers.items()}
    _check_disjoint(params)
    optimizers = {}
    for name, ps in params.items():
        # fused: one kernel for all parameters instead of a dozen ops per tensor (10% of a small model's CPU step).
        opt = torch.optim.AdamW(ps, lr=config.lr, betas=config.betas, eps=config.adam_eps,
                                weight_decay=config.weight_decay, fused=_fusable(ps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, warmup_steps=config.warmup_steps,
                                                               schedule=config.lr_schedule, total_steps=config.steps))
        optimizers[name] = [opt, sched]
    return params, optimizers


def _fusable(params) -> bool:
    """Whether torch's fused AdamW takes these parameters (floating point, on a device it has kernels for)."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def _prepare(objective, raw_models: dict, optimizers: dict, accelerator, config: TrainConfig) -> list[str]:
    """Put the objective's models on the device, the trained ones wrapped (channels-last, DDP, autocast, compile),
    and wrap the optimizers; returns the names of the trained models."""
    trained = _trained_names(objective)
    for n, m in raw_models.items():
        if n in trained:
            if config.channels_last:
                m.to(memory_format=torch.channels_last)
            objective.models[n] = optimize(accelerator.prepare_model(m), compile=config.compile,
                                           backend=config.compile_backend)
        else:
            objective.models[n] = m.to(accelerator.device)  # saved, not trained
    for name in optimizers:
        optimizers[name][0] = accelerator.prepare_optimizer(optimizers[name][0])
    return trained


def _check_distributed_type(accelerator) -> None:
    """FSDP shards the weights; this loop's EMA and checkpoints read whole modules, so it refuses FSDP (one clear
    error instead of sharded checkpoints) until they gather full state dicts. DDP (multi_gpu) is supported."""
    if str(getattr(accelerator, "distributed_type", "")).endswith("FSDP"):
        raise ConfigError("accelerate launched this run with FSDP, which the training loop does not support yet "
                          "(EMA and checkpoints need the full weights): launch with --multi_gpu (DDP); see "
                          "docs/scaling.md")


def _resume(run: _Run, found: Path | None) -> tuple[int, Path | None, dict | None]:
    """(step, checkpoint, RNG state) after loading checkpoint ``found`` into the models, EMAs, optimizers,
    objective and data stream; (0, None, None) for a fresh start. The RNG state is restored by the caller,
    last of all."""
    if found is None:
        return 0, None, None
    accelerator = run.accelerator
    state = load_training_state(found, models=run.unwrapped, ema=run.ema,
                                optimizers={n: tuple(v) for n, v in run.optimizers.items()}, objective=run.objective,
                                rank=accelerator.process_index, world_size=accelerator.num_processes)
    step, rng = int(state["step"]), state["rng"]
    run.stream.seek(_data_position(state, run.config, run.stream), (rng or {}).get("loader_generators"))
    if accelerator.is_main_process:
        print(f"resumed from {found} at step {step}", flush=True)
    return step, found, rng


def _step_metrics(losses: dict, norms: dict, lrs: dict, logs: dict) -> dict:
    """One step's figures: loss, grad_norm and lr (suffixed _<optimizer> when there are several), and the
    objective's own logs."""
    single = len(losses) == 1
    out = {("loss" if single else f"loss_{k}"): v for k, v in losses.items()}
    out.update({("grad_norm" if single else f"grad_norm_{k}"): v for k, v in norms.items()})
    out.update({("lr" if single else f"lr_{k}"): v for k, v in lrs.items()})
    out.update(logs)
    return out


class MetricsAverager:
    """The mean of each metric over the steps since the last log line (a key counts only the steps it came
    in), averaged over processes, with the step rate."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.steps, self.t_last = 0, time.perf_counter()

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.sums[k] += v
            self.counts[k] += 1
        self.steps += 1

    def mean(self, accelerator) -> dict:
        """The means and ``steps_per_s`` since the last call (or since construction); starts a new interval."""
        now = time.perf_counter()
        metrics = _reduce_mean({k: v / self.counts[k] for k, v in self.sums.items()}, accelerator)
        metrics["steps_per_s"] = self.steps / max(now - self.t_last, 1e-9)
        self.sums.clear()
        self.counts.clear()
        self.steps, self.t_last = 0, now
        return metrics


def _time_is_up(t_start: float, steps_done: int, max_minutes: float, accelerator) -> bool:
    """Whether one more step (at the mean step time so far) would end past ``max_minutes``; the main process
    decides and every process follows it, so all stop after the same step."""
    elapsed = time.perf_counter() - t_start
    up = elapsed * (steps_done + 1) / steps_done > 60.0 * max_minutes
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast
        flag = broadcast(torch.tensor([float(up)], device=accelerator.device), from_process=0)
        up = bool(flag.item())
    return up


def _optimizer_step(objective, accelerator, stream, optimizers, params, config, step, mp, last_ckpt):
    """Accumulate gradients over grad_accum micro-batches, check them, and step every optimizer."""
    k = config.grad_accum
    for opt, _ in optimizers.values():
        opt.zero_grad(set_to_none=True)
    totals = {name: torch.zeros((), device=accelerator.device) for name in optimizers}
    log_sums: dict[str, float] = defaultdict(float)
    for a in range(k):
        batch = stream.next()
        with contextlib.ExitStack() as stack:
            if a < k - 1:  # DDP: all-reduce the gradients only once, after the last micro-batch
                for m in objective.models.values():
                    stack.enter_context(accelerator.no_sync(m))
            losses, logs = objective.losses(batch, step)
            if set(losses) != set(optimizers):
                raise ValueError(f"objective.losses returned losses for {sorted(losses)}, expected one per optimizer "
                                 f"{sorted(optimizers)}")
            for name in optimizers:
                loss = losses[name]
                if not torch.is_tensor(loss) or loss.ndim != 0:
                    raise ValueError(f"loss {name!r} must be a scalar tensor, got "
                                     f"{getattr(loss, 'shape', type(loss).__name__)}")
                # Gradients reach only this optimizer's parameters (a GAN's generator loss leaves D's grads alone).
                accelerator.backward(loss / k, inputs=params[name])
                totals[name] += loss.detach().float() / k
        for key, v in logs.items():
            log_sums[key] += float(v) / k
    # The global grad norm of each optimizer (clipped to grad_clip when > 0; inf = only measured).
    norms = {name: accelerator.clip_grad_norm_(ps, config.grad_clip or math.inf) for name, ps in params.items()}
    # All processes decide together (one of them alone raising would leave the others waiting).
    bad = sum((~torch.isfinite(v)).float() for v in totals.values())
    if mp != "fp16":  # fp16's loss scaler skips steps with inf gradients by design
        bad = bad + sum((~torch.isfinite(torch.as_tensor(v, device=bad.device))).float() for v in norms.values())
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    values = {name: v.item() for name, v in totals.items()}
    if bad.item() > 0:
        shown = ", ".join(f"{n}={v}" for n, v in values.items())
        shown_norms = ", ".join(f"{n}={float(v)}" for n, v in norms.items())
        raise TrainingDiverged(
            f"training diverged at step {step + 1}: loss {shown}"
            + f", grad norm {shown_norms}; no weights were updated from it and no checkpoint written; "
            f"the last good checkpoint is {last_ckpt or 'none'}",
            step + 1, last_ckpt)
    lrs = {}
    for name, (opt, sched) in optimizers.items():
        lrs[name] = opt.param_groups[0]["lr"]  # the lr this step uses
        opt.step()
        sched.step()
    return values, dict(log_sums), {n: float(v) for n, v in norms.items()}, lrs


# -------------------------------------------------------------------------------------------------------------
# Helpers


def resolve_mixed_precision(mode: str) -> str:
    """"auto" -> "bf16" on a CUDA device that supports it, else "no" (CPUs train in float32)."""
    if mode != "auto":
        return mode
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available())


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _set_determinism(on: bool) -> Callable[[], None]:
    """Turn deterministic algorithms on (if asked); return a function that restores the previous flags."""
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True

    def restore():
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev[2], prev[3]

    return restore


def _check_objective(objective) -> None:
    for attr, kind in (("models", dict), ("optimizers", dict), ("ema", (list, tuple))):
        if not isinstance(getattr(objective, attr, None), kind):
            raise TypeError(f"objective.{attr} must be a {kind}, got {type(getattr(objective, attr, None)).__name__}")
    if not callable(getattr(objective, "losses", None)):
        raise TypeError("objective must have a losses(batch, step) method")
    if not objective.optimizers:
        raise ValueError("objective.optimizers is empty: nothing to train")
    for opt, names in objective.optimizers.items():
        for n in names:
            if n not in objective.models:
                raise ValueError(f"optimizer {opt!r} names model {n!r}, not in objective.models "
                                 f"({', '.join(objective.models)})")
    for n in objective.ema:
        if n not in objective.models:
            raise ValueError(f"objective.ema names model {n!r}, not in objective.models "
                             f"({', '.join(objective.models)})")


def _parameters(models: dict, names: list[str], opt_name: str) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for n in names:
        for p in models[n].parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    if not out:
        raise ValueError(f"optimizer {opt_name!r} has no trainable parameters (models {names})")
    return out


def _check_disjoint(params: dict) -> None:
    owner = {}
    for name, ps in params.items():
        for p in ps:
            if id(p) in owner:
                raise ValueError(f"a parameter is updated by two optimizers, {owner[id(p)]!r} and {name!r}")
            owner[id(p)] = name


def _resume_target(resume, out_dir: Path) -> Path | None:
    if resume is False or resume is None:
        if list_checkpoints(out_dir):
            raise ValueError(f"{out_dir} already holds checkpoints of a run; pass resume=True to continue it, "
                             "or choose another out_dir (nothing there was changed)")
        return None
    if resume is True or resume == "latest":
        found = find_resume_checkpoint(out_dir)
        return found[0] if found else None
    path = Path(resume)
    verify_checkpoint(path)  # a clear error naming the broken file
    return path


def _data_position(state: dict, config: TrainConfig, stream: BatchStream) -> dict:
    """The saved data position, converted if the global batch or the accumulation changed."""
    d = state["data"]
    if not isinstance(stream.sampler, EpochBatchSampler):
        return d
    if (d["batch_size"], d["grad_accum"]) == (config.batch_size, config.grad_accum):
        return d
    done = (d["index"] // d["grad_accum"]) * d["batch_size"]  # samples of the epoch already seen
    warnings.warn(f"batch_size/grad_accum changed since the checkpoint ({d['batch_size']}/{d['grad_accum']} -> "
                  f"{config.batch_size}/{config.grad_accum}): the data order continues approximately", stacklevel=3)
    return {"epoch": d["epoch"], "index": (done // config.batch_size) * config.grad_accum}


def _reduce_mean(values: dict, accelerator) -> dict:
    if accelerator.num_processes == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def _sample_grid(objective, unwrapped, ema, config, out_dir, step, logger, device) -> None:
    """Samples from the EMA weights (raw weights where no EMA) into samples/step_XXXXXXX.png; the training
    RNG is untouched (forked), and the noise is the same at every call (seeded by config.seed)."""
    models = {n: (ema[n].model if n in ema else unwrapped[n]) for n in unwrapped}
    devices = [device.index or 0] if device.type == "cuda" else []
    was_training = {n: m.training for n, m in models.items()}
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for m in models.values():
            m.eval()
        try:
            images = objective.sample_images(models, config.sample_num, torch.Generator().manual_seed(config.seed))
        finally:
            for n, m in models.items():
                m.train(was_training[n])
    nrow = math.ceil(math.sqrt(images.shape[0]))
    save_grid(images, out_dir / "samples" / f"{step_name(step)}.png", nrow=nrow)
    logger.image("samples", images, step, nrow)


def _save(out_dir, step, unwrapped, ema, optimizers, objective, stream, config, accelerator, mp) -> Path:
    rng = capture_rng_state()
    rng["loader_generators"] = stream.generator_states()
    obj_state = objective.state_dict() if hasattr(objective, "state_dict") else None
    pos = stream.position()
    train_state = {
        "world_size": accelerator.num_processes,
        "mixed_precision": mp,
        "data": {**pos, "batch_size": config.batch_size, "grad_accum": config.grad_accum},
        "objective": type(objective).__name__,
        "models": sorted(unwrapped),
        "config": config.to_dict(),
    }
    return save_checkpoint(out_dir, step, models=unwrapped, ema=ema,
                           optimizers={n: tuple(v) for n, v in optimizers.items()},
                           objective_state=obj_state, train_state=train_state, rng_state=rng,
                           rank=accelerator.process_index, is_main=accelerator.is_main_process,
                           barrier=accelerator.wait_for_everyone, keep=config.keep_checkpoints)


# -------------------------------------------------------------------------------------------------------------
# Stopping on a signal (guards.py holds the handlers and the lock file)


def _stop_asked(accelerator) -> bool:
    """Whether SIGINT / SIGTERM reached any process since the run started; all processes decide together."""
    asked = stop_requested() is not None
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(torch.tensor([float(asked)], device=accelerator.device), reduction="sum")
        asked = bool(flag.item() > 0)
    return asked


def _checkpoint_and_stop(run: _Run, step: int, last_ckpt: Path | None) -> None:
    """Write the checkpoint of ``step`` (unless the loop has just written it, e.g. while the signal came), then
    raise TrainingInterrupted."""
    if last_ckpt is None or last_ckpt.name != step_name(step):
        last_ckpt = _save(run.out_dir, step, run.unwrapped, run.ema, run.optimizers, run.objective, run.stream,
                          run.config, run.accelerator, run.mp)
    signum = stop_requested()
    name = signal.Signals(signum).name if signum else "a signal on another process"
    if run.accelerator.is_main_process:
        print(f"stopped by {name} at step {step}; checkpoint {last_ckpt} (continue with --resume)", flush=True)
    raise TrainingInterrupted(f"stopped by {name} at step {step}; checkpoint {last_ckpt}", signum or 0, step,
                              last_ckpt)


def _json(d: dict) -> str:
    import json

    return json.dumps(d, indent=1) + "\n"
