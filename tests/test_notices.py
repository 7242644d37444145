import subprocess
import sys

from subprocs import subprocess_env

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]

SCRIPT = """
import warnings
from hvpmtl.notices import notice, show_notices_as_lines
show_notices_as_lines()
notice("checkpoint step_00000004 could not be loaded (damaged); trying an older one")
warnings.warn("a library's own warning")
"""


def test_a_notice_is_one_line_without_the_code_that_raised_it():
    p = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    lines = p.stderr.splitlines()
    assert lines[0] == "[hvpmtl] warning: checkpoint step_00000004 could not be loaded (damaged); trying an older one"
    assert "notice(" not in p.stderr  # the source line of the call is not shown
    # other warnings keep Python's format: a library's warning still says where it came from
    assert "UserWarning: a library's own warning" in p.stderr and "<string>:6" in p.stderr
