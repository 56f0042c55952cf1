"""`paraphrase-ray` command line: a thin map from commands to library functions.

``cli.parser.build_parser`` defines every command and flag; ``COMMANDS`` below maps each command name to the
function in ``cli.commands`` that runs it. Heavy imports (torch, Ray) happen inside the commands, so ``--help``
is instant.

The edge of the program: a problem the user can fix (any ``paraphrase_ray.errors.ParaphraseRayError``: a bad
config, data, model, prompt file or Hub argument) prints one ``error: ...`` line and exits 2; Ctrl-C exits 130;
any other exception is a bug and keeps its traceback (exit 1).

    paraphrase-ray COMMAND ...          # the console script
    python -m paraphrase_ray.cli ...    # the same (also: python -m paraphrase_ray.cli.main)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from paraphrase_ray.cli import commands
from paraphrase_ray.cli.parser import build_parser
from paraphrase_ray.errors import ParaphraseRayError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": commands.cmd_train,
    "paraphrase": commands.cmd_paraphrase,
    "push": commands.cmd_push,
    "data": commands.cmd_data,
    "evaluate": commands.cmd_evaluate,
    "tune": commands.cmd_tune,
    "serve": commands.cmd_serve,
    "explain": commands.cmd_explain,
}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test capture swaps it between calls)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """The library logs to "paraphrase_ray"; the command line shows those lines on stderr as plain text."""
    logger = logging.getLogger("paraphrase_ray")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return int(COMMANDS[args.command](args) or 0)
    except ParaphraseRayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
