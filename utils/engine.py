"""The one training engine: teacher, students and selector all train through ``fit``.

``fit`` trains one or several ``Member``s on the same batches: each has its own model, loss,
optimizer, learning-rate schedule, weight EMA, random stream and checkpoints, and a frozen
``teacher`` runs once per batch for all of them. An epoch is ``train_one_epoch`` (the steps,
metric sums kept on the device, a watch for non-finite losses) then ``end_of_epoch`` (hold-out
evaluation, the best weights by hold-out accuracy, saving); at the end the test split is
evaluated once, on the best weights. SGD with Nesterov momentum, linear warm-up then cosine or
linear decay to 0, stepped per batch; bf16 autocast and ``channels_last`` on CUDA, fp32 on the
CPU; DistributedDataParallel under ``torchrun``.

Time as an input: given a ``TimeBox`` with a budget (``--minutes``), ``calibrate`` times a few
real steps, a hold-out evaluation and a save, puts everything back as it was, and
``utils.timebox.plan_epochs`` chooses the number of epochs that ends the stage inside it; each
member's schedule is then built for that number, so a time-boxed run is a complete run that
``--epochs N`` repeats exactly.

Nothing is lost: the resume state ``<stem>.last.pt`` and the best weights ``<stem>.pt`` are
written atomically, every ``--save-every`` minutes, before any stop and at the end. SIGINT or
SIGTERM finishes the current step, saves a mid-epoch resume state and exits; ``--resume`` then
ends exactly where an uninterrupted run ends. A non-finite loss, weight or hold-out loss stops
the run with one line, before anything is saved from it.
"""

import io
import json
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from utils.augment import Augmentation, predict
from utils.checkpoint import clean_state_dict, load_checkpoint, save_checkpoint, save_checkpoints
from utils.cli import UserError, progress
from utils.data import DeviceLoader, pad_batch
from utils.plots import plot_history
from utils.provenance import provenance, write_config
from utils.runs import RunFiles, check_free_space, config_changes, continue_command, outer_command, run_saved
from utils.runtime import StopSignal, device_name, prepare_model
from utils.timebox import Costs, TimeBox, evaluated_epoch, plan_epochs

WARMUP_MAX_SHARE = 0.2  # the warm-up never takes more of a run than this, so every schedule decays to 0
EXIT_TIME_BUDGET = 75  # exit code of a run stopped by --time-budget (EX_TEMPFAIL): run the command again
COLLAPSED_SHARE = 0.9  # a specialist assigned more of the images than this is said to take them all
CALIBRATION_STEPS = (3, 8)  # at most: steps run untimed (kernel selection, compilation), then timed, by calibrate


def classification_metric(logits, targets):
    """``(correct predictions, summed cross-entropy)`` of a batch, in float32; soft targets count by their argmax."""
    logits = logits.float()
    labels = targets if targets.dim() == 1 else targets.argmax(1)
    return (logits.argmax(1) == labels).sum(), F.cross_entropy(logits, labels, reduction="sum")


@dataclass
class Member:
    """One network trained by ``fit``.

    ``loss_fn(logits, targets, teacher_logits)`` returns the batch loss, or a dict of named terms
    whose ``"loss"`` is optimised (every term is logged); ``teacher_logits`` is None without a
    teacher. ``args`` are its flags (learning rate, weight decay, EMA, test-time views; kept in its
    checkpoints), ``meta`` what its checkpoints record besides (kind, arch, num_classes, ...),
    ``files`` where they go (``utils.runs.prepare_run``). ``metric(logits, targets)`` gives the
    correct count and summed loss behind its accuracies and hold-out loss. Members that share a
    ``coupling`` step together: ``coupling.losses(logits of each, targets, teacher_logits, progress)``
    gives each one's loss (``progress``: the share of the run done), and their ``loss_fn`` is unused.
    """

    model: nn.Module
    loss_fn: Callable
    args: object
    meta: dict
    files: RunFiles
    metric: Callable = classification_metric
    coupling: object = None  # shared by members whose losses depend on each other


# ----------------------------------------------------------------------------- steps and evaluation

def warmup_steps(warmup_epochs, steps_per_epoch, total_steps):
    """Steps of linear warm-up: ``warmup_epochs`` of them, but never more than ``WARMUP_MAX_SHARE`` of the run."""
    return min(round(warmup_epochs * steps_per_epoch), int(WARMUP_MAX_SHARE * total_steps))


