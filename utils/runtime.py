"""Where the code runs: the device, mixed precision, the process group under ``torchrun``, and models put there.

Training, evaluation and inference all start with ``setup_runtime(args)`` and pass the
``Runtime`` it returns; nothing else in the code names a device.
"""

import os
import platform
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.cli import UserError
from utils.data import normalize
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


def setup_runtime(args):
    """Device from ``--device``; a process group when started by ``torchrun``; seeds."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(args.device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
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


@torch.no_grad()
def batched_logits(model, images, runtime, batch_size=1024):
    """Logits (float32, on the device) of ``model`` for uint8 ``images``, in order."""
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(runtime.device), runtime.cuda)
        with runtime.autocast:
            out.append(model(x).float())
    return torch.cat(out)
