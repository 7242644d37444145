"""Shards from an S3-compatible server vs local files (issue 22): start-up and read throughput at two sizes.

A real S3 server (moto's `moto_server`, installed with `pip install "moto[server]"`) runs on 127.0.0.1 in
its own process; its access log counts the requests. For each size (synthetic JPEGs of --px pixels,
shards of --shard-size) this measures
  * writing the shards: `to-shards` to a local folder vs `to-shards --out s3://...` (upload included);
  * start-up (prepare the data: what every rank does before the model is built) from the local folder,
    from the bucket on a new node (the view synced: listing + metadata copies; the data index built),
    and from the bucket on a node that has its view (one GET of manifest.json), with the requests made
    and the tar objects opened (0 expected);
  * read throughput of DALI's webdataset reader alone (no decode: what the storage delivers), one pass
    over every shard, from local files and from s3:// URIs; MB/s and samples/s.
Loopback numbers bound the client side (DALI's S3 client, boto3, moto's Python server), not a real
store's; the server is single-threaded Python, so S3 throughput here is a floor.

    nice -n 19 python benchmarks/object_store.py --sizes 400 2000 --json /tmp/os.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
BIN = Path(sys.executable).parent


class Server:
    def __init__(self, workdir: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "moto.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("moto_server did not start")

    def requests(self) -> list[tuple[str, str]]:
        self.log.flush()
        return re.findall(r'"(?:\x1b\[[0-9;]*m)*(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP', self.log_path.read_text())

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def reader_pass(paths: list[str], index_paths: list[str]) -> tuple[float, int, int]:
    """Seconds, samples and bytes of one pass of fn.readers.webdataset (jpg bytes, no decode)."""
    import numpy as np
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    n = sum(int(open(p).readline().split()[1]) for p in index_paths)
    batch = 32

    @pipeline_def(batch_size=batch, num_threads=2, device_id=None, prefetch_queue_depth=2)
    def pipe():
        return fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=["jpg"], dtypes=[types.UINT8],
                                     pad_last_batch=True, name="r")
    t = time.perf_counter()
    p = pipe()
    p.build()
    done = nbytes = 0
    while done < n:
        (out,) = p.run()
        for k in range(len(out)):
            if done < n:
                nbytes += np.array(out[k]).size
                done += 1
    return time.perf_counter() - t, done, nbytes


def run_size(n: int, args, server: Server, work: Path) -> dict:
    from hvpmtl.config import DataConfig
    from hvpmtl.data.loaders.pretrain import prepare_pretrain_data
    from hvpmtl.data.tools.synthetic import make_synthetic
    from hvpmtl.data.tools.to_shards import write_shards, write_shards_to_bucket
    d = work / f"n{n}"
    syn = make_synthetic(d / "syn", n, seed=1, holdout=0)
    row: dict = {"samples": n}
    t = time.perf_counter()
    write_shards(syn["list_file"], syn["root"], str(d / "local"), args.shard_size, num_classes=24, workers=2)
    row["to_shards_local_s"] = time.perf_counter() - t
    t = time.perf_counter()
    uri = f"s3://bench/n{n}"
    write_shards_to_bucket(syn["list_file"], syn["root"], uri, args.shard_size, stage_dir=str(d / "stage"),
                           num_classes=24, workers=2)
    row["to_shards_s3_s"] = time.perf_counter() - t
    row["data_mb"] = sum(p.stat().st_size for p in (d / "local").glob("*.tar")) / 2**20

    def start(shards, cache_dir=""):
        cfg = DataConfig(format="shards", shards=str(shards), num_classes=24, cache_dir=cache_dir, device="cpu")
        before = len(server.requests())
        t0 = time.perf_counter()
        data = prepare_pretrain_data(cfg, log=lambda m: None)
        dt = time.perf_counter() - t0
        reqs = server.requests()[before:]
        return data, dt, len(reqs), sum(p.endswith(".tar") and m == "GET" for m, p in reqs)
    local, row["start_local_s"], _, _ = start(d / "local")
    data, row["start_s3_new_node_s"], row["start_s3_new_node_requests"], tars1 = start(uri, str(d / "node"))
    data, row["start_s3_s"], row["start_s3_requests"], tars2 = start(uri, str(d / "node"))
    row["start_tar_gets"] = tars1 + tars2
    dt, k, nb = reader_pass(local.shards.tars, local.shards.index_paths)
    row["read_local_mb_s"], row["read_local_samples_s"] = nb / 2**20 / dt, k / dt
    before = len(server.requests())
    dt, k, nb = reader_pass(data.shards.tars, data.shards.index_paths)
    row["read_s3_mb_s"], row["read_s3_samples_s"] = nb / 2**20 / dt, k / dt
    row["read_s3_gets_per_sample"] = sum(m == "GET" for m, _ in server.requests()[before:]) / k
    # the node cache's way: whole objects through boto3 (one GET each), then local reads
    from hvpmtl.data.loaders.shard_cache import ShardCache
    b = data.bucket
    cache = ShardCache(d / "cache", 2**40, b.store, b.uri)
    t = time.perf_counter()
    b.store.map(lambda item: cache.fetch(*item), list(zip(b.names, b.sizes)), threads=4)
    row["fetch_s3_mb_s"] = sum(b.sizes) / 2**20 / (time.perf_counter() - t)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[400, 2000], help="images per data set")
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--workdir", default="/tmp/hvpmtl-object-store-bench")
    ap.add_argument("--json", default="")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    server = Server(work)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": server.endpoint, "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull})
    try:
        from hvpmtl.data.formats.object_store import ObjectStore
        ObjectStore("bench").client.create_bucket(Bucket="bench")
        rows = [run_size(n, args, server, work) for n in args.sizes]
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    keys = ["samples", "data_mb", "to_shards_local_s", "to_shards_s3_s", "start_local_s", "start_s3_new_node_s",
            "start_s3_new_node_requests", "start_s3_s", "start_s3_requests", "start_tar_gets", "read_local_mb_s",
            "read_s3_mb_s", "read_local_samples_s", "read_s3_samples_s", "read_s3_gets_per_sample", "fetch_s3_mb_s"]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    from provenance import provenance_line  # what the numbers below were measured with
    print(provenance_line(), flush=True)
    main()
