"""The architecture's rules, checked on the source tree itself.

1. The pure layers (forgetray.metrics, forgetray.methods, forgetray.flatness, forgetray.plan) import none of Ray,
   MLflow or DeepSpeed: they can be used, and tested, without the training stack.
2. No import cycle among forgetray's modules, counting every import statement anywhere in a module (inside
   functions too: a lazy import defers a dependency, it does not remove it), with an explicit allow-list.
3. The CLI does no work at import time: `import forgetray.cli` loads none of Ray, DeepSpeed or MLflow, so it starts
   fast and validates a sweep before any of them load; the plain-data modules (sharing, plan, keys, spec, grids, the
   metric registry) load none of those nor torch.
4. No source file over MAX_LINES lines (the target is about 400).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "forgetray"
HEAVY = ("ray", "mlflow", "deepspeed")
MAX_LINES = 450


def loaded_after_import(code: str, packages: tuple[str, ...] = HEAVY) -> list[str]:
    """Run `code` in a fresh interpreter (cwd = the repository root); which of `packages` (top-level names) it left
    loaded."""
    wanted = set(packages)
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {wanted!r})))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- 1. pure layers --------------------------------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules_under(package: str) -> list[str]:
    """The package and every module below it, from the files on disk (no import needed to list them)."""
    base = ROOT.joinpath(*package.split("."))
    if base.is_dir():
        return sorted(module_name(p) for p in base.rglob("*.py"))
    return [package]


def pure_modules() -> list[str]:
    names = modules_under("forgetray.metrics") + modules_under("forgetray.methods") + ["forgetray.flatness",
                                                                                       "forgetray.sharing"]
    names += modules_under("forgetray.iv")
    if (PACKAGE / "plan.py").is_file() or (PACKAGE / "plan" / "__init__.py").is_file():  # plan may not exist yet
        names += modules_under("forgetray.plan")
    return names


def test_pure_layers_import_no_ray_mlflow_deepspeed():
    names = pure_modules()
    assert "forgetray.metrics.stage" in names and "forgetray.methods.wiseft" in names  # the listing found them
    code = "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names)
    # one interpreter for all: whichever module pulls one in, it stays in sys.modules
    loaded = loaded_after_import(code)
    assert loaded == [], f"importing the pure layers ({', '.join(names)}) loaded {loaded}"


# --- 2. no import cycle ------------------------------------------------------------------------------------------------
#
# The graph: one node per module file under forgetray/ (a package is its __init__.py). Edges come from every import
# statement in a module, wherever it is: at module level, in class bodies and in functions (a lazy import only defers
# the dependency), and under `if TYPE_CHECKING:` (annotations name the type, so the dependency is there).
#
# - `import forgetray.a.b` and `from forgetray.a.b import c` are edges to forgetray.a.b; in the second form, c is an
#   edge to forgetray.a.b.c as well when that is a module (`from forgetray import probes` imports forgetray.probes).
# - Relative imports are resolved against the importing module's package.
# - Parent packages: importing forgetray.a.b first initialises forgetray and forgetray.a. That implicit step is NOT an
#   edge, so a package's __init__ importing its own submodules (package -> submodule), while those submodules import
#   their siblings by full name (forgetray.a.b -> forgetray.a.c), is fine: by the time a submodule runs, its parents
#   are in sys.modules. What IS an edge to a package is asking its __init__ for something: `import forgetray.a`, or
#   `from forgetray.a import name` where name is not a submodule. If forgetray.a's __init__ imports the importing
#   module back, that is a real cycle: the name only exists if the __init__ happened to define it before importing
#   the submodule, and it is reported.

# Edges left out of the graph, each for its reason. Keep this short: a new entry needs a reason no restructuring removes.
ALLOWED_EDGES = {
    # `python -m forgetray.organism.build` runs the file as __main__; its main() goes through the package's copy of
    # the module (forgetray.organism.build, imported by the package's __init__) so that the pre-training worker
    # processes unpickle the package's classes, not __main__'s. At run time the package is initialised before
    # __main__ runs, so this lazy import finds it complete.
    ("forgetray.organism.build", "forgetray.organism"),
}


def all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of the module, wherever it is."""
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in all_imports(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    package = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{node.module}" if node.module else package
                else:
                    base = node.module or ""
                submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in files]
                targets = submodules
                if len(submodules) < len(node.names):  # some name comes from base's own namespace
                    targets = [base] + submodules
            # other imports (torch, ...) are not nodes
            graph[name] |= {t for t in targets if t in files and (name, t) not in ALLOWED_EDGES}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [m0, m1, ..., m0], or None (iterative depth-first search, deterministic order)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = GREY
        while stack:
            node, children = stack[-1]
            for child in children:
                if colour[child] == GREY:
                    return path[path.index(child):] + [child]
                if colour[child] == WHITE:
                    colour[child] = GREY
                    stack.append((child, iter(sorted(graph[child]))))
                    path.append(child)
                    break
            else:
                colour[node] = BLACK
                stack.pop()
                path.pop()
    return None


def test_import_graph_is_read_correctly():
    """The graph builder on known facts of the tree, so an empty graph cannot pass the cycle test below."""
    graph = import_graph()
    assert "forgetray.metrics.significance" in graph["forgetray.metrics.stage"]
    assert "forgetray.spec" in graph["forgetray"]  # `from forgetray.spec import ...` in the package __init__
    assert "forgetray.sweep" in graph["forgetray"]  # imported inside run(): lazy, still an edge
    assert "forgetray.train.ift" in graph["forgetray.train.worker"]
    assert "forgetray.organism" not in graph["forgetray.organism.build"]  # the allow-list
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# --- 3. the CLI does no work at import time --------------------------------------------------------------------------


def test_cli_import_loads_no_training_stack():
    loaded = loaded_after_import("import forgetray.cli")
    assert loaded == [], f"`import forgetray.cli` loaded {loaded}"


PLAIN_DATA = ("forgetray.sharing", "forgetray.plan", "forgetray.keys", "forgetray.spec", "forgetray.grids",
              "forgetray.metrics.registry")


def test_plain_data_modules_load_no_torch():
    """What a trial is, its plan, keys and sharing, and the metric names: plain data, loaded by the driver and the CLI
    before any compute; none of them may pull in torch (e.g. through forgetray.metrics' package namespace)."""
    code = "".join(f"import {name}\n" for name in PLAIN_DATA)
    loaded = loaded_after_import(code, HEAVY + ("torch",))
    assert loaded == [], f"importing {', '.join(PLAIN_DATA)} loaded {loaded}"


# --- 4. file size ----------------------------------------------------------------------------------------------------


def test_no_source_file_over_the_line_limit():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in sorted(PACKAGE.rglob("*.py"))}
    assert len(sizes) > 10
    over = {path: n for path, n in sizes.items() if n > MAX_LINES}
    assert not over, f"over {MAX_LINES} lines (target ~400): {over}"
