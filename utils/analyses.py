"""What inference.py finds, from the networks' logits alone (from checkpoints or a results bundle).

Every routing policy is fitted on the whole hold-out split (``utils.routed.fit_policy``) and applied
to the test split. A pair of students is routed and reported as a whole (``Pair``): the generalists,
and a method's specialists beside them where the experiment has them (identifiers with ``spec``).
Results are keyed by identifiers, never by what a table shows:

  systems      teacher, student1..., routed (the --router and --budget system), nokd1... (student k's
               no-KD twin), ensemble, selector (selector routing), random (random routing at its
               shares), control (the selector trained on shuffled labels), control_random,
               to_teacher (the students' cascade ending in the teacher), oracle; the specialists'
               spec1..., spec:routed, spec:ensemble, spec:selector, ... likewise
  policies     cascade, deferral, selector, to_teacher, cheapest_to_teacher (the cheapest student,
               then the teacher); spec:cascade, spec:deferral, spec:selector
  comparisons  "<system> vs <system>"
  networks     teacher, student1..., nokd1..., selector, control, spec1..., spec_selector, spec_control
  costs        teacher, student1..., students (all of them), routed, selector, to_teacher

``labels`` holds each one's display text: the only names ``utils/report.py`` shows.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.choices import ROUTERS
from utils.data import CLASSES
from utils.policies import RANDOM_DRAWS, NoThresholdError, StudentOutputs, oracle_routing
from utils.routed import Ladder, budget_refusal, fit_policy
from utils.stats import expected_calibration_error, mcnemar, paired_bootstrap

BUDGETS = (1.0, 1.25, 1.5)  # the budget table's columns: multiples of the cheapest student's GFLOPs per image
ORACLE = "Oracle (any student right)"
RANDOM_OF = {"selector": "random", "control": "control_random"}  # each selector, and random routing at its shares
SIDE_BY_SIDE = (1.0, 1.25, 1.3, 1.5)  # the budgets at which the pairs stand side by side
TARGET = {"budget": 1.3, "points": 0.005}  # what routed specialists are to reach over the best generalist student


GENERALISTS = "generalists"


def key_prefix(key):
    """The prefix of the identifiers of the pair that the results key by ``key`` (``Pair.key``)."""
    return "" if key == GENERALISTS else key


@dataclass
class Pair:
    """Students routed together, with the selectors that route them: the generalists (``prefix`` "") or a method's
    specialists (``prefix`` "spec:"). ``ids``: their networks' identifiers (students, selector, control)."""

    prefix: str
    title: str  # what their systems' labels begin with
    students: list
    student_ids: list
    selector: object
    selector_id: str
    control: object = None
    control_id: str = ""

    def __post_init__(self):
        self.ladder = Ladder(self.students, self.selector)

    @property
    def key(self):
        """The key of this pair's entries in the results: its prefix, or "generalists" (``key_prefix``)."""
        return self.prefix or GENERALISTS

    def id(self, system):
        return self.prefix + system

    def selectors(self):
        """``[(system id, selector)]``: the selector and its control, where there is one."""
        return [(self.id(k), net) for k, net in (("selector", self.selector), ("control", self.control)) if net]


