"""Where the code runs: the device, mixed precision, the process group under ``torchrun``, models put there,
batched logits, and stop signals that end work between batches.

Training, evaluation and inference all start with ``setup_runtime(args)`` and pass the
``Runtime`` it returns; nothing else in the code names a device.
"""

import contextlib
import contextvars
import os
import platform
import signal
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.cli import UserError, progress
from utils.data import normalize, pad_batch
from utils.lock import release_all


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def cuda(self):
        return self.device.type == "cuda"

    @property
    def autocast(self):
        """bf16 autocast on CUDA, nothing (fp32) elsewhere."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()

    def all_sum(self, tensor):
        """``tensor`` summed over every process (in place); itself with one process."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_gather(self, obj):
        """``obj`` of every process, by rank (one collective under ``torchrun``); ``[obj]`` with one process."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def all_min(self, value):
        """The smallest of a number over every process: what they all agree on."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor(float(value), device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return type(value)(tensor.item())

    def synchronize(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)


def pick_device(name, local_rank=0):
    """``--device``: auto (CUDA when there is a GPU), cpu or cuda."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device("cpu")


def setup_runtime(args, varying_shapes=False):
    """Device from ``--device``; a process group when started by ``torchrun``; seeds. On CUDA, cuDNN searches
    the fastest kernels for each new input shape (``cudnn.benchmark``) where batches keep one shape; with
    ``varying_shapes`` (routed inference, where each batch sends a new number of images to each network) it
    takes its heuristics' choice instead: a search for every new shape can cost more than it saves."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(args.device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not varying_shapes
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(getattr(args, "seed", 0))
    return Runtime(device, rank, world_size)


def teardown_runtime(runtime):
    """The end of a run: its output locks are released (``utils.lock``), its process group closed."""
    release_all()
    if runtime.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def prepare_model(model, runtime, compile=False):
    """Move to the device (``channels_last`` on CUDA), optionally compile; returns the callable."""
    model.to(runtime.device, memory_format=torch.channels_last if runtime.cuda else None)
    return torch.compile(model, dynamic=False) if compile else model


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class StopSignal:
    """While active, SIGINT and SIGTERM only ask the work to stop; a second signal acts as usual.

    A signal that came too late for the work to act on it (after its last check) is not lost: as the work ends,
    the process prints ``ended`` (what was done; where to go on; nothing where empty) and exits with 128 + the
    signal's number.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, ended="stopped as the work under way ended"):
        self.signum, self.previous, self.ended = None, {}, ended

    def __enter__(self):
        try:
            self.previous = {s: signal.signal(s, self._request) for s in self.SIGNALS}
        except ValueError:  # not the main thread: signals cannot be caught here
            self.previous = {}
        return self

    def _request(self, signum, frame):
        self.signum = signum
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def __exit__(self, exc_type, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if exc_type is None and self.signum is not None:
            if self.ended:
                print(f"\n{signal.Signals(self.signum).name}: {self.ended}")
            raise SystemExit(128 + self.signum)


class Stopped(Exception):
    """Raised by ``batched_logits`` within ``stoppable`` once a stop signal has arrived."""


_STOP = contextvars.ContextVar("stop", default=None)


@contextlib.contextmanager
def stoppable(what, command):
    """Within it, SIGINT or SIGTERM stops the work after the current batch of ``batched_logits``: one line saying
    what was stopped and the command that continues (``command``), and exit code 128 + the signal's number."""
    with StopSignal(ended=f"stopped after {what}; continue with: {command}") as stop:
        token = _STOP.set(stop)
        try:
            yield
        except Stopped:
            print(f"\n{signal.Signals(stop.signum).name}: stopped while {what}; continue with: {command}")
            raise SystemExit(128 + stop.signum) from None
        finally:
            _STOP.reset(token)


@torch.no_grad()
def batched_logits(model, images, runtime, batch_size=1024, desc=None):
    """Logits (float32, on the device) of ``model`` for uint8 ``images``, in order; on a GPU the last batch is
    padded to the others' shape. ``desc``: show progress under that name."""
    out = []
    with progress(len(images), desc or "", disable=desc is None or not runtime.is_main) as bar:
        for start in range(0, len(images), batch_size):
            if _STOP.get() is not None and _STOP.get().signum is not None:
                raise Stopped
            x = normalize(images[start:start + batch_size].to(runtime.device), runtime.cuda)
            with runtime.autocast:
                out.append(model(pad_batch(x, batch_size) if runtime.cuda else x)[:len(x)].float())
            bar.update(len(x))
    return torch.cat(out)
