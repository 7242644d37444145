"""Log-domain clamped Sinkhorn in Triton (SwAV codes); same signature and numbers as
`hvpmtl.losses.sinkhorn.sinkhorn_reference`.

L is never materialised: with L0 = min(scores / eps, t_max) recomputed from the scores on the fly,
the current iterate is L0[b, k] - u[b] - v[k] (the classic dual potentials), and each half-step is
one read pass over the scores:
  column step  v[k] = logsumexp_b (L0[b, k] - u[b]) + log K   (partial max/sum-exp over row splits,
                                                               combined in a tiny kernel, and across
                                                               ranks by torch.distributed)
  row step     u[b] = logsumexp_k (L0[b, k] - v[k]) + log B_global
The last row step also writes Q = exp(L0 - v - lse_row) (the row is still in cache), so 3 iterations
read the scores 6 times and write Q once. All accumulation is fp32.
"""
import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from hvpmtl.kernels import interpreting
from hvpmtl.losses.sinkhorn import check_scores, distributed, global_batch_size, global_column_lse

# Import-time mode of the @triton.jit functions below (tests reload the module to switch).
INTERPRETED = interpreting()

if INTERPRETED:  # small tiles: several loop trips, row splits and ragged edges even at test sizes
    CONFIG = {"COL_BLOCK_B": 16, "COL_BLOCK_K": 64, "COL_WARPS": 4, "ROW_BLOCK_R": 8, "ROW_BLOCK_K": 128,
              "ROW_WARPS": 4, "TARGET_PROGRAMS": 4}
else:
    # Best of benchmarks/kernels.py --sweep on an H100 (4096 x 3000 fp32, 3 iterations: 172 µs GPU time;
    # the other tiles tried gave 173-198 µs).
    CONFIG = {"COL_BLOCK_B": 64, "COL_BLOCK_K": 64, "COL_WARPS": 8, "ROW_BLOCK_R": 1, "ROW_BLOCK_K": 1024,
              "ROW_WARPS": 4, "TARGET_PROGRAMS": 0}  # 0: four programs per multiprocessor

NEG_INF = float("-inf")


@triton.jit
def _scaled(s_ptr, offs, mask, eps, t_max, HAS_CLAMP: tl.constexpr):
    x = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) / eps
    if HAS_CLAMP:
        x = tl.minimum(x, t_max)
    return x


@triton.jit
def _col_stats_kernel(
    s_ptr, u_ptr, pmax_ptr, psum_ptr, B, K, rows_per_split, eps, t_max,
    HAS_U: tl.constexpr, HAS_CLAMP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per (column block, row split): max and sum of exp(x - max) of x = L0 - u over the split's rows."""
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    row0 = split * rows_per_split
    row_end = tl.minimum(row0 + rows_per_split, B)
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_K], tl.float32)
    for r in range(row0, row_end, BLOCK_B):
        rows = r + tl.arange(0, BLOCK_B)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        x = _scaled(s_ptr, rows.to(tl.int64)[:, None] * K + cols[None, :], mask, eps, t_max, HAS_CLAMP)
        if HAS_U:
            x -= tl.load(u_ptr + rows, mask=rmask, other=0.0)[:, None]
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[None, :]), axis=0)
        m = m_new
    tl.store(pmax_ptr + split * K + cols, m, mask=cmask)
    tl.store(psum_ptr + split * K + cols, acc, mask=cmask)


