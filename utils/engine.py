"""The one training engine: teacher, students and selector all train through ``fit``.

SGD with Nesterov momentum, linear warm-up then cosine decay stepped per batch, bf16
autocast and ``channels_last`` on CUDA (fp32 on CPU), optional ``torch.compile`` and weight
EMA, DistributedDataParallel under ``torchrun``. Metrics stay on the device during an
epoch. Every epoch ``<stem>.last.pt`` (resume state) is rewritten atomically, and
``<stem>.pt`` holds the best weights by hold-out accuracy; at the end the test set is
evaluated once, on those weights.

Nothing is lost: SIGINT or SIGTERM finishes the current step, saves a mid-epoch resume
state and exits; ``--resume`` then ends exactly where an uninterrupted run ends. A
non-finite loss, weight or hold-out loss stops the run with one line, before anything is saved from it.
"""

import json
import math
import os
import shlex
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from utils.augment import MIXERS, TTA_VIEWS, Augmentation, predict
from utils.checkpoint import clean_state_dict, load_checkpoint, save_checkpoint
from utils.cli import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    UNIT_INTERVAL,
    UserError,
    pick_device,
)
from utils.data import DeviceLoader
from utils.plots import plot_history
from utils.recipes import apply_recipe
from utils.runs import check_free_space, device_name, provenance, write_config

WARMUP_EPOCHS = 2.0
SCHEDULES = ("cosine", "linear")
# Flags that may differ between a run and its --resume without changing the result.
RUN_CONTROL_FLAGS = {"resume", "force", "time_budget", "log_every", "compile", "device", "download", "data_dir",
                     "checkpoint", "name", "command"}


def add_training_args(parser, stem):
    """The flags of every training script; ``stem`` names its default checkpoint, ``checkpoints/[NAME/]<stem>.pt``.

    Flags whose default is the network's recipe stay ``None`` here; ``check_training_args`` fills them.
    """
    g = parser.add_argument_group("training (defaults: the network's recipe, utils/recipes.py)")
    g.add_argument("--epochs", type=POSITIVE_INT, help="passes over the training split")
    g.add_argument("--batch-size", type=POSITIVE_INT, help="images per step, over all GPUs")
    g.add_argument("--lr", type=POSITIVE,
                   help="peak learning rate for a batch of 512, reached after the warm-up; scaled linearly "
                        "with --batch-size")
    g.add_argument("--schedule", choices=SCHEDULES, help="decay of the learning rate to 0 after the warm-up")
    g.add_argument("--warmup-epochs", type=NON_NEGATIVE, default=None,
                   help="epochs of linear warm-up from 0 to the peak learning rate "
                        f"(default: {WARMUP_EPOCHS:g}, or the whole run if it is shorter)")
    g.add_argument("--momentum", type=UNIT_INTERVAL, default=0.9, help="Nesterov momentum of SGD")
    g.add_argument("--weight-decay", type=NON_NEGATIVE, help="L2 weight decay (not applied to biases and BatchNorm)")
    g.add_argument("--label-smoothing", type=UNIT_INTERVAL, help="label smoothing of cross-entropy")
    g.add_argument("--ema", type=UNIT_INTERVAL,
                   help="decay of an exponential moving average of the weights, evaluated and saved instead "
                        "of the raw weights (0: off; try 0.999)")
    g = parser.add_argument_group("augmentation, on the device (defaults: the network's recipe)")
    g.add_argument("--translate", type=NON_NEGATIVE_INT,
                   help="random translation by up to this many pixels, with a random horizontal flip")
    g.add_argument("--padding", choices=("reflect", "zeros"),
                   help="what a translated image shows at its border (zeros: the classic CIFAR crop)")
    g.add_argument("--cutout", type=NON_NEGATIVE_INT, help="side of a random square painted grey; 0: off")
    g.add_argument("--mix", choices=("none", *MIXERS),
                   help="CutMix, MixUp or either at random (both), with torchvision's transforms; none: off")
    g.add_argument("--mix-alpha", type=POSITIVE, help="the mixing weight is drawn from Beta(alpha, alpha)")
    g.add_argument("--mix-prob", type=PROBABILITY, help="share of batches that are mixed")
    g.add_argument("--tta", choices=tuple(TTA_VIEWS),
                   help="evaluation views averaged: none, flip (2 forward passes), flip-shift (flip and two "
                        "1-pixel diagonal shifts: 6)")
    g = parser.add_argument_group("progress and output")
    g.add_argument("--eval-every", type=POSITIVE_INT, default=1, help="evaluate on the hold-out split every k epochs")
    g.add_argument("--log-every", type=POSITIVE_INT, default=50,
                   help="steps between updates of the progress bar (and, under torchrun, between checks for a "
                        "stop signal)")
    g.add_argument("--name", default="",
                   help="experiment name: every stage reads and writes its checkpoints in checkpoints/NAME/ "
                        "(default: checkpoints/)")
    g.add_argument("--checkpoint", default=None,
                   help=f"output path of the best weights (default: checkpoints/[NAME/]{stem}.pt); beside it "
                        "<stem>.last.pt (resume state), .metrics.jsonl, .curves.png and .config.json")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run saved at --checkpoint")
    g.add_argument("--force", action="store_true", help="replace an existing run at --checkpoint")
    g.add_argument("--time-budget", type=NON_NEGATIVE, default=None,
                   help="save and stop after the first epoch that ends past this many minutes; "
                        "continue with --resume")
    return g


