"""Where a run's files live, and what keeps them safe.

A training run writes, beside its checkpoint ``<stem>.pt``: ``<stem>.last.pt`` (resume
state), ``<stem>.metrics.jsonl``, ``<stem>.curves.png`` and ``<stem>.config.json`` (flags,
versions, git commit, device: ``utils.provenance``). ``--name NAME`` puts every stage of an experiment in
``checkpoints/NAME/``. Before any data is decoded, ``prepare_run`` makes sure the folder can be
written, locks the run's output against a second run (``<stem>.lock``), and refuses to replace an
existing run unless ``--resume`` or ``--force`` says what to do.
"""

import contextlib
import contextvars
import glob
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from utils import lock
from utils.cli import UserError, on_failure
from utils.recipes import STUDENTS

CHECKPOINT_ROOT = Path("checkpoints")
RESULTS_ROOT = Path("results")
# Flags that may differ between a run and its --resume (or a stage and its rerun) without changing the result.
# --minutes too: a time-boxed run records the epochs it chose, and a rerun or resume keeps them.
RUN_CONTROL_FLAGS = frozenset({"resume", "force", "time_budget", "minutes", "save_every", "log_every", "compile",
                               "device", "download", "data_dir", "checkpoint", "name", "command"})


def default_checkpoint(name, stem):
    """``checkpoints/<name>/<stem>.pt`` (``checkpoints/<stem>.pt`` without a name)."""
    return str(CHECKPOINT_ROOT / name / f"{stem}.pt")


def experiments_holding(filename):
    """``--name smoke, --name cpu``: how to choose each experiment whose folder in ``checkpoints/`` holds a file
    ``filename`` (``no --name`` for ``checkpoints/`` itself); "" where none does."""
    folders = sorted({p.parent for p in CHECKPOINT_ROOT.glob(f"**/{filename}") if p.is_file()})
    return ", ".join("no --name" if f == CHECKPOINT_ROOT else f"--name {f.relative_to(CHECKPOINT_ROOT).as_posix()}"
                     for f in folders)


def student_stem(arch, kd=True, specialise=None):
    """``student_densenet121`` (with KD), ``student_densenet121_nokd`` or, a specialist of a method,
    ``student_densenet121_mcl``."""
    return f"student_{arch}" + (f"_{specialise}" if specialise else "" if kd else "_nokd")


def default_students(name="", specialise=None):
    """The default student checkpoints of experiment ``name`` (the specialists of a method, with ``specialise``), in
    the order of ``STUDENTS``."""
    return [default_checkpoint(name, student_stem(arch, specialise=specialise)) for arch in STUDENTS.values()]


def selector_stem(specialise=None, shuffled=False):
    """``selector``, the selector of a method's specialists ``selector_mcl``, and their controls ``..._shuffled``."""
    return "selector" + (f"_{specialise}" if specialise else "") + ("_shuffled" if shuffled else "")


def config_changes(old, new):
    """The flags whose values differ between two configs (dicts of flags), run-control flags aside.

    Only flags that both configs have count: a flag added to a script since ``old`` was written
    does not make it different.
    """
    return [k for k, v in new.items() if k not in RUN_CONTROL_FLAGS and k in old and old[k] != v]


def resume_command(command):
    """``args.command`` as the command that continues its run: with ``--resume``, without ``--force``."""
    words = [word for word in shlex.split(command) if word != "--force"]
    return shlex.join(words + ["--resume"] * ("--resume" not in words))


def continue_pipeline_command(command):
    """The command that continues a pipeline stopped in a stage: its own, without what retrains stages again."""
    words = shlex.split(command)
    kept = [w for k, w in enumerate(words) if w not in ("--force", "--retrain-from")
            and not w.startswith("--retrain-from=") and (k == 0 or words[k - 1] != "--retrain-from")]
    return shlex.join(kept)


_OUTER_COMMAND = contextvars.ContextVar("outer_command", default=None)


