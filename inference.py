"""Evaluate the teacher, the students and the routed systems on the CIFAR-10 test set.

Every network's logits on the hold-out and test splits are computed once per checkpoint
(``<stem>.logits.pt``). The routing policies of utils/routers.py are fitted on the whole hold-out
split only — the selector's scores there are out-of-fold, each image's from a selector that never
trained on it (trainSelector.py) — and then applied to the test split:
  cascade   run the students cheapest first; while the answer so far (temperature-scaled,
            averaged) is unsure, run the next and average it in
  deferral  the same, with a learned decision: the predicted gain of running the next (how
            often it helps minus how often it hurts)
  selector  the selector CNN looks at the image and sends it to one student, by its predicted
            gain per extra GFLOP
--router and --budget (a multiple of the cheapest student's GFLOPs) choose the routed system of
the headline row. For comparison: each student, the no-KD twins where StudentTrain.py --no-kd
wrote them, the ensemble, selector routing, random routing at its shares (200 draws, charged
the selector's GFLOPs), the selector trained on shuffled labels (selector_shuffled.pt, if
present) and its random routing, the cascade to the teacher (the students, then the teacher as
the last resort) and the oracle, with paired bootstrap intervals and McNemar tests; the
selector's thresholds and routed accuracy over its folds; each policy at fixed budgets (the
test cost beside each budget); and the cost at which each policy reaches the teacher's
accuracy. Writes, in results/[NAME/], a results bundle (utils/bundle.py): results.md,
results.json, the plots and logits.npz.

--bundle DIR does all of it again from a bundle alone (no checkpoints, no data, no GPU): the
same tables and plots, the measured costs copied from the bundle.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.bundle import LOGITS, read_bundle, write_logits
from utils.cli import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
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
from utils.routers import RANDOM_DRAWS, ROUTERS, EnsembleRouter, RandomRouter, Routing, StudentOutputs, oracle_routing
from utils.routing import (
    add_routing_args,
    batched_routed,
    build_for,
    check_out_of_fold,
    check_selector_students,
    fit_headline,
    fit_router,
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
TO_TEACHER = "cascade to the teacher"  # the students' cascade with the teacher as its last resort
TO_TEACHER_ROW = "Cascade to the teacher (the students cheapest first, then the teacher)"
SELECTOR = "Selector routing (threshold with the best hold-out accuracy)"
RANDOM = f"Random routing at the selector's shares (mean of {RANDOM_DRAWS} draws)"
CONTROL = "Selector trained on shuffled labels (control)"
CONTROL_RANDOM = f"Random routing at the control's shares (mean of {RANDOM_DRAWS} draws)"


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
    parser.add_argument("--timed-passes", type=NON_NEGATIVE_INT, default=3,
                        help="timed passes over the test split for each system's images/s, after an untimed one "
                             "(the median and range are reported); 0 measures no speed (GFLOPs only), which "
                             "saves minutes on a CPU")
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
    selector = load_selector(args.selector, students, runtime, name=args.name)
    control_path = Path(args.selector).with_name(Path(args.selector).stem + "_shuffled.pt")
    control = load_selector(control_path, students, runtime, role="Selector on shuffled labels", name=args.name) \
        if control_path.exists() else None
    networks = Networks(teacher, students, twins, selector, control)
    for net in networks:
        net.load_logits(data)
    return networks


def networks_of_bundle(folder):
    """``(results, Networks)`` of a bundle: each network's record and logits, no weights."""
    results, networks = read_bundle(folder)
    networks = Networks.from_layout(networks, results["layout"])
    for selector in [networks.selector, *([networks.control] if networks.control else [])]:
        check_selector_students(selector.checkpoint, selector.path, networks.students)
        check_out_of_fold(selector.checkpoint, selector.path)
    return results, networks


# ----------------------------------------------------------------------------- evaluation

def single(net, split="test"):
    """One network on every image, as a ``Routing``."""
    logits = net.logits[split][0]
    return Routing(torch.ones(len(logits), 1, dtype=torch.bool), logits.softmax(1), (net.gflops,))


def compare(correct_a, correct_b):
    """``a - b`` in accuracy and its 95% paired bootstrap interval; McNemar's p-value where both are right or wrong on
    each image (None where ``b`` is random routing's mean over its draws)."""
    interval = paired_bootstrap(correct_a, correct_b)
    result = {"difference": interval.estimate, "low": interval.low, "high": interval.high,
              "p_value": None, "only_a_right": None, "only_b_right": None}
    if correct_a.dtype == correct_b.dtype == torch.bool:
        test = mcnemar(correct_a, correct_b)
        result.update(p_value=test.p_value, only_a_right=test.b, only_b_right=test.c)
    return result


