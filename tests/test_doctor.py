"""hvpmtl doctor's in-process pieces: the comparison of made-up per-rank records (each planted fault named with its
host and rank, nothing flagged on a healthy job), the table, the data index's identity on real index files, the
output_dir probes, the model-state estimate against a hand count, and one real single-rank run of the doctor
(gloo world of one): healthy passes with exit 0, an output_dir it cannot create fails with exit 7."""
from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest

from hvpmtl.cli import build_parser
from hvpmtl.data.formats.index_build import build_list_index
from hvpmtl.data.formats.index_file import DataIndex
from hvpmtl.data.formats.index_format import SHA_BLANK
from hvpmtl.data.formats.issues import DataError
from hvpmtl.doctor import preflight
from hvpmtl.doctor.cli import doctor_parser
from hvpmtl.doctor.compare import SAME_EVERYWHERE, Limits, compare
from hvpmtl.doctor.data_index import index_identity, index_path_of
from hvpmtl.doctor.memory import gradient_numel, model_state_bytes, zero_stage
from hvpmtl.doctor.output_dir import probe_name, read_probe, write_probe
from hvpmtl.doctor.report import format_table, report
from hvpmtl.doctor.versions import REVISION_ENV, revision, sources_hash

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "test_tiny.yaml"


def record(rank: int, host: str, **over) -> dict:
    r = {"rank": rank, "local_rank": rank % 2, "host": host, "pid": 100 + rank, "revision": "v0.1-3-gabc",
         "sources": "0123456789abcdef", "python": "3.11.7", "torch": "2.14.1", "deepspeed": "0.19.8",
         "dali": "2.4.0", "cuda": "13.0", "gpu": "NVIDIA H100", "clock": 1000.0 + rank * 0.01,
         "index": {"path": "/data/train.txt.hvpidx", "id": "sha256:" + "ab" * 32, "samples": 10, "bytes": 8192},
         "output_dir": {"path": "/shared/run", "errors": [], "mtime_offset_s": 0.01},
         "allreduce": {"numel": 1000, "dtype": "bfloat16", "bytes": 2000, "seconds": 0.002, "busbw_gbs": 1.5},
         "memory": {"kind": "gpu", "free_gb": 79.0, "total_gb": 80.0}, "need_gb": 20.0}
    if rank == 0:
        r["output_dir"]["unseen"] = []
    for k, v in over.items():
        r[k] = v
    return r


def job(n: int = 4) -> list[dict]:
    """n ranks, 2 per host: node01 (ranks 0, 1), node02 (2, 3), ..."""
    return [record(r, f"node{r // 2 + 1:02d}") for r in range(n)]


def named(problems) -> set[tuple[str, int, str]]:
    return {(p.check, p.rank, p.host) for p in problems}


def test_a_healthy_job_has_no_problem_and_the_table_says_passed():
    recs = job()
    assert compare(recs) == []
    text = report(recs, [])
    assert "doctor: all 4 rank(s) on 2 host(s) passed" in text
    assert text.splitlines()[0].split()[:3] == ["rank", "host", "revision"]
    assert sum(1 for ln in text.splitlines() if ln.startswith(("0 ", "1 ", "2 ", "3 "))) == 4
    # 2000 bytes in 2 ms is 1 GB/s of algorithm bandwidth; a ring moves 2(n-1)/n of it per link
    assert "over 4 rank(s)" in text and "bus bandwidth 1.50 GB/s" in text


@pytest.mark.parametrize("key,value", [("revision", "v0.1-4-gdef"), ("sources", "fedcba9876543210"),
                                       ("torch", "2.13.0"), ("deepspeed", "0.18.0"), ("dali", "2.3.0"),
                                       ("cuda", "12.8"), ("gpu", "NVIDIA A100"), ("python", "3.10.1")])
def test_a_rank_with_another_version_is_named_with_its_host(key, value):
    recs = job()
    recs[3][key] = value
    problems = compare(recs)
    assert named(problems) == {(SAME_EVERYWHERE[key], 3, "node02")}
    assert value in problems[0].message and "3 rank(s) on node01, node02" in problems[0].message
    text = report(recs, problems)
    shown = value[:8] if key == "sources" else value  # the table shortens the sources hash
    assert f"{shown} *" in text and "problem(s) on host(s) node02" in text
    assert f"node02 (rank 3): {SAME_EVERYWHERE[key]}: {value}" in text


