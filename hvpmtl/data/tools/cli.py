"""`hvpmtl data ...`: make-synthetic, index, validate, to-shards, index-shards.

Exit codes: 0 done (validate: no errors), 1 validate found errors, 2 unusable data or arguments
(a message naming the file, no traceback).
"""
from __future__ import annotations

import argparse
import sys
import time
import zipfile
from pathlib import Path

from hvpmtl.cli import non_negative_int, positive_int
from hvpmtl.data.formats.issues import DataError

FMT = argparse.ArgumentDefaultsHelpFormatter


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def _num_classes(args):
    if getattr(args, "dictionary", None) and args.num_classes is None:
        from hvpmtl.data.formats.dictionary import read_dictionary
        return len(read_dictionary(args.dictionary))
    return args.num_classes


def _make_synthetic(args) -> int:
    from hvpmtl.data.tools.synthetic import write_synthetic
    t = time.time()
    res = write_synthetic(args.out, args.num_images, seed=args.seed, holdout=args.holdout, shard_size=args.shard_size,
                          imagefolder=args.imagefolder, imagefolder_train=args.imagefolder_train, coco=args.coco,
                          coco_train=args.coco_train, coco_val=args.coco_val, ade20k=args.ade20k,
                          ade20k_train=args.ade20k_train, ade20k_val=args.ade20k_val, progress=True)
    for msg in res.notes:
        _note(msg)
    for msg in res.kept:
        print(f"kept {msg}")
    print(f"wrote {res.images_written} images in {time.time() - t:.1f} s")
    paths = res.paths
    for k, v in paths.items():
        print(f"{k}: {v}")
    sets = [f"data.root={paths['root']}", f"data.list_file={paths['list_file']}",
            f"data.dictionary={paths['dictionary']}", "data.num_classes=24"]
    if "holdout_list" in paths:
        sets.append(f"data.holdout_list={paths['holdout_list']}")
    print("train with: " + " ".join(f"--set {s}" for s in sets))
    if "imagefolder_train" in paths:
        print(f"fine-tune with: --set data.train_dir={paths['imagefolder_train']} "
              f"--set data.val_dir={paths['imagefolder_val']}")
    if "coco_train_ann" in paths:
        print("fine-tune detection / instance segmentation (COCO) with: --set data.format=coco " + " ".join(
            f"--set data.{s}_{k}={paths[f'coco_{s}_{k}']}" for s in ("train", "val") for k in ("ann", "images")))
    if "ade20k_root" in paths:  # label 0 is ignored (ADE20K's protocol): the 8 shapes are the classes
        print(f"fine-tune semantic segmentation (ADE20K) with: --set data.format=ade20k "
              f"--set data.root={paths['ade20k_root']} --set data.num_classes=8")
    return 0


def _index(args) -> int:
    from hvpmtl.data.formats.index_build import build_list_index, build_shard_index
    from hvpmtl.data.formats.index_file import DataIndex
    from hvpmtl.data.formats.index_format import default_index_path
    from hvpmtl.data.formats.index_fresh import up_to_date
    from hvpmtl.data.tools.jobs import Progress
    if args.show is not None and not (args.list or args.shards):
        if not args.show and not args.out:
            print("hvpmtl data index --show: name the index (--show INDEX), or its --list or --shards",
                  file=sys.stderr)
            return 2
        return _show_index(Path(args.show or args.out), None, None, args.num_classes)
    if bool(args.list) == bool(args.shards):
        print("hvpmtl data index: give either --list or --shards", file=sys.stderr)
        return 2
    if args.shards and _is_s3(args.shards):  # issue 22: index the node's view of the bucket prefix
        args.shards = str(_bucket_view(args.shards, args.cache_dir))
    kind, source = ("list", args.list) if args.list else ("shards", args.shards)
    out = Path(args.out) if args.out else default_index_path(source)
    num_classes = _num_classes(args) if args.list else args.num_classes
    if args.show is not None:
        return _show_index(Path(args.show) if args.show else out, kind, source, num_classes)
    if args.verify:
        return _verify_index(out, kind, source, num_classes)
    t = time.perf_counter()
    if not args.force and out.exists():
        why = up_to_date(out, kind, source, num_classes)
        if not why:
            print(f"{out}: up to date (content hash and checksum verified, {time.perf_counter() - t:.1f} s); "
                  "--force rebuilds it anyway")
            return 0
        print(f"rebuilding {out}: {why}")
    if args.list:
        prog = Progress(f"index {Path(args.list).name}", Path(args.list).stat().st_size if Path(args.list).exists()
                        else 0, unit="B")
        path = build_list_index(args.list, out, num_classes=num_classes, progress=prog, threads=args.threads)
        prog.close()
    else:
        path = build_shard_index(args.shards, out)
    dt = time.perf_counter() - t
    idx = DataIndex(path)
    h = idx.header
    errors = sum(v for k, v in h.get("issue_counts", {}).items() if k in _error_codes())
    print(f"{path}: {h['num_samples']:,} samples, {h['nnz']:,} labels, {path.stat().st_size / 2**20:.1f} MiB, "
          f"{dt:.1f} s ({h['num_lines'] / max(dt, 1e-9):,.0f} lines/s); {errors} parse errors "
          f"({', '.join(f'{k}: {v}' for k, v in sorted(h.get('issue_counts', {}).items())) or 'no issues'})")
    if errors:
        print(f"`hvpmtl data validate --list {args.list} --root ROOT` lists them with file:line")
    return 0


