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


def test_a_huge_path_and_a_bom_are_shown_cut_and_visible():
    from hvpmtl.data.formats.issues import make_issue
    from hvpmtl.notices import SHOWN_CHARS, shown_message
    huge = "a" * 10_000_000 + ".jpg"
    issue = make_issue("unreadable", "train.txt", 2, f"./{huge}: File name too long", huge)
    line = issue.format()
    assert len(line) < 6 * SHOWN_CHARS and line.count(" characters)...") == 2  # path and message, each cut
    assert "File name too long; the image file cannot be read" in line  # the reason and the advice stay whole
    bom = make_issue("missing-file", "train.txt", 1, "./\ufeffx.jpg not found", "\ufeffx.jpg").format()
    assert "(\\ufeffx.jpg)" in bom and "\ufeff" not in bom
    assert shown_message("short \ufeff") == "short \\ufeff"
