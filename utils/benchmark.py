"""What bench.py measures: training and inference throughput, our engine against the plain loop most CIFAR
repositories use, on the same images. Every network has random weights: speed does not depend on their values."""

import argparse
import gc
import itertools
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from models import build_model, model_stats
from utils.augment import Augmentation
from utils.data import CLASSES, MEAN, STD, DeviceLoader
from utils.engine import Member, Trainee, loop_step, make_optimizer, train_step, training_net
from utils.losses import distillation_loss
from utils.policies import StudentOutputs, build_router
from utils.recipes import RECIPES, STUDENTS, TEACHER
from utils.routed import batched_routed, timed
from utils.runtime import batched_logits, prepare_model

BASELINE_BATCH = 512
STUDENT_ARCHS = tuple(STUDENTS.values())
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4  # both loops; the values do not change the speed


# ----------------------------------------------------------------------------- timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(step, batches, steps, warmup, device):
    """Images/s of ``step(x, y)`` over ``steps`` batches of the iterator ``batches``, after ``warmup``."""
    for _ in range(warmup):
        step(*next(batches))
    _sync(device)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(batches)  # loading counts: it is part of each loop's cost
        step(x, y)
        images += len(x)
    _sync(device)
    return images / (time.perf_counter() - start)


def with_peak_memory(fn, device):
    """``(fn(), peak MiB that fn allocated on the GPU)``; the peak is None off CUDA."""
    gc.collect()
    if device.type != "cuda":
        return fn(), None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    return result, (torch.cuda.max_memory_allocated(device) - before) / 2**20


def full_batches(loader, batch_size):
    """Full batches of ``loader``, epoch after epoch (a short last batch would change the shapes timed)."""
    for epoch in itertools.count():
        if isinstance(loader, DeviceLoader):
            loader.set_epoch(epoch)
        for x, y in loader:
            if len(x) == batch_size:
                yield x, y


# ----------------------------------------------------------------------------- training

def train_ours(arch, images, labels, args, runtime, batch_size, compile):
    """Images/s of our engine's training step, as ``utils.engine.fit`` runs it, with the recipe's augmentation."""
    model = build_model(arch, len(CLASSES))
    net = prepare_model(model, runtime, compile)
    optimizer = make_optimizer(model, LR, MOMENTUM, WEIGHT_DECAY, runtime)
    augment = Augmentation.from_args(argparse.Namespace(**RECIPES[arch]))
    loader = DeviceLoader(images, labels, batch_size, runtime.device, train=True, augment=augment, seed=args.seed)
    sums = {}

    def loss_fn(logits, y, teacher_logits=None):
        return F.cross_entropy(logits.float(), y, label_smoothing=0.1)

    def step(x, y):
        train_step(net, optimizer, loss_fn, x, y, runtime, sums)

    model.train()
    return throughput(step, full_batches(loader, batch_size), args.steps, args.warmup_steps, runtime.device)


def train_students_together(images, labels, args, runtime, batch_size):
    """Images/s of the students' loop as ``StudentTrain.py --model 1 2`` runs it: one augmentation and one frozen
    teacher forward pass per batch, then a KD step of each student (``utils.engine.loop_step``)."""
    teacher = prepare_model(build_model(TEACHER, len(CLASSES)), runtime).eval().requires_grad_(False)
    loader = DeviceLoader(images, labels, batch_size, runtime.device, train=True, seed=args.seed,
                          augment=Augmentation.from_args(argparse.Namespace(**RECIPES[STUDENT_ARCHS[0]])))
    trainees = []
    for arch in STUDENT_ARCHS:
        flags = argparse.Namespace(**RECIPES[arch], momentum=MOMENTUM, warmup_epochs=0, compile=args.compile)
        flags.batch_size, flags.epochs = batch_size, 1
        member = Member(build_model(arch, len(CLASSES)), distillation_loss("kl"), flags, {}, None)
        trainees.append(Trainee(member, training_net(member, runtime), runtime, len(loader), epochs=1))
        trainees[-1].start_epoch()

    def step(x, y):
        loop_step(trainees, x, y, teacher, 0, runtime)

    return throughput(step, full_batches(loader, batch_size), args.steps, args.warmup_steps, runtime.device)