def test_when_rank_0_is_the_odd_one_out_rank_0_is_named_not_the_majority():
    recs = job()
    recs[0]["revision"] = "old"
    assert named(compare(recs)) == {("hvpmtl revision", 0, "node01")}


def test_a_tie_is_judged_against_rank_0():
    recs = job(2)
    recs[1]["torch"] = "2.13.0"
    assert named(compare(recs)) == {("torch", 1, "node01")}


def test_a_rank_with_another_data_index_or_none_is_named():
    recs = job()
    recs[2]["index"] = dict(recs[2]["index"], id="sha256:" + "cd" * 32, samples=9)
    recs[1]["index"] = {"path": "/data/train.txt.hvpidx", "error": "/data/train.txt.hvpidx: no data index"}
    problems = compare(recs)
    assert named(problems) == {("data index", 2, "node02"), ("data index", 1, "node01")}
    msg = {p.rank: p.message for p in problems}
    assert "sha256:cdcdcdcdcdcdcdcd" in msg[2] and "9 samples" in msg[2]
    assert "no data index" in msg[1]
    assert "FAIL" in report(recs, problems).splitlines()[3]  # rank 1's row


def test_no_index_to_check_is_a_note_not_a_problem():
    recs = job(2)
    for r in recs:
        r["index"] = {"note": "data.format tensors: no data index"}
    assert compare(recs) == []
    assert "data index (rank 0): data.format tensors: no data index" in report(recs, [])


def test_output_dir_not_shared_or_not_writable_names_the_rank():
    recs = job()
    # rank 2 cannot write (its node lacks the mount): named once, not also as "rank 0 does not see its file"
    recs[2]["output_dir"] = {"path": "/shared/run", "errors": ["cannot write /shared/run/x: No such file"],
                             "write_error": "cannot write /shared/run/x: No such file", "mtime_offset_s": None}
    # rank 3 wrote into a local directory of the same name: rank 0 does not see its file
    recs[0]["output_dir"]["unseen"] = [2, 3]
    problems = compare(recs)
    assert named(problems) == {("run.output_dir", 2, "node02"), ("run.output_dir", 3, "node02")}
    msg = {p.rank: p.message for p in problems}
    assert "No such file" in msg[2] and "not one shared directory" in msg[3]


def test_a_clock_off_by_more_than_the_limit_is_named_both_ways():
    recs = job()
    recs[1]["clock"] += 9.0  # against rank 0
    recs[3]["output_dir"]["mtime_offset_s"] = -7.5  # against the shared file system's mtimes
    problems = compare(recs, Limits(max_clock_skew_s=5.0))
    assert named(problems) == {("clock", 1, "node01"), ("clock", 3, "node02")}
    assert compare(recs, Limits(max_clock_skew_s=10.0)) == []
    assert "+9.01 FAIL" in report(recs, problems)


def test_gpu_memory_below_the_need_fails_and_a_cpu_rank_is_reported_not_judged():
    recs = job()
    recs[2]["memory"] = {"kind": "gpu", "free_gb": 12.0, "total_gb": 80.0}
    recs[3]["memory"] = {"kind": "cpu", "free_gb": 17.5, "total_gb": None}
    problems = compare(recs)
    assert named(problems) == {("GPU memory", 2, "node02")}
    assert "12.0 GiB free of 80.0, the config needs 20.0 GiB" in problems[0].message
    text = report(recs, problems)
    assert "12.0 / 20.0" in text and "no GPU, RAM 17.5 free" in text


def test_allreduce_bandwidth_is_judged_only_when_a_minimum_is_given_and_a_corrupt_sum_fails():
    recs = job()
    assert compare(recs, Limits(min_busbw_gbs=0.0)) == []
    assert len(compare(recs, Limits(min_busbw_gbs=10.0))) == 4
    recs[1]["allreduce"] = {"error": "all-reduce of ones summed to (3.0, 4.0), not 4"}
    assert named(compare(recs)) == {("all-reduce", 1, "node01")}


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_the_memory_estimate_reads_the_zero_stage_of_a_job_whose_batch_sizes_are_already_checked(stage):
    from hvpmtl.config import check_batch_sizes, load_config
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/pretrain_vit_b.yaml", [f"run.ds_config={root}/ds_configs/zero{stage}.json"])
    check_batch_sizes(cfg, 8)  # what the doctor's preflight does first: 32 x 4 x 8 = 1024
    assert zero_stage(cfg) == stage  # not ZeRO-2 by a swallowed batch-size error at world size 1