def _verify_index(out: Path, kind: str, source: str, num_classes) -> int:
    """`index --verify`: read the whole index (checksum, invariants) and check it is fresh by content."""
    from hvpmtl.data.formats.index_fresh import index_command, up_to_date
    t = time.perf_counter()
    why = up_to_date(out, kind, source, num_classes)
    if why:
        print(f"error: {out}: {why}\nrebuild it with `{index_command(kind, source, num_classes, str(out))} --force`",
              file=sys.stderr)
        return 2
    print(f"{out}: verified (checksum, structure, fresh by content) in {time.perf_counter() - t:.1f} s")
    return 0


def _show_index(path: Path, kind, source, num_classes) -> int:
    """`index --show`: what the index holds, what it was built from, and whether it is fresh (no array is
    changed; the class ids and verdicts are counted)."""
    from hvpmtl.data.formats.index_file import DataIndex
    from hvpmtl.data.formats.index_fresh import staleness
    idx = DataIndex(path)
    try:
        if kind is not None and idx.kind != kind:
            fresh = f"no: it indexes {idx.kind}, not {kind}"
        else:
            try:
                why = staleness(idx, source or idx.source, num_classes)
                fresh = f"no: {why}" if why else "yes (by size and mtime; `--verify` also checks content and checksum)"
            except DataError as e:
                fresh = f"unknown: {e}"
        print("\n".join(idx.summary() + [f"  fresh        {fresh}"]))
    finally:
        idx.close()
    return 0


def _error_codes():
    from hvpmtl.data.formats.issues import CODES
    return {k for k, (sev, _) in CODES.items() if sev == "error"}


def _validate(args) -> int:
    from hvpmtl.data.tools.jobs import parse_part
    from hvpmtl.data.tools.validate import format_report, validate_list, validate_shards, write_skip_list
    if bool(args.list) == bool(args.shards):
        print("hvpmtl data validate: give either --list (with --root) or --shards", file=sys.stderr)
        return 2
    out_skip = args.write_skip_list
    if args.skip_list:
        _note("validate --skip-list is now --write-skip-list (it writes the file); the old spelling still works")
        out_skip = out_skip or args.skip_list
    part = parse_part(args.part)
    if part and args.merge:
        print("hvpmtl data validate: --part and --merge go in separate runs (the parts first)", file=sys.stderr)
        return 2
    t = time.time()
    common = dict(full_decode=args.full_decode, workers=args.workers, max_pixels=args.max_pixels,
                  index_path=args.index or None, part=part, merge_only=args.merge, progress=True)
    if args.shards:
        if _is_s3(args.shards):  # issue 22
            from hvpmtl.data.tools.validate import validate_bucket_shards
            rep = validate_bucket_shards(args.shards, cache_dir=args.cache_dir, num_classes=args.num_classes, **common)
        else:
            rep = validate_shards(args.shards, num_classes=args.num_classes, **common)
    else:
        if not args.root:
            print("hvpmtl data validate: --list needs --root (the folder the paths are relative to)", file=sys.stderr)
            return 2
        rep = validate_list(args.list, args.root, dictionary=args.dictionary, num_classes=args.num_classes,
                            allow_outside_root=args.allow_outside_root, **common)
    print(format_report(rep, args.max_per_code))
    print(f"({time.time() - t:.1f} s)")
    if part:
        print(f"part {part[0]}/{part[1]} checked; when every part is done, run the same command with --merge "
              "instead of --part to record the verdicts in the data index")
    if out_skip:
        n = write_skip_list(out_skip, rep.errors)
        print(f"skip list: {out_skip} ({n} entries); train with --set data.skip_list={out_skip}")
    return 1 if rep.errors else 0