class PILImages(Dataset):
    """The same uint8 images, served one PIL image at a time through torchvision transforms."""

    def __init__(self, images, labels, transform):
        self.images = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())  # (N, H, W, C) for PIL
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def train_reference(arch, images, labels, args, runtime):
    """Images/s of the plain loop: DataLoader + PIL transforms, fp32, default memory format, no compile."""
    device = runtime.device
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    loader = DataLoader(PILImages(images, labels, transform), batch_size=args.ref_batch_size, shuffle=True,
                        num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True)
    model = build_model(arch, len(CLASSES)).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    criterion = nn.CrossEntropyLoss()
    losses = []

    def step(inputs, targets):
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad()
        loss = criterion(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())  # the host sync those loops pay every step

    return throughput(step, full_batches(loader, args.ref_batch_size), args.steps, args.warmup_steps, device)


# ----------------------------------------------------------------------------- inference

def router_at_share(name, students, flops, selector, images, share, runtime):
    """A ``name`` router whose threshold sends ``share`` of ``images`` to the dearer student, the cheaper
    (by ``flops``) first."""
    router = build_router(name, flops=flops, order=sorted(range(len(students)), key=flops.__getitem__)[:2])
    router.temperature_ = torch.ones(len(students))
    logits = torch.stack([batched_logits(s, images, runtime) for s in students], 1).cpu()
    scores = batched_logits(selector, images, runtime).cpu() if router.uses_selector else None
    climbs = router.climbs(StudentOutputs(logits, scores))[:, 0].double()
    router.threshold_ = torch.quantile(climbs, 1 - share).item() if share < 1 else -math.inf
    return router


def inference(test_images, args, runtime):
    """``{system: images/s}``, timed as inference.py times its systems."""
    images, bs = test_images[:args.steps * args.infer_batch_size], args.infer_batch_size

    def prepare(model):
        return prepare_model(model.eval(), runtime, args.compile)

    teacher = prepare(build_model(TEACHER, len(CLASSES)))
    students = [build_model(arch, len(CLASSES)) for arch in STUDENT_ARCHS]
    flops = [model_stats(s)["flops"] / 1e9 for s in students]
    students = [prepare(s) for s in students]
    selector = prepare(build_model("selector", len(STUDENT_ARCHS)))
    # Routed sub-batches vary in size: one dynamic-shape compile rather than prepare_model's one per size.
    routed = [torch.compile(s._orig_mod, dynamic=True) for s in students] if args.compile else students
    cascade, selection = (router_at_share(name, students, flops, selector, images, args.defer_share, runtime)
                          for name in ("cascade", "selector"))
    systems = {
        "teacher": lambda: batched_logits(teacher, images, runtime, bs),
        **{arch: lambda s=s: batched_logits(s, images, runtime, bs) for arch, s in zip(STUDENT_ARCHS, students)},
        "both_students": lambda: [batched_logits(s, images, runtime, bs) for s in students],
        "cascade": lambda: batched_routed(cascade, routed, selector, images, runtime, bs),
        "selector_routing": lambda: batched_routed(selection, routed, selector, images, runtime, bs),
    }
    return {name: len(images) / timed(fn, runtime)[1][0] for name, fn in systems.items()}


# ----------------------------------------------------------------------------- the tables bench.py prints

def _mib(value):
    return "n/a" if value is None else f"{value:.0f}"


