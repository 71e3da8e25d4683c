import pytest
import torch

# Shared helpers live in tests/helpers/ (imported as ``helpers.analytic`` etc.: pyproject.toml puts tests/ on the
# path with pytest's ``pythonpath`` setting).

# One torch thread per test process: the suite runs as two pytest-xdist workers (Makefile), one per core,
# and tiny-tensor tests lose 10x or more to idle threads spinning when two processes share a core.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# A skip must say why: `make test` fails on a test skipped without a stated reason (helpers/skip_policy.py).
pytest_plugins = ["helpers.skip_policy"]