class Experiment:
    """The networks of an experiment as the analyses use them: its pairs and the ladders their policies route, the
    test labels, the routed system asked for (``router``, ``budget``)."""

    def __init__(self, networks, router, budget):
        self.networks, self.router, self.budget = networks, router, budget
        self.teacher, self.students = networks.teacher, networks.students
        self.ids = dict(zip(networks.ids(), networks))
        self.pairs = [pair for pair in (self.pair(""), self.pair("spec")) if pair]
        self.generalists = self.pairs[0]
        self.ladder = self.generalists.ladder
        self.to_teacher = Ladder(self.students, last_resort=self.teacher)
        self.labels = self.ladder.outputs("test")[1]
        self.cheapest = min(self.students, key=lambda s: s.gflops)
        holdout_logits, holdout_labels = self.teacher.logits["holdout"]
        self.teacher_holdout = (holdout_logits.argmax(1) == holdout_labels).double().mean().item()
        self.policies = {**{name: (name, self.ladder) for name in ROUTERS}, "to_teacher": ("cascade", self.to_teacher),
                         "cheapest_to_teacher": ("cascade", Ladder([self.cheapest], last_resort=self.teacher)),
                         **{f"spec:{name}": (name, pair.ladder) for pair in self.pairs[1:] for name in ROUTERS}}
        self.to_teacher_reaches = None  # whether a threshold of the cascade to the teacher reaches its accuracy
        self.fitted = {}  # (policy, id of its ladder, its options) -> (router fitted on the hold-out split, ladder)

    def pair(self, kind):
        """The generalists (``kind`` "") or the specialists ("spec"), None where there are none."""
        ids = [k for k in self.ids if k[:-1] == ("student" if not kind else "spec") and k[-1].isdigit()]
        if not ids:
            return None
        selector, control = ("selector", "control") if not kind else ("spec_selector", "spec_control")
        method = (self.ids[ids[0]].checkpoint.get("specialist") or {}).get("method")
        return Pair(f"{kind}:" if kind else "", f"Specialists ({method}): " if kind else "", [self.ids[k] for k in ids],
                    ids, self.ids[selector], selector, self.ids.get(control), control)

    def fit(self, policy, ladder=None, budget=None, accuracy=None, **options):
        """``(router, its routing of the test split)``: the policy ``policy`` (a name of ``utils.policies.POLICIES``
        over ``ladder``, or a policy of ``self.policies``) fitted by ``fit_policy`` once per ladder, its threshold
        then chosen for ``budget`` or ``accuracy`` (which may raise ``NoThresholdError``)."""
        name, ladder = (policy, ladder) if ladder else self.policies[policy]
        key = (name, id(ladder), repr(sorted(options.items())))
        if key not in self.fitted:
            self.fitted[key] = fit_policy(name, ladder, **options), ladder  # the ladder kept: its id stays its own
        router = self.fitted[key][0].at(budget, accuracy)
        return router, router.route(ladder.outputs("test")[0])


def analyse(networks, router, budget):
    """Every figure of the results that the logits give, and the fitted systems that ``utils.speed`` times:
    ``(results, {cost id: (router, ladder)})``."""
    e = Experiment(networks, router, budget)
    routers, routings, draws = systems(e)
    correct = {k: routing.correct(e.labels) for k, routing in routings.items()}
    for pair in e.pairs:  # random routing: the mean of its draws
        correct.update({pair.id(RANDOM_OF[k.removeprefix(pair.prefix)]): draws[k].double().mean(0)
                        for k, _ in pair.selectors()})
    results = {
        "accuracy": {k: c.double().mean().item() for k, c in correct.items()},
        "gflops": {k: routing.gflops for k, routing in routings.items()},
        "labels": labels(e),
        "routed": headline_record(e, routers["routed"], routings["routed"]),
        "rung_rules": {policy: router.rule_ for policy, router in ((p, e.fit(p)[0]) for p in e.policies)
                       if hasattr(router, "rule_")},
        "budgets": budget_table(e), "curves": curves(e),
        "comparisons": comparisons(e, correct), "kd_gain": kd_gains(e, correct),
        "random_routing": {k: draw_spread(correct[k], d) for k, d in draws.items()},
        "cross_fit": {net_id: cross_fit_spread(pair, net) for pair in e.pairs
                      for net_id, net in ((pair.selector_id, pair.selector), (pair.control_id, pair.control)) if net},
        "reach_teacher": reach_teacher(e, correct),
        "pairs": pairs_at_equal_cost(e, correct),
        "calibration": {k: network_scores(*net.logits["test"], interval=False) for k, net in e.ids.items()
                        if net.checkpoint["kind"] != "selector"},
        "per_class": {k: per_class(c, e.labels) for k, c in correct.items()},
        "routing_share_per_class": {pair.key: {system: share_per_class(routings[pair.id(system)], e.labels)
                                               for system in ("routed", "selector")} for pair in e.pairs},
        "confusion_routed": torch.bincount(e.labels * len(CLASSES) + routings["routed"].prediction,
                                           minlength=len(CLASSES) ** 2).view(len(CLASSES), -1).tolist(),
    }
    timed = {"routed": (routers["routed"], e.ladder), "selector": (routers["selector"], e.ladder),
             "to_teacher": (routers["to_teacher"], e.to_teacher)}
    return results, timed


