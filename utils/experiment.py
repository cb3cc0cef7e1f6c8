"""Every network of an experiment — teacher, students, their no-KD twins, selector, its shuffled-label control —
loaded from its checkpoint, and refused where they do not belong together."""

from pathlib import Path

from utils.checkpoint import load_checkpoint
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
    """Every network of the experiment (``args``: teacher, students, selector and name; without a teacher, that of
    the bundle the published folder ``args.weights`` sits in), with its logits on the hold-out and test splits."""
    students = load_students(args.students, runtime, args.name)
    teacher = Network(args.teacher, "teacher", named("python teacherTrain.py", args.name), runtime, role="Teacher") \
        if args.teacher else bundle_teacher(args.weights)
    check_split(teacher, students[0].split)
    student_hint = named("python StudentTrain.py --no-kd", args.name)
    twins = [Network(twin, "student", student_hint, runtime, role=f"Student {k}")
             for k, twin in enumerate(map(nokd_twin, args.students), 1) if twin]
    selector = load_selector(args.selector, students, runtime, name=args.name)
    control_path = Path(args.selector).with_name(Path(args.selector).stem + "_shuffled.pt")
    control = load_selector(control_path, students, runtime, role="Selector on shuffled labels", name=args.name) \
        if control_path.exists() else None
    networks = Networks(teacher, students, twins, selector, control)
    for net in networks:
        if isinstance(net, Network):  # a bundle's teacher comes with its logits
            net.load_logits(data)
    return networks


def students_split(paths):
    """The ``Split`` the students share; refused if they differ, or if they were trained on different data (other
    CIFAR-10 pixels: their hold-out logits would not be of the same images)."""
    checkpoints = [load_checkpoint(path, hint=STUDENT_HINT, kind="student") for path in paths]
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


def load_selector(path, students, runtime, role="Selector", name=""):
    """The selector as a ``Network`` whose hold-out logits are its out-of-fold scores; refused if it was trained
    for other students or without them. ``name``: the experiment, for the command a refusal names."""
    selector = Network(path, "selector", named("python trainSelector.py", name), runtime, role=role)
    check_selector_students(selector.checkpoint, path, students)
    check_out_of_fold(selector.checkpoint, path)
    return selector
