"""Evaluate the teacher, the students and the routed systems on the CIFAR-10 test set.

Every network's logits on the hold-out and test splits are computed once per checkpoint
(``<stem>.logits.pt``). The routing policies of utils/routers.py are fitted on the hold-out
split only — the cascade and learned deferral on all of it, the selector on its validation
images, which it never trained on — and then applied to the test split:
  cascade   run the cheaper student; where its (temperature-scaled) confidence is low, also
            run the other and average both
  deferral  the same, with a learned decision (logistic regression on the first student's
            probabilities)
  selector  the selector CNN looks at the image and sends it to one student, by predicted gain
--router and --budget (a multiple of the cheaper student's GFLOPs) choose the routed system of
the headline row and of --images. For comparison: each student, the no-KD twins where
StudentTrain.py --no-kd wrote them, the ensemble, random routing at the selector's shares, the
selector trained on shuffled labels (selector_shuffled.pt, if present) and the oracle, with paired
bootstrap intervals and McNemar tests. Writes results/[NAME/]results.md, results.json and plots.
With --images, classifies your own image files with the routed system instead.
"""

import functools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from utils.cli import (
    POSITIVE,
    POSITIVE_INT,
    UserError,
    add_data_args,
    add_device_args,
    make_parser,
    parse,
    print_config,
    run,
)
from utils.data import CLASSES, load_cifar10, make_splits, normalize
from utils.engine import setup_runtime
from utils.logits import Network
from utils.plots import plot_accuracy_vs_flops, plot_confusion, plot_grouped_bars
from utils.routers import ROUTERS, EnsembleRouter, RandomRouter, Routing, StudentOutputs, build_router, oracle_routing
from utils.routing import (
    batched_logits,
    batched_routed,
    check_selector_students,
    default_students,
    run_routed,
    students_split,
    timed,
    validation_mask,
)
from utils.runs import RESULTS_ROOT, default_checkpoint, device_name
from utils.stats import expected_calibration_error, mcnemar, paired_bootstrap

ORIGINAL = {"teacher": "81%", "student 1": "74.19%", "student 2": "73.21%", "routed": "79.67%"}
BUDGETS = (1.0, 1.25, 1.5)


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("--name", default="",
                        help="experiment name: read checkpoints/NAME/, write results/NAME/ (default: checkpoints/, "
                             "results/)")
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (default: checkpoints/[NAME/]teacher.pt)")
    parser.add_argument("--students", nargs="+", default=None,
                        help="student checkpoints, in the order the selector was trained for (default: "
                             "checkpoints/[NAME/]student_densenet121.pt and student_googlenet.pt)")
    parser.add_argument("--selector", default=None,
                        help="selector checkpoint (default: checkpoints/[NAME/]selector.pt)")
    parser.add_argument("--router", default="cascade", choices=list(ROUTERS),
                        help="the routing policy of the headline 'routed' row and of --images")
    parser.add_argument("--budget", type=POSITIVE, default=1.25,
                        help="compute budget of the routed system: at most this many times the cheaper student's "
                             "GFLOPs per image on the hold-out split")
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


# ----------------------------------------------------------------------------- networks

def nokd_twin(path):
    twin = Path(path).with_name(Path(path).stem + "_nokd.pt")
    return twin if twin.exists() else None


def load_networks(args, runtime, data, with_teacher=True):
    """The teacher, the students, their no-KD twins, the selector and its shuffled-label control."""
    student_hint = "python StudentTrain.py" + (f" --name {args.name}" if args.name else "")
    students = [Network(f"Student {k}", path, "student", student_hint, runtime, data)
                for k, path in enumerate(args.students, 1)]
    teacher = Network("Teacher", args.teacher, "teacher", "python teacherTrain.py", runtime, data) \
        if with_teacher else None
    twins = [Network(f"Student {k}", twin, "student", student_hint + " --no-kd", runtime, data)
             for k, twin in enumerate(map(nokd_twin, args.students), 1) if twin and with_teacher]
    selector = load_selector(args.selector, students, runtime, data)
    control_path = Path(args.selector).with_name(Path(args.selector).stem + "_shuffled.pt")
    control = load_selector(control_path, students, runtime, data) if control_path.exists() else None
    return teacher, students, twins, selector, control


def load_selector(path, students, runtime, data):
    selector = Network("Selector", path, "selector", "python trainSelector.py", runtime, data)
    check_selector_students(selector.checkpoint, path, [s.path for s in students], [s.checkpoint for s in students])
    return selector