def check_training_args(parser, args, arch, train_images=None):
    """``arch``'s recipe for the flags not given, then the checks across flags, before any data is
    decoded; each failure is ``parser.error``'s one line.

    ``train_images``: the size the training split will have, where it is known in advance.
    """
    apply_recipe(args, arch)
    if args.resume and args.force:
        parser.error("--resume continues a run and --force replaces it: give one of them")
    if args.warmup_epochs is None:
        args.warmup_epochs = min(WARMUP_EPOCHS, args.epochs)
    elif args.warmup_epochs > args.epochs:
        parser.error(f"--warmup-epochs {args.warmup_epochs:g} is longer than the run (--epochs {args.epochs})")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size < world_size:
        parser.error(f"--batch-size {args.batch_size} cannot be shared by {world_size} processes; give at least "
                     "one image per process")
    if train_images is not None and args.batch_size > train_images:
        parser.error(f"--batch-size {args.batch_size} is larger than the training split ({train_images} images); "
                     "lower it, or raise --limit")


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def all_sum(self, tensor):
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor


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
    if runtime.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def prepare_model(model, runtime, compile=False):
    """Move to the device (``channels_last`` on CUDA), optionally compile; returns the callable."""
    model.to(runtime.device, memory_format=torch.channels_last if runtime.device.type == "cuda" else None)
    return torch.compile(model, dynamic=False) if compile else model


def classification_metric(logits, targets):
    """``(correct predictions, summed cross-entropy)`` of a batch; soft targets count by their argmax."""
    labels = targets if targets.dim() == 1 else targets.argmax(1)
    return (logits.argmax(1) == labels).sum(), F.cross_entropy(logits.float(), labels, reduction="sum")


@torch.no_grad()
def evaluate(model, loader, runtime, tta="none", metric=classification_metric):
    """``{"acc", "loss"}`` of ``model`` on a loader's split: ``metric``'s correct share and mean loss."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=runtime.device)  # correct, loss * images, images
    for x, y in loader:
        with runtime.autocast:
            logits = predict(model, x, tta).float()
        correct, loss = metric(logits, y)
        sums[0] += correct
        sums[1] += loss
        sums[2] += len(y)
    model.train(was_training)
    correct, loss, count = runtime.all_sum(sums).tolist()
    return {"acc": correct / max(count, 1), "loss": loss / max(count, 1)}


def _lr_at(step, total_steps, warmup_steps, peak, schedule="cosine"):
    """Linear warm-up to ``peak``, then a cosine or linear (a triangular, one-cycle-like schedule) decay to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress)


