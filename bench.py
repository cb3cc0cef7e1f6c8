"""Training and inference throughput: our engine against the plain loop most CIFAR repositories use.

Training, per architecture, on the same images: our engine's step (the split held on the
device, batched crop and flip, bf16 autocast, channels_last and fused SGD on CUDA, optional
torch.compile) against a reference loop (torchvision DataLoader with PIL transforms, fp32,
batch 128, no compile, ``loss.item()`` every step), with images/s, peak GPU memory and the
speed-up. Inference: the teacher, each student, both students on every image, and routed
inference (the selector, then only the chosen student for each image), on test images already
on the device.

Every network has random weights: speed does not depend on their values. The exception is the
routed figure, which depends on the share of images the selector sends to each student; give a
trained selector with --selector, otherwise an untrained one routes and its share is printed.

    python bench.py --data-dir /path/to/cifar10                                   # a GPU
    python bench.py --device cpu --limit 64 --batch-size 8 --ref-batch-size 8 --steps 2 --workers 0
"""

import gc
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from models import build_model
from StudentTrain import STUDENTS
from teacherTrain import CLASSIFIERS
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.cli import (NON_NEGATIVE_INT, POSITIVE_INT, UserError, add_data_args, add_device_args, make_parser, parse,
                       print_config, run)
from utils.data import CLASSES, MEAN, STD, DeviceLoader, check_split_flags, load_cifar10, make_splits
from utils.engine import make_optimizer, predict, prepare_model, setup_runtime, train_step
from utils.routing import routed_predict
from utils.runs import device_name

TEACHER = "resnet50"
STUDENT_ARCHS = tuple(STUDENTS.values())
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4  # both loops; the values do not change the speed


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    add_data_args(parser)
    parser.set_defaults(holdout=0)  # nothing is selected here: time on the whole training split
    g = parser.add_argument_group("benchmark")
    g.add_argument("--archs", nargs="+", default=[TEACHER, *STUDENT_ARCHS], choices=CLASSIFIERS,
                   help="architectures whose training is timed")
    g.add_argument("--batch-size", type=POSITIVE_INT, default=512, help="images per training step of our engine")
    g.add_argument("--ref-batch-size", type=POSITIVE_INT, default=128,
                   help="images per training step of the reference loop")
    g.add_argument("--steps", type=POSITIVE_INT, default=30, help="timed steps (batches) per measurement")
    g.add_argument("--warmup-steps", type=NON_NEGATIVE_INT, default=5,
                   help="untimed steps before each measurement (with --compile they include compiling); "
                        "when non-zero, inference also runs each of its batches once untimed, so that every "
                        "sub-batch size of routed inference is tuned by cuDNN or compiled before timing")
    g.add_argument("--workers", type=NON_NEGATIVE_INT, default=4, help="DataLoader worker processes of the reference loop")
    g.add_argument("--infer-batch-size", type=POSITIVE_INT, default=1024, help="images per inference batch")
    g.add_argument("--selector", default=None,
                   help="selector checkpoint (trainSelector.py) whose choices route the images in routed "
                        "inference, to the student architectures it was trained for; without it an untrained "
                        "selector routes them")
    g.add_argument("--out", default=None, help="also write every figure to this JSON file")
    add_device_args(parser)
    return parser


def parse_args(argv=None):
    """The flags, and the split sizes they ask for checked against the batch sizes before any data is decoded."""
    parser = build_parser()
    args = parse(parser, argv)
    sizes = check_split_flags(parser, args)
    for flag, batch, split in (("--batch-size", args.batch_size, "train"),
                               ("--ref-batch-size", args.ref_batch_size, "train"),
                               ("--infer-batch-size", args.infer_batch_size, "test")):
        if sizes is not None and batch > sizes[split]:
            parser.error(f"{flag} {batch} is larger than the {split} split ({sizes[split]} images); lower it, "
                         "or raise --limit")
    return args


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

def train_ours(arch, images, labels, args, runtime):
    """Images/s of our engine's training step, as ``utils.engine.fit`` runs it."""
    model = build_model(arch, len(CLASSES))
    net = prepare_model(model, runtime, args.compile)
    optimizer = make_optimizer(model, LR, MOMENTUM, WEIGHT_DECAY, runtime)
    loader = DeviceLoader(images, labels, args.batch_size, runtime.device, train=True, seed=args.seed)
    sums = {}

    def loss_fn(logits, x, y):
        return F.cross_entropy(logits.float(), y, label_smoothing=0.1)

    def step(x, y):
        train_step(net, optimizer, loss_fn, x, y, runtime, sums)

    model.train()
    return throughput(step, full_batches(loader, args.batch_size), args.steps, args.warmup_steps, runtime.device)


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

def load_selector(args):
    """``(selector, the student architectures it routes to, where it comes from)``."""
    if args.selector is None:
        return build_model("selector", len(STUDENT_ARCHS)), STUDENT_ARCHS, "untrained"
    hint = "python trainSelector.py"
    checkpoint = load_checkpoint(args.selector, hint=hint, kind="selector")
    archs = tuple(s["arch"] for s in checkpoint["students"])
    return model_from_checkpoint(checkpoint, args.selector, hint), archs, args.selector