def _to_shards(args) -> int:
    from hvpmtl.data.tools.jobs import parse_part
    from hvpmtl.data.tools.to_shards import write_shards
    skip = args.read_skip_list
    if args.skip_list:
        _note("to-shards --skip-list is now --read-skip-list (it reads the validator's file); the old spelling "
              "still works")
        skip = skip or args.skip_list
    part = parse_part(args.part)
    t = time.time()
    if _is_s3(args.out):  # issue 22: through a local staging folder, uploaded shard by shard
        from functools import partial

        from hvpmtl.data.tools.to_shards import write_shards_to_bucket
        write_shards = partial(write_shards_to_bucket, stage_dir=args.stage)
    m = write_shards(args.list, args.root, args.out, args.shard_size, seed=args.seed, num_classes=_num_classes(args),
                     skip_corrupt=args.skip_corrupt, skip_list=skip or "", max_pixels=args.max_pixels,
                     workers=args.workers, part=part, merge_only=args.merge, progress=True, index_path=args.index)
    if m is None:
        print(f"part {part[0]}/{part[1]} written to {args.out} ({time.time() - t:.1f} s); when every part is done, "
              "run the same command with --merge instead of --part")
        return 0
    lo = m["left_out"]
    print(f"wrote {m['num_samples']} samples in {len(m['shards'])} shards to {args.out} ({time.time() - t:.1f} s); "
          f"left out: {lo['parse_errors']} parse errors, {lo['skip_list']} skip list, {lo['skip_corrupt']} "
          f"skip_corrupt, {lo['when_written']} when written")
    return 0


