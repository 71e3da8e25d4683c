"""A pytest plugin (loaded by tests/conftest.py): a run in which a test was skipped without a stated reason, or
in which an importorskip of the project's own modules turned an ImportError into a skip, fails (issue 17), and
its summary lists those tests. xfail is not a skip."""

import pytest

_UNEXPLAINED: list[tuple[str, str]] = []
_PLACEHOLDERS = ("", "unconditional skip")  # pytest's text for skip() / mark.skip without a reason


def skip_reason_is_stated(reason: str) -> bool:
    """Whether a skip's reason (as a report shows it) says why: not empty, not pytest's placeholder text, not a
    bare ``skipif`` condition, and not an import of latentdiff itself."""
    text = reason.strip()
    for prefix in ("Skipped: ", "Skipped"):
        if text.startswith(prefix):
            text = text[len(prefix):].strip()
            break
    return text not in _PLACEHOLDERS and not text.startswith("condition:") \
        and not text.startswith("could not import 'latentdiff")


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr or "")
        if not skip_reason_is_stated(reason):
            _UNEXPLAINED.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter):
    if _UNEXPLAINED:
        terminalreporter.section("skipped without a stated reason (this fails the run)")
        for nodeid, reason in _UNEXPLAINED:
            terminalreporter.line(f"{nodeid}: {reason!r}")


def pytest_sessionfinish(session, exitstatus):
    if _UNEXPLAINED and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
