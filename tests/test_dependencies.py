"""The install tells the truth: every package hvpmtl imports is declared in setup.py (not only brought by another
package, as pyarrow and pydantic came through mlflow), and hvpmtl imports with nothing but its declared
requirements and what they declare in turn."""
from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*ROOT.joinpath("hvpmtl").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py")]
OWN = {"hvpmtl", "kernels"}


def setup_requirements() -> tuple[list[Requirement], list[Requirement]]:
    """install_requires and the test extra of setup.py, read from its text (running setup.py would install)."""
    text = ROOT.joinpath("setup.py").read_text()
    body = re.search(r"install_requires=\[(.*?)\n    \]", text, re.S).group(1)
    install = [Requirement(r) for r in re.findall(r'^\s*"([^"]+)"', body, re.M)]
    test = [Requirement(r) for r in re.findall(r'"([^"]+)"', re.search(r'"test": \[(.*?)\]}', text).group(1))]
    return install, test


def imported_modules(files) -> set[str]:
    tops = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                tops.add(node.module.split(".")[0])
    return {t for t in tops if t not in sys.stdlib_module_names and t not in OWN}


def test_every_imported_package_is_declared():
    install, test = setup_requirements()
    declared = {canonicalize_name(r.name) for r in install}
    providers = md.packages_distributions()
    missing = {}
    for module in sorted(imported_modules(SOURCES)):
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        assert dists, f"hvpmtl imports {module}, which no installed distribution provides"
        if not dists & declared:
            missing[module] = sorted(dists)
    assert not missing, f"imported by hvpmtl but not declared in setup.py install_requires: {missing}"
    tests = imported_modules(ROOT.joinpath("tests").rglob("*.py")) - set(providers.get("pytest", ["pytest"]))
    undeclared = {m: providers.get(m) for m in tests
                  if m in providers and not {canonicalize_name(d) for d in providers[m]}
                  & (declared | {canonicalize_name(r.name) for r in test})}
    assert not undeclared, f"imported by the tests but declared nowhere (setup.py test extra): {undeclared}"


def closure(reqs: list[Requirement]) -> set[str]:
    """The declared distributions and, transitively, what their metadata requires (markers evaluated, the
    extras asked for included)."""
    seen: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in reqs]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            continue
        if name in seen:
            continue
        seen.add(name)
        for text in md.distribution(name).requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (extras | {""})):
                todo.append((sub, frozenset(sub.extras)))
    return seen


@pytest.mark.slow
def test_hvpmtl_imports_from_its_declared_requirements_alone(tmp_path):
    """A site-packages holding only the declared distributions' closure (links to this venv's files), Python
    started without its own site-packages: every hvpmtl module imports."""
    install, _ = setup_requirements()
    site = tmp_path / "site"
    site.mkdir()
    for name in closure(install):
        dist = md.distribution(name)
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (site / top).exists():
                os.symlink(src, site / top)
    shim = tmp_path / "shim"  # the editable install maps hvpmtl.kernels to kernels/ through a .pth (not read here)
    shim.mkdir()
    os.symlink(ROOT / "kernels", shim / "kernels")
    modules = sorted(".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for f in ROOT.joinpath("hvpmtl").rglob("*.py") if f.name != "__main__.py")
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(site)!r}]\n"
            f"import hvpmtl; hvpmtl.__path__.append({str(shim)!r})\n"
            f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\nprint('imported', len({modules!r}))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["DS_ACCELERATOR"] = "cpu"
    cp = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                        timeout=600)
    assert cp.returncode == 0 and "imported" in cp.stdout, cp.stderr[-3000:]
