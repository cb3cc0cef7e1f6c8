"""The one training engine: teacher, students and selector all train through ``fit``.

SGD with Nesterov momentum, linear warm-up then cosine decay stepped per batch, bf16
autocast and ``channels_last`` on CUDA (fp32 on CPU), optional ``torch.compile`` and weight
EMA, DistributedDataParallel under ``torchrun``. Metrics stay on the device during an
epoch. Every epoch ``<name>.last.pt`` (resume state) is rewritten atomically, and
``<name>.pt`` holds the best weights by hold-out accuracy; at the end the test set is
evaluated once, on those weights.
"""

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from utils.checkpoint import clean_state_dict, load_checkpoint, save_checkpoint
from utils.cli import UserError, pick_device
from utils.data import DeviceLoader
from utils.plots import plot_history

# Flags that may differ between a run and its --resume without changing the result.
RUN_CONTROL_FLAGS = {"resume", "time_budget", "log_every", "compile", "device", "download", "data_dir"}


def add_training_args(parser, checkpoint, epochs, lr, batch_size=512, weight_decay=5e-4, label_smoothing=0.1,
                      warmup_epochs=2.0):
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs, help="passes over the training split")
    g.add_argument("--batch-size", type=int, default=batch_size, help="images per step, over all GPUs")
    g.add_argument("--lr", type=float, default=lr,
                   help="peak learning rate for a batch of 512, reached after the warm-up; scaled linearly "
                        "with --batch-size")
    g.add_argument("--warmup-epochs", type=float, default=warmup_epochs,
                   help="epochs of linear warm-up from 0 to --lr; a cosine decay to 0 follows")
    g.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum of SGD")
    g.add_argument("--weight-decay", type=float, default=weight_decay,
                   help="L2 weight decay (not applied to biases and BatchNorm)")
    g.add_argument("--label-smoothing", type=float, default=label_smoothing, help="label smoothing of cross-entropy")
    g.add_argument("--ema", type=float, default=0.0,
                   help="decay of an exponential moving average of the weights, evaluated and saved instead "
                        "of the raw weights (0: off; try 0.999)")
    g.add_argument("--tta", action="store_true", help="evaluate on each image and its mirror image, averaged")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate on the hold-out split every k epochs")
    g.add_argument("--log-every", type=int, default=50,
                   help="steps between updates of the loss and accuracy on the progress bar")
    g.add_argument("--checkpoint", default=checkpoint,
                   help="output: best weights here, resume state beside it as <name>.last.pt, metrics log "
                        "as <name>.metrics.jsonl, curves as <name>.curves.png"
                        + ("" if checkpoint else " (default: checkpoints/student_<arch>.pt, _nokd.pt with --no-kd)"))
    g.add_argument("--resume", action="store_true", help="continue the interrupted run saved at --checkpoint")
    g.add_argument("--time-budget", type=float, default=None,
                   help="save and stop after the first epoch that ends past this many minutes; "
                        "continue with --resume")
    return g


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
    torch.manual_seed(args.seed)
    return Runtime(device, rank, world_size)


def teardown_runtime(runtime):
    if runtime.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def prepare_model(model, runtime, compile=False):
    """Move to the device (``channels_last`` on CUDA), optionally compile; returns the callable."""
    model.to(runtime.device, memory_format=torch.channels_last if runtime.device.type == "cuda" else None)
    return torch.compile(model, dynamic=False) if compile else model


def predict(model, x, tta=False):
    logits = model(x)
    return (logits + model(x.flip(3))) / 2 if tta else logits


@torch.no_grad()
def evaluate(model, loader, runtime, tta=False):
    """Accuracy of ``model`` on a loader's split (the argmax of soft targets counts as the label)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=runtime.device)
    count = torch.zeros((), device=runtime.device)
    for x, y in loader:
        with runtime.autocast:
            logits = predict(model, x, tta)
        labels = y if y.dim() == 1 else y.argmax(1)
        correct += (logits.argmax(1) == labels).sum()
        count += len(y)
    model.train(was_training)
    runtime.all_sum(correct), runtime.all_sum(count)
    return (correct / count.clamp(min=1)).item()


def _lr_at(step, total_steps, warmup_steps, peak):
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, lr, momentum, weight_decay, runtime):
    """SGD with Nesterov momentum; no weight decay on biases and BatchNorm; fused on CUDA."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    fused = runtime.device.type == "cuda"
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=momentum, nesterov=True,
                           fused=fused or None, foreach=None if fused else True)