def learning_rate(step, total_steps, warmup_steps, peak, schedule="cosine"):
    """The rate of step ``step`` (from 0): a linear warm-up that reaches ``peak`` at its last step, then a cosine
    or linear (a triangular, one-cycle-like schedule) decay that reaches 0 at the run's last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step + 1 - warmup_steps) / (total_steps - warmup_steps)
    return peak * (0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress)


def make_optimizer(model, lr, momentum, weight_decay, runtime):
    """SGD with Nesterov momentum; no weight decay on biases and BatchNorm; fused on CUDA."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=momentum, nesterov=True,
                           fused=runtime.cuda or None, foreach=None if runtime.cuda else True)


def _accumulate(sums, name, value, device):
    if name not in sums:
        sums[name] = torch.zeros((), device=device)
    sums[name] += value


def train_step(net, optimizer, loss_fn, x, y, runtime, sums, metric=classification_metric, teacher_logits=None):
    """One optimisation step; returns the loss.

    Each term of ``loss_fn`` times the batch size, the correct predictions (by ``metric``) and the
    batch size are added to the device tensors in ``sums``: no host synchronisation.
    """
    with runtime.autocast:
        logits = net(x)
        terms = loss_fn(logits, y, teacher_logits)
    return update(optimizer, terms, logits, y, runtime, sums, metric)


def update(optimizer, terms, logits, y, runtime, sums, metric=classification_metric):
    """The optimisation step of a loss (``terms``: the loss, or a dict whose ``"loss"`` is optimised) on the batch
    that gave ``logits``; returns the loss. Its terms, the correct predictions and the images are added to
    ``sums``."""
    terms = terms if isinstance(terms, dict) else {"loss": terms}
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    for name, value in terms.items():
        _accumulate(sums, name, value.detach().float() * len(y), runtime.device)
    _accumulate(sums, "correct", metric(logits.detach(), y)[0], runtime.device)
    _accumulate(sums, "images", len(y), runtime.device)
    return terms["loss"]


@torch.no_grad()
def evaluate(model, loader, runtime, tta="none", metric=classification_metric, stop=None):
    """``{"acc", "loss"}`` of ``model`` on a loader's split: ``metric``'s correct share and mean loss.

    On a GPU the last batch is padded to the others' shape. With a ``StopSignal`` that has caught a signal,
    it stops after the current batch and returns None.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=runtime.device)  # correct, loss * images, images
    for x, y in loader:
        if stop is not None and stop.signum is not None:
            model.train(was_training)
            return None
        with runtime.autocast:
            logits = predict(model, pad_batch(x, loader.batch_size) if runtime.cuda else x, tta)[:len(y)]
        correct, loss = metric(logits, y)
        sums[0] += correct
        sums[1] += loss
        sums[2] += len(y)
    model.train(was_training)
    correct, loss, count = runtime.all_sum(sums).tolist()
    return {"acc": correct / max(count, 1), "loss": loss / max(count, 1)}


# ----------------------------------------------------------------------------- stopping safely

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


def _agreed(flag, runtime):
    """``flag`` on any process, known to every process (one collective under ``torchrun``)."""
    if runtime.world_size == 1:
        return flag
    return runtime.all_sum(torch.tensor(float(flag), device=runtime.device)).item() > 0


# ----------------------------------------------------------------------------- random streams

def _rng_states(runtime):
    """``(CPU state, CUDA state or None)`` of the process's random generators."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(runtime.device) if runtime.cuda else None


def _set_rng(runtime, rng):
    torch.set_rng_state(rng[0])
    if runtime.cuda and rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], runtime.device)


def _seeded_rng(runtime, seed):
    """The random state ``torch.manual_seed(seed)`` gives, without touching the process's own."""
    with torch.random.fork_rng(devices=[runtime.device] if runtime.cuda else []):
        torch.manual_seed(seed)
        return _rng_states(runtime)


@contextmanager
def _own_stream(trainee, several):
    """Run ``trainee``'s step with its own random stream when several members train together, so that each
    draws (dropout) exactly what it would draw training alone."""
    if not several:
        yield
        return
    _set_rng(trainee.runtime, trainee.rng or _rng_states(trainee.runtime))
    yield
    trainee.rng = _rng_states(trainee.runtime)


# ----------------------------------------------------------------------------- one member in training

