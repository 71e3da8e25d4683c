"""Noise schedules, timestep spacings and sigma grids. Pure functions, float64 throughout.

Code index t = 0..T-1 is DDPM's step t+1 = 1..T (Ho et al. 2020; see docs/notation.md).
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")
SPACINGS = ("leading", "trailing", "linspace")


def _check_num_steps(num_steps: int, name: str = "num_steps") -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(num_steps).__name__}")
    if num_steps < 1:
        raise ValueError(f"{name} must be >= 1, got {num_steps}")


def make_betas(name: str, num_steps: int = 1000, **options) -> np.ndarray:
    """β_1..β_T of a named schedule as a float64 array of length T.

    - ``linear``: β from ``beta_start`` (1e-4) to ``beta_end`` (0.02), DDPM's schedule (Ho et al. 2020).
      ``rescale=True`` multiplies both ends by 1000/T (improved DDPM), so other T keep the same total noise.
    - ``scaled_linear``: √β linear from √0.00085 to √0.012 (LDM, Stable Diffusion; CompVis calls it "linear").
    - ``cosine``: ᾱ(t) = cos²(((t/T + s)/(1 + s)) π/2), s = 0.008, β_t = 1 − ᾱ(t)/ᾱ(t−1) clipped at
      ``max_beta`` = 0.999 (Nichol & Dhariwal 2021, eq. 17).
    - ``sigmoid``: β = sigmoid(linspace(−6, 6, T)) · (beta_end − beta_start) + beta_start (GeoDiff; what
      diffusers calls "sigmoid").
    """
    _check_num_steps(num_steps)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
    allowed = {
        "linear": {"beta_start", "beta_end", "rescale"},
        "scaled_linear": {"beta_start", "beta_end"},
        "cosine": {"s", "max_beta"},
        "sigmoid": {"beta_start", "beta_end"},
    }[name]
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"schedule {name!r} got unknown option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    T = int(num_steps)
    if name == "linear":
        start, end = options.get("beta_start", 1e-4), options.get("beta_end", 0.02)
        if options.get("rescale", False):
            start, end = start * 1000.0 / T, end * 1000.0 / T
        betas = np.linspace(start, end, T, dtype=np.float64)
    elif name == "scaled_linear":
        start, end = options.get("beta_start", 0.00085), options.get("beta_end", 0.012)
        betas = np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2
    elif name == "cosine":
        s, max_beta = options.get("s", 0.008), options.get("max_beta", 0.999)

        def alpha_bar(u: float) -> float:
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = np.array(
            [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)], dtype=np.float64
        )
    else:  # sigmoid
        start, end = options.get("beta_start", 1e-4), options.get("beta_end", 0.02)
        x = np.linspace(-6, 6, T, dtype=np.float64)
        betas = 1.0 / (1.0 + np.exp(-x)) * (end - start) + start
    check_betas(betas)
    return betas


def check_betas(betas) -> np.ndarray:
    """Validate a β array: 1-D, finite, every β in (0, 1); a final β of exactly 1 is allowed (zero terminal SNR)."""
    b = np.asarray(betas, dtype=np.float64)
    if b.ndim != 1 or b.size < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {b.shape}")
    if not np.all(np.isfinite(b)):
        raise ValueError("betas contain NaN or inf")
    bad = np.nonzero((b <= 0) | (b > 1) | ((b == 1) & (np.arange(b.size) < b.size - 1)))[0]
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"betas must lie in (0, 1) (only the last may be 1); beta[{i}] = {float(b[i])!r}")
    return b


def alphas_cumprod(betas) -> np.ndarray:
    """ᾱ_t = ∏_{s≤t} (1 − β_s), float64."""
    return np.cumprod(1.0 - check_betas(betas))


def rescale_zero_terminal_snr(betas) -> np.ndarray:
    """Shift and scale √ᾱ so that ᾱ_T = 0 and ᾱ_1 is unchanged (Lin et al. 2024, Algorithm 1).

    The last β becomes exactly 1: the final step carries no signal, so models must predict v or x_0 there.
    """
    sqrt_ab = np.sqrt(alphas_cumprod(betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


# ---------------------------------------------------------------------------------------------------------
# Timestep grids for sampling with fewer steps than T.


def timesteps(num_train_steps: int, steps: int, spacing: str = "leading", offset: int = 0) -> np.ndarray:
    """Descending integer timesteps (0..T-1) at which a sampler evaluates the model.

    - ``leading``: arange(0, N) · (T // N) + offset, reversed (DDIM paper, Stable Diffusion with offset 1).
    - ``trailing``: round(arange(T, 0, −T/N)) − 1, so the first step is always T−1 (Lin et al. 2024).
    - ``linspace``: round(linspace(0, T−1, N)), reversed.
    """
    _check_num_steps(num_train_steps, "num_train_steps")
    _check_num_steps(steps, "steps")
    T, N = int(num_train_steps), int(steps)
    if N > T:
        raise ValueError(f"steps ({N}) cannot exceed the number of training steps T ({T})")
    if spacing == "leading":
        ts = np.arange(0, N, dtype=np.int64) * (T // N) + int(offset)
    elif spacing == "trailing":
        if offset:
            raise ValueError("offset applies to 'leading' spacing only")
        ts = np.round(np.arange(T, 0, -T / N)).astype(np.int64) - 1
        return ts  # already descending
    elif spacing == "linspace":
        if offset:
            raise ValueError("offset applies to 'leading' spacing only")
        ts = np.round(np.linspace(0, T - 1, N)).astype(np.int64)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")
    if ts.max() > T - 1 or ts.min() < 0:
        raise ValueError(f"offset {offset} moves timesteps outside 0..{T - 1}")
    return ts[::-1].copy()


def space_timesteps(num_train_steps: int, section_counts) -> np.ndarray:
    """Improved DDPM's respacing: split 0..T-1 into equal sections and take evenly strided steps from each.

    ``section_counts`` is a list of ints (steps per section) or a string such as ``"10,15,20"`` or
    ``"ddim50"`` (a single stride that hits exactly 50 steps). Returns ascending timesteps.
    """
    _check_num_steps(num_train_steps, "num_train_steps")
    T = int(num_train_steps)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim") :])
            for stride in range(1, T):
                if len(range(0, T, stride)) == want:
                    return np.arange(0, T, stride, dtype=np.int64)
            raise ValueError(f"cannot take exactly {want} steps from T={T} with one integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    counts = [int(c) for c in section_counts]
    size, extra = divmod(T, len(counts))
    start, out = 0, []
    for i, count in enumerate(counts):
        length = size + (1 if i < extra else 0)
        if count > length or count < 1:
            raise ValueError(f"cannot take {count} steps from a section of {length}")
        stride = (length - 1) / (count - 1) if count > 1 else 1
        out += [start + round(stride * j) for j in range(count)]
        start += length
    return np.array(sorted(set(out)), dtype=np.int64)


def sigmas_from_alphas_cumprod(ac) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t): the noise level of x_t/√ᾱ_t in the variance-exploding view (Karras et al. 2022)."""
    ac = np.asarray(ac, dtype=np.float64)
    return np.sqrt((1.0 - ac) / ac)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^{1/ρ} + i/(n−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, descending."""
    _check_num_steps(n, "n")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = np.linspace(0, 1, n, dtype=np.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho
