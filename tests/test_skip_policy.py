"""Tests that cannot fail or skip silently (issue 17, item 8): the conftest hook that fails a run in which a test
was skipped without a stated reason, run on small test files in a fresh pytest process each."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent

CASES = {
    "skip() without a reason": ("import pytest\ndef test_a():\n    pytest.skip()\n", 1),
    "mark.skip without a reason": ("import pytest\n@pytest.mark.skip\ndef test_a():\n    pass\n", 1),
    "skipif without a reason": ("import pytest\n@pytest.mark.skipif('True')\ndef test_a():\n    pass\n", 1),
    "importorskip of the project": ("import pytest\ndef test_a():\n    pytest.importorskip('latentdiff.nope')\n", 1),
    "skip with a reason": ("import pytest\ndef test_a():\n    pytest.skip('needs a GPU')\n", 0),
    "skipif with a reason": ("import pytest\n@pytest.mark.skipif(True, reason='not on this OS')\n"
                             "def test_a():\n    pass\n", 0),
    "importorskip of another package": ("import pytest\ndef test_a():\n    pytest.importorskip('no_such_pkg_x')\n", 0),
    "xfail": ("import pytest\n@pytest.mark.xfail(reason='known')\ndef test_a():\n    assert False\n", 0),
}


def _run(tmp_path: Path, cases: list[str]) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["helpers.skip_policy"]\n')
    for i, case in enumerate(cases):
        (tmp_path / f"test_case{i}.py").write_text(CASES[case][0])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)


def test_skips_without_a_stated_reason_fail_the_run_and_are_listed(tmp_path):
    proc = _run(tmp_path, list(CASES))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = proc.stdout.split("skipped without a stated reason")[1]
    listed = {line.split("::")[0] for line in summary.splitlines() if "::" in line}
    expected = {f"test_case{i}.py" for i, c in enumerate(CASES) if CASES[c][1]}
    assert listed == expected, proc.stdout


def test_skips_with_a_stated_reason_pass(tmp_path):
    proc = _run(tmp_path, [c for c in CASES if not CASES[c][1]])
    assert proc.returncode == 0 and "skipped without a stated reason" not in proc.stdout, proc.stdout + proc.stderr