# ----------------------------------------------------------------------------- routing

def outputs_of(students, selector, split, mask=None):
    logits = torch.stack([s.logits[split][0] for s in students], 1)
    scores = selector.logits[split][0] if selector else None
    labels = students[0].logits[split][1]
    if mask is not None:
        logits, labels, scores = logits[mask], labels[mask], None if scores is None else scores[mask]
    return StudentOutputs(logits, scores), labels


def fit_router(name, budget, students, selector, val_fraction):
    """A router fitted on the hold-out split; the selector's routing on its validation images only."""
    flops = [s.gflops for s in students]
    cheap = min(range(len(students)), key=lambda k: flops[k])
    order = (cheap, min((k for k in range(len(students)) if k != cheap), key=lambda k: flops[k]))
    router = build_router(name, flops=flops, router_flops=selector.gflops if selector else 0.0, order=order)
    holdout, labels = outputs_of(students, selector if router.uses_selector else None, "holdout")
    if len(labels) == 0:
        raise UserError("the students were trained with --holdout 0: there is no hold-out split to fit routing on")
    if router.uses_selector:
        mask = validation_mask(labels, val_fraction, selector.checkpoint["split"]["split_seed"])
        holdout, labels = outputs_of(students, selector, "holdout", mask)
    return router.fit(holdout, labels, budget)


def try_fit(name, budget, students, selector, val_fraction):
    try:
        return fit_router(name, budget, students, selector, val_fraction)
    except ValueError:  # no threshold fits this budget
        return None


# ----------------------------------------------------------------------------- evaluation

def single(net, split="test"):
    """One network on every image, as a ``Routing``."""
    logits = net.logits[split][0]
    return Routing(torch.ones(len(logits), 1, dtype=torch.bool), logits.softmax(1), (net.gflops,))


def compare(correct_a, correct_b):
    """``a - b`` in accuracy, its 95% paired bootstrap interval and McNemar's p-value."""
    interval, test = paired_bootstrap(correct_a, correct_b), mcnemar(correct_a, correct_b)
    return {"difference": interval.estimate, "low": interval.low, "high": interval.high,
            "p_value": test.p_value, "only_a_right": test.b, "only_b_right": test.c}


def calibration(net, labels):
    logits = net.logits["test"][0]
    return {"accuracy": (logits.argmax(1) == labels).double().mean().item(),
            "nll": F.cross_entropy(logits, labels).item(),
            "ece": expected_calibration_error(logits.softmax(1), labels)}


