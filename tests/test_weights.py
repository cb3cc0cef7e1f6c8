"""Published weights (utils/weights.py, publish.py): what they hold, that they load as their networks, that every
entry point takes them, that a changed file or one that would mix is refused, and that they and the repository stay
small enough to travel."""

import json
import os
import shutil
import subprocess
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import inference
import predict
import publish
import trainSelector
import utils.data
from models import build_model
from tests.conftest import PUBLISHED, REPO, one_error_line
from utils.bundle import handed_back
from utils.checkpoint import clean_state_dict, load_checkpoint, save_checkpoint
from utils.cli import UserError
from utils.distill import load_teacher
from utils.export import file_name
from utils.networks import Network
from utils.published import FORMAT, MANIFEST, published_paths, refuse_existing
from utils.runtime import Runtime
from utils.weights import MAX_FILE_BYTES, pack, published_record, sha256, write_folder

CPU = Runtime(torch.device("cpu"))
SPLIT = {"holdout": 5000, "split_seed": 0, "limit": 0}


def random_checkpoint(arch, kind="student", num_classes=10, split=SPLIT, fingerprint="f" * 64):
    """The checkpoint of a network of ``arch`` at random initialisation, of ``split`` and data ``fingerprint``."""
    torch.manual_seed(0)
    return {"kind": kind, "arch": arch, "num_classes": num_classes, "split": split, "data_fingerprint": fingerprint,
            "model": clean_state_dict(build_model(arch, num_classes)), "complete": True, "epoch": 1, "epochs": 1,
            "config": {"tta": "none"}}


def publish_checkpoints(folder, checkpoints):
    """A published folder of ``{id: checkpoint}`` as publish.py writes one, each file with hold-out logits of its
    split's size (random), and a manifest of their sha256: the format without the measurements."""
    files, entries = {}, {}
    for k, checkpoint in checkpoints.items():
        n = checkpoint["split"]["holdout"]
        record = published_record(checkpoint, torch.randn(n, checkpoint["num_classes"]),
                                  torch.arange(n) % 10, {"path": f"{k}.pt", "weights_sha256": "-"})
        name = file_name(k, checkpoint["arch"])
        files[name] = pack(record)
        entries[k] = {"file": name, "sha256": sha256(files[name]), "bytes": len(files[name])}
    write_folder(folder, files, {"format": FORMAT, "networks": entries})
    return files


@pytest.fixture
def published(smoke_run, tmp_path):
    """A copy of the smoke pipeline's published weights, inside a copy of its bundle."""
    root, data = smoke_run
    bundle = tmp_path / "bundle"
    shutil.copytree(root / "results" / "smoke" / "bundle", bundle)
    return bundle / "weights", data


def contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# ----------------------------------------------------------------------------- the format

@pytest.mark.parametrize("arch,num_classes", [("densenet121", 10), ("googlenet", 10), ("selector", 2)])
def test_published_weights_load_as_the_network_rounded_to_bf16(arch, num_classes, tmp_path):
    kind = "selector" if arch == "selector" else "student"
    checkpoint = random_checkpoint(arch, kind, num_classes)
    publish_checkpoints(tmp_path / "weights", {"net": checkpoint})
    path = tmp_path / "weights" / f"net-{arch}.pt.gz"
    loaded = load_checkpoint(path, hint="", kind=kind)
    assert "optimizer" not in loaded and loaded["complete"]
    for name, value in checkpoint["model"].items():
        expected = value.to(torch.bfloat16).float() if value.is_floating_point() else value
        assert loaded["model"][name].dtype == expected.dtype and torch.equal(loaded["model"][name], expected), name
    x = torch.randn(4, 3, 32, 32)
    original = build_model(arch, num_classes).eval()
    original.load_state_dict(checkpoint["model"])
    with torch.no_grad():
        before, after = original(x), Network(path, kind, "", CPU)(x)
    assert not torch.equal(before, after)  # rounded ...
    assert torch.allclose(before, after, rtol=0.05, atol=0.05 * before.abs().max().item())  # ... to bf16 only


