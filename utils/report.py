"""The results of ``inference.py`` as files: ``results.md``, ``results.json`` and the plots.

Everything here reads the results dict that ``inference.py`` builds (and ``results.json`` holds),
so a table or plot can be made again from the JSON alone. Results are keyed by identifiers
(``utils.analyses``); what a table or plot shows for each comes from ``results["labels"]`` alone.
"""

import json
import math

from utils.analyses import cost_labels, key_prefix
from utils.plots import plot_accuracy_vs_flops, plot_confusion, plot_gain_table, plot_grouped_bars
from utils.runs import write_atomically
from utils.split import CLASSES

ORIGINAL = {"teacher": "81%", "student1": "74.19%", "student2": "73.21%", "routed": "79.67%"}  # by system id
PLOTS = ("accuracy_vs_gflops.png", "per_class_gain.png", "routed_confusion.png", "routing_share.png")


def write_report(results, out):
    """``results.json``, ``results.md`` and the plots in the folder ``out``."""
    write_results(results, out)
    write_plots(results, out)


def write_results(results, out):
    """``results.json`` and ``results.md`` in the folder ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    write_markdown(results, out / "results.md")


def finite_or_none(value):
    """``value`` with every infinite or NaN float inside it (dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_json(path, value):
    """Strict JSON, which every reader accepts: a non-finite float (a threshold of +inf, an undefined
    ratio) is written as null, never as ``Infinity`` or ``NaN``; written atomically."""
    text = json.dumps(finite_or_none(value), indent=2, allow_nan=False) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text))


def _pct(x):
    return f"{100 * x:.2f}%"


def _points(c):
    return f"{100 * c['difference']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]"


def provenance_row(p):
    """One network's row of "Where these numbers come from"."""
    complete = "yes" if p["complete"] else "**no**"
    return (f"| {p['role']} | `{p['path']}` | {p['epochs']} | {p['best_epoch']} | {complete} | {p['seed']} "
            f"| {p['kd']} | {p['device']} | {p['git_commit']} |")


def against_teacher(r):
    """In plain words: does the routed system reach the teacher's accuracy, and at what share of its cost?"""
    c = r["comparisons"]["routed vs teacher"]
    gflops = r["gflops"]["routed"] / r["gflops"]["teacher"]
    measured = r["costs"].get("routed")
    if measured and measured["router"] != r["routed"]["router"]:  # a bundle re-analysed with another policy
        measured = None
    speed = (f"{measured['images_per_s'] / r['costs']['teacher']['images_per_s']:.2f}x its measured images/s"
             if measured else "images/s not measured (the run that wrote the bundle timed another routed system)")
    if c["low"] > 0:
        verdict = "is more accurate than the teacher"
    elif c["high"] < 0:
        verdict = "does not reach the teacher's accuracy"
    else:
        verdict = "is as accurate as the teacher within the interval"
    cheaper = "less" if gflops < 1 else "**more**"
    return [f"**Against the teacher.** The routed system {verdict}: {_points(c)} points on the same test images "
            f"(95% paired interval), at {gflops:.2f}x its GFLOPs per image ({cheaper} compute than the "
            f"teacher) and {speed}."]


def dearer_than_teacher(r):
    """The systems of the results table that cost more GFLOPs per image than the teacher, said plainly."""
    teacher, names = r["gflops"]["teacher"], r["labels"]["systems"]
    dearer = [f"{names[k]} ({r['gflops'][k] / teacher:.2f}x)" for k in r["gflops"]
              if k != "teacher" and r["gflops"][k] > teacher * (1 + 1e-9)]
    if not dearer:
        return [f"No system here costs more GFLOPs per image than the teacher ({teacher:.3f})."]
    return [f"**Costs more than the teacher** ({teacher:.3f} GFLOPs per image): " + "; ".join(dearer) + "."]


def _more_than_teacher(cost, teacher):
    more = (["more GFLOPs"] if cost["gflops"] > teacher["gflops"] * (1 + 1e-9) else []) + \
        (["slower"] if cost["images_per_s"] < teacher["images_per_s"] else [])
    return f"**{', '.join(more)}**" if more else "no"


