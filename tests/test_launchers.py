"""`launchers/*.py --help` answers before torch, DeepSpeed or timm is imported (it took 5 s)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import runpy, sys
sys.argv = [{launcher!r}, "--help"]
try:
    runpy.run_path({launcher!r}, run_name="__main__")
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "deepspeed", "timm", "nvidia.dali", "mlflow") if m in sys.modules)
print("EXIT", code, "HEAVY", heavy)
"""


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["pretrain.py", "finetune.py"])
def test_help_imports_nothing_heavy(launcher):
    path = str(ROOT / "launchers" / launcher)
    p = subprocess.run([sys.executable, "-c", PROBE.format(launcher=path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert "--config" in p.stdout and "exit codes:" in p.stdout, p.stdout + p.stderr
    assert p.stdout.strip().splitlines()[-1] == "EXIT 0 HEAVY []"
