"""User errors and how a tool's main() turns them (and termination signals) into one line and an exit status."""
from __future__ import annotations

import signal
import sys


class UserError(Exception):
    """A problem with the user's input: printed as one line (naming the file and the fix), exit code 2."""


class Interrupted(KeyboardInterrupt):
    """A termination signal turned into an exception, so `finally` blocks and context managers clean up (temporary
    files, worker pools, child processes) as they do on Ctrl-C. args[0] is the signal number."""


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def run_main(main):
    """Run a tool's main(argv): user errors become one line on stderr and exit status 2, never a traceback;
    Ctrl-C and SIGTERM print "interrupted" and exit 128 + the signal number (130 / 143), as a shell reports them."""
    # SIGTERM's default action kills at once: no cleanup, forked workers orphaned, temporary files left behind
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        sys.exit(main(sys.argv[1:]) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        sys.exit(128 + (e.args[0] if isinstance(e, Interrupted) else signal.SIGINT))


def import_tensorrt(what: str):
    """The tensorrt module, or a one-line error saying `what` needs it and how to get it."""
    try:
        import tensorrt  # optional: only the GPU side has TensorRT
    except ImportError:
        raise UserError(f"{what} needs TensorRT's Python package, which is not installed here: install it (pip "
                        f"install tensorrt, or pixi's gpu environment) or run it on a machine with TensorRT and a GPU"
                        ) from None
    return tensorrt