@contextlib.contextmanager
def continued_by(command):
    """Within it, a stopped stage tells the user to run ``command`` (``reproduce.py``'s own) to continue."""
    token = _OUTER_COMMAND.set(command)
    try:
        yield
    finally:
        _OUTER_COMMAND.reset(token)


def outer_command():
    """The command of the larger work this runs within (``continued_by``), or None."""
    return _OUTER_COMMAND.get()


def continue_command(command, saved=True):
    """The command that continues work stopped in ``command``: the pipeline's that runs it (``continued_by``), or its
    own: with ``--resume`` where the work ``saved`` what a resume needs, as it is where it saved nothing."""
    return outer_command() or (resume_command(command) if saved else command)


_BUILT_FOR = contextvars.ContextVar("built_for", default=None)


@contextlib.contextmanager
def built_for(staged, out):
    """Within it, a path in ``staged``, where a bundle is built to take the place of ``out`` once complete, is printed
    and recorded as the path it will have in ``out`` (``final_path``, ``final_command``)."""
    token = _BUILT_FOR.set((Path(staged), Path(out)))
    try:
        yield
    finally:
        _BUILT_FOR.reset(token)


def final_path(path):
    """``path`` as a user will find it: in ``out`` where it is in the ``staged`` folder of ``built_for``."""
    path, built = Path(path), _BUILT_FOR.get()
    if built and (path == built[0] or built[0] in path.parents):
        return built[1] / path.relative_to(built[0])
    return path


def final_command(command):
    """``command`` with each path in a ``built_for`` folder as the path it will have (``final_path``)."""
    words = shlex.split(command)
    return shlex.join(w if final_path(w) == Path(w) else str(final_path(w)) for w in words)


@dataclass(frozen=True)
class RunFiles:
    best: Path
    last: Path
    log: Path
    plot: Path
    config: Path

    @classmethod
    def of(cls, checkpoint):
        best = Path(checkpoint)
        stem = best.name.removesuffix(".pt")
        return cls(best, *(best.with_name(f"{stem}.{suffix}")
                           for suffix in ("last.pt", "metrics.jsonl", "curves.png", "config.json")))

    def __iter__(self):
        return iter((self.best, self.last, self.log, self.plot, self.config))

    @property
    def lock(self):
        """``<stem>.lock``: held by the process writing the run (``utils.lock``); not one of the run's files."""
        return self.best.with_name(f"{self.best.name.removesuffix('.pt')}.lock")


def _missing_folders(folder):
    """The folders on the way to ``folder``, itself included, that do not exist yet, outermost first."""
    return [p for p in (*reversed(folder.parents), folder) if not p.exists()]


def _remove_empty(folders):
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:  # no longer empty, or already gone
            pass


def make_output_folder(folder, flag):
    """Create ``folder`` (and its parents) and write a probe file in it; return the folders created,
    outermost first. A failure is one line naming the folder and ``flag``, and leaves no folder behind."""
    folder = Path(folder)
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"cannot create the output folder {folder}: {blocker} is a file; choose another {flag}")
    created = _missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(created)
        raise UserError(f"cannot create the output folder {folder} ({e.strerror or e}); choose another {flag}") \
            from None
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
    except OSError as e:
        _remove_empty(created)
        raise UserError(f"cannot write in {folder} ({e.strerror or e}); free some space or choose another {flag}") \
            from None
    finally:
        probe.unlink(missing_ok=True)
    return created


def check_output_folder(folder, flag):
    """Refuse in one line, before any work, an output folder that cannot be created or written (a file in
    its way, no permission, a full disk); leaves the file system as it was."""
    _remove_empty(make_output_folder(folder, flag))


