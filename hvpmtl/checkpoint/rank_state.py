"""Per-rank state of a checkpoint (rank_<r>.pt): RNG streams and, for another world size, the rules that
deal the saved ranks' state to the new ranks.

Everything is plain data (tensors, lists, numbers), so the weights-only unpickler reads it. For a new world
size the data position is global (the loaders map it to the new sharding), RNG streams are derived afresh
per new rank, and the SwAV queue rows of all old ranks are dealt out to the new ranks.
"""
from __future__ import annotations

import hashlib
import random
from typing import Optional

import numpy as np
import torch


def rng_state() -> dict:
    """This process's RNG streams as plain data (tensors, lists, numbers): weights-only loadable."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": [version, list(keys), gauss],
             "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def derived_rng_state(base: dict, rank: int) -> dict:
    """Fresh RNG streams for `rank` of a new world size, derived from a saved state: deterministic,
    different per rank, and no process-global generator is touched."""
    seed = int.from_bytes(hashlib.sha256(base["torch"].numpy().tobytes() + rank.to_bytes(4, "little")).digest()[:8],
                          "little")
    version, keys, gauss = random.Random(seed).getstate()
    _, np_keys, pos, has_gauss, cached = np.random.RandomState(seed % 2**32).get_state(legacy=True)
    return {"python": [version, list(keys), gauss],
            "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.Generator().manual_seed(seed).get_state()}


def redeal_rows(parts: list[Optional[torch.Tensor]], rank: int, world: int, dim: int = 1) -> Optional[torch.Tensor]:
    """Rows of per-rank buffers (the SwAV queue, [views, rows, dim], newest row first) for `rank` of
    `world` new ranks: the old ranks' rows are interleaved by recency, then dealt out round-robin, so
    every new rank holds a share of every age and no row is lost or duplicated."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    n = min(p.shape[dim] for p in parts)
    stacked = torch.stack([p.narrow(dim, 0, n) for p in parts], dim=dim + 1)  # [..., n, old ranks, ...]
    merged = stacked.flatten(dim, dim + 1)  # recency-major: row k of every old rank, then row k+1
    idx = torch.arange(rank, merged.shape[dim], world)
    return merged.index_select(dim, idx).contiguous()


def rank_state_for_world(states: list[dict], rank: int, world: int) -> dict:
    """This rank's state when the checkpoint was written by len(states) ranks and `world` resume it."""
    base = dict(states[rank % len(states)])  # data position: global, the loader maps it to the new sharding
    base["rng"] = derived_rng_state(states[rank % len(states)]["rng"], rank)
    if any(s.get("queue") is not None for s in states):
        base["queue"] = redeal_rows([s.get("queue") for s in states], rank, world)
    return base
