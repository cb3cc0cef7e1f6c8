"""What inference.py finds, from the networks' logits alone (from checkpoints or a results bundle).

Every routing policy is fitted on the whole hold-out split (``utils.routed.fit_policy``) and applied
to the test split. Results are keyed by identifiers, never by what a table shows:

  systems      teacher, student1..., routed (the --router and --budget system), nokd1... (student k's
               no-KD twin), ensemble, selector (selector routing), random (random routing at its
               shares), control (the selector trained on shuffled labels), control_random,
               to_teacher (the students' cascade ending in the teacher), oracle
  policies     cascade, deferral, selector, to_teacher
  comparisons  "<system> vs <system>"
  networks     teacher, student1..., nokd1..., selector, control
  costs        teacher, student1..., students (all of them), routed, selector, to_teacher

``labels`` holds each one's display text: the only names ``utils/report.py`` shows.
"""

import torch
import torch.nn.functional as F

from utils.choices import ROUTERS
from utils.data import CLASSES
from utils.policies import RANDOM_DRAWS, NoThresholdError, StudentOutputs, oracle_routing
from utils.routed import Ladder, budget_refusal, fit_policy
from utils.stats import expected_calibration_error, mcnemar, paired_bootstrap

BUDGETS = (1.0, 1.25, 1.5)  # the budget table's columns: multiples of the cheapest student's GFLOPs per image
POLICIES = (*ROUTERS, "to_teacher")
ORACLE = "Oracle (any student right)"


RANDOM_OF = {"selector": "random", "control": "control_random"}  # each selector, and random routing at its shares


class Experiment:
    """The networks of an experiment as the analyses use them: the ladders their policies route, the test
    outputs and labels, the routed system asked for (``router``, ``budget``)."""

    def __init__(self, networks, router, budget):
        self.networks, self.router, self.budget = networks, router, budget
        self.teacher, self.students = networks.teacher, networks.students
        self.ladder = Ladder(self.students, networks.selector)
        self.to_teacher = Ladder(self.students, last_resort=self.teacher)
        self.labels = self.ladder.outputs("test")[1]
        self.cheapest = min(self.students, key=lambda s: s.gflops)
        holdout_logits, holdout_labels = self.teacher.logits["holdout"]
        self.teacher_holdout = (holdout_logits.argmax(1) == holdout_labels).double().mean().item()
        self.ids = dict(zip(networks.ids(), networks))
        self.to_teacher_reaches = None  # whether a threshold of the cascade to the teacher reaches its accuracy
        self.fitted = {}  # (policy, id of its ladder, its options) -> (router fitted on the hold-out split, ladder)

    def ladder_of(self, policy):
        """The ladder a policy of ``POLICIES`` routes (``to_teacher``: the students' cascade, then the teacher)."""
        return self.to_teacher if policy == "to_teacher" else self.ladder

    def fit(self, policy, ladder=None, budget=None, accuracy=None, **options):
        """``(router, its routing of the test split)``: ``policy`` (``to_teacher``: the cascade) over ``ladder``
        (default: the one it routes), fitted by ``fit_policy`` once per ladder, its threshold then chosen for
        ``budget`` or ``accuracy`` (which may raise ``NoThresholdError``)."""
        ladder = ladder or self.ladder_of(policy)
        key = ("cascade" if policy == "to_teacher" else policy, id(ladder), repr(sorted(options.items())))
        if key not in self.fitted:
            self.fitted[key] = fit_policy(key[0], ladder, **options), ladder  # the ladder kept: its id stays its own
        router = self.fitted[key][0].at(budget, accuracy)
        return router, router.route(ladder.outputs("test")[0])


