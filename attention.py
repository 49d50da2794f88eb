"""
Attention for the causal chunked video DiT: a hand-written Triton flash-attention
(FlashAttention-2: online softmax in base 2, forward + backward) and a plain
PyTorch reference that defines what the kernel must compute.

Layout is Wan's: q (B, Lq, H, D), k and v (B, Lk, H, D). The kernel takes the
strides of every tensor, so q/k/v may be views (a slice of a fused qkv
projection, the first n tokens of a preallocated KV-cache buffer) and are never
copied.

The mask is the block-causal mask of autoregressive video diffusion, in token
units. Query i sits at absolute position p = q_offset + i (q_offset > 0 when
the queries are the newest chunk and k/v hold the cache plus that chunk); key j
sits at position j.
  chunk == 0 : every key in [0, Lk) is visible.
  chunk  > 0 : hi(p) = min(Lk, (p // chunk + 1) * chunk); key j is visible iff j < hi(p),
               i.e. a query sees its own chunk and everything before it.
  window > 0 : (LongLive short-window attention, needs chunk > 0) additionally
               j >= hi(p) - window or j < sink: a sliding window of `window`
               tokens ending at the query's chunk, plus `sink` tokens at the
               start that stay visible forever.
With Lk > 0 every row sees at least one key (hi(p) >= 1 and window >= 1).
Rows that see no key at all (only possible when Lk == 0) give output 0, not NaN,
in both the kernel and the reference.
"""

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# The test-suite runs the kernels on CPU through Triton's interpreter
# (TRITON_INTERPRET=1, which Triton itself reads when the kernels are defined,
# so this is decided once at import time).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Which implementation attention() uses when called with backend="auto":
# "auto" (kernel where supported, else reference), "triton" or "torch".
# The model can flip it globally, e.g. `attention.BACKEND = "torch"`.
BACKEND = "auto"

# Precision of tl.dot on float32 operands. On the GPU "tf32" (10-bit mantissa
# products, fp32 accumulation) is ~8x faster than exact "ieee"; expect relative
# errors around 1e-3 for fp32 inputs there. The interpreter is exact anyway.
FP32_DOT_PRECISION = "ieee" if INTERPRET else "tf32"

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_HEAD_DIMS = (16, 32, 64, 128)  # tl.arange needs a power of two, tl.dot needs >= 16

_LOG2E = tl.constexpr(1.4426950408889634)  # softmax in base 2: exp(x) = exp2(x * log2(e))
_LN2 = tl.constexpr(0.6931471805599453)


# -----------------------------------------------------------------------------
# the mask: reference definition, and an exact count of its visible pairs

def _check_mask_args(q_offset, chunk, sink, window):
    if min(q_offset, chunk, sink, window) < 0:
        raise ValueError("q_offset, chunk, sink and window must be >= 0")
    if window > 0 and chunk == 0:
        raise ValueError("window > 0 needs chunk > 0 (the window ends at the query's chunk)")


