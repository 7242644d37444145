"""Shards on S3-compatible object storage (issue 22), against a real S3 server on 127.0.0.1: moto's
`moto_server` in its own process (DALI's S3 client blocks the GIL while it builds a pipeline, so a server
thread in the test process would starve). Requests are counted on the server side, from its access log.

Credentials are dummies set in the environment, as a user's would be; the endpoint comes from
AWS_ENDPOINT_URL, which both boto3 and DALI's S3 client read.
"""
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from subprocs import free_port, subprocess_env

from hvpmtl.cli import main as cli_main
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.formats.object_store import ObjectStore, S3Uri, scrub, shown_endpoint
from hvpmtl.data.loaders.pretrain import build_pretrain_loader
from hvpmtl.data.loaders.shard_cache import FileLock, ShardCache, dali_share, view_folder
from hvpmtl.data.tools.to_shards import write_shards

BIN = Path(sys.executable).parent
SECRET = "hvpmtl-test-secret-Zq81"
NUM_TRAIN = 40  # tests/data/conftest.py


class MotoServer:
    """moto_server on 127.0.0.1 and a free port; its access log (one line per request) in a file."""

    def __init__(self, log_path: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        import urllib.request
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"moto_server did not start: {log_path.read_text()[-2000:]}")

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request so far, from the access log."""
        self.log.flush()
        return re.findall(r'"(?:\x1b\[[0-9;]*m)*(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP', self.log_path.read_text())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def aws_env(endpoint: str) -> dict:
    """What a user sets (or keeps in ~/.aws): here dummies, and no file from the home folder."""
    return {"AWS_ACCESS_KEY_ID": "hvpmtl-test-key", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "2",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """The session's server, the environment pointing at it (also for child processes), bucket 'hvpmtl'."""
    tmp = tmp_path_factory.mktemp("s3")
    server = MotoServer(tmp / "moto.log")
    mp = pytest.MonkeyPatch()
    for k, v in {**aws_env(server.endpoint), "XDG_CACHE_HOME": str(tmp / "xdg")}.items():
        mp.setenv(k, v)
    ObjectStore("hvpmtl").client.create_bucket(Bucket="hvpmtl")
    yield server
    mp.undo()
    server.stop()


@pytest.fixture(scope="session")
def bucket_shards(s3, syn, tmp_path_factory):
    """The synthetic set as 4 shards of 10, written to s3://hvpmtl/syn by `hvpmtl data to-shards`, and the
    same shards written locally by write_shards (the reference)."""
    tmp = tmp_path_factory.mktemp("bs")
    local = tmp / "local"
    write_shards(syn["list_file"], syn["root"], str(local), 10, num_classes=24, workers=1)
    rc = cli_main(["data", "to-shards", "--list", syn["list_file"], "--root", syn["root"], "--out", "s3://hvpmtl/syn",
                   "--shard-size", "10", "--num-classes", "24", "--workers", "1", "--stage", str(tmp / "stage")])
    assert rc == 0
    return {"uri": "s3://hvpmtl/syn", "local": local, "stage": tmp / "stage"}


def _loader(cfg, world=1, rank=0, batch=4):
    return build_pretrain_loader(cfg, batch_size=batch, patch_size=16, rank=rank, world_size=world, local_rank=rank,
                                 seed=0, dtype=torch.float32, log=lambda m: None)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [(b["index"].clone(), b["view1"].clone(), b["labels"].clone()) for b in loader]


def _same_batches(a, b):
    assert len(a) == len(b) > 0
    for (i1, v1, l1), (i2, v2, l2) in zip(a, b):
        assert torch.equal(i1, i2) and torch.equal(v1, v2) and torch.equal(l1, l2)


# ----------------------------------------------------------------------------- URIs, messages


def test_uri_parsing_and_nothing_secret_in_messages(monkeypatch):
    u = S3Uri.parse("s3://my-bucket/data/shards/")
    assert (u.bucket, u.key, str(u.child("m.json"))) == ("my-bucket", "data/shards", "s3://my-bucket/data/shards/m.json")
    assert str(S3Uri.parse("s3://b1k")) == "s3://b1k" and S3Uri.parse("s3://b1k").child("x").key == "x"
    for bad in ("/local/path", "s3://", "s3://UPPER/x", "s3:///x"):
        with pytest.raises(DataError, match="s3://bucket/prefix"):
            S3Uri.parse(bad)
    assert shown_endpoint("https://user:pw@minio.example:9000/?X-Amz=1") == "https://minio.example:9000/"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert scrub(f"echoed {SECRET}!") == "echoed ***!"