def share_per_class(routing, labels):
    """Per class, the share of its images each student of a routed system ran on."""
    return [routing.ran[labels == c].double().mean(0).tolist() for c in range(len(CLASSES))]


def systems(e):
    """Every system of the results table, in its order: ``(routers, routings, draws)`` keyed by system id;
    ``draws``: per selector, whether each draw of random routing at its shares is right on each image."""
    fitted, draws = {"teacher": e.fit("single", Ladder([e.teacher]))}, {}
    for pair in e.pairs:
        fitted.update(pair_systems(e, pair, draws))
        if pair is e.generalists:
            fitted["to_teacher"] = to_teacher_system(e)
        fitted[pair.id("oracle")] = None, oracle_routing(pair.ladder.outputs("test")[0], e.labels,
                                                          [s.gflops for s in pair.students])
    return {k: router for k, (router, _) in fitted.items()}, {k: r for k, (_, r) in fitted.items()}, draws


def pair_systems(e, pair, draws):
    """A pair's systems in their order: each student, the routed system, (the generalists' no-KD twins,) the
    ensemble, selector routing and random routing at its shares, the same for the control; ``draws``: random
    routing's, added to by selector."""
    fitted = {k: e.fit("single", Ladder([net])) for k, net in zip(pair.student_ids, pair.students)}
    try:
        fitted[pair.id("routed")] = e.fit(e.router, pair.ladder, budget=e.budget)
    except NoThresholdError as error:
        raise budget_refusal(e.router, e.budget, error) from None
    if pair is e.generalists:
        fitted.update({k: e.fit("single", Ladder([net])) for k, net in e.ids.items() if k.startswith("nokd")})
    fitted[pair.id("ensemble")] = e.fit("ensemble", Ladder(pair.students))
    for system, selector in pair.selectors():
        ladder = Ladder(pair.students, selector)
        fitted[system] = e.fit("selector", ladder)
        random = pair.id(RANDOM_OF[system.removeprefix(pair.prefix)])
        fitted[random] = e.fit("random", ladder, shares=fitted[system][1].share.tolist())
        draws[system] = fitted[random][0].draws(ladder.outputs("test")[0], e.labels)
    return fitted


def to_teacher_system(e):
    """The cascade to the teacher at its cheapest threshold that reaches the teacher's hold-out accuracy, or at its
    best hold-out accuracy where none does (``e.to_teacher_reaches`` says which)."""
    try:
        system = e.fit("to_teacher", accuracy=e.teacher_holdout)
        e.to_teacher_reaches = True
    except NoThresholdError:
        system = e.fit("to_teacher")
        e.to_teacher_reaches = False
    return system


def labels(e):
    """The display text of every system, comparison, policy and network of the results."""
    to_teacher = "Cascade to the teacher (the students cheapest first, then the teacher), " + (
        "cheapest to reach the teacher's hold-out accuracy" if e.to_teacher_reaches
        else "at its best hold-out accuracy (below the teacher's)")
    networks = {k: net.label for k, net in e.ids.items()}
    systems = {"teacher": networks["teacher"]}
    for pair in e.pairs:
        systems.update(pair_labels(e, pair, networks))
        if pair is e.generalists:
            systems.update({k: label for k, label in networks.items() if k.startswith("nokd")})
            systems["to_teacher"] = to_teacher
    comparisons = {f"{a} vs {b}": f"{systems[a]} vs {systems[b]}" for a, b in compared(e)}
    policies = {**{name: name for name in ROUTERS}, "to_teacher": "cascade to the teacher",
                "cheapest_to_teacher": f"cascade: {e.cheapest.arch}, then the teacher",
                **{f"spec:{name}": f"{pair.title}{name}" for pair in e.pairs[1:] for name in ROUTERS}}
    return {"systems": systems, "comparisons": comparisons, "networks": networks, "policies": policies,
            "roles": {k: net.role for k, net in e.ids.items()},
            "students": [f"student {k} ({s.arch})" for k, s in enumerate(e.students, 1)],
            "pair_students": {pair.key: [f"{'specialist' if pair.prefix else 'student'} {k} ({s.arch})"
                                         for k, s in enumerate(pair.students, 1)] for pair in e.pairs},
            "pairs": {pair.key: pair.title.removesuffix(": ") or "Generalists" for pair in e.pairs},
            "short": short_labels(e)}


