"""Stage: sweeps with Ray Tune -- the search-space spec and result storage (``spec``), one trial (``trial``),
the driver (``driver``: Optuna + ASHA, resume, baselines, best-prompt export), the leaderboard and plot
(``leaderboard``) and experiment tracking (``tracking``). Imports the stages below it, never ``serve``/``cli``."""
