"""Expected failures of the command-line entry points, said in one line.

Every process (``python -m learner``, ``python -m actors``, ``python -m buffer``, ``python -m tiny``) runs its
``main`` through :func:`run_main`::

    if __name__ == "__main__":
        sys.exit(run_main(main))

What is expected to go wrong at start (Redis unreachable or refusing the password, a port in use, a bad config,
a missing model directory) raises :class:`DcrlError` with a message that names the setting or environment
variable to change; ``run_main`` prints it as ``error: <message>`` and exits 2, with no traceback, because the
traceback of an expected failure points at our code, not at what the user must fix. ``--debug`` or
``DCRL_DEBUG=1`` prints the traceback too. Anything else is a bug and keeps its full traceback.

Lives in ``protocol`` because every package may import it (see tests/test_architecture.py) and it imports
nothing of the tree.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Sequence

EXIT_EXPECTED_FAILURE = 2  # the exit status argparse uses for a bad command line


class DcrlError(Exception):
    """An expected failure; ``str(err)`` is one line naming what failed and the setting to change."""


def debug_requested(argv: Sequence[str], environ=os.environ) -> bool:
    """``--debug`` on the command line or ``DCRL_DEBUG=1``: show tracebacks of expected failures too.
    Read from the raw arguments, so it holds even when the failure comes before (or from) argument parsing."""
    return "--debug" in argv or environ.get("DCRL_DEBUG", "") not in ("", "0")


def add_debug_arg(parser) -> None:
    """The ``--debug`` flag of every entry point (run_main reads it; main may ignore it)."""
    parser.add_argument("--debug", action="store_true",
                        help="on an expected failure, print the full traceback too (also DCRL_DEBUG=1)")


def run_main(main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """``main(argv)``'s exit status; a DcrlError becomes ``error: <message>`` on stderr and status 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(argv)
    except DcrlError as e:
        if debug_requested(argv):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_EXPECTED_FAILURE
