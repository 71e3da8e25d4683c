"""Running the `latentdiff` command in-process from tests."""

import contextlib
import io

from latentdiff import cli


def run_cli(capsys, *args):
    """(exit status, stdout, stderr) of ``latentdiff ARGS`` run in-process; argparse errors (SystemExit) give
    their exit status too."""
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def captured(*args):
    """(exit status, stdout, stderr) of ``latentdiff ARGS`` run in-process without pytest's capsys (for
    module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()