def make_optimizer(model, lr, momentum, weight_decay, runtime):
    """SGD with Nesterov momentum; no weight decay on biases and BatchNorm; fused on CUDA."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    fused = runtime.device.type == "cuda"
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=momentum, nesterov=True,
                           fused=fused or None, foreach=None if fused else True)


def _accumulate(sums, name, value, device):
    if name not in sums:
        sums[name] = torch.zeros((), device=device)
    sums[name] += value


def train_step(net, optimizer, loss_fn, x, y, runtime, sums, metric=classification_metric):
    """One optimisation step; returns the loss.

    ``loss_fn(logits, x, y)`` returns the loss, or a dict of named terms whose ``"loss"`` is
    optimised. Each term times the batch size, the correct predictions (by ``metric``) and the
    batch size are added to the device tensors in ``sums``: no host synchronisation.
    """
    with runtime.autocast:
        logits = net(x)
        terms = loss_fn(logits, x, y)
    terms = terms if isinstance(terms, dict) else {"loss": terms}
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    for name, value in terms.items():
        _accumulate(sums, name, value.detach().float() * len(y), runtime.device)
    _accumulate(sums, "correct", metric(logits.detach(), y)[0], runtime.device)
    _accumulate(sums, "images", len(y), runtime.device)
    return terms["loss"]


class StopSignal:
    """While active, SIGINT and SIGTERM only ask the loop to stop; a second signal acts as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.previous = None, {}

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

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class NonFiniteWatch:
    """Notices a non-finite loss without a host synchronisation per step, and tells which step it was."""

    def __init__(self, device):
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.finite_steps = torch.zeros((), dtype=torch.long, device=device)

    def update(self, loss):
        self.finite &= torch.isfinite(loss.detach())
        self.finite_steps += self.finite

    def first_bad_step(self, runtime):
        """None while every loss was finite on every process, else the count of good steps before the first bad one."""
        bad = runtime.all_sum((~self.finite).float())
        return int(self.finite_steps.item()) if bad.item() > 0 else None


def all_finite(tensors, runtime):
    """Whether every floating-point tensor is finite, on every process: one host synchronisation.

    A finite loss does not make finite weights: a huge step can overflow the weights or the
    BatchNorm running statistics, which the training loss never sees.
    """
    finite = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return runtime.all_sum((~torch.stack(finite)).sum().float()).item() == 0


def resume_command(command):
    """``args.command`` as the command that continues its run: with ``--resume``, without ``--force``."""
    words = [word for word in shlex.split(command) if word != "--force"]
    return shlex.join(words + ["--resume"] * ("--resume" not in words))


def _check_resumable(state, args, path):
    old = state.get("config", {})
    changed = [k for k, v in vars(args).items() if k not in RUN_CONTROL_FLAGS and k in old and old[k] != v]
    if changed:
        k = changed[0]
        raise UserError(f"{path} was started with --{k.replace('_', '-')} {old[k]}, not {getattr(args, k)}; "
                        "resume with the same flags, or start afresh with --force")


@dataclass
class Progress:
    """Where a run stands: what ``--resume`` restores besides the weights and the optimizer."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed in the next epoch
    sums: dict = field(default_factory=dict)  # that epoch's metric sums so far, on the device
    history: list = field(default_factory=list)
    best_acc: float = -1.0
    best_state: dict = None
    elapsed: float = 0.0
    epoch_seconds: float = 0.0


def _restore(files, args, meta, model, optimizer, ema, runtime):
    """Load the resume state into the model, optimizer, EMA and RNGs; returns the run's ``Progress``."""
    state = load_checkpoint(files.last, hint="start the run without --resume", kind=meta["kind"], arch=meta["arch"])
    _check_resumable(state, args, files.last)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ema:
        ema.load_state_dict(state["ema"])
    torch.set_rng_state(state["rng"])
    if runtime.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], runtime.device)
    progress = Progress(state["epoch"], state.get("step", 0),
                        {k: v.to(runtime.device) for k, v in state.get("sums", {}).items()}, state["history"],
                        elapsed=state.get("elapsed", 0.0), epoch_seconds=state.get("epoch_seconds", 0.0))
    if files.best.exists():  # its weights and their hold-out accuracy always go together
        best = load_checkpoint(files.best, hint="start the run afresh with --force")
        progress.best_state = best["model"]
        progress.best_acc = -1.0 if best["holdout_acc"] is None else best["holdout_acc"]
    return progress


