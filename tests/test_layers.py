"""qkvlab's imports go one way: every import in src/qkvlab (function-local ones too) points to a module of a
lower or the same layer, with no cycle between files or between packages.

The layers, lowest first, are :data:`LAYERS`. The edges that still point the wrong way are listed in
:data:`KNOWN`, and those that close a cycle inside one layer in :data:`KNOWN_CYCLES`, each with what removes
it (issue 31). The lists may only shrink: a new wrong-way edge or cycle fails, and so does a listed edge
that no longer exists (or no longer closes a cycle), so the lists are kept true.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "qkvlab"

#: module-name prefixes per layer, lowest first; the longest matching prefix decides
LAYERS: tuple[tuple[str, ...], ...] = (
    # base: errors, conventions, the one writer, the cache and the package fetcher, argument types, page
    # primitives, sharded tensors read whole or by shard
    (
        "qkvlab",
        "qkvlab._lazy",
        "qkvlab.errors",
        "qkvlab.conventions",
        "qkvlab.files",
        "qkvlab.cache",
        "qkvlab.fetch",
        "qkvlab.args",
        "qkvlab.presets",
        "qkvlab.render",
        "qkvlab.dtensors",
    ),
    # maths
    ("qkvlab.spectra", "qkvlab.theory"),
    # reading models: the architecture table, weight sources, the inspect report
    ("qkvlab.attention", "qkvlab.inspection"),
    # components: parameter groups and optimisers, the guard's rule, models, attention logits, data, the run config
    (
        "qkvlab.optim",
        "qkvlab.optimizers",
        "qkvlab.guard",
        "qkvlab.muon",
        "qkvlab.models",
        "qkvlab.logits",
        "qkvlab.data",
        "qkvlab.config",
    ),
    # loops and their integrations
    ("qkvlab.train", "qkvlab.finetune", "qkvlab.monitor", "qkvlab.hf", "qkvlab.lightning"),
    # the grid runner, the run-folder readers it shares, and sweeps on it
    ("qkvlab.grid",),
    # the report
    ("qkvlab.report",),
    # the claims
    ("qkvlab.repro",),
    # the command line and the demo
    ("qkvlab.cli", "qkvlab.demo", "qkvlab.__main__"),
)

#: wrong-way edges still in the code: (importer, imported) → what removes it
KNOWN: dict[tuple[str, str], str] = {}

#: edges that close a cycle between two files of one layer: (importer, imported) → what removes it
KNOWN_CYCLES: dict[tuple[str, str], str] = {}


#: a claim's private names that another claim still imports: (importer, "module:name") → what removes it
KNOWN_PRIVATE: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imports() -> set[tuple[str, str]]:
    """(importer, imported module) for every qkvlab import, function-local ones included."""
    known = modules()
    edges = set()
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(
                        parts[: len(parts) - node.level + 1] + ([node.module] if node.module else [])
                    )
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target.startswith("qkvlab") and target != name:
                    edges.add((name, target))
                    break  # `from x import y`: y when it is a module, else x
    return edges


def layer(name: str) -> int:
    best, where = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, where = len(prefix), index
    assert where is not None, f"{name} is in no layer: add it to LAYERS"
    return where


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _package(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2])


def test_every_import_points_down_or_is_a_known_wrong_way_edge() -> None:
    edges = imports()
    wrong = {(a, b) for a, b in edges if layer(b) > layer(a)}
    assert not wrong - set(KNOWN), f"imports against the layer order: {sorted(wrong - set(KNOWN))}"
    assert not set(KNOWN) - wrong, (
        f"KNOWN lists edges that are gone (remove them): {sorted(set(KNOWN) - wrong)}"
    )


def test_no_cycle_between_files_or_packages_beyond_the_known_edges() -> None:
    everything = imports()
    gone = set(KNOWN_CYCLES) - everything
    assert not gone, f"KNOWN_CYCLES lists edges that are gone (remove them): {sorted(gone)}"
    for edge in KNOWN_CYCLES:  # each listed edge still closes a cycle: its reverse path exists
        without = {e for e in everything if e != edge}
        graph: dict[str, set[str]] = {}
        for a, b in without:
            graph.setdefault(a, set()).add(b)
        assert edge[0] in _reachable(graph, edge[1]), (
            f"{edge} closes no cycle any more: remove it from KNOWN_CYCLES"
        )
    edges = {e for e in everything if e not in KNOWN and e not in KNOWN_CYCLES}
    files: dict[str, set[str]] = {}
    packages: dict[str, set[str]] = {}
    for a, b in edges:
        files.setdefault(a, set()).add(b)
        if _package(a) != _package(b):
            packages.setdefault(_package(a), set()).add(_package(b))
    assert not _cycles(files), f"cycles between files: {_cycles(files)}"
    assert not _cycles(packages), f"cycles between packages: {_cycles(packages)}"


def test_the_checker_sees_function_local_and_relative_imports(tmp_path) -> None:
    """The parser is what the two tests stand on: it must see an import inside a function."""
    edges = imports()
    assert ("qkvlab.hf", "qkvlab.guard") in edges  # a module-level import
    assert ("qkvlab.monitor", "qkvlab.guard") in edges  # inside a method, not at the top
    assert layer("qkvlab.report.build") > layer("qkvlab.inspection") > layer("qkvlab.files")
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_claim_imports_another_claims_private_names() -> None:
    found = set()
    for name, path in modules().items():
        if not name.startswith("qkvlab.repro."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qkvlab.repro."):
                other = node.module.split(".")[2]
                if other != name.split(".")[2]:
                    found |= {(name, f"{node.module}:{a.name}") for a in node.names if a.name.startswith("_")}
    assert found == set(KNOWN_PRIVATE), (
        f"new: {sorted(found - set(KNOWN_PRIVATE))}; gone (remove from KNOWN_PRIVATE): {sorted(set(KNOWN_PRIVATE) - found)}"
    )