def cost_lines(r):
    """The cost table, each system against the teacher, and the verdict against the teacher."""
    if "teacher" not in r.get("costs", {}):
        why = "the teacher has no weights here, only its logits from the bundle" if r.get("teacher_from_bundle") \
            else "no timed passes: `inference.py --timed-passes N` measures them, by default only on a GPU"
        return [f"Not measured in this run ({why}): GFLOPs per image are in the tables above."]
    teacher = r["costs"]["teacher"]
    cpu = r["device"].startswith("CPU")
    names = cost_labels(r["costs"], len(r["labels"]["students"]), r["costs"].get("routed", {}).get("router"))
    dearer = [f"{names[k]} ({_more_than_teacher(c, teacher).strip('*')})" for k, c in r["costs"].items()
              if k != "teacher" and _more_than_teacher(c, teacher) != "no"]
    return [
        f"Images/s: the median [and range] of timed passes over the test set after an untimed one (which sees every "
        f"batch shape), batch {r['batch_size']}, on {r['device']}"
        + (" — **a CPU shared with other work: these speeds say little about a GPU's**" if cpu else "")
        + ". GFLOPs counted by `torch.utils.flop_counter` (a multiply-add is 2); a routed system's are its "
        "expected GFLOPs per test image, and its parameters those of every network it may run.", "",
        "| System | Parameters | GFLOPs / image | x the teacher's | Images/s [range] | x the teacher's "
        "| Costs more than the teacher |",
        "|---|---|---|---|---|---|---|",
        *[f"| {names[k]} | {c['params'] / 1e6:.2f} M | {c['gflops']:.3f} | {c['gflops'] / teacher['gflops']:.2f} "
          f"| {c['images_per_s']:.0f} {_range(c)} | {c['images_per_s'] / teacher['images_per_s']:.2f} "
          f"| {_more_than_teacher(c, teacher) if k != 'teacher' else '—'} |"
          for k, c in r["costs"].items()], "",
        ("**Costs more than the teacher**, in GFLOPs per image or in measured images/s: " + "; ".join(dearer) + "."
         if dearer else "Every system here costs less than the teacher, in GFLOPs per image and in measured "
                        "images/s."), "",
        *against_teacher(r)]


def reach_lines(r):
    """At what cost each policy reaches the teacher's accuracy, or comes within its interval: its cheapest hold-out
    threshold that does, on the test split."""
    reach = r.get("reach_teacher")
    if not reach:
        return []
    lines = [f"**At what cost do the routed students reach the teacher's accuracy?** The teacher is "
             f"{_pct(reach['teacher_holdout_accuracy'])} accurate on the hold-out split (95% interval ±"
             f"{100 * reach['half_width']:.2f} points). Each policy at its cheapest threshold that reaches this on "
             "the hold-out split, or comes within the interval's half-width of it, and what that gives on the test "
             "split (the difference with the teacher on the same images, in points, with its 95% paired "
             "interval):", "",
             "| Policy | Hold-out target | Test accuracy | Against the teacher [95% interval] | GFLOPs / image "
             "| x the teacher's |", "|---|---|---|---|---|---|"]
    for key, target in (("systems", "the teacher's accuracy"), ("within", "within its interval")):
        for policy, c in reach[key].items():
            name = r["labels"]["policies"][policy]
            if c is None:
                lines.append(f"| {name} | {target} | no threshold reaches it on the hold-out split | — | — | — |")
                continue
            more = " — **more than the teacher**" if c["teacher_share"] > 1 + 1e-9 else ""
            lines.append(f"| {name} | {target} | {_pct(c['accuracy'])} | {_points(c['vs_teacher'])} "
                         f"| {c['gflops']:.3f} | {c['teacher_share']:.2f}{more} |")
    smallest = reach.get("smallest_within")
    lines += ["", f"The fewest GFLOPs per image of these systems whose paired interval with the teacher on the test "
              f"split reaches 0 (within its interval of the teacher's accuracy): {smallest['gflops']:.3f} "
              f"({smallest['teacher_share']:.2f}x the teacher's), {r['labels']['policies'][smallest['policy']]}."
              if smallest else "None of these systems comes within its interval of the teacher's accuracy on the "
                               "test split.", ""]
    return lines


