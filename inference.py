"""Evaluate the teacher, the students and the routed systems on the CIFAR-10 test set.

Every network's logits on the hold-out and test splits are computed once per checkpoint
(``<stem>.logits.pt``). The routing policies of utils/routers.py are fitted on the hold-out
split only — the cascade and learned deferral on all of it, the selector on its validation
images, which it never trained on — and then applied to the test split:
  cascade   run the cheapest student; where its (temperature-scaled) confidence is low, also
            run the next and average both
  deferral  the same, with a learned decision (logistic regression on the first student's
            probabilities)
  selector  the selector CNN looks at the image and sends it to one student, by predicted gain
--router and --budget (a multiple of the cheapest student's GFLOPs) choose the routed system of
the headline row. For comparison: each student, the no-KD twins where StudentTrain.py --no-kd
wrote them, the ensemble, random routing at the selector's shares, the selector trained on
shuffled labels (selector_shuffled.pt, if present) and the oracle, with paired bootstrap
intervals and McNemar tests. Writes, in results/[NAME/], a results bundle (utils/bundle.py):
results.md, results.json, the plots and logits.npz.

--bundle DIR does all of it again from a bundle alone (no checkpoints, no data, no GPU): the
same tables and plots, the measured costs copied from the bundle.
"""

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.bundle import LOGITS, read_bundle, write_logits
from utils.cli import (
    POSITIVE_INT,
    UserError,
    add_data_args,
    add_device_args,
    make_parser,
    parse,
    print_config,
    run,
)
from utils.data import CLASSES, load_cifar10, make_splits
from utils.networks import Network, Trained
from utils.report import write_report
from utils.routers import ROUTERS, EnsembleRouter, RandomRouter, Routing, oracle_routing
from utils.routing import (
    add_routing_args,
    batched_routed,
    check_selector_students,
    load_selector,
    load_students,
    outputs_of,
    students_split,
    timed,
    try_fit,
)
from utils.runs import RESULTS_ROOT, check_output_folder, continue_command, default_checkpoint, default_students
from utils.runtime import batched_logits, device_name, setup_runtime, stoppable
from utils.stats import expected_calibration_error, mcnemar, paired_bootstrap

