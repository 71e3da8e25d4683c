"""Where the loop's batches come from, and how it finds its place again after a restart.

A Dataset is read through :class:`EpochBatchSampler`: epoch e visits the samples in a permutation that depends
on (seed, e) alone, global batch k of the epoch is permutation[k·G : (k+1)·G] (G = the global batch size), and
process r draws micro-batch j = a·world + r of it for accumulation step a. So the data one optimizer step sees
is the same for any number of processes, and a position (epoch, micro-batches drawn) names the next batch
exactly. A DataLoader given by the user is iterated as it is (see :class:`BatchStream`).
"""

from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ..data.shards import POSITION_KEY, ShardStream
from ..errors import ConfigError, DataError


class EpochBatchSampler:
    """Index batches of one process for one epoch; ``epoch`` and ``start`` are set before each ``iter``.

    Args:
        num_samples: dataset length.
        global_batch: G, samples per optimizer step over all processes and accumulation steps.
        world_size, rank: processes and this one's index.
        grad_accum: micro-batches per optimizer step on each process.
        seed: seeds the permutation of each epoch (with the epoch number).
    """

    def __init__(self, num_samples: int, global_batch: int, *, world_size: int = 1, rank: int = 0, grad_accum: int = 1,
                 seed: int = 0):
        if global_batch % (world_size * grad_accum):
            raise ConfigError(f"batch_size {global_batch} must be divisible by processes × grad_accum = "
                              f"{world_size} × {grad_accum}")
        if num_samples < global_batch:
            raise ConfigError(f"the dataset has {num_samples} samples, fewer than one batch of "
                              f"batch_size={global_batch}")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.world_size, self.rank, self.grad_accum, self.seed = world_size, rank, grad_accum, seed
        self.micro = global_batch // (world_size * grad_accum)
        self.epoch, self.start = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch  # the last incomplete batch is dropped

    def __len__(self) -> int:
        return self.steps_per_epoch * self.grad_accum  # micro-batches this process draws per epoch

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.permutation(self.epoch)
        for i in range(self.start, len(self)):  # i = micro-batches drawn by this process so far
            k, a = divmod(i, self.grad_accum)
            j = a * self.world_size + self.rank  # micro-batch j of global batch k
            lo = k * self.global_batch + j * self.micro
            yield perm[lo : lo + self.micro].tolist()


