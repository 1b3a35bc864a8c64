"""The package tree's rules, checked from the source: no import cycles between pdbatch modules,
the worker side talks to engines only through the seam (pdbatch.engines), and every module
imports on its own.

The graph is built with `ast` from every `import` in every module, function-level ones
included (a lazy import that closes a cycle is still a cycle: it only moves the failure to
run time); imports under `if TYPE_CHECKING:` never run and are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pdbatch"
# the worker side: it sees engines only through pdbatch.engines (Engine, create_engine) and the
# shared types next to it, never an engine's insides
SEAM_USERS = ("pdbatch.driver", "pdbatch.monitoring", "pdbatch.io", "pdbatch.kv")
ENGINE_INSIDES = ("pdbatch.engines.builtin", "pdbatch.engines.vllm")


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The pdbatch modules that module `name` imports, anywhere in its body."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:  # `from pkg import module` imports the module itself
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    mods = module_names(root)
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    """The check itself can fail: a two-module and a three-module cycle are found, a chain is not."""
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": set(), "x": {"y"}, "y": {"z"}, "z": {"x"}}
    assert cycles(graph) == [["a", "b"], ["x", "y", "z"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_graph_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pdbatch"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "top.py").write_text("def f():\n    from .sub import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("from ..top import f\nfrom typing import TYPE_CHECKING\n"
                                         "if TYPE_CHECKING:\n    from pdbatch import other\n")
    (pkg / "other.py").write_text("import pdbatch.sub.leaf\n")
    graph = import_graph(pkg)
    assert graph["pdbatch.top"] == {"pdbatch.sub.leaf"}
    assert graph["pdbatch.sub.leaf"] == {"pdbatch.top"}  # the TYPE_CHECKING import is left out
    assert graph["pdbatch.other"] == {"pdbatch.sub.leaf"}
    assert cycles(graph) == [["pdbatch.sub.leaf", "pdbatch.top"]]


def test_no_import_cycles_between_pdbatch_modules():
    graph = import_graph()
    assert len(graph) > 40 and "pdbatch.engines.builtin.decode" in graph
    found = cycles(graph)
    detail = [" <-> ".join(c) + ": " + "; ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c)
              for c in found]
    assert not found, "import cycles:\n" + "\n".join(detail)


def test_worker_side_sees_engines_only_through_the_seam():
    graph = import_graph()
    bad = {m: sorted(t for t in targets if t.startswith(ENGINE_INSIDES))
           for m, targets in graph.items() if m.startswith(SEAM_USERS)}
    assert not {m: t for m, t in bad.items() if t}, "use pdbatch.engines (create_engine, Engine) instead"


def test_every_module_imports_on_its_own():
    """Each module imported first in a fresh set of pdbatch modules: an import-order dependency
    (a cycle that the graph cannot see, e.g. through importlib) fails here. Modules that need an
    optional package (vLLM, CUDA libraries) are skipped when it is absent."""
    script = (
        "import importlib, sys\n"
        f"names = {sorted(module_names())!r}\n"
        "bad = []\n"
        "for n in names:\n"
        "    for m in [m for m in sys.modules if m == 'pdbatch' or m.startswith('pdbatch.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except ModuleNotFoundError as e:\n"
        "        if (e.name or '').split('.')[0] == 'pdbatch':\n"
        "            bad.append(f'{n}: {e!r}')\n"
        "    except Exception as e:\n"
        "        bad.append(f'{n}: {e!r}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


def test_entry_point_aliases_stay():
    """`--preload pdbatch.dashboard` and `python -m pdbatch.slurm_job` (old job.sbatch files)."""
    import pdbatch.dashboard
    import pdbatch.slurm_job
    from pdbatch.monitoring.monitor import Monitor
    from pdbatch.slurm.job import main

    class FakeScheduler:
        def add_plugin(self, plugin, idempotent=False):
            self.plugin, self.idempotent = plugin, idempotent

    s = FakeScheduler()
    pdbatch.dashboard.dask_setup(s)
    assert isinstance(s.plugin, Monitor) and s.idempotent
    assert pdbatch.slurm_job.main is main
    r = subprocess.run([sys.executable, "-m", "pdbatch.slurm_job", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "wait" in r.stdout and "stop" in r.stdout
