"""Train one tiny recipe through the command and print a digest of everything it wrote that must repeat
(run as a fresh subprocess by test_reproducible.py, twice per objective).

    python -m helpers.repro_script KIND OUT_DIR [FIRST_STAGE]

KIND is ddpm (pixel diffusion), ae (autoencoder with its discriminator, the GAN term on from step 2) or ldm
(latent diffusion in the autoencoder folder FIRST_STAGE, on posterior samples). Prints one line per file:
``digest <relative path> <sha256>``, the run folder's path replaced by OUT; state.json without its wall-clock
time (and its own checksum, which covers the time), metrics.csv without its step rate.
"""

import csv
import hashlib
import io
import json
import sys
from pathlib import Path

import torch

from latentdiff import cli

CONFIGS = {
    "ddpm": """
model: {preset: tiny, num_classes: 10, dropout: 0.1}
diffusion: {schedule: cosine, num_steps: 50}
data: {name: digits, size: 8}
train: {steps: 4, batch_size: 8, lr: 1.0e-3, ema_decay: 0.9, cond_drop_prob: 0.2, checkpoint_every: 2,
        log_every: 1, sample_every: 0, mixed_precision: "no"}
""",
    "ae": """
autoencoder: {regularizer: kl, ch: 8, ch_mult: [1, 2], num_res_blocks: 1, z_channels: 3, embed_dim: 3, norm_groups: 8}
loss: {rec_loss: l2, disc_start: 2}
discriminator: {ndf: 8, n_layers: 1, norm: group}
data: {name: shapes, size: 16}
train: {steps: 4, batch_size: 4, lr: 2.0e-3, ema_decay: 0.0, checkpoint_every: 2, log_every: 1, sample_every: 0,
        mixed_precision: "no"}
eval_num: 8
""",
    "ldm": """
model: {{preset: tiny, num_classes: null}}
diffusion: {{schedule: cosine, num_steps: 50}}
data: {{name: shapes, size: 16}}
latent: {{first_stage: {ae}, sample_posterior: true, cache: true, cache_pool: 16}}
train: {{steps: 4, batch_size: 4, lr: 1.0e-3, ema_decay: 0.9, checkpoint_every: 2, log_every: 1, sample_every: 0,
        mixed_precision: "no"}}
""",
}


def digest(out: Path) -> list[str]:
    """``path sha256`` of every file of the run folder that must repeat exactly."""
    lines = []
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = f.relative_to(out).as_posix()
        data = f.read_bytes().replace(str(out).encode(), b"OUT")  # the run folder's own path, in its configs
        if f.name == "state.json":
            state = json.loads(data)
            state.pop("time")
            state.pop("state_sha256")  # its own checksum covers the time
            data = json.dumps(state, sort_keys=True).encode()
        elif f.name == "metrics.csv":
            rows = list(csv.DictReader(io.StringIO(data.decode())))
            data = json.dumps([{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows]).encode()
        elif f.suffix in (".log", ".txt") or "events.out" in f.name:
            continue
        lines.append(f"{rel} {hashlib.sha256(data).hexdigest()}")
    return lines


def main():
    kind, out = sys.argv[1], Path(sys.argv[2])
    text = CONFIGS[kind].format(ae=sys.argv[3]) if kind == "ldm" else CONFIGS[kind]
    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(text)
    rc = cli.main(["train", str(cfg), "--out", str(out), "--quiet"])
    if rc != 0:
        sys.exit(rc)
    print("\n".join(f"digest {line}" for line in digest(out)), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