class Trainee:
    """A ``Member`` in training for ``epochs`` epochs of ``steps_per_epoch`` steps: its optimizer and schedule,
    EMA, random stream, metric sums, history and best weights, and its files. ``net`` is what its steps call:
    its model as ``training_net`` prepared it (DDP, compiled). ``timing``: the time box's plan, if any."""

    def __init__(self, member, net, runtime, steps_per_epoch, epochs, timing=None):
        self.member, self.net, self.runtime, self.args = member, net, runtime, member.args
        self.model = member.model
        self.peak_lr = self.args.lr * self.args.batch_size / 512
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.total_steps = epochs * steps_per_epoch
        self.warmup_steps = warmup_steps(self.args.warmup_epochs, steps_per_epoch, self.total_steps)
        self.config = {**vars(self.args), "epochs": epochs}
        self.meta = {**member.meta, "config": self.config, "epochs": epochs,
                     "provenance": provenance(runtime.device), "timing": timing}
        self.optimizer = make_optimizer(self.model, self.peak_lr, self.args.momentum, self.args.weight_decay, runtime)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.args.ema), use_buffers=True) \
            if self.args.ema else None
        self.eval_model = self.ema.module if self.ema else self.model
        self.sums, self.history, self.best_acc, self.best_state, self.best_epoch = {}, [], -1.0, None, None
        self.best_saved = True  # whether the best weights so far are those in files.best
        self.rng = None  # this member's random stream (dropout), kept apart when several train together

    @property
    def files(self):
        return self.member.files

    def lr_at(self, step):
        return learning_rate(step, self.total_steps, self.warmup_steps, self.peak_lr, self.args.schedule)

    def step(self, x, y, teacher_logits, step):
        self.set_lr(step)
        loss = train_step(self.net, self.optimizer, self.member.loss_fn, x, y, self.runtime, self.sums,
                          self.member.metric, teacher_logits)
        self.after_step(loss)

    def set_lr(self, step):
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)

    def forward(self, x):
        """The member's logits on a training batch (a coupled member's: its loss needs the others' logits)."""
        with self.runtime.autocast:
            return self.net(x)

    def after_step(self, loss):
        self.watch.update(loss)
        if self.ema:
            self.ema.update_parameters(self.model)

    def start_epoch(self):
        self.model.train()
        self.watch = NonFiniteWatch(self.runtime.device)

    def diverged(self, what, epoch, step):
        kept = f"the last good state is {self.files.last}" if self.files.last.exists() else "nothing was saved"
        return UserError(f"training diverged: non-finite {what} at epoch {epoch + 1}, step {step + 1}/"
                         f"{self.steps_per_epoch}, learning rate {self.lr_at(epoch * self.steps_per_epoch + step):.4g}"
                         f"; {kept}; lower --lr (or raise --warmup-epochs) and start again with --force")

    def check_finite(self, epoch, first_step, step):
        """Before anything is saved: every loss of the epoch up to ``step``, then the weights and momenta after it."""
        bad = self.watch.first_bad_step(self.runtime)
        if bad is not None:
            raise self.diverged("loss", epoch, first_step + bad)
        momenta = [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        if not all_finite([*self.model.state_dict().values(), *momenta], self.runtime):
            raise self.diverged("weights", epoch, step)

    def running(self):
        """``(loss, accuracy)`` of the epoch so far (a host synchronisation)."""
        images = self.sums["images"].item()
        return self.sums["loss"].item() / images, self.sums["correct"].item() / images

    def epoch_record(self, epoch, seconds):
        """The metrics log's line for an epoch, from its device sums (summed over processes)."""
        sums = self.sums
        totals = dict(zip(sums, self.runtime.all_sum(torch.stack([sums[k].float() for k in sums])).tolist()))
        images = totals.pop("images")
        steps = range(epoch * self.steps_per_epoch, (epoch + 1) * self.steps_per_epoch)
        return {"epoch": epoch + 1, "lr": sum(map(self.lr_at, steps)) / self.steps_per_epoch,
                "train_loss": totals.pop("loss") / images,
                **{f"train_{k}": v / images for k, v in totals.items() if k != "correct"},
                "train_acc": totals["correct"] / images, "images_per_s": images / seconds}

    def streams(self):
        """This member's random stream in every process, by rank (one collective under ``torchrun``)."""
        return self.runtime.all_gather(self.rng or _rng_states(self.runtime))

    def resume_state(self, loop, epoch, step, streams=None):
        """What ``--resume`` needs to go on after ``step`` steps of epoch ``epoch`` (0: at its start); ``streams``:
        every process's random stream (``streams()``), this process's alone if not given."""
        mid_epoch = step > 0
        (rng, cuda_rng), *other_ranks = streams or [self.rng or _rng_states(self.runtime)]
        return {**self.meta, "model": clean_state_dict(self.model), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "rng": rng, "cuda_rng": cuda_rng,
                "rank_rngs": other_ranks,
                "epoch": epoch, "step": step,
                "sums": {k: v.detach().cpu() for k, v in self.sums.items()} if mid_epoch else {},
                "history": self.history, "elapsed": loop.elapsed(),
                "epoch_seconds": loop.epoch_seconds() if mid_epoch else 0.0, "complete": epoch == self.epochs}

    def best_checkpoint(self, **extra):
        """The checkpoint of the best weights so far: ``epoch`` is the epoch they come from."""
        return {**self.meta, "model": self.best_state, "epoch": self.best_epoch, "epochs_run": len(self.history),
                "holdout_acc": self.best_acc if self.best_acc >= 0 else None, "test_acc": None, "complete": False,
                **extra}

    def writes(self, loop, epoch, step, streams):
        """What a save writes: the best weights if they changed since they were last written, and the resume state
        (``streams``: every process's random stream), as ``(path, checkpoint)``."""
        best = [] if self.best_saved else [(self.files.best, self.best_checkpoint())]
        return [*best, (self.files.last, self.resume_state(loop, epoch, step, streams))]

    def restore(self, state):
        """Go on from the resume state ``state`` (``read_resume_state``): the model, optimizer, EMA and random
        stream as they were, refused where it was started on other data or with other flags; returns ``(epoch,
        step, elapsed, epoch_seconds)``."""
        files, meta = self.files, self.member.meta
        for key, what in (("data_fingerprint", "other CIFAR-10 pixels"), ("split", "another split")):
            if state.get(key) != meta.get(key):
                raise UserError(f"{files.last} was started on {what} ({state.get(key)}, not {meta.get(key)}); resume "
                                "it with the data it started on, or start afresh with --force")
        changed = config_changes(state.get("config", {}), self.config)
        if changed:
            k = changed[0]
            raise UserError(f"{files.last} was started with --{k.replace('_', '-')} {state['config'][k]}, not "
                            f"{self.config[k]}; resume with the same flags, or start afresh with --force")
        streams = [(state["rng"], state.get("cuda_rng")), *state.get("rank_rngs", [])]
        if len(streams) != self.runtime.world_size:
            raise UserError(f"{files.last} was saved by a run of {len(streams)} process(es), this one has "
                            f"{self.runtime.world_size}; resume it with torchrun --nproc_per_node {len(streams)}, "
                            "or start afresh with --force")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        self.rng = streams[self.runtime.rank]
        self.sums = {k: v.to(self.runtime.device) for k, v in state.get("sums", {}).items()}
        self.history = state["history"]
        self.meta["timing"] = state.get("timing")
        if files.best.exists():  # its weights and their hold-out accuracy always go together
            best = load_checkpoint(files.best, hint="start the run afresh with --force")
            self.best_state, self.best_epoch = best["model"], best["epoch"]
            self.best_acc = -1.0 if best["holdout_acc"] is None else best["holdout_acc"]
        return state["epoch"], state.get("step", 0), state.get("elapsed", 0.0), state.get("epoch_seconds", 0.0)


def read_resume_state(member):
    """A member's resume state, ``<stem>.last.pt``, checked to be one of its kind and architecture."""
    meta = member.meta
    return load_checkpoint(member.files.last, hint="start the run without --resume", kind=meta["kind"],
                           arch=meta["arch"])


@dataclass
class Loop:
    """Where the run stands in time: seconds spent before this process, when this process and the current
    epoch began, and when the files were last written."""

    elapsed_before: float = 0.0
    started: float = field(default_factory=time.time)
    epoch_started: float = field(default_factory=time.time)
    saved: float = field(default_factory=time.time)

    def elapsed(self):
        return self.elapsed_before + time.time() - self.started

    def epoch_seconds(self):
        return time.time() - self.epoch_started

    def save_due(self, minutes):
        return time.time() - self.saved >= 60 * minutes


# ----------------------------------------------------------------------------- the loop

@dataclass(frozen=True)
class Loaders:
    """The splits on the device: ``train`` (augmented, full batches), ``holdout`` and ``test`` (None if empty)."""

    train: DeviceLoader
    holdout: DeviceLoader | None
    test: DeviceLoader | None


def fit(members, splits, args, runtime, teacher=None, augment=True, time_box=None):
    """Train ``members`` on ``splits["train"]``, select on ``splits["holdout"]``, test once on ``splits["test"]``.

    ``splits`` maps a split name to ``(uint8 images, targets)`` (``holdout`` and ``test`` may be
    missing or empty). ``args`` holds what the members share: epochs, batch size, augmentation, seed,
    logging, the time budget (each member's own flags are in its ``args``). ``teacher``: a frozen
    network whose logits on each batch go to every loss. ``augment=False`` turns the flags'
    augmentation off (the selector's case). ``time_box``: when the stage began, and with a budget
    (``--minutes``) the box in which ``utils.timebox.plan_epochs`` fits the epochs. Returns each
    member's final checkpoint dict. A stop before the end (a signal, ``--time-budget``) exits the
    process with a documented code, after saving what ``--resume`` needs.
    """
    members = list(members)
    time_box = time_box or TimeBox(time.time())
    loaders = _loaders(splits, args, runtime, augment and Augmentation.from_args(args, members[0].meta["num_classes"]))
    nets = [training_net(m, runtime) for m in members]
    if runtime.cuda:  # after the models are on the device: before CUDA's first use it is an invalid device
        torch.cuda.reset_peak_memory_stats(runtime.device)
    if runtime.is_main:  # every member's best and last (weights, momentum, EMA), and their temporary copies at once
        needed = {}
        for m in members:
            weight_bytes = sum(v.numel() * v.element_size() for v in m.model.state_dict().values())
            folder = m.files.best.parent
            needed[folder] = needed.get(folder, 0) + weight_bytes * 2 * (4 if m.args.ema else 3)
        for folder, needed_bytes in needed.items():
            check_free_space(folder, needed_bytes)
    states = [read_resume_state(m) for m in members] if args.resume else None
    epochs, plan = args.epochs, None
    if states and args.minutes is not None:  # a time-boxed run goes on with the epochs it chose
        epochs = states[0]["config"]["epochs"]
    elif time_box.seconds is not None:
        plan = plan_epochs(calibrate(members, nets, loaders, args, runtime, teacher), time_box, args.eval_every,
                           args.save_every, agree=runtime.all_min, announce=runtime.is_main)
        epochs = plan["epochs"]
    trainees = [Trainee(m, net, runtime, len(loaders.train), epochs, plan) for m, net in zip(members, nets)]
    start_epoch, start_step, loop = _start(trainees, args, runtime, states)
    startup_seconds = time_box.elapsed()
    complete = "stopped as the run ended, complete: " + ", ".join(str(m.files.best) for m in members)
    if outer := outer_command():  # the run is a part of a larger work, which is not complete
        complete += f"; continue with: {outer}"
    with StopSignal(ended=complete if runtime.is_main else "") as stop:
        for epoch in range(start_epoch, epochs):
            first_step = start_step if epoch == start_epoch else 0
            if epoch != start_epoch:
                loop.epoch_started = time.time()
                for t in trainees:
                    t.sums = {}
            run_epoch(trainees, loaders, epoch, first_step, loop, args, runtime, teacher, stop)
        return [_finish(t, loaders.test, time_box, startup_seconds, stop) for t in trainees]


def run_epoch(trainees, loaders, epoch, first_step, loop, args, runtime, teacher, stop):
    """One epoch of the run from ``first_step`` on, and its end (``end_of_epoch``); a stop before the run's end
    (a signal, ``--time-budget``) saves what ``--resume`` needs and exits (``_stop``)."""
    epochs = trainees[0].epochs
    stopped_at = train_one_epoch(trainees, loaders.train, epoch, first_step, args, runtime, teacher, stop)
    if stopped_at is not None:
        _stop(trainees, loop, args, runtime, stop.signum, epoch, stopped_at)
    last = epoch + 1 == epochs
    out_of_time = args.time_budget is not None and loop.elapsed() - loop.elapsed_before > 60 * args.time_budget
    stopping = not last and _agreed(out_of_time or stop.signum is not None, runtime)
    end_of_epoch(trainees, loaders.holdout, epoch, first_step, loop, runtime,
                 save=last or stopping or _agreed(loop.save_due(args.save_every), runtime))
    if stopping:
        _stop(trainees, loop, args, runtime, stop.signum, epoch + 1)


def training_net(member, runtime):
    """What a member's steps call: its model on the device, wrapped for DistributedDataParallel under ``torchrun``
    and compiled with ``--compile``."""
    net = prepare_model(member.model, runtime)
    if runtime.world_size > 1:
        net = DistributedDataParallel(net, device_ids=[runtime.device.index] if runtime.cuda else None)
    return torch.compile(net, dynamic=False) if member.args.compile else net


def _loaders(splits, args, runtime, augment):
    """The ``Loaders`` of the splits, each copied to the device once; an empty training split or a batch larger
    than it is refused."""
    if "train" not in splits or len(splits["train"][0]) == 0:
        raise UserError("the training split is empty; lower --holdout or raise --limit")
    if args.batch_size > len(splits["train"][0]):
        raise UserError(f"--batch-size {args.batch_size} is larger than the training split "
                        f"({len(splits['train'][0])} images); lower it")

    def loader(name, train=False):
        if name not in splits or len(splits[name][0]) == 0:
            return None
        images, targets = splits[name]
        return DeviceLoader(images, targets, args.batch_size // runtime.world_size, runtime.device, train=train,
                            augment=train and augment, seed=args.seed, rank=runtime.rank,
                            world_size=runtime.world_size)

    return Loaders(loader("train", train=True), loader("holdout"), loader("test"))


def loop_step(trainees, x, y, teacher, step, runtime):
    """One step of every member on the batch ``(x, y)``, the teacher's forward pass shared; the members of one
    ``Member.coupling`` step together, their losses computed from all their logits."""
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad(), runtime.autocast:
            teacher_logits = teacher(x)
    several = len(trainees) > 1
    for unit in _units(trainees):
        if unit[0].member.coupling is None:
            with _own_stream(unit[0], several):
                unit[0].step(x, y, teacher_logits, step)
            continue
        logits = []
        for t in unit:  # each forward pass draws from its member's own stream (dropout), as in a run of its own
            t.set_lr(step)
            with _own_stream(t, several):
                logits.append(t.forward(x))
        with runtime.autocast:
            losses = unit[0].member.coupling.losses(logits, y, teacher_logits, step / unit[0].total_steps)
        for t, out, terms in zip(unit, logits, losses):
            t.after_step(update(t.optimizer, terms, out, y, runtime, t.sums, t.member.metric))


def _units(trainees):
    """The trainees in order, the members of one coupling together (at the first of them), each other alone."""
    units = {}
    for t in trainees:
        units.setdefault(id(t.member.coupling) if t.member.coupling is not None else id(t), []).append(t)
    return list(units.values())


def calibrate(members, nets, loaders, args, runtime, teacher):
    """What a stage costs here, measured on its own members: a few real training steps (the first untimed:
    kernel selection, compilation), a hold-out evaluation and a save of each member. The weights, BatchNorm
    statistics and random state are then put back as they were, so that the run that follows is the one
    ``--epochs N`` gives."""
    initial = [{k: v.clone() for k, v in m.model.state_dict().items()} for m in members]
    rng = _rng_states(runtime)
    trainees = [Trainee(m, net, runtime, len(loaders.train), epochs=1) for m, net in zip(members, nets)]
    for t in trainees:
        t.start_epoch()
    step_seconds = _step_seconds(trainees, loaders.train, teacher, runtime)
    eval_seconds = save_seconds = 0.0
    for t in trainees:
        start = time.perf_counter()
        if loaders.holdout is not None:
            evaluate(t.eval_model, loaders.holdout, runtime, args.tta, t.member.metric)
            clean_state_dict(t.eval_model)  # what a better hold-out score costs besides
        eval_seconds += time.perf_counter() - start
        start = time.perf_counter()
        torch.save(t.resume_state(Loop(), 0, 0), io.BytesIO())
        save_seconds += time.perf_counter() - start
    for m, state in zip(members, initial):
        m.model.load_state_dict(state)
    _set_rng(runtime, rng)
    test_seconds = eval_seconds * len(loaders.test.images) / len(loaders.holdout.images) \
        if loaders.test is not None and loaders.holdout is not None else 0.0
    return Costs(step_seconds, step_seconds * len(loaders.train), eval_seconds, save_seconds, test_seconds,
                 loaders.train.batch_size * runtime.world_size)


def _step_seconds(trainees, train_loader, teacher, runtime):
    """Seconds per step of every member together, over a few steps timed after a few untimed ones (no more
    than a short epoch of each)."""
    untimed, timed = (min(n, max(2, len(train_loader))) for n in CALIBRATION_STEPS)

    def batches():
        for epoch in range(untimed + timed):
            train_loader.set_epoch(epoch)
            yield from train_loader.batches()

    stream = batches()
    for i, (x, y) in zip(range(untimed), stream):
        loop_step(trainees, x, y, teacher, i, runtime)
    runtime.synchronize()
    start = time.perf_counter()
    for i, (x, y) in zip(range(timed), stream):
        loop_step(trainees, x, y, teacher, i, runtime)
    runtime.synchronize()
    return (time.perf_counter() - start) / timed


def _start(trainees, args, runtime, states):
    """Restore every member from its resume state on ``--resume`` (they must stand at the same step) or seed each
    member's random stream, print where the run starts, write each member's config and metrics log; returns
    ``(epoch, step, Loop)``."""
    epoch = step = 0
    loop = Loop()
    if states:
        positions = {t.files.last: t.restore(state) for t, state in zip(trainees, states)}
        (epoch, step, elapsed, epoch_seconds), *others = positions.values()
        if any(p[:2] != (epoch, step) for p in others):
            where = ", ".join(f"{path} at epoch {p[0]}, step {p[1]}" for path, p in positions.items())
            raise UserError(f"these runs stopped at different points ({where}); resume each on its own")
        loop = Loop(elapsed_before=elapsed)
        loop.epoch_started -= epoch_seconds
    else:  # every member draws what it would draw in a run of its own, from --seed; each process its own masks
        for t in trainees:
            t.rng = _seeded_rng(runtime, args.seed + runtime.rank)
    if len(trainees) == 1:  # one member: its stream is the process's
        _set_rng(runtime, trainees[0].rng)
        trainees[0].rng = None
    if runtime.is_main:
        _announce(trainees, args, runtime, epoch, step)
        for t in trainees:
            write_config(t.files.config, t.config, runtime.device, t.member.meta["kind"], timing=t.meta["timing"])
            t.files.log.write_text("".join(json.dumps(record) + "\n" for record in t.history))
    return epoch, step, loop


def _announce(trainees, args, runtime, epoch, step):
    """Where the run starts: the device, the time box's plan, each member's schedule, the point it resumes at."""
    epochs, plan = trainees[0].epochs, trainees[0].meta["timing"]
    print(f"device: {device_name(runtime.device)}" + (f" x {runtime.world_size} processes"
                                                      if runtime.world_size > 1 else ""))
    if plan and not args.resume:
        print(f"time box of {plan['minutes']:g} min: {plan['images_per_s']:.0f} images/s measured, "
              f"{plan['epochs']} epochs planned to end after {plan['planned_seconds'] / 60:.2f} min")
    for t in trainees:
        print(("" if len(trainees) == 1 else f"{t.files.best}: ")
              + f"peak learning rate {t.peak_lr:g} (--lr {t.args.lr:g} x batch {args.batch_size} / 512), "
              f"{t.steps_per_epoch} steps per epoch, {t.warmup_steps} warm-up steps")
    resuming = ", ".join(str(t.files.last) for t in trainees)
    if args.resume and epoch < epochs:
        print(f"resuming {resuming} at epoch {epoch + 1}/{epochs}, step {step}")
    elif args.resume:
        print(f"resuming {resuming}: every epoch is done, the test evaluation follows")


def train_one_epoch(trainees, loader, epoch, first_step, args, runtime, teacher, stop):
    """The epoch's steps from ``first_step`` on, every member on each batch; returns the number of
    steps done when a stop signal ends the epoch early, else None."""
    loader.set_epoch(epoch)
    for t in trainees:
        t.start_epoch()
    steps = len(loader)
    with progress(loader.num_samples, f"epoch {epoch + 1}/{trainees[0].epochs}",
                  initial=first_step * loader.batch_size, disable=not runtime.is_main) as bar:
        for i, (x, y) in enumerate(loader.batches(first_step), first_step):
            loop_step(trainees, x, y, teacher, epoch * steps + i, runtime)
            bar.update(len(y))
            at_log_point = (i + 1) % args.log_every == 0
            if at_log_point:
                for t in trainees:
                    t.check_finite(epoch, first_step, i)
                shown = [t.running() for t in trainees]
                bar.set_postfix(loss="/".join(f"{loss:.3f}" for loss, _ in shown),
                                acc="/".join(f"{acc:.3f}" for _, acc in shown), refresh=False)
            # under torchrun every process must stop after the same step: they agree at log points
            stopping = stop.signum is not None if runtime.world_size == 1 else \
                at_log_point and _agreed(stop.signum is not None, runtime)
            if stopping and i + 1 < steps:
                for t in trainees:
                    t.check_finite(epoch, first_step, i)
                return i + 1
    return None


def end_of_epoch(trainees, holdout_loader, epoch, first_step, loop, runtime, save):
    """For each member: the divergence check, the epoch's record and hold-out evaluation, the best
    weights so far, the log line; then (with ``save``) every member's resume state and best weights on disk."""
    streams = []
    for t in trainees:
        args = t.args
        t.check_finite(epoch, first_step, t.steps_per_epoch - 1)
        record = t.epoch_record(epoch, loop.epoch_seconds())
        if holdout_loader is not None and evaluated_epoch(epoch, t.epochs, args.eval_every):
            scores = evaluate(t.eval_model, holdout_loader, runtime, args.tta, t.member.metric)
            if not math.isfinite(scores["loss"]):
                raise t.diverged("hold-out loss", epoch, t.steps_per_epoch - 1)
            record.update(holdout_loss=scores["loss"], holdout_acc=scores["acc"])
        record["elapsed_s"] = loop.elapsed()
        record = {k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in record.items()}
        t.history.append(record)
        if holdout_loader is None or record.get("holdout_acc", -1.0) > t.best_acc:
            t.best_acc, t.best_epoch = record.get("holdout_acc", t.best_acc), epoch + 1
            t.best_state, t.best_saved = clean_state_dict(t.eval_model), False
        streams.append(t.streams() if save else None)
        if not runtime.is_main:
            continue
        prefix = f"{t.files.best.stem}: " if len(trainees) > 1 else ""
        print(f"{prefix}epoch {epoch + 1}/{t.epochs}  " + "  ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "epoch"))
        if record.get("train_assigned", 0) > COLLAPSED_SHARE:
            print(f"note: {t.files.best.stem} was the specialist of {record['train_assigned']:.0%} of the images "
                  "this epoch: the specialists are collapsing onto one student")
        with open(t.files.log, "a") as f:
            f.write(json.dumps(record) + "\n")
    if save:
        if runtime.is_main:
            save_together(trainees, loop, epoch + 1, 0, streams)
        loop.saved = time.time()


def save_together(trainees, loop, epoch, step, streams):
    """Every member's writes (``streams``: each member's random streams), renamed together once all are written,
    so that no kill leaves the members stopped at different points; the runs they replace (``--force``) are then
    deleted."""
    save_checkpoints([w for t, each in zip(trainees, streams) for w in t.writes(loop, epoch, step, each)])
    for t in trainees:
        t.best_saved = True
        run_saved(t.files)


def _stop(trainees, loop, args, runtime, signum, epoch, step=0):
    """The one way out before the last epoch: save a mid-epoch resume state if ``step`` > 0 (an epoch's end
    has saved its own), say how to continue, then exit with 128 + the signal's number, or
    ``EXIT_TIME_BUDGET`` when ``--time-budget`` ran out."""
    steps = trainees[0].steps_per_epoch
    streams = [t.streams() for t in trainees] if step else None
    if runtime.is_main:
        if step:
            save_together(trainees, loop, epoch, step, streams)
        epochs = trainees[0].epochs
        where = f"at epoch {epoch + 1}/{epochs}, step {step}/{steps}" if step else f"after epoch {epoch}/{epochs}"
        why = signal.Signals(signum).name if signum else f"time budget of {args.time_budget:g} min spent"
        print(f"\n{why}: stopped {where}; saved {', '.join(str(t.files.last) for t in trainees)}\n"
              f"continue with: {continue_command(args.command)}")
    # torchrun stops every process once one exits with an error: only rank 0 does, once it has saved and said so
    raise SystemExit((128 + signum if signum else EXIT_TIME_BUDGET) if runtime.is_main else 0)


def _finish(trainee, test_loader, time_box, startup_seconds, stop):
    """The best weights, evaluated once on the test split, saved as the complete checkpoint."""
    t, runtime = trainee, trainee.runtime
    t.eval_model.load_state_dict(t.best_state)
    scores = evaluate(t.eval_model, test_loader, runtime, t.args.tta, t.member.metric, stop) \
        if test_loader is not None else {"acc": None}
    if scores is None:
        if runtime.is_main:
            print(f"\n{signal.Signals(stop.signum).name}: stopped during the final test evaluation (every epoch is "
                  f"saved); continue with: {continue_command(t.args.command)}")
        raise SystemExit(128 + stop.signum)
    timing = {**(t.meta.get("timing") or {}), "startup_seconds": startup_seconds, "wall_seconds": time_box.elapsed(),
              "train_images_per_s": sum(r["images_per_s"] for r in t.history) / max(len(t.history), 1),
              "peak_memory_mib": torch.cuda.max_memory_allocated(runtime.device) / 2**20 if runtime.cuda else None}
    final = t.best_checkpoint(test_acc=scores["acc"], complete=True, timing=timing)
    if runtime.is_main:
        save_checkpoint(t.files.best, final)
        run_saved(t.files)
        plot_history(t.history, t.files.plot, title=run_title(t.member.meta, t.files.best),
                     loss_name=t.member.meta.get("loss", "loss"))
        shown = {k: "n/a" if final[k] is None else f"{final[k]:.4f}" for k in ("holdout_acc", "test_acc")}
        print(f"saved {t.files.best}  hold-out acc {shown['holdout_acc']}  test acc {shown['test_acc']}")
    return final


def run_title(meta, path):
    """``student densenet121, with KD — checkpoints/cpu/student_densenet121.pt``, ``selector —
    checkpoints/cpu/selector.pt``: tells runs apart, naming each thing once."""
    kd = {True: ", with KD", False: ", without KD"}.get(meta.get("kd"), "")
    specialist = f", {meta['specialist']['method']} specialist" if meta.get("specialist") else ""
    network = meta["kind"] if meta["arch"] == meta["kind"] else f"{meta['kind']} {meta['arch']}"
    return f"{network}{kd}{specialist} — {path}"
