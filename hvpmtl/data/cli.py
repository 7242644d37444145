"""`hvpmtl data ...`: make-synthetic, validate, to-shards, index-shards."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hvpmtl.data.issues import DataError


def _make_synthetic(args) -> int:
    from hvpmtl.data.synthetic import make_synthetic
    t = time.time()
    paths = make_synthetic(args.out, args.num_images, seed=args.seed, holdout=args.holdout, shard_size=args.shard_size)
    n = args.num_images + args.holdout
    print(f"wrote {n} images in {time.time() - t:.1f} s")
    for k, v in paths.items():
        print(f"{k}: {v}")
    sets = [f"data.root={paths['root']}", f"data.list_file={paths['list_file']}",
            f"data.dictionary={paths['dictionary']}", "data.num_classes=24"]
    if "holdout_list" in paths:
        sets.append(f"data.holdout_list={paths['holdout_list']}")
    print("train with: " + " ".join(f"--set {s}" for s in sets))
    return 0


def _validate(args) -> int:
    from hvpmtl.data.validate import format_report, validate_list, validate_shards, write_skip_list
    if bool(args.list) == bool(args.shards):
        print("hvpmtl data validate: give either --list (with --root) or --shards", file=sys.stderr)
        return 2
    t = time.time()
    if args.shards:
        rep = validate_shards(args.shards, num_classes=args.num_classes, full_decode=args.full_decode)
    else:
        if not args.root:
            print("hvpmtl data validate: --list needs --root (the folder the paths are relative to)", file=sys.stderr)
            return 2
        rep = validate_list(args.list, args.root, dictionary=args.dictionary, num_classes=args.num_classes,
                            full_decode=args.full_decode, workers=args.workers)
    print(format_report(rep, args.max_per_code))
    print(f"({time.time() - t:.1f} s)")
    if args.skip_list:
        n = write_skip_list(args.skip_list, rep.errors)
        print(f"skip list: {args.skip_list} ({n} entries); train with --set data.skip_list={args.skip_list}")
    return 1 if rep.errors else 0


def _to_shards(args) -> int:
    from hvpmtl.data.shards import write_shards
    from hvpmtl.data.tencent import read_dictionary
    from hvpmtl.data.validate import prepare_list
    num_classes = args.num_classes
    if args.dictionary and num_classes is None:
        num_classes = len(read_dictionary(args.dictionary))
    labels, skipped = prepare_list(args.list, args.root, num_classes=num_classes, skip_corrupt=args.skip_corrupt,
                                   skip_list=args.skip_list or "")
    t = time.time()
    m = write_shards(args.list, args.root, args.out, args.shard_size, seed=args.seed, num_classes=num_classes,
                     labels=labels)
    print(f"wrote {m['num_samples']} samples in {len(m['shards'])} shards to {args.out} ({time.time() - t:.1f} s); "
          f"{skipped} bad samples left out")
    return 0


def _index_shards(args) -> int:
    from hvpmtl.data.shards import write_index
    tars = sorted(Path(args.folder).glob("*.tar"))
    if not tars:
        print(f"{args.folder}: no .tar files", file=sys.stderr)
        return 1
    for t in tars:
        print(f"{t.with_suffix('.idx')}: {write_index(t)} samples")
    return 0


def _guard(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return run


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="data sets: synthetic data, validation, shards")
    sub = p.add_subparsers(dest="data_cmd", required=True)

    s = sub.add_parser("make-synthetic", help="write a synthetic multi-label data set in Tencent format")
    s.add_argument("--out", required=True)
    s.add_argument("--num-images", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--holdout", type=int, default=0, help="images in a held-out split (holdout.txt)")
    s.add_argument("--shard-size", type=int, default=0, help="also write the training split as shards of this size")
    s.set_defaults(func=_guard(_make_synthetic))

    v = sub.add_parser("validate", help="check a list file and its images, or a shard folder")
    v.add_argument("--list")
    v.add_argument("--root", help="image root the list's paths are relative to")
    v.add_argument("--dictionary")
    v.add_argument("--num-classes", type=int)
    v.add_argument("--shards", help="a shard folder written by to-shards")
    v.add_argument("--skip-list", help="write the samples with errors here (for data.skip_list)")
    v.add_argument("--full-decode", action="store_true", help="decode every image with PIL (slow, finds more)")
    v.add_argument("--workers", type=int, default=16, help="threads for the image checks")
    v.add_argument("--max-per-code", type=int, default=20, help="issues printed per kind")
    v.set_defaults(func=_guard(_validate))

    t = sub.add_parser("to-shards", help="convert a list file to shuffled webdataset shards with DALI indices")
    t.add_argument("--list", required=True)
    t.add_argument("--root", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--shard-size", type=int, default=1000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--dictionary")
    t.add_argument("--num-classes", type=int)
    t.add_argument("--skip-list", help="the validator's skip list: leave those samples out")
    t.add_argument("--skip-corrupt", action="store_true", help="leave bad samples out instead of stopping")
    t.set_defaults(func=_guard(_to_shards))

    i = sub.add_parser("index-shards", help="(re)write the DALI index of every .tar in a folder")
    i.add_argument("folder")
    i.set_defaults(func=_guard(_index_shards))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="hvpmtl")
    add_parser(parser.add_subparsers(dest="group", required=True))
    a = parser.parse_args()
    sys.exit(a.func(a))