class BatchStream:
    """An endless stream of batches that knows its position (epoch, micro-batches drawn in the epoch).

    ``position()`` is saved in checkpoints; ``seek(position)`` continues from it. For a user DataLoader the
    position is honoured by skipping batches, and the order only repeats if its sampler does: a sampler with
    ``set_epoch`` or a ``generator`` (whose state at the start of the epoch is saved) works.
    """

    def __init__(self, data, config, *, world_size: int, rank: int, device: torch.device, collate_fn=None):
        self.device = device
        self.epoch, self.index = 0, 0
        self._iter = None
        self._gen_states: dict[str, torch.Tensor] = {}
        self.shards = None
        if isinstance(data, ShardStream):
            self._init_shards(data, config, world_size, rank, device)
        elif isinstance(data, DataLoader):
            self.loader, self.sampler = data, None
            s = data.sampler
            if isinstance(s, RandomSampler) and s.generator is None and not hasattr(s, "set_epoch"):
                warnings.warn("the DataLoader's RandomSampler has no generator: after a resume the data order will not "
                              "continue exactly; pass a Dataset or a DataLoader with generator=", stacklevel=3)
        elif isinstance(data, Dataset) or hasattr(data, "__getitem__"):
            self.sampler = EpochBatchSampler(len(data), config.batch_size, world_size=world_size, rank=rank,
                                             grad_accum=config.grad_accum, seed=config.seed)
            # A private generator: creating an iterator draws a worker base seed, never from the global RNG.
            self._loader_gen = torch.Generator()
            self.loader = DataLoader(data, batch_sampler=self.sampler, num_workers=config.num_workers,
                                     collate_fn=collate_fn, generator=self._loader_gen,
                                     pin_memory=device.type == "cuda", persistent_workers=config.num_workers > 0)
        else:
            raise TypeError(f"training data must be a Dataset or a DataLoader, got {type(data).__name__}")

    def _init_shards(self, data: ShardStream, config, world_size: int, rank: int, device) -> None:
        """Streamed shards: each process reads its own shards, each loader worker its own part of them."""
        if config.batch_size % (world_size * config.grad_accum):
            raise ConfigError(f"batch_size {config.batch_size} must be divisible by processes × grad_accum = "
                              f"{world_size} × {config.grad_accum}")
        micro = config.batch_size // (world_size * config.grad_accum)
        self.shards = data.configured(batch_size=micro, world_size=world_size, rank=rank)
        self.sampler, self.loader, self.num_workers = None, None, config.num_workers
        self.workers = {g: (0, 0) for g in self.shards.worker_ids(config.num_workers)}  # g -> (epoch, emitted)
        self._pin = device.type == "cuda"

    # -- position ------------------------------------------------------------------------------------------

    def position(self) -> dict:
        if self.shards is None:
            return {"epoch": self.epoch, "index": self.index}
        workers = {str(g): list(p) for g, p in self.workers.items()}
        if self.shards.world_size > 1:  # every process's workers, so that the main process saves them all
            import torch.distributed as dist

            parts = [None] * self.shards.world_size
            dist.all_gather_object(parts, workers)
            workers = {g: p for part in parts for g, p in part.items()}
        return {"epoch": self.epoch, "index": self.index, "shard_workers": workers}

    def generator_states(self) -> dict[str, torch.Tensor]:
        """States of the user loader's generators at the start of the current epoch (empty for a Dataset)."""
        return dict(self._gen_states)

    def seek(self, position: dict, generator_states: dict | None = None) -> None:
        self.epoch, self.index = int(position["epoch"]), int(position["index"])
        self._iter = None
        if self.shards is not None:
            self._seek_shards(position)
        if generator_states:
            for name, gen in self._user_generators().items():
                if name in generator_states:
                    gen.set_state(generator_states[name])

    def _seek_shards(self, position: dict) -> None:
        saved = {int(g): tuple(p) for g, p in position.get("shard_workers", {}).items()}
        n = self.shards.world_size * max(self.num_workers, 1)
        if len(saved) != n:
            warnings.warn(f"the checkpoint's stream was read by {len(saved)} workers, this run has {n} (processes × "
                          f"num_workers): the shards are split anew and the stream starts again at epoch "
                          f"{self.epoch + 1}", stacklevel=3)
            self.epoch, self.index = self.epoch + 1, 0
            self.workers = {g: (self.epoch, 0) for g in self.workers}
            return
        self.workers = {g: saved[g] for g in self.workers}

    # -- iteration -----------------------------------------------------------------------------------------

    def _user_generators(self) -> dict[str, torch.Generator]:
        gens = {}
        if self.sampler is None:
            if self.loader.generator is not None:
                gens["loader"] = self.loader.generator
            g = getattr(self.loader.sampler, "generator", None)
            if isinstance(g, torch.Generator):
                gens["sampler"] = g
        return gens

    def _start_epoch(self) -> None:
        if self.shards is not None:
            # Batch i of a loader comes from worker i % W; rotate so the batch after a resume comes from the worker
            # whose turn it was.
            self.shards.start = dict(self.workers)
            self.shards.rotation = self.index % max(self.num_workers, 1)
            # A private generator: creating the iterator must not draw from the global RNG that checkpoints restore.
            self.loader = DataLoader(self.shards, batch_size=None, num_workers=self.num_workers, pin_memory=self._pin,
                                     generator=torch.Generator().manual_seed(0))
            self._iter = iter(self.loader)
            return
        if self.sampler is not None:
            self.sampler.epoch, self.sampler.start = self.epoch, self.index
            self._loader_gen.manual_seed(int(np.random.default_rng([self.sampler.seed, self.epoch, 1]).integers(2**62)))
            self._iter = iter(self.loader)
            return
        for obj in (self.loader.sampler, getattr(self.loader, "batch_sampler", None)):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(self.epoch)
        # States at the start of the epoch (after a seek: the restored ones), saved so a resume repeats the order.
        self._gen_states = {n: g.get_state() for n, g in self._user_generators().items()}
        self._iter = iter(self.loader)
        for _ in range(self.index):  # a user loader cannot start mid-epoch: skip what was drawn
            next(self._iter)

    def next(self):
        """The next micro-batch, moved to the device (tensors only; lists such as captions pass unchanged)."""
        for _ in range(2):
            if self._iter is None:
                self._start_epoch()
            try:
                batch = next(self._iter)
                self.index += 1
                if self.shards is not None:
                    g, epoch, emitted = batch.pop(POSITION_KEY)
                    self.workers[g] = (epoch, emitted)
                    self.epoch = min(e for e, _ in self.workers.values())
                return to_device(batch, self.device)
            except StopIteration:
                self._iter = None
                self.epoch, self.index = self.epoch + 1, 0
        raise DataError("the training data yielded no batch in a whole epoch (is it empty?)")


def to_device(batch, device: torch.device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
