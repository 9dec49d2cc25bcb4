"""
kernels.py -- writing GPU kernels for a language model: RMSNorm, FlashAttention-2, and friends.

Why kernels at all?  The roofline model (Williams et al. 2009): an op takes at least max(FLOPs / peak FLOP/s, bytes
moved / HBM bandwidth), and which term wins is set by its arithmetic intensity I = FLOPs per byte of HBM traffic.  An
H100 SXM does ~990 dense bf16 TFLOP/s but reads HBM at ~3 TB/s (spec: 3.35), a ridge point of 990e12 / 3e12 ~ 330
FLOP/byte: an op below it is memory-bound and idles the tensor cores.  (H200: same compute, 4.8 TB/s, ridge ~200.)
  * a bf16 (n x n) @ (n x n) matmul: 2n^3 FLOPs on 6n^2 bytes, I = n/3, compute-bound from n ~ 1000 (big tiles win);
  * RMSNorm: ~4 FLOPs/element (square, sum, 2 mults) on 4 bytes (read x, write y; bf16): I ~ 1, 300x under the ridge.
    No kernel makes it compute-bound: the best touches each byte once, scored in % of HBM bandwidth, not TFLOP/s;
  * attention kept on chip: 4*T^2*d FLOPs on 8*T*d bytes of q, k, v, o, I = T/2, compute-bound once T > ~660.  Naively
    it also writes and rereads the (T x T) scores S and probabilities P (~8*T^2 bytes per head): memory-bound.
Memory-bound ops are sped up only by touching HBM fewer times:
  * fusion: one kernel reads x once, does every elementwise step in registers, writes y once (eager PyTorch RMSNorm
    launches ~6 kernels and re-reads x each time);
  * tiling: split a big op into blocks that fit in SRAM/registers, never writing the intermediate to HBM.
    FlashAttention streams K/V tiles past a Q tile, keeps a running max and sum ("online softmax", Milakov &
    Gimelshein 2018, arXiv:1805.02867) and never materialises S or P: O(T) memory, not O(T^2), and far less traffic.

Contents, in teaching order:
  1. RMSNormTriton        fused forward + backward (dx and dweight) Triton kernels.
  2. FlashAttentionTorch  FlashAttention-2 in plain PyTorch with explicit tiles: the algorithm, on a CPU.
  3. FlashAttentionTriton the same as Triton kernels (forward, D, dK/dV, dQ), causal tile skipping, exp2.
  4. SwiGLUTriton         fused silu(a) * b.
  5. ChunkedCrossEntropy  lm-head + cross-entropy that never builds the (tokens x vocab) logits at once
                          (Liger-kernel style, Hsu et al. 2024, arXiv:2410.10989).
  6. the autotuning of the FlashAttention tiles on a GPU; 7. a demo CLI.

Papers: FlashAttention (Dao et al. 2022, arXiv:2205.14135), FlashAttention-2 (Dao 2023, arXiv:2307.08691),
RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), Triton (Tillet et al. 2019); the FlashAttention layout
follows Stanford CS336 assignment 2.

Run it:
  python kernels.py                             # demo: each kernel once vs the naive reference
  python -m pytest -q test_all.py -k kernels    # the tests (CPU: interpreter; GPU: compiled)
  python bench.py --only kernels                # GPU: the benchmarks; CPU: the PyTorch-level ones
  bash gpu_check.sh                             # one H100/H200: compiled tests + every GPU number
Without a GPU we set TRITON_INTERPRET=1 before the @triton.jit decorators run (triton reads it when it decorates a
kernel): the kernels then run in Triton's numpy interpreter on CPU tensors (correct, but ~1000x slower than a GPU).
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must happen before the @triton.jit lines below
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); exp2 is the native GPU instruction
# The interpreter (triton 3.9) multiplies the raw bit patterns of bf16 tiles in tl.dot, so
# there we upcast the tiles to fp32 first; on a GPU the tensor cores take bf16 directly.
_UPCAST = tl.constexpr(INTERPRET)


# ---------------------------------------------------------------
# 1. RMSNorm:  y = x / sqrt(mean(x^2) + eps) * w
#
# Memory-bound (I ~ 1 FLOP/byte), so touch HBM as little as possible.  Forward, one program per row: load the row
# once, reduce, scale, store, and save rstd = 1/sqrt(mean(x^2)+eps) (4 bytes per row) so backward skips the reduction.
# Backward, with g = dy * w and r = rstd (which depends on x: dr/dx_j = -r^3 x_j / D):
#     dx = r * g - x * r^3 * mean(g * x)
#     dw = sum over rows of dy * x * r
# dw is a reduction over all rows.  Instead of atomics we give each program a contiguous block of rows, accumulate its
# partial dw in registers, write one (D,) partial, and sum the few partials in torch -- Liger/Unsloth do the same.

@triton.jit
def _rmsnorm_fwd_kernel(X, W, Y, RSTD, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 so row * D cannot overflow on big inputs
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_D,)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)  # padded lanes are 0: sum is exact
    tl.store(Y + row * D + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(X, W, DY, RSTD, DX, DW_PART, N, D, rows_per_prog, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)  # this program's partial sum of dy*x*r
    for i in range(rows_per_prog):
        row = pid * rows_per_prog + i
        if row < N:
            x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            r = tl.load(RSTD + row)
            g = dy * w  # (BLOCK_D,)
            dx = r * g - x * (r * r * r) * (tl.sum(g * x, axis=0) / D)  # r g - x r^3 mean(g x)
            tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * x * r
    tl.store(DW_PART + pid * D + cols, dw, mask=mask)


class RMSNormTriton(torch.autograd.Function):
    """y = RMSNorm(x) * weight over the last dim; x has any leading shape (..., D)."""

    @staticmethod
    def forward(ctx, x, weight, eps=1e-5):
        shape, D = x.shape, x.shape[-1]
        x2 = x.reshape(-1, D).contiguous()  # (N, D)
        N = x2.shape[0]
        y = torch.empty_like(x2)
        rstd = torch.empty(N, device=x.device, dtype=torch.float32)  # (N,)
        BLOCK_D = triton.next_power_of_2(D)
        # more warps for wide rows so each thread holds a handful of elements
        nw = 1 if INTERPRET else min(16, max(1, BLOCK_D // 256))
        _rmsnorm_fwd_kernel[(N,)](x2, weight, y, rstd, D, eps, BLOCK_D=BLOCK_D, num_warps=nw)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape, ctx.nw = shape, nw
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        N, D = x2.shape
        dy2 = dy.reshape(N, D).contiguous()
        dx = torch.empty_like(x2)
        # a few programs per SM: enough parallelism, few partial rows to sum afterwards
        n_prog = 4 if INTERPRET else 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count
        n_prog = max(1, min(N, n_prog))
        rows_per_prog = triton.cdiv(N, n_prog)
        dw_part = torch.empty(n_prog, D, device=x2.device, dtype=torch.float32)  # (P, D)
        _rmsnorm_bwd_kernel[(n_prog,)](x2, weight, dy2, rstd, dx, dw_part, N, D, rows_per_prog,
                                       BLOCK_D=triton.next_power_of_2(D), num_warps=ctx.nw)
        return dx.reshape(ctx.shape), dw_part.sum(0).to(weight.dtype), None  # dw = sum of the partials


def rmsnorm_ref(x, weight, eps=1e-5):
    """Plain PyTorch reference (what eager and torch.compile run in the bench)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