def analyse(networks, router, budget):
    """Every figure of the results that the logits give, and the fitted systems that ``utils.speed`` times:
    ``(results, {cost id: (router, ladder)})``."""
    e = Experiment(networks, router, budget)
    routers, routings, draws = systems(e)
    correct = {k: routing.correct(e.labels) for k, routing in routings.items()}
    correct.update({RANDOM_OF[k]: d.double().mean(0) for k, d in draws.items()})  # the mean of random's draws
    ran = routings["routed"].ran
    results = {
        "accuracy": {k: c.double().mean().item() for k, c in correct.items()},
        "gflops": {k: routing.gflops for k, routing in routings.items()},
        "labels": labels(e, routers),
        "routed": headline_record(e, routers["routed"], routings["routed"]),
        "budgets": budget_table(e), "curves": curves(e),
        "comparisons": comparisons(e, correct), "kd_gain": kd_gains(e, correct),
        "random_routing": {k: draw_spread(correct[k], d) for k, d in draws.items()},
        "cross_fit": {k: cross_fit_spread(e, e.ids[k]) for k in RANDOM_OF if k in e.ids},
        "reach_teacher": reach_teacher(e, correct),
        "calibration": {k: network_scores(*net.logits["test"], interval=False) for k, net in e.ids.items()
                        if k not in RANDOM_OF},
        "per_class": {k: per_class(c, e.labels) for k, c in correct.items()},
        "routing_share_per_class": [ran[e.labels == c].double().mean(0).tolist() for c in range(len(CLASSES))],
        "confusion_routed": torch.bincount(e.labels * len(CLASSES) + routings["routed"].prediction,
                                           minlength=len(CLASSES) ** 2).view(len(CLASSES), -1).tolist(),
    }
    timed = {"routed": (routers["routed"], e.ladder), "selector": (routers["selector"], e.ladder),
             "to_teacher": (routers["to_teacher"], e.to_teacher)}
    return results, timed


def systems(e):
    """Every system of the results table, in its order: ``(routers, routings, draws)`` keyed by system id;
    ``draws``: per selector, whether each draw of random routing at its shares is right on each image."""
    fitted = {}
    for k, net in [("teacher", e.teacher), *((f"student{i}", s) for i, s in enumerate(e.students, 1))]:
        fitted[k] = e.fit("single", Ladder([net]))
    try:
        fitted["routed"] = e.fit(e.router, budget=e.budget)
    except NoThresholdError as error:
        raise budget_refusal(e.router, e.budget, error) from None
    for k, net in e.ids.items():
        if k.startswith("nokd"):
            fitted[k] = e.fit("single", Ladder([net]))
    fitted["ensemble"] = e.fit("ensemble", Ladder(e.students))
    draws = {}
    for k in RANDOM_OF:
        if k in e.ids:
            selector_ladder = Ladder(e.students, e.ids[k])
            fitted[k] = e.fit("selector", selector_ladder)
            fitted[RANDOM_OF[k]] = e.fit("random", selector_ladder, shares=fitted[k][1].share.tolist())
            draws[k] = fitted[RANDOM_OF[k]][0].draws(selector_ladder.outputs("test")[0], e.labels)
    try:
        fitted["to_teacher"] = e.fit("to_teacher", accuracy=e.teacher_holdout)
        e.to_teacher_reaches = True
    except NoThresholdError:
        fitted["to_teacher"] = e.fit("to_teacher")
        e.to_teacher_reaches = False
    routings = {k: routing for k, (_, routing) in fitted.items()}
    routings["oracle"] = oracle_routing(e.ladder.outputs("test")[0], e.labels, [s.gflops for s in e.students])
    return {k: router for k, (router, _) in fitted.items()}, routings, draws


def labels(e, routers):
    """The display text of every system, comparison, policy and network of the results."""
    everyone = "both students" if len(e.students) == 2 else f"all {len(e.students)} students"
    to_teacher = "Cascade to the teacher (the students cheapest first, then the teacher), " + (
        "cheapest to reach the teacher's hold-out accuracy" if e.to_teacher_reaches
        else "at its best hold-out accuracy (below the teacher's)")
    networks = {k: net.label for k, net in e.ids.items()}
    systems = {"teacher": networks["teacher"], **{f"student{k}": networks[f"student{k}"]
                                                  for k in range(1, len(e.students) + 1)},
               "routed": f"Routed: {e.router}, at most {e.budget:g}x the cheapest student's GFLOPs "
                         f"({e.cheapest.arch})",
               **{k: label for k, label in networks.items() if k.startswith("nokd")},
               "ensemble": f"Ensemble ({everyone}, probabilities averaged)",
               "selector": "Selector routing (threshold with the best hold-out accuracy)",
               "random": f"Random routing at the selector's shares (mean of {RANDOM_DRAWS} draws)",
               "control": "Selector trained on shuffled labels (control)",
               "control_random": f"Random routing at the control's shares (mean of {RANDOM_DRAWS} draws)",
               "to_teacher": to_teacher, "oracle": ORACLE}
    comparisons = {f"{a} vs {b}": f"{systems[a]} vs {systems[b]}" for a, b in compared_pairs(e)}
    comparisons.update({
        "selector vs random": f"Selector routing vs random routing at its shares (mean of {RANDOM_DRAWS} draws)",
        "control vs control_random": "Selector on shuffled labels vs random routing at its shares (mean of "
                                     f"{RANDOM_DRAWS} draws)"})
    return {"systems": systems, "comparisons": comparisons, "networks": networks,
            "roles": {k: net.role for k, net in e.ids.items()},
            "policies": {**{name: name for name in ROUTERS}, "to_teacher": "cascade to the teacher"},
            "students": [f"student {k} ({s.arch})" for k, s in enumerate(e.students, 1)]}


