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

import contextlib
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


def _hi_host(pos, Lk, chunk):
    """_hi on the host: end (exclusive) of the keys a query at `pos` may see with chunk > 0."""
    return min((pos // chunk + 1) * chunk, Lk)


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
        hi = _hi_host(c * chunk, Lk, chunk)
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

# Loads go through tensor descriptors (Hopper's TMA copy engine, created on the
# device) when every tensor of a launch allows it (16-byte aligned base and row
# strides, unit stride along D), else through plain masked pointer loads. The
# interpreter runs both. WS = Triton's automatic warp specialization of the main
# key loop (a producer warp issues the TMA loads; needs TMA).
def _cfg(bm, bn, stages, warps, ws=False, occ=1):
    """OCC: programs of this config that fit on one multiprocessor at once
    (registers and shared memory), used to size the forward's split-KV wave."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WS": ws, "OCC": occ}, num_stages=stages, num_warps=warps)


if INTERPRET:
    # The interpreter runs every program of the grid in Python: benchmarking
    # configs would multiply test time, and big tiles would hide the
    # tile-boundary logic at test sizes. One small config, BLOCK_M != BLOCK_N
    # so that mixing up the two in the skipping logic shows up in tests.
    _FWD_CONFIGS = _DKDV_CONFIGS = _DQ_CONFIGS = [_cfg(32, 16, 1, 1)]
else:
    # Candidates measured on an H200 (README, kernel notes); 64x64 tiles on 4
    # warps run two programs per multiprocessor, whose softmax and matmuls overlap.
    _FWD_CONFIGS = [_cfg(128, 128, 2, 4, ws=True), _cfg(64, 64, 3, 4, occ=2), _cfg(64, 64, 2, 4, occ=2),
                    _cfg(128, 64, 3, 8)]
    _DKDV_CONFIGS = [_cfg(64, 128, 3, 4, ws=True), _cfg(64, 128, 2, 8), _cfg(32, 128, 2, 8),
                     _cfg(64, 64, 2, 4, occ=2)]  # BLOCK_N resident
    _DQ_CONFIGS = [_cfg(128, 64, 3, 8), _cfg(128, 64, 2, 8), _cfg(64, 64, 2, 4, occ=2)]  # BLOCK_M resident

# The mask parameters and lengths are in the key: the best tiles depend on how
# many tiles are skipped or masked, so a cached choice is only reused for the
# same problem (dtype is added to the key by Triton itself).
_TUNE_KEY = ["Lq", "Lk", "q_offset", "chunk", "sink", "window", "HEAD_DIM", "DOT_PRECISION", "TMA"]
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
            # warp specialization splits TMA loads from the math: needs TMA, and
            # runs one loop masked throughout, whose row mask (_row_hi) holds for
            # chunks of at least a query tile and no window
            if c.kwargs["WS"] and (not args["TMA"] or args["window"] > 0 or 0 < args["chunk"] < c.kwargs["BLOCK_M"]):
                continue
            kept.append(c)
        # With no mask and a long key loop the warp-specialised tile won every round
        # measured at Wan's inference shapes (README, kernel notes), and the
        # autotuner's 100 ms timings sometimes picked a slower one by noise.
        if args["chunk"] == 0 and args[streamed_len] >= 2048 and any(c.kwargs["WS"] for c in kept):
            kept = [c for c in kept if c.kwargs["WS"]]
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
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """acc + a @ b in fp32 (acc=None: a @ b). DOT_UPCAST multiplies in fp32
    instead: only set under the interpreter for bfloat16, whose tl.dot it does
    not support (the products are the same: bf16 values are exact in fp32)."""
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _desc(X, L, stride, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, TMA: tl.constexpr):
    """A tensor descriptor over the (L, D) matrix at X (row stride `stride`,
    unit stride along D) when TMA, else X itself."""
    if TMA:
        return tl.make_tensor_descriptor(X, shape=[L, HEAD_DIM], strides=[stride, 1], block_shape=[BLOCK, HEAD_DIM])
    else:
        return X


@triton.jit
def _rows(X, start, L, stride, stride_d, offs_r, offs_d, TMA: tl.constexpr):
    """Rows [start, start + len(offs_r)) of the (L, D) matrix X (a descriptor
    when TMA); rows >= L read as 0."""
    if TMA:
        return X.load([start, 0])
    else:
        rows = start + offs_r
        return tl.load(X + rows[:, None] * stride + offs_d[None, :] * stride_d, mask=rows[:, None] < L, other=0.0)


@triton.jit
def _store_rows(X, x, start, L, stride, stride_d, offs_d,
                HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, TMA: tl.constexpr):
    """Store x (BLOCK, D) as rows [start, start + BLOCK) of the (L, D) matrix at X,
    rows >= L left out: through a descriptor when TMA (the only way a warp-specialised
    kernel may address its resident rows, see _row_hi), else through row pointers."""
    if TMA:
        _desc(X, L, stride, HEAD_DIM, BLOCK, True).store([start, 0], x.to(X.dtype.element_ty))
    else:
        rows = start + tl.arange(0, BLOCK)
        tl.store(X + rows[:, None] * stride + offs_d[None, :] * stride_d, x.to(X.dtype.element_ty),
                 mask=rows[:, None] < L)


@triton.jit
def _hi(pos, Lk, chunk):
    """End (exclusive) of the keys a query at `pos` may see with chunk > 0."""
    return tl.minimum((pos // chunk + 1) * chunk, Lk)


@triton.jit
def _row_hi(p0, Lk, chunk, BLOCK: tl.constexpr):
    """hi(p) of the BLOCK query rows at positions p0, p0 + 1, ... when chunk >= BLOCK:
    at most one chunk boundary falls inside, so hi takes at most two values. Built
    from a bare tl.arange: in a warp-specialised loop, Triton 3.6 offsets
    `start + tl.arange(...)` twice in the second half of a split tile."""
    first_end = (p0 // chunk + 1) * chunk  # end of the first row's chunk
    return tl.where(tl.arange(0, BLOCK) < first_end - p0, tl.minimum(first_end, Lk), tl.minimum(first_end + chunk, Lk))


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
def _key_ranges(hi_first, hi_last, sink, window, WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key tiles a query block visits, as four consecutive-in-order ranges
    of tile starts: [0, sink_end) and [win_start, u_lo) masked, [u_lo, u_hi)
    unmasked (every key visible to every row), [u_hi, hi_last) masked.
    Without a window the first two are empty and u_lo = 0."""
    full_end = (hi_first // BLOCK_N) * BLOCK_N  # keys below hi_first: seen by every row of the block
    sink_end, win_start, u_lo = 0, 0, 0
    if WINDOWED:
        sink_end = tl.minimum(tl.cdiv(sink, BLOCK_N) * BLOCK_N, hi_last)
        win_start = tl.maximum((tl.maximum(hi_first - window, 0) // BLOCK_N) * BLOCK_N, sink_end)
        # right of the latest query's window start, so inside every row's window
        u_lo = tl.maximum(tl.cdiv(tl.maximum(hi_last - window, 0), BLOCK_N) * BLOCK_N, win_start)
    u_hi = tl.maximum(full_end, u_lo)
    return sink_end, win_start, u_lo, u_hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, skl, skd, svl, svd, pos, row_hi, offs_n, offs_d,
               lo, hi, Lk, chunk, sink, window, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, TMA: tl.constexpr,
               WS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over the key tiles starting in [lo, hi). Scores stay raw
    (q.k); the scale (in log2 units) is applied inside the exponent, one FMA.
    Masked scores are -1e30, not -inf: a row that has seen only masked keys so
    far accumulates garbage with m = -1e30 * scale, which the first visible key
    wipes out (alpha = 0), and every row sees at least one key. With WS the
    rows' key bounds come as row_hi (BM,) instead of their positions."""
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        k = _rows(K, start_n, Lk, skl, skd, offs_n, offs_d, TMA)  # (BN, D)
        s = _dot(q, tl.trans(k), None, DOT_PRECISION, DOT_UPCAST)  # (BM, BN)
        if MASKED:
            if WS:
                vis = (start_n + offs_n)[None, :] < row_hi[:, None]  # (BM, BN)
            else:
                vis = _visible(pos[:, None], (start_n + offs_n)[None, :], Lk, chunk, sink, window, CAUSAL, WINDOWED)
            s = tl.where(vis, s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # (BM,) running max, log2 units
        p = tl.math.exp2(s * qk_scale - m_new[:, None])  # (BM, BN)
        alpha = tl.math.exp2(m_i - m_new)  # (BM,) rescales what was accumulated so far
        acc = acc * alpha[:, None]
        v = _rows(V, start_n, Lk, svl, svd, offs_n, offs_d, TMA)  # (BN, D)
        acc = _dot(p.to(v.dtype), v, acc, DOT_PRECISION, DOT_UPCAST)  # (BM, D)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _split_plan(n_tiles, n_kv, wave):
    """Split-KV for the last, partial wave of query tiles (no mask only). With
    n_tiles % wave tiles left over after full waves, each of those is cut into
    n_split pieces of consecutive key tiles so that the pieces fill one wave;
    a merge kernel combines them. Returns (n_whole, n_split): tiles [0, n_whole)
    run whole, tile n_whole + i is pieces i * n_split + [0, n_split).
    Mirrored on the host by _split_plan_host."""
    n_tail = n_tiles % wave
    n_split = tl.minimum(wave // tl.maximum(n_tail, 1), n_kv)
    n_split = tl.where(n_tail == 0, 1, n_split)
    n_whole = tl.where(n_split > 1, n_tiles - n_tail, n_tiles)
    return n_whole, n_split


def _split_plan_host(n_tiles, n_kv, wave):
    n_tail = n_tiles % wave
    n_split = 1 if n_tail == 0 else min(wave // n_tail, n_kv)
    return (n_tiles - n_tail if n_split > 1 else n_tiles), n_split


# -----------------------------------------------------------------------------
# forward

@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _config_filter("BLOCK_M", "Lq", "BLOCK_N", "Lk")})
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, PartAcc, PartML,
              sqb, sql, sqh, sqd, skb, skl, skh, skd, svb, svl, svh, svd, sob, sol, soh, sod, sls,
              H, BH, Lq, Lk, q_offset, chunk, sink, window, qk_scale, wave,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SPLIT: tl.constexpr,
              TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr, OCC: tl.constexpr):
    # 1-D grid over query tiles, m fastest (the programs that run together
    # share K and V in L2); with SPLIT, pieces of the last wave's tiles follow
    pid = tl.program_id(0)
    n_m = tl.cdiv(Lq, BLOCK_M)
    n_kv = tl.cdiv(Lk, BLOCK_N)
    tile, kv_lo, kv_hi, piece = pid, 0, Lk, -1
    if SPLIT:  # (selects, not branches: a branch here stops warp specialization)
        n_whole, n_split = _split_plan(n_m * BH, n_kv, wave * OCC)
        is_piece = pid >= n_whole
        piece = tl.where(is_piece, pid - n_whole, -1)
        part = tl.maximum(piece, 0) % n_split
        tile = tl.where(is_piece, n_whole + tl.maximum(piece, 0) // n_split, pid)
        kv_lo = tl.where(is_piece, (part * n_kv // n_split) * BLOCK_N, 0)
        kv_hi = tl.where(is_piece, tl.minimum(((part + 1) * n_kv // n_split) * BLOCK_N, Lk), Lk)
    bh = tile // n_m
    m_blk = tile % n_m
    if CAUSAL:  # longest rows first: the last wave is made of short ones
        m_blk = n_m - 1 - m_blk
    start_m = m_blk * BLOCK_M
    b = (bh // H).to(tl.int64)  # int64: batch offsets of a large cache overflow int32
    h = (bh % H).to(tl.int64)
    Qd = _desc(Q + b * sqb + h * sqh, Lq, sql, HEAD_DIM, BLOCK_M, TMA)
    Kd = _desc(K + b * skb + h * skh, Lk, skl, HEAD_DIM, BLOCK_N, TMA)
    Vd = _desc(V + b * svb + h * svh, Lk, svl, HEAD_DIM, BLOCK_N, TMA)

    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BM,) query rows
    offs_n = tl.arange(0, BLOCK_N)  # (BN,)
    offs_d = tl.arange(0, HEAD_DIM)  # (D,)
    q = _rows(Qd, start_m, Lq, sql, sqd, tl.arange(0, BLOCK_M), offs_d, TMA)  # (BM, D)
    pos = q_offset + offs_m  # (BM,) absolute query positions

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # hi(p) grows with p, so the block's first and last valid query bound it
    hi_first, hi_last = kv_hi, kv_hi
    if CAUSAL:
        hi_first = _hi(q_offset + start_m, Lk, chunk)
        hi_last = _hi(q_offset + tl.minimum(start_m + BLOCK_M, Lq) - 1, Lk, chunk)  # no row sees a key >= hi_last
    sink_end, win_start, u_lo, u_hi = _key_ranges(hi_first, hi_last, sink, window, WINDOWED, BLOCK_N)
    u_lo = tl.maximum(u_lo, kv_lo)
    u_hi = tl.maximum(u_hi, u_lo)
    row_hi = tl.full([BLOCK_M], Lk, tl.int32)  # (BM,) keys below it visible, per row (WS only)
    if WS:
        # Triton 3.6 warp-specialises a kernel's only loop, with no branch in
        # it: one loop over all key tiles, masked throughout
        if CAUSAL:
            row_hi = _row_hi(q_offset + start_m, Lk, chunk, BLOCK_M)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, Kd, Vd, skl, skd, svl, svd, pos, row_hi, offs_n, offs_d,
                                   kv_lo, tl.minimum(kv_hi, hi_last), Lk, chunk, sink, window, qk_scale,
                                   True, CAUSAL, WINDOWED, TMA, True, DOT_PRECISION, DOT_UPCAST, BLOCK_N)
    else:
        if WINDOWED:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, Kd, Vd, skl, skd, svl, svd, pos, row_hi, offs_n, offs_d,
                                       0, sink_end, Lk, chunk, sink, window, qk_scale,
                                       True, CAUSAL, WINDOWED, TMA, False, DOT_PRECISION, DOT_UPCAST, BLOCK_N)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, Kd, Vd, skl, skd, svl, svd, pos, row_hi, offs_n, offs_d,
                                       win_start, u_lo, Lk, chunk, sink, window, qk_scale,
                                       True, CAUSAL, WINDOWED, TMA, False, DOT_PRECISION, DOT_UPCAST, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, Kd, Vd, skl, skd, svl, svd, pos, row_hi, offs_n, offs_d,
                                   u_lo, u_hi, Lk, chunk, sink, window, qk_scale,
                                   False, CAUSAL, WINDOWED, TMA, False, DOT_PRECISION, DOT_UPCAST, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, Kd, Vd, skl, skd, svl, svd, pos, row_hi, offs_n, offs_d,
                                   u_hi, hi_last, Lk, chunk, sink, window, qk_scale,
                                   True, CAUSAL, WINDOWED, TMA, False, DOT_PRECISION, DOT_UPCAST, BLOCK_N)

    # Stores under masks, not branches (a branch stops warp specialization):
    # a piece of a split tile stores unnormalised partials for _attn_fwd_merge,
    # a whole tile its output and LSE.
    offs_r = tl.arange(0, BLOCK_M)
    is_piece = (offs_r * 0 + piece) >= 0  # (BM,)
    at = tl.maximum(piece, 0)
    tl.store(PartAcc + at * (BLOCK_M * HEAD_DIM) + offs_r[:, None] * HEAD_DIM + offs_d[None, :], acc,
             mask=is_piece[:, None])
    tl.store(PartML + at * (2 * BLOCK_M) + offs_r, m_i, mask=is_piece)
    tl.store(PartML + at * (2 * BLOCK_M) + BLOCK_M + offs_r, l_i, mask=is_piece)
    # every valid row saw at least one key (Lk > 0), so l_i > 0
    o = (acc / l_i[:, None]).to(O.dtype.element_ty)  # (BM, D)
    lse = (m_i + tl.math.log2(l_i)) * _LN2  # (BM,) natural-log LSE for the backward
    if WS:
        # Triton 3.6 splits the warp-specialised tile into two 64-row halves and
        # offsets `start_m + tl.arange(...)` twice in the second one: rows are
        # addressed only through the descriptor and a scalar base here. Pieces
        # write too; the merge overwrites their rows. LSE rows are padded.
        _desc(O + b * sob + h * soh, Lq, sol, HEAD_DIM, BLOCK_M, TMA).store([start_m, 0], o)
        tl.store(LSE + (bh.to(tl.int64) * sls + start_m) + offs_r, lse)
    else:
        row_ok = (offs_m < Lq) & ~is_piece
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :] * sod, o, mask=row_ok[:, None])
        tl.store(LSE + bh.to(tl.int64) * sls + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_fwd_merge(O, LSE, PartAcc, PartML, sob, sol, soh, sod, sls, H, Lq, n_m, n_whole, n_split,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Combine the n_split partial softmaxes of split tile n_whole + program_id."""
    i = tl.program_id(0)
    tile = n_whole + i
    bh = tile // n_m
    start_m = (tile % n_m) * BLOCK_M
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for part in range(n_split):
        piece = i * n_split + part
        m_p = tl.load(PartML + piece * (2 * BLOCK_M) + offs_r)  # (BM,)
        l_p = tl.load(PartML + piece * (2 * BLOCK_M) + BLOCK_M + offs_r)  # (BM,)
        acc_p = tl.load(PartAcc + piece * (BLOCK_M * HEAD_DIM) + offs_r[:, None] * HEAD_DIM + offs_d[None, :])
        m_new = tl.maximum(m, m_p)
        a, a_p = tl.math.exp2(m - m_new), tl.math.exp2(m_p - m_new)
        acc = acc * a[:, None] + acc_p * a_p[:, None]
        l = l * a + l_p * a_p
        m = m_new
    offs_m = start_m + offs_r
    row_ok = offs_m < Lq
    o = acc / l[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :] * sod, o.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * sls + offs_m, (m + tl.math.log2(l)) * _LN2, mask=row_ok)


# -----------------------------------------------------------------------------
# backward

@triton.jit
def _attn_bwd_delta(O, DO, Delta, sob, sol, soh, sod, sdb, sdl, sdh, sdd, sls, H, Lq,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), the softmax-backward correction term. (B, H, Lq) fp32,
    rows sls apart (the LSE's padded layout)."""
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
    tl.store(Delta + bh.to(tl.int64) * sls + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Qd, DOd, LSE, Delta, sql, sqd, sdl, sdd, offs_n, offs_m0, offs_d,
                lo, hi, Lq, Lk, q_offset, chunk, sink, window, qk_scale, start_n,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, TMA: tl.constexpr,
                WS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dK (unscaled) and dV over the query tiles starting in [lo, hi).
    Query rows past Lq add nothing: their lse is +inf (probabilities 0), or with WS
    their q and dO rows load as zeros (dS = 0 and dO = 0)."""
    for start_m in tl.range(lo, hi, BLOCK_M, warp_specialize=WS):
        offs_m = start_m + offs_m0  # (BM,)
        q = _rows(Qd, start_m, Lq, sql, sqd, offs_m0, offs_d, TMA)  # (BM, D)
        do = _rows(DOd, start_m, Lq, sdl, sdd, offs_m0, offs_d, TMA)  # (BM, D)
        if WS:  # LSE and Delta are 1-D descriptors: no row index in the loop but the scalar start_m
            lse2 = LSE.load([start_m]) * _LOG2E  # (BM,) rows past Lq read 0; their q and dO rows are 0 too
            delta = Delta.load([start_m])  # (BM,)
        else:
            lse2 = tl.load(LSE + offs_m, mask=offs_m < Lq, other=float("inf")) * _LOG2E  # (BM,)
            delta = tl.load(Delta + offs_m, mask=offs_m < Lq, other=0.0)  # (BM,)
        sT = _dot(k, tl.trans(q), None, DOT_PRECISION, DOT_UPCAST)  # (BN, BM) raw scores
        if MASKED and WS:  # rows and keys from bare tl.aranges (see _row_hi); causal, no window
            hi_m = _row_hi(q_offset + start_m, Lk, chunk, BLOCK_M)  # (BM,)
            sT = tl.where(tl.arange(0, BLOCK_N)[:, None] < (hi_m - start_n)[None, :], sT, float("-inf"))
        elif MASKED:
            needs = True
            if WINDOWED:  # windows leave interior tiles unmasked: check per tile
                hi_first = _hi(q_offset + start_m, Lk, chunk)
                hi_last = _hi(q_offset + tl.minimum(start_m + BLOCK_M, Lq) - 1, Lk, chunk)
                needs = _tile_needs_mask(start_n, hi_first, hi_last, Lk, sink, window, CAUSAL, WINDOWED, BLOCK_N)
            if needs:
                vis = _visible((q_offset + offs_m)[None, :], offs_n[:, None], Lk, chunk, sink, window,
                               CAUSAL, WINDOWED)  # (BN, BM)
                sT = tl.where(vis, sT, float("-inf"))
        pT = tl.math.exp2(sT * qk_scale - lse2[None, :])  # (BN, BM) softmax probabilities, recomputed
        dv = _dot(pT.to(do.dtype), do, dv, DOT_PRECISION, DOT_UPCAST)  # (BN, D)
        dpT = _dot(v, tl.trans(do), None, DOT_PRECISION, DOT_UPCAST)  # (BN, BM)
        dsT = pT * (dpT - delta[None, :])  # (BN, BM) gradient wrt the scaled scores
        dk = _dot(dsT.to(q.dtype), q, dk, DOT_PRECISION, DOT_UPCAST)  # (BN, D)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _config_filter("BLOCK_N", "Lk", "BLOCK_M", "Lq")})
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV,
                   sqb, sql, sqh, sqd, skb, skl, skh, skd, svb, svl, svh, svd,
                   sdb, sdl, sdh, sdd, sgb, sgl, sgh, sgd, sls,
                   H, Lq, Lk, q_offset, chunk, sink, window, qk_scale, scale,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, TMA: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr, OCC: tl.constexpr):
    """dK, dV for one key block, looping over the query blocks that can see it.
    Works on transposed scores (BN, BM), so dv = P^T dO and dk = dS^T Q need no
    transpose of P or dS. DK and DV share the strides sg* (both are fresh
    contiguous tensors). Keys past Lk load as zeros; their rows are not stored."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Qd = _desc(Q + b * sqb + h * sqh, Lq, sql, HEAD_DIM, BLOCK_M, TMA)
    DOd = _desc(DO + b * sdb + h * sdh, Lq, sdl, HEAD_DIM, BLOCK_M, TMA)
    LSE += bh.to(tl.int64) * sls
    Delta += bh.to(tl.int64) * sls

    offs_n = start_n + tl.arange(0, BLOCK_N)  # (BN,) key rows
    offs_m0 = tl.arange(0, BLOCK_M)  # (BM,)
    offs_d = tl.arange(0, HEAD_DIM)  # (D,)
    k = _rows(_desc(K + b * skb + h * skh, Lk, skl, HEAD_DIM, BLOCK_N, TMA), start_n, Lk, skl, skd,
              tl.arange(0, BLOCK_N), offs_d, TMA)  # (BN, D)
    v = _rows(_desc(V + b * svb + h * svh, Lk, svl, HEAD_DIM, BLOCK_N, TMA), start_n, Lk, svl, svd,
              tl.arange(0, BLOCK_N), offs_d, TMA)  # (BN, D)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    # which queries can see a key of this block? [m_lo, m_full) only some of
    # its keys (masked), [m_full, m_hi) all of them
    m_lo, m_full, m_hi = 0, 0, Lq
    if CAUSAL:
        # p sees j iff p >= start of j's chunk; the block's first key is the
        # strictest, its last (valid) key the most lenient
        n_last = tl.minimum(start_n + BLOCK_N, Lk) - 1
        m_lo = (tl.maximum((start_n // chunk) * chunk - q_offset, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.minimum(tl.cdiv(tl.maximum((n_last // chunk) * chunk - q_offset, 0), BLOCK_M) * BLOCK_M,
                            tl.cdiv(Lq, BLOCK_M) * BLOCK_M)
        m_full = tl.maximum(m_full, m_lo)
        if WINDOWED:
            # a non-sink key j stays in the window of p while hi(p) <= j + window,
            # i.e. p < ((j + window) // chunk) * chunk -- unless Lk caps hi(p) first.
            # The block's last key is the most lenient; any sink key lifts the bound.
            win_hi = tl.maximum(((n_last + window) // chunk) * chunk - q_offset, 0)
            bounded = (start_n >= sink) & (n_last + window < Lk)
            m_hi = tl.where(bounded, tl.minimum(win_hi, Lq), Lq)
            m_full = m_hi  # all masked, tile by tile
    if WS:  # one loop, masked throughout where causal (Triton 3.6 specialises a kernel's only loop)
        LSEd = tl.make_tensor_descriptor(LSE, shape=[Lq], strides=[1], block_shape=[BLOCK_M])
        Dd = tl.make_tensor_descriptor(Delta, shape=[Lq], strides=[1], block_shape=[BLOCK_M])
        dk, dv = _dkdv_inner(dk, dv, k, v, Qd, DOd, LSEd, Dd, sql, sqd, sdl, sdd, offs_n, offs_m0, offs_d,
                             m_lo, m_hi, Lq, Lk, q_offset, chunk, sink, window, qk_scale, start_n,
                             CAUSAL, CAUSAL, WINDOWED, TMA, True, DOT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N)
    else:
        dk, dv = _dkdv_inner(dk, dv, k, v, Qd, DOd, LSE, Delta, sql, sqd, sdl, sdd, offs_n, offs_m0, offs_d,
                             m_lo, m_full, Lq, Lk, q_offset, chunk, sink, window, qk_scale, start_n,
                             True, CAUSAL, WINDOWED, TMA, False, DOT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N)
        dk, dv = _dkdv_inner(dk, dv, k, v, Qd, DOd, LSE, Delta, sql, sqd, sdl, sdd, offs_n, offs_m0, offs_d,
                             m_full, m_hi, Lq, Lk, q_offset, chunk, sink, window, qk_scale, start_n,
                             False, CAUSAL, WINDOWED, TMA, False, DOT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N)

    dk *= scale  # scores are scale * q.k
    _store_rows(DK + b * sgb + h * sgh, dk, start_n, Lk, sgl, sgd, offs_d, HEAD_DIM, BLOCK_N, WS)
    _store_rows(DV + b * sgb + h * sgh, dv, start_n, Lk, sgl, sgd, offs_d, HEAD_DIM, BLOCK_N, WS)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, K, V, skl, skd, svl, svd, pos, offs_n, offs_d,
              lo, hi, Lk, chunk, sink, window, qk_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, TMA: tl.constexpr,
              DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dQ (unscaled) over the key tiles starting in [lo, hi). Keys
    past Lk load as zeros: their dS multiplies a zero row of K."""
    for start_n in range(lo, hi, BLOCK_N):
        k = _rows(K, start_n, Lk, skl, skd, offs_n, offs_d, TMA)  # (BN, D)
        v = _rows(V, start_n, Lk, svl, svd, offs_n, offs_d, TMA)  # (BN, D)
        s = _dot(q, tl.trans(k), None, DOT_PRECISION, DOT_UPCAST)  # (BM, BN) raw scores
        if MASKED:
            vis = _visible(pos[:, None], (start_n + offs_n)[None, :], Lk, chunk, sink, window, CAUSAL, WINDOWED)
            s = tl.where(vis, s, float("-inf"))
        p = tl.math.exp2(s * qk_scale - lse2[:, None])  # (BM, BN)
        dp = _dot(do, tl.trans(v), None, DOT_PRECISION, DOT_UPCAST)  # (BM, BN)
        ds = p * (dp - delta[:, None])  # (BM, BN)
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PRECISION, DOT_UPCAST)  # (BM, D)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _config_filter("BLOCK_M", "Lq", "BLOCK_N", "Lk")})
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, Delta, DQ,
                 sqb, sql, sqh, sqd, skb, skl, skh, skd, svb, svl, svh, svd,
                 sdb, sdl, sdh, sdd, sgb, sgl, sgh, sgd, sls,
                 H, Lq, Lk, q_offset, chunk, sink, window, qk_scale, scale,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, TMA: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr, OCC: tl.constexpr):
    """dQ for one query block; visits exactly the key tiles the forward visited."""
    m_blk = tl.program_id(0)
    if CAUSAL:  # longest rows first
        m_blk = tl.num_programs(0) - 1 - m_blk
    start_m = m_blk * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Kd = _desc(K + b * skb + h * skh, Lk, skl, HEAD_DIM, BLOCK_N, TMA)
    Vd = _desc(V + b * svb + h * svh, Lk, svl, HEAD_DIM, BLOCK_N, TMA)
    DQ += b * sgb + h * sgh
    LSE += bh.to(tl.int64) * sls
    Delta += bh.to(tl.int64) * sls

    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = tl.arange(0, BLOCK_N)  # (BN,)
    offs_d = tl.arange(0, HEAD_DIM)  # (D,)
    row_ok = offs_m < Lq
    q = _rows(_desc(Q + b * sqb + h * sqh, Lq, sql, HEAD_DIM, BLOCK_M, TMA), start_m, Lq, sql, sqd,
              tl.arange(0, BLOCK_M), offs_d, TMA)  # (BM, D)
    do = _rows(_desc(DO + b * sdb + h * sdh, Lq, sdl, HEAD_DIM, BLOCK_M, TMA), start_m, Lq, sdl, sdd,
               tl.arange(0, BLOCK_M), offs_d, TMA)  # (BM, D)
    lse2 = tl.load(LSE + offs_m, mask=row_ok, other=float("inf")) * _LOG2E  # (BM,)
    delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)  # (BM,)
    pos = q_offset + offs_m  # (BM,)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    hi_first, hi_last = Lk, Lk
    if CAUSAL:
        hi_first = _hi(q_offset + start_m, Lk, chunk)
        hi_last = _hi(q_offset + tl.minimum(start_m + BLOCK_M, Lq) - 1, Lk, chunk)
    # the same ranges of key tiles as the forward
    sink_end, win_start, u_lo, u_hi = _key_ranges(hi_first, hi_last, sink, window, WINDOWED, BLOCK_N)
    if WINDOWED:
        dq = _dq_inner(dq, q, do, lse2, delta, Kd, Vd, skl, skd, svl, svd, pos, offs_n, offs_d,
                       0, sink_end, Lk, chunk, sink, window, qk_scale,
                       True, CAUSAL, WINDOWED, TMA, DOT_PRECISION, DOT_UPCAST, BLOCK_N)
        dq = _dq_inner(dq, q, do, lse2, delta, Kd, Vd, skl, skd, svl, svd, pos, offs_n, offs_d,
                       win_start, u_lo, Lk, chunk, sink, window, qk_scale,
                       True, CAUSAL, WINDOWED, TMA, DOT_PRECISION, DOT_UPCAST, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse2, delta, Kd, Vd, skl, skd, svl, svd, pos, offs_n, offs_d,
                   u_lo, u_hi, Lk, chunk, sink, window, qk_scale,
                   False, CAUSAL, WINDOWED, TMA, DOT_PRECISION, DOT_UPCAST, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse2, delta, Kd, Vd, skl, skd, svl, svd, pos, offs_n, offs_d,
                   u_hi, hi_last, Lk, chunk, sink, window, qk_scale,
                   True, CAUSAL, WINDOWED, TMA, DOT_PRECISION, DOT_UPCAST, BLOCK_N)

    _store_rows(DQ, dq * scale, start_m, Lq, sgl, sgd, offs_d, HEAD_DIM, BLOCK_M, False)


# -----------------------------------------------------------------------------
# launchers and the autograd Function

# Multiprocessors for the forward's split-KV plan (a wave is this times the
# config's OCC programs): the GPU's own count unless set here (the tests set it
# to exercise the split under the interpreter).
WAVE_PROGRAMS = None


def _wave(device):
    if WAVE_PROGRAMS is not None:
        return WAVE_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _tma_ok(*tensors):
    """Can each (B, L, H, D) tensor be read through a TMA descriptor per (b, h)?"""
    if not (INTERPRET or torch.cuda.get_device_capability(tensors[0].device)[0] >= 9):
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in tensors)


def _scratch(size, alignment, stream):
    """Global memory for the descriptors that the kernels build on the device."""
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def _mask_constexprs(q, chunk, window):
    precision = FP32_DOT_PRECISION if q.dtype == torch.float32 else "tf32"  # only matters for fp32
    return dict(HEAD_DIM=q.shape[-1], CAUSAL=chunk > 0, WINDOWED=window > 0, DOT_PRECISION=precision,
                DOT_UPCAST=INTERPRET and q.dtype == torch.bfloat16)


def _lse_buffer(q):
    """(B, H, Lq) fp32 view of a buffer whose rows are padded to whole tiles of the largest BLOCK_M."""
    B, Lq, H, _ = q.shape
    max_m = max(c.kwargs["BLOCK_M"] for c in _attn_fwd.configs)
    return q.new_empty((B, H, triton.cdiv(Lq, max_m) * max_m), dtype=torch.float32)[..., :Lq]


def _flash_forward(q, k, v, q_offset, chunk, sink, window, scale):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    o = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)  # (B, Lq, H, D) contiguous
    max_m = max(c.kwargs["BLOCK_M"] for c in _attn_fwd.configs)
    lse = _lse_buffer(q)  # (B, H, Lq)
    split = chunk == 0  # split-KV balances the last wave; only for equal-cost tiles
    wave = _wave(q.device)
    pieces = wave * max(c.kwargs["OCC"] for c in _attn_fwd.configs) if split else 1  # at most one wave of them
    part_acc = torch.empty((pieces, max_m, D), dtype=torch.float32, device=q.device)
    part_ml = torch.empty((pieces, 2, max_m), dtype=torch.float32, device=q.device)

    def grid(meta):
        n_tiles = triton.cdiv(Lq, meta["BLOCK_M"]) * B * H
        if not split:
            return (n_tiles,)
        n_whole, n_split = _split_plan_host(n_tiles, triton.cdiv(Lk, meta["BLOCK_N"]), wave * meta["OCC"])
        return (n_whole + (n_tiles - n_whole) * n_split,)

    tma = _tma_ok(q, k, v, o)
    triton.set_allocator(_scratch)  # per thread: the backward runs in autograd's own
    _attn_fwd[grid](q, k, v, o, lse, part_acc, part_ml, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                    lse.stride(1), H, B * H, Lq, Lk, q_offset, chunk, sink, window, scale * math.log2(math.e), wave,
                    SPLIT=split, TMA=tma, **_mask_constexprs(q, chunk, window))
    if split:
        bm, bn, occ = (_attn_fwd.best_config.kwargs[x] for x in ("BLOCK_M", "BLOCK_N", "OCC"))
        n_m = triton.cdiv(Lq, bm)
        n_whole, n_split = _split_plan_host(n_m * B * H, triton.cdiv(Lk, bn), wave * occ)
        if n_whole < n_m * B * H:
            _attn_fwd_merge[(n_m * B * H - n_whole,)](o, lse, part_acc, part_ml, *o.stride(), lse.stride(1), H, Lq, n_m,
                                                      n_whole, n_split, HEAD_DIM=D, BLOCK_M=bm)
    return o, lse


def _flash_backward(do, q, k, v, o, lse, q_offset, chunk, sink, window, scale):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    # every row of these is written by the kernels (zeros for keys no query sees)
    dq = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)  # (B, Lq, H, D)
    dk = torch.empty((B, Lk, H, D), dtype=k.dtype, device=k.device)  # (B, Lk, H, D)
    dv = torch.empty((B, Lk, H, D), dtype=v.dtype, device=v.device)  # (B, Lk, H, D)
    delta = _lse_buffer(q)  # (B, H, Lq), rows lse.stride(1) apart as the LSE's (16-byte aligned for TMA)
    assert delta.stride() == lse.stride(), (delta.stride(), lse.stride())
    _attn_bwd_delta[(triton.cdiv(Lq, 64), B * H)](o, do, delta, *o.stride(), *do.stride(), lse.stride(1), H, Lq,
                                                  HEAD_DIM=D, BLOCK_M=64)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    mask_args = (H, Lq, Lk, q_offset, chunk, sink, window, scale * math.log2(math.e), scale)
    constexprs = dict(TMA=_tma_ok(q, k, v, do), **_mask_constexprs(q, chunk, window))
    grid_n = lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * H)
    grid_m = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)
    # dK/dV and dQ are independent: on two streams, each fills the other's last wave
    side = _side_stream(q.device) if BWD_STREAMS and q.is_cuda else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(q.device))
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        triton.set_allocator(_scratch)
        _attn_bwd_dq[grid_m](q, k, v, do, lse, delta, dq, *strides, *dq.stride(), lse.stride(1), *mask_args,
                             **constexprs)
    triton.set_allocator(_scratch)
    _attn_bwd_dkdv[grid_n](q, k, v, do, lse, delta, dk, dv, *strides, *dk.stride(), lse.stride(1), *mask_args,
                           **constexprs)
    if side is not None:  # everything dQ's kernel touched was allocated on, and is freed after, this stream
        torch.cuda.current_stream(q.device).wait_stream(side)
    return dq, dk, dv


# Run the backward's two main kernels on two streams (see _flash_backward).
BWD_STREAMS = True
_SIDE_STREAMS = {}


def _side_stream(device):
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


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


# The same kernels as two PyTorch operators with an autograd rule, for torch.compile: it keeps them in its
# graph as opaque calls, where it breaks the graph around an autograd.Function (twice per block). Eager
# code takes the autograd.Function: an operator call costs tens of microseconds more on the CPU.
@torch.library.custom_op("tempact::flash_attention", mutates_args=())
def _flash_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, chunk: int, sink: int, window: int,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _flash_forward(q, k, v, q_offset, chunk, sink, window, scale)


@_flash_op.register_fake
def _(q, k, v, q_offset, chunk, sink, window, scale):
    return q.new_empty(q.shape), _lse_buffer(q)


@torch.library.custom_op("tempact::flash_attention_backward", mutates_args=())
def _flash_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, q_offset: int, chunk: int, sink: int, window: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _flash_backward(do, q, k, v, o, lse, q_offset, chunk, sink, window, scale)


@_flash_bwd_op.register_fake
def _(do, q, k, v, o, lse, q_offset, chunk, sink, window, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save(ctx, inputs, output):
    q, k, v, *ctx.mask_args = inputs
    ctx.save_for_backward(q, k, v, *output)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    return (*_flash_bwd_op(do, q, k, v, o, lse, *ctx.mask_args), None, None, None, None, None)


_flash_op.register_autograd(_backward, setup_context=_save)


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
    if chunk > 0 and (window == 0 or window >= k.shape[1]) and _hi_host(q_offset, k.shape[1], chunk) == k.shape[1]:
        # the first query's chunk already ends at the last key (a streamed chunk against its cache):
        # the mask hides nothing, and the unmasked kernel balances its last wave (split-KV)
        q_offset = chunk = sink = window = 0
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    choice = BACKEND if backend == "auto" else backend
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown backend {choice!r}")
    if choice == "triton" and not kernel_supports(q, k, v):
        raise ValueError(f"the Triton kernel does not support {q.dtype} on {q.device} with D={q.shape[-1]}")
    if choice == "triton" and not scale > 0:
        raise ValueError(f"the Triton kernel needs scale > 0 (it takes row maxima of unscaled scores), got {scale}")
    if q.shape[1] == 0 or k.shape[1] == 0 or not scale > 0:  # nothing to tile, or a scale the kernel refuses
        choice = "torch"
    if choice == "torch" or (choice == "auto" and not kernel_supports(q, k, v)):
        return attention_reference(q, k, v, q_offset=q_offset, chunk=chunk, sink=sink, window=window, scale=scale)
    args = (q, k, v, int(q_offset), int(chunk), int(sink), int(window), scale)
    return _flash_op(*args)[0] if torch.compiler.is_compiling() else _FlashAttention.apply(*args)