# ---------------------------------------------------------------
# 2. FlashAttention-2 in plain PyTorch (Dao 2023; FlashAttention-1: Dao et al. 2022).
#
# Plain attention S = Q K^T / sqrt(d), P = softmax(S), O = P V writes the (T x T) S and P to HBM.  FlashAttention
# splits Q into row tiles Q_i and K, V into column tiles K_j, V_j and streams the K_j past one Q_i, keeping per row
# only a running max m, sum l and un-normalised output O~ (the online softmax; recurrences at the lines computing
# them).  FA2 over FA1: the Q tile is the outer loop (each program owns its output rows, no atomics) and O~ is divided
# by l once at the end, not per tile.  Beyond Q, K, V, O, forward saves only each row's logsumexp L = m + log l.
# Backward (FA2 Alg. 2) does not keep P, the (T x T) tensor we avoided: each tile's P = exp(S - L) is recomputed
# exactly -- an extra Q K^T matmul per tile, cheap next to writing P to HBM and reading it back -- then
#     dV += P^T dO,   dP = dO V^T,   dS = P * (dP - D),   dQ += dS K / sqrt(d),   dK += dS^T Q / sqrt(d).
# D comes from the softmax Jacobian, dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik), where
#     sum_k P_ik dP_ik = sum_k P_ik (dO_i . V_k) = dO_i . (sum_k P_ik V_k) = dO_i . O_i,
# so D = rowsum(dO * O): one (T,) vector from tensors we already have, no row of P needed.
# Causal: key j is visible to query i iff j <= i (top-left aligned, like SDPA).  A tile wholly above the diagonal is
# -inf everywhere, so P = 0 adds nothing to O, l, dQ, dK or dV: we skip it (half the work when Tq = Tk).

