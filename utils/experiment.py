"""Every network of an experiment — teacher, students, their no-KD twins, selector, its shuffled-label control —
loaded from its checkpoint, and refused where they do not belong together."""

from pathlib import Path

from utils.checkpoint import load_checkpoint
from utils.choices import SPECIALISATIONS
from utils.cli import UserError
from utils.networks import Network
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
    """Every network of the experiment (``args``: teacher, students, selector, specialists and name), with its logits
    on the hold-out and test splits."""
    students = load_students(args.students, runtime, args.name)
    teacher = Network(args.teacher, "teacher", named("python teacherTrain.py", args.name), runtime, role="Teacher")
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
    """Where a method's specialists and their selector sit: beside the students and the selector."""
    return {"students": [Path(path).with_name(f"{Path(path).stem}_{method}.pt") for path in args.students],
            "selector": Path(args.selector).with_name(f"{Path(args.selector).stem}_{method}.pt")}


def specialist_method(args):
    """The method whose specialists the experiment routes beside the students: ``args.specialists``, or with
    ``auto`` the one whose specialists and selector exist (None where none does)."""
    if args.specialists == "none":
        return None
    methods = SPECIALISATIONS if args.specialists == "auto" else (args.specialists,)
    found = [m for m in methods if all(p.exists() for p in [*specialist_paths(args, m)["students"],
                                                           specialist_paths(args, m)["selector"]])]
    if args.specialists != "auto" and not found:
        paths = specialist_paths(args, args.specialists)
        missing = ", ".join(str(p) for p in [*paths["students"], paths["selector"]] if not p.exists())
        raise UserError(f"--specialists {args.specialists}: no {missing}; train them with "
                        f"`{named(f'python StudentTrain.py --with-specialists {args.specialists}', args.name)}` and "
                        f"`{named(f'python trainSelector.py --specialists {args.specialists}', args.name)}`")
    if len(found) > 1:
        raise UserError(f"the specialists of {' and '.join(found)} are both here; choose one with --specialists")
    return found[0] if found else None


def students_split(paths):
    """The ``Split`` the students share; refused if they differ."""
    splits = [Split.of(load_checkpoint(path, hint=STUDENT_HINT, kind="student")) for path in paths]
    for path, split in zip(paths[1:], splits[1:]):
        if split != splits[0]:
            raise UserError(f"{paths[0]} and {path} were trained on different splits ({splits[0]} and {split}); "
                            "train both students with the same --holdout, --split-seed and --limit")
    return splits[0]


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