def calibration(net, labels):
    logits = net.logits["test"][0]
    return {"accuracy": (logits.argmax(1) == labels).double().mean().item(),
            "nll": F.cross_entropy(logits, labels).item(),
            "ece": expected_calibration_error(logits.softmax(1), labels)}


@dataclass
class RoutedSystem:
    """A routed system that ``measure_speed`` times: its fitted router, the networks it may run (``router``'s
    indices), the selector it reads (or None), its parameters and its GFLOPs per image on the test split."""

    router: object
    networks: list
    selector: Trained | None
    params: int
    gflops: float


def routed_system(router, networks, selector, routing):
    selector = selector if router.uses_selector else None
    params = sum(net.stats["params"] for net in networks) + (selector.stats["params"] if selector else 0)
    return RoutedSystem(router, networks, selector, params, routing.gflops)


def random_draws(routing, students, router_flops, labels, test):
    """Random routing at ``routing``'s test shares, charged ``router_flops``: its draw 0, and whether each of its
    ``RANDOM_DRAWS`` draws is right on each image."""
    holdout, holdout_labels = outputs_of(students, None, "holdout")
    router = RandomRouter([s.gflops for s in students], routing.share.tolist(), router_flops=router_flops)
    router.fit(holdout, holdout_labels)
    return router.route(test), router.draws(test, labels)


def draw_spread(system_correct, draws):
    """The accuracy of random routing's draws (mean, standard deviation, the middle 95%) beside a system's, and the
    share of draws at least as accurate as it (with the system counted among them: a p-value)."""
    accuracy = draws.double().mean(1)
    system = system_correct.double().mean().item()
    low, high = torch.quantile(accuracy, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"draws": len(draws), "mean": accuracy.mean().item(), "std": accuracy.std().item(), "low": low,
            "high": high, "system": system, "p_value": (1 + (accuracy >= system).sum().item()) / (1 + len(draws))}


def cross_fit_spread(selector, students):
    """Per fold of the selector's out-of-fold hold-out scores: its images, the epochs of its selector, the
    threshold fitted on that fold alone and the routed accuracy there of the one fitted on every fold; and their
    spread over the folds. None without a hold-out split."""
    holdout, labels = outputs_of(students, selector, "holdout")
    cross_fit = selector.checkpoint["cross_fit"]
    fold = torch.tensor(cross_fit["fold"])
    if len(fold) != len(labels):
        return None
    shared = fit_router("selector", None, students, selector)
    rows = []
    for k in range(cross_fit["folds"]):
        part = fold == k
        outputs = StudentOutputs(holdout.logits[part], holdout.selector_scores[part])
        alone = build_for("selector", students, selector).fit(outputs, labels[part])
        rows.append({"images": int(part.sum()), "epochs": cross_fit["epochs"][k],
                     "best_epoch": cross_fit["best_epochs"][k], "threshold": alone.threshold_,
                     "routed_accuracy": shared.route(outputs).accuracy(labels[part])})

    def spread(key):
        values = torch.tensor([row[key] for row in rows], dtype=torch.float64)
        return {"min": values.min().item(), "max": values.max().item(), "std": values.std().item()}

    return {"threshold": shared.threshold_, "folds": rows, "threshold_spread": spread("threshold"),
            "routed_accuracy_spread": spread("routed_accuracy")}


def fit_to_reach(name, accuracy, students, selector, teacher=None):
    """A router at its cheapest threshold at least ``accuracy`` accurate on the hold-out split; None if none is."""
    router = fit_router(name, None, students, selector, teacher)
    networks = [*students, *([teacher] if teacher else [])]
    holdout, labels = outputs_of(networks, selector if router.uses_selector else None, "holdout")
    curve = router.curve(holdout, labels)
    point = curve.cheapest(accuracy)
    if point is None:
        return None
    router.threshold_ = curve.thresholds[point].item()
    return router