def rung_lines(r):
    """Each escalation's rung rule, chosen on the hold-out split."""
    rules = r.get("rung_rules")
    if not rules:
        return []
    said = {"average": "the average of the networks run so far", "last": "the last network run alone"}
    return ["What each rung of an escalation answers, chosen on the hold-out split (the better best accuracy there): "
            + "; ".join(f"{r['labels']['policies'][policy]}: {said[rule]}" for policy, rule in rules.items()) + ".",
            ""]


def side_by_side_lines(r):
    """The pairs at equal GFLOPs: each one's best routing, against the best generalist student and the generalists'
    best routing, and the specialists' target met or missed."""
    pairs = r.get("pairs")
    if not pairs or len(r["labels"]["pairs"]) < 2:
        return []
    names, best = r["labels"], pairs["best_student"]
    lines = ["## Specialists beside generalists, at equal cost", "",
             "Each pair's best routing within each budget (the policy of the best hold-out accuracy there), its test "
             f"accuracy and GFLOPs, against the generalist student most accurate on the hold-out split "
             f"({names['systems'][best]}) and against the generalists' best routing at the same budget "
             "(points, 95% paired interval).", "",
             "| Budget | Pair | Policy | Test accuracy | GFLOPs / image | Against the best student "
             "| Against the generalists' routing |", "|---|---|---|---|---|---|---|"]
    for budget, row in pairs["budgets"].items():
        for key, c in row.items():
            against = _points(c["vs_generalists"]) if c["vs_generalists"] else "—"
            lines.append(f"| {budget}x | {names['pairs'][key]} | {names['policies'][c['policy'].rpartition(':')[2]]} "
                         f"| {_pct(c['accuracy'])} | {c['gflops']:.3f} | {_points(c['vs_best_student'])} "
                         f"| {against} |")
    target = pairs.get("target")
    if target:
        lines += ["", f"**Target** (set before any GPU run): routed specialists at least {100 * target['points']:g} "
                  "points above the best single generalist student with the interval above zero, at no more than "
                  f"{target['budget']:g}x the cheapest student's GFLOPs per image, and above the generalists' best "
                  f"routing at the same cost: **{'met' if target['met'] else 'missed'}**."]
    return lines + [""]


def _budget_gflops(r, budget):
    return r["routed"]["budget_gflops"] / r["routed"]["budget"] * budget


def _budget_cell(cell):
    if cell is None:
        return "—"
    over = cell["gflops"] > cell["budget_gflops"] + 1e-9
    return f"{_pct(cell['accuracy'])} ({cell['gflops']:.3f})" + (" **over**" if over else "")


def _g(value):
    """A threshold or its spread: ``—`` where it is not finite (an end of the ladder: +inf or -inf)."""
    return "—" if value is None or not math.isfinite(value) else f"{value:.4g}"


def cross_fit_lines(r):
    """Each selector's out-of-fold scores: per fold, the threshold fitted on that fold alone and the routed
    accuracy there of the one fitted on all of them; and their spread."""
    lines = []
    for k, c in r.get("cross_fit", {}).items():
        if c is None:
            continue
        t, a = c["threshold_spread"], c["routed_accuracy_spread"]
        lines += [
            f"## {r['labels']['roles'][k]}: out-of-fold scores", "",
            f"Each hold-out image's score comes from one of {len(c['folds'])} selectors, each trained on the other "
            "folds of the hold-out split, its epoch chosen on part of its own training images; the routing "
            "threshold (the predicted gain in accuracy per extra GFLOP that moves an image to a dearer student) is "
            f"fitted on all of them: {_g(c['threshold'])}. The shipped selector is one more, trained on the whole "
            "hold-out split. Per fold: the threshold fitted on that fold alone, and the routed accuracy on it at the "
            "shared threshold (— : a threshold at an end, every image on its cheapest or its dearest student).", "",
            "| Fold | Images | Epochs (weights of) | Threshold fitted on it alone | Routed accuracy at the shared "
            "threshold |", "|---|---|---|---|---|",
            *[f"| {k} | {f['images']} | {f['epochs']} ({f['best_epoch']}) | {_g(f['threshold'])} "
              f"| {_pct(f['routed_accuracy'])} |" for k, f in enumerate(c["folds"], 1)], "",
            f"Spread over the folds: threshold {_g(t['min'])} to {_g(t['max'])} (standard deviation {_g(t['std'])}); "
            f"routed accuracy {_pct(a['min'])} to {_pct(a['max'])} (standard deviation "
            f"{_number(a['std'] and 100 * a['std'], '{:.2f}')} points).", ""]
    return lines


