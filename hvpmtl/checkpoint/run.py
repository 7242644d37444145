"""A run's claim on its output directory and the one resume decision for all its ranks.

`open_run` (every rank, after the process group exists and before the model is built) takes the run lock
on rank 0 and decides the mode: rank 0 proposes this run's tags, newest first; every rank checks the files
it will load (present, sizes and checksums per the manifest, parsable by the weights-only unpickler,
finite); all agree or all move on to the next older tag together. Only then, once the engine exists,
`resume` loads anything. If checkpoints exist and none can be used, or DeepSpeed fails half-way through
loading, the job stops with exit code 6 (`EXIT_CHECKPOINT`) and a message: it never trains from a
half-loaded or foreign state. A tag of another world size is converted first (convert.py). `rollback`
reloads this run's newest good tag into a running engine (run.on_nonfinite: rollback).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hvpmtl.checkpoint.safe_load as safe_load
from hvpmtl.checkpoint.convert import convert_for_world
from hvpmtl.checkpoint.finite import check_finite
from hvpmtl.checkpoint.manifest import (RESUME_MODES, SUPERSEDED_DIR, RUN_FILES, CheckpointError, check_contents,
                                        check_presence, glob_safe, read_manifests, needed_by, rank0_decides,
                                        read_manifest, resolve_tag, tag_dirs)
from hvpmtl.checkpoint.rank_state import rank_state_for_world
from hvpmtl.checkpoint.run_lock import RunLock
from hvpmtl.dist import barrier, broadcast_object, gather_objects, rank_world
from hvpmtl.notices import notice


@dataclass
class Choice:
    """The tag every rank agreed to resume from, and what this rank will load."""
    tag_dir: Path
    manifest: dict
    rank_state: dict
    universal_root: Optional[Path] = None  # a converted copy, when the world size changed


@dataclass
class RunState:
    """One run's claim on its output directory: lock, run id and the resume decision."""
    out_dir: Path
    how: str
    run_id: str
    lock: Optional[RunLock] = None
    choice: Optional[Choice] = None
    parent: Optional[str] = None  # run/tag this run was forked from (explicit --resume of an older tag)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + os.urandom(4).hex()