def inference(test_images, test_labels, args, runtime):
    """``({system: images/s}, {student: share routed to it}, where the selector comes from)``."""
    loader = DeviceLoader(test_images, test_labels, args.infer_batch_size, runtime.device)
    batches = [b for b in loader if len(b[0]) == args.infer_batch_size][:args.steps]
    selector, student_archs, selector_source = load_selector(args)

    def prepare(model):
        return prepare_model(model.eval(), runtime, args.compile)

    teacher = prepare(build_model(TEACHER, len(CLASSES)))
    students = [prepare(build_model(arch, len(CLASSES))) for arch in student_archs]
    selector = prepare(selector)
    # Routed sub-batches vary in size: one dynamic-shape compile rather than prepare_model's one per size.
    routed_students = [torch.compile(s._orig_mod, dynamic=True) for s in students] if args.compile else students
    systems = {
        "teacher": lambda x: predict(teacher, x),
        **{arch: lambda x, s=s: predict(s, x) for arch, s in zip(student_archs, students)},
        "both_students": lambda x: sum(predict(s, x).float() for s in students) / len(students),
        "routed": lambda x: routed_predict(selector, routed_students, x),
    }
    warmup = max(args.warmup_steps, len(batches)) if args.warmup_steps else 0
    with torch.no_grad(), runtime.autocast:
        speeds = {name: throughput(lambda x, y, fn=fn: fn(x), itertools.cycle(batches), args.steps, warmup,
                                   runtime.device)
                  for name, fn in systems.items()}
        choices = torch.cat([selector(x).argmax(1) for x, _ in batches])
    share = {arch: (choices == k).float().mean().item() for k, arch in enumerate(student_archs)}
    return speeds, share, selector_source


# ----------------------------------------------------------------------------- report

def _mib(value):
    return "n/a" if value is None else f"{value:.0f}"


def main(argv=None):
    args = parse_args(argv)
    runtime = setup_runtime(args)
    print_config(args, "bench.py")
    data = load_cifar10(args.data_dir, args.download, allow_partial=args.partial_data)
    splits = make_splits(data, args.holdout, args.split_seed, args.limit)
    train_images, train_labels = splits["train"]
    test_images, test_labels = splits["test"]
    if len(train_images) < max(args.batch_size, args.ref_batch_size):
        raise UserError(f"the training split has {len(train_images)} images, fewer than one batch "
                        f"(--batch-size {args.batch_size}, --ref-batch-size {args.ref_batch_size}); "
                        "raise --limit or lower the batch sizes")
    if len(test_images) < args.infer_batch_size:
        raise UserError(f"the test split has {len(test_images)} images, fewer than one batch "
                        f"(--infer-batch-size {args.infer_batch_size}); raise --limit or lower it")
    device = runtime.device
    cuda = device.type == "cuda"

    print(f"\ndevice: {device_name(device)}   torch {torch.__version__}")
    ours = ("bf16 autocast, channels_last, fused SGD" if cuda else "fp32, foreach SGD") + \
        (", torch.compile" if args.compile else "")
    print(f"training on {len(train_images)} images, {args.steps} timed steps after {args.warmup_steps} warm-up "
          f"steps, random weights\n  ours:      batch {args.batch_size}, {ours}, split held on the device "
          f"({train_images.numel() / 2**20:.0f} MiB, counted in its peak)\n  reference: batch "
          f"{args.ref_batch_size}, DataLoader + PIL transforms ({args.workers} workers), fp32, no compile")
    header = f"{'arch':<12} {'ours img/s':>11} {'ours peak MiB':>14} {'ref img/s':>10} {'ref peak MiB':>13} " \
             f"{'speed-up':>9}"
    print(header)
    training = {}
    for arch in dict.fromkeys(args.archs):
        ours_speed, ours_peak = with_peak_memory(
            lambda: train_ours(arch, train_images, train_labels, args, runtime), device)
        ref_speed, ref_peak = with_peak_memory(
            lambda: train_reference(arch, train_images, train_labels, args, runtime), device)
        training[arch] = {"ours_images_per_s": ours_speed, "ours_peak_mib": ours_peak,
                          "reference_images_per_s": ref_speed, "reference_peak_mib": ref_peak,
                          "speedup": ours_speed / ref_speed}
        print(f"{arch:<12} {ours_speed:>11.1f} {_mib(ours_peak):>14} {ref_speed:>10.1f} {_mib(ref_peak):>13} "
              f"{ours_speed / ref_speed:>8.2f}x", flush=True)

    speeds, share, selector_source = inference(test_images, test_labels, args, runtime)
    labels = {"teacher": f"teacher {TEACHER}", **{a: f"student {a}" for a in share},
              "both_students": "both students", "routed": "routed (selector + 1 student)"}
    print(f"\ninference: batch {args.infer_batch_size}, eval, no_grad{', bf16 autocast' if cuda else ''}, "
          f"test images on the device, {args.steps} timed batches, random teacher and student weights")
    print(f"{'system':<30} {'img/s':>10}")
    for name, speed in speeds.items():
        print(f"{labels[name]:<30} {speed:>10.1f}")
    print(f"routed by the {selector_source} selector: " +
          ", ".join(f"{fraction:.0%} to {a}" for a, fraction in share.items()))

    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "device": device_name(device), "torch": str(torch.__version__), "config": vars(args),
            "training": training, "inference_images_per_s": speeds,
            "routed_share": share, "selector": selector_source}, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    run(main)
