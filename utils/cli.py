"""What every script shares: the user-error type, common flags, device choice, printing."""

import argparse
import os
import sys

import torch


class UserError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


def run(main):
    """Call ``main()``; report a ``UserError`` or Ctrl-C as one line and a non-zero exit code."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted (a training run continues with --resume)", file=sys.stderr)
        sys.exit(130)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def make_parser(description):
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def add_data_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--data-dir", default=os.environ.get("CIFAR10_DIR", "data"),
                   help="CIFAR-10 location: a cifar-10-batches-py folder, a train/ test/ image-folder tree, "
                        "or a .tar.gz/.tar/.zip archive of one; the environment variable CIFAR10_DIR sets the default")
    g.add_argument("--download", action="store_true",
                   help="download the official CIFAR-10 into --data-dir with torchvision if it is not there")
    g.add_argument("--holdout", type=int, default=5000,
                   help="training images held out (stratified) for model selection and the selector; 0 allowed")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the hold-out split (keep it equal across stages)")
    g.add_argument("--limit", type=int, default=0,
                   help="use a stratified subset of at most this many images of each split, for quick runs (0: all)")
    return g


def add_device_args(parser):
    g = parser.add_argument_group("device")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto picks CUDA when available")
    g.add_argument("--compile", action="store_true", help="compile the model with torch.compile")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and augmentation")
    return g


def pick_device(name, local_rank=0):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device("cpu")


def print_config(args, title):
    print(f"== {title} ==")
    width = max(map(len, vars(args)))
    for key, value in vars(args).items():
        print(f"  {key:<{width}}  {value}")