def _epoch_record(epoch, mean_lr, sums, seconds, runtime):
    """The metrics log's line for an epoch, from its device sums (summed over processes)."""
    totals = dict(zip(sums, runtime.all_sum(torch.stack([sums[k].float() for k in sums])).tolist()))
    images = totals.pop("images")
    return {"epoch": epoch + 1, "lr": mean_lr, "train_loss": totals.pop("loss") / images,
            **{f"train_{k}": v / images for k, v in totals.items() if k != "correct"},
            "train_acc": totals["correct"] / images, "images_per_s": images / seconds}


def _round(record):
    return {k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in record.items()}


def fit(model, loss_fn, splits, args, runtime, meta, files, augment=True, metric=classification_metric):
    """Train ``model`` on ``splits["train"]``, select on ``splits["holdout"]``, test once on ``splits["test"]``.

    ``loss_fn(logits, x, y)`` returns the batch loss, or a dict of named terms (``"loss"``
    is optimised, every term is logged); ``splits`` maps a split name to ``(uint8 images,
    targets)`` (``holdout`` and ``test`` may be missing or empty). ``meta`` (kind, arch,
    num_classes, ...) is stored in every checkpoint; ``files`` comes from ``prepare_run``;
    ``augment=False`` turns the flags' augmentation off (the selector's case);
    ``metric(logits, targets)`` gives the correct count and summed loss behind the accuracies
    and the hold-out loss. Returns the final checkpoint dict, or ``None`` when
    ``--time-budget`` stopped the run early.
    """
    bs = args.batch_size // runtime.world_size

    def loader(name, train=False):
        if name not in splits or len(splits[name][0]) == 0:
            return None
        images, targets = splits[name]
        return DeviceLoader(images, targets, bs, runtime.device, train=train, augment=train and augment,
                            seed=args.seed, rank=runtime.rank, world_size=runtime.world_size)

    augment = augment and Augmentation.from_args(args, meta["num_classes"])

    train_loader, holdout_loader, test_loader = loader("train", train=True), loader("holdout"), loader("test")
    if train_loader is None:
        raise UserError("the training split is empty; lower --holdout or raise --limit")
    if args.batch_size > len(splits["train"][0]):
        raise UserError(f"--batch-size {args.batch_size} is larger than the training split "
                        f"({len(splits['train'][0])} images); lower it")

    model = prepare_model(model, runtime)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    eval_model = ema.module if ema else model
    net = model
    if runtime.world_size > 1:
        net = DistributedDataParallel(net, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net, dynamic=False)
    peak_lr = args.lr * args.batch_size / 512
    optimizer = make_optimizer(model, peak_lr, args.momentum, args.weight_decay, runtime)
    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)

    def lr_at(step):
        return _lr_at(step, total_steps, warmup_steps, peak_lr, args.schedule)

    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if runtime.is_main:  # best + last (weights, momentum, EMA) + the temporary copy of the largest
        check_free_space(files.best.parent, weight_bytes * (6 if ema else 4))

    progress = _restore(files, args, meta, model, optimizer, ema, runtime) if args.resume else Progress()
    start_epoch, start_step, sums, history = progress.epoch, progress.step, progress.sums, progress.history
    best_acc, best_state, elapsed, epoch_seconds = (progress.best_acc, progress.best_state, progress.elapsed,
                                                    progress.epoch_seconds)

    run_meta = {**meta, "config": vars(args), "epochs": args.epochs, "provenance": provenance(runtime.device)}
    if runtime.is_main:
        print(f"device: {device_name(runtime.device)}" + (f" x {runtime.world_size} processes"
                                                          if runtime.world_size > 1 else ""))
        print(f"peak learning rate {peak_lr:g} (--lr {args.lr:g} x batch {args.batch_size} / 512), "
              f"{steps_per_epoch} steps per epoch, {warmup_steps} warm-up steps")
        if args.resume and start_epoch < args.epochs:
            print(f"resuming {files.last} at epoch {start_epoch + 1}/{args.epochs}, step {start_step}")
        elif args.resume:
            print(f"resuming {files.last}: every epoch is done, the test evaluation follows")
        write_config(files.config, args, runtime.device, meta["kind"])
        files.log.write_text("".join(json.dumps(record) + "\n" for record in history))

    def resume_state(epoch, step, sums, seconds_in_epoch):
        return {**run_meta, "model": clean_state_dict(model), "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema else None, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(runtime.device) if runtime.device.type == "cuda" else None,
                "epoch": epoch, "step": step, "sums": {k: v.detach().cpu() for k, v in sums.items()},
                "history": history, "elapsed": elapsed + time.time() - started,
                "epoch_seconds": seconds_in_epoch, "complete": epoch == args.epochs}

    def diverged(what, epoch, step):
        kept = f"the last good state is {files.last}" if files.last.exists() else "nothing was saved"
        return UserError(f"training diverged: non-finite {what} at epoch {epoch + 1}, step {step + 1}/"
                         f"{steps_per_epoch}, learning rate {lr_at(epoch * steps_per_epoch + step):.4g}; "
                         f"{kept}; lower --lr (or raise --warmup-epochs) and start again with --force")

    def check_finite(watch, epoch, first_step, step):
        """Before anything is saved: every loss of the epoch up to ``step``, then the weights and momenta after it."""
        bad = watch.first_bad_step(runtime)
        if bad is not None:
            raise diverged("loss", epoch, first_step + bad)
        momenta = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        if not all_finite([*model.state_dict().values(), *momenta], runtime):
            raise diverged("weights", epoch, step)

    started = time.time()
    with StopSignal() as stop:
        for epoch in range(start_epoch, args.epochs):
            train_loader.set_epoch(epoch)
            model.train()
            first_step = start_step if epoch == start_epoch else 0
            if epoch != start_epoch:
                sums, epoch_seconds = {}, 0.0
            watch = NonFiniteWatch(runtime.device)
            epoch_start = time.time() - epoch_seconds
            with tqdm(total=train_loader.num_samples, initial=min(first_step * bs, train_loader.num_samples),
                      unit="img", unit_scale=True, desc=f"epoch {epoch + 1}/{args.epochs}",
                      disable=not runtime.is_main, leave=False) as bar:
                for i, (x, y) in enumerate(train_loader.batches(first_step), first_step):
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(epoch * steps_per_epoch + i)
                    watch.update(train_step(net, optimizer, loss_fn, x, y, runtime, sums, metric))
                    if ema:
                        ema.update_parameters(model)
                    bar.update(len(y))
                    at_log_point = (i + 1) % args.log_every == 0
                    if at_log_point:
                        check_finite(watch, epoch, first_step, i)
                        bar.set_postfix(loss=f"{sums['loss'].item() / sums['images'].item():.3f}",
                                        acc=f"{sums['correct'].item() / sums['images'].item():.3f}")
                    stopping = stop.signum is not None
                    if runtime.world_size > 1:  # every process must stop after the same step
                        stopping = at_log_point and runtime.all_sum(
                            torch.tensor(float(stopping), device=runtime.device)).item() > 0
                    if stopping and i + 1 < steps_per_epoch:
                        check_finite(watch, epoch, first_step, i)
                        bar.close()
                        if runtime.is_main:
                            save_checkpoint(files.last, resume_state(epoch, i + 1, sums, time.time() - epoch_start))
                            name = signal.Signals(stop.signum or signal.SIGTERM).name
                            print(f"\n{name}: stopped at epoch {epoch + 1}/{args.epochs}, step {i + 1}/"
                                  f"{steps_per_epoch}; saved {files.last}\n"
                                  f"continue with: {resume_command(args.command)}")
                        raise SystemExit(128 + (stop.signum or signal.SIGTERM))
            check_finite(watch, epoch, first_step, steps_per_epoch - 1)
            mean_lr = sum(map(lr_at, range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch))) / steps_per_epoch
            record = _epoch_record(epoch, mean_lr, sums, time.time() - epoch_start, runtime)
            last_epoch = epoch + 1 == args.epochs
            if holdout_loader is not None and ((epoch + 1) % args.eval_every == 0 or last_epoch):
                scores = evaluate(eval_model, holdout_loader, runtime, args.tta, metric)
                if not math.isfinite(scores["loss"]):
                    raise diverged("hold-out loss", epoch, steps_per_epoch - 1)
                record.update(holdout_loss=scores["loss"], holdout_acc=scores["acc"])
            record["elapsed_s"] = elapsed + time.time() - started
            record = _round(record)
            history.append(record)
            improved = holdout_loader is None or record.get("holdout_acc", -1.0) > best_acc
            if improved:
                best_acc = record.get("holdout_acc", best_acc)
                best_state = clean_state_dict(eval_model)
            if runtime.is_main:
                print(f"epoch {epoch + 1}/{args.epochs}  " + "  ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                    if k != "epoch"))
            out_of_time = args.time_budget is not None and time.time() - started > 60 * args.time_budget
            out_of_time = runtime.all_sum(torch.tensor(float(out_of_time), device=runtime.device)).item() > 0
            if runtime.is_main:
                with open(files.log, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if improved:
                    save_checkpoint(files.best, {**run_meta, "model": best_state, "epoch": epoch + 1,
                                                 "holdout_acc": best_acc if best_acc >= 0 else None,
                                                 "test_acc": None, "complete": False})
                save_checkpoint(files.last, resume_state(epoch + 1, 0, {}, 0.0))
            if out_of_time and not last_epoch:
                if runtime.is_main:
                    print(f"time budget of {args.time_budget:g} min spent: stopped after epoch {epoch + 1}/"
                          f"{args.epochs}; continue with: {resume_command(args.command)}")
                return None
            if stop.signum is not None and not last_epoch:
                if runtime.is_main:
                    print(f"{signal.Signals(stop.signum).name}: stopped after epoch {epoch + 1}/{args.epochs}; "
                          f"continue with: {resume_command(args.command)}")
                raise SystemExit(128 + stop.signum)

    eval_model.load_state_dict(best_state)
    test_acc = evaluate(eval_model, test_loader, runtime, args.tta, metric)["acc"] if test_loader is not None else None
    final = {**run_meta, "model": best_state, "epoch": len(history),
             "holdout_acc": best_acc if best_acc >= 0 else None, "test_acc": test_acc, "complete": True}
    if runtime.is_main:
        save_checkpoint(files.best, final)
        plot_history(history, files.plot, title=run_title(meta, files.best), loss_name=meta.get("loss", "loss"))
        shown = {k: "n/a" if final[k] is None else f"{final[k]:.4f}" for k in ("holdout_acc", "test_acc")}
        print(f"saved {files.best}  hold-out acc {shown['holdout_acc']}  test acc {shown['test_acc']}")
    return final


def run_title(meta, path):
    """``student densenet121, with KD — checkpoints/cpu/student_densenet121.pt``: tells runs apart."""
    kd = {True: ", with KD", False: ", without KD"}.get(meta.get("kd"), "")
    return f"{meta['kind']} {meta['arch']}{kd} — {path}"
