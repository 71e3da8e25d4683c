"""How training draws timesteps: uniformly, or importance-sampled from the loss history (improved DDPM, Sec. 3.3)."""

from __future__ import annotations

import numpy as np
import torch


class UniformSampler:
    """t ~ U{0..T-1}, weight 1."""

    def __init__(self, num_steps: int):
        self.num_steps = int(num_steps)

    def sample(self, batch_size: int, *, device=None, generator: torch.Generator | None = None):
        t = torch.randint(0, self.num_steps, (batch_size,), generator=generator, device="cpu").to(device)
        return t, torch.ones(batch_size, device=device)

    def update(self, t, losses) -> None:  # nothing to learn
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossSecondMomentSampler:
    """p_t ∝ √E[L_t²] once every t has ``history`` losses, mixed with ``uniform_prob`` of uniform (improved
    DDPM eq. 18); the returned weights 1/(T p_t) keep the loss estimate unbiased."""

    def __init__(self, num_steps: int, history: int = 10, uniform_prob: float = 0.001):
        self.num_steps, self.history, self.uniform_prob = int(num_steps), int(history), float(uniform_prob)
        self.losses = np.zeros((self.num_steps, self.history), dtype=np.float64)
        self.counts = np.zeros(self.num_steps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self.counts == self.history).all())

    def probabilities(self) -> np.ndarray:
        if not self.warmed_up():
            return np.full(self.num_steps, 1.0 / self.num_steps)
        w = np.sqrt(np.mean(self.losses**2, axis=-1))
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_steps

    def sample(self, batch_size: int, *, device=None, generator: torch.Generator | None = None):
        p = torch.from_numpy(self.probabilities())
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_steps * p[t])
        return t.to(device), weights.float().to(device)

    def update(self, t, losses) -> None:
        """Record per-sample losses (tensors or arrays) at their timesteps; the oldest entry drops out."""
        t = np.asarray(torch.as_tensor(t).detach().cpu()).reshape(-1)
        losses = np.asarray(torch.as_tensor(losses).detach().float().cpu()).reshape(-1)
        for ti, li in zip(t.tolist(), losses.tolist()):
            if self.counts[ti] == self.history:
                self.losses[ti, :-1] = self.losses[ti, 1:]
                self.losses[ti, -1] = li
            else:
                self.losses[ti, self.counts[ti]] = li
                self.counts[ti] += 1

    def state_dict(self) -> dict:
        return {"losses": torch.from_numpy(self.losses.copy()), "counts": torch.from_numpy(self.counts.copy())}

    def load_state_dict(self, state: dict) -> None:
        self.losses = np.asarray(state["losses"], dtype=np.float64).copy()
        self.counts = np.asarray(state["counts"], dtype=np.int64).copy()


def make_timestep_sampler(name: str, num_steps: int):
    if name == "uniform":
        return UniformSampler(num_steps)
    if name in ("loss_second_moment", "importance"):
        return LossSecondMomentSampler(num_steps)
    raise ValueError(f"unknown timestep sampler {name!r}; expected 'uniform' or 'loss_second_moment'")