def _index_shards(args) -> int:
    """Rewrite every tar's DALI index from what the tar holds; a damaged tar is indexed up to the damage
    and named (exit 1), the others are rewritten all the same."""
    from hvpmtl.data.formats.shards import rewrite_index
    folder = Path(args.folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of .tar shards")
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        print(f"{folder}: no .tar files", file=sys.stderr)
        return 1
    damaged = 0
    for t in tars:
        try:
            n, damage = rewrite_index(t)
        except OSError as e:
            print(f"error: {t}: cannot be read or its index written: {e.strerror or e}", file=sys.stderr)
            damaged += 1
            continue
        print(f"{t.with_suffix('.idx')}: {n} samples")
        if damage:
            damaged += 1
            print(f"error: {t}: {damage}; indexed the {n} complete samples before it, the rest of the tar is "
                  "lost (samples in no tar are left out with data.skip_list or data.skip_corrupt, see `hvpmtl data "
                  f"validate --shards {folder} --write-skip-list FILE`), or rewrite the shards", file=sys.stderr)
    if damaged:
        print(f"{damaged} of {len(tars)} tars damaged; the other indices are rewritten", file=sys.stderr)
    return 1 if damaged else 0


# -- issue 22: shards in a bucket ------------------------------------------------------------------------------


def _is_s3(path) -> bool:
    from hvpmtl.data.formats.object_store import is_s3
    return is_s3(path)


def _bucket_view(uri: str, cache_dir: str) -> Path:
    """The node's local view of a bucket's shard folder (hvpmtl/data/loaders/shard_cache.py), synced."""
    from hvpmtl.data.formats.object_store import ObjectStore
    from hvpmtl.data.loaders.shard_cache import sync_view, view_folder
    store, u = ObjectStore.for_uri(uri)
    folder = view_folder(u, Path(cache_dir) / "views" if cache_dir else None)
    sync_view(store, u, folder, log_fn=lambda m: print(m, file=sys.stderr, flush=True))
    return folder


def _cache_dir_arg(p) -> None:
    p.add_argument("--cache-dir", default="", help="with s3://...: as data.cache_dir (where the node's view of the "
                                                   "bucket's shard metadata lives; default ~/.cache/hvpmtl/s3)")


def _guard(fn):
    """Errors caused by input -> one line, exit 2 (hvpmtl/cli.py's boundary); a bug keeps its traceback and
    says so. Shard metadata that trips a reader is named by formats/shards.py's diagnose."""
    from hvpmtl.cli import report_input_error

    def run(args) -> int:
        try:
            return fn(args)
        except (ValueError, TypeError, KeyError, IndexError, zipfile.BadZipFile, EOFError) as e:
            folder = getattr(args, "shards", None) or getattr(args, "folder", None)
            found = _diagnose(folder) if folder else None
            return report_input_error(found or e)
        except Exception as e:  # noqa: BLE001 -- the boundary
            return report_input_error(e)
    return run


def _diagnose(folder):
    from hvpmtl.data.formats.shards import diagnose
    return diagnose(folder) if not _is_s3(folder) else None


def _max_pixels_arg(p) -> None:
    from hvpmtl.data.formats.jpeg import DEFAULT_MAX_PIXELS
    p.add_argument("--max-pixels", type=non_negative_int, default=DEFAULT_MAX_PIXELS,
                   help="width x height (from the JPEG header) above which an image is an error (oversized), as "
                        "data.max_pixels; 0 = no bound")


def _scale_args(p, unit: str) -> None:
    p.add_argument("--workers", type=positive_int, default=None,
                   help="processes (default: every core this process may use)")
    p.add_argument("--part", default=None, metavar="i/N",
                   help=f"do part i (0-based) of N of the {unit}, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; "
                        "then one run with --merge")
    p.add_argument("--merge", action="store_true", help="after every --part is done: combine them (checks nothing)")
    p.add_argument("--index", default="", help="the data index ('' = beside the list file or shard folder, "
                                               "<source>.hvpidx), as data.index")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="data sets: synthetic data, the data index, validation, shards",
                              formatter_class=FMT)
    sub = p.add_subparsers(dest="data_cmd", required=True)

    s = sub.add_parser("make-synthetic", help="write a synthetic multi-label data set in Tencent format",
                       formatter_class=FMT)
    s.add_argument("--out", required=True, help="folder to write (created); the parts already there with the same "
                                                "arguments (recorded in synthetic.json) are kept, so outputs can be "
                                                "added to an existing data set")
    s.add_argument("--num-images", type=positive_int, required=True, help="images in the training split (train.txt)")
    s.add_argument("--seed", type=int, default=0, help="the data set is a function of the seed")
    s.add_argument("--holdout", type=non_negative_int, default=0, help="images in a held-out split (holdout.txt)")
    s.add_argument("--shard-size", type=non_negative_int, default=0, help="also write the training split as shards of this size "
                                                             "(0 = no shards)")
    s.add_argument("--imagefolder", action="store_true",
                   help="also write the fine-tuning data: imagefolder/train and imagefolder/val (--holdout images), "
                        "object-centric images (one object each), one folder per class = the object's colour and "
                        "texture (18 classes, in turn)")
    s.add_argument("--imagefolder-train", type=non_negative_int, default=None, metavar="N",
                   help="images in imagefolder/train (default: --num-images); small N = a low-label fine-tuning set")
    s.add_argument("--coco", action="store_true",
                   help="also write detection / instance segmentation data in COCO format: coco/{train,val}/*.jpg and "
                        "coco/annotations/instances_{train,val}.json, new scenes (not pre-training images), one "
                        "instance per object, category = its shape (8 categories, ids 1,2,3,5,8,13,21,34)")
    s.add_argument("--coco-train", type=non_negative_int, default=150, metavar="N", help="scenes in coco/train")
    s.add_argument("--coco-val", type=non_negative_int, default=None, metavar="N",
                   help="scenes in coco/val (None: --holdout, else 50)")
    s.add_argument("--ade20k", action="store_true",
                   help="also write semantic segmentation data laid out as ADE20K: ade20k/images/{training,"
                        "validation}/*.jpg and ade20k/annotations/.../*.png (label 0 = background, 1-8 = the shapes "
                        "of ade20k/classes.txt); the same scenes as --coco (scene i is the same image in both)")
    s.add_argument("--ade20k-train", type=non_negative_int, default=150, metavar="N", help="scenes in ade20k/images/training")
    s.add_argument("--ade20k-val", type=non_negative_int, default=None, metavar="N",
                   help="scenes in ade20k/images/validation (None: --holdout, else 50)")
    s.set_defaults(func=_guard(_make_synthetic))

    x = sub.add_parser("index", help="build the data index of a list file or shard folder (once per data set; "
                                     "training maps it)", formatter_class=FMT)
    x.add_argument("--list", help="a Tencent-format list file")
    x.add_argument("--shards", help="a shard folder written by to-shards, or s3://bucket/prefix")
    _cache_dir_arg(x)
    x.add_argument("--dictionary", help="dictionary file: its class count bounds the class indices")
    x.add_argument("--num-classes", type=positive_int, default=None, help="class count (default: the dictionary's, else "
                                                                 "unbounded)")
    x.add_argument("--out", default=None, help="index file (default: <source>.hvpidx beside the source)")
    x.add_argument("--threads", type=positive_int, default=None, help="parse threads (default: up to 4)")
    x.add_argument("--force", action="store_true",
                   help="rebuild even when the index is up to date (without it: rebuilt unless the source's content "
                        "hash, the class count and the index's checksum all match)")
    x.add_argument("--show", nargs="?", const="", default=None, metavar="INDEX",
                   help="build nothing: print what the index holds (samples, labels, classes, verdicts, issues, "
                        "size), what it was built from and whether it is fresh; INDEX, else --out, else the index "
                        "of --list or --shards")
    x.add_argument("--verify", action="store_true",
                   help="build nothing: read the whole index (sha256 checksum, array invariants) and check it against "
                        "the source's content; exit 2 naming the problem")
    x.set_defaults(func=_guard(_index))

    v = sub.add_parser("validate", help="check a list file and its images, or a shard folder; record the verdicts "
                                        "in the data index", formatter_class=FMT)
    v.add_argument("--list", help="a Tencent-format list file")
    v.add_argument("--root", help="image root the list's paths are relative to")
    v.add_argument("--dictionary", help="dictionary file (its class count is checked and bounds the indices)")
    v.add_argument("--num-classes", type=positive_int, default=None, help="class count (default: the dictionary's)")
    v.add_argument("--shards", help="a shard folder written by to-shards, or s3://bucket/prefix (each tar is "
                                    "downloaded to a temporary file to be checked)")
    _cache_dir_arg(v)
    v.add_argument("--write-skip-list", default=None, metavar="FILE",
                   help="write the samples with errors here, for data.skip_list")
    v.add_argument("--skip-list", default=None, metavar="FILE", help="deprecated spelling of --write-skip-list")
    v.add_argument("--allow-outside-root", action="store_true",
                   help="accept paths that resolve outside --root through a symlink (train with "
                        "data.allow_outside_root: true)")
    v.add_argument("--full-decode", action="store_true", help="also decode every image with PIL (slow, finds "
                                                              "damaged image data)")
    _max_pixels_arg(v)
    _scale_args(v, "chunks of samples (list) or shards")
    v.add_argument("--max-per-code", type=non_negative_int, default=20, help="issues printed per kind")
    v.set_defaults(func=_guard(_validate))

    t = sub.add_parser("to-shards", help="convert a list file to shuffled webdataset shards with DALI indices",
                       formatter_class=FMT)
    t.add_argument("--list", required=True, help="a Tencent-format list file")
    t.add_argument("--root", required=True, help="image root the list's paths are relative to")
    t.add_argument("--out", required=True, help="shard folder to write (a killed run resumes in it), or "
                                                "s3://bucket/prefix (endpoint and credentials: the standard AWS "
                                                "environment and ~/.aws files)")
    t.add_argument("--stage", default="", help="with --out s3://...: the local staging folder (holds the shards in "
                                               "flight and the work records; default .hvpmtl-stage/<bucket>/<prefix>)")
    t.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard")
    t.add_argument("--seed", type=int, default=0, help="seed of the shuffle across shards")
    t.add_argument("--dictionary", help="dictionary file (its class count bounds the indices)")
    t.add_argument("--num-classes", type=positive_int, default=None, help="class count (default: the dictionary's)")
    t.add_argument("--read-skip-list", default=None, metavar="FILE",
                   help="the validator's skip list (validate --write-skip-list): leave those samples out")
    t.add_argument("--skip-list", default=None, metavar="FILE", help="deprecated spelling of --read-skip-list")
    t.add_argument("--skip-corrupt", action="store_true", help="leave bad samples out (counted) instead of stopping")
    _max_pixels_arg(t)
    _scale_args(t, "shards")
    t.set_defaults(func=_guard(_to_shards))

    i = sub.add_parser("index-shards", help="(re)write the DALI index of every .tar in a folder", formatter_class=FMT)
    i.add_argument("folder", help="a folder of .tar shards")
    i.set_defaults(func=_guard(_index_shards))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="hvpmtl")
    add_parser(parser.add_subparsers(dest="group", required=True))
    a = parser.parse_args()
    sys.exit(a.func(a))