def short_labels(e):
    """A few words for each system, where a plot's legend or rows show them."""
    short = {"teacher": f"teacher ({e.teacher.arch})", "to_teacher": "cascade to the teacher (its threshold)"}
    for k, net in e.ids.items():
        if k.startswith("nokd"):
            short[k] = f"student {k[4:]} ({net.arch}) without KD"
    for pair in e.pairs:
        title = "specialists' " if pair.prefix else ""
        short.update({k: f"{'specialist' if pair.prefix else 'student'} {n} ({net.arch})"
                      for n, (k, net) in enumerate(zip(pair.student_ids, pair.students), 1)})
        short.update({pair.id(k): title + text for k, text in (
            ("routed", f"routed ({e.router}, {e.budget:g}x)"), ("ensemble", "ensemble"),
            ("selector", "selector routing"), ("random", "random at the selector's shares"),
            ("control", "control selector (shuffled)"), ("control_random", "random at the control's shares"),
            ("oracle", "oracle"))})
    return short


def pair_labels(e, pair, networks):
    """The display text of a pair's systems, in their order."""
    everyone = "both students" if len(pair.students) == 2 else f"all {len(pair.students)} students"
    labels = {k: networks[k] for k in pair.student_ids}
    labels.update({
        "routed": f"Routed: {e.router}, at most {e.budget:g}x the cheapest student's GFLOPs ({e.cheapest.arch})",
        "ensemble": f"Ensemble ({everyone}, probabilities averaged)",
        "selector": "Selector routing (threshold with the best hold-out accuracy)",
        "random": f"Random routing at the selector's shares (mean of {RANDOM_DRAWS} draws)",
        "control": "Selector trained on shuffled labels (control)",
        "control_random": f"Random routing at the control's shares (mean of {RANDOM_DRAWS} draws)",
        "oracle": ORACLE})
    return {k if k in pair.student_ids else pair.id(k): label if k in pair.student_ids else pair.title + label
            for k, label in labels.items()}


def compared_pairs(e):
    """Each routed system against each of its students and the teacher, and each student against its no-KD twin."""
    pairs = []
    for pair in e.pairs:
        pairs += [(pair.id("routed"), k) for k in pair.student_ids] + [(pair.id("routed"), "teacher")]
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
    for policy in e.policies:
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
    for policy, (_, ladder) in e.policies.items():
        router, _ = e.fit(policy)
        curve = router.curve(ladder.outputs("test")[0], e.labels)
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
    """Every pair of ``compared_pairs``, each selector against random routing at its shares, and each student against
    its no-KD twin, in that order."""
    return {f"{a} vs {b}": compare(correct[a], correct[b]) for a, b in compared(e)}


def compared(e):
    """What ``comparisons`` compares, as ``[(system id, system id)]``."""
    pairs = compared_pairs(e)
    kd = [pair for pair in pairs if pair[1].startswith("nokd")]
    selectors = [(system, pair.id(RANDOM_OF[system.removeprefix(pair.prefix)])) for pair in e.pairs
                 for system, _ in pair.selectors()]
    return [pair for pair in pairs if pair not in kd] + selectors + kd


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


