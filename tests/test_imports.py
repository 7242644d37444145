"""The package's import structure (issue 11): no two files of hvpmtl import each other, directly or through
others (function-local imports included); hvpmtl/train and hvpmtl/eval never import each other;
hvpmtl/checkpoint, which both use, imports neither. Read from the source with ast, nothing imported."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# hvpmtl.kernels is installed from the top-level kernels/ folder (setup.py; a symlink in a checkout)
SOURCES = {"hvpmtl": ROOT / "hvpmtl", "hvpmtl.kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in SOURCES.items():
        for f in sorted(folder.rglob("*.py")):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if package == "hvpmtl" and parts[0] == "kernels":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = f
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """Modules of the package that `path` imports anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    out = set()
    for target in found:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[frozenset]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))
    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(graph()) == [], "import cycles"


def test_cycle_finder_finds_a_function_local_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [frozenset({"a", "b", "c"})]


def test_train_and_eval_never_import_each_other_and_checkpoint_lies_below_both():
    g = graph()
    train_to_eval = {(m, d) for m, deps in g.items() if m.startswith("hvpmtl.train") for d in deps
                     if d.startswith("hvpmtl.eval")}
    assert train_to_eval == set()
    eval_to_train = {(m, d) for m, deps in g.items() if m.startswith("hvpmtl.eval") for d in deps
                     if d.startswith("hvpmtl.train")}
    assert eval_to_train == set()
    checkpoint_up = {(m, d) for m, deps in g.items() if m.startswith("hvpmtl.checkpoint") for d in deps
                     if d.startswith(("hvpmtl.train", "hvpmtl.eval"))}
    assert checkpoint_up == set()
    assert "hvpmtl.checkpoint" in g["hvpmtl.train.runtime"] and "hvpmtl.checkpoint" in g["hvpmtl.eval.export"]


def test_kernels_import_only_their_references_and_references_no_kernel():
    """Sinkhorn's and ASL's shape: reference (+ checks) <- Triton twin; the objective picks one of the two."""
    g = graph()
    twins = {"hvpmtl.kernels.sinkhorn": "hvpmtl.losses.sinkhorn",
             "hvpmtl.kernels.weighted_asl": "hvpmtl.losses.weighted_asl"}
    for kernel, reference in twins.items():
        assert g[kernel] == {"hvpmtl.kernels", reference}, kernel
        assert not {d for d in g[reference] if d.startswith("hvpmtl.kernels")}, reference
    assert {"hvpmtl.kernels.sinkhorn", "hvpmtl.losses.sinkhorn"} <= g["hvpmtl.losses.swav"]
    assert {"hvpmtl.kernels.weighted_asl", "hvpmtl.losses.weighted_asl"} <= g["hvpmtl.losses.asl"]


def test_data_wings_import_down_only():
    """hvpmtl/data's wings: formats <- loaders <- tools (a loader never runs an offline tool; a format reads alone)."""
    wing = {"formats": 0, "loaders": 1, "tools": 2}
    up = {(m, d) for m, deps in graph().items() if m.startswith("hvpmtl.data.") for d in deps
          if d.startswith("hvpmtl.data.") and wing.get(d.split(".")[2], -1) > wing.get(m.split(".")[2], 3)}
    assert up == set()
    assert set(wing) <= {m.split(".")[2] for m in graph() if m.count(".") >= 2 and m.startswith("hvpmtl.data.")}
