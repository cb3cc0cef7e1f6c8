"""What every script shares: the user-error type, validated flag types, common flags, printing.

Nothing here imports torch: a script builds its parser and parses its flags before it imports
anything heavy, so that ``--help`` and a bad flag answer in about a second.
"""

import argparse
import math
import os
import re
import shlex
import sys

from tqdm import tqdm

from utils.choices import ROUTERS

LOG_SECONDS = 20  # progress lines in a log file: at most one per this many seconds


class UserError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


_ON_FAILURE = []  # what ``run`` undoes when a command fails (``utils.runs.undo_unsaved``)


def on_failure(undo):
    """Have ``run`` call ``undo()`` when the command it runs is refused or fails."""
    _ON_FAILURE.append(undo)


def run(main):
    """Call ``main()``; report a ``UserError`` or Ctrl-C as one line and a non-zero exit code, after undoing what the
    failed command started (``on_failure``)."""
    try:
        main()
    except UserError as e:
        _undo()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _undo()
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # what read the output has stopped (``| head``): stop too, quietly, as a pipe's writer
        _undo()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would raise again
        sys.exit(141)
    except BaseException as e:
        if not isinstance(e, SystemExit) or e.code not in (0, None):
            _undo()
        raise


def _undo():
    for undo in _ON_FAILURE:
        undo()


# ----------------------------------------------------------------------------- flag types

class Number:
    """An argparse ``type=`` that accepts a finite int or float within a range, and says the range otherwise.

    ``Number(int, 1)`` is a positive integer, ``Number(float, 0, 1, high_open=True)`` a number in [0, 1).
    The bounds stay readable as attributes, so tests can derive invalid values from them.
    """

    def __init__(self, kind, low=None, high=None, low_open=False, high_open=False):
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.__name__ = self.describe()

    def describe(self):
        noun = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return f"{noun} in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {self.low}"
        return f"{noun} {'<' if self.high_open else '<='} {self.high}" if self.high is not None else noun

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not self._in_range(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, not {text!r}")
        return value

    def _in_range(self, value):
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below


POSITIVE_INT = Number(int, 1)
NON_NEGATIVE_INT = Number(int, 0)
POSITIVE = Number(float, 0, low_open=True)
NON_NEGATIVE = Number(float, 0)
PROBABILITY = Number(float, 0, 1)
FRACTION = Number(float, 0, 1, low_open=True, high_open=True)
UNIT_INTERVAL = Number(float, 0, 1, high_open=True)  # [0, 1): momentum, EMA decay, label smoothing
SEED = Number(int, 0, 2**63 - 1)  # what torch's generators take


def checkpoint_path(text):
    """An argparse ``type=`` for ``--checkpoint``: a path that ends in ``.pt``, as every checkpoint's does (its run's
    other files are named after it, ``<stem>.last.pt``, ...), so that a run never takes another kind of file for an
    unfinished run of its own, nor replaces it with ``--force``."""
    if not text.endswith(".pt"):
        raise argparse.ArgumentTypeError(f"must be a path that ends in .pt, such as checkpoints/teacher.pt, not "
                                         f"{text!r}")
    return text


def experiment_name(text):
    """An argparse ``type=`` for ``--name``: a path inside ``checkpoints/`` and ``results/``, made of plain
    names (letters, digits, ``_ . + -``) separated by ``/``, such as ``cpu`` or ``NAME/seed0``.

    Refused: an absolute path, ``.`` and ``..``, empty components. The empty string is no name at all
    (the default, ``checkpoints/`` itself): argparse passes a flag's default through its type too.
    """
    parts = text.split("/")
    if text and not all(re.fullmatch(r"[\w.+-]+", part) and part not in (".", "..") for part in parts):
        raise argparse.ArgumentTypeError(
            f"must be a relative name of letters, digits, '_', '.', '+' and '-', with '/' between folders and "
            f"no '.' or '..' folder, not {text!r}")
    return text


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default once: appended unless the help text already speaks of it, or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or "default" in text):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line, ``error: ...``, with exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def make_parser(description, prog):
    return ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def parse(parser, argv=None):
    """Parse ``argv`` (default: the command line); ``args.command`` is the command that reruns it."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", parser.prog, *argv])
    return args


# ----------------------------------------------------------------------------- common flags

def default_data_dir():
    return os.environ.get("CIFAR10_DIR") or "data"  # set but empty: the default


def add_data_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--data-dir", default=default_data_dir(),
                   help="CIFAR-10 location: a cifar-10-batches-py folder, a train/ test/ image-folder tree, "
                        "or a .tar.gz/.tar/.zip archive of one; the environment variable CIFAR10_DIR sets the default")
    g.add_argument("--download", action="store_true",
                   help="download the official CIFAR-10 into --data-dir with torchvision if it is not there")
    g.add_argument("--partial-data", action="store_true",
                   help="accept a copy with fewer images than CIFAR-10's 50,000 + 10,000 (refused otherwise)")
    return g


def add_routing_args(parser):
    """The experiment, its checkpoints and the routed system's policy: what inference.py and predict.py share."""
    parser.add_argument("--name", default="", type=experiment_name,
                        help="experiment name: its checkpoints are read in checkpoints/NAME/ (default: "
                             "checkpoints/)")
    parser.add_argument("--students", nargs="+", default=None,
                        help="student checkpoints, in the order the selector was trained for (default: "
                             "checkpoints/[NAME/]student_densenet121.pt and student_googlenet.pt)")
    parser.add_argument("--selector", default=None,
                        help="selector checkpoint (default: checkpoints/[NAME/]selector.pt)")
    parser.add_argument("--router", default="cascade", choices=ROUTERS,
                        help="the routing policy of the routed system")
    parser.add_argument("--budget", type=POSITIVE, default=1.25,
                        help="compute budget of the routed system: at most this many times the cheapest student's "
                             "GFLOPs per image on the hold-out split (a budget below the cheapest system is refused, "
                             "naming the least that fits)")


def add_device_args(parser, compile=True, seed=True):
    g = parser.add_argument_group("device")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto picks CUDA when available")
    if compile:
        g.add_argument("--compile", action="store_true", help="compile the model with torch.compile")
    if seed:
        g.add_argument("--seed", type=SEED, default=0,
                       help="seed for initialisation, shuffling and augmentation")
    return g


class _Lines:
    """A stream for tqdm that writes each update as a line of its own: what a log file can hold."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        for line in text.replace("\r", "\n").split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self):
        self.stream.flush()


def progress(total, desc, unit="img", initial=0, disable=False):
    """A progress bar: tqdm's on a terminal; in a log file or a job's output one plain line per update, at
    most every ``LOG_SECONDS`` and none for work that ends within ``LOG_SECONDS`` (no runs of carriage returns)."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, initial=initial, leave=False,
                    disable=disable)
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, initial=initial, disable=disable,
                file=_Lines(sys.stderr), mininterval=LOG_SECONDS, delay=LOG_SECONDS, ncols=100)


def print_config(args, title):
    print(f"== {title} ==")
    width = max(map(len, vars(args)))
    for key, value in vars(args).items():
        print(f"  {key:<{width}}  {value}")