def test_densenet121_googlenet_and_the_selector_fit_a_published_file_and_a_gpu_job_s_hand_back(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(PUBLISHED, bundle)
    checkpoints = {"student1": random_checkpoint("densenet121"), "student2": random_checkpoint("googlenet"),
                   "selector": random_checkpoint("selector", "selector", 2)}
    files = publish_checkpoints(bundle / "weights", checkpoints)
    assert all(len(data) <= MAX_FILE_BYTES for data in files.values()), {k: len(v) for k, v in files.items()}
    outputs, within = handed_back(bundle)
    assert within and len(outputs) == 5, outputs  # the bundle as one tar, the manifest, three networks


def test_a_changed_truncated_or_missing_published_file_is_refused_in_one_line_naming_it(published, capsys):
    weights, data = published
    student = weights / "student2-googlenet.pt.gz"
    good = student.read_bytes()

    def evaluated():
        evaluate.main([str(student), "--data-dir", str(data), "--partial-data", "--device", "cpu"])

    student.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    assert one_error_line(evaluated, capsys).startswith(f"error: {student} was changed or truncated")
    student.write_bytes(good[:-10])
    assert one_error_line(evaluated, capsys).startswith(f"error: {student} was changed or truncated")
    student.unlink()
    line = one_error_line(lambda: inference.main(["--weights", str(weights), "--device", "cpu"]), capsys)
    assert line.startswith(f"error: {student} is missing (listed in {weights / MANIFEST})")
    student.write_bytes(good)
    (weights / MANIFEST).unlink()
    assert one_error_line(evaluated, capsys).startswith(f"error: {weights} is not a published weights folder")


# ----------------------------------------------------------------------------- what publish.py writes

def test_reproduce_publishes_students_and_selector_measured_as_evaluation_measures_them(smoke_run, published,
                                                                                          tmp_path):
    weights, data = published
    manifest = json.loads((weights / MANIFEST).read_text())
    networks = ["student1", "student2", "selector", "spec1", "spec2", "spec_selector"]
    assert list(manifest["networks"]) == networks  # no teacher unless asked for
    assert manifest["precision"] == "bfloat16" and manifest["split"] == {"holdout": 100, "split_seed": 0, "limit": 20}
    before = contents(weights)
    out = tmp_path / "evaluation.json"
    paths = [str(weights / manifest["networks"][k]["file"]) for k in ("student1", "student2")]
    evaluate.main([*paths, "--data-dir", str(data), "--partial-data", "--device", "cpu", "--out", str(out)])
    evaluation = json.loads(out.read_text())
    for k, path in zip(("student1", "student2"), paths):
        entry = manifest["networks"][k]
        assert entry["accuracy"]["test"] == evaluation[path]["accuracy"]
        assert entry["accuracy"]["holdout"] == evaluation[path]["holdout_accuracy"]
        assert entry["trained"]["path"] == f"checkpoints/smoke/student_{entry['arch']}.pt" and entry["tta"] == "none"
    assert contents(weights) == before  # nothing cached into a published folder


def test_publish_refuses_to_replace_a_published_folder_before_reading_anything(smoke_run, capsys, monkeypatch):
    root, data = smoke_run
    monkeypatch.chdir(root)
    monkeypatch.setattr(utils.data, "load_cifar10", lambda *a, **k: pytest.fail("data read"))
    line = one_error_line(lambda: publish.main(["--name", "smoke", "--out", "results/smoke/bundle/weights"]), capsys)
    assert line == "error: results/smoke/bundle/weights already holds published weights; add --force to replace " \
                   "them, or choose another --out"


def test_a_signal_while_publishing_writes_nothing_and_prints_the_command_that_goes_on(smoke_run, capsys,
                                                                                        monkeypatch):
    import signal

    import utils.networks

    root, data = smoke_run
    monkeypatch.chdir(root)
    real = utils.networks.batched_logits

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(utils.networks, "batched_logits", interrupted)
    argv = ["--name", "smoke", "--data-dir", str(data), "--partial-data", "--device", "cpu", "--out", "stopped"]
    with pytest.raises(SystemExit) as stop:
        publish.main(argv)
    assert stop.value.code == 128 + signal.SIGTERM and not (root / "stopped").exists()
    assert capsys.readouterr().out.rstrip().endswith("SIGTERM: stopped while measuring the published weights "
                                                     "(nothing was written); continue with: python publish.py "
                                                     + " ".join(argv))


def test_force_replaces_a_folder_of_published_weights_and_nothing_else(tmp_path):
    weights, bundle, empty = (tmp_path / k for k in ("weights", "bundle", "empty"))
    for folder, names in [(weights, [MANIFEST, "selector.pt.gz"]), (bundle, ["results.json", MANIFEST])]:
        folder.mkdir()
        for name in names:
            (folder / name).write_text("{}")
    empty.mkdir()
    for out, force in [(weights, True), (empty, False), (tmp_path / "new", False)]:
        refuse_existing(out, force)  # no refusal
    with pytest.raises(UserError, match="already holds published weights; add --force"):
        refuse_existing(weights, force=False)
    for out, held in [(bundle, "holds results.json, which is not published weights"),
                      (weights / MANIFEST, "is a file")]:
        with pytest.raises(UserError) as e:
            refuse_existing(out, force=True)
        assert str(e.value) == f"{out} {held}; publish.py replaces only a folder of published weights, even with " \
                               "--force: choose another --out"


def both_pairs(folder, holdout_accuracy):
    """A published folder of both pairs (small random networks), in a bundle whose results.json gives each pair's
    routed systems these hold-out accuracies (``{"generalists": [...], "spec:": [...]}``, one per budget)."""
    ids = ["student1", "student2", "selector", "spec1", "spec2", "spec_selector"]
    files = publish_checkpoints(folder, {k: random_checkpoint("selector", num_classes=2) for k in ids})
    policy = {"generalists": "selector", "spec:": "spec:selector"}
    budgets = {f"{b:g}": {pair: {"policy": policy[pair], "holdout_accuracy": accs[k]}
                          for pair, accs in holdout_accuracy.items()} for k, b in enumerate((1, 1.25))}
    (folder.parent / "results.json").write_text(json.dumps({"pairs": {"budgets": budgets}}))
    return files


def test_a_folder_keeps_the_pair_best_on_the_hold_out_split_byte_for_byte_as_the_routed_students(tmp_path,
                                                                                                  capsys):
    weights = tmp_path / "bundle" / "weights"
    files = both_pairs(weights, {"generalists": [0.90, 0.91], "spec:": [0.89, 0.915]})
    publish.main(["--from", str(weights), "--pair", "best", "--force"])
    manifest = json.loads((weights / MANIFEST).read_text())
    assert manifest["pair"] == "specialists"
    assert {k: e["file"] for k, e in manifest["networks"].items()} == {
        "student1": "spec1-selector.pt.gz", "student2": "spec2-selector.pt.gz",
        "selector": "spec_selector.pt.gz"}
    kept = contents(weights)
    assert sorted(kept) == sorted([MANIFEST, *(e["file"] for e in manifest["networks"].values())])
    assert all(kept[name] == files[name] for name in kept if name != MANIFEST)  # byte for byte
    assert "specialists 91.50% (spec:selector at 1.25x); keeping the specialists" in capsys.readouterr().out
    for path in published_paths(weights).values():
        load_checkpoint(path, hint="")  # each file checked against the new manifest

    both_pairs(tmp_path / "tie" / "weights", {"generalists": [0.91, 0.90], "spec:": [0.91, 0.91]})
    publish.main(["--from", str(tmp_path / "tie" / "weights"), "--pair", "best", "--out", str(tmp_path / "kept")])
    assert json.loads((tmp_path / "kept" / MANIFEST).read_text())["pair"] == "generalists"  # a tie: the generalists


def test_keeping_a_pair_refuses_a_changed_file_or_a_missing_pair_and_leaves_the_folder_as_it_was(tmp_path, capsys):
    weights = tmp_path / "bundle" / "weights"
    files = both_pairs(weights, {"generalists": [0.9, 0.9], "spec:": [0.8, 0.8]})
    spec = weights / "spec2-selector.pt.gz"
    spec.write_bytes(files[spec.name][:-1])
    before = contents(weights)
    line = one_error_line(lambda: publish.main(["--from", str(weights), "--pair", "specialists", "--force"]), capsys)
    assert line.startswith(f"error: {spec} was changed or truncated")
    assert contents(weights) == before
    publish.main(["--from", str(weights), "--pair", "generalists", "--out", str(tmp_path / "kept")])
    line = one_error_line(lambda: publish.main(["--from", str(tmp_path / "kept"), "--pair", "specialists",
                                                "--out", str(tmp_path / "again")]), capsys)
    assert line == f"error: {tmp_path / 'kept'} holds no specialists with their selector (spec1..., spec_selector); " \
                   "its networks: student1, student2, selector"
    line = one_error_line(lambda: publish.main(["--from", str(weights), "--pair", "best"]), capsys)
    assert line.startswith(f"error: {weights} already holds published weights; add --force")
    for pair in ("best", "generalists"):  # not a published folder, whichever pair is asked for
        line = one_error_line(lambda: publish.main(["--from", str(tmp_path / "nowhere"), "--pair", pair]), capsys)
        assert line.startswith(f"error: {tmp_path / 'nowhere'} is not a published weights folder (no manifest.json)")


# ----------------------------------------------------------------------------- every entry point

def test_inference_evaluates_published_weights_with_the_bundle_s_teacher_and_matches_the_manifest(published,
                                                                                                  tmp_path, capsys):
    weights, data = published
    out = tmp_path / "results"
    inference.main(["--weights", str(weights), "--device", "cpu", "--data-dir", str(data), "--partial-data",
                    "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    bundle = json.loads((weights.parent / "results.json").read_text())
    assert results["teacher_from_bundle"] == str(weights.parent) and "costs" not in results
    assert results["accuracy"]["teacher"] == bundle["accuracy"]["teacher"]
    compared = results["published_weights"]["test_accuracy"]
    assert set(compared) == {"student1", "student2", "selector", "spec1", "spec2", "spec_selector"}
    assert all(acc["here"] == acc["manifest"] for acc in compared.values())  # the same CPU arithmetic
    printed = capsys.readouterr().out
    assert f"published weights {weights}: test accuracy here, and in the manifest" in printed
    assert "The teacher's figures are the logits of the bundle" in (out / "results.md").read_text()


def test_predict_uses_the_newest_published_weights_and_needs_no_data(published, tmp_path, capsys, monkeypatch):
    weights, _ = published
    for name in ("h200-2026-11-28", "h100-2027-01-05", "a100-2026-12-31"):
        shutil.copytree(weights, tmp_path / "results" / "published" / name / "weights")
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(utils.data, "load_cifar10", lambda *a, **k: pytest.fail("data read"))
    predict.main([str(image), "--device", "cpu"])
    first, line = capsys.readouterr().out.strip().splitlines()
    assert first.startswith("using the published weights results/published/h100-2027-01-05/weights (students "
                            "densenet121, googlenet and the selector, trained at commit ")
    assert line.startswith(f"{image}: ") and " confidence " in line and "(ran student " in line
    shutil.rmtree(tmp_path / "results")
    assert one_error_line(lambda: predict.main([str(image), "--device", "cpu"]), capsys).startswith(
        "error: no published weights in results/published/*/weights/ and no trained checkpoints in checkpoints/")
    (tmp_path / "checkpoints" / "smoke").mkdir(parents=True)
    (tmp_path / "checkpoints" / "smoke" / "selector.pt").write_bytes(b"")
    assert one_error_line(lambda: predict.main([str(image), "--device", "cpu"]), capsys).endswith(
        "--weights FOLDER (experiments with a selector: --name smoke)")


def test_a_folder_that_keeps_the_specialists_routes_them_as_its_students(published, tmp_path, capsys):
    weights, data = published
    kept = tmp_path / "bundle" / "kept"
    publish.main(["--from", str(weights), "--pair", "specialists", "--out", str(kept)])
    image = tmp_path / "cat.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    capsys.readouterr()
    predict.main([str(image), "--weights", str(kept), "--device", "cpu"])
    assert f"using the published weights {kept} (mcl specialists densenet121, googlenet and the selector" in \
        capsys.readouterr().out
    inference.main(["--weights", str(kept), "--device", "cpu", "--data-dir", str(data), "--partial-data",
                    "--out", str(tmp_path / "results")])
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    manifest = json.loads((weights / MANIFEST).read_text())["networks"]
    assert [net["path"] for net in results["networks"][1:4]] == [str(kept / manifest[k]["file"])
                                                                 for k in ("spec1", "spec2", "spec_selector")]
    assert all(acc["here"] == acc["manifest"] for acc in results["published_weights"]["test_accuracy"].values())


def test_flip_tta_from_published_weights_gives_both_splits_and_its_cost(published, tmp_path, monkeypatch):
    weights, data = published
    path = str(weights / "student2-googlenet.pt.gz")
    forward = Network.__call__
    calls = []
    monkeypatch.setattr(Network, "__call__", lambda self, x: calls.append(self.tta) or forward(self, x))
    results = {}
    for tta in ("none", "flip"):
        out = tmp_path / f"{tta}.json"
        evaluate.main([path, "--tta", tta, "--timed-passes", "1", "--data-dir", str(data), "--partial-data",
                       "--device", "cpu", "--out", str(out)])
        results[tta] = json.loads(out.read_text())[path]
    assert results["flip"]["tta"] == "flip"
    assert results["flip"]["gflops"] == pytest.approx(2 * results["none"]["gflops"])
    assert "flip" in calls  # its hold-out logits measured again with its views, not those it carries
    for r in results.values():
        assert 0 <= r["holdout_accuracy"] <= 1 and r["images_per_s"] > 0


def test_trainselector_and_studenttrain_take_published_networks_and_refuse_ones_that_would_mix(tmp_path):
    other_split = {**SPLIT, "split_seed": 1}
    for name, split, fingerprint in (("a", SPLIT, "f" * 64), ("b", other_split, "f" * 64), ("c", SPLIT, "e" * 64)):
        publish_checkpoints(tmp_path / name, {"student1": random_checkpoint("selector", num_classes=10, split=split,
                                                                            fingerprint=fingerprint)})
    a, b, c = (str(tmp_path / name / "student1-selector.pt.gz") for name in "abc")
    assert trainSelector.parse_args(["--students", a, a, "--folds", "2"]).split == SPLIT
    with pytest.raises(UserError, match="different splits"):
        trainSelector.parse_args(["--students", a, b])
    with pytest.raises(UserError, match="different CIFAR-10 pixels"):
        trainSelector.parse_args(["--students", a, c])
    teacher = tmp_path / "t"
    publish_checkpoints(teacher, {"teacher": random_checkpoint("selector", "teacher", split=other_split)})
    args = Namespace(teacher=str(teacher / "teacher-selector.pt.gz"), name="", compile=False,
                                            **SPLIT)
    with pytest.raises(UserError, match="was trained with --holdout 5000 --split-seed 1"):
        load_teacher(args, CPU)


def test_inference_refuses_a_local_teacher_of_another_split_beside_published_students(smoke_run, published,
                                                                                        tmp_path):
    weights, data = published
    teacher = load_checkpoint(smoke_run[0] / "checkpoints" / "smoke" / "teacher.pt", hint="")
    other = tmp_path / "teacher.pt"
    save_checkpoint(other, {**teacher, "split": {**teacher["split"], "split_seed": 1}})
    with pytest.raises(UserError, match="was trained with --holdout 100 --split-seed 1 --limit 20, and the students"):
        inference.main(["--weights", str(weights), "--teacher", str(other), "--device", "cpu", "--data-dir",
                        str(data), "--partial-data", "--out", str(tmp_path / "r")])


def test_a_folder_without_a_manifest_is_refused_with_the_advice_that_fits_it(tmp_path):
    published, bundle, other = (tmp_path / k for k in ("published", "bundle", "other"))
    published.mkdir()
    (published / "student1-googlenet.pt.gz").write_bytes(b"")  # a published folder that lost its manifest
    (bundle / "weights").mkdir(parents=True)
    (bundle / "weights" / MANIFEST).write_text("{}")
    other.mkdir()
    for folder, advice in [(published, f"restore the folder as it was published (`git checkout -- {published}`)"),
                           (bundle, f"give its weights folder, {bundle / 'weights'}"),
                           (other, "give a folder that `python publish.py` writes, such as "
                                   "results/published/<run>/weights")]:
        with pytest.raises(UserError) as e:
            published_paths(folder)
        assert str(e.value).startswith(f"{folder} is not a published weights folder (no {MANIFEST}); {advice}")


def test_published_paths_name_the_manifest_s_networks_in_its_order(published):
    weights, _ = published
    assert list(published_paths(weights)) == ["student1", "student2", "selector", "spec1", "spec2", "spec_selector"]


# ----------------------------------------------------------------------------- the repository travels

def test_the_tracked_tree_stays_under_40_mib():
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    paths = [REPO / name for name in listed.stdout.decode().split("\0") if name]
    assert sum(p.stat().st_size for p in paths if p.is_file()) <= 40 * 2**20


def test_the_repository_keeps_one_set_of_published_weights_each_file_as_its_manifest_lists_it():
    folders = sorted((REPO / "results" / "published").glob("*/weights"))
    assert len(folders) <= 1, folders
    for folder in folders:
        manifest = json.loads((folder / MANIFEST).read_text())
        assert not manifest["measured"]["device"].startswith("CPU")  # a GPU run's
        for entry in manifest["networks"].values():
            data = (folder / entry["file"]).read_bytes()
            assert len(data) <= MAX_FILE_BYTES and sha256(data) == entry["sha256"], entry["file"]
