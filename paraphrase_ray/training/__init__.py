"""Stage: training one prompt on a frozen model -- the target-only loss (``loss``) and the loop with its
schedules, validation, checkpoints and callbacks (``trainer``). Imports the flat core and ``prompt``."""
