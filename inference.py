"""Evaluate the teacher, the students and the routed system on the CIFAR-10 test set.

Routed inference runs the selector, then only the chosen student on each image. For
comparison: the students' averaged logits (ensemble), confidence routing (the student with
the higher top probability) and the oracle (an image counts if any student is right); the
no-KD twins too, where StudentTrain.py --no-kd wrote them. Writes results/results.md,
results/results.json and PNG plots. With --images, classifies your own image files instead.
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from models import model_stats
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.cli import POSITIVE_INT, UserError, add_data_args, add_device_args, make_parser, parse, print_config, run
from utils.data import CLASSES, load_cifar10, make_splits, normalize
from utils.engine import prepare_model, setup_runtime
from utils.runs import RESULTS_ROOT, default_checkpoint, device_name
from utils.plots import plot_confusion, plot_grouped_bars
from utils.routing import (batched_logits, batched_routed, check_selector_students,
                           default_students, load_classifier, load_students, routed_predict, students_split, timed)

ORIGINAL = {"teacher": "81%", "student 1": "74.19%", "student 2": "73.21%", "routed": "79.67%"}


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("--name", default="",
                        help="experiment name: read checkpoints/NAME/, write results/NAME/ (default: checkpoints/, "
                             "results/)")
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (default: checkpoints/[NAME/]teacher.pt)")
    parser.add_argument("--students", nargs="+", default=None,
                        help="student checkpoints, in the order the selector was trained for (default: "
                             "checkpoints/[NAME/]student_densenet121.pt and student_googlenet.pt)")
    parser.add_argument("--selector", default=None, help="selector checkpoint (default: checkpoints/[NAME/]selector.pt)")
    parser.add_argument("--out", default=None, help="folder for results.md, results.json and the plots "
                                                    "(default: results/[NAME/])")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=1024, help="images per forward pass")
    parser.add_argument("--images", nargs="+", metavar="PATH",
                        help="classify these image files (any size; resized to 32x32) instead of the test set")
    add_data_args(parser, split=False)
    add_device_args(parser, compile=False, seed=False)
    return parser


def parse_args(argv=None):
    args = parse(build_parser(), argv)
    args.teacher = args.teacher or default_checkpoint(args.name, "teacher")
    args.students = args.students or default_students(args.name)
    args.selector = args.selector or default_checkpoint(args.name, "selector")
    args.out = args.out or str(RESULTS_ROOT / args.name)
    return args


def load_selector(args, runtime):
    hint = "python trainSelector.py"
    loaded = load_students(args.students, runtime)
    checkpoint = load_checkpoint(args.selector, hint=hint, kind="selector")
    check_selector_students(checkpoint, args.selector, args.students, [c for _, c in loaded])
    selector = prepare_model(model_from_checkpoint(checkpoint, args.selector, hint).eval(), runtime)
    return selector, loaded


def classify_images(paths, selector, students, student_names, runtime):
    for path in paths:
        try:
            image = Image.open(path).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read image {path} ({type(e).__name__})") from None
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].to(runtime.device)
        with runtime.autocast:
            logits, choice = routed_predict(selector, students, normalize(x, runtime.device.type == "cuda"))
        confidence, label = logits.float().softmax(1).max(1)
        print(f"{path}: {CLASSES[label.item()]}  (student {choice.item() + 1}, {student_names[choice.item()]}; "
              f"confidence {confidence.item():.3f})")


def per_class(correct, labels):
    return [correct[labels == c].float().mean().item() for c in range(len(CLASSES))]


def nokd_twin(path):
    twin = Path(path).with_name(Path(path).stem + "_nokd.pt")
    return twin if twin.exists() else None


def evaluate_all(args, runtime, teacher, students, selector, images, labels):
    """Accuracies, per-class accuracies, routing shares, costs and throughput of every system."""
    bs = args.batch_size
    systems, seconds, stats = {}, {}, {}

    warm_up = runtime.device.type == "cuda"  # cuDNN picks its kernels on the first batch

    def run_model(name, model):
        if warm_up:
            batched_logits(model, images[:bs], runtime, bs)
        logits, seconds[name] = timed(lambda: batched_logits(model, images, runtime, bs), runtime)
        stats[name] = model_stats(model)
        return logits.cpu()

    teacher_model, teacher_ckpt = teacher
    systems[f"Teacher {teacher_ckpt['arch']}"] = run_model("teacher", teacher_model).argmax(1)
    student_logits = []
    for k, (model, ckpt) in enumerate(students, 1):
        student_logits.append(run_model(f"student {k}", model))
        systems[f"Student {k} {ckpt['arch']} ({'KD' if ckpt.get('kd') else 'no KD'})"] = student_logits[-1].argmax(1)
    if warm_up:
        batched_routed(selector, [m for m, _ in students], images[:bs], runtime, bs)
    (routed_logits, choice), seconds["routed"] = timed(
        lambda: batched_routed(selector, [m for m, _ in students], images, runtime, bs), runtime)
    choice = choice.cpu()
    systems["Model selector with students (routed)"] = routed_logits.cpu().argmax(1)
    stacked = torch.stack(student_logits)
    systems["Ensemble (mean of student logits)"] = stacked.mean(0).argmax(1)
    confident = stacked.softmax(2).amax(2).argmax(0)
    systems["Confidence routing"] = stacked.argmax(2).gather(0, confident[None]).squeeze(0)
    for k, (path, (_, ckpt)) in enumerate(zip(args.students, students), 1):
        twin = nokd_twin(path)
        if twin:
            model, _ = load_classifier(twin, "student", f"python StudentTrain.py --model {ckpt['arch']} --no-kd",
                                       runtime)
            logits = batched_logits(model, images, runtime, bs).cpu()
            systems[f"Student {k} {ckpt['arch']} without KD"] = logits.argmax(1)

    correct = {name: preds == labels for name, preds in systems.items()}
    correct["Oracle (any student right)"] = (stacked.argmax(2) == labels).any(0)
    stats["selector"] = model_stats(selector)
    share = torch.bincount(choice, minlength=len(students)).double().div(len(choice))
    names = [f"student {k}" for k in range(1, len(students) + 1)]
    costs = {
        "teacher": stats["teacher"],
        **{name: stats[name] for name in names},
        "all students": {"params": sum(stats[n]["params"] for n in names),
                         "flops": sum(stats[n]["flops"] for n in names)},
        "routed": {"params": stats["selector"]["params"] + sum(stats[n]["params"] for n in names),
                   "flops": stats["selector"]["flops"]
                   + sum(fraction * stats[n]["flops"] for fraction, n in zip(share.tolist(), names))},
    }
    seconds["all students"] = sum(seconds[n] for n in names)
    for name, cost in costs.items():
        cost["images_per_s"] = len(labels) / seconds[name]
    return {
        "accuracy": {name: c.float().mean().item() for name, c in correct.items()},
        "per_class": {name: per_class(c, labels) for name, c in correct.items()},
        "routing_share": share.tolist(),
        "routing_share_per_class": [torch.bincount(choice[labels == c], minlength=len(students)).double()
                                    .div(max(1, int((labels == c).sum()))).tolist() for c in range(len(CLASSES))],
        "confusion_routed": torch.bincount(labels * len(CLASSES) + systems["Model selector with students (routed)"],
                                           minlength=len(CLASSES) ** 2).view(len(CLASSES), -1).tolist(),
        "costs": costs,
    }


def original_of(name):
    for key, role in (("Teacher", "teacher"), ("Student 1", "student 1"), ("Student 2", "student 2"),
                      ("Model selector", "routed")):
        if name.startswith(key) and "without KD" not in name:
            return ORIGINAL[role]
    return "—"


def write_markdown(results, path):
    r = results
    lines = [
        "# Results",
        "",
        f"CIFAR-10 test set, {r['test_images']} images ({r['data']}). Device: {r['device']}; "
        f"torch {r['torch']}. Written by `python inference.py`.",
        "",
        "| Model | Original (reported by the original repository) | Ours (measured) |",
        "|---|---|---|",
        *[f"| {name} | {original_of(name)} | {100 * acc:.2f}% |" for name, acc in r["accuracy"].items()],
        "",
        "## Cost per image",
        "",
        "FLOPs counted by `torch.utils.flop_counter` (a multiply-add is 2 FLOPs); the routed system's FLOPs "
        "are the selector's plus each student's weighted by its routing share. All students' images/s comes "
        "from the sum of their timed passes.",
        "",
        "| System | Parameters | GFLOPs / image | Images/s |",
        "|---|---|---|---|",
        *[f"| {name} | {c['params'] / 1e6:.2f} M | {c['flops'] / 1e9:.3f} | {c['images_per_s']:.0f} |"
          for name, c in r["costs"].items()],
        "",
        "## Routing share",
        "",
        "| Class | " + " | ".join(r["students"]) + " |",
        "|---|" + "---|" * len(r["students"]),
        "| **all** | " + " | ".join(f"{100 * s:.1f}%" for s in r["routing_share"]) + " |",
        *[f"| {c} | " + " | ".join(f"{100 * s:.1f}%" for s in shares) + " |"
          for c, shares in zip(CLASSES, r["routing_share_per_class"])],
        "",
        "## Per-class accuracy",
        "",
        "| System | " + " | ".join(CLASSES) + " |",
        "|---|" + "---|" * len(CLASSES),
        *[f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in accs) + " |" for name, accs in r["per_class"].items()],
        "",
        "Plots: `per_class_accuracy.png`, `routed_confusion.png`, `routing_share.png`.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    runtime = setup_runtime(args)
    selector, students = load_selector(args, runtime)
    student_names = [c["arch"] for _, c in students]
    if args.images:
        classify_images(args.images, selector, [m for m, _ in students], student_names, runtime)
        return
    print_config(args, "inference.py")
    teacher = load_classifier(args.teacher, "teacher", "python teacherTrain.py", runtime)
    split = students_split(args.students)
    data = load_cifar10(args.data_dir, args.download, allow_partial=args.partial_data)
    images, labels = make_splits(data, split["holdout"], split["split_seed"], split["limit"])["test"]
    results = evaluate_all(args, runtime, teacher, students, selector, images, labels)
    device = device_name(runtime.device)
    results.update(test_images=len(labels), device=device, torch=str(torch.__version__),
                   data=f"data fingerprint {data.fingerprint}" + (f", stratified --limit {split['limit']}"
                                                                  if split["limit"] else ""),
                   students=[f"student {k} ({n})" for k, n in enumerate(student_names, 1)],
                   checkpoints={"teacher": args.teacher, "students": args.students, "selector": args.selector})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "results.md")
    plot_grouped_bars(results["per_class"], CLASSES, out / "per_class_accuracy.png", "Per-class test accuracy",
                      "accuracy")
    plot_confusion(results["confusion_routed"], CLASSES, out / "routed_confusion.png",
                   "Routed system: confusion matrix (test set)")
    plot_grouped_bars({name: [s[k] for s in results["routing_share_per_class"]]
                       for k, name in enumerate(results["students"])},
                      CLASSES, out / "routing_share.png", "Share of each class routed to each student", "share")
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and three plots in {out}/")


if __name__ == "__main__":
    run(main)