def cross_fit_spread(pair, selector):
    """Per fold of the selector's out-of-fold hold-out scores: its images, the epochs of its selector, the
    threshold fitted on that fold alone and the routed accuracy there of the one fitted on every fold; and their
    spread over the folds. None without a hold-out split, or for a selector learned from the training split (its
    hold-out scores are out of sample, one fold)."""
    ladder = Ladder(pair.students, selector)
    holdout, labels = ladder.outputs("holdout")
    cross_fit = selector.checkpoint["cross_fit"]
    fold = torch.tensor(cross_fit["fold"])
    if len(fold) != len(labels) or cross_fit["folds"] < 2:
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
    """Per routing policy, two thresholds chosen on the hold-out split, and what each gives on the test split against
    the teacher: the cheapest that reaches the teacher's hold-out accuracy (``systems``), and the cheapest within
    the half-width of its 95% interval there (``within``); None where no threshold does. ``smallest_within``: the
    fewest GFLOPs per image of any of them whose paired test interval with the teacher reaches 0."""
    correct_teacher = e.teacher.logits["holdout"][0].argmax(1) == e.teacher.logits["holdout"][1]
    half_width = 1.96 * (e.teacher_holdout * (1 - e.teacher_holdout) / max(len(correct_teacher), 1)) ** 0.5
    policies = [p for p in e.policies if p != "selector" and not p.endswith(":selector")] + \
        [pair.id("selector") for pair in e.pairs]
    reach = {"systems": {}, "within": {}}
    for key, accuracy in (("systems", e.teacher_holdout), ("within", e.teacher_holdout - half_width)):
        for policy in policies:
            try:
                _, routing = e.fit(policy, accuracy=accuracy)
            except NoThresholdError:
                reach[key][policy] = None
                continue
            reach[key][policy] = {"accuracy": routing.accuracy(e.labels), "gflops": routing.gflops,
                                  "teacher_share": routing.gflops / e.teacher.gflops,
                                  "vs_teacher": compare(routing.correct(e.labels), correct["teacher"])}
    within = [(c["gflops"], policy) for key in reach for policy, c in reach[key].items()
              if c and c["vs_teacher"]["high"] >= 0]
    smallest = min(within, default=None)
    return {"teacher_holdout_accuracy": e.teacher_holdout, "half_width": half_width, **reach,
            "smallest_within": smallest and {"policy": smallest[1], "gflops": smallest[0],
                                             "teacher_share": smallest[0] / e.teacher.gflops}}


def holdout_accuracy(net):
    logits, labels = net.logits["holdout"]
    return (logits.argmax(1) == labels).double().mean().item()


def best_routing(e, pair, budget):
    """``(policy, router, test routing)``: the pair's policy of ``ROUTERS`` with the best hold-out accuracy within
    ``budget`` (ties: the first), or None where none fits it."""
    best = None
    for policy in map(pair.id, ROUTERS):
        try:
            router, routing = e.fit(policy, budget=budget)
        except NoThresholdError:
            continue
        if best is None or router.holdout_accuracy_ > best[1].holdout_accuracy_:
            best = policy, router, routing
    return best


def pairs_at_equal_cost(e, correct):
    """Each pair side by side at each budget of ``SIDE_BY_SIDE``: its best routing there (chosen on the hold-out
    split), against the generalist student most accurate on the hold-out split and against the generalists' best
    routing at the same budget; and the target of the specialists, met or missed (``target``)."""
    best_student = max(e.generalists.student_ids, key=lambda k: holdout_accuracy(e.ids[k]))
    table = {}
    for budget in SIDE_BY_SIDE:
        right, row = {}, {}
        for pair in e.pairs:
            best = best_routing(e, pair, budget)
            if best is None:
                continue
            key = pair.key
            right[key] = best[2].correct(e.labels)
            row[key] = {"policy": best[0], "holdout_accuracy": best[1].holdout_accuracy_,
                        "accuracy": right[key].double().mean().item(), "gflops": best[2].gflops,
                        "vs_best_student": compare(right[key], correct[best_student])}
        for key in row:
            row[key]["vs_generalists"] = compare(right[key], right[GENERALISTS]) \
                if key != GENERALISTS and GENERALISTS in right else None
        table[f"{budget:g}"] = row
    return {"best_student": best_student, "budgets": table, "target": specialists_target(e, table)}


def specialists_target(e, table):
    """Whether routed specialists are at least ``TARGET["points"]`` above the best generalist student with the
    interval above 0, within ``TARGET["budget"]`` times the cheapest student's GFLOPs on the test split, and above
    the generalists' best routing there; None without specialists."""
    if len(e.pairs) < 2:
        return None
    cell = table[f"{TARGET['budget']:g}"].get("spec:")
    met = bool(cell) and cell["vs_best_student"]["difference"] >= TARGET["points"] and \
        cell["vs_best_student"]["low"] > 0 and cell["gflops"] <= TARGET["budget"] * e.cheapest.gflops + 1e-9 and \
        cell["vs_generalists"] is not None and cell["vs_generalists"]["difference"] > 0
    return {**TARGET, "met": met}


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
