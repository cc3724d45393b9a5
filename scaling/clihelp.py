"""What every command shares: one --help style (each option shows its one-line meaning and its
default), one-line argparse errors, and the fast exit of a finished process (`exit_now`)."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to an option's help unless the text already says its default or
    there is none to show (a required option, a flag that is off, an unset optional value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == "" or default is argparse.SUPPRESS
        if "default" in text or action.required or unset or not action.option_strings:
            return text
        if isinstance(default, bool) or isinstance(action, argparse.BooleanOptionalAction):
            default = "on" if default else "off"
        return f"{text} (default: {default})"


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit 2), without the usage block, and
    whose help shows defaults (DefaultsHelpFormatter)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown when nothing is left to clean up.

    By now final.json, metrics, checkpoints and the export are closed files and the process
    group is destroyed; tearing down the modules of torch, DeepSpeed and dynamo would still take
    ~1 s per run on a CPU (docs/benchmarks.md). With loader worker processes still alive (a run
    stopped mid-epoch), the normal exit shuts them down instead.
    """
    if multiprocessing.active_children():
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