def attention_mask(Lq, Lk, *, q_offset=0, chunk=0, sink=0, window=0, device=None):
    """bool (Lq, Lk), True = visible. The single source of truth for the mask."""
    _check_mask_args(q_offset, chunk, sink, window)
    if chunk == 0:
        return torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    pos = torch.arange(Lq, device=device)[:, None] + q_offset  # (Lq, 1) absolute query positions
    key = torch.arange(Lk, device=device)[None, :]  # (1, Lk)
    hi = ((pos // chunk + 1) * chunk).clamp(max=Lk)  # (Lq, 1) end of the query's chunk
    mask = key < hi  # (Lq, Lk)
    if window > 0:
        mask &= (key >= hi - window) | (key < sink)
    return mask


def visible_pairs(Lq, Lk, q_offset=0, chunk=0, sink=0, window=0) -> int:
    """Number of True entries of attention_mask(...), without building it."""
    _check_mask_args(q_offset, chunk, sink, window)
    if Lq <= 0 or Lk <= 0:
        return 0
    if chunk == 0:
        return Lq * Lk
    first, last = q_offset, q_offset + Lq - 1
    total = 0
    for c in range(first // chunk, last // chunk + 1):  # hi(p) is constant within a query chunk
        rows = min(last, (c + 1) * chunk - 1) - max(first, c * chunk) + 1
        hi = min(Lk, (c + 1) * chunk)
        if window > 0:  # the window [hi - window, hi), plus the sink keys left of it
            per_row = min(window, hi) + min(sink, max(hi - window, 0))
        else:
            per_row = hi
        total += rows * per_row
    return total


def attention_flops(B, H, Lq, Lk, D, q_offset=0, chunk=0, sink=0, window=0) -> float:
    """Forward matmul FLOPs of the masked attention: 2 for QK^T and 2 for PV per
    visible (query, key) pair and head dim. The backward is 2.5x this (5 matmuls)."""
    return 4.0 * B * H * D * visible_pairs(Lq, Lk, q_offset, chunk, sink, window)


def attention_reference(q, k, v, *, q_offset=0, chunk=0, sink=0, window=0, scale=None):
    """SDPA with the boolean mask. q: (B, Lq, H, D); k, v: (B, Lk, H, D) -> (B, Lq, H, D)."""
    Lq, Lk = q.shape[1], k.shape[1]
    mask = attention_mask(Lq, Lk, q_offset=q_offset, chunk=chunk, sink=sink, window=window,
                          device=q.device)  # (Lq, Lk)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)  # (B, H, Lq, D)
    out = out.masked_fill(~mask.any(dim=1)[:, None], 0.0)  # rows that see no key -> 0, as in the kernel
    return out.transpose(1, 2)  # (B, Lq, H, D)


# -----------------------------------------------------------------------------
# autotuning

if INTERPRET:
    # The interpreter runs every program of the grid in Python: benchmarking
    # configs would multiply test time, and big tiles would hide the
    # tile-boundary logic at test sizes. One small config, BLOCK_M != BLOCK_N
    # so that mixing up the two in the skipping logic shows up in tests.
    _CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_stages=1, num_warps=1)]
else:
    _CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
                for bm in (64, 128) for bn in (64, 128) for s in (2, 3, 4) for w in (4, 8)]

# The mask parameters and lengths are in the key: the best tiles depend on how
# many tiles are skipped or masked, so a cached choice is only reused for the
# same problem (dtype is added to the key by Triton itself).
_TUNE_KEY = ["Lq", "Lk", "q_offset", "chunk", "sink", "window", "HEAD_DIM", "DOT_PRECISION"]
_SMEM_BUDGET = 227 * 1024  # H100/H200: at most 227 KB of shared memory per block


def _config_filter(resident_block, resident_len, streamed_block, streamed_len):
    """Prune function for a kernel that keeps one tile resident (resident_block
    rows of a sequence of length resident_len) and streams tiles of the other."""

    def prune(configs, named_args, **kwargs):
        if len(configs) == 1:
            return configs
        args = {**named_args, **kwargs}
        D, elsize = args["Q"].shape[-1], args["Q"].element_size()
        kept = []
        for c in configs:
            res, stream = c.kwargs[resident_block], c.kwargs[streamed_block]
            # no tile larger than the sequence needs (64 is our smallest tile)
            if res > max(64, triton.next_power_of_2(args[resident_len])):
                continue
            if stream > max(64, triton.next_power_of_2(args[streamed_len])):
                continue
            # shared-memory estimate: two resident tiles plus a K and a V (or
            # Q and dO) tile per pipeline stage; on sm_90 it is close to (and
            # mostly above) what Triton allocates for these kernels. It drops
            # e.g. all but the 64x64 tiles for fp32 at D=128. Anything that
            # still does not fit is skipped by the autotuner, which times
            # OutOfResources as infinitely slow.
            if (2 * res + 2 * stream * c.num_stages) * D * elsize > _SMEM_BUDGET:
                continue
            # 8 warps on a 64x64 tile leave each warp too little work
            if res * stream < 128 * 64 and c.num_warps == 8:
                continue
            kept.append(c)
        return kept or [min(configs, key=lambda c: (c.kwargs[resident_block], c.kwargs[streamed_block]))]

    return prune