def random_lines(r):
    """Random routing's draws beside each selector: the spread that chance alone gives at its shares."""
    draws = r.get("random_routing")
    if not draws:
        return []
    count = next(iter(draws.values()))["draws"]
    return ["## Random routing", "",
            f"Random routing at a selector's test shares, charged the selector's GFLOPs: the accuracy of {count} "
            "draws (mean, standard deviation, the middle 95%) beside the selector's; p: the share of draws at "
            "least as accurate as the selector, the selector counted among them.", "",
            "| Selector | Its accuracy | Random: mean | Standard deviation | Middle 95% of draws | p |",
            "|---|---|---|---|---|---|",
            *[f"| {r['labels']['systems'][k]} | {_pct(d['system'])} | {_pct(d['mean'])} "
              f"| {_number(d['std'] and 100 * d['std'], '{:.2f}')} points | {_pct(d['low'])} to {_pct(d['high'])} "
              f"| {d['p_value']:.3g} |" for k, d in draws.items()],
            ""]


def _range(cost):
    low, high = cost.get("images_per_s_range", (None, None))
    return "" if low is None else f"[{low:.0f}–{high:.0f}]"


def training_lines(r):
    """How each network was trained, and the pipeline's stages, from what the results hold."""
    lines = ["Networks trained in one loop (the students, their no-KD twins) share its images/s, wall time and peak "
             "GPU memory.", "",
             "| Network | Epochs | Weights of epoch | Time box (min) | Training images/s | Start-up (s) | Wall (s) "
             "| Peak GPU memory (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for network, t in r["training"].items():
        cells = [_number(t.get(k), f) for k, f in (("minutes", "{:g}"), ("train_images_per_s", "{:.0f}"),
                                                     ("startup_seconds", "{:.1f}"), ("wall_seconds", "{:.1f}"),
                                                     ("peak_memory_mib", "{:.0f}"))]
        name = r["labels"]["networks"][network]
        lines.append(f"| {name} | {t['epochs']} | {t['best_epoch']} | " + " | ".join(cells) + " |")
    pipeline = r.get("pipeline")
    if pipeline:
        budget = f" of a time box of {pipeline['minutes']:g} min" if pipeline.get("minutes") else ""
        lines += ["", f"Wall time of each stage of `{pipeline['command']}`{budget}, as `reproduce.py` measured it "
                  "(a skipped stage took no time):", "", "| Stage | Minutes |", "|---|---|",
                  *[f"| {stage} | {seconds / 60:.2f} |" for stage, seconds in pipeline["stages"].items()],
                  f"| total, data decoding and start-up included | {pipeline['total_seconds'] / 60:.2f} |"]
    return lines


def _number(value, fmt):
    return "—" if value is None else fmt.format(value)


def notes_lines(r):
    """The title, what was measured where, and the notes on what the numbers are (and are not)."""
    notes = []
    if r["split"]["limit"]:
        notes.append(f"**A quick run on a subset** (`--limit {r['split']['limit']}` images per split): these numbers "
                     "only show that every stage runs.")
    notes.append("Not comparable with the original's numbers: it fine-tuned ImageNet-pretrained backbones on "
                 "images upsampled to 224x224 (and had the flaws listed in the README); here every network is "
                 "trained from scratch on 32x32 CIFAR-10 unless its checkpoint says otherwise.")
    if r["unfinished"]:
        notes.append("**Unfinished checkpoints** (marked in the rows): " + ", ".join(f"`{p}`" for p in r["unfinished"]))
    if r.get("teacher_from_bundle"):
        notes.append(f"**The teacher's figures are the logits of the bundle `{r['teacher_from_bundle']}`** (its "
                     "weights are not published): it was not run again here.")
    if r.get("reanalysis"):
        notes.append(f"Tables and plots {r['reanalysis']}; costs and images/s are the bundle's own measurements.")
    return ["# Results", "",
            f"CIFAR-10 test set, {r['test_images']} images ({r['data']}). Device: {r['device']}; torch {r['torch']}. "
            f"Written by `{r['command']}`.", "",
            *[f"- {n}" for n in notes], ""]


def systems_lines(r):
    """Every system's test accuracy and GFLOPs beside the original's reported numbers, and the routed row's cost."""
    routed, names = r["routed"], r["labels"]["systems"]
    return ["| Model | Original (reported by the original repository) | Ours (measured) | GFLOPs / image |",
            "|---|---|---|---|",
            *[f"| {names[k]} | {ORIGINAL.get(k, '—')} | {_pct(acc)} | {r['gflops'][k]:.3f} |"
              for k, acc in r["accuracy"].items()], "",
            f"The routed row is the `{routed['router']}` policy with its threshold fitted on the hold-out split for "
            f"at most {routed['budget_gflops']:.3f} GFLOPs per image; on the test split it costs "
            f"{routed['test_gflops']:.3f}" + (" — **over its budget**" if routed["over_budget"] else "")
            + "; it ran the students on " + ", ".join(f"{100 * s:.1f}%" for s in routed["share"])
            + " of the test images.", "",
            *dearer_than_teacher(r), ""]


def budget_lines(r):
    """Each policy at each fixed budget: its test accuracy and test GFLOPs."""
    budgets = r["budget_multiples"]
    return ["## Routing policies at fixed compute budgets", "",
            "Test accuracy and test GFLOPs per image of each policy with its threshold fitted on the hold-out split "
            "for a budget of k times the cheapest student's GFLOPs (the column's head gives it in GFLOPs); — where "
            "no threshold fits. The thresholds meet their budget on the hold-out split; a cell marked **over** costs "
            "more than its budget on the test split.", "",
            "| Policy | " + " | ".join(f"{b:g}x (≤ {_budget_gflops(r, b):.3f})" for b in budgets) + " |",
            "|---|" + "---|" * len(budgets),
            *[f"| {r['labels']['policies'][policy]} | " + " | ".join(_budget_cell(cells.get(f"{b:g}")) for b in budgets)
              + " |" for policy, cells in r["budgets"].items()], "",
            "Curves over every threshold: `accuracy_vs_gflops.png`.", ""]


def comparison_lines(r):
    """Paired differences on the same test images, and each network's calibration."""
    names = r["labels"]
    return ["## Comparisons on the same test images", "",
            "Difference in accuracy (points), its 95% paired bootstrap interval, and McNemar's test (p-value; images "
            "only the first / only the second gets right).", "",
            "| Comparison | Difference [95% interval] | McNemar p | Only first right | Only second right |",
            "|---|---|---|---|---|",
            *[f"| {names['comparisons'][k]} | {_points(c)} | {_number(c['p_value'], '{:.3g}')} "
              f"| {_number(c['only_a_right'], '{}')} | {_number(c['only_b_right'], '{}')} |"
              for k, c in r["comparisons"].items()], "",
            "Against random routing, the second system is the mean over its draws, image by image (no McNemar test).",
            "",
            "## Calibration", "",
            "| Network | Accuracy | NLL | ECE (15 bins) |", "|---|---|---|---|",
            *[f"| {names['networks'][k]} | {_pct(c['accuracy'])} | {c['nll']:.3f} | {c['ece']:.4f} |"
              for k, c in r["calibration"].items()],
            ""]


def class_lines(r):
    """Per class: the share of its images each student ran on in each pair's routed system, and each system's
    accuracy."""
    names = r["labels"]["systems"]
    lines = []
    for key, systems in r["routing_share_per_class"].items():
        prefix = key_prefix(key)
        students = r["labels"]["pair_students"][key]
        for system, per_class_shares in systems.items():
            lines += [f"## {names[prefix + system]}: share of each class's images each student ran on", "",
                      "| Class | " + " | ".join(students) + " |", "|---|" + "---|" * len(students),
                      *[f"| {c} | " + " | ".join(f"{100 * s:.1f}%" for s in shares) + " |"
                        for c, shares in zip(CLASSES, per_class_shares)], ""]
    return lines + [
        "## Per-class accuracy (%)", "",
        "| System | " + " | ".join(CLASSES) + " |", "|---|" + "---|" * len(CLASSES),
        *[f"| {names[k]} | " + " | ".join(f"{100 * a:.1f}" for a in accs) + " |" for k, accs in r["per_class"].items()],
        ""]


def write_markdown(results, path):
    r = results
    lines = [
        *notes_lines(r), *systems_lines(r), *rung_lines(r), *budget_lines(r), *cross_fit_lines(r), *random_lines(r),
        *comparison_lines(r),
        "## Cost and speed", "",
        *cost_lines(r), "",
        *reach_lines(r), *side_by_side_lines(r), *class_lines(r),
        "## Training", "",
        *training_lines(r), "",
        "## Where these numbers come from", "",
        "| Network | Checkpoint | Epochs run | Weights of epoch | Complete | Seed | KD | Trained on | Git commit |",
        "|---|---|---|---|---|---|---|---|---|",
        *[provenance_row(p) for p in r["provenance"]], "",
        "Plots: " + ", ".join(f"`{p}`" for p in PLOTS) + ".", "",
    ]
    write_atomically(path, lambda tmp: tmp.write_text("\n".join(lines)))


def write_plots(results, out):
    """The four plots, each pair of students in a panel of its own where there are two."""
    labels = results["labels"]
    short, pairs = labels["short"], labels["pairs"]
    panels = {}
    for key in pairs:
        prefix = key_prefix(key)
        ids = [k for k in results["accuracy"] if k == "teacher" or (k.startswith("spec") if prefix
                                                                    else not k.startswith("spec"))]
        curves = {labels["policies"][p].removeprefix(f"{pairs[key]}: "): tuple(c) for p, c in results["curves"].items()
                  if p.startswith(prefix) and (prefix or ":" not in p)}
        panels[pairs[key]] = curves, {short[k]: (results["gflops"][k], results["accuracy"][k]) for k in ids}
    plot_accuracy_vs_flops(panels, out / "accuracy_vs_gflops.png",
                           "Test accuracy against GFLOPs per image (thresholds fitted on the hold-out split; "
                           "lines: every threshold)")
    students = [f"student{k}" for k in range(1, len(labels["students"]) + 1)]
    best = max(students, key=lambda k: results["accuracy"][k])
    gains = {short[k]: [100 * (a - b) for a, b in zip(accs, results["per_class"][best])]
             for k, accs in results["per_class"].items() if k != best}
    plot_gain_table(gains, CLASSES, out / "per_class_gain.png",
                    f"Per-class test accuracy minus that of the best single student, {short[best]} (points)")
    plot_confusion(results["confusion_routed"], CLASSES, out / "routed_confusion.png",
                   f"{short['routed']}: confusion matrix (test set)")
    shares = {}
    for key, systems in results["routing_share_per_class"].items():
        prefix = key_prefix(key)
        for system, per_class in systems.items():
            title = short[prefix + system].removeprefix("specialists' ")
            shares[f"{pairs[key]}: {title}"] = {name: [s[k] for s in per_class]
                                                for k, name in enumerate(labels["pair_students"][key])}
    plot_grouped_bars(shares, CLASSES, out / "routing_share.png",
                      "Share of each class's test images each student ran on", "share of the class", columns=2)
