"""Running the `latentdiff` command in-process from tests."""

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
