"""Lets benchmarks run from a bare checkout (e.g. on a GPU machine without `pip install -e .`):
puts the repo on sys.path and maps the top-level kernels/ folder to hvpmtl.kernels, as setup.py does."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_package() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import hvpmtl.kernels  # noqa: F401
    except ModuleNotFoundError:
        spec = importlib.util.spec_from_file_location(
            "hvpmtl.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["hvpmtl.kernels"] = module
        spec.loader.exec_module(module)