def attention_ref(q, k, v, is_causal=False):
    """Naive reference: materialises the full score matrix. Returns (O, L)."""
    s = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (..., Tq, Tk)
    if is_causal:
        Tq, Tk = s.shape[-2:]
        keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    L = torch.logsumexp(s, dim=-1)  # (..., Tq)
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype), L


class FlashAttentionTorch(torch.autograd.Function):
    """FA2 with explicit tiles in PyTorch. Q, K, V: (..., T, d). Saves L (batch[, heads], n_queries), Q, K, V, O."""

    BLOCK_Q = 16  # tile sizes; on a GPU these would be 64-128 (see the Triton version)
    BLOCK_K = 16

    @staticmethod
    def forward(ctx, Q, K, V, is_causal=False):
        Tq, Tk, d = Q.shape[-2], K.shape[-2], Q.shape[-1]
        scale = 1.0 / math.sqrt(d)
        Bq, Bk = FlashAttentionTorch.BLOCK_Q, FlashAttentionTorch.BLOCK_K
        O = torch.empty(Q.shape, dtype=torch.float32, device=Q.device)   # (..., Tq, d)
        L = torch.empty(Q.shape[:-1], dtype=torch.float32, device=Q.device)  # (..., Tq)
        for qs in range(0, Tq, Bq):
            q = Q[..., qs:qs + Bq, :].float()  # (..., bq, d)
            rows = torch.arange(qs, qs + q.shape[-2], device=Q.device)
            m = torch.full(q.shape[:-1], float("-inf"), device=Q.device)  # (..., bq) running max
            l = torch.zeros_like(m)                                        # (..., bq) running sum
            acc = torch.zeros_like(q)                                      # (..., bq, d)
            k_end = min(Tk, qs + q.shape[-2]) if is_causal else Tk  # keys past the tile's last row: all masked
            for ks in range(0, k_end, Bk):
                k, v = K[..., ks:ks + Bk, :].float(), V[..., ks:ks + Bk, :].float()  # (..., bk, d)
                s = (q @ k.transpose(-2, -1)) * scale  # (..., bq, bk)
                if is_causal:
                    cols = torch.arange(ks, ks + k.shape[-2], device=Q.device)
                    s = s.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
                m_new = torch.maximum(m, s.amax(-1))          # (..., bq)      m' = max(m, rowmax(S_ij))
                p = torch.exp(s - m_new[..., None])           # (..., bq, bk)  P~ = exp(S_ij - m')
                alpha = torch.exp(m - m_new)                  # (..., bq)      exp(m - m'); exp(-inf) = 0
                l = alpha * l + p.sum(-1)                     # l'  = exp(m - m') l  + rowsum(P~)
                acc = alpha[..., None] * acc + p @ v          # O~' = exp(m - m') O~ + P~ V_j
                m = m_new
            O[..., qs:qs + Bq, :] = acc / l[..., None]        # O = O~ / l, once, after the last tile
            L[..., qs:qs + Bq] = m + torch.log(l)             # L = m + log l = logsumexp(S_i)
        O = O.to(Q.dtype)
        ctx.save_for_backward(L, Q, K, V, O)
        ctx.is_causal = is_causal
        return O

    @staticmethod
    def backward(ctx, dO):
        L, Q, K, V, O = ctx.saved_tensors
        Tq, Tk, d = Q.shape[-2], K.shape[-2], Q.shape[-1]
        scale = 1.0 / math.sqrt(d)
        Bq, Bk = FlashAttentionTorch.BLOCK_Q, FlashAttentionTorch.BLOCK_K
        Dr = (dO.float() * O.float()).sum(-1)  # (..., Tq)  D = rowsum(dO * O) = rowsum(P * dP)
        dQ = torch.zeros(Q.shape, dtype=torch.float32, device=Q.device)
        dK = torch.zeros(K.shape, dtype=torch.float32, device=Q.device)
        dV = torch.zeros(V.shape, dtype=torch.float32, device=Q.device)
        for ks in range(0, Tk, Bk):  # outer loop over key tiles, as in the FA2 backward
            k, v = K[..., ks:ks + Bk, :].float(), V[..., ks:ks + Bk, :].float()  # (..., bk, d)
            cols = torch.arange(ks, ks + k.shape[-2], device=Q.device)
            q_start = (ks // Bq) * Bq if ctx.is_causal else 0  # query tiles wholly above row ks see none
            for qs in range(q_start, Tq, Bq):
                q, do = Q[..., qs:qs + Bq, :].float(), dO[..., qs:qs + Bq, :].float()  # (..., bq, d)
                s = (q @ k.transpose(-2, -1)) * scale  # (..., bq, bk)
                p = torch.exp(s - L[..., qs:qs + Bq, None])  # (..., bq, bk)  P = exp(S - L), the exact softmax
                if ctx.is_causal:
                    rows = torch.arange(qs, qs + q.shape[-2], device=Q.device)
                    p = p.masked_fill(cols[None, :] > rows[:, None], 0.0)
                dV[..., ks:ks + Bk, :] += p.transpose(-2, -1) @ do  # dV_j += P^T dO_i
                dp = do @ v.transpose(-2, -1)                       # (..., bq, bk)  dP = dO_i V_j^T
                ds = p * (dp - Dr[..., qs:qs + Bq, None]) * scale  # dS = P * (dP - D), times 1/sqrt(d)
                dQ[..., qs:qs + Bq, :] += ds @ k                    # dQ_i += dS K_j
                dK[..., ks:ks + Bk, :] += ds.transpose(-2, -1) @ q  # dK_j += dS^T Q_i
        return dQ.to(Q.dtype), dK.to(K.dtype), dV.to(V.dtype), None


# ---------------------------------------------------------------
# 3. FlashAttention-2 in Triton.
#
# Same algorithm, but now a "tile" is what one program holds in registers/SRAM:
#   forward  grid (cdiv(Tq, BLOCK_M), batch*heads): one program owns a Q tile and loops over K/V tiles; with is_causal
#            it stops at the diagonal, skipping every fully-masked tile, and only masks inside the diagonal tiles.
#   backward three kernels: D = rowsum(dO*O); dK/dV (one program per K/V tile, loops over Q tiles); dQ (one program
#            per Q tile, loops over K/V tiles).  Two loops avoid atomic adds on dQ, at the cost of computing S twice.
# Tricks: scores are scaled by log2(e)/sqrt(d), so s = S log2(e) and 2^s = e^S: exp2 is one GPU instruction; m, l, L
# stay in log2 units until the final store; sequence lengths need not be tile multiples (loads are masked, padded keys
# get -inf).  Tile shapes in comments: BM = BLOCK_M query rows, BN = BLOCK_N keys, BD = BLOCK_D >= d head-dim lanes.
# Inputs are flattened to contiguous (batch*heads, T, d): one stride serves (B, T, d) and (B, H, T, d).

@triton.jit
def _fa_fwd_inner(acc, l, m, q, K, V, offs_m, offs_d, Tk, qk_scale, lo, hi,
                  MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, d: tl.constexpr, PREC: tl.constexpr):
    """Stream K/V tiles [lo, hi) past a Q tile, updating the online softmax; MASK=False: all-visible tiles, no compares."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < d  # (BD,) all-true when d == BLOCK_D
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = ((cols[:, None] < Tk) & d_ok[None, :]) if MASK else d_ok[None, :]
        k = tl.load(K + cols[:, None] * d + offs_d[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
        v = tl.load(V + cols[:, None] * d + offs_d[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
        if _UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BM, BN) s = Q K^T scale log2(e)
        if MASK:
            valid = cols[None, :] < Tk
            if IS_CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # (BM,) m' = max(m, rowmax s); key 0 is visible: finite
        p = tl.exp2(s - m_new[:, None])           # (BM, BN) P~ = 2^(s - m')
        alpha = tl.exp2(m - m_new)                # (BM,) 2^(m - m') rescales the old sums
        l = l * alpha + tl.sum(p, axis=1)         # l' = 2^(m - m') l + rowsum(P~)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)  # O~' = 2^(m-m') O~ + P~ V
        m = m_new
    return acc, l, m


@triton.jit
def _fa_fwd_kernel(Q, K, V, O, L, Tq, Tk, T_BUCKET, qk_scale, d: tl.constexpr, PREC: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # int64: bh * T * d overflows int32 for big batches
    offs_m = start_m + tl.arange(0, BLOCK_M)  # query rows of this tile
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < d)
    q = tl.load(Q + bh * Tq * d + offs_m[:, None] * d + offs_d[None, :], mask=q_mask, other=0.0)  # (BM, BD)
    if _UPCAST:
        q = q.to(tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # (BM,) running max (log2 units)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)                # (BM,) running sum
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)     # running O~ (BM, BD)
    # Stage 1: tiles that need no mask -- left of the diagonal when causal, inside Tk otherwise.
    # Stage 2: the diagonal / ragged tail tiles, masked.  Tiles right of the diagonal are skipped.
    if IS_CAUSAL:
        split = tl.minimum(start_m, Tk) // BLOCK_N * BLOCK_N
        hi = tl.minimum(Tk, start_m + BLOCK_M)
    else:
        split = Tk // BLOCK_N * BLOCK_N
        hi = Tk
    Kb, Vb = K + bh * Tk * d, V + bh * Tk * d
    acc, l, m = _fa_fwd_inner(acc, l, m, q, Kb, Vb, offs_m, offs_d, Tk, qk_scale, 0, split,
                              False, IS_CAUSAL, BLOCK_N, d, PREC)
    acc, l, m = _fa_fwd_inner(acc, l, m, q, Kb, Vb, offs_m, offs_d, Tk, qk_scale, split, hi,
                              True, IS_CAUSAL, BLOCK_N, d, PREC)
    acc = acc / l[:, None]  # O = O~ / l
    tl.store(O + bh * Tq * d + offs_m[:, None] * d + offs_d[None, :], acc.to(O.dtype.element_ty), mask=q_mask)
    tl.store(L + bh * Tq + offs_m, (m + tl.log2(l)) * 0.6931471805599453, mask=offs_m < Tq)  # L = (m + log2 l) ln 2


@triton.jit
def _fa_bwd_preprocess(O, DO, Dr, Tq, d: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    bh = tl.program_id(1).to(tl.int64)
    mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < d)
    ptrs = bh * Tq * d + offs_m[:, None] * d + offs_d[None, :]
    o = tl.load(O + ptrs, mask=mask, other=0.0).to(tl.float32)  # (BM, BD)
    do = tl.load(DO + ptrs, mask=mask, other=0.0).to(tl.float32)  # (BM, BD)
    tl.store(Dr + bh * Tq + offs_m, tl.sum(o * do, axis=1), mask=offs_m < Tq)  # D = rowsum(dO*O)


@triton.jit
def _fa_bwd_dkdv_kernel(Q, K, V, DO, L, Dr, DK, DV, Tq, Tk, T_BUCKET, sm_scale, d: tl.constexpr, PREC: tl.constexpr,
                        IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < d
    kv_mask = (cols[:, None] < Tk) & d_ok[None, :]
    kv_off = bh * Tk * d + cols[:, None] * d + offs_d[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)  # (BN, BD) stays in SRAM for the whole loop
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    if _UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)  # (BN, BD) fp32 accumulators, written once
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)  # (BN, BD)
    lo = (start_n // BLOCK_M) * BLOCK_M if IS_CAUSAL else 0  # Q tiles wholly above row start_n see none of these keys
    for start_m in range(lo, Tq, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < Tq
        q_off = bh * Tq * d + rows[:, None] * d + offs_d[None, :]
        q = tl.load(Q + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)    # (BM, BD)
        do = tl.load(DO + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BM, BD)
        if _UPCAST:
            q, do = q.to(tl.float32), do.to(tl.float32)
        lse = tl.load(L + bh * Tq + rows, mask=row_ok, other=0.0) * 1.4426950408889634  # (BM,) L, log2 units
        Di = tl.load(Dr + bh * Tq + rows, mask=row_ok, other=0.0)  # (BM,) D = rowsum(dO * O)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * (sm_scale * 1.4426950408889634)  # (BM, BN)
        valid = row_ok[:, None] & (cols[None, :] < Tk)
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)  # (BM, BN) P = exp(S - L), recomputed
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)  # dV += P^T dO
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # (BM, BN) dP = dO V^T
        ds = p * (dp - Di[:, None])  # (BM, BN) dS = P * (dP - D), the 1/sqrt(d) still to come
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)  # dK += dS^T Q
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)  # the 1/sqrt(d), once
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _fa_bwd_dq_kernel(Q, K, V, DO, L, Dr, DQ, Tq, Tk, T_BUCKET, sm_scale, d: tl.constexpr, PREC: tl.constexpr,
                      IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < d
    row_ok = rows < Tq
    q_off = bh * Tq * d + rows[:, None] * d + offs_d[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)  # (BM, BD) stays in SRAM for the whole loop
    do = tl.load(DO + q_off, mask=q_mask, other=0.0)  # (BM, BD)
    if _UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    lse = tl.load(L + bh * Tq + rows, mask=row_ok, other=0.0) * 1.4426950408889634  # (BM,) L, log2 units
    Di = tl.load(Dr + bh * Tq + rows, mask=row_ok, other=0.0)  # (BM,)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)  # (BM, BD)
    hi = tl.minimum(Tk, start_m + BLOCK_M) if IS_CAUSAL else Tk  # keys past this tile's last row: all masked
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < Tk) & d_ok[None, :]
        k = tl.load(K + bh * Tk * d + cols[:, None] * d + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + bh * Tk * d + cols[:, None] * d + offs_d[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
        if _UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * (sm_scale * 1.4426950408889634)  # (BM, BN)
        valid = row_ok[:, None] & (cols[None, :] < Tk)
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)  # (BM, BN) P = exp(S - L)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # (BM, BN) dP = dO V^T
        ds = p * (dp - Di[:, None])  # dS = P * (dP - D)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)  # dQ += dS K (times 1/sqrt(d) at the store)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


class FlashAttentionTriton(torch.autograd.Function):
    """FA2 in Triton: .apply(q, k, v, is_causal); q, k, v (B, T, d) or (B, H, T, d); d in 16..128; fp32/bf16/fp16."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal=False):
        if q.shape[-1] > 128 or q.shape[-1] < 1 or k.shape != v.shape or q.shape[:-2] != k.shape[:-2]:
            raise ValueError(f"FlashAttentionTriton: unsupported shapes q={tuple(q.shape)} k={tuple(k.shape)}")
        Tq, Tk, d, lead = q.shape[-2], k.shape[-2], q.shape[-1], q.shape[:-2]
        q3, k3, v3 = (t.reshape(-1, t.shape[-2], d).contiguous() for t in (q, k, v))  # (BH, T, d)
        BH = q3.shape[0]
        o = torch.empty_like(q3)
        L = torch.empty(BH, Tq, device=q.device, dtype=torch.float32)  # (BH, Tq) logsumexp
        # fp32 inputs: exact "ieee" products (tf32 would cost ~1e-3 relative error);
        # bf16/fp16 inputs always use the tensor cores with fp32 accumulation.
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        # The constexprs every launch shares (backward reuses them); BLOCK_D: head dim padded to 2^k >= 16.
        kw = dict(d=d, IS_CAUSAL=bool(is_causal), BLOCK_D=max(16, triton.next_power_of_2(d)), PREC=prec,
                  **(_INTERP_TILE if INTERPRET else {}))
        grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), BH)  # noqa: E731  BLOCK_M: autotuned or _INTERP_TILE (6.)
        tb = triton.next_power_of_2(max(Tq, Tk))  # T_BUCKET, the autotuner key
        _fa_fwd[grid](q3, k3, v3, o, L, Tq, Tk, tb, 1.0 / math.sqrt(d) * LOG2E, **kw)  # qk_scale = log2(e) / sqrt(d)
        ctx.save_for_backward(L.view(*lead, Tq), q3, k3, v3, o)  # L: (batch[, heads], n_queries)
        ctx.shape, ctx.kw, ctx.tb = (lead, Tq, Tk, d), kw, tb
        return o.reshape(q.shape)

    @staticmethod
    def backward(ctx, do):
        L, q3, k3, v3, o = ctx.saved_tensors
        lead, Tq, Tk, d = ctx.shape
        L = L.view(-1, Tq)  # (BH, Tq)
        BH = q3.shape[0]
        do3 = do.reshape(BH, Tq, d).contiguous()  # (BH, Tq, d)
        Dr = torch.empty_like(L)  # (BH, Tq)  D = rowsum(dO * O), 64 rows per program
        _fa_bwd_preprocess[(triton.cdiv(Tq, 64), BH)](o, do3, Dr, Tq, d, BLOCK_M=64, BLOCK_D=ctx.kw["BLOCK_D"])
        dq, dk, dv = torch.empty_like(q3), torch.empty_like(k3), torch.empty_like(v3)
        sm_scale = 1.0 / math.sqrt(d)
        grid_kv = lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), BH)  # noqa: E731  one program per K/V tile
        grid_q = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), BH)  # noqa: E731   one program per Q tile
        _fa_dkdv[grid_kv](q3, k3, v3, do3, L, Dr, dk, dv, Tq, Tk, ctx.tb, sm_scale, **ctx.kw)
        _fa_dq[grid_q](q3, k3, v3, do3, L, Dr, dq, Tq, Tk, ctx.tb, sm_scale, **ctx.kw)
        return (dq.reshape(*lead, Tq, d), dk.reshape(*lead, Tk, d), dv.reshape(*lead, Tk, d), None)


