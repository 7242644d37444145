"""benchmarks/multilabel_eval.py: the per-rank memory it states, hand-derived (the times are machine-dependent)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import multilabel_eval  # noqa: E402


def test_per_rank_and_per_node_memory_of_the_class_sharded_gather(capsys):
    assert multilabel_eval.main(["--classes-timed", "2"]) == 0
    rows = {tuple(c.strip() for c in line.split("|")[1:5]): [c.strip() for c in line.split("|")[5:-1]]
            for line in capsys.readouterr().out.splitlines()[2:]}
    # COCO on 8 ranks: 10 classes each; 40,504 x 10 x (score + label) x 4 B = 3.2 MB a rank, 26 MB a node,
    # against 40,504 x 80 x 2 x 4 B = 25.9 MB on each of 8 ranks = 207 MB a node if every rank gathered all
    assert rows[("COCO (40k x 80)", "40,504", "80", "8")][0] == "10"
    assert rows[("COCO (40k x 80)", "40,504", "80", "8")][2:] == ["3", "26", "207"]
    # OpenImages on 64 ranks: ceil(9605 / 64) = 151 classes; 125,436 x 151 x 8 B = 152 MB, x 8 = 1,212 MB a node
    assert rows[("OpenImages v6 (125k x 9.6k)", "125,436", "9,605", "64")][0] == "151"
    assert rows[("OpenImages v6 (125k x 9.6k)", "125,436", "9,605", "64")][2:] == ["152", "1,212", "77,108"]