def evaluate_all(args, networks):
    """Every system's test-split outcome, the budget table, the curves and the comparisons."""
    teacher, students, twins, selector, control = networks
    test, labels = outputs_of(students, selector, "test")
    fit = functools.partial(try_fit, students=students, val_fraction=selector.checkpoint["config"]["val_fraction"])
    flops = [s.gflops for s in students]

    systems = {net.label: single(net) for net in [teacher, *students]}
    headline = fit(args.router, args.budget, selector=selector)
    if headline is None:
        raise UserError(f"no {args.router} routing fits --budget {args.budget:g} on the hold-out split; raise it")
    routed = f"Routed: {args.router}, at most {args.budget:g}x student {headline.order[0] + 1}'s GFLOPs"
    systems[routed] = headline.route(test)
    systems.update({net.label: single(net) for net in twins})
    systems["Ensemble (both students, probabilities averaged)"] = \
        EnsembleRouter(flops).fit(*outputs_of(students, None, "holdout")).route(test)
    selector_routing = fit("selector", None, selector=selector).route(test)
    systems["Selector routing (threshold with the best hold-out accuracy)"] = selector_routing
    systems["Random routing at the selector's shares"] = RandomRouter(flops, selector_routing.share.tolist()) \
        .fit(*outputs_of(students, None, "holdout")).route(test)
    if control:
        control_test, _ = outputs_of(students, control, "test")
        systems["Selector trained on shuffled labels (control)"] = \
            fit("selector", None, selector=control).route(control_test)
    systems["Oracle (any student right)"] = oracle_routing(test, labels, flops)
    correct = {name: routing.correct(labels) for name, routing in systems.items()}

    budgets, curves = {}, {}
    for name in ROUTERS:
        for budget in BUDGETS:
            router = fit(name, budget, selector=selector)
            if router:
                routing = router.route(test)
                budgets.setdefault(name, {})[f"{budget:g}"] = {"accuracy": routing.accuracy(labels),
                                                               "gflops": routing.gflops}
        curve = fit(name, None, selector=selector).curve(test, labels)
        curves[name] = (curve.gflops.tolist(), curve.accuracy.tolist())

    comparisons = {f"{routed} vs {s.label}": compare(correct[routed], correct[s.label]) for s in students}
    comparisons["Selector routing vs random routing at its shares"] = compare(
        correct["Selector routing (threshold with the best hold-out accuracy)"],
        correct["Random routing at the selector's shares"])
    kd_gain = {}
    for twin in twins:
        kd = next((s for s in students if s.checkpoint["arch"] == twin.checkpoint["arch"]), None)
        if kd:
            kd_gain[kd.checkpoint["arch"]] = comparisons[f"{kd.label} vs {twin.label}"] = \
                compare(correct[kd.label], correct[twin.label])

    ran = systems[routed].ran
    return {
        "accuracy": {name: c.double().mean().item() for name, c in correct.items()},
        "gflops": {name: routing.gflops for name, routing in systems.items()},
        "routed": {"name": routed, "router": args.router, "budget": args.budget, "order": list(headline.order),
                   "budget_gflops": args.budget * min(flops), "share": ran.double().mean(0).tolist(),
                   "threshold": headline.threshold_},
        "budgets": budgets, "curves": curves, "comparisons": comparisons, "kd_gain": kd_gain,
        "calibration": {net.label: calibration(net, labels) for net in [teacher, *students, *twins]},
        "per_class": {name: per_class(c, labels) for name, c in correct.items()},
        "routing_share_per_class": [ran[labels == c].double().mean(0).tolist() for c in range(len(CLASSES))],
        "confusion_routed": torch.bincount(labels * len(CLASSES) + systems[routed].prediction,
                                           minlength=len(CLASSES) ** 2).view(len(CLASSES), -1).tolist(),
    }, headline


def per_class(correct, labels):
    return [correct[labels == c].double().mean().item() for c in range(len(CLASSES))]


def measure_speed(args, runtime, networks, headline, images):
    """Parameters, GFLOPs and images/s of each network and of the routed system, timed alike on every device."""
    teacher, students, _, selector, _ = networks
    bs = args.batch_size

    def speed(fn):
        return len(images) / timed(fn, runtime)[1]

    costs = {net.role.lower(): {"params": net.stats["params"], "gflops": net.gflops,
                                "images_per_s": speed(lambda net=net: batched_logits(net, images, runtime, bs))}
             for net in [teacher, *students]}
    costs["both students"] = {"params": sum(s.stats["params"] for s in students),
                              "gflops": sum(s.gflops for s in students),
                              "images_per_s": speed(lambda: [batched_logits(s, images, runtime, bs) for s in students])}
    routed_params = sum(s.stats["params"] for s in students) + (selector.stats["params"] if headline.uses_selector
                                                                  else 0)
    costs[f"routed ({headline.name})"] = {
        "params": routed_params, "gflops": None,
        "images_per_s": speed(lambda: batched_routed(headline, students, selector, images, runtime, bs))}
    return costs


# ----------------------------------------------------------------------------- report

def original_of(name):
    for key, role in (("Teacher", "teacher"), ("Student 1", "student 1"), ("Student 2", "student 2"),
                      ("Routed", "routed")):
        if name.startswith(key) and "without KD" not in name:
            return ORIGINAL[role]
    return "—"


def _pct(x):
    return f"{100 * x:.2f}%"


def _gflops(value):
    return "as in its row above" if value is None else f"{value:.3f}"


def _points(c):
    return f"{100 * c['difference']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]"


def provenance_rows(networks):
    teacher, students, twins, selector, control = networks
    rows = []
    for net in [teacher, *students, *twins, selector, *([control] if control else [])]:
        c = net.checkpoint
        config, prov = c.get("config", {}), c.get("provenance", {})
        kd = "—" if c["kind"] != "student" else ("no" if not c.get("kd") else
                                                  f"{config.get('kd_loss')} T={config.get('temperature')} "
                                                  f"alpha={config.get('alpha')}")
        complete = "yes" if c.get("complete") else "**no**"
        rows.append(f"| {net.role} | `{net.path}` | {c['epoch']}/{c['epochs']} | {complete} "
                    f"| {config.get('seed', '—')} | {kd} | {prov.get('device', '—')} | {prov.get('git_commit', '—')} |")
    return rows


