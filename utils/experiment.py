"""Every network of an experiment — teacher, students, their no-KD twins, selector, its shuffled-label control —
loaded from its checkpoint, and refused where they do not belong together."""

import re
from pathlib import Path

from utils.checkpoint import load_checkpoint
from utils.choices import SPECIALISATIONS
from utils.cli import UserError
from utils.networks import Network
from utils.published import published_paths, read_manifest
from utils.split import Split
from utils.trained import Networks, check_out_of_fold, check_selector_students

STUDENT_HINT = "python StudentTrain.py --model 1 2"


def named(command, name):
    """``command`` as run for the experiment ``name``: what a refusal tells the user to run."""
    return command + (f" --name {name}" if name else "")


def nokd_twin(path):
    twin = Path(path).with_name(Path(path).stem + "_nokd.pt")
    return twin if twin.exists() else None


def load_networks(args, runtime, data):
    """Every network of the experiment (``args``: teacher, students, selector, specialists and name; without a
    teacher, that of the bundle the published folder ``args.weights`` sits in), with its logits on the hold-out and
    test splits."""
    students = load_students(args.students, runtime, args.name)
    teacher = Network(args.teacher, "teacher", named("python teacherTrain.py", args.name), runtime, role="Teacher") \
        if args.teacher else bundle_teacher(args.weights)
    check_split(teacher, students[0].split)
    student_hint = named("python StudentTrain.py --no-kd", args.name)
    twins = [Network(twin, "student", student_hint, runtime, role=f"Student {k}")
             for k, twin in enumerate(map(nokd_twin, args.students), 1) if twin]
    selector, control = load_selectors(args.selector, students, runtime, args.name)
    networks = Networks(teacher, students, twins, selector, control)
    method = specialist_method(args)
    if method:
        paths = specialist_paths(args, method)
        networks.specialists = [Network(path, "student", named(f"python StudentTrain.py --with-specialists {method}",
                                                               args.name), runtime, role=f"Specialist {k}")
                                for k, path in enumerate(paths["students"], 1)]
        networks.spec_selector, networks.spec_control = load_selectors(
            paths["selector"], networks.specialists, runtime, args.name, f"Specialists' selector ({method})")
    for net in networks:
        if isinstance(net, Network):  # a bundle's teacher comes with its logits
            net.load_logits(data)
    return networks


def load_selectors(path, students, runtime, name, role="Selector"):
    """A selector and, where ``<stem>_shuffled.pt`` is beside it, its control trained on shuffled targets."""
    selector = load_selector(path, students, runtime, role=role, name=name)
    control_path = Path(path).with_name(Path(path).stem + "_shuffled.pt")
    control = load_selector(control_path, students, runtime, role=f"{role} on shuffled labels", name=name) \
        if control_path.exists() else None
    return selector, control


def specialist_paths(args, method):
    """Where a method's specialists and their selector sit: beside the students and the selector, or in the
    published folder ``args.weights`` (``spec1``..., ``spec_selector``: one method's, whichever it is)."""
    if getattr(args, "weights", None):
        paths = published_paths(args.weights)
        return {"students": [p for k, p in paths.items() if re.fullmatch(r"spec\d+", k)],
                "selector": paths.get("spec_selector")}
    return {"students": [Path(path).with_name(f"{Path(path).stem}_{method}.pt") for path in args.students],
            "selector": Path(args.selector).with_name(f"{Path(args.selector).stem}_{method}.pt")}


def specialist_method(args):
    """The method whose specialists the experiment routes beside the students: ``args.specialists``, or with
    ``auto`` the one whose specialists and selector exist (None where none does)."""
    if args.specialists == "none":
        return None
    if getattr(args, "weights", None):
        found = [entry["specialist"]["method"] for k, entry in read_manifest(args.weights)["networks"].items()
                 if k == "spec1" and entry.get("specialist")]
    else:
        methods = SPECIALISATIONS if args.specialists == "auto" else (args.specialists,)
        found = [m for m in methods if all(Path(p).exists() for p in [*specialist_paths(args, m)["students"],
                                                                     specialist_paths(args, m)["selector"]])]
    if args.specialists not in ("auto", *found):
        where = args.weights or ", ".join(str(p) for p in [*specialist_paths(args, args.specialists)["students"],
                                                           specialist_paths(args, args.specialists)["selector"]])
        raise UserError(f"--specialists {args.specialists}: no such specialists in {where}; train them with "
                        f"`{named(f'python StudentTrain.py --with-specialists {args.specialists}', args.name)}` and "
                        f"`{named(f'python trainSelector.py --specialists {args.specialists}', args.name)}`")
    if len(found) > 1:
        raise UserError(f"the specialists of {' and '.join(found)} are both here; choose one with --specialists")
    return found[0] if found else None