BUDGETS = (1.0, 1.25, 1.5)  # the budget table's columns: multiples of the cheapest student's GFLOPs per image
TIMED_PASSES = 3  # over the test split, for each system's images/s


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    add_routing_args(parser)
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (default: checkpoints/[NAME/]teacher.pt)")
    parser.add_argument("--bundle", default=None, metavar="DIR",
                        help="analyse a results bundle (a folder with results.json and logits.npz) instead of "
                             "checkpoints: no data, no network is run; the costs are the bundle's")
    parser.add_argument("--out", default=None, help="folder for results.md, results.json, the plots and "
                                                    "logits.npz (default: results/[NAME/], or with --bundle "
                                                    "results/<the bundle folder's name>)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=1024, help="images per forward pass")
    add_data_args(parser)
    add_device_args(parser, compile=False, seed=False)
    return parser


def parse_args(argv=None):
    args = parse(build_parser(), argv)
    args.teacher = args.teacher or default_checkpoint(args.name, "teacher")
    args.students = args.students or default_students(args.name)
    args.selector = args.selector or default_checkpoint(args.name, "selector")
    args.out = args.out or str(RESULTS_ROOT / (Path(args.bundle).resolve().name if args.bundle else args.name))
    return args


# ----------------------------------------------------------------------------- networks

@dataclass
class Networks:
    teacher: Trained
    students: list
    twins: list  # the students' no-KD twins that exist
    selector: Trained
    control: Trained | None  # the selector trained on shuffled labels, if it exists

    def __iter__(self):
        return iter([self.teacher, *self.students, *self.twins, self.selector, *([self.control] if self.control
                                                                                 else [])])

    def layout(self):
        """Where each role sits in ``list(self)``: how a bundle remembers them."""
        s, t = len(self.students), len(self.twins)
        return {"teacher": 0, "students": list(range(1, 1 + s)), "twins": list(range(1 + s, 1 + s + t)),
                "selector": 1 + s + t, "control": 2 + s + t if self.control else None}

    @classmethod
    def from_layout(cls, networks, layout):
        return cls(networks[layout["teacher"]], [networks[k] for k in layout["students"]],
                   [networks[k] for k in layout["twins"]], networks[layout["selector"]],
                   None if layout["control"] is None else networks[layout["control"]])


def nokd_twin(path):
    twin = Path(path).with_name(Path(path).stem + "_nokd.pt")
    return twin if twin.exists() else None


def load_networks(args, runtime, data):
    """Every network of the experiment, with its logits on the hold-out and test splits."""
    students = load_students(args.students, runtime, args.name)
    teacher = Network(args.teacher, "teacher", "python teacherTrain.py" + (f" --name {args.name}" if args.name
                                                                            else ""), runtime, role="Teacher")
    student_hint = "python StudentTrain.py --no-kd" + (f" --name {args.name}" if args.name else "")
    twins = [Network(twin, "student", student_hint, runtime, role=f"Student {k}")
             for k, twin in enumerate(map(nokd_twin, args.students), 1) if twin]
    selector = load_selector(args.selector, students, runtime)
    control_path = Path(args.selector).with_name(Path(args.selector).stem + "_shuffled.pt")
    control = load_selector(control_path, students, runtime, role="Selector on shuffled labels") \
        if control_path.exists() else None
    networks = Networks(teacher, students, twins, selector, control)
    for net in networks:
        net.load_logits(data)
    return networks


def networks_of_bundle(folder):
    """``(results, Networks)`` of a bundle: each network's record and logits, no weights."""
    results, networks = read_bundle(folder)
    networks = Networks.from_layout(networks, results["layout"])
    check_selector_students(networks.selector.checkpoint, networks.selector.path, networks.students)
    return results, networks


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
    teacher, students, twins, selector, control = networks.teacher, networks.students, networks.twins, \
        networks.selector, networks.control
    test, labels = outputs_of(students, selector, "test")
    fit = functools.partial(try_fit, students=students)
    flops = [s.gflops for s in students]

    systems = {net.label: single(net) for net in [teacher, *students]}
    headline = fit(args.router, args.budget, selector=selector)
    if headline is None:
        raise UserError(f"no {args.router} routing fits --budget {args.budget:g} on the hold-out split; raise it")
    cheapest = students[headline.order[0]]
    routed = f"Routed: {args.router}, at most {args.budget:g}x the cheapest student's GFLOPs ({cheapest.arch})"
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

    comparisons = {f"{routed} vs {s.label}": compare(correct[routed], correct[s.label]) for s in [*students, teacher]}
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
        "teacher": teacher.label,
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


def measure_speed(args, runtime, networks, headline, routed_gflops, images):
    """Parameters, GFLOPs and images/s of each network and of the routed system, timed alike on every device:
    the median and the range of ``TIMED_PASSES`` passes over the test split, after an untimed one."""
    teacher, students, selector = networks.teacher, networks.students, networks.selector
    bs = args.batch_size

    def cost(params, gflops, fn):
        speeds = sorted(len(images) / seconds for seconds in timed(fn, runtime, TIMED_PASSES)[1])
        return {"params": params, "gflops": gflops, "images_per_s": speeds[len(speeds) // 2],
                "images_per_s_range": [speeds[0], speeds[-1]]}

    costs = {net.role.lower(): cost(net.stats["params"], net.gflops,
                                    lambda net=net: batched_logits(net, images, runtime, bs))
             for net in [teacher, *students]}
    costs["both students"] = cost(sum(s.stats["params"] for s in students), sum(s.gflops for s in students),
                                  lambda: [batched_logits(s, images, runtime, bs) for s in students])
    routed_params = sum(s.stats["params"] for s in students) + (selector.stats["params"] if headline.uses_selector
                                                                  else 0)
    costs[f"routed ({headline.name})"] = cost(routed_params, routed_gflops,
                                              lambda: batched_routed(headline, students, selector, images, runtime, bs))
    return costs


# ----------------------------------------------------------------------------- main

def provenance(networks):
    """Where every number comes from: each network's checkpoint, epochs, completeness, seed, KD, device, commit."""
    rows = []
    for net in networks:
        c = net.checkpoint
        config, prov = c.get("config", {}), c.get("provenance", {})
        kd = "—" if c["kind"] != "student" else ("no" if not c.get("kd") else
                                                  f"{config.get('kd_loss')} T={config.get('temperature')} "
                                                  f"alpha={config.get('alpha')}")
        rows.append({"role": net.role, "path": net.path, "epochs": net.progress, "best_epoch": c["epoch"],
                     "complete": bool(c.get("complete")), "seed": config.get("seed", "—"), "kd": kd,
                     "device": prov.get("device", "—"), "git_commit": prov.get("git_commit", "—")})
    return rows


def training(networks):
    """How each network was trained: epochs (chosen by a time box, or given), images/s, wall and start-up time."""
    rows = {}
    for net in networks:
        timing = net.checkpoint.get("timing") or {}
        rows[net.label] = {"epochs": net.checkpoint["epochs"], "best_epoch": net.checkpoint["epoch"],
                           "minutes": timing.get("minutes"), "train_images_per_s": timing.get("train_images_per_s"),
                           "startup_seconds": timing.get("startup_seconds"),
                           "wall_seconds": timing.get("wall_seconds"), "peak_memory_mib": timing.get("peak_memory_mib")}
    return rows


def describe(networks, split):
    """What the results say about the networks and the data, the same from checkpoints or from a bundle."""
    return {"split": split.as_dict(),
            "students": [f"student {k} ({s.arch})" for k, s in enumerate(networks.students, 1)],
            "unfinished": [net.path for net in networks if not net.checkpoint.get("complete")],
            "provenance": provenance(networks), "training": training(networks),
            "checkpoints": {net.label: net.path for net in networks}, "layout": networks.layout(),
            "networks": [net.record() for net in networks], "budget_multiples": list(BUDGETS)}


def main(argv=None):
    args = parse_args(argv)
    check_output_folder(args.out, "--out")
    if args.bundle:
        return analyse_bundle(args)
    runtime = setup_runtime(args)
    print_config(args, "inference.py")
    split = students_split(args.students)
    data = load_cifar10(args.data_dir, args.download, allow_partial=args.partial_data)
    with stoppable("evaluating the networks (the logits computed so far are kept)", continue_command(args.command)):
        networks = load_networks(args, runtime, data)
        results, headline = evaluate_all(args, networks)
        images, labels = make_splits(data, split)["test"]
        routed_gflops = results["gflops"][results["routed"]["name"]]
        results["costs"] = measure_speed(args, runtime, networks, headline, routed_gflops, images)
    results.update(
        describe(networks, split), test_images=len(labels), device=device_name(runtime.device),
        torch=str(torch.__version__), batch_size=args.batch_size, command=args.command,
        data=f"data fingerprint {data.fingerprint}" + (f", stratified --limit {split.limit}" if split.limit else ""))
    out = Path(args.out)
    write_report(results, out)
    write_logits(networks, out / LOGITS)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {LOGITS} and the plots in {out}/")


def analyse_bundle(args):
    """Every table and plot again from a bundle: the same figures, from its logits alone."""
    bundle, networks = networks_of_bundle(args.bundle)
    results, _ = evaluate_all(args, networks)
    kept = ("costs", "test_images", "device", "torch", "batch_size", "command", "data", "pipeline")
    results.update(describe(networks, networks.students[0].split), **{k: bundle[k] for k in kept if k in bundle},
                   reanalysis=f"re-analysed from the bundle {args.bundle} by `{args.command}`")
    out = Path(args.out)
    write_report(results, out)
    write_logits(networks, out / LOGITS)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {LOGITS} and the plots in {out}/")


if __name__ == "__main__":
    run(main)