def check_output_file(path, force, flag="--out"):
    """Refuse in one line, before any work, an output file that is a folder, exists without ``force``, or cannot be
    written (``check_output_folder``)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file, such as {path / 'figures.json'}")
    if path.exists() and not force:
        raise UserError(f"{flag} {path} already exists; add --force to replace it, or choose another {flag}")
    check_output_folder(path.parent, flag)


def check_free_space(folder, needed_bytes):
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise UserError(f"only {free / 2**20:.0f} MiB free in {folder}, and this run's checkpoints need about "
                        f"{needed_bytes / 2**20:.0f} MiB; free some space or choose another --checkpoint or --name")


def _is_complete(path):
    import torch  # here, not above: the training scripts' flags are checked before torch is imported

    try:
        return bool(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("complete"))
    except Exception:  # unreadable: not a complete run, whatever it is
        return False


def replaced_folder(files):
    """``.<stem>.replaced/`` beside a run: where the run that ``--force`` replaces waits until the new one saves."""
    return files.best.with_name(f".{files.best.name.removesuffix('.pt')}.replaced")


@dataclass
class _Unsaved:
    """A run of this process that has not saved yet: its files, the folder its predecessor waits in, the folders
    it created, and the run it is a part of (a selector's fold run: its saving counts as that run's)."""

    files: RunFiles
    aside: Path | None
    created: list
    part_of: RunFiles | None = None
    fresh: bool = True  # a new run (not a resumed one): a failure before its first save leaves none of its files


_UNSAVED = {}  # absolute checkpoint path -> _Unsaved


def prepare_run(args, is_main=True, extra=(), part_of=None):
    """The run's files, after checking that they may be written; call before decoding data.

    The main process locks the run's output (``RunFiles.lock``) until the run ends: a second run on
    the same files is refused. Without ``--resume`` or ``--force`` an existing run is never replaced.
    With ``--force`` the old run's files (and its ``extra`` paths, such as a selector's fold runs) are
    moved aside, so that nothing of it mixes with the new one, and deleted only once the new run has
    saved (``run_saved``); a run that fails or is refused before that is undone (``undo_unsaved``):
    its own files removed, the old run put back, no folder or lock left behind. A forced run killed
    before its first save is undone by the next ``prepare_run`` on its files. ``part_of``: the files of the
    run this one is a part of, whose predecessor is deleted once this one saves.
    """
    files = RunFiles.of(args.checkpoint)
    if not is_main:  # other processes of a torchrun job neither write nor lock
        check_existing_run(files, args)
        return files
    created = make_output_folder(files.best.parent, "--checkpoint or --name")
    try:
        lock.acquire(files.lock)
        _put_back(files, extra)
        check_existing_run(files, args)
    except UserError:
        lock.release(files.lock)
        _remove_empty(created)
        raise
    aside = None
    if not args.resume and any(path.exists() for path in [*files, *map(Path, extra)]):
        aside = replaced_folder(files)
        aside.mkdir()
        for path in [*files, *map(Path, extra)]:
            if path.exists():
                os.replace(path, aside / path.name)
    for path in files:  # temporary files that a killed write left behind (this process holds the run's lock)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    _UNSAVED[files.best.absolute()] = _Unsaved(files, aside, created, part_of, fresh=not args.resume)
    return files


def run_saved(files):
    """The run of ``files`` has saved: the run it replaced is deleted, and a failure no longer undoes it (nor the
    run it is a part of)."""
    unsaved = _UNSAVED.pop(Path(files.best).absolute(), None)
    if unsaved is None:
        return
    if unsaved.aside and unsaved.aside.exists():
        deleted = unsaved.aside.with_name(unsaved.aside.name + ".deleted")  # a kill while deleting leaves no part
        shutil.rmtree(deleted, ignore_errors=True)  # of it where _put_back would take it for a run to put back
        os.replace(unsaved.aside, deleted)
        shutil.rmtree(deleted)
    if unsaved.part_of is not None:
        run_saved(unsaved.part_of)


def undo_unsaved():
    """Every run of this process that has not saved yet (a refusal, an error): its files removed, the run it
    replaced put back, the folders it created removed, its lock released."""
    for unsaved in list(_UNSAVED.values()):
        for path in unsaved.files if unsaved.fresh else ():
            path.unlink(missing_ok=True)
        _put_back(unsaved.files)
        lock.release(unsaved.files.lock)
        _remove_empty(unsaved.created)
    _UNSAVED.clear()


def _put_back(files, extra=()):
    """Put a replaced run back where it was (from ``replaced_folder``), replacing what stands there now."""
    aside = replaced_folder(files)
    if not aside.is_dir():
        return
    for moved in aside.iterdir():
        target = files.best.with_name(moved.name)
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(moved, target)
    aside.rmdir()


on_failure(undo_unsaved)


def check_existing_run(files, args):
    """Refuse ``--resume`` without a resume state, and an existing run without ``--resume`` or ``--force``."""
    if args.resume:
        if not files.last.exists():
            start = "start it again with --force" if files.best.exists() else "start the run without --resume"
            raise UserError(f"nothing to resume: no {files.last}; {start}")
    elif (files.best.exists() or files.last.exists()) and not args.force:
        run = files.best.parent / files.best.stem
        if not files.last.exists():  # stopped before its first resume state was written
            raise UserError(f"{run}.* already holds an unfinished run that cannot be resumed (no {files.last}); "
                            "add --force to start it again, or write elsewhere with --name or --checkpoint")
        what = "a complete run" if _is_complete(files.best) else "an unfinished run"
        raise UserError(f"{run}.* already holds {what}; add --resume to continue it, --force to replace it, "
                        "or write elsewhere with --name or --checkpoint")


def write_atomically(path, write):
    """``write(temporary path)`` beside ``path``, then rename it to ``path``: a failure (a full disk) leaves the old
    file or none, and is one line saying which."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        kept = "the previous file is kept" if path.exists() else "nothing was written"
        raise UserError(f"could not write {path} ({e.strerror or e}); {kept}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_folder_atomically(folder, write):
    """``write(temporary folder)`` beside ``folder``, then put it in ``folder``'s place (the old one, if any, deleted
    only after, and put back where the new one could not take its place): a failure leaves the old folder or none,
    and is one line saying which. The caller makes sure that ``folder`` holds nothing else worth keeping."""
    folder = Path(folder)
    tmp, old = _beside(folder, "tmp"), _beside(folder, "old")
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    except OSError as e:
        if old.exists() and not folder.exists():
            os.replace(old, folder)
        kept = "the previous one is kept" if folder.exists() else "nothing was written"
        raise UserError(f"could not write {folder} ({e.strerror or e}); {kept}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def write_files_atomically(folder, write):
    """``write(temporary folder)`` beside ``folder``, then move each file it wrote into ``folder``, replacing those of
    the same names and no other entry of ``folder`` (other runs' folders, published weights): a failure while
    writing leaves ``folder`` as it was, and is one line saying so."""
    folder = Path(folder)
    tmp, moved = _beside(folder, "tmp"), 0
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(tmp.iterdir()):
            os.replace(path, folder / path.name)
            moved += 1
    except OSError as e:
        done = f"{moved} of its files had taken their place" if moved else "nothing there was replaced"
        raise UserError(f"could not write the results in {folder} ({e.strerror or e}); {done}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _beside(folder, kind):
    """A hidden folder beside ``folder`` for this process, emptied: the same file system, so a rename is atomic.
    Those that processes killed outright left there are removed, but for a replaced folder whose replacement never
    took its place."""
    folder = folder.resolve()  # "." has no name to put beside
    for left in folder.parent.glob(f".{glob.escape(folder.name)}.*.{kind}"):
        pid = left.name[len(folder.name) + 2:-len(kind) - 1]
        if pid.isdigit() and (int(pid) == os.getpid() or not lock.is_running(int(pid))):
            if kind == "tmp" or folder.exists():
                shutil.rmtree(left, ignore_errors=True)
    return folder.with_name(f".{folder.name}.{os.getpid()}.{kind}")
