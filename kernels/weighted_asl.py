"""Weighted asymmetric loss in Triton: forward and backward fused in one pass over the logits.

Same signature and numbers as `hvpmtl.losses.weighted_asl.weighted_asl_reference`. The forward
kernel reads each logit (and target) once, computes the loss term and its hand-derived gradient in
fp32, writes the gradient in the logits' dtype and one fp32 partial sum per program; the loss is the
sum of those partials (deterministic, no atomics). Backward only scales the saved gradient by
grad_output. Sparse targets: the dense pass runs with y = 0 (no target reads at all) and a second,
tiny kernel corrects the loss and overwrites the gradient at the B x L listed entries.

Per element, with sp = softplus(z) = -log(1-p), sn = softplus(-z) = -log(p), q = 1 - p:
  loss_pos =  y eta q^g+ sn                     dloss_pos/dz = -y eta q^g+ (q + g+ p sn)
  loss_neg = (1-y) p^g- sp         (clip = 0)   dloss_neg/dz = (1-y) p^g- (p + g- q sp)
  loss_neg = -(1-y) pm^g- log(om)  (clip > 0)   dloss_neg/dz = -(1-y) p q (g- pm^(g- - 1) log(om) - pm^g- / om)
with pm = max(p - clip, 0), om = 1 - pm = min(q + clip, 1) (log clamped at eps); the clip gradient is
0 where pm = 0.
"""
import torch
import triton
import triton.language as tl

from hvpmtl.kernels import interpreting
from hvpmtl.losses.weighted_asl import (
    SparseTargets,
    Targets,
    check_dense_targets,
    check_logits,
    check_sparse_targets,
)

# Import-time mode of the @triton.jit functions below (tests reload the module to switch).
INTERPRETED = interpreting()

# Elements per program of the dense and backward passes (8 per thread: 16-byte bf16 loads).
# (H100, bf16 256 x 11166 fwd+bwd: 19-21 µs GPU time for every BLOCK 1024..8192 / 4..16 warps tried.)
CONFIG = {"BLOCK": 1024, "num_warps": 4}
# Sparse lists longer than this are de-duplicated in PyTorch instead of in the kernel ([L, L] compare).
MAX_INKERNEL_DEDUP = 64


@triton.jit
def _log1p_unit(x):
    # log(1 + x) for x in [0, 1], accurate for tiny x (no log1p in tl): x * log(u) / (u - 1).
    u = 1.0 + x
    d = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, x, x * tl.log(u) / d)


@triton.jit
def _asl_terms(z, y, eta, gamma_pos, gamma_neg, clip, eps, zero_pow_gneg, HAS_CLIP: tl.constexpr):
    """Per-element loss and dloss/dz (fp32), stable for any finite z."""
    t = _log1p_unit(tl.exp(-tl.abs(z)))
    sp = tl.maximum(z, 0.0) + t  # -log(1 - p)
    sn = tl.maximum(-z, 0.0) + t  # -log(p)
    p = tl.exp(-sn)
    q = tl.exp(-sp)
    w_pos = tl.exp(-gamma_pos * sp)  # (1 - p)^gamma_pos
    loss = y * eta * w_pos * sn
    grad = -y * eta * w_pos * (q + gamma_pos * p * sn)
    if HAS_CLIP:
        pm = tl.maximum(p - clip, 0.0)
        om = tl.minimum(q + clip, 1.0)
        log_om = tl.log(tl.maximum(om, eps))
        active = pm > 0.0
        log_pm = tl.log(tl.where(active, pm, 1.0))
        w_neg = tl.where(active, tl.exp(gamma_neg * log_pm), zero_pow_gneg)  # pm^gamma_neg, 0^0 = 1
        inv_om = tl.where(om > eps, 1.0 / tl.maximum(om, eps), 0.0)
        dterm = gamma_neg * tl.exp((gamma_neg - 1.0) * log_pm) * log_om - w_neg * inv_om
        loss += -(1.0 - y) * w_neg * log_om
        grad += tl.where(active, -(1.0 - y) * p * q * dterm, 0.0)
    else:
        w_neg = tl.exp(-gamma_neg * sn)  # p^gamma_neg
        loss += (1.0 - y) * w_neg * sp
        grad += (1.0 - y) * w_neg * (p + gamma_neg * q * sp)
    return loss, grad


@triton.jit
def _asl_dense_kernel(
    z_ptr, y_ptr, g_ptr, part_ptr, n,
    eta, gamma_pos, gamma_neg, clip, eps, zero_pow_gneg,
    HAS_TARGETS: tl.constexpr, HAS_CLIP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_TARGETS:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        y = tl.zeros([BLOCK], dtype=tl.float32)
    loss, grad = _asl_terms(z, y, eta, gamma_pos, gamma_neg, clip, eps, zero_pow_gneg, HAS_CLIP)
    if WRITE_GRAD:
        tl.store(g_ptr + offs, grad.to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0))


