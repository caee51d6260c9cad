"""The import graph of lab/: no module imports itself through others, counting the imports
written inside functions, and no package imports itself through others either (lab/model,
lab/data, lab/training, ... each taken as one node; docs/architecture.md draws the order).
Imports under `if TYPE_CHECKING:` are for annotations and never run, so they are not edges."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "lab"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"))


def imported_names(tree: ast.AST):
    """(module, names) of every import statement that runs, at any depth."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if is_type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, [alias.name for alias in node.names]
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, package: str = "lab") -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports. `from a.b import c` is an edge to
    a.b.c when that is a module, else to a.b."""
    files = {module_name(p, root): p for p in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for module, names in imported_names(ast.parse(path.read_text(encoding="utf-8"))):
            if module != package and not module.startswith(package + "."):
                continue
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in files]
            if len(targets) < len(names) or not names:
                targets.append(module)
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def package_graph(graph: dict[str, set[str]], package: str = "lab") -> dict[str, set[str]]:
    """The same edges between lab's top-level modules and subpackages (lab.model.gates and
    lab.model.decoder are both lab.model); edges inside one package are dropped."""
    def node(name: str) -> str:
        return ".".join(name.split(".")[:2]) if name != package else name

    out: dict[str, set[str]] = {}
    for source, targets in graph.items():
        out.setdefault(node(source), set()).update(node(t) for t in targets if node(t) != node(source))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_of_lab_imports_itself_through_others():
    assert cycles(import_graph(ROOT)) == []


def test_no_package_of_lab_imports_itself_through_others():
    assert cycles(package_graph(import_graph(ROOT))) == []


def test_the_graph_sees_function_local_and_from_package_imports():
    """The scan reads what the cycle tests rely on: lab.training.run's imports of the model
    and of its records (`from lab import records`), and the commands' imports inside their
    bodies (lab/commands.py), which the CLI reaches through `from lab import commands`."""
    graph = import_graph(ROOT)
    assert {"lab.model.params", "lab.records"} <= graph["lab.training.run"]
    assert {"lab.training.run", "lab.experiments.grid.run"} <= graph["lab.commands"]
    assert "lab.commands" in graph["lab.cli"]


def test_a_best_lr_is_read_without_the_sweeps_runner():
    """A grid's `lrs: {from_sweep}` and `gatelab sweep-report` read a sweep's results through
    lab/experiments/sweep/results.py, and nothing that module imports, at any depth, trains,
    runs trials or workers (issue 41: the grid had imported the sweep's runner to read them)."""
    graph = import_graph(ROOT)
    reached, stack = set(), ["lab.experiments.sweep.results"]
    while stack:
        for target in graph[stack.pop()] - reached:
            reached.add(target)
            stack.append(target)
    runner = {"lab.experiments.sweep.run", "lab.experiments.sweep.trials",
              "lab.experiments.sweep.studies"}
    assert not reached & (runner | {"lab.experiments.pool", "lab.training.run"}), sorted(reached)
    for reader in ("lab.experiments.grid.spec", "lab.reports.sweep_report"):
        assert "lab.experiments.sweep.results" in graph[reader]
        assert not graph[reader] & runner, (reader, sorted(graph[reader] & runner))


@pytest.mark.parametrize("local", [False, True])
def test_a_planted_cycle_is_found(tmp_path, local):
    """A loop of three modules, one import written inside a function when `local`; an
    import under TYPE_CHECKING closes no loop."""
    pkg = tmp_path / "lab"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from lab.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from lab import c\n")
    closing = "def f():\n    from lab.a import thing\n" if local else "import lab.a\n"
    (pkg / "c.py").write_text(closing)
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from lab.a import thing\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["lab.a", "lab.c", "lab.sub.b"]]
    assert cycles(package_graph(graph)) == [["lab.a", "lab.c", "lab.sub"]]
    assert graph["lab.d"] == set()