def test_format_table_aligns_columns():
    text = format_table(["a", "bb"], [["xxx", "y"], ["z", "wwww"]])
    assert text.splitlines() == ["a    bb", "---  ----", "xxx  y", "z    wwww"]


# ----------------------------------------------------------------------------- one rank's pieces

def write_list(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{ln}\n" for ln in lines))
    return path


def test_index_identity_is_the_stored_sha256_of_the_whole_file(tmp_path):
    lst = write_list(tmp_path / "train.txt", ["a/1.jpg\t0:1\t2:0.9", "b/2.jpg\t1:1"])
    idx = build_list_index(lst, num_classes=4, log=lambda m: None)
    data = idx.read_bytes()
    ident = index_identity(idx)
    digest = ident["id"].removeprefix("sha256:").encode()
    # independent: the sha256 of every byte of the file, the digest's two copies (the schema after the magic and
    # in the footer) read as the blank its writer hashed
    assert data.count(digest) == 2 and hashlib.sha256(data.replace(digest, SHA_BLANK)).hexdigest() == digest.decode()
    assert ident["samples"] == 2 and ident["bytes"] == len(data)
    copy_ = tmp_path / "copy.hvpidx"
    shutil.copy(idx, copy_)
    assert index_identity(copy_)["id"] == ident["id"]  # a copy on another node is the same index
    other = build_list_index(write_list(tmp_path / "other.txt", ["a/1.jpg\t0:1\t2:0.9", "b/2.jpg\t3:1"]),
                             num_classes=4, log=lambda m: None)
    assert index_identity(other)["id"] != ident["id"]


def test_index_identity_of_a_missing_or_damaged_index_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no data index"):
        index_identity(tmp_path / "none.hvpidx")
    lst = write_list(tmp_path / "train.txt", ["a/1.jpg\t0:1"])
    idx = build_list_index(lst, num_classes=2, log=lambda m: None)
    data = idx.read_bytes()
    digest = DataIndex(idx).checksum.encode()
    idx.write_bytes(data.replace(digest, b"garbage!" + digest[8:]))
    with pytest.raises(DataError, match="no sha256 checksum"):
        index_identity(idx)


def test_index_path_follows_the_config(tmp_path):
    from hvpmtl.config import load_config

    cfg = load_config(TINY)
    assert index_path_of(cfg) == (None, "data.format tensors: no data index")
    cfg = load_config(TINY, ["data.format=tencent", f"data.list_file={tmp_path}/t.txt"])
    assert index_path_of(cfg) == (tmp_path / "t.txt.hvpidx", "")
    cfg = load_config(TINY, ["data.format=tencent", f"data.list_file={tmp_path}/t.txt", f"data.index={tmp_path}/i"])
    assert index_path_of(cfg) == (tmp_path / "i", "")


def test_probes_round_trip_and_say_what_is_wrong(tmp_path):
    offset, err = write_probe(tmp_path, "n1", 3)
    assert err == "" and abs(offset) < 2.0  # the same machine's clock and file system
    assert read_probe(tmp_path, "n1", 3) == ""
    assert "is not there" in read_probe(tmp_path, "n1", 4)
    assert "is not there" in read_probe(tmp_path, "n2", 3)  # another run's nonce
    (tmp_path / probe_name("n3", 0)).write_text("other")
    assert "not what was written" in read_probe(tmp_path, "n3", 0)
    offset, err = write_probe(tmp_path / "missing", "n1", 0)
    assert offset is None and "cannot write" in err


def test_model_state_bytes_by_hand():
    # 1000 params, 4 ranks. bf16 ZeRO-2: 2000 weights + 2000/4 grads + 12000/4 Adam = 5500, + fp32 teacher 4x500
    assert model_state_bytes(1000, 500, 4, "bf16", 2) == 2000 + 500 + 3000 + 2000
    # stage 0: nothing partitioned
    assert model_state_bytes(1000, 0, 4, "bf16", 0) == 2000 + 2000 + 12000
    # fp32 ZeRO-1: 4000 weights + 4000 grads + 8000/4 (m, v)
    assert model_state_bytes(1000, 0, 4, "fp32", 1) == 4000 + 4000 + 2000


def test_gradient_numel_counts_the_students_trainable_parameters():
    import torch

    from hvpmtl.config import load_config
    from hvpmtl.models.meta_arch import Student

    cfg = load_config(TINY)
    params, teacher = gradient_numel(cfg)
    torch.manual_seed(0)
    real = Student(cfg)  # the real module on the CPU: the meta count must agree
    assert params == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert teacher == sum(p.numel() for m in (real.backbone, real.label_decoder) for p in m.parameters())


def test_revision_env_override_and_sources_hash_follows_content(tmp_path, monkeypatch):
    monkeypatch.setenv(REVISION_ENV, "planted-1")
    assert revision() == "planted-1"
    monkeypatch.delenv(REVISION_ENV)
    from hvpmtl import __version__

    assert revision(tmp_path) == f"{__version__} (no git)"  # not a checkout
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    first = sources_hash(pkg)
    assert sources_hash(pkg) == first
    (pkg / "sub" / "b.py").write_text("y = 3\n")
    assert sources_hash(pkg) != first


# ----------------------------------------------------------------------------- the command lines

def test_hvpmtl_doctor_prints_how_to_start_it(capsys):
    from hvpmtl.cli import main

    assert main(["doctor", "--config", "configs/pretrain_vit_b.yaml", "--set", "run.name=a b"]) == 0
    out = capsys.readouterr().out
    assert "deepspeed --hostfile hosts --launcher pdsh" in out and "launchers/doctor.py" in out
    assert "sbatch --nodes N launchers/slurm/doctor.sbatch --config configs/pretrain_vit_b.yaml" in out
    assert "--set 'run.name=a b'" in out


def test_the_launcher_parser_takes_deepspeeds_local_rank_and_the_cli_the_same_options():
    a = doctor_parser().parse_args(["--config", "c.yaml", "--local_rank=1", "--set", "x=1"])
    assert (a.config, a.overrides, a.allreduce_numel, a.timeout_s) == ("c.yaml", ["x=1"], 0, 60)
    b = build_parser().parse_args(["doctor", "--config", "c.yaml", "--local", "2"])
    assert (b.local, b.max_clock_skew_s) == (2, 5.0)


# ----------------------------------------------------------------------------- a real single-rank run

@pytest.fixture
def single_rank(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(sys, "argv", ["launchers/doctor.py"])


def run_doctor(*args: str) -> int:
    return preflight.main(doctor_parser().parse_args(["--config", str(TINY), *args]))


def test_one_rank_passes_and_leaves_nothing_behind(tmp_path, single_rank, capsys):
    out = tmp_path / "run"
    assert run_doctor("--set", f"run.output_dir={out}") == preflight.EXIT_OK
    text = capsys.readouterr().out
    assert "doctor: all 1 rank(s) on 1 host(s) passed" in text, text
    assert "no GPU, RAM" in text and "one rank: no traffic" in text
    assert not out.exists()  # the doctor made it for its probe and removed it again


def test_one_rank_with_an_output_dir_it_cannot_create_fails_with_7(tmp_path, single_rank, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert run_doctor("--set", f"run.output_dir={blocker}/run") == preflight.EXIT_CHECK_FAILED
    text = capsys.readouterr().out
    assert "(rank 0): run.output_dir: cannot create" in text and "Not a directory" in text, text


def test_a_config_error_exits_2(single_rank, capsys):
    assert run_doctor("--set", "optim.lr=-1") == preflight.EXIT_CONFIG
    assert "config error" in capsys.readouterr().err


def test_a_global_batch_that_does_not_fit_the_world_size_exits_2(single_rank, capsys):
    # 4 per rank never makes 6: the same refusal training gives, before any check runs
    assert run_doctor("--set", "optim.global_batch_size=6") == preflight.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "config error" in err and "global_batch_size" in err, err