def compared_pairs(e):
    """The routed system against each student and the teacher, and each student against its no-KD twin."""
    pairs = [("routed", f"student{k}") for k in range(1, len(e.students) + 1)] + [("routed", "teacher")]
    return pairs + [(f"student{k[4:]}", k) for k in e.ids if k.startswith("nokd")]


def headline_record(e, router, routing):
    """The routed system asked for: its policy, budget, climb, threshold, shares and test cost."""
    budget_gflops = e.budget * e.cheapest.gflops
    return {"router": e.router, "budget": e.budget, "order": list(router.order), "budget_gflops": budget_gflops,
            "share": routing.ran.double().mean(0).tolist(), "threshold": router.threshold_,
            "test_gflops": routing.gflops, "over_budget": routing.gflops > budget_gflops + 1e-9}


def budget_table(e):
    """Each policy at each budget of ``BUDGETS``: its test accuracy and GFLOPs, with its threshold fitted on the
    hold-out split for that budget (absent where none meets it)."""
    table = {}
    for policy in POLICIES:
        for budget in BUDGETS:
            try:
                _, routing = e.fit(policy, budget=budget)
            except NoThresholdError:
                continue
            table.setdefault(policy, {})[f"{budget:g}"] = {
                "accuracy": routing.accuracy(e.labels), "gflops": routing.gflops,
                "budget_gflops": budget * e.cheapest.gflops,
                "over": routing.gflops > budget * e.cheapest.gflops + 1e-9}
    return table


def curves(e):
    """Each policy's test accuracy against its GFLOPs at every threshold."""
    result = {}
    for policy in POLICIES:
        router, _ = e.fit(policy)
        curve = router.curve(e.ladder_of(policy).outputs("test")[0], e.labels)
        result[policy] = (curve.gflops.tolist(), curve.accuracy.tolist())
    return result


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


def comparisons(e, correct):
    """Every pair of ``compared_pairs``, and each selector against random routing at its shares."""
    pairs = compared_pairs(e)
    kd = [pair for pair in pairs if pair[1].startswith("nokd")]
    pairs = [pair for pair in pairs if pair not in kd] + [(k, RANDOM_OF[k]) for k in RANDOM_OF if k in e.ids] + kd
    return {f"{a} vs {b}": compare(correct[a], correct[b]) for a, b in pairs}


def kd_gains(e, correct):
    """Each student's KD gain over its no-KD twin, by the student's architecture."""
    return {e.ids[f"student{k[4:]}"].arch: compare(correct[f"student{k[4:]}"], correct[k])
            for k in e.ids if k.startswith("nokd")}


def draw_spread(system_correct, draws):
    """The accuracy of random routing's draws (mean, standard deviation, the middle 95%) beside a system's, and the
    share of draws at least as accurate as it (with the system counted among them: a p-value)."""
    accuracy = draws.double().mean(1)
    system = system_correct.double().mean().item()
    low, high = torch.quantile(accuracy, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"draws": len(draws), "mean": accuracy.mean().item(), "std": accuracy.std().item(), "low": low,
            "high": high, "system": system, "p_value": (1 + (accuracy >= system).sum().item()) / (1 + len(draws))}