def train_step(net, optimizer, loss_fn, x, y, runtime, metrics):
    """One optimisation step; adds ``[loss * batch, correct, batch]`` to the device tensor ``metrics``."""
    with runtime.autocast:
        logits = net(x)
        loss = loss_fn(logits, x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    labels = y if y.dim() == 1 else y.argmax(1)
    metrics[0] += loss.detach().float() * len(y)
    metrics[1] += (logits.detach().argmax(1) == labels).sum()
    metrics[2] += len(y)


def _paths(checkpoint):
    path = Path(checkpoint)
    name = path.name.removesuffix(".pt")
    return {"best": path, "last": path.with_name(f"{name}.last.pt"),
            "log": path.with_name(f"{name}.metrics.jsonl"), "plot": path.with_name(f"{name}.curves.png")}


def _check_resumable(state, args, path):
    old = state.get("config", {})
    changed = [k for k, v in vars(args).items() if k not in RUN_CONTROL_FLAGS and k in old and old[k] != v]
    if changed:
        k = changed[0]
        raise UserError(f"{path} was started with --{k.replace('_', '-')} {old[k]}, not {getattr(args, k)}; "
                        "resume with the same flags, or start afresh without --resume")


def fit(model, loss_fn, splits, args, runtime, meta, augment=True):
    """Train ``model`` on ``splits["train"]``, select on ``splits["holdout"]``, test once on ``splits["test"]``.

    ``loss_fn(logits, x, y)`` returns the batch loss; ``splits`` maps a split name to
    ``(uint8 images, targets)`` (``holdout`` and ``test`` may be missing or empty).
    ``meta`` (kind, arch, num_classes, ...) is stored in every checkpoint.
    Returns the final checkpoint dict, or ``None`` when ``--time-budget`` stopped the run early.
    """
    paths = _paths(args.checkpoint)
    bs = args.batch_size // runtime.world_size
    if bs < 1:
        raise UserError(f"--batch-size {args.batch_size} is smaller than the number of processes")

    def loader(name, train=False):
        if name not in splits or len(splits[name][0]) == 0:
            return None
        images, targets = splits[name]
        return DeviceLoader(images, targets, bs, runtime.device, train=train, augment=train and augment,
                            seed=args.seed, rank=runtime.rank, world_size=runtime.world_size)

    train_loader, holdout_loader, test_loader = loader("train", train=True), loader("holdout"), loader("test")
    if train_loader is None:
        raise UserError("the training split is empty; lower --holdout or raise --limit")

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
    start_epoch, best_acc, best_state, history = 0, -1.0, None, []
    config = vars(args)

    if args.resume:
        if not paths["last"].exists():
            raise UserError(f"nothing to resume: no {paths['last']}; start the run without --resume")
        state = load_checkpoint(paths["last"], hint="start the run without --resume", kind=meta["kind"],
                                arch=meta["arch"])
        _check_resumable(state, args, paths["last"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"])
        start_epoch, best_acc, history = state["epoch"], state["best_acc"], state["history"]
        if best_acc >= 0 or holdout_loader is None:  # else no epoch was evaluated yet, so no best weights
            best_state = load_checkpoint(paths["best"], hint="start the run without --resume")["model"]
    if runtime.is_main:
        if args.resume:
            print(f"resuming {paths['last']} after epoch {start_epoch}/{args.epochs}")
        paths["log"].parent.mkdir(parents=True, exist_ok=True)
        paths["log"].write_text("".join(json.dumps(record) + "\n" for record in history))

    def checkpoint(**extra):
        return {**meta, "config": config, "epochs": args.epochs, **extra}

    started = time.time()
    for epoch in range(start_epoch, args.epochs):
        train_loader.set_epoch(epoch)
        model.train()
        metrics = torch.zeros(3, device=runtime.device)  # loss * batch, correct, images
        epoch_start = time.time()
        bar = tqdm(total=train_loader.num_samples, unit="img", unit_scale=True,
                   desc=f"epoch {epoch + 1}/{args.epochs}", disable=not runtime.is_main, leave=False)
        for i, (x, y) in enumerate(train_loader):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total_steps, warmup_steps, peak_lr)
            train_step(net, optimizer, loss_fn, x, y, runtime, metrics)
            if ema:
                ema.update_parameters(model)
            bar.update(len(y))
            if (i + 1) % args.log_every == 0:
                loss_sum, correct, seen = metrics.tolist()
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        loss_sum, correct, seen = runtime.all_sum(metrics).tolist()
        record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": loss_sum / seen,
                  "train_acc": correct / seen, "images_per_s": seen / (time.time() - epoch_start)}
        last_epoch = epoch + 1 == args.epochs
        if holdout_loader is not None and ((epoch + 1) % args.eval_every == 0 or last_epoch):
            record["holdout_acc"] = evaluate(eval_model, holdout_loader, runtime, args.tta)
        history.append(record)
        improved = holdout_loader is None or record.get("holdout_acc", -1.0) > best_acc
        if improved:
            best_acc = record.get("holdout_acc", best_acc)
            best_state = clean_state_dict(eval_model)
        if runtime.is_main:
            print(f"epoch {epoch + 1}/{args.epochs}  " + "  ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "epoch"))
        out_of_time = args.time_budget is not None and time.time() - started > 60 * args.time_budget
        out_of_time = runtime.all_sum(torch.tensor(float(out_of_time), device=runtime.device)).item() > 0
        if runtime.is_main:
            with open(paths["log"], "a") as f:
                f.write(json.dumps(record) + "\n")
            if improved:
                save_checkpoint(paths["best"], checkpoint(model=best_state, epoch=epoch + 1, holdout_acc=best_acc,
                                                          test_acc=None, complete=False))
            save_checkpoint(paths["last"], checkpoint(
                model=clean_state_dict(model), optimizer=optimizer.state_dict(),
                ema=ema.state_dict() if ema else None, rng=torch.get_rng_state(), epoch=epoch + 1,
                best_acc=best_acc, history=history, complete=last_epoch))
        if out_of_time and not last_epoch:
            if runtime.is_main:
                print(f"time budget of {args.time_budget} min spent: stopped after epoch {epoch + 1}/{args.epochs}; "
                      "continue with the same command plus --resume")
            return None

    eval_model.load_state_dict(best_state)
    test_acc = evaluate(eval_model, test_loader, runtime, args.tta) if test_loader is not None else None
    final = checkpoint(model=best_state, epoch=len(history), holdout_acc=best_acc if best_acc >= 0 else None,
                       test_acc=test_acc, complete=True)
    if runtime.is_main:
        save_checkpoint(paths["best"], final)
        plot_history(history, paths["plot"], title=f"{meta['kind']} {meta['arch']}")
        shown = {k: "n/a" if final[k] is None else f"{final[k]:.4f}" for k in ("holdout_acc", "test_acc")}
        print(f"saved {paths['best']}  hold-out acc {shown['holdout_acc']}  test acc {shown['test_acc']}")
    return final