def write_markdown(results, path):
    r = results
    routed = r["routed"]
    notes = []
    if r["split"]["limit"]:
        notes.append(f"**A quick run on a subset** (`--limit {r['split']['limit']}` images per split, such as "
                     "`reproduce.py --preset smoke`): these numbers only show that every stage runs.")
    notes.append("Not comparable with the original's numbers: it fine-tuned ImageNet-pretrained backbones on "
                 "images upsampled to 224x224 (and had the flaws listed in the README); here every network is "
                 "trained from scratch on 32x32 CIFAR-10 unless its checkpoint says otherwise.")
    if r["unfinished"]:
        notes.append("**Unfinished checkpoints** (marked in the rows): " + ", ".join(f"`{p}`" for p in r["unfinished"]))
    lines = [
        "# Results", "",
        f"CIFAR-10 test set, {r['test_images']} images ({r['data']}). Device: {r['device']}; torch {r['torch']}. "
        f"Written by `{r['command']}`.", "",
        *[f"- {n}" for n in notes], "",
        "| Model | Original (reported by the original repository) | Ours (measured) | GFLOPs / image |",
        "|---|---|---|---|",
        *[f"| {name} | {original_of(name)} | {_pct(acc)} | {r['gflops'][name]:.3f} |"
          for name, acc in r["accuracy"].items()], "",
        f"The routed row is the `{routed['router']}` policy with its threshold fitted on the hold-out split for at "
        f"most {routed['budget_gflops']:.3f} GFLOPs per image; it ran the students on "
        + ", ".join(f"{100 * s:.1f}%" for s in routed["share"]) + " of the test images.", "",
        "## Routing policies at fixed compute budgets", "",
        "Test accuracy (GFLOPs per image) of each policy with its threshold fitted on the hold-out split for a "
        "budget of k times the cheaper student's GFLOPs; — where no threshold fits.", "",
        "| Policy | " + " | ".join(f"{b:g}x" for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS),
        *[f"| {name} | " + " | ".join(f"{_pct(cells[f'{b:g}']['accuracy'])} ({cells[f'{b:g}']['gflops']:.3f})"
                                      if f"{b:g}" in cells else "—" for b in BUDGETS) + " |"
          for name, cells in r["budgets"].items()], "",
        "Curves over every threshold: `accuracy_vs_gflops.png`.", "",
        "## Comparisons on the same test images", "",
        "Difference in accuracy (points), its 95% paired bootstrap interval, and McNemar's test (p-value; images "
        "only the first / only the second gets right).", "",
        "| Comparison | Difference [95% interval] | McNemar p | Only first right | Only second right |",
        "|---|---|---|---|---|",
        *[f"| {name} | {_points(c)} | {c['p_value']:.3g} | {c['only_a_right']} | {c['only_b_right']} |"
          for name, c in r["comparisons"].items()], "",
        "## Calibration", "",
        "| Network | Accuracy | NLL | ECE (15 bins) |", "|---|---|---|---|",
        *[f"| {name} | {_pct(c['accuracy'])} | {c['nll']:.3f} | {c['ece']:.4f} |"
          for name, c in r["calibration"].items()],
        "",
        "## Cost and speed", "",
        f"Images/s: the second of two passes over the test set (the first, untimed, sees every batch shape), batch "
        f"{r['batch_size']}, on {r['device']}. GFLOPs counted by `torch.utils.flop_counter` (a multiply-add is 2).", "",
        "| System | Parameters | GFLOPs / image | Images/s |", "|---|---|---|---|",
        *[f"| {name} | {c['params'] / 1e6:.2f} M | {_gflops(c['gflops'])} | {c['images_per_s']:.0f} |"
          for name, c in r["costs"].items()], "",
        "## Routed system: share of each class's images each student ran on", "",
        "| Class | " + " | ".join(r["students"]) + " |", "|---|" + "---|" * len(r["students"]),
        *[f"| {c} | " + " | ".join(f"{100 * s:.1f}%" for s in shares) + " |"
          for c, shares in zip(CLASSES, r["routing_share_per_class"])], "",
        "## Per-class accuracy (%)", "",
        "| System | " + " | ".join(CLASSES) + " |", "|---|" + "---|" * len(CLASSES),
        *[f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in accs) + " |" for name, accs in r["per_class"].items()],
        "",
        "## Where these numbers come from", "",
        "| Network | Checkpoint | Epochs | Complete | Seed | KD | Trained on | Git commit |",
        "|---|---|---|---|---|---|---|---|",
        *r["provenance"], "",
        "Plots: `accuracy_vs_gflops.png`, `per_class_gain.png`, `routed_confusion.png`, `routing_share.png`.", "",
    ]
    path.write_text("\n".join(lines))