def students_split(paths, name=""):
    """The ``Split`` the students share; refused if they differ, or if they were trained on different data (other
    CIFAR-10 pixels: their hold-out logits would not be of the same images). ``name``: the experiment, for errors."""
    checkpoints = [load_checkpoint(path, hint=named(STUDENT_HINT, name), kind="student") for path in paths]
    splits = [Split.of(checkpoint) for checkpoint in checkpoints]
    for path, split, checkpoint in zip(paths[1:], splits[1:], checkpoints[1:]):
        if split != splits[0]:
            raise UserError(f"{paths[0]} and {path} were trained on different splits ({splits[0]} and {split}); "
                            "train both students with the same --holdout, --split-seed and --limit")
        first, this = (c.get("data_fingerprint") for c in (checkpoints[0], checkpoint))
        if this != first:
            raise UserError(f"{paths[0]} and {path} were trained on different CIFAR-10 pixels (data fingerprints "
                            f"{str(first)[:12]} and {str(this)[:12]}); train both students on the same copy of the "
                            "data")
    return splits[0]


def check_split(network, split):
    """Refuse a network (a teacher beside the students) trained on another split than ``split``: it would have
    seen the students' hold-out images, or been measured on other test images."""
    if network.split != split:
        raise UserError(f"{network.path} was trained with {network.split}, and the students with {split}; give "
                        "networks of one experiment (the same --holdout, --split-seed and --limit)")


def bundle_teacher(weights):
    """The teacher of the results bundle a published folder ``weights`` sits in (``<bundle>/weights/``), as a
    ``Trained``: its record and its logits as that run measured them, no weights."""
    from utils.bundle import read_bundle  # numpy: only where a bundle is read

    bundle = Path(weights).parent
    if not (bundle / "results.json").is_file():
        raise UserError(f"{weights} holds no teacher weights and is not inside a results bundle (no "
                        f"{bundle / 'results.json'}); give --teacher, or publish with --with-teacher")
    results, networks = read_bundle(bundle)
    return networks[results["layout"]["teacher"]]


def load_students(paths, runtime, name=""):
    """The students as ``Network``s, in routing order."""
    if len(paths) < 2:
        raise UserError(f"the selector chooses between at least 2 students; --students gave {len(paths)}")
    hint = named(STUDENT_HINT, name)
    return [Network(path, "student", hint, runtime, role=f"Student {k}") for k, path in enumerate(paths, 1)]


def load_teacher_of(student, runtime):
    """The teacher a student (a ``Network``) learned from, as its checkpoint records it."""
    record = student.checkpoint.get("teacher")
    if not record:
        raise UserError(f"{student.path} learned from no teacher; an mcl assignment needs the teacher it learned from")
    teacher = Network(record["path"], "teacher", "python teacherTrain.py", runtime, role="Teacher")
    if teacher.checkpoint["weights_sha256"] != record["weights_sha256"]:
        raise UserError(f"{record['path']} is not the teacher {student.path} learned from (its weights changed since); "
                        "retrain the students, or restore that teacher")
    return teacher


def load_selector(path, students, runtime, role="Selector", name=""):
    """The selector as a ``Network`` whose hold-out logits are its out-of-fold scores; refused if it was trained
    for other students or without them. ``name``: the experiment, for the command a refusal names."""
    selector = Network(path, "selector", named("python trainSelector.py", name), runtime, role=role)
    check_selector_students(selector.checkpoint, path, students)
    check_out_of_fold(selector.checkpoint, path)
    return selector