# ---------------------------------------------------------------
# 4. Fused SwiGLU: out = silu(a) * b.  Eager PyTorch writes silu(a) to HBM and reads it back;
# the fused kernel reads a and b once and writes out once (and the backward likewise).
#     d/da = dout * b * sig(a) * (1 + a * (1 - sig(a))),   d/db = dout * silu(a)

@triton.jit
def _swiglu_fwd_kernel(A, B, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (a * tl.sigmoid(a) * b).to(OUT.dtype.element_ty), mask=mask)  # silu(a) b = a sig(a) b


@triton.jit
def _swiglu_bwd_kernel(A, B, DOUT, DA, DB, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    tl.store(DA + offs, (g * b * sig * (1.0 + a * (1.0 - sig))).to(DA.dtype.element_ty), mask=mask)  # d/da
    tl.store(DB + offs, (g * a * sig).to(DB.dtype.element_ty), mask=mask)  # d/db = dout silu(a)


class SwiGLUTriton(torch.autograd.Function):
    """silu(a) * b elementwise; a and b of the same shape (the w1 x and w3 x of the FFN)."""

    BLOCK = 1024

    @staticmethod
    def forward(ctx, a, b):
        a2, b2 = a.contiguous(), b.contiguous()
        out = torch.empty_like(a2)
        n = a2.numel()  # one flat grid: an elementwise op does not care about the shape
        _swiglu_fwd_kernel[(triton.cdiv(n, SwiGLUTriton.BLOCK),)](a2, b2, out, n, BLOCK=SwiGLUTriton.BLOCK)
        ctx.save_for_backward(a2, b2)
        return out

    @staticmethod
    def backward(ctx, dout):
        a2, b2 = ctx.saved_tensors
        da, db = torch.empty_like(a2), torch.empty_like(b2)
        n = a2.numel()
        _swiglu_bwd_kernel[(triton.cdiv(n, SwiGLUTriton.BLOCK),)](a2, b2, dout.contiguous(), da, db, n,
                                                                 BLOCK=SwiGLUTriton.BLOCK)
        return da, db


# ---------------------------------------------------------------
# 5. Chunked cross-entropy.  The LM head makes (N tokens x V vocab) logits: 8 GiB in fp32 for N = 16k and V = 128k,
# plus as much again for their gradient, usually the step's largest tensor.  But each row of the loss only needs its
# own row of logits, and d loss / d logits = (softmax - onehot) / N is known as soon as the row's logits are.  So we
# go chunk by chunk: logits_c = h_c W^T, loss_c, and right away dh_c = dlogits_c W and dW += dlogits_c^T h_c -- then
# throw logits_c away.  Peak extra memory: (chunk x V), not (N x V).  The gradients are computed in the forward (Liger
# kernel's trick); backward only scales them by grad_output.

class ChunkedCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of softmax(h @ W^T) against targets, never building all logits.
    h: (N, C) hidden states, W: (V, C) lm_head weight, targets: (N,) int64."""

    @staticmethod
    def forward(ctx, h, W, targets, chunk_size=1024):
        N = h.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h)
        dW = torch.zeros(W.shape, dtype=torch.float32, device=W.device)  # (V, C)
        for s in range(0, N, chunk_size):
            hc, tc = h[s:s + chunk_size], targets[s:s + chunk_size]
            logits = (hc @ W.t()).float()                         # (n, V): the only big tensor
            lse = torch.logsumexp(logits, dim=-1)                 # (n,)
            loss += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()  # CE_i = lse(z_i) - z_i[t_i]
            g = torch.softmax(logits, dim=-1)                     # dloss/dlogits = (p - onehot) / N
            g[torch.arange(len(tc), device=h.device), tc] -= 1.0
            g = (g / N).to(h.dtype)                               # (n, V) dlogits, in h's dtype for the matmuls
            dh[s:s + chunk_size] = g @ W                          # (n, C)
            dW += (g.t() @ hc).float()                            # (V, C)
        ctx.save_for_backward(dh, dW.to(W.dtype))
        return loss / N

    @staticmethod
    def backward(ctx, grad_out):
        dh, dW = ctx.saved_tensors
        return dh * grad_out, dW * grad_out, None, None


# ---------------------------------------------------------------
# 6. Autotuning the FlashAttention kernels on a GPU (FlashAttentionTriton launches _fa_fwd, _fa_dkdv, _fa_dq).  Every
# config is a separate compile (seconds each), so the search space is a handful of Hopper-friendly tiles (BLOCK_M,
# BLOCK_N, warps, stages), and we only search where speed matters: bf16/fp16 and sequences longer than 256.  fp32 (our
# exact "ieee" correctness path) and short sequences take the first, safe config.

def _cfgs(tiles):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in tiles]


_FA_CONFIGS = _cfgs([(64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3)])
_FA_BWD_CONFIGS = _cfgs([(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 8, 3)])
# T_BUCKET = next power of two >= max(Tq, Tk) is an argument the kernels ignore: it is the autotuner's key, so a new
# sequence length (every step of a generation loop) reuses its bucket's tuned config instead of searching again.
_KEY = ["T_BUCKET", "d", "IS_CAUSAL"]


def _prune(configs, nargs, **kwargs):  # fp32 or T <= 256: the first config, no search
    return configs if kwargs["PREC"] != "ieee" and nargs["T_BUCKET"] > 256 else configs[:1]


def _tuned(kernel, configs):  # in the interpreter: the bare kernel, launched with _INTERP_TILE
    return kernel if INTERPRET else triton.autotune(configs=configs, key=_KEY,
                                                    prune_configs_by={"early_config_prune": _prune})(kernel)


_fa_fwd = _tuned(_fa_fwd_kernel, _FA_CONFIGS)
_fa_dkdv = _tuned(_fa_bwd_dkdv_kernel, _FA_BWD_CONFIGS)
_fa_dq = _tuned(_fa_bwd_dq_kernel, _FA_BWD_CONFIGS)
_INTERP_TILE = {"BLOCK_M": 16, "BLOCK_N": 16}  # tl.dot needs every dim >= 16


# ---------------------------------------------------------------
# 7. Demo: causal attention and RMSNorm vs the naive references (the tests check far more).

def demo(T=64, d=32):
    dev = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
    q, k, v = (torch.randn(1, 2, T, d, device=dev) for _ in range(3))  # (B, H, T, d)
    ref = attention_ref(q, k, v, True)[0]
    print(f"causal attention (1, 2, {T}, {d}) fp32, {dev}: naive keeps {8 * T * T} B of scores, FA2 {8 * T} B of L")
    for fa in (FlashAttentionTorch, FlashAttentionTriton):
        print(f"  {fa.__name__:20s} max |O - naive| = {(fa.apply(q, k, v, True) - ref).abs().max().item():.1e}")
    x, w = torch.randn(8, 48, device=dev), torch.randn(48, device=dev)
    print(f"  {'RMSNormTriton':20s} max |y - ref| = {(RMSNormTriton.apply(x, w) - rmsnorm_ref(x, w)).abs().max():.1e}")


if __name__ == "__main__":
    import argparse
    argparse.ArgumentParser(description="Run each kernel once against its naive reference. Tests: "
                            "python -m pytest test_all.py -k kernels; benchmarks: python bench.py --only kernels.").parse_args()
    torch.manual_seed(0)
    demo()