def training_row(arch, images, labels, args, runtime):
    """Our engine's, the baseline's (with --baseline) and the reference loop's images/s and peak memory."""
    device, row = runtime.device, {}
    row["ours_images_per_s"], row["ours_peak_mib"] = with_peak_memory(
        lambda: train_ours(arch, images, labels, args, runtime, args.batch_size, args.compile), device)
    if args.baseline:
        row["baseline_images_per_s"], row["baseline_peak_mib"] = with_peak_memory(
            lambda: train_ours(arch, images, labels, args, runtime, min(BASELINE_BATCH, len(images)), False), device)
        row["speedup_over_baseline"] = row["ours_images_per_s"] / row["baseline_images_per_s"]
    row["reference_images_per_s"], row["reference_peak_mib"] = with_peak_memory(
        lambda: train_reference(arch, images, labels, args, runtime), device)
    row["speedup"] = row["ours_images_per_s"] / row["reference_images_per_s"]
    return row


def training_table(images, labels, args, runtime):
    """``{arch: training_row}`` of every architecture of --archs, printed as it is measured."""
    ours = ("bf16 autocast, channels_last, fused SGD" if runtime.cuda else "fp32, foreach SGD") + \
        (", torch.compile" if args.compile else "")
    print(f"training on {len(images)} images, {args.steps} timed steps after {args.warmup_steps} warm-up "
          f"steps, random weights, each network's recipe augmentation\n  ours:      batch {args.batch_size}, {ours}, "
          f"split held on the device ({images.numel() / 2**20:.0f} MiB, counted in its peak)\n"
          + (f"  baseline:  the engine at batch {BASELINE_BATCH}, no compile\n"
             if args.baseline else "")
          + f"  reference: batch {args.ref_batch_size}, DataLoader + PIL transforms ({args.workers} workers), fp32, "
          "no compile")
    columns = ["ours img/s", "ours peak MiB", *(["baseline img/s", "ours/baseline"] if args.baseline else []),
               "ref img/s", "ref peak MiB", "ours/ref"]
    print(f"{'arch':<12} " + " ".join(f"{c:>14}" for c in columns))
    table = {}
    for arch in dict.fromkeys(args.archs):
        row = table[arch] = training_row(arch, images, labels, args, runtime)
        cells = [f"{row['ours_images_per_s']:.1f}", _mib(row["ours_peak_mib"]),
                 *([f"{row['baseline_images_per_s']:.1f}", f"{row['speedup_over_baseline']:.2f}x"]
                   if args.baseline else []),
                 f"{row['reference_images_per_s']:.1f}", _mib(row["reference_peak_mib"]), f"{row['speedup']:.2f}x"]
        print(f"{arch:<12} " + " ".join(f"{c:>14}" for c in cells), flush=True)
    return table


def students_loop(images, labels, args, runtime):
    """The students' loop's images/s and peak memory, printed."""
    together = {}
    together["images_per_s"], together["peak_mib"] = with_peak_memory(
        lambda: train_students_together(images, labels, args, runtime, args.batch_size), runtime.device)
    print(f"students' loop (one {TEACHER} forward pass, then a KD step of each of {', '.join(STUDENT_ARCHS)}): "
          f"{together['images_per_s']:.1f} img/s, peak {_mib(together['peak_mib'])} MiB", flush=True)
    return together


def inference_table(test_images, args, runtime):
    """``{system: images/s}`` of inference, printed."""
    torch.backends.cudnn.benchmark = False  # as inference.py times them: routed batches vary in shape
    speeds = inference(test_images, args, runtime)
    labels = {"teacher": f"teacher {TEACHER}", **{a: f"student {a}" for a in STUDENT_ARCHS},
              "both_students": "both students",
              "cascade": f"cascade (dearer student on {args.defer_share:.0%})",
              "selector_routing": f"selector + 1 student ({args.defer_share:.0%} to the dearer)"}
    timed_images = min(len(test_images), args.steps * args.infer_batch_size)
    print(f"\ninference: batch {args.infer_batch_size}, eval, no_grad{', bf16 autocast' if runtime.cuda else ''}, "
          f"{timed_images} test images on the device, the second of two passes timed, random weights")
    print(f"{'system':<40} {'img/s':>10}")
    for name, speed in speeds.items():
        print(f"{labels[name]:<40} {speed:>10.1f}")
    return speeds