@triton.jit
def _asl_sparse_fix_kernel(
    z_ptr, idx_ptr, val_ptr, g_ptr, part_ptr, C, L,
    eta, gamma_pos, gamma_neg, clip, eps, zero_pow_gneg,
    HAS_CLIP: tl.constexpr, WRITE_GRAD: tl.constexpr, DEDUP: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """One row: replace the y = 0 terms of the listed classes by their y = value terms."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_L)
    in_row = j < L
    idx = tl.load(idx_ptr + row * L + j, mask=in_row, other=-1).to(tl.int64)
    val = tl.load(val_ptr + row * L + j, mask=in_row, other=0.0).to(tl.float32)
    keep = (idx >= 0) & (idx < C)  # out-of-range indices were rejected by the caller; never touch memory there
    if DEDUP:
        # Entry j yields to an entry of the same class with a larger value (ties: the earlier one).
        same = (idx[:, None] == idx[None, :]) & keep[None, :]
        beaten = (val[None, :] > val[:, None]) | ((val[None, :] == val[:, None]) & (j[None, :] < j[:, None]))
        lost = tl.max((same & beaten).to(tl.int32), axis=1)
        keep = keep & (lost == 0)
    cols = tl.where(keep, idx, 0)
    z = tl.load(z_ptr + row * C + cols, mask=keep, other=0.0).to(tl.float32)
    loss_y, grad_y = _asl_terms(z, val, eta, gamma_pos, gamma_neg, clip, eps, zero_pow_gneg, HAS_CLIP)
    loss_0, grad_0 = _asl_terms(z, tl.zeros_like(val), eta, gamma_pos, gamma_neg, clip, eps, zero_pow_gneg, HAS_CLIP)
    if WRITE_GRAD:
        tl.store(g_ptr + row * C + cols, grad_y.to(g_ptr.dtype.element_ty), mask=keep)
    tl.store(part_ptr + row, tl.sum(tl.where(keep, loss_y - loss_0, 0.0), axis=0))


@triton.jit
def _scale_kernel(g_ptr, s_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(s_ptr).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * s).to(out_ptr.dtype.element_ty), mask=mask)


def dedupe_sparse(indices: torch.Tensor, values: torch.Tensor):
    """Per row, keep one entry per class (the largest value); the others become padding (-1)."""
    v_sorted, order = values.sort(dim=1, descending=True, stable=True)
    i_sorted = indices.gather(1, order)
    i_sorted, order = i_sorted.sort(dim=1, stable=True)  # equal classes now adjacent, largest first
    v_sorted = v_sorted.gather(1, order)
    dup = torch.zeros_like(i_sorted, dtype=torch.bool)
    dup[:, 1:] = i_sorted[:, 1:] == i_sorted[:, :-1]
    return torch.where(dup, torch.full_like(i_sorted, -1), i_sorted), v_sorted


class _WeightedASL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, dense, sp_idx, sp_val, eta, gamma_pos, gamma_neg, clip, eps):
        z = logits.contiguous()
        n = z.numel()
        write_grad = bool(ctx.needs_input_grad[0])
        grad = torch.empty_like(z) if write_grad else z  # z: an unused pointer when no gradient is needed
        args = (float(eta), float(gamma_pos), float(gamma_neg), float(clip), float(eps), 0.0 ** float(gamma_neg))
        has_clip = clip > 0
        block = CONFIG["BLOCK"]
        n_prog = triton.cdiv(n, block)
        parts = torch.empty(n_prog, dtype=torch.float32, device=z.device)
        y = dense.contiguous() if dense is not None else z
        if y.dtype == torch.bool:
            y = y.view(torch.uint8)
        if n_prog > 0:
            _asl_dense_kernel[(n_prog,)](
                z, y, grad, parts, n, *args,
                HAS_TARGETS=dense is not None, HAS_CLIP=has_clip, WRITE_GRAD=write_grad,
                BLOCK=block, num_warps=CONFIG["num_warps"],
            )
        loss = parts.sum()
        if sp_idx is not None and sp_idx.numel() > 0:
            rows, length = sp_idx.shape
            dedup_in_kernel = triton.next_power_of_2(length) <= MAX_INKERNEL_DEDUP
            if not dedup_in_kernel:
                sp_idx, sp_val = dedupe_sparse(sp_idx, sp_val)
            sp_idx, sp_val = sp_idx.contiguous(), sp_val.contiguous()
            fix = torch.empty(rows, dtype=torch.float32, device=z.device)
            _asl_sparse_fix_kernel[(rows,)](
                z, sp_idx, sp_val, grad, fix, z.shape[1], length, *args,
                HAS_CLIP=has_clip, WRITE_GRAD=write_grad, DEDUP=dedup_in_kernel,
                BLOCK_L=max(16, triton.next_power_of_2(length)), num_warps=4,
            )
            loss = loss + fix.sum()
        if write_grad:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        out = torch.empty_like(grad)
        n = grad.numel()
        block = CONFIG["BLOCK"]
        if n > 0:
            # The scale stays fp32 (a loss scale of 65536 would overflow if cast to fp16 first).
            scale = grad_output.detach().to(torch.float32).reshape(1).contiguous()
            _scale_kernel[(triton.cdiv(n, block),)](grad, scale, out, n, BLOCK=block, num_warps=CONFIG["num_warps"])
        return out, None, None, None, None, None, None, None, None


def weighted_asl(
    logits: torch.Tensor,
    targets: Targets,
    eta: float = 10.0,
    gamma_pos: float = 4.0,
    gamma_neg: float = 1.0,
    clip: float = 0.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Sum-reduced weighted ASL (0-dim fp32), fused forward+backward Triton kernel."""
    check_logits(logits)
    if isinstance(targets, SparseTargets):
        check_sparse_targets(logits, targets)
        dense, sp_idx, sp_val = None, targets.indices, targets.values
    else:
        check_dense_targets(logits, targets)
        if targets.requires_grad and torch.is_grad_enabled():
            raise ValueError("weighted_asl (Triton): no gradient flows to targets; pass targets.detach()")
        dense, sp_idx, sp_val = targets, None, None
    return _WeightedASL.apply(logits, dense, sp_idx, sp_val, eta, gamma_pos, gamma_neg, clip, eps)