def folder_run_id(ckpt_dir: Path) -> Optional[str]:
    """The run that last wrote here: the one `latest` names, else the newest readable manifest's; None when
    no manifest is readable."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        try:
            return read_manifest(ckpt_dir / latest.read_text().strip())["run_id"]
        except (ValueError, OSError):
            pass
    found = read_manifests(ckpt_dir)
    return found[-1][1]["run_id"] if found else None


def open_run(out_dir: str | Path, how: str = "auto", *, log=print) -> RunState:
    """Claim `out_dir` for this job and decide, once for all ranks, what to resume. Collective: every rank
    calls it after the process group exists and before the model is built (a refusal costs seconds).

    how: 'auto' (this run's newest usable checkpoint, or a fresh start in an unused folder), 'none' (a
    fresh start; refused when the folder holds checkpoints), 'fresh' (start over: the previous run's
    files move to superseded/), or a checkpoint folder / tag name. Raises CheckpointError."""
    out_dir = Path(out_dir)
    rank, world = rank_world()

    held = None  # rank 0's lock (kept here: only the decision is sent to the other ranks)

    def claim():
        nonlocal held
        held = RunLock(out_dir, log=log).acquire()
        try:
            return _decide_mode(out_dir, how, log)
        except BaseException:
            held.release()
            raise

    run_id, proposals, parent = rank0_decides(claim)
    run = RunState(out_dir, how, run_id, lock=held, parent=parent)
    try:
        if proposals:
            run.choice = _agree(run, [Path(p) for p in proposals], explicit=how not in RESUME_MODES, log=log)
            if run.run_id is None:  # 'auto' continues the run it resumes
                run.run_id = run.choice.manifest["run_id"]
            if run.parent is None and run.run_id == run.choice.manifest["run_id"]:
                run.parent = run.choice.manifest.get("parent")  # a fork stays one in every later manifest
        if run.run_id is None:
            run.run_id = broadcast_object(new_run_id() if rank == 0 else None)
    except BaseException:
        if held is not None:
            held.release()
        raise
    return run


def _decide_mode(out_dir: Path, how: str, log) -> tuple[Optional[str], list[str], Optional[str]]:
    """rank 0: (run id or None = decided by the resume, tags to propose newest first, parent)."""
    ckpt_dir = out_dir / "checkpoints"
    manifests = read_manifests(ckpt_dir)
    if how == "none":
        if manifests:
            raise CheckpointError(
                f"--resume none, but {ckpt_dir} holds checkpoints ({', '.join(t.name for t, _ in manifests[-3:])}) "
                f"of run {manifests[-1][1]['run_id']}. Continue it with --resume auto, or start "
                f"over with --resume fresh (its files move to {out_dir / SUPERSEDED_DIR}/)")
        return new_run_id(), [], None
    if how == "fresh":
        _supersede(out_dir, folder_run_id(ckpt_dir) if manifests else None, log)
        return new_run_id(), [], None
    if how == "auto":
        current = folder_run_id(ckpt_dir)
        mine = [t for t, m in manifests if m["run_id"] == current]
        others = sorted({m["run_id"] for t, m in manifests if m["run_id"] != current})
        if others:
            log(f"{ckpt_dir}: ignoring the checkpoints of other runs ({', '.join(others)}); "
                f"this run is {current}")
        readable = {x for x, _ in manifests}
        for t in tag_dirs(ckpt_dir):
            if t not in readable:
                try:
                    read_manifest(t)
                except ValueError as e:  # the reason: none (an interrupted save), unreadable or of another format
                    notice(f"checkpoint {t} is not usable ({e}); trying an older one")
        return None, [str(t) for t in reversed(mine)], None
    tag = resolve_tag(ckpt_dir, how)
    try:
        m = read_manifest(tag)
    except ValueError as e:
        raise CheckpointError(f"--resume {how}: not a usable checkpoint ({e})") from None
    # continuing the run's newest tag keeps its id; an older one (a rewind) or another folder's forks a new run
    same_folder = tag.parent.resolve() == ckpt_dir.resolve()
    newest = [t for t, x in manifests if x["run_id"] == m["run_id"]][-1:] if same_folder else []
    if same_folder and newest == [tag]:
        return m["run_id"], [str(tag)], None
    return new_run_id(), [str(tag)], f"{m['run_id']}/{tag.name}"


def _supersede(out_dir: Path, old_run: Optional[str], log) -> None:
    present = [out_dir / n for n in RUN_FILES if (out_dir / n).exists()]
    if not present:
        return
    dest = out_dir / SUPERSEDED_DIR / f"{old_run or 'unknown-run'}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    dest.mkdir(parents=True)
    for p in present:
        os.replace(p, dest / p.name)  # same file system: a rename, nothing is copied or deleted
    log(f"--resume fresh: the previous run's files ({', '.join(p.name for p in present)}) moved to {dest}")


def _agree(run: RunState, proposals: list[Path], explicit: bool, log) -> Optional[Choice]:
    """Try the proposed tags in order until every rank can load its part of one. Collective."""
    rank, world = rank_world()
    reasons = []
    for tag_dir in proposals:
        verdict, rank_state = _verify_part(tag_dir, rank, world)
        verdicts = gather_objects(verdict)
        bad = [f"rank {r}: {v}" for r, v in enumerate(verdicts) if v]
        if not bad:
            choice = Choice(tag_dir, read_manifest(tag_dir), rank_state)
            if choice.manifest["world_size"] != world:
                choice = convert_for_world(run, choice, rank, world, log)
            return choice
        why = "; ".join(dict.fromkeys(v.split(": ", 1)[1] for v in bad)) if len(set(verdicts)) == 1 else "; ".join(bad)
        reasons.append(f"{tag_dir.name}: {why}")
        if rank == 0:
            notice(f"checkpoint {tag_dir} could not be loaded ({why}); "
                   + ("it was asked for by name" if explicit else "trying an older one"))
    what = f"--resume {run.how}" if explicit else f"none of the {len(proposals)} checkpoint(s) of this run"
    raise CheckpointError(f"{what} in {run.ckpt_dir} can be loaded: " + " | ".join(reasons) +
                          ". Nothing was loaded and nothing trained. Restore the files, resume an older tag with "
                          "--resume <tag>, or start over with --resume fresh")


def _verify_part(tag_dir: Path, rank: int, world: int) -> tuple[str, Optional[dict]]:
    """('' and this rank's state) when this rank can load its part of the tag, else (why, None)."""
    try:
        m = read_manifest(tag_dir)
    except ValueError as e:
        return str(e), None
    why = check_presence(tag_dir, m)
    if why:
        return why, None
    saved_world = m["world_size"]
    rank_files = [f"rank_{r}.pt" for r in range(saved_world)]
    if any(f not in m["files"] for f in rank_files):
        return f"the manifest lacks a rank file of its {saved_world} ranks", None
    if saved_world == world:
        names = [n for n, e in m["files"].items() if needed_by(e, rank)]
    else:  # rank 0 converts every file; each rank reads every old rank's state
        names = list(m["files"]) if rank == 0 else rank_files
    why = check_contents(tag_dir, m, names) or check_finite(m)
    if why:
        return why, None
    try:
        if saved_world == world:
            return "", safe_load.load_torch(tag_dir / f"rank_{rank}.pt")
        states = [safe_load.load_torch(tag_dir / f) for f in rank_files]
        return "", rank_state_for_world(states, rank, world)
    except (safe_load.UnsafeFileError, KeyError, TypeError) as e:
        return f"rank state unreadable: {e}", None


def resume(engine, run: RunState, log=print):
    """Load the agreed checkpoint into the engine: (tag_dir, client_state, rank_state), or None for a fresh
    start. Collective. A failure on any rank raises CheckpointError on every rank: the engine may hold a
    partly loaded state and must not train."""
    choice = run.choice
    if choice is None:
        return None
    rank, world = rank_world()
    error = ""
    client_state = None
    safe_load.install(engine)
    try:
        root = choice.universal_root if choice.universal_root is not None else choice.tag_dir.parent
        engine._config.load_universal_checkpoint = choice.universal_root is not None  # read per call by DeepSpeed
        try:
            with glob_safe(root) as load_dir:
                path, client_state = engine.load_checkpoint(str(load_dir), tag=choice.tag_dir.name,
                                                            load_optimizer_states=True, load_lr_scheduler_states=True)
        finally:
            engine._config.load_universal_checkpoint = False
        if path is None or client_state is None:
            error = "DeepSpeed found nothing to load"
        elif int(client_state.get("step", -1)) != int(choice.manifest["step"]):
            error = f"it holds step {client_state.get('step')}, its manifest says {choice.manifest['step']}"
    except Exception as e:  # noqa: BLE001 — whatever failed, the engine is now partly loaded
        import traceback
        where = traceback.extract_tb(e.__traceback__)[-1]
        error = (f"{type(e).__name__} at {where.filename}:{where.lineno}"
                 f"{': ' + str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}")
    errors = [f"rank {r}: {e}" for r, e in enumerate(gather_objects(error)) if e]
    if choice.universal_root is not None:
        barrier()
        if rank == 0:
            shutil.rmtree(choice.universal_root / choice.tag_dir.name, ignore_errors=True)
            try:
                choice.universal_root.rmdir()
            except OSError:
                pass  # not empty: another conversion's leftovers
    if errors:
        raise CheckpointError(f"loading {choice.tag_dir} failed ({'; '.join(errors)}). The model and optimizer may be "
                              "partly loaded, so the run stops here instead of training from a mixed state")
    how = f" ({choice.manifest['world_size']} -> {world} ranks)" if choice.universal_root is not None else ""
    log(f"resumed from {choice.tag_dir}{how}")
    return choice.tag_dir, client_state, choice.rank_state


def rollback(engine, run: RunState, log=print):
    """Reload this run's newest usable, finite checkpoint into a running engine (run.on_nonfinite: rollback):
    (tag_dir, client_state, rank_state), or None when the run has none. Collective, one decision for all
    ranks as at resume; a tag that fails to load on some rank raises CheckpointError (a half-loaded engine
    must not train)."""
    rank, _ = rank_world()
    mine = [str(t) for t, m in reversed(read_manifests(run.ckpt_dir))
            if m["run_id"] == run.run_id and m.get("weights_finite") is not False] if rank == 0 else None
    proposals = [Path(p) for p in broadcast_object(mine)]
    if not proposals:
        return None
    run.choice = _agree(run, proposals, explicit=False, log=log)
    try:
        return resume(engine, run, log=lambda msg: log(msg.replace("resumed from", "rolled back to", 1)))
    finally:
        run.choice = None
