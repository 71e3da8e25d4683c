"""The Gaussian diffusion process of DDPM (Ho et al. 2020) with the improvements of Nichol & Dhariwal 2021.

Forward process q(x_t | x_0) in closed form, the posterior q(x_{t-1} | x_t, x_0), the reverse-process mean and
variance p(x_{t-1} | x_t), conversions between ε, x_0 and v, the training losses, and the variational bound;
for the samplers, the continuous ᾱ(t), σ(t) and t(σ) between the integer steps.

The module-level functions are the process's math on plain numbers or tensors, shared by
:class:`GaussianDiffusion` (on its tables) and the samplers (on the ᾱ of their grids): one ε / x_0 / v
conversion, one DDPM posterior, one choice of the reverse-step variance.

Timesteps are integers 0..T-1; index t is DDPM's step t+1 (Ho et al. count 1..T). Tables are float64 and cast
to the input's dtype and device at use. Symbols: docs/notation.md.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .likelihood import LN2, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .resample import make_timestep_sampler
from .schedules import check_betas, sigmas_from_alphas_cumprod

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSSES = ("simple", "hybrid", "vlb")


# ---------------------------------------------------------------------------------------------------------
# The process's math on numbers or tensors (shared by GaussianDiffusion and the samplers)


def x0_eps_from_output(prediction: str, out, x_t, sqrt_ab, sqrt_one_minus_ab, *, clip_x0: bool = False):
    """(x̂_0, ε̂) from a network output ``out`` at x_t = √ᾱ x_0 + √(1 − ᾱ) ε (DDPM eq. 4).

    ``prediction`` names what ``out`` is: ``eps`` (x̂_0 = (x_t − √(1−ᾱ) ε̂)/√ᾱ), ``x0`` (ε̂ = (x_t − √ᾱ x̂_0)/√(1−ᾱ))
    or ``v`` = √ᾱ ε − √(1−ᾱ) x_0 (Salimans & Ho 2022: x̂_0 = √ᾱ x_t − √(1−ᾱ) v, ε̂ = √(1−ᾱ) x_t + √ᾱ v).
    ``sqrt_ab`` and ``sqrt_one_minus_ab`` broadcast against x_t. With ``clip_x0`` x̂_0 is clamped to [-1, 1]
    and ε̂ re-derived from it (improved DDPM's ``clip_denoised``).
    """
    a, s = sqrt_ab, sqrt_one_minus_ab
    if prediction == "eps":
        eps = out
        x0 = (x_t - s * eps) / a
    elif prediction == "x0":
        x0 = out
        eps = (x_t - a * x0) / s
    else:  # v
        x0 = a * x_t - s * out
        eps = s * x_t + a * out
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x_t - a * x0) / s
    return x0, eps


def q_posterior_coefficients(beta, ab, ab_prev):
    """(coefficient of x_0, coefficient of x_t, variance β̃_t) of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7):
    μ̃_t = √ᾱ_{t-1} β_t/(1 − ᾱ_t) x_0 + √(1 − β_t)(1 − ᾱ_{t-1})/(1 − ᾱ_t) x_t, β̃_t = β_t (1 − ᾱ_{t-1})/(1 − ᾱ_t).

    Floats or arrays. On a respaced grid β_t = 1 − ᾱ_t/ᾱ_{t-1} between kept steps (improved DDPM, Sec. 4).
    """
    coef_x0 = ab_prev**0.5 * beta / (1.0 - ab)
    coef_xt = (1.0 - beta) ** 0.5 * (1.0 - ab_prev) / (1.0 - ab)
    beta_tilde = beta * (1.0 - ab_prev) / (1.0 - ab)
    return coef_x0, coef_xt, beta_tilde


def reverse_log_variance(variance: str, log_beta, log_beta_tilde, learned=None):
    """log Σ_θ of p(x_{t-1} | x_t) (DDPM Sec. 3.2; improved DDPM eq. 15) from log β_t and log β̃_t.

    ``fixed_small``: log β̃_t; ``fixed_large``: log β_t; ``learned``: the network's variance channels
    ``learned`` as log Σ; ``learned_range``: frac·log β_t + (1 − frac)·log β̃_t with frac = (v + 1)/2.
    """
    if variance == "fixed_small":
        return log_beta_tilde
    if variance == "fixed_large":
        return log_beta
    if learned is None:
        raise ValueError(f"variance={variance!r} needs a model that outputs doubled (variance) channels")
    if variance == "learned":
        return learned
    frac = (learned + 1) / 2
    return frac * log_beta + (1 - frac) * log_beta_tilde


class GaussianDiffusion:
    """Tables and math of a T-step Gaussian diffusion.

    Args:
        betas: β_1..β_T (any array-like; stored as float64).
        prediction: what the network outputs: ``eps`` (ε, DDPM), ``x0``, or ``v`` = √ᾱ ε − √(1−ᾱ) x_0.
        variance: Σ_θ of the reverse step: ``fixed_small`` (β̃_t), ``fixed_large`` (β_t), ``learned`` (the
            network outputs log Σ), ``learned_range`` (the network outputs v ∈ [-1, 1] and
            log Σ = frac·log β + (1−frac)·log β̃, frac = (v+1)/2). Learned variants double the output channels.
        loss: ``simple`` (L_simple), ``hybrid`` (L_simple + λ·L_vlb, λ = ``vlb_weight``), ``vlb`` (L_vlb only).
        vlb_weight: λ of the hybrid loss (improved DDPM: 0.001).
        min_snr_gamma: if set, weight L_simple by min(SNR, γ)/SNR-equivalent (Hang et al. 2023).
        timestep_sampler: ``uniform`` or ``loss_second_moment`` (importance sampling of improved DDPM).
    """

    def __init__(
        self,
        betas,
        *,
        prediction: str = "eps",
        variance: str = "fixed_small",
        loss: str = "simple",
        vlb_weight: float = 1e-3,
        min_snr_gamma: float | None = None,
        timestep_sampler: str = "uniform",
    ):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {', '.join(PREDICTIONS)}")
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; expected one of {', '.join(VARIANCES)}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        b = check_betas(betas)
        self.prediction, self.variance, self.loss_type = prediction, variance, loss
        self.vlb_weight, self.min_snr_gamma = float(vlb_weight), min_snr_gamma
        self.num_steps = T = b.size
        self.timestep_sampler = make_timestep_sampler(timestep_sampler, T)
        self._set_tables(b)

    def _set_tables(self, b: np.ndarray) -> None:
        """The float64 tables of the process, indexed by the code timestep 0..T-1."""
        T = b.size
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        coef_x0, coef_xt, post_var = q_posterior_coefficients(b, ac, ac_prev)  # DDPM eq. 7
        f64 = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
        self.betas = f64(b)
        self.log_betas = torch.log(self.betas)
        self.alphas = f64(1.0 - b)
        self.alphas_cumprod = f64(ac)  # ᾱ_t
        self.alphas_cumprod_prev = f64(ac_prev)  # ᾱ_{t-1}, with ᾱ_0 := 1
        self.sqrt_alphas_cumprod = f64(np.sqrt(ac))
        self.sqrt_one_minus_alphas_cumprod = f64(np.sqrt(1.0 - ac))
        with np.errstate(divide="ignore"):  # ᾱ_T = 0 (zero terminal SNR): σ_T = ∞
            self.sigmas = f64(sigmas_from_alphas_cumprod(ac))  # σ_t = √((1 − ᾱ_t)/ᾱ_t), Karras et al.'s noise level
        self.log_sigmas = torch.log(self.sigmas)  # the table that ᾱ(t), σ(t) and t(σ) interpolate
        self.posterior_variance = f64(post_var)
        # β̃_0 = 0 (t = 0 is DDPM's step 1), so log β̃ is clipped to β̃_1 there (improved DDPM).
        clipped = np.append(post_var[1], post_var[1:]) if T > 1 else np.maximum(post_var, 1e-20)
        self.posterior_log_variance_clipped = f64(np.log(np.maximum(clipped, 1e-20)))
        self.posterior_mean_coef1 = f64(coef_x0)  # coefficient of x_0, eq. 7
        self.posterior_mean_coef2 = f64(coef_xt)  # coefficient of x_t
        # fixed_large: β_t, with β̃_1 at t = 0 so the decoder term stays finite (improved DDPM).
        large = np.append(post_var[1], b[1:]) if T > 1 else b
        self.large_variance = f64(large)
        self.large_log_variance = f64(np.log(large))

    # ----------------------------------------------------------------------------------------------------
    # Helpers

    @staticmethod
    def _learned(variance: str) -> bool:
        return variance in ("learned", "learned_range")

    @property
    def learned_variance(self) -> bool:
        return self._learned(self.variance)

    def output_channels(self, data_channels: int) -> int:
        """Channels the network must output for data with ``data_channels`` channels."""
        return 2 * data_channels if self.learned_variance else data_channels

    def _batch_timesteps(self, t, x: torch.Tensor) -> torch.Tensor:
        """Validate t (int or integer tensor of shape (B,) or ()) against x and T; return (B,) long on x.device."""
        if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
            t = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        elif not torch.is_tensor(t):
            raise TypeError(f"t must be an int or an integer tensor, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"t must hold integer timesteps 0..{self.num_steps - 1}, got dtype {t.dtype}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(
                f"t must have shape ({x.shape[0]},) to match x of shape {tuple(x.shape)}; got {tuple(t.shape)}"
            )
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_steps):
            raise ValueError(
                f"timestep out of range: t must be in 0..{self.num_steps - 1}, "
                f"got {t.min().item()}..{t.max().item()}"
            )
        return t.to(device=x.device, dtype=torch.long)

    @staticmethod
    def _gather(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] as a (B, 1, ..., 1) tensor in x's dtype and device."""
        v = table.to(x.device)[t].to(x.dtype)
        return v.reshape(-1, *([1] * (x.ndim - 1)))

    @staticmethod
    def _finite(x: torch.Tensor, name: str) -> None:
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")

    @staticmethod
    def _same_shape(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> None:
        if a.shape != b.shape:
            raise ValueError(f"{na} has shape {tuple(a.shape)} but {nb} has shape {tuple(b.shape)}")

    # ----------------------------------------------------------------------------------------------------
    # Continuous time: ᾱ(t), σ(t) and t(σ) between the integer steps (for the samplers)

    def _log_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(t as float64, log σ(t)): log σ interpolated linearly between neighbouring integer steps, t clamped
        to [0, T-1] (the Euler-family references interpolate the same way)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        log_sigma = self.log_sigmas
        tc = t.clamp(0, self.num_steps - 1)
        lo = tc.floor().long()
        hi = (lo + 1).clamp(max=self.num_steps - 1)
        w = tc - lo.double()
        mixed = (1 - w) * log_sigma[lo] + w * log_sigma[hi]
        return t, torch.where(w == 0, log_sigma[lo], mixed)  # integer t reads the table (log σ = inf at ᾱ = 0)

    def alpha_bar(self, t) -> torch.Tensor:
        """ᾱ(t) = 1/(1 + σ(t)²), float64, for a number or tensor t in [0, T-1], integer or fractional; t < 0 means
        "before the first step" (ᾱ = 1). At integer t it equals ``alphas_cumprod[t]`` up to rounding."""
        t, log_sigma = self._log_sigma(t)
        out = 1.0 / (1.0 + torch.exp(2 * log_sigma))
        return torch.where(t < 0, torch.ones_like(out), out)

    def sigma(self, t) -> torch.Tensor:
        """σ(t) = √((1 − ᾱ(t))/ᾱ(t)), float64: the noise level of x_t/√ᾱ_t = x_0 + σ ε (Karras et al. 2022);
        0 for t < 0."""
        t, log_sigma = self._log_sigma(t)
        out = torch.exp(log_sigma)
        return torch.where(t < 0, torch.zeros_like(out), out)

    def t_of_sigma(self, sigma) -> np.ndarray:
        """The fractional timestep whose interpolated log σ equals log ``sigma`` (inverse of :meth:`sigma`)."""
        s = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))
        log_sigmas = self.log_sigmas.numpy()
        return np.interp(s, log_sigmas, np.arange(log_sigmas.size, dtype=np.float64))

    # ----------------------------------------------------------------------------------------------------
    # Forward process

    def q_mean_variance(self, x0: torch.Tensor, t):
        """Mean, variance and log variance of q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) (DDPM eq. 4)."""
        t = self._batch_timesteps(t, x0)
        mean = self._gather(self.sqrt_alphas_cumprod, t, x0) * x0
        var = self._gather(1.0 - self.alphas_cumprod, t, x0).expand_as(x0)
        logvar = self._gather(torch.log(1.0 - self.alphas_cumprod), t, x0).expand_as(x0)
        return mean, var, logvar

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) in one step: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (DDPM eq. 4)."""
        t = self._batch_timesteps(t, x0)
        self._finite(x0, "x0")
        if noise is None:
            noise = torch.randn_like(x0)
        self._same_shape(noise, x0, "noise", "x0")
        a, s = self._sqrt_ab(t, x0)
        return a * x0 + s * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t):
        """(μ̃_t, β̃_t, log β̃_t clipped) of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6–7)."""
        self._same_shape(x0, x_t, "x0", "x_t")
        t = self._batch_timesteps(t, x_t)
        coef_x0 = self._gather(self.posterior_mean_coef1, t, x_t)
        coef_xt = self._gather(self.posterior_mean_coef2, t, x_t)
        mean = coef_x0 * x0 + coef_xt * x_t
        var = self._gather(self.posterior_variance, t, x_t).expand_as(x_t)
        logvar = self._gather(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, var, logvar

    # ----------------------------------------------------------------------------------------------------
    # Parameterisations

    def split_output(self, model_output: torch.Tensor, x_t: torch.Tensor):
        """Split the network output into (mean part, variance part or None) and check its channels."""
        c = x_t.shape[1]
        want = self.output_channels(c)
        if (model_output.ndim != x_t.ndim or model_output.shape[0] != x_t.shape[0] or model_output.shape[1] != want
                or model_output.shape[2:] != x_t.shape[2:]):
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)}; expected {(x_t.shape[0], want, *x_t.shape[2:])} "
                f"for x_t of shape {tuple(x_t.shape)} with variance={self.variance!r}"
            )
        if self.learned_variance:
            return model_output[:, :c], model_output[:, c:]
        return model_output, None

    def _sqrt_ab(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1 − ᾱ_t)) gathered for the batch, shaped (B, 1, ..., 1)."""
        return self._gather(self.sqrt_alphas_cumprod, t, x), self._gather(self.sqrt_one_minus_alphas_cumprod, t, x)

    def _x0_eps(self, out: torch.Tensor, x_t: torch.Tensor, t, *, prediction: str, clip_x0: bool = False):
        """(x̂_0, ε̂) at integer timesteps t from an output of kind ``prediction`` (see :func:`x0_eps_from_output`)."""
        t = self._batch_timesteps(t, x_t)
        return x0_eps_from_output(prediction, out, x_t, *self._sqrt_ab(t, x_t), clip_x0=clip_x0)

    def x0_from_eps(self, x_t, t, eps):
        """x_0 = (x_t − √(1 − ᾱ_t) ε)/√ᾱ_t (inverse of eq. 4)."""
        return self._x0_eps(eps, x_t, t, prediction="eps")[0]

    def eps_from_x0(self, x_t, t, x0):
        """ε = (x_t − √ᾱ_t x_0)/√(1 − ᾱ_t)."""
        return self._x0_eps(x0, x_t, t, prediction="x0")[1]

    def v_from(self, x0, eps, t):
        """v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022)."""
        a, s = self._sqrt_ab(self._batch_timesteps(t, x0), x0)
        return a * eps - s * x0

    def predict_x0(self, model_output, x_t, t):
        """x̂_0 from the network output under this process's ``prediction``."""
        out, _ = self.split_output(model_output, x_t)
        return self._x0_eps(out, x_t, t, prediction=self.prediction)[0]

    def predict_eps(self, model_output, x_t, t):
        """ε̂ from the network output under this process's ``prediction``."""
        out, _ = self.split_output(model_output, x_t)
        return self._x0_eps(out, x_t, t, prediction=self.prediction)[1]

    def target(self, x0, noise, t):
        """What the network is trained to output at (x_0, ε, t)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return self.v_from(x0, noise, t)

    # ----------------------------------------------------------------------------------------------------
    # Reverse process

    def p_mean_variance(self, model_output, x_t, t, *, clip_x0: bool = False) -> dict:
        """Mean and variance of p_θ(x_{t-1} | x_t) = N(μ_θ, Σ_θ) (DDPM eq. 1; improved DDPM eq. 15).

        μ_θ is the posterior mean μ̃_t(x_t, x̂_0) with x̂_0 from the network (optionally clamped to [-1, 1]).
        Returns a dict with ``mean``, ``variance``, ``log_variance``, ``pred_x0``, ``pred_eps``.
        """
        self._finite(model_output, "model output")
        t = self._batch_timesteps(t, x_t)
        out, var_values = self.split_output(model_output, x_t)
        # log β_t: with β̃_1 at t = 0 for fixed_large (see _set_tables), the plain β_0 for learned_range.
        log_beta = self._gather(self.large_log_variance if self.variance == "fixed_large" else self.log_betas, t, x_t)
        log_beta_tilde = self._gather(self.posterior_log_variance_clipped, t, x_t)
        logvar = reverse_log_variance(self.variance, log_beta, log_beta_tilde, var_values)
        fixed = {"fixed_small": self.posterior_variance, "fixed_large": self.large_variance}.get(self.variance)
        var = self._gather(fixed, t, x_t) if fixed is not None else torch.exp(logvar)
        pred_x0, pred_eps = self._x0_eps(out, x_t, t, prediction=self.prediction, clip_x0=clip_x0)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return {"mean": mean, "variance": var.expand_as(x_t), "log_variance": logvar.expand_as(x_t),
                "pred_x0": pred_x0, "pred_eps": pred_eps}

    # ----------------------------------------------------------------------------------------------------
    # Losses

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = ᾱ_t/(1 − ᾱ_t), float64."""
        ac = self.alphas_cumprod.to(t.device)[t]
        return ac / (1.0 - ac)

    def _min_snr_weight(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ weight expressed for this process's target (Hang et al. 2023)."""
        snr = self.snr(t)
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        w = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[self.prediction]
        return w.to(x.dtype)

    def vlb_term(self, model_output, x0, x_t, t, *, clip_x0: bool = False) -> torch.Tensor:
        """One term of the bound in bits per dimension: L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p_θ(x_{t-1}|x_t))
        for t > 0 (code index), and the decoder −log p_θ(x_0 | x_1) over 8-bit bins at t = 0."""
        t = self._batch_timesteps(t, x_t)
        true_mean, _, true_logvar = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance(model_output, x_t, t, clip_x0=clip_x0)
        kl = mean_flat(normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"])) / LN2
        log_likelihood = discretized_gaussian_log_likelihood(x0, means=p["mean"], log_scales=0.5 * p["log_variance"])
        nll = -mean_flat(log_likelihood) / LN2
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self, model_fn: Callable, x0: torch.Tensor, t=None, noise=None, *, generator=None, **cond
    ) -> dict:
        """Per-sample training loss of a batch; returns a dict with ``loss`` (B,), ``mse`` and, when used, ``vlb``.

        L_simple = ‖target − network output‖² (DDPM eq. 14), target ε, x_0 or v. With a learned variance the
        hybrid loss adds λ·T·L_t with the mean detached, so the bound's gradient reaches only Σ_θ (improved
        DDPM Sec. 3.1). ``t`` is drawn by the timestep sampler when omitted; importance weights apply then.
        """
        self._finite(x0, "x0")
        weights = None
        if t is None:
            t, weights = self.timestep_sampler.sample(x0.shape[0], device=x0.device, generator=generator)
            weights = weights.to(x0.dtype)
        t = self._batch_timesteps(t, x0)
        if noise is None:
            if generator is not None:
                noise = torch.randn(x0.shape, generator=generator, device="cpu", dtype=x0.dtype).to(x0.device)
            else:
                noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        model_output = model_fn(x_t, t, **cond)
        out, var_values = self.split_output(model_output, x_t)
        terms = {}
        if self.loss_type != "vlb":
            mse = mean_flat((self.target(x0, noise, t) - out) ** 2)
            if self.min_snr_gamma is not None:
                mse = mse * self._min_snr_weight(t, x0)
            terms["mse"] = mse
        if self.loss_type != "simple":
            frozen = out.detach() if self.loss_type == "hybrid" else out
            frozen_output = torch.cat([frozen, var_values], dim=1) if var_values is not None else frozen
            scale = self.vlb_weight * self.num_steps if self.loss_type == "hybrid" else self.num_steps
            terms["vlb"] = scale * self.vlb_term(frozen_output, x0, x_t, t) * LN2  # in nats, as the mse
        loss = terms.get("mse", 0) + terms.get("vlb", 0)
        if weights is not None:
            loss = loss * weights
        terms["loss"] = loss
        terms["t"] = t
        return terms

    # ----------------------------------------------------------------------------------------------------
    # The variational bound

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension (no parameters; near 0 for a good schedule)."""
        t = torch.full((x0.shape[0],), self.num_steps - 1, dtype=torch.long, device=x0.device)
        mean, _, logvar = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(logvar))) / LN2

    @torch.no_grad()
    def bits_per_dim(
        self, model_fn: Callable, x0: torch.Tensor, *, clip_x0: bool = False, generator=None,
        progress: Callable | None = None, **cond,
    ) -> dict:
        """DDPM's bound (Ho et al. eq. 5) −log p(x_0) ≤ L_T + Σ_{t>1} L_{t-1} + L_0 in bits per dimension, all T steps.

        ``x0`` is a batch in [-1, 1] (8-bit levels); every step is evaluated for the whole batch with fresh
        noise. ``progress(i, T)`` is called after each step. Returns ``total`` (B,), ``prior`` (B,),
        ``terms`` (B, T) with terms[:, t] = L_t at code index t (t = 0: decoder), and ``mse`` (B, T) of x̂_0.
        """
        self._finite(x0, "x0")
        B, T = x0.shape[0], self.num_steps
        terms = torch.zeros(B, T, dtype=torch.float64, device=x0.device)
        mses = torch.zeros(B, T, dtype=torch.float64, device=x0.device)
        for i, step in enumerate(range(T - 1, -1, -1)):
            t = torch.full((B,), step, dtype=torch.long, device=x0.device)
            if generator is not None:
                noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
            else:
                noise = torch.randn_like(x0)
            x_t = self.q_sample(x0, t, noise)
            out = model_fn(x_t, t, **cond)
            terms[:, step] = self.vlb_term(out, x0, x_t, t, clip_x0=clip_x0).double()
            mses[:, step] = mean_flat((self.predict_x0(out, x_t, t) - x0) ** 2).double()
            if progress is not None:
                progress(i + 1, T)
        prior = self.prior_bpd(x0).double()
        return {"total": terms.sum(dim=1) + prior, "prior": prior, "terms": terms, "mse": mses}

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(T={self.num_steps}, prediction={self.prediction!r}, variance={self.variance!r}, "
                f"loss={self.loss_type!r})")
