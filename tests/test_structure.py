"""The layout's guarantees: no module imports one that imports it back, and ``utils/`` and ``models/``, which every
script shares, import no script. Imports are read from the code (inside functions too), not run. And the suite's
own: a passed test leaves nothing on the disk."""

import ast
import json
from pathlib import Path

from tests.conftest import REPO

pytest_plugins = ["pytester"]

SCRIPTS = {path.stem for path in REPO.glob("*.py")}


def project_modules():
    """``{module name: the project modules it imports}`` of every module of the repository but the tests."""
    paths = [*REPO.glob("*.py"), *REPO.glob("utils/*.py"), *REPO.glob("models/*.py")]
    names = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path for path in paths}
    graph = {}
    for name, path in names.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        graph[name] = {m for m in imported if m in names} - {name}
    return graph


def test_no_module_imports_a_module_that_imports_it_back():
    graph = project_modules()

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, (*seen, m))) for m in graph.get(start, ()))

    cycles = sorted(name for name in graph if reaches(name, name))
    assert cycles == []


def test_utils_and_models_import_no_script():
    graph = project_modules()
    shared = {name: imports & SCRIPTS for name, imports in graph.items() if name.startswith(("utils", "models"))}
    assert {name: imports for name, imports in shared.items() if imports} == {}


def test_a_passed_test_s_folder_is_deleted_as_it_ends_and_a_failed_one_s_is_kept(pytester):
    # The suite writes gigabytes of checkpoints: kept, they fill a small disk before the slow tests end.
    pytester.makeini((REPO / "pytest.ini").read_text())
    pytester.makepyfile("""
        import json, pathlib
        def test_passes(tmp_path):
            (tmp_path / "weights.pt").write_bytes(b"0" * 1000)
            pathlib.Path("folders.json").write_text(json.dumps({"passed": str(tmp_path)}))
        def test_fails(tmp_path):
            (tmp_path / "weights.pt").write_bytes(b"0" * 1000)
            folders = json.loads(pathlib.Path("folders.json").read_text())
            assert not pathlib.Path(folders["passed"]).exists()
            pathlib.Path("folders.json").write_text(json.dumps({**folders, "failed": str(tmp_path)}))
            assert False
    """)
    pytester.runpytest().assert_outcomes(passed=1, failed=1)
    folders = json.loads((pytester.path / "folders.json").read_text())
    assert (Path(folders["failed"]) / "weights.pt").is_file()