def evaluate_all(args, networks):
    """Every system's test-split outcome, the budget table, the curves, the comparisons, the selector's folds,
    random routing's draws and the cost of reaching the teacher; returns ``(results, {cost row: RoutedSystem})``."""
    teacher, students, twins, selector, control = networks.teacher, networks.students, networks.twins, \
        networks.selector, networks.control
    test, labels = outputs_of(students, selector, "test")
    test_with_teacher, _ = outputs_of([*students, teacher], None, "test")
    flops = [s.gflops for s in students]
    cheapest = min(students, key=lambda s: s.gflops)
    teacher_holdout = (teacher.logits["holdout"][0].argmax(1) == teacher.logits["holdout"][1]).double().mean().item()

    def outputs_for(name):
        return test_with_teacher if name == TO_TEACHER else test

    def fit(name, budget, reads=selector):
        if name == TO_TEACHER:
            return try_fit("cascade", budget, students, None, teacher)
        return try_fit(name, budget, students, reads)

    systems = {net.label: single(net) for net in [teacher, *students]}
    headline = fit_headline(args.router, args.budget, students, selector)
    routed = f"Routed: {args.router}, at most {args.budget:g}x the cheapest student's GFLOPs ({cheapest.arch})"
    systems[routed] = headline.route(test)
    systems.update({net.label: single(net) for net in twins})
    everyone = "both students" if len(students) == 2 else f"all {len(students)} students"
    systems[f"Ensemble ({everyone}, probabilities averaged)"] = \
        EnsembleRouter(flops).fit(*outputs_of(students, None, "holdout")).route(test)
    selector_router = fit("selector", None)
    systems[SELECTOR] = selector_router.route(test)
    systems[RANDOM], selector_draws = random_draws(systems[SELECTOR], students, selector.gflops, labels, test)
    draws = {SELECTOR: selector_draws}
    if control:
        control_test, _ = outputs_of(students, control, "test")
        systems[CONTROL] = fit("selector", None, reads=control).route(control_test)
        systems[CONTROL_RANDOM], draws[CONTROL] = random_draws(systems[CONTROL], students, control.gflops, labels,
                                                               test)
    to_teacher = fit_to_reach("cascade", teacher_holdout, students, None, teacher)
    to_teacher_name = f"{TO_TEACHER_ROW}, cheapest to reach the teacher's hold-out accuracy"
    if to_teacher is None:
        to_teacher = fit(TO_TEACHER, None)
        to_teacher_name = f"{TO_TEACHER_ROW}, at its best hold-out accuracy (below the teacher's)"
    systems[to_teacher_name] = to_teacher.route(test_with_teacher)
    systems["Oracle (any student right)"] = oracle_routing(test, labels, flops)
    correct = {name: routing.correct(labels) for name, routing in systems.items()}
    correct[RANDOM] = selector_draws.double().mean(0)
    if control:
        correct[CONTROL_RANDOM] = draws[CONTROL].double().mean(0)

    budgets, curves = {}, {}
    for name in [*ROUTERS, TO_TEACHER]:
        for budget in BUDGETS:
            router = fit(name, budget)
            if router:
                routing = router.route(outputs_for(name))
                budgets.setdefault(name, {})[f"{budget:g}"] = {
                    "accuracy": routing.accuracy(labels), "gflops": routing.gflops,
                    "budget_gflops": budget * cheapest.gflops, "over": routing.gflops > budget * cheapest.gflops + 1e-9}
        curve = fit(name, None).curve(outputs_for(name), labels)
        curves[name] = (curve.gflops.tolist(), curve.accuracy.tolist())

    comparisons = {f"{routed} vs {s.label}": compare(correct[routed], correct[s.label]) for s in [*students, teacher]}
    comparisons[f"Selector routing vs random routing at its shares (mean of {RANDOM_DRAWS} draws)"] = compare(
        correct[SELECTOR], correct[RANDOM])
    if control:
        comparisons[f"Selector on shuffled labels vs random routing at its shares (mean of {RANDOM_DRAWS} draws)"] \
            = compare(correct[CONTROL], correct[CONTROL_RANDOM])
    kd_gain = {}
    for twin in twins:
        kd = next((s for s in students if s.checkpoint["arch"] == twin.checkpoint["arch"]), None)
        if kd:
            kd_gain[kd.checkpoint["arch"]] = comparisons[f"{kd.label} vs {twin.label}"] = \
                compare(correct[kd.label], correct[twin.label])

    reach = {}
    for name in [*ROUTERS, TO_TEACHER]:
        router = fit_to_reach(name, teacher_holdout, students, selector) if name != TO_TEACHER else \
            fit_to_reach("cascade", teacher_holdout, students, None, teacher)
        if router is None:
            reach[name] = None
            continue
        routing = router.route(outputs_for(name))
        reach[name] = {"accuracy": routing.accuracy(labels), "gflops": routing.gflops,
                       "teacher_share": routing.gflops / teacher.gflops,
                       "vs_teacher": compare(routing.correct(labels), correct[teacher.label])}

    ran = systems[routed].ran
    results = {
        "accuracy": {name: c.double().mean().item() for name, c in correct.items()},
        "gflops": {name: routing.gflops for name, routing in systems.items()},
        "teacher": teacher.label,
        "routed": {"name": routed, "router": args.router, "budget": args.budget, "order": list(headline.order),
                   "budget_gflops": args.budget * cheapest.gflops, "share": ran.double().mean(0).tolist(),
                   "threshold": headline.threshold_, "test_gflops": systems[routed].gflops,
                   "over_budget": systems[routed].gflops > args.budget * cheapest.gflops + 1e-9},
        "budgets": budgets, "curves": curves, "comparisons": comparisons, "kd_gain": kd_gain,
        "random_routing": {name: draw_spread(correct[name], d) for name, d in draws.items()},
        "cross_fit": {net.role: cross_fit_spread(net, students) for net in [selector, *([control] if control else [])]},
        "reach_teacher": {"teacher_holdout_accuracy": teacher_holdout, "systems": reach},
        "calibration": {net.label: calibration(net, labels) for net in [teacher, *students, *twins]},
        "per_class": {name: per_class(c, labels) for name, c in correct.items()},
        "routing_share_per_class": [ran[labels == c].double().mean(0).tolist() for c in range(len(CLASSES))],
        "confusion_routed": torch.bincount(labels * len(CLASSES) + systems[routed].prediction,
                                           minlength=len(CLASSES) ** 2).view(len(CLASSES), -1).tolist(),
    }
    timed_systems = {f"routed ({args.router})": routed_system(headline, students, selector, systems[routed]),
                     "selector routing": routed_system(selector_router, students, selector, systems[SELECTOR]),
                     TO_TEACHER: routed_system(to_teacher, [*students, teacher], None, systems[to_teacher_name])}
    return results, timed_systems