# -----------------------------------------------------------------------------
# kernel helpers

@triton.jit
def _visible(pos, key, Lk, chunk, sink, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """Elementwise mask. pos: query positions, key: key indices, broadcastable
    against each other (e.g. (BM, 1) and (1, BN)). Same rule as attention_mask."""
    vis = key < Lk
    if CAUSAL:
        hi = tl.minimum((pos // chunk + 1) * chunk, Lk)
        vis = vis & (key < hi)
        if WINDOWED:
            vis = vis & ((key >= hi - window) | (key < sink))
    return vis


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. DOT_UPCAST multiplies in fp32 instead: only
    set under the interpreter for bfloat16, whose tl.dot it does not support
    (the products are the same: bf16 values are exact in fp32)."""
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _hi(pos, Lk, chunk):
    """End (exclusive) of the keys a query at `pos` may see with chunk > 0."""
    return tl.minimum((pos // chunk + 1) * chunk, Lk)


@triton.jit
def _tile_needs_mask(start_n, hi_first, hi_last, Lk, sink, window,
                     CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr):
    """False iff every key of [start_n, start_n + BLOCK_N) is visible to every
    (valid) query of a block whose hi(p) ranges over [hi_first, hi_last]."""
    end_n = start_n + BLOCK_N
    needs = end_n > Lk  # keys past the end are loaded as zeros and must not count
    if CAUSAL:
        needs = needs | (end_n > hi_first)  # the earliest query ends before the tile does
        if WINDOWED:
            # partly left of the window of the latest query, and not all sink
            needs = needs | ((end_n > sink) & (start_n < hi_last - window))
    return needs


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, skl, skd, svl, svd, pos, offs_n, offs_d,
               lo, hi, hi_first, hi_last, Lk, chunk, sink, window, qk_scale,
               CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, DOT_PRECISION: tl.constexpr,
               DOT_UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over the key tiles starting in [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BN,)
        kv_ok = cols[:, None] < Lk  # (BN, 1)
        k = tl.load(K + cols[:, None] * skl + offs_d[None, :] * skd, mask=kv_ok, other=0.0)  # (BN, D)
        s = _dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * qk_scale  # (BM, BN), log2 units
        if _tile_needs_mask(start_n, hi_first, hi_last, Lk, sink, window, CAUSAL, WINDOWED, BLOCK_N):
            vis = _visible(pos[:, None], cols[None, :], Lk, chunk, sink, window, CAUSAL, WINDOWED)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BM,)
        # a row with nothing visible yet has m_new = -inf; subtract 0 instead so
        # that exp2(-inf - (-inf)) = NaN never happens (p and alpha become 0)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])  # (BM, BN)
        alpha = tl.math.exp2(m_i - m_safe)  # (BM,) rescales what was accumulated so far
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * svl + offs_d[None, :] * svd, mask=kv_ok, other=0.0)  # (BN, D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)  # (BM, D)
        m_i = m_new
    return acc, l_i, m_i


# -----------------------------------------------------------------------------
# forward

@triton.autotune(configs=_CONFIGS, key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _config_filter("BLOCK_M", "Lq", "BLOCK_N", "Lk")})
@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              sqb, sql, sqh, sqd, skb, skl, skh, skd, svb, svl, svh, svd, sob, sol, soh, sod,
              H, Lq, Lk, q_offset, chunk, sink, window, qk_scale,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
              DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid: (query blocks, B * H)
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64: batch offsets of a large cache overflow int32
    h = (bh % H).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    O += b * sob + h * soh
    LSE += bh.to(tl.int64) * Lq

    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BM,) query rows
    offs_n = tl.arange(0, BLOCK_N)  # (BN,)
    offs_d = tl.arange(0, HEAD_DIM)  # (D,)
    row_ok = offs_m < Lq
    q = tl.load(Q + offs_m[:, None] * sql + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0)  # (BM, D)
    pos = q_offset + offs_m  # (BM,) absolute query positions

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # hi(p) grows with p, so the block's first and last valid query bound it
    p_first = q_offset + start_m
    p_last = q_offset + tl.minimum(start_m + BLOCK_M, Lq) - 1
    hi_first, hi_last = Lk, Lk
    if CAUSAL:
        hi_first = _hi(p_first, Lk, chunk)
        hi_last = _hi(p_last, Lk, chunk)  # no query of the block sees a key >= hi_last
    # key tiles to visit: the sink tiles [0, sink_end), then [win_start, hi_last).
    # Without a window the first range is empty and the second starts at 0;
    # with one, the window starts after the last sink tile (no tile twice).
    sink_end, win_start = 0, 0
    if WINDOWED:
        sink_end = tl.minimum(tl.cdiv(sink, BLOCK_N) * BLOCK_N, hi_last)
        win_start = tl.maximum((tl.maximum(hi_first - window, 0) // BLOCK_N) * BLOCK_N, sink_end)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, skl, skd, svl, svd, pos, offs_n, offs_d,
                               0, sink_end, hi_first, hi_last, Lk, chunk, sink, window, qk_scale,
                               CAUSAL, WINDOWED, DOT_PRECISION, DOT_UPCAST, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, skl, skd, svl, svd, pos, offs_n, offs_d,
                               win_start, hi_last, hi_first, hi_last, Lk, chunk, sink, window, qk_scale,
                               CAUSAL, WINDOWED, DOT_PRECISION, DOT_UPCAST, BLOCK_N)

    seen = l_i > 0  # False only for rows that see no key: output 0, LSE +inf
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]  # (BM, D)
    # natural-log LSE; +inf makes exp(s - lse) = 0 in the backward for empty rows
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * _LN2, float("inf"))  # (BM,)
    tl.store(O + offs_m[:, None] * sol + offs_d[None, :] * sod, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + offs_m, lse, mask=row_ok)


# -----------------------------------------------------------------------------
# backward

@triton.jit
def _attn_bwd_delta(O, DO, Delta, sob, sol, soh, sod, sdb, sdl, sdh, sdd, H, Lq,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), the softmax-backward correction term. (B, H, Lq) fp32."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :] * sod,
                mask=row_ok[:, None], other=0.0).to(tl.float32)  # (BM, D)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdl + offs_d[None, :] * sdd,
                 mask=row_ok[:, None], other=0.0).to(tl.float32)  # (BM, D)
    tl.store(Delta + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.autotune(configs=_CONFIGS, key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _config_filter("BLOCK_N", "Lk", "BLOCK_M", "Lq")})
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV,
                   sqb, sql, sqh, sqd, skb, skl, skh, skd, svb, svl, svh, svd,
                   sdb, sdl, sdh, sdd, sgb, sgl, sgh, sgd,
                   H, Lq, Lk, q_offset, chunk, sink, window, qk_scale, scale,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV for one key block, looping over the query blocks that can see it.
    Works on transposed scores (BN, BM), so dv = P^T dO and dk = dS^T Q need no
    transpose of P or dS. DK and DV share the strides sg* (both are fresh
    contiguous tensors)."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdb + h * sdh
    DK += b * sgb + h * sgh
    DV += b * sgb + h * sgh
    LSE += bh.to(tl.int64) * Lq
    Delta += bh.to(tl.int64) * Lq

    offs_n = start_n + tl.arange(0, BLOCK_N)  # (BN,) key rows
    offs_m0 = tl.arange(0, BLOCK_M)  # (BM,)
    offs_d = tl.arange(0, HEAD_DIM)  # (D,)
    key_ok = offs_n[:, None] < Lk  # (BN, 1)
    k = tl.load(K + offs_n[:, None] * skl + offs_d[None, :] * skd, mask=key_ok, other=0.0)  # (BN, D)
    v = tl.load(V + offs_n[:, None] * svl + offs_d[None, :] * svd, mask=key_ok, other=0.0)  # (BN, D)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    # which queries can see a key of this block?
    m_lo = 0
    if CAUSAL:
        # p sees j iff p >= start of j's chunk; the block's first key is the strictest
        m_lo = (tl.maximum((start_n // chunk) * chunk - q_offset, 0) // BLOCK_M) * BLOCK_M
    m_hi = Lq
    if WINDOWED:
        # a non-sink key j stays in the window of p while hi(p) <= j + window,
        # i.e. p < ((j + window) // chunk) * chunk -- unless Lk caps hi(p) first.
        # The block's last key is the most lenient; any sink key lifts the bound.
        n_last = tl.minimum(start_n + BLOCK_N, Lk) - 1
        win_hi = tl.maximum(((n_last + window) // chunk) * chunk - q_offset, 0)
        bounded = (start_n >= sink) & (n_last + window < Lk)
        m_hi = tl.where(bounded, tl.minimum(win_hi, Lq), Lq)

    for start_m in range(m_lo, m_hi, BLOCK_M):
        offs_m = start_m + offs_m0  # (BM,)
        row_ok = offs_m < Lq
        q = tl.load(Q + offs_m[:, None] * sql + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0)  # (BM, D)
        do = tl.load(DO + offs_m[:, None] * sdl + offs_d[None, :] * sdd, mask=row_ok[:, None], other=0.0)  # (BM, D)
        # padded rows get lse = +inf so their probabilities are exactly 0
        lse2 = tl.load(LSE + offs_m, mask=row_ok, other=float("inf")) * _LOG2E  # (BM,)
        delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)  # (BM,)
        sT = _dot(k, tl.trans(q), DOT_PRECISION, DOT_UPCAST) * qk_scale  # (BN, BM)
        hi_first, hi_last = Lk, Lk
        if CAUSAL:
            hi_first = _hi(q_offset + start_m, Lk, chunk)
            hi_last = _hi(q_offset + tl.minimum(start_m + BLOCK_M, Lq) - 1, Lk, chunk)
        if _tile_needs_mask(start_n, hi_first, hi_last, Lk, sink, window, CAUSAL, WINDOWED, BLOCK_N):
            vis = _visible((q_offset + offs_m)[None, :], offs_n[:, None], Lk, chunk, sink, window,
                           CAUSAL, WINDOWED)  # (BN, BM)
            sT = tl.where(vis, sT, float("-inf"))
        pT = tl.math.exp2(sT - lse2[None, :])  # (BN, BM) softmax probabilities, recomputed
        dv += _dot(pT.to(do.dtype), do, DOT_PRECISION, DOT_UPCAST)  # (BN, D)
        dpT = _dot(v, tl.trans(do), DOT_PRECISION, DOT_UPCAST)  # (BN, BM)
        dsT = pT * (dpT - delta[None, :])  # (BN, BM) gradient wrt the scaled scores
        dk += _dot(dsT.to(q.dtype), q, DOT_PRECISION, DOT_UPCAST)  # (BN, D)

    dk *= scale  # scores are scale * q.k
    tl.store(DK + offs_n[:, None] * sgl + offs_d[None, :] * sgd, dk.to(DK.dtype.element_ty), mask=key_ok)
    tl.store(DV + offs_n[:, None] * sgl + offs_d[None, :] * sgd, dv.to(DV.dtype.element_ty), mask=key_ok)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, K, V, skl, skd, svl, svd, pos, offs_n, offs_d,
              lo, hi, hi_first, hi_last, Lk, chunk, sink, window, qk_scale,
              CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, DOT_PRECISION: tl.constexpr,
              DOT_UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dQ (unscaled) over the key tiles starting in [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BN,)
        kv_ok = cols[:, None] < Lk  # (BN, 1)
        k = tl.load(K + cols[:, None] * skl + offs_d[None, :] * skd, mask=kv_ok, other=0.0)  # (BN, D)
        v = tl.load(V + cols[:, None] * svl + offs_d[None, :] * svd, mask=kv_ok, other=0.0)  # (BN, D)
        s = _dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * qk_scale  # (BM, BN)
        if _tile_needs_mask(start_n, hi_first, hi_last, Lk, sink, window, CAUSAL, WINDOWED, BLOCK_N):
            vis = _visible(pos[:, None], cols[None, :], Lk, chunk, sink, window, CAUSAL, WINDOWED)
            s = tl.where(vis, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])  # (BM, BN)
        dp = _dot(do, tl.trans(v), DOT_PRECISION, DOT_UPCAST)  # (BM, BN)
        ds = p * (dp - delta[:, None])  # (BM, BN)
        dq += _dot(ds.to(k.dtype), k, DOT_PRECISION, DOT_UPCAST)  # (BM, D)
    return dq


@triton.autotune(configs=_CONFIGS, key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _config_filter("BLOCK_M", "Lq", "BLOCK_N", "Lk")})
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, Delta, DQ,
                 sqb, sql, sqh, sqd, skb, skl, skh, skd, svb, svl, svh, svd,
                 sdb, sdl, sdh, sdd, sgb, sgl, sgh, sgd,
                 H, Lq, Lk, q_offset, chunk, sink, window, qk_scale, scale,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ for one query block; visits exactly the key tiles the forward visited."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdb + h * sdh
    DQ += b * sgb + h * sgh
    LSE += bh.to(tl.int64) * Lq
    Delta += bh.to(tl.int64) * Lq

    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = tl.arange(0, BLOCK_N)  # (BN,)
    offs_d = tl.arange(0, HEAD_DIM)  # (D,)
    row_ok = offs_m < Lq
    q = tl.load(Q + offs_m[:, None] * sql + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0)  # (BM, D)
    do = tl.load(DO + offs_m[:, None] * sdl + offs_d[None, :] * sdd, mask=row_ok[:, None], other=0.0)  # (BM, D)
    lse2 = tl.load(LSE + offs_m, mask=row_ok, other=float("inf")) * _LOG2E  # (BM,)
    delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)  # (BM,)
    pos = q_offset + offs_m  # (BM,)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    p_first = q_offset + start_m
    p_last = q_offset + tl.minimum(start_m + BLOCK_M, Lq) - 1
    hi_first, hi_last = Lk, Lk
    if CAUSAL:
        hi_first = _hi(p_first, Lk, chunk)
        hi_last = _hi(p_last, Lk, chunk)
    sink_end, win_start = 0, 0
    if WINDOWED:  # the same two ranges of key tiles as the forward
        sink_end = tl.minimum(tl.cdiv(sink, BLOCK_N) * BLOCK_N, hi_last)
        win_start = tl.maximum((tl.maximum(hi_first - window, 0) // BLOCK_N) * BLOCK_N, sink_end)
    dq = _dq_inner(dq, q, do, lse2, delta, K, V, skl, skd, svl, svd, pos, offs_n, offs_d,
                   0, sink_end, hi_first, hi_last, Lk, chunk, sink, window, qk_scale,
                   CAUSAL, WINDOWED, DOT_PRECISION, DOT_UPCAST, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse2, delta, K, V, skl, skd, svl, svd, pos, offs_n, offs_d,
                   win_start, hi_last, hi_first, hi_last, Lk, chunk, sink, window, qk_scale,
                   CAUSAL, WINDOWED, DOT_PRECISION, DOT_UPCAST, BLOCK_N)

    dq *= scale
    tl.store(DQ + offs_m[:, None] * sgl + offs_d[None, :] * sgd, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# -----------------------------------------------------------------------------
# launchers and the autograd Function

def _mask_constexprs(q, chunk, window):
    precision = FP32_DOT_PRECISION if q.dtype == torch.float32 else "tf32"  # only matters for fp32
    return dict(HEAD_DIM=q.shape[-1], CAUSAL=chunk > 0, WINDOWED=window > 0, DOT_PRECISION=precision,
                DOT_UPCAST=INTERPRET and q.dtype == torch.bfloat16)


def _flash_forward(q, k, v, q_offset, chunk, sink, window, scale):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    o = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)  # (B, Lq, H, D) contiguous
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)  # (B, H, Lq)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)
    _attn_fwd[grid](q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                    H, Lq, Lk, q_offset, chunk, sink, window, scale * math.log2(math.e),
                    **_mask_constexprs(q, chunk, window))
    return o, lse


def _flash_backward(do, q, k, v, o, lse, q_offset, chunk, sink, window, scale):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    # every row of these is written by the kernels (zeros for keys no query sees)
    dq = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)  # (B, Lq, H, D)
    dk = torch.empty((B, Lk, H, D), dtype=k.dtype, device=k.device)  # (B, Lk, H, D)
    dv = torch.empty((B, Lk, H, D), dtype=v.dtype, device=v.device)  # (B, Lk, H, D)
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)  # (B, H, Lq)
    _attn_bwd_delta[(triton.cdiv(Lq, 64), B * H)](o, do, delta, *o.stride(), *do.stride(), H, Lq,
                                                  HEAD_DIM=D, BLOCK_M=64)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    mask_args = (H, Lq, Lk, q_offset, chunk, sink, window, scale * math.log2(math.e), scale)
    constexprs = _mask_constexprs(q, chunk, window)
    grid_n = lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * H)
    _attn_bwd_dkdv[grid_n](q, k, v, do, lse, delta, dk, dv, *strides, *dk.stride(), *mask_args, **constexprs)
    grid_m = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)
    _attn_bwd_dq[grid_m](q, k, v, do, lse, delta, dq, *strides, *dq.stride(), *mask_args, **constexprs)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, q_offset, chunk, sink, window, scale):
        o, lse = _flash_forward(q, k, v, q_offset, chunk, sink, window, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mask_args = (q_offset, chunk, sink, window, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _flash_backward(do, q, k, v, o, lse, *ctx.mask_args)
        return dq, dk, dv, None, None, None, None, None


# -----------------------------------------------------------------------------
# public entry point

def kernel_supports(q, k, v) -> bool:
    """Can the Triton kernel run on these inputs?"""
    return ((q.is_cuda or INTERPRET) and q.dtype in KERNEL_DTYPES and q.dtype == k.dtype == v.dtype
            and q.shape[-1] in KERNEL_HEAD_DIMS and q.device == k.device == v.device)


def attention(q, k, v, *, q_offset: int = 0, chunk: int = 0, sink: int = 0, window: int = 0,
              scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """q: (B, Lq, H, D); k, v: (B, Lk, H, D) -> (B, Lq, H, D), masked as in the module docstring.

    Any strides work without copies. backend: "triton" forces the kernel (error
    if unsupported), "torch" forces the reference, "auto" follows the global
    BACKEND, which by default picks the kernel on CUDA (or under
    TRITON_INTERPRET=1) for fp16/bf16/fp32 and D in {16, 32, 64, 128}."""
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"expected q (B, Lq, H, D) and k, v (B, Lk, H, D), got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"batch, heads and head dim of q {q.shape} and k {k.shape} differ")
    _check_mask_args(q_offset, chunk, sink, window)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    choice = BACKEND if backend == "auto" else backend
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown backend {choice!r}")
    if choice == "triton" and not kernel_supports(q, k, v):
        raise ValueError(f"the Triton kernel does not support {q.dtype} on {q.device} with D={q.shape[-1]}")
    if q.shape[1] == 0 or k.shape[1] == 0:  # nothing to tile; the reference returns zeros
        choice = "torch"
    if choice == "torch" or (choice == "auto" and not kernel_supports(q, k, v)):
        return attention_reference(q, k, v, q_offset=q_offset, chunk=chunk, sink=sink, window=window, scale=scale)
    return _FlashAttention.apply(q, k, v, int(q_offset), int(chunk), int(sink), int(window), scale)
