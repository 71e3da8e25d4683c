"""Shared test helpers: exact Gaussian answers (analytic), the in-process command (clitools), a tiny denoiser and
its data (train_tiny), and the training scripts run as subprocesses (``python -m helpers.train_resume_script``).
``tests/`` is on the path through pytest's ``pythonpath`` setting (pyproject.toml)."""
