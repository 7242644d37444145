"""Only a finite state is saved or resumed (issue 19).

Before writing, one all-reduced flag says whether the weights, the fp32 master partitions, the optimizer
state (and the trainer's extra modules: the EMA teacher) are finite on every rank (`nonfinite_state`). A
non-finite state is not written at all (`NonFiniteState`), so it is never COMPLETE nor `latest`; the
manifest records `weights_finite: true` (a manifest without the flag is of an unsupported format: manifest.py).
A reader passes over a tag whose manifest says false (`check_finite`).
"""
from __future__ import annotations

import torch

from hvpmtl.dist import sum_to_host


class NonFiniteState(Exception):
    """The state to be saved holds inf/NaN on some rank: nothing was written."""


def _state_groups(engine, also) -> dict[str, list[torch.Tensor]]:
    """What a checkpoint of `engine` writes, by the name a message uses: the module's weights (each rank's
    full copy), ZeRO's fp32 master partition of this rank (bf16/fp16, and fp32 too), the optimizer's state
    (Adam moments) and the caller's extra modules."""
    opt = engine.optimizer
    masters = getattr(opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if masters is None:
        masters = getattr(opt, "fp32_groups_flat_partition", None) or []  # bf16 without ZeRO
    inner = getattr(opt, "optimizer", opt)
    state = [v for s in getattr(inner, "state", {}).values() for v in s.values()
             if torch.is_tensor(v) and v.is_floating_point()]
    groups = {"weights": list(engine.module.parameters()),
              "fp32 master weights": [t for t in masters if torch.is_tensor(t)],
              "optimizer state": state}
    for name, module in also:
        if module is not None:
            groups[name] = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    return groups


@torch.no_grad()
def nonfinite_state(engine, also=()) -> str:
    """Collective: '' when every tensor a checkpoint would write is finite on every rank, else which parts are
    not and on how many ranks. `also`: (name, module) pairs (the EMA teacher). One all-reduce, one host read:
    made before saves only, never in a step."""
    groups = _state_groups(engine, also)
    device = next(engine.module.parameters()).device
    flags = torch.zeros(len(groups), dtype=torch.float64, device=device)
    for i, ts in enumerate(groups.values()):
        bad = [(~torch.isfinite(t)).any().to(device) for t in ts]
        if bad:
            flags[i] = torch.stack(bad).any().double()
    counts = sum_to_host(flags)
    bad = [f"{name} ({int(n)} rank(s))" for name, n in zip(groups, counts) if n > 0]
    return "inf/NaN in " + ", ".join(bad) if bad else ""


def check_finite(manifest: dict) -> str:
    """'' when the tag's manifest says its state is finite, else why not."""
    if manifest.get("weights_finite") is not True:
        return "its weights are not finite (weights_finite: false in its manifest)"
    return ""