def test_endpoint_from_the_aws_config_file_reaches_dali_too(s3, tmp_path, monkeypatch):
    """A MinIO-style endpoint kept in ~/.aws/config (not the environment): boto3 finds it, and DALI, which
    reads only AWS_ENDPOINT_URL, is given it."""
    from hvpmtl.data.formats.object_store import dali_environment
    cfg = tmp_path / "config"
    cfg.write_text(f"[profile minio]\nendpoint_url = {s3.endpoint}\nregion = us-east-1\n")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(cfg))
    monkeypatch.setenv("AWS_PROFILE", "minio")
    store = ObjectStore("hvpmtl")
    assert store.endpoint == s3.endpoint and store.where == f"bucket 'hvpmtl' at {s3.endpoint}"
    store.check()
    assert dali_environment(store) == {"AWS_ENDPOINT_URL": s3.endpoint} == {"AWS_ENDPOINT_URL":
                                                                             os.environ["AWS_ENDPOINT_URL"]}


# ----------------------------------------------------------------------------- to-shards / validate


def test_to_shards_uploads_the_same_shards_and_validate_reads_them(s3, bucket_shards, capsys):
    store, uri = ObjectStore.for_uri(bucket_shards["uri"])
    objects = store.list(uri.key)
    local = bucket_shards["local"]
    names = sorted(p.name for p in local.iterdir() if p.suffix in (".tar", ".idx") or p.name in ("labels.npz",))
    assert sorted(n for n in objects if n != "manifest.json") == names  # no work files left behind
    for n in names:  # byte-identical to a local conversion (tars carry mtime 0)
        if n != "labels.npz":
            assert store.get_bytes(uri.child(n).key) == (local / n).read_bytes(), n
    m = json.loads(store.get_bytes(uri.child("manifest.json").key))
    assert m["num_samples"] == NUM_TRAIN and [s["bytes"] for s in m["shards"]] == \
        [(local / s["name"]).stat().st_size for s in m["shards"]]
    # the stage keeps no image data: uploaded tars are sparse placeholders
    assert all(p.stat().st_blocks == 0 for p in bucket_shards["stage"].glob("*.tar"))
    capsys.readouterr()
    assert cli_main(["data", "validate", "--shards", bucket_shards["uri"], "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{NUM_TRAIN} samples checked; 0 errors" in out
    gets = [p for m_, p in s3.requests() if m_ == "GET" and p.endswith(".tar")]
    assert sorted(set(p.rsplit("/", 1)[1] for p in gets)) == sorted(n for n in names if n.endswith(".tar"))
    # the data index of the prefix, built on the node's view (what training maps)
    assert cli_main(["data", "index", "--shards", bucket_shards["uri"]]) == 0
    view = view_folder(uri)
    assert f"{view}.hvpidx: {NUM_TRAIN} samples" in capsys.readouterr().out
    assert all(p.stat().st_blocks == 0 for p in view.glob("*.tar"))  # placeholders, no image data on the node


def test_to_shards_in_parts_on_separate_machines_then_merge(s3, syn, bucket_shards, tmp_path):
    """--part i/N from two stages (two machines), --merge from a third: the same folder as one run."""
    uri = "s3://hvpmtl/parts"
    common = ["data", "to-shards", "--list", syn["list_file"], "--root", syn["root"], "--out", uri, "--shard-size", "10",
              "--num-classes", "24", "--workers", "1"]
    for i in (0, 1):
        assert cli_main([*common, "--part", f"{i}/2", "--stage", str(tmp_path / f"m{i}")]) == 0
    store, u = ObjectStore.for_uri(uri)
    assert "manifest.json" not in store.list(u.key)  # not complete before the merge
    assert cli_main([*common, "--merge", "--stage", str(tmp_path / "m2")]) == 0
    objects = store.list(u.key)
    _, ref = ObjectStore.for_uri(bucket_shards["uri"])
    assert sorted(objects) == sorted(store.list(ref.key)) and not store.list(u.child(".work").key)
    for n in objects:
        if n.endswith((".tar", ".idx")):
            assert store.get_bytes(u.child(n).key) == store.get_bytes(ref.child(n).key), n
    m = json.loads(store.get_bytes(u.child("manifest.json").key))
    assert m["num_samples"] == NUM_TRAIN and len(m["shards"]) == 4


def test_validate_names_a_truncated_and_a_missing_object(s3, bucket_shards, tmp_path, capsys):
    store, src = ObjectStore.for_uri(bucket_shards["uri"])
    dst = S3Uri("hvpmtl", "damaged")
    for n in store.list(src.key):
        store.put_bytes(dst.child(n).key, store.get_bytes(src.child(n).key))
    tar = store.get_bytes(dst.child("shard-000001.tar").key)
    store.put_bytes(dst.child("shard-000001.tar").key, tar[:len(tar) // 2])  # truncated
    store.delete(dst.child("shard-000002.tar").key)  # missing
    capsys.readouterr()
    assert cli_main(["data", "validate", "--shards", str(dst), "--workers", "1", "--cache-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"shard-000001\.tar: error \[bad-shard\].*bytes in bucket 'hvpmtl' at http://127\.0\.0\.1", out), out
    assert re.search(r"shard-000002\.tar: error \[bad-shard\].*missing in bucket 'hvpmtl'", out)
    assert SECRET not in out


# ----------------------------------------------------------------------------- training reads the bucket


def test_loader_from_bucket_equals_local_shards_and_start_up_opens_no_tar(s3, syn, tiny_cfg, bucket_shards, tmp_path):
    local = _loader(tiny_cfg(syn, format="shards", shards=str(bucket_shards["local"])))
    reference = [_epoch(local, e) for e in (0, 1)]
    before = len(s3.requests())
    cfg = tiny_cfg(syn, format="shards", shards=bucket_shards["uri"], cache_dir=str(tmp_path / "cache"))
    loader = _loader(cfg)
    start = s3.requests()[before:]
    assert not [p for _, p in start if p.endswith(".tar")]  # start-up: no image object opened
    assert loader.shards.tars[0] == "s3://hvpmtl/syn/shard-000000.tar"
    for e in (0, 1):
        _same_batches(_epoch(loader, e), reference[e])
    # a second start-up on the node: one request (manifest.json), no listing, the index mapped from local disk
    before = len(s3.requests())
    again = _loader(cfg)
    assert s3.requests()[before:] == [("GET", "/hvpmtl/syn/manifest.json")]
    assert Path(again.labels.index.path).is_relative_to(tmp_path / "cache")


def test_node_cache_fills_in_the_background_and_serves_the_next_epoch(s3, syn, tiny_cfg, bucket_shards, tmp_path):
    plain = _loader(tiny_cfg(syn, format="shards", shards=bucket_shards["uri"]))
    reference = [_epoch(plain, e) for e in (0, 1)]
    cfg = tiny_cfg(syn, format="shards", shards=bucket_shards["uri"], cache_dir=str(tmp_path / "c"), cache_limit_gb=1.0)
    loader = _loader(cfg)
    _same_batches(_epoch(loader, 0), reference[0])  # a miss: DALI streams the tars from the bucket
    loader.bucket.cache.wait()
    cached = sorted(p.name for p in loader.bucket.cache.folder.glob("*.tar"))
    assert cached == [f"shard-{i:06d}.tar" for i in range(4)]  # world 1: this rank reads every tar
    before = len(s3.requests())
    _same_batches(_epoch(loader, 1), reference[1])
    assert all(not t.startswith("s3://") for t in loader.shards.tars)
    assert not [p for m, p in s3.requests()[before:] if p.endswith(".tar")]  # read from local disk only


def test_dali_share_matches_the_readers_split():
    assert list(dali_share([10, 10, 10, 10], 0, 2)) == [0, 1] and list(dali_share([10, 10, 10, 10], 1, 2)) == [2, 3]
    assert list(dali_share([10, 10, 10], 1, 2)) == [1, 2]  # samples 15..29: the middle tar is shared
    assert list(dali_share([5, 0, 5], 1, 2)) == [2]


def test_cache_lru_limit_concurrent_fetch_and_killed_writer(s3, bucket_shards, tmp_path):
    store, uri = ObjectStore.for_uri(bucket_shards["uri"])
    sizes = {n: i.size for n, i in store.list(uri.key).items() if n.endswith(".tar")}
    names = sorted(sizes)
    one = max(sizes.values())
    folder = tmp_path / "tars"
    # a writer killed mid-download: its lock and partial file stay behind; a dead pid holds them
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder.mkdir()
    (folder / f".{names[0]}.lock").write_text(f"{os.uname().nodename} pid {dead.pid} since then\n")
    (folder / f".{names[0]}.part-{os.uname().nodename}-{dead.pid}").write_bytes(b"half")
    # two processes fetch the same tar at once: one download, both see the whole file
    script = (f"from hvpmtl.data.formats.object_store import ObjectStore; from hvpmtl.data.loaders.shard_cache import ShardCache\n"
              f"s, u = ObjectStore.for_uri('{bucket_shards['uri']}')\n"
              f"c = ShardCache('{folder}', {2 * one + one // 2}, s, u)\n"
              f"p = c.fetch('{names[0]}', {sizes[names[0]]}); print('fetched', c.fetched, p.stat().st_size)\n")
    before = len(s3.requests())
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env()) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(o.split()[1] for o in outs) == ["0", "1"] and all(o.split()[2] == str(sizes[names[0]]) for o in outs)
    gets = [p for m, p in s3.requests()[before:] if m == "GET" and p.endswith(names[0])]
    assert len(gets) == 1
    assert not list(folder.glob(".*.part-*")) and not list(folder.glob(".*.lock"))
    assert (folder / names[0]).read_bytes() == store.get_bytes(uri.child(names[0]).key)
    # LRU under a limit of 2.5 tars: the least recently used goes
    cache = ShardCache(folder, 2 * one + one // 2, store, uri)
    cache.fetch(names[1], sizes[names[1]])
    os.utime(folder / names[0], ns=(1, 1))
    os.utime(folder / names[1], ns=(2, 2))
    cache.path(names[0])  # used now: the most recent
    cache.fetch(names[2], sizes[names[2]])
    assert sorted(p.name for p in folder.glob("*.tar")) == sorted([names[0], names[2]])
    # a reader with the file open keeps reading it after eviction
    with open(folder / names[0], "rb") as f:
        cache.evict(10 * one)
        assert not (folder / names[0]).exists() and len(f.read()) == sizes[names[0]]


def test_file_lock_waits_for_a_live_holder(tmp_path):
    lock = FileLock(tmp_path / "x.lock", wait_s=0.5)
    assert lock.acquire()
    with pytest.raises(DataError, match="held by"):
        FileLock(tmp_path / "x.lock", wait_s=0.5).acquire()
    lock.release()
    assert FileLock(tmp_path / "x.lock").acquire()


# ----------------------------------------------------------------------------- faults


def test_missing_object_is_a_counted_skip_under_the_skip_policy(s3, syn, tiny_cfg, bucket_shards, tmp_path):
    store, src = ObjectStore.for_uri(bucket_shards["uri"])
    dst = S3Uri("hvpmtl", "lost-one")
    for n in store.list(src.key):
        if n != "shard-000003.tar":
            store.put_bytes(dst.child(n).key, store.get_bytes(src.child(n).key))
    lost = {int(json.loads(m)["id"]) for m in _members(bucket_shards["local"] / "shard-000003.tar", ".json")}
    cfg = dict(format="shards", shards=str(dst), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError) as e:
        _loader(tiny_cfg(syn, **cfg))
    assert "bad-shard" in str(e.value) and "is in no shard" in str(e.value) and "skip_corrupt" in str(e.value)
    loader = _loader(tiny_cfg(syn, skip_corrupt=True, **cfg))
    assert loader.skipped.skip_corrupt == len(lost) == 10 and loader.num_samples == NUM_TRAIN - 10
    assert "10 skip_corrupt" in loader.skipped_description()
    stored = {int(i) for b in loader for i in loader.shards.stored_ids[b["index"].numpy()]} \
        if loader.shards.stored_ids is not None else set()
    assert stored and not stored & lost


def _members(tar_path: Path, ext: str) -> list[bytes]:
    with tarfile.open(tar_path) as tf:
        return [tf.extractfile(m).read() for m in tf if m.name.endswith(ext)]


def _run_cli(args, env, timeout=300):
    p = subprocess.run([str(BIN / "hvpmtl"), *args], env=subprocess_env(**env), capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def test_unreachable_endpoint_and_refused_credentials_exit_2_naming_endpoint_and_bucket(s3, tmp_path):
    port = free_port()  # nothing listens there
    rc, out = _run_cli(["data", "validate", "--shards", "s3://hvpmtl/syn", "--cache-dir", str(tmp_path)],
                       aws_env(f"http://127.0.0.1:{port}"), timeout=120)
    assert rc == 2 and f"cannot reach bucket 'hvpmtl' at http://127.0.0.1:{port}" in out and "Traceback" not in out
    # a server that checks credentials: moto's IAM auth on, the key unknown to it
    strict = MotoServer(tmp_path / "strict.log")
    try:
        import urllib.request
        urllib.request.urlopen(urllib.request.Request(f"{strict.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                                      headers={"Content-Type": "text/plain"}), timeout=10)
        rc, out = _run_cli(["data", "validate", "--shards", "s3://hvpmtl/syn", "--cache-dir", str(tmp_path)],
                           aws_env(strict.endpoint), timeout=120)
    finally:
        strict.stop()
    assert rc == 2 and f"credentials refused by bucket 'hvpmtl' at {strict.endpoint}" in out, out
    assert "Traceback" not in out and SECRET not in out and "hvpmtl-test-key" not in out


@pytest.mark.slow
def test_outage_mid_epoch_is_a_clear_error_not_a_hang(s3, syn, bucket_shards, tmp_path):
    """The server stops while a loader reads the bucket: bounded retries, then a DataError naming the
    bucket (in a process of its own: DALI's S3 client keeps the first endpoint it sees)."""
    server = MotoServer(tmp_path / "outage.log")
    env = aws_env(server.endpoint)
    src_store, src = ObjectStore.for_uri(bucket_shards["uri"])
    script = f"""
import os, sys, torch
os.environ.update({env!r})
from hvpmtl.data.formats.object_store import ObjectStore
s = ObjectStore('outage'); s.client.create_bucket(Bucket='outage')
for n, b in {{n: open(os.path.join({str(bucket_shards['local'])!r}, n), 'rb').read()
             for n in os.listdir({str(bucket_shards['local'])!r}) if n.endswith(('.tar', '.idx', '.npz', '.json'))}}.items():
    s.put_bytes('ds/' + n, b)
from hvpmtl.config import DataConfig
from hvpmtl.data.formats.issues import DataError
from hvpmtl.data.loaders.pretrain import build_pretrain_loader
cfg = DataConfig(format='shards', shards='s3://outage/ds', num_classes=24, img_size=64, num_threads=1, device='cpu',
                 rand_augment_n=0, cache_dir={str(tmp_path / 'c')!r})
ld = build_pretrain_loader(cfg, batch_size=2, patch_size=16, rank=0, world_size=1, local_rank=0, seed=0)
ld.set_epoch(0); it = iter(ld); next(it); print('FIRST', flush=True); sys.stdin.readline()
try:
    for b in it: pass  # mid-epoch (unless DALI already holds the rest)
    ld.set_epoch(1)
    for b in ld: pass
    print('NO ERROR')
except DataError as e:
    print('DATAERROR', e)
"""
    p = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    try:
        seen = []
        while not seen or "FIRST" not in seen[-1]:
            seen.append(p.stdout.readline())
            if not seen[-1]:  # the child ended before its first batch
                pytest.fail("".join(seen)[-3000:])
        server.stop()  # the outage
        t = time.time()
        out, _ = p.communicate("go\n", timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
    assert "DATAERROR" in out and "s3://outage/ds" in out and "resumes from the last checkpoint" in out, out
    assert time.time() - t < 240 and SECRET not in out


# ----------------------------------------------------------------------------- 2 ranks through the launcher

ROOT = Path(__file__).resolve().parents[3]
STEPS = 6


def _launch_args(out, shards, *more):
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "launchers/pretrain.py", "--config", "configs/test_tiny.yaml", "--set", f"run.output_dir={out}",
            "--set", f"data.shards={shards}", "--set", "data.format=shards", "--set", "data.num_classes=24",
            "--set", "data.device=cpu", "--set", "data.rand_augment_n=0", "--set", "optim.micro_batch_size=2",
            "--set", f"optim.max_steps={STEPS}", "--set", "run.checkpoint_every=3", *more]


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_ranks_train_from_the_bucket_and_resume_exactly(s3, bucket_shards, tmp_path):
    """2 ranks from s3:// (node cache on), killed after the step-3 checkpoint and resumed: every step's
    losses equal a run from the same shards on local disk; no credential in the run's files or MLflow."""
    env = subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
    ref = subprocess.run(_launch_args(tmp_path / "ref", bucket_shards["local"]), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, (ref.stdout + ref.stderr)[-3000:]
    out = tmp_path / "bucket"
    cache = ["--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.cache_limit_gb=1"]
    proc = subprocess.Popen(_launch_args(out, bucket_shards["uri"], *cache), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    done = out / "checkpoints" / "step_00000003" / "COMPLETE"
    deadline = time.time() + 400
    while not done.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, 9)
    proc.wait(30)
    stopped = len(_metrics(out))
    assert 3 <= stopped < STEPS, "killed too late to test resume"
    again = subprocess.run(_launch_args(out, bucket_shards["uri"], *cache), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    assert "resumed from" in log and "step_00000003" in log
    a, b = _metrics(tmp_path / "ref"), _metrics(out)
    assert [m["step"] for m in b][-STEPS + 3:] == list(range(4, STEPS + 1))
    by_step = {m["step"]: m for m in b}
    for m in a:
        for k in ("loss", "asl", "swav", "mim", "distill"):
            assert abs(m[k] - by_step[m["step"]][k]) <= 1e-5 * max(1.0, abs(m[k])), (m["step"], k)
    for f in [*out.rglob("*"), tmp_path / "mlflow.db"]:
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