def write_plots(results, out):
    curves = {name: tuple(curve) for name, curve in results["curves"].items()}
    points = {name: (results["gflops"][name], acc) for name, acc in results["accuracy"].items()
              if not name.startswith("Teacher")}
    plot_accuracy_vs_flops(curves, points, out / "accuracy_vs_gflops.png",
                           "Test accuracy against compute (thresholds fitted on hold-out; curves: every threshold)")
    students = [name for name in results["accuracy"] if name.startswith("Student") and "without KD" not in name]
    best = max(students, key=lambda name: results["accuracy"][name])
    gains = {name: [100 * (a - b) for a, b in zip(accs, results["per_class"][best])]
             for name, accs in results["per_class"].items() if name != best and not name.startswith("Oracle")}
    plot_grouped_bars(gains, CLASSES, out / "per_class_gain.png",
                      f"Per-class test accuracy against the best single student ({best})",
                      "accuracy minus the best student's (points)")
    plot_confusion(results["confusion_routed"], CLASSES, out / "routed_confusion.png",
                   f"{results['routed']['name']}: confusion matrix (test set)")
    plot_grouped_bars({name: [s[k] for s in results["routing_share_per_class"]]
                       for k, name in enumerate(results["students"])},
                      CLASSES, out / "routing_share.png", "Share of each class's images each student ran on", "share")


# ----------------------------------------------------------------------------- main

def classify_images(paths, router, students, selector, runtime):
    for path in paths:
        try:
            image = Image.open(path).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read image {path} ({type(e).__name__})") from None
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].to(runtime.device)
        with runtime.autocast:
            routing = run_routed(router, students, selector,
                                 normalize(x, runtime.device.type == "cuda"), len(CLASSES))
        confidence, label = routing.probs.float().max(1)
        ran = ", ".join(f"student {k + 1} ({students[k].checkpoint['arch']})"
                        for k in routing.ran[0].nonzero().flatten().tolist())
        print(f"{path}: {CLASSES[label.item()]}  (ran {ran}; confidence {confidence.item():.3f})")


def main(argv=None):
    args = parse_args(argv)
    runtime = setup_runtime(args)
    if not args.images:
        print_config(args, "inference.py")
    split = students_split(args.students)

    @functools.cache
    def load_data():
        return load_cifar10(args.data_dir, args.download, verbose=not args.images, allow_partial=args.partial_data)

    networks = load_networks(args, runtime, load_data if args.images else load_data(), with_teacher=not args.images)
    teacher, students, twins, selector, control = networks
    if args.images:
        val_fraction = selector.checkpoint["config"]["val_fraction"]
        router = try_fit(args.router, args.budget, students, selector, val_fraction)
        if router is None:
            raise UserError(f"no {args.router} routing fits --budget {args.budget:g} on the hold-out split; raise it")
        classify_images(args.images, router, students, selector, runtime)
        return
    data = load_data()
    results, headline = evaluate_all(args, networks)
    images, labels = make_splits(data, split["holdout"], split["split_seed"], split["limit"])["test"]
    results["costs"] = measure_speed(args, runtime, networks, headline, images)
    all_networks = [teacher, *students, *twins, selector, *([control] if control else [])]
    results.update(
        test_images=len(labels), device=device_name(runtime.device), torch=str(torch.__version__),
        batch_size=args.batch_size, command=args.command, split=split,
        data=f"data fingerprint {data.fingerprint}" + (f", stratified --limit {split['limit']}" if split["limit"]
                                                       else ""),
        students=[f"student {k} ({s.checkpoint['arch']})" for k, s in enumerate(students, 1)],
        unfinished=[net.path for net in all_networks if not net.checkpoint.get("complete")],
        provenance=provenance_rows(networks),
        checkpoints={net.role: net.path for net in all_networks})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, out / "results.md")
    write_plots(results, out)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and four plots in {out}/")


if __name__ == "__main__":
    run(main)