def test_architecture_page_names_every_module_and_only_modules_that_exist():
    """docs/architecture.md gives every module of lab/ one line, and names none that is gone."""
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"^- `(lab/[\w/]+\.py)`:", page, re.MULTILINE))
    modules = {str(p.relative_to(ROOT)) for p in LAB.rglob("*.py")
               if p.name != "__init__.py"}
    assert named == modules, (f"not on the page: {sorted(modules - named)}; "
                              f"on the page but not in lab/: {sorted(named - modules)}")


# Issue 41's bound: a module a newcomer can read in one sitting; a module that grows past it
# is split by concern (docs/architecture.md says what each part owns), not trimmed.
MAX_MODULE_LINES = 460


def test_no_module_of_lab_is_over_about_450_lines():
    sizes = {str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
             for path in (ROOT / "lab").rglob("*.py")}
    assert sizes and max(sizes.values()) > 200  # (the walk found the package)
    assert {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_prepare_runs_where_mlflow_optuna_and_sqlalchemy_are_missing(tmp_path):
    """`gatelab prepare` imports none of the recording libraries: a GPU machine's first call
    carries the corpus without their wheels (docs/reproduce_gpu.sh, `prepare`). The child
    process makes each of them unimportable before the command starts."""
    import subprocess
    import sys

    text = "\n\n".join(f"Book {i}. " + "the quick brown fox jumps over the lazy dog. " * 40
                       for i in range(30))
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text(text, encoding="utf-8")
    blocked = ("mlflow", "optuna", "sqlalchemy", "alembic")
    child = ("import sys\n"
             "class Missing:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             f"        if name.split('.')[0] in {blocked!r}:\n"
             "            raise ImportError(f'{name} is not installed here')\n"
             "sys.meta_path.insert(0, Missing())\n"
             "from lab.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run(
        [sys.executable, "-c", child, "prepare", "--quiet", "--vocab-size", "300",
         "--data", str(tmp_path / "train.txt"), "--valid", str(tmp_path / "valid.txt"),
         "--test", str(tmp_path / "test.txt"), "--out", str(tmp_path / "prepared")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "prepared").is_dir()


def libraries_loaded_by(code: str, libraries: tuple[str, ...]) -> list[str]:
    """Which of `libraries` (top-level packages) a fresh interpreter has loaded after running
    `code` from the repository's root."""
    import subprocess
    import sys

    report = (f"\nimport sys\nprint(sorted({{m.split('.')[0] for m in sys.modules}}"
              f" & set({libraries!r})))\n")
    done = subprocess.run([sys.executable, "-c", code + report], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 (our own print)


def test_the_registry_presets_config_resolution_and_counts_import_no_torch():
    """Start-up (benchmarks/README.md): `gatelab variants` and a bad `gatelab train` config
    resolve configs, read the registry and count parameters before any model exists; torch
    (1.3-1.5 s to import on the 2-core CPU machine) stays out of all of it. A fresh
    interpreter does that work and reports which heavy libraries it loaded."""
    child = ("from lab.config import resolve\n"
             "from lab.errors import LabError\n"
             "from lab.model.variants import VARIANTS, get_variant\n"
             "from lab.reports.variants import describe_variants\n"
             "rows = describe_variants('small')\n"
             "assert all(r['params_added'] is not None for r in rows if r['available'])\n"
             "try:\n"
             "    resolve(get_variant('sdpa_headwise_sigmoid_mul'), 'tiny', ['train.lr=abc'])\n"
             "except LabError:\n"
             "    pass\n")
    assert libraries_loaded_by(child, ("torch", "lightning", "mlflow", "optuna", "scipy",
                                       "numpy")) == []


def test_a_grids_own_process_plans_checks_and_dispatches_without_lightning():
    """A grid's process whose workers train its cells imports neither Lightning nor the
    torchmetrics and torchvision it pulls in (9 of the 19 s of a grid process's imports on
    the lent GPU machine, benchmarks/README.md): planning, the numerics check's compile and
    the pool need torch and MLflow only. A fresh interpreter imports those modules."""
    child = ("import lab.experiments.grid.run, lab.experiments.grid.cells, lab.check\n"
             "from lab.training.corpus import open_data\n"
             "from lab.training.step import compile_model, use_compile_cache\n")
    assert libraries_loaded_by(child, ("lightning", "torchmetrics", "torchvision")) == []
