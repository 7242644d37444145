"""Why a rank stopped on an input error, left where its peers can read it: a rank that stops on a bad image or
config exits 2, and a peer that then loses it in a collective reads the note and exits 2 too, naming the cause,
instead of reporting a lost peer (exit 5). A rank that dies or hangs leaves no note: exit 5 stands."""
from __future__ import annotations

import sys
from pathlib import Path

from hvpmtl.fileio import atomic_write
from hvpmtl.train.exit_codes import EXIT_CONFIG, EXIT_PEER_LOST


def stop_note_path(out_dir: Path, rank: int) -> Path:
    """Where rank `rank` says why it stopped on an input error: in run.output_dir, which every rank shares."""
    return out_dir / f".hvpmtl.stopped.rank_{rank}"


def write_stop_note(out_dir: Path, rank: int, e: Exception) -> None:
    """When `e` is an input error (a config, data, file or disk problem: exit 2), say so where the peers look;
    written (and synced) before this rank's sockets close, so a peer that loses it in a collective finds it."""
    from hvpmtl.cli import input_error  # the boundary's own judgement of what is an input error

    first = input_error(e)
    if first is None:  # a bug: the peers report a lost rank
        return
    first = first.strip().splitlines()[0] if first.strip() else type(e).__name__
    try:
        atomic_write(stop_note_path(out_dir, rank), f"rank {rank} stopped on an input error: {first[:2000]}")
    except OSError:
        pass  # the peers then say only that this rank is lost (exit 5)


def read_stop_notes(out_dir: Path, world: int, rank: int) -> str:
    """The first peer's stop note, or ''."""
    for r in range(world):
        if r == rank:
            continue
        try:
            return stop_note_path(out_dir, r).read_text()
        except OSError:
            continue
    return ""


def clear_stop_note(out_dir: Path, rank: int) -> None:
    """A previous process's note of this rank is not this one's."""
    try:
        stop_note_path(out_dir, rank).unlink(missing_ok=True)
    except OSError:
        pass


def exit_for_lost_peer(out_dir: Path, world: int, rank: int, who: str, step: int, lost: str, e: Exception) -> int:
    """A collective failed because a peer is gone: exit 2 with the peer's reason when it left a note, else exit 5
    naming the lost rank(s) (instead of a bare gloo/NCCL error)."""
    note = read_stop_notes(out_dir, world, rank)
    if note:
        print(f"{who}: stopping at step {step} (exit {EXIT_CONFIG}) because {note}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    print(f"{who}: a collective failed at step {step}: {lost}. The job cannot continue; restart it with --resume "
          f"auto from the last checkpoint. ({type(e).__name__}: {first})", file=sys.stderr, flush=True)
    return EXIT_PEER_LOST
