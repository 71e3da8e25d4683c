"""Kill anywhere (issue 17, item 2): a tiny run SIGKILLed at random moments (after a step, inside a checkpoint
write at any of its file and folder syncs, while old checkpoints are pruned, in the first step after a resume,
and after a random delay), resumed each time with ``resume=True``, ends with the same bytes as a run that was
never interrupted: weights, EMA, optimizer and objective states, RNG states and the logged losses.

The moments are drawn from a seeded generator, each after the step the run will resume from, so every kill
lands and the run never finishes early. Each run is a process forked from one server that did the imports, so a
kill costs milliseconds. The CI variant kills 6 times (one of each kind); the slow one 20 times.
"""

import contextlib
import csv
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latentdiff.train import list_checkpoints, verify_checkpoint

from helpers.kill_script import CONFIG

TESTS = Path(__file__).parent
FILES = ("models/unet.safetensors", "ema/unet.safetensors", "optimizers.pt", "objective.pt", "rng/rank0.pt")
SYNCS = 11  # file and folder syncs of one checkpoint write of this run (5 files, 4 folders, rename, `latest`)


class Runs:
    """Runs of helpers/kill_script.py forked from one server process (imports done once)."""

    def __init__(self):
        path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=path)
        self.server = subprocess.Popen([sys.executable, "-m", "helpers.kill_script", "--serve"], env=env, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def run(self, *args, kill_after: float | None = None) -> tuple[int, str]:
        """(exit code, output) of one run; SIGKILLed ``kill_after`` seconds after it printed ``ready``. The seconds
        from ``ready`` to the exit are kept in ``self.seconds``."""
        self.server.stdin.write(" ".join(map(str, args)) + "\n")
        self.server.stdin.flush()
        lines, pid, ready, t_ready = [], None, False, None
        while True:
            line = self.server.stdout.readline()
            if not line:
                raise AssertionError("the run server died:\n" + "".join(lines))
            if line.startswith("exit "):
                self.seconds = time.perf_counter() - (t_ready or time.perf_counter())
                return int(line.split()[1]), "".join(lines)
            lines.append(line)
            pid = int(line.split()[1]) if line.startswith("pid ") else pid
            if not ready and line.strip() == "ready":
                ready, t_ready = True, time.perf_counter()
            if kill_after is not None and pid and ready:
                time.sleep(kill_after)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                kill_after = None

    def close(self):
        self.server.stdin.close()
        self.server.wait(timeout=30)


def _resume_point(out: Path) -> int:
    """The step a resume starts from: the newest checkpoint that verifies (0 if none)."""
    for step, path in reversed(list_checkpoints(out)):
        try:
            verify_checkpoint(path)
            return step
        except Exception:
            continue
    return 0


def _moment(kind: str, point: int, rng: random.Random) -> str:
    """A moment of ``kind`` after step ``point``, no later than the next checkpoint."""
    every = CONFIG["checkpoint_every"]
    nxt = point + every
    if nxt >= CONFIG["steps"]:  # near the end, only moments that cannot complete the run
        kind = {"prune": "write", "time": "first-step"}.get(kind, kind)
        if kind == "write":
            return f"write:{nxt}:{rng.randint(1, SYNCS - 2)}"  # before the rename into place
    if kind == "step":
        return f"step:{rng.randint(point + 1, nxt)}"
    if kind == "write":
        return f"write:{nxt}:{rng.randint(1, SYNCS)}"
    if kind == "prune":  # with keep_checkpoints=2, the write of a third checkpoint deletes the oldest
        return f"prune:{max(nxt, 3 * every)}"
    return kind  # first-step, time


def _kill_and_resume(runs: Runs, out: Path, kinds: list[str], seed: int, step_seconds: float
                     ) -> list[tuple[str, int, int]]:
    """Run into ``out``, killed once per entry of ``kinds`` (a kind, or a moment as the script takes it), then to
    the end; (moment, resumed from, exit code) of each process. A "time" kill comes after a random delay within
    the first half of what the remaining steps took in the uninterrupted run (``step_seconds`` each), so that it
    lands before the end on a fast machine as on a slow one."""
    rng = random.Random(seed)
    log = []
    for i, kind in enumerate([*kinds, None]):
        point = _resume_point(out)
        moment = kind if kind is None or ":" in kind else _moment(kind, point, rng)
        args = [out, *(["--resume"] if i else []), *(["--kill", moment] if moment not in (None, "time") else [])]
        delay = rng.uniform(0.0, 0.5 * (CONFIG["steps"] - point) * step_seconds)
        code, output = runs.run(*args, kill_after=delay if moment == "time" else None)
        log.append((moment or "end", point, code))
        if kind is None:
            assert code == 0 and f"done step={CONFIG['steps']}" in output, (log, output)
        else:
            assert code == -signal.SIGKILL, (log, output)
        if code == 0:
            break
    return log


def _same_bytes(a: Path, b: Path) -> None:
    step = f"step_{CONFIG['steps']:07d}"
    for f in FILES:
        fa, fb = a / "checkpoints" / step / f, b / "checkpoints" / step / f
        assert hashlib.sha256(fa.read_bytes()).digest() == hashlib.sha256(fb.read_bytes()).digest(), f

    def losses(run):
        with open(run / "metrics.csv", newline="") as fh:
            return [(r["step"], r["loss"]) for r in csv.DictReader(fh)]

    assert losses(a) == losses(b)


def _check(tmp_path: Path, kinds: list[str], seed: int) -> list:
    runs = Runs()
    try:
        code, out = runs.run(tmp_path / "A")  # uninterrupted
        assert code == 0, out
        log = _kill_and_resume(runs, tmp_path / "B", kinds, seed, runs.seconds / CONFIG["steps"])
    finally:
        runs.close()
    _same_bytes(tmp_path / "A", tmp_path / "B")
    kills = sum(code == -signal.SIGKILL for _, _, code in log)
    print(f"\nkill-anywhere seed {seed}: {kills} kills survived, bytes equal; moments {[m for m, _, _ in log]}")
    return log


@pytest.mark.timeout(120)
def test_killed_at_six_moments_and_resumed_gives_the_same_bytes(tmp_path):
    log = _check(tmp_path, ["step:5", "first-step", "write", "prune", "write", "time"], seed=17)
    assert sum(code == -signal.SIGKILL for _, _, code in log) == 6
    assert any(m.startswith("write:") for m, _, _ in log) and any(m == "first-step" for m, p, _ in log if p > 0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_at_twenty_random_moments_and_resumed_gives_the_same_bytes(tmp_path):
    rng = random.Random(2017)
    kinds = [rng.choice(["step", "write", "write", "prune", "first-step", "time"]) for _ in range(20)]
    log = _check(tmp_path, kinds, seed=2017)
    assert sum(code == -signal.SIGKILL for _, _, code in log) == 20