@triton.jit
def _col_combine_kernel(
    pmax_ptr, psum_ptr, max_ptr, sum_ptr, v_ptr, S, K, log_k, FINAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Combine the S row splits of each column: v = lse + log K (FINAL), else the (max, sum) pair."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < K
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    for s in range(S):
        m = tl.maximum(m, tl.load(pmax_ptr + s * K + cols, mask=cmask, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(S):
        pm = tl.load(pmax_ptr + s * K + cols, mask=cmask, other=float("-inf"))
        acc += tl.load(psum_ptr + s * K + cols, mask=cmask, other=0.0) * tl.exp(pm - m_safe)
    if FINAL:
        tl.store(v_ptr + cols, m_safe + tl.log(tl.where(cmask, acc, 1.0)) + log_k, mask=cmask)
    else:
        tl.store(max_ptr + cols, m, mask=cmask)
        tl.store(sum_ptr + cols, acc, mask=cmask)


@triton.jit
def _row_kernel(
    s_ptr, v_ptr, u_ptr, q_ptr, B, K, eps, t_max, log_b,
    HAS_CLAMP: tl.constexpr, WRITE_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Row logsumexp of x = L0 - v: stores u = lse + log B, or (last step) Q = exp(x - lse)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    base = rows.to(tl.int64)[:, None] * K
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        mask = rmask[:, None] & cmask[None, :]
        x = _scaled(s_ptr, base + cols[None, :], mask, eps, t_max, HAS_CLAMP)
        x -= tl.load(v_ptr + cols, mask=cmask, other=0.0)[None, :]
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
    lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(tl.where(rmask, acc, 1.0))
    if WRITE_Q:
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < K
            mask = rmask[:, None] & cmask[None, :]
            x = _scaled(s_ptr, base + cols[None, :], mask, eps, t_max, HAS_CLAMP)
            x -= tl.load(v_ptr + cols, mask=cmask, other=0.0)[None, :]
            tl.store(q_ptr + base + cols[None, :], tl.exp(x - lse[:, None]), mask=mask)
    else:
        tl.store(u_ptr + rows, lse + log_b, mask=rmask)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _row_splits(b: int, k: int, device: torch.device):
    """Rows per split (a multiple of the tile height) and the number of splits for the column pass."""
    block_b, block_k = CONFIG["COL_BLOCK_B"], CONFIG["COL_BLOCK_K"]
    target = CONFIG["TARGET_PROGRAMS"]
    if not target:
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    n_col_blocks = triton.cdiv(k, block_k)
    want = max(1, min(triton.cdiv(b, block_b), triton.cdiv(target, n_col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(b, want), block_b) * block_b
    return rows_per_split, triton.cdiv(b, rows_per_split)


def _column_potential(s, u, rows_per_split, n_splits, eps, t_max, log_k, group):
    """v[k] = global logsumexp_b (L0[b, k] - u[b]) + log K."""
    b, k = s.shape
    dev = s.device
    dist_on = distributed(group)
    if b == 0:  # this rank holds no rows: it still takes part in the all_reduces
        col_max = torch.full((k,), NEG_INF, dtype=torch.float32, device=dev)
        return global_column_lse(col_max, torch.zeros_like(col_max), group) + log_k
    pmax = torch.empty(n_splits, k, dtype=torch.float32, device=dev)
    psum = torch.empty_like(pmax)
    block_k = CONFIG["COL_BLOCK_K"]
    _col_stats_kernel[(triton.cdiv(k, block_k), n_splits)](
        s, u if u is not None else s, pmax, psum, b, k, rows_per_split, eps, t_max if t_max is not None else 0.0,
        HAS_U=u is not None, HAS_CLAMP=t_max is not None, BLOCK_B=CONFIG["COL_BLOCK_B"], BLOCK_K=block_k,
        num_warps=CONFIG["COL_WARPS"],
    )
    v = torch.empty(k, dtype=torch.float32, device=dev)
    col_max, col_sum = (torch.empty_like(v), torch.empty_like(v)) if dist_on else (v, v)
    block = 256 if INTERPRETED else 1024
    _col_combine_kernel[(triton.cdiv(k, block),)](
        pmax, psum, col_max, col_sum, v, n_splits, k, log_k, FINAL=not dist_on, BLOCK=block, num_warps=4
    )
    if dist_on:
        v = global_column_lse(col_max, col_sum, group) + log_k
    return v


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    n_iters: int = 3,
    t_max: Optional[float] = 10.0,
    group=None,
    global_batch: Optional[int] = None,
) -> torch.Tensor:
    """Log-domain clamped Sinkhorn: Q [B, K] fp32 with rows summing to 1 (Triton kernels, fp32 accumulation).
    `global_batch`: rows over all ranks if known (else all-reduced)."""
    check_scores(scores, epsilon, n_iters)
    s = scores.detach().contiguous()
    b, k = s.shape
    dev = s.device
    eps = float(epsilon)
    tmax = float(t_max) if t_max is not None else 0.0
    log_b = math.log(max(global_batch_size(b, dev, group, global_batch), 1))
    log_k = math.log(k)
    q = torch.empty(b, k, dtype=torch.float32, device=dev)
    rows_per_split, n_splits = _row_splits(b, k, dev) if b > 0 else (0, 0)
    u = None
    block_r = CONFIG["ROW_BLOCK_R"]
    for it in range(n_iters):
        v = _column_potential(s, u, rows_per_split, n_splits, eps, t_max, log_k, group)
        last = it == n_iters - 1
        u = torch.empty(b, dtype=torch.float32, device=dev) if not last else None
        if b > 0:
            _row_kernel[(triton.cdiv(b, block_r),)](
                s, v, u if u is not None else v, q, b, k, eps, tmax, log_b,
                HAS_CLAMP=t_max is not None, WRITE_Q=last, BLOCK_R=block_r, BLOCK_K=CONFIG["ROW_BLOCK_K"],
                num_warps=CONFIG["ROW_WARPS"],
            )
    return q