def cross_fit_spread(e, selector):
    """Per fold of the selector's out-of-fold hold-out scores: its images, the epochs of its selector, the
    threshold fitted on that fold alone and the routed accuracy there of the one fitted on every fold; and their
    spread over the folds. None without a hold-out split."""
    ladder = Ladder(e.students, selector)
    holdout, labels = ladder.outputs("holdout")
    cross_fit = selector.checkpoint["cross_fit"]
    fold = torch.tensor(cross_fit["fold"])
    if len(fold) != len(labels):
        return None
    shared = fit_policy("selector", ladder)
    rows = []
    for k in range(cross_fit["folds"]):
        part = fold == k
        alone = fit_policy("selector", ladder, part=part)
        outputs = StudentOutputs(holdout.logits[part], holdout.selector_scores[part])
        rows.append({"images": int(part.sum()), "epochs": cross_fit["epochs"][k],
                     "best_epoch": cross_fit["best_epochs"][k], "threshold": alone.threshold_,
                     "routed_accuracy": shared.route(outputs).accuracy(labels[part])})

    def spread(key):
        values = torch.tensor([row[key] for row in rows], dtype=torch.float64)
        return {"min": values.min().item(), "max": values.max().item(), "std": values.std().item()}

    return {"threshold": shared.threshold_, "folds": rows, "threshold_spread": spread("threshold"),
            "routed_accuracy_spread": spread("routed_accuracy")}


def reach_teacher(e, correct):
    """Per policy, its cheapest hold-out threshold that reaches the teacher's hold-out accuracy, and what that gives
    on the test split against the teacher (None where no threshold reaches it)."""
    reach = {}
    for policy in POLICIES:
        try:
            _, routing = e.fit(policy, accuracy=e.teacher_holdout)
        except NoThresholdError:
            reach[policy] = None
            continue
        reach[policy] = {"accuracy": routing.accuracy(e.labels), "gflops": routing.gflops,
                         "teacher_share": routing.gflops / e.teacher.gflops,
                         "vs_teacher": compare(routing.correct(e.labels), correct["teacher"])}
    return {"teacher_holdout_accuracy": e.teacher_holdout, "systems": reach}


def network_scores(logits, labels, interval=True):
    """One network's accuracy (with its 95% bootstrap interval), NLL, expected calibration error (15 bins) and
    per-class accuracy; ``interval=False``: accuracy, NLL and ECE only."""
    correct = logits.argmax(1) == labels
    scores = {"accuracy": correct.double().mean().item(), "nll": F.cross_entropy(logits, labels).item(),
              "ece": expected_calibration_error(logits.softmax(1), labels)}
    if not interval:
        return scores
    bootstrap = paired_bootstrap(correct, torch.zeros_like(correct))
    return {"images": len(labels), **scores, "accuracy_low": bootstrap.low, "accuracy_high": bootstrap.high,
            "per_class": per_class(correct, labels)}


def per_class(correct, labels):
    return [correct[labels == c].double().mean().item() for c in range(len(CLASSES))]


def cost_labels(ids, students, router):
    """The display text of the measured costs ``ids``; ``router``: the policy the routed one was measured with."""
    everyone = "both students" if students == 2 else f"all {students} students"
    names = {"teacher": "teacher", **{f"student{k}": f"student {k}" for k in range(1, students + 1)},
             "students": everyone, "routed": f"routed ({router})", "selector": "selector routing",
             "to_teacher": "cascade to the teacher"}
    return {k: names[k] for k in ids}


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
    for k, net in zip(networks.ids(), networks):
        timing = net.checkpoint.get("timing") or {}
        rows[k] = {"epochs": net.checkpoint["epochs"], "best_epoch": net.checkpoint["epoch"],
                   "minutes": timing.get("minutes"), "train_images_per_s": timing.get("train_images_per_s"),
                   "startup_seconds": timing.get("startup_seconds"), "wall_seconds": timing.get("wall_seconds"),
                   "peak_memory_mib": timing.get("peak_memory_mib")}
    return rows


def describe(networks, split):
    """What the results say about the networks and the data, the same from checkpoints or from a bundle."""
    unfinished = [net.path for net in networks if not net.checkpoint.get("complete")]
    return {"split": split.as_dict(), "unfinished": unfinished,
            "provenance": provenance(networks), "training": training(networks),
            "checkpoints": {k: net.path for k, net in zip(networks.ids(), networks)}, "layout": networks.layout(),
            "networks": [net.record() for net in networks], "budget_multiples": list(BUDGETS)}