def per_class(correct, labels):
    return [correct[labels == c].double().mean().item() for c in range(len(CLASSES))]


def measure_speed(args, runtime, networks, routed_systems, images):
    """Parameters, GFLOPs and images/s of each network, of all students together and of each routed system, timed
    alike on every device: the median and the range of ``--timed-passes`` passes over the test split, after an
    untimed one. Each system's line is printed as it is measured."""
    teacher, students = networks.teacher, networks.students
    bs = args.batch_size
    passes = f"{args.timed_passes} timed pass" + ("es" if args.timed_passes > 1 else "")
    print(f"timing every system: {passes} over the {len(images)} test images each, after an untimed one "
          "(--timed-passes)", flush=True)

    def cost(name, params, gflops, fn):
        speeds = sorted(len(images) / seconds for seconds in timed(fn, runtime, args.timed_passes)[1])
        median = speeds[len(speeds) // 2]
        costs[name] = {"params": params, "gflops": gflops, "images_per_s": median,
                       "images_per_s_range": [speeds[0], speeds[-1]]}
        print(f"  {name}: {median:.0f} images/s [{speeds[0]:.0f}-{speeds[-1]:.0f}]", flush=True)

    costs = {}
    for net in [teacher, *students]:
        cost(net.role.lower(), net.stats["params"], net.gflops,
             lambda net=net: batched_logits(net, images, runtime, bs))
    everyone = "both students" if len(students) == 2 else f"all {len(students)} students"
    cost(everyone, sum(s.stats["params"] for s in students), sum(s.gflops for s in students),
         lambda: [batched_logits(s, images, runtime, bs) for s in students])
    for name, system in routed_systems.items():
        cost(name, system.params, system.gflops, lambda system=system: batched_routed(
            system.router, system.networks, system.selector, images, runtime, bs))
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
    runtime = setup_runtime(args, varying_shapes=True)
    print_config(args, "inference.py")
    split = students_split(args.students)
    data = load_cifar10(args.data_dir, args.download, allow_partial=args.partial_data)
    with stoppable("evaluating the networks (the logits computed so far are kept)", continue_command(args.command)):
        networks = load_networks(args, runtime, data)
        results, routed_systems = evaluate_all(args, networks)
        images, labels = make_splits(data, split)["test"]
        if args.timed_passes:
            results["costs"] = measure_speed(args, runtime, networks, routed_systems, images)
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
