"""The sweep CLI: a grid of ViT runs (sizes x compute budgets x seeds x lrs) on SLURM or locally.
Rerunning the same command is safe; exit codes and what a rerun does: docs/sweeps.md.

    python launchers/sweep.py --preset demo                      # CPU demo, built-in data
    python launchers/sweep.py --sizes S,B --gpus 8 --preset imagenet --data /data/in1k \\
        --budgets 1e18,3e18 --partition gpu --time 1440 --dry-run
    python launchers/sweep.py status [--results results] [--watch [SECONDS]]
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file of a checkout (`python launchers/sweep.py`): Python put launchers/ itself
    # first on sys.path, from where `import launchers` fails unless the package is installed
    # (and its modules would shadow top-level names such as `progress`). The checkout's root
    # takes that place, so the file runs its own checkout's code, installed or not; the runs'
    # processes are pointed at the same place (launchers.slurm.child_env). The console script
    # (vit-sweep) and `python -m launchers.sweep` import this module from the package: no edit.
    _HERE = Path(__file__).resolve().parent
    if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
        sys.path[0] = str(_HERE.parent)
    else:
        sys.path.insert(0, str(_HERE.parent))

from launchers.cli import parse_args, parse_status_args
from scaling.writes import DiskFull


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signum)  # SIGTERM ends the sweep the way Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (or `status`); 0 ok, 1 a failure, 2 bad input, 128 + N stopped by signal N
    (130: Ctrl-C, 141: the reader of stdout went away)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    main_thread = threading.current_thread() is threading.main_thread()  # signal's rule
    old = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        if argv[:1] == ["status"]:  # each command imports only its own modules (start-up)
            from launchers.status import run_status

            args = parse_status_args(argv[1:])
            code = run_status(args.results, args.watch)
        else:  # the sweep's modules: 0.2 s that `status` does not wait for
            from launchers.launch import run_sweep

            code = run_sweep(parse_args(argv))
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at interpreter exit
        return code
    except BrokenPipeError:  # `sweep.py ... | head`: the reader has what it wanted
        from launchers.progress import drop_stdout

        drop_stdout()
        return 128 + signal.SIGPIPE
    except ValueError as e:  # bad input: nothing was submitted
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, DiskFull) as e:  # DiskFull: one line naming the file
        print(f"sweep: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # local runs were checkpointed, claims released
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        print("sweep: interrupted; rerun to resume", file=sys.stderr)
        return 128 + signum
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
