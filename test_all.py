"""The test suite: runs on a CPU-only machine in a few minutes (kernels under TRITON_INTERPRET=1)."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on the CPU

import json
import math
import random
import time

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import attention as A
import model as M
import planner as P
import rewards as judges
import world
from configurator import configure
from rewards import (WORLD_JUDGES, aesthetic, local_step_following, plan_quality, temporal_following,
                     temporal_following_strict)


# -----------------------------------------------------------------------------
# attention: the Triton flash-attention (on the CPU through Triton's interpreter) against the reference

def _max_err(x, ref):
    """max |x - ref| relative to max(1, max |ref|), in float64."""
    ref = ref.double()
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()


def _rand(B, L, H, D, dtype=torch.float32, requires_grad=True):
    return torch.randn(B, L, H, D, dtype=dtype).requires_grad_(requires_grad)


def _is_kernel(out) -> bool:
    """Did `out` come from the Triton kernel (its autograd node, eager or the compiled path's operator)?"""
    name = type(out.grad_fn).__name__
    return name.startswith("_FlashAttention") or "flash_attention" in name


def _kernel_and_reference(q, k, v, mask_kw, seed):
    """Output and (dq, dk, dv) of the forced Triton path, and of the reference
    in float64 on the same (upcast) inputs, for one random output gradient."""
    out = A.attention(q, k, v, backend="triton", **mask_kw)
    assert _is_kernel(out)  # really the kernel
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))  # (B, Lq, H, D)
    grads = torch.autograd.grad(out, (q, k, v), g.to(out.dtype))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = A.attention_reference(q64, k64, v64, **mask_kw)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    return out, grads, ref, ref_grads


# (B, H, Lq, Lk, D, q_offset, chunk, sink, window); lengths deliberately not
# multiples of the interpreter's tiles (BLOCK_M = 32, BLOCK_N = 16)
CASES = {
    "full": (2, 2, 37, 53, 16, 0, 0, 0, 0),
    "block_causal": (2, 2, 75, 75, 16, 0, 20, 0, 0),
    "block_causal_tile_aligned_d64": (1, 2, 53, 53, 64, 0, 16, 0, 0),
    "one_chunk_longer_than_seq": (1, 2, 37, 37, 16, 0, 64, 0, 0),
    "kv_cache_causal": (1, 3, 24, 75, 64, 51, 12, 0, 0),
    "kv_cache_full": (2, 2, 21, 53, 16, 32, 0, 0, 0),
    "queries_mid_cache": (1, 2, 20, 75, 16, 20, 10, 0, 0),  # keys >= 40 unseen: dk = dv = 0 there
    "sink_window": (1, 2, 75, 75, 16, 0, 15, 7, 30),
    "sink_window_kv_cache": (2, 1, 20, 90, 32, 70, 10, 10, 25),
    "window_no_sink": (1, 2, 64, 64, 16, 0, 16, 0, 32),
    "copies": (2, 2, 117, 117, 16, 0, 13, 39, 13),  # the RL update: 3 context chunks, then 6 copies of one chunk
    "long_chunks_kv_cache": (1, 2, 70, 101, 16, 31, 40, 0, 0),  # chunk >= BLOCK_M: the warp-specialised mask
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_fp32(name):
    B, H, Lq, Lk, D, q_offset, chunk, sink, window = CASES[name]
    seed = 100 + list(CASES).index(name)  # fresh inputs per case
    torch.manual_seed(seed)
    q, k, v = _rand(B, Lq, H, D), _rand(B, Lk, H, D), _rand(B, Lk, H, D)
    mask_kw = dict(q_offset=q_offset, chunk=chunk, sink=sink, window=window)
    out, grads, ref, ref_grads = _kernel_and_reference(q, k, v, mask_kw, seed)
    assert out.shape == (B, Lq, H, D) and out.dtype == torch.float32
    # the interpreter's dot is exact fp32: only summation order differs
    assert _max_err(out, ref) <= 1e-5, name
    for g, rg, what in zip(grads, ref_grads, ("dq", "dk", "dv")):
        assert g.shape == rg.shape and g.dtype == torch.float32
        assert _max_err(g, rg) <= 1e-5, (name, what)
    if name == "queries_mid_cache":  # the dk/dv kernel must write zeros for keys nobody sees
        assert grads[1][:, 40:].abs().max() == 0 and grads[2][:, 40:].abs().max() == 0


@pytest.mark.parametrize("variant", ["pointer_loads", "split_kv", "warp_specialized"])
@pytest.mark.parametrize("name", ["full", "kv_cache_full", "block_causal", "sink_window_kv_cache", "long_chunks_kv_cache"])
def test_kernel_variants_match_reference(name, variant, monkeypatch):
    """The paths the GPU takes for other shapes and tunings: plain pointer loads
    instead of tensor descriptors, split-KV pieces of the last wave merged by a
    second kernel (no mask only), and the warp-specialised forward's and dK/dV kernel's single loops,
    row masks and descriptor stores (the interpreter runs their code without the
    specialisation) wherever the config filter allows them: no window, and no
    chunk shorter than a query tile."""
    if variant == "pointer_loads":
        monkeypatch.setattr(A, "_tma_ok", lambda *t: False)
    elif variant == "split_kv":  # waves that leave 2 of 8 / 4 of 4 tiles over, cut in 3 / 2 pieces
        monkeypatch.setattr(A, "WAVE_PROGRAMS", {"full": 6, "kv_cache_full": 8}.get(name, 3))
        if name in ("full", "kv_cache_full"):
            assert A._split_plan_host(8 if name == "full" else 4, 4, A.WAVE_PROGRAMS) in ((6, 3), (0, 2))
    B, H, Lq, Lk, D, q_offset, chunk, sink, window = CASES[name]
    if variant == "warp_specialized":
        ws = window == 0 and (chunk == 0 or chunk >= 32)
        assert ws == (name in ("full", "kv_cache_full", "long_chunks_kv_cache"))
        for kernel in (A._attn_fwd, A._attn_bwd_dkdv):  # dQ has no warp-specialised variant
            monkeypatch.setattr(kernel, "configs", [A._cfg(32, 16, 1, 1, ws=ws)])
    seed = 200 + list(CASES).index(name)
    torch.manual_seed(seed)
    q, k, v = _rand(B, Lq, H, D), _rand(B, Lk, H, D), _rand(B, Lk, H, D)
    mask_kw = dict(q_offset=q_offset, chunk=chunk, sink=sink, window=window)
    out, grads, ref, ref_grads = _kernel_and_reference(q, k, v, mask_kw, seed)
    assert _max_err(out, ref) <= 1e-5
    for g, rg in zip(grads, ref_grads):
        assert _max_err(g, rg) <= 1e-5
    _, lse = A._flash_forward(q.detach(), k.detach(), v.detach(), scale=D ** -0.5, **mask_kw)  # (B, H, Lq)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * D ** -0.5  # (B, H, Lq, Lk)
    s = s.masked_fill(~A.attention_mask(Lq, Lk, **mask_kw), float("-inf"))
    assert _max_err(lse, torch.logsumexp(s, dim=-1)) <= 1e-5


def test_split_plan_fills_one_wave():
    """Split-KV pieces of the left-over tiles never exceed one wave, and every
    key tile of a split tile belongs to exactly one piece."""
    for n_tiles, n_kv, wave in [(444, 37, 132), (888, 74, 264), (8, 4, 3), (12, 256, 132), (264, 10, 132), (5, 1, 4)]:
        n_whole, n_split = A._split_plan_host(n_tiles, n_kv, wave)
        assert n_split >= 1 and n_whole <= n_tiles
        assert (n_tiles - n_whole) * n_split <= wave or n_split == 1
        assert n_split <= n_kv
        parts = [(p * n_kv // n_split, (p + 1) * n_kv // n_split) for p in range(n_split)]
        assert parts[0][0] == 0 and parts[-1][1] == n_kv and all(a < b for a, b in parts)
    assert A._split_plan_host(444, 37, 132) == (396, 2)  # Wan chunk: 48 left-over tiles in halves


def test_mask_that_hides_nothing_takes_the_unmasked_kernel(monkeypatch):
    """A streamed chunk against its cache is passed chunk > 0, but when the first query's chunk ends
    at the last key every key is visible: the kernel then runs unmasked (split-KV balances its last
    wave). A mask that hides something keeps its arguments. Outputs match the reference either way."""
    seen = []
    real = A._flash_forward
    monkeypatch.setattr(A, "_flash_forward", lambda q, k, v, *mask_and_scale: (
        seen.append(mask_and_scale[:4]), real(q, k, v, *mask_and_scale))[1])
    torch.manual_seed(21)
    B, H, Lq, Lk, D = 1, 2, 24, 75, 16
    q, k, v = _rand(B, Lq, H, D), _rand(B, Lk, H, D), _rand(B, Lk, H, D)
    for kw, unmasked in [(dict(q_offset=51, chunk=25), True), (dict(q_offset=51, chunk=25, sink=5, window=80), True),
                         (dict(q_offset=51, chunk=24), False), (dict(q_offset=51, chunk=25, sink=5, window=30), False)]:
        kw = dict(dict(sink=0, window=0), **kw)
        seen.clear()
        out, grads, ref, ref_grads = _kernel_and_reference(q, k, v, kw, seed=22)
        assert seen == [(0, 0, 0, 0) if unmasked else (kw["q_offset"], kw["chunk"], kw["sink"], kw["window"])], kw
        assert (A.visible_pairs(Lq, Lk, **kw) == Lq * Lk) == unmasked
        assert _max_err(out, ref) <= 1e-5 and all(_max_err(g, rg) <= 1e-5 for g, rg in zip(grads, ref_grads))


def test_log_sum_exp_of_forward():
    torch.manual_seed(7)
    B, H, Lq, Lk, D = 1, 2, 30, 61, 16
    q, k, v = (_rand(B, L, H, D, requires_grad=False) for L in (Lq, Lk, Lk))
    kw = dict(q_offset=31, chunk=8, sink=4, window=16)
    _, lse = A._flash_forward(q, k, v, scale=D ** -0.5, **kw)  # (B, H, Lq)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * D ** -0.5  # (B, H, Lq, Lk)
    s = s.masked_fill(~A.attention_mask(Lq, Lk, **kw), float("-inf"))
    assert _max_err(lse, torch.logsumexp(s, dim=-1)) <= 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_kernel_half_precision(dtype, tol):
    # fp32 accumulation; the error is dominated by rounding the inputs of the
    # second matmuls (P, dS) and the outputs to 8 (bf16) or 11 (fp16) bits
    torch.manual_seed(11 if dtype == torch.float16 else 12)
    B, H, Lq, Lk, D = 1, 2, 40, 70, 32
    q, k, v = _rand(B, Lq, H, D, dtype), _rand(B, Lk, H, D, dtype), _rand(B, Lk, H, D, dtype)
    mask_kw = dict(q_offset=30, chunk=10, sink=5, window=30)
    out, grads, ref, ref_grads = _kernel_and_reference(q, k, v, mask_kw, seed=13)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert torch.isfinite(out).all()
    assert _max_err(out, ref) <= tol
    for g, rg, what in zip(grads, ref_grads, ("dq", "dk", "dv")):
        assert _max_err(g, rg) <= 2 * tol, what


def test_strided_views_need_no_copies():
    """q from a fused qkv projection, k/v as the first n tokens of preallocated
    KV-cache buffers (one in (B, Lmax, H, D), one in (B, H, Lmax, D) layout)
    whose unwritten tail is NaN, and a strided output gradient."""
    torch.manual_seed(21)
    B, H, D, Lq, n, Lmax = 2, 2, 16, 19, 45, 80
    qkv = torch.randn(B, Lq, 3, H, D, requires_grad=True)  # (B, Lq, 3, H, D)
    k_cache = torch.full((B, Lmax, H, D), float("nan"))  # (B, Lmax, H, D)
    v_cache = torch.full((B, H, Lmax, D), float("nan"))  # (B, H, Lmax, D)
    k_cache[:, :n] = torch.randn(B, n, H, D)
    v_cache[:, :, :n] = torch.randn(B, H, n, D)
    k_cache.requires_grad_()
    v_cache.requires_grad_()
    q = qkv[:, :, 0]  # (B, Lq, H, D) view
    k = k_cache[:, :n]  # (B, n, H, D) view
    v = v_cache.transpose(1, 2)[:, :n]  # (B, n, H, D) view
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    g_big = torch.randn(B, Lq, H, 2 * D)
    g = g_big[..., ::2]  # (B, Lq, H, D), strided output gradient
    kw = dict(q_offset=n - Lq, chunk=9, sink=3, window=18, backend="triton")

    out = A.attention(q, k, v, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    qc, kc, vc = (x.detach().contiguous().requires_grad_() for x in (q, k, v))
    out_c = A.attention(qc, kc, vc, **kw)
    dqc, dkc, dvc = torch.autograd.grad(out_c, (qc, kc, vc), g.contiguous())

    assert torch.isfinite(out).all()  # the NaN tail of the caches was never read
    for x, y in ((out, out_c), (dq, dqc), (dk, dkc), (dv, dvc)):
        assert torch.isfinite(x).all()
        assert _max_err(x, y) <= 1e-6  # same arithmetic, only the addressing differs
    # and the gradients reach the buffers, zero on the unused tail
    gk, gv = torch.autograd.grad(A.attention(q, k, v, **kw), (k_cache, v_cache), g)
    assert _max_err(gk[:, :n], dkc) <= 1e-6 and gk[:, n:].abs().max() == 0
    assert _max_err(gv.transpose(1, 2)[:, :n], dvc) <= 1e-6 and gv[:, :, n:].abs().max() == 0


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's max over poisoned rows
@pytest.mark.parametrize("kind", ["block_causal", "window"])
def test_tile_skipping_never_reads_invisible_keys(kind):
    """Poison (NaN) keys and values that a set of query rows cannot see. If the
    kernel visited such a tile even fully masked, 0 * NaN would leak into those
    rows; with tile skipping they must come out finite and exact."""
    assert all(max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= 64 for c in A._attn_fwd.configs)
    torch.manual_seed(31 if kind == "window" else 32)
    B, H, L, D = 1, 1, 256, 16
    q, k, v = (_rand(B, L, H, D, requires_grad=False) for _ in range(3))
    if kind == "block_causal":  # rows [0, 128) see keys [0, 128) only
        kw, poison, rows = dict(chunk=64), slice(128, 256), slice(0, 128)
    else:  # rows [192, 256) see the sink [0, 8) and the window [192, 256)
        kw, poison, rows = dict(chunk=64, sink=8, window=64), slice(64, 192), slice(192, 256)
    ref = A.attention_reference(q, k, v, **kw)
    k[:, poison] = float("nan")
    v[:, poison] = float("nan")
    out = A.attention(q, k, v, backend="triton", **kw)
    assert torch.isfinite(out[:, rows]).all()
    assert _max_err(out[:, rows], ref[:, rows]) <= 1e-5
    assert torch.isnan(out[:, poison]).any()  # the poison is real: rows that see it are NaN


def test_mask_matches_definition():
    """attention_mask against a per-element transcription of the rule."""
    for Lq, Lk, q_offset, chunk, sink, window in [(7, 7, 0, 0, 0, 0), (9, 9, 0, 3, 0, 0), (5, 17, 12, 4, 0, 0),
                                                  (13, 13, 0, 3, 2, 5), (6, 20, 14, 5, 3, 7), (8, 8, 0, 4, 0, 4),
                                                  (4, 10, 3, 6, 0, 0)]:
        mask = A.attention_mask(Lq, Lk, q_offset=q_offset, chunk=chunk, sink=sink, window=window)
        assert mask.shape == (Lq, Lk) and mask.dtype == torch.bool
        for i in range(Lq):
            p = q_offset + i
            hi = Lk if chunk == 0 else min(Lk, (p // chunk + 1) * chunk)
            for j in range(Lk):
                expected = j < hi and (window == 0 or j >= hi - window or j < sink)
                assert bool(mask[i, j]) == expected, (Lq, Lk, q_offset, chunk, sink, window, i, j)
    # spot values: block-causal with chunk 2 is a staircase of 2x2 blocks
    assert A.attention_mask(4, 4, chunk=2).int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    with pytest.raises(ValueError):
        A.attention_mask(4, 4, window=2)  # a window needs chunks


def test_attention_flops_counts_visible_pairs():
    gen = torch.Generator().manual_seed(41)
    for _ in range(60):
        B, H, D = (int(x) for x in torch.randint(1, 4, (3,), generator=gen))
        Lk = int(torch.randint(1, 90, (1,), generator=gen))
        Lq = int(torch.randint(1, Lk + 1, (1,), generator=gen))
        q_offset = int(torch.randint(0, Lk - Lq + 1, (1,), generator=gen))
        chunk = int(torch.randint(0, 25, (1,), generator=gen))
        window = int(torch.randint(1, 40, (1,), generator=gen)) if chunk and torch.rand(1, generator=gen) < 0.6 else 0
        sink = int(torch.randint(0, 12, (1,), generator=gen))
        mask = A.attention_mask(Lq, Lk, q_offset=q_offset, chunk=chunk, sink=sink, window=window)
        expected = 4 * B * H * D * int(mask.sum())
        assert A.attention_flops(B, H, Lq, Lk, D, q_offset, chunk, sink, window) == expected
    # Wan sizes must be instant (no Lq x Lk mask); full attention is Lq * Lk pairs
    t = time.perf_counter()
    f = A.attention_flops(1, 12, 32760, 32760, 128, 0, 1560, 1560, 4680)
    assert time.perf_counter() - t < 0.5 and 0 < f < 4 * 12 * 128 * 32760 ** 2
    assert A.attention_flops(1, 12, 32760, 32760, 128) == 4 * 12 * 128 * 32760 ** 2


def test_backend_dispatch_and_validation():
    torch.manual_seed(51)
    q, k, v = (_rand(1, 10, 2, 16, requires_grad=True) for _ in range(3))
    assert _is_kernel(A.attention(q, k, v, chunk=5))
    assert not _is_kernel(A.attention(q, k, v, chunk=5, backend="torch"))
    old = A.BACKEND
    try:  # the module-level switch governs backend="auto"
        A.BACKEND = "torch"
        assert not _is_kernel(A.attention(q, k, v, chunk=5))
    finally:
        A.BACKEND = old
    q48, k48, v48 = (torch.randn(1, 10, 2, 48) for _ in range(3))  # unsupported head dim -> reference
    torch.testing.assert_close(A.attention(q48, k48, v48, chunk=5), A.attention_reference(q48, k48, v48, chunk=5))
    with pytest.raises(ValueError):
        A.attention(q48, k48, v48, backend="triton")
    with pytest.raises(ValueError):
        A.attention(q, k, v, window=4)  # window without chunk
    with pytest.raises(ValueError):
        A.attention(q, k, v, backend="cuda")
    # the kernel takes row maxima of unscaled scores: a scale <= 0 goes to the reference
    assert not _is_kernel(A.attention(q, k, v, chunk=5, scale=-0.5))
    torch.testing.assert_close(A.attention(q, k, v, scale=-0.5), A.attention_reference(q, k, v, scale=-0.5))
    with pytest.raises(ValueError):
        A.attention(q, k, v, scale=-0.5, backend="triton")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_keys_gives_zeros(backend):
    q = torch.randn(1, 5, 2, 16, requires_grad=True)
    k = v = torch.randn(1, 0, 2, 16)
    out = A.attention(q, k, v, backend=backend)
    assert out.shape == (1, 5, 2, 16) and torch.isfinite(out).all() and out.abs().max() == 0


# -----------------------------------------------------------------------------
# model: the Wan DiT, its KV cache, sampler steps and checkpoints

def random_dit(cfg, seed=0):
    torch.manual_seed(seed)
    net = M.WanDiT(cfg).eval()
    with torch.no_grad():  # Wan zero-inits the output layer: randomise it so every path is checked
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def inputs(cfg, B=1, nf=6, H=8, W=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, nf, cfg.in_dim, H, W, generator=g)
    t = torch.rand(B, nf, generator=g) * 1000
    ctx = torch.randn(B, 5, cfg.text_dim, generator=g)
    return x, t, ctx


@pytest.mark.parametrize("chunk,sink,window,nf,abs_pos", [(3, 0, 0, 9, False), (2, 2, 4, 10, True), (1, 0, 2, 5, False)])
def test_streaming_equals_full_forward(chunk, sink, window, nf, abs_pos):
    # the key invariant: chunk-by-chunk with the KV cache == the whole clip under the block-causal mask
    cfg = M.ModelConfig(**{**M.asdict(M.CONFIGS["tiny"]), "chunk_frames": chunk, "sink_frames": sink, "window_frames": window,
                                                        "abs_pos": abs_pos})
    net = random_dit(cfg)
    x, t, ctx = inputs(cfg, B=2, nf=nf, H=6, W=10, seed=nf)
    with torch.no_grad():
        full = net(x, t, ctx)
        cache = M.KVCache(cfg, 2, frame_tokens=3 * 5, num_frames=nf)
        outs = []
        for f0 in range(0, nf, chunk):
            xs, ts = x[:, f0:f0 + chunk], t[:, f0:f0 + chunk]
            net(torch.randn_like(xs), ts.flip(0), ctx, cache=cache, start_frame=f0)  # a denoising step, overwritten
            outs.append(net(xs, ts, ctx, cache=cache, start_frame=f0))
        streamed = torch.cat(outs, dim=1)
    err = (streamed - full).norm() / full.norm()
    assert err < 1e-5, err  # float32, same arithmetic up to summation order


def test_per_chunk_prompts_stream_equals_full_forward():
    # a plan's step prompts: one context per chunk in the training forward == switching prompts while streaming
    cfg = M.CONFIGS["tiny"]
    net = random_dit(cfg)
    x, t, _ = inputs(cfg, B=2, nf=9, H=6, W=6, seed=3)
    ctx = torch.randn(2, 3, 5, cfg.text_dim)  # (B, chunks, Lt, text_dim)
    with torch.no_grad():
        full = net(x, t, ctx)
        cache = M.KVCache(cfg, 2, frame_tokens=9, num_frames=9)
        outs = []
        for j, f0 in enumerate(range(0, 9, 3)):
            cache.clear_cross()  # the prompt changes at every chunk
            outs.append(net(x[:, f0:f0 + 3], t[:, f0:f0 + 3], ctx[:, j], cache=cache, start_frame=f0))
        streamed = torch.cat(outs, dim=1)
        assert (streamed - full).norm() / full.norm() < 1e-5
        same = net(x, t, ctx[:, :1].expand(-1, 3, -1, -1))  # one prompt repeated per chunk == one prompt
        assert (same - net(x, t, ctx[:, 0])).norm() / same.norm() < 1e-5


def test_compile_traces_the_kernel_inside_its_graph():
    # the kernel is a custom operator: torch.compile (pretrain.py --compile) traces a training forward,
    # attention included, split only where the position tables are made eagerly on purpose
    # (model.position_tables); around an opaque autograd.Function it broke twice per block
    cfg = M.CONFIGS["tiny"]
    net = random_dit(cfg)
    x, t, ctx = inputs(cfg, B=2, nf=6, H=4, W=4, seed=5)
    assert A.kernel_supports(*[torch.empty(1, 1, cfg.num_heads, cfg.head_dim)] * 3)  # the model takes the kernel
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda *a: net(*a).square().mean())(x, t, ctx)
    assert all("position_tables" in r.reason for r in explained.break_reasons), explained.break_reasons
    assert explained.graph_count <= 3, explained.graph_count  # was 14: two breaks a block
    torch._dynamo.reset()
    # the compiled path's operator runs the eager path's kernels: the same numbers, gradients included
    q, k, v = (_rand(2, 37, 2, 16) for _ in range(3))
    args = (q, k, v, 0, 5, 0, 0, 0.25)
    op, fn = A._flash_op(*args)[0], A._FlashAttention.apply(*args)
    g = torch.randn(op.shape)
    assert torch.equal(op, fn)
    for a, b in zip(torch.autograd.grad(op, (q, k, v), g), torch.autograd.grad(fn, (q, k, v), g)):
        assert torch.equal(a, b)


def test_compiled_scope_restores_the_flag():
    # train.py fuses the rollout only (model.compiled): re-scoring right after must run eager, or the update's
    # first ratio is no longer 1. The flag comes back after the block, an error inside it included
    assert not M.COMPILE
    with M.compiled():
        assert M.COMPILE
        with M.compiled(False):
            assert not M.COMPILE
        assert M.COMPILE
    with pytest.raises(ValueError), M.compiled():
        raise ValueError("a failed rollout")
    assert not M.COMPILE
    # CPU tensors take the eager path even inside the block: the same numbers, nothing compiled
    x, shift, scale = torch.randn(2, 6, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    with torch.no_grad(), M.compiled():
        assert torch.equal(M.adaln(x, shift, scale, 1e-6, torch.float32), M.adaln.__wrapped__(x, shift, scale, 1e-6, torch.float32))


@pytest.mark.parametrize("abs_pos", [False, True])
def test_copies_equal_separate_forwards(abs_pos):
    # train.py's update: context + K versions of one chunk in one forward == K forwards of context + version,
    # outputs and gradients (the residual stream is float32 even in a float64 model: gradients summed in
    # another order agree to float32's precision)
    cfg = M.ModelConfig(**{**M.asdict(M.CONFIGS["tiny"]), "abs_pos": abs_pos})
    net = random_dit(cfg).double()
    B, C, j, K = 2, cfg.chunk_frames, 2, 3
    g = torch.Generator().manual_seed(7)
    lat, xs = torch.randn(B, j * C, cfg.in_dim, 6, 8, generator=g), torch.randn(B, K, C, cfg.in_dim, 6, 8, generator=g)
    ctx, sig = torch.randn(B, j + 1, 5, cfg.text_dim, generator=g), torch.rand(K, generator=g) * 1000
    lat, xs, ctx = lat.double(), xs.double(), ctx.double()
    w = torch.randn(B, K, C, cfg.out_dim, 6, 8, generator=g).double()  # a random linear loss
    zeros = torch.zeros(B, j * C)
    v = M.forward_copies(net, lat, xs, sig.double(), ctx)
    (v * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    ref = torch.stack([net(torch.cat([lat, xs[:, k]], 1), torch.cat([zeros, torch.full((B, C), float(sig[k]))], 1).double(),
                           ctx)[:, j * C:] for k in range(K)], 1)
    (ref * w).sum().backward()
    assert (v - ref).abs().max() < 1e-10 and (v[:, 0] - v[:, 1]).abs().max() > 1e-3  # equal, and not trivially
    for n, p in net.named_parameters():
        assert (grads[n] - p.grad).abs().max() <= 1e-6 * p.grad.abs().max(), n


def test_recache_keeps_the_sink_unless_it_restarts():
    # LongLive's re-cache (see test_recache_matches_longlive_arithmetic for the whole order of operations)
    cfg = M.ModelConfig(**{**M.asdict(M.CONFIGS["tiny"]), "sink_frames": 3, "window_frames": 6})  # holds 9 frames
    net = random_dit(cfg)
    x, _, ctx = inputs(cfg, nf=15)
    zeros = torch.zeros(1, 3)
    with torch.no_grad():
        cache = M.KVCache(cfg, 1, 16, 15)
        for f0 in range(0, 15, 3):
            if f0 == 9:  # 9 frames so far, the cache's capacity: the re-run starts at frame 0, the sink too
                k0 = cache.k.clone()
                M.recache(net, cache, x[:, :9], torch.randn_like(ctx))
                # layer 0's keys come before any cross-attention; in layer 1 every frame's keys are new
                assert (cache.k[1] - k0[1]).abs().amax(dim=(0, 2, 3)).view(9, 16).amax(1).min() > 1e-3
            net(x[:, f0:f0 + 3], zeros, ctx, cache=cache, start_frame=f0)
        k0 = cache.k.clone()  # slots: frames 0-2 (sink), then frames 9-14
        M.recache(net, cache, x, torch.randn_like(ctx))  # frames 9..14 again, with a new prompt
        assert (cache.k[:, :, :3 * 16] - k0[:, :, :3 * 16]).abs().max() == 0  # the sink kept
        assert (cache.k[:, :, 3 * 16:] - k0[:, :, 3 * 16:]).abs().max() > 1e-3  # the window rewritten


def test_wan_state_dict_matches_reference():
    # expected names and shapes: data derived from the public Wan2.1 / Self-Forcing model definition
    ref = json.load(open(os.path.join(os.path.dirname(__file__), "data", "wan_1.3b_keys.json")))
    with torch.device("meta"):
        net = M.WanDiT(M.CONFIGS["wan-1.3b"])
    ours = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert sorted(map(tuple, map(lambda kv: (kv[0], tuple(kv[1])), ours))) == sorted((k, tuple(s)) for k, s in ref)
    assert len(ours) == 825
    assert abs(net.num_params() / 1e9 - 1.42) < 0.01


def test_self_forcing_checkpoint_roundtrip(tmp_path):
    cfg = M.CONFIGS["tiny"]
    net = random_dit(cfg)
    sd = {"model._fsdp_wrapped_module." + k if k.startswith("blocks") else "model." + k: v for k, v in net.state_dict().items()}
    path = str(tmp_path / "self_forcing_dmd.pt")
    torch.save({"generator_ema": sd, "generator": {}}, path)
    loaded = M.from_pretrained(path, cfg="tiny")
    x, t, ctx = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(net(x, t, ctx), loaded(x, t, ctx))
    ours = str(tmp_path / "ours.safetensors")
    M.save_pretrained(net, ours)
    with torch.no_grad():
        assert torch.equal(net(x, t, ctx), M.from_pretrained(ours)(x, t, ctx))


def test_wrong_checkpoint_gives_clear_error(tmp_path):
    net = random_dit(M.ModelConfig(**{**M.asdict(M.CONFIGS["tiny"]), "ffn_dim": 96}))
    sd = {"model." + k: v for k, v in net.state_dict().items() if "blocks.1.ffn" not in k}
    sd["model.extra.weight"] = torch.zeros(2)
    path = str(tmp_path / "bad.pt")
    torch.save({"generator_ema": sd}, path)
    with pytest.raises(M.CheckpointError) as e:
        M.from_pretrained(path, cfg="tiny")
    msg = str(e.value)
    assert "\n" not in msg and "missing blocks.1.ffn.0.weight" in msg and "unexpected extra.weight" in msg
    assert "blocks.0.ffn.0.weight (96, 64) vs model (128, 64)" in msg
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(M.CheckpointError, match="cannot read checkpoint"):
        M.from_pretrained(str(tmp_path / "corrupt.pt"), cfg="tiny")
    with pytest.raises(M.CheckpointError, match="not found"):
        M.from_pretrained(str(tmp_path / "missing.pt"), cfg="tiny")


def test_sde_step_logp_is_gaussian_density():
    torch.manual_seed(0)
    x, v = torch.randn(3, 2, 4, 5, 5), torch.randn(3, 2, 4, 5, 5)
    for sigma, sigma_next in [(1.0, 0.9375), (0.8333, 0.625), (0.3, 0.1)]:
        x_next, logp, mean, std = M.sde_step(x, v, sigma, sigma_next, noise_level=0.7)
        # closed form, in float64, written independently of the implementation
        a, dt = 0.7, sigma_next - sigma
        s_t = a * math.sqrt(sigma / (1 - (sigma_next if sigma == 1 else sigma)))
        mu = x.double() + (x.double() * s_t ** 2 / (2 * sigma) + v.double() * (1 + s_t ** 2 * (1 - sigma) / (2 * sigma))) * dt
        sd = s_t * math.sqrt(-dt)
        ref = torch.distributions.Normal(mu, sd).log_prob(x_next.double()).flatten(1).mean(1)
        assert torch.allclose(mean.double(), mu, atol=1e-5)
        assert torch.allclose(logp.double(), ref, atol=1e-4)  # float32 arithmetic
        # scoring the recorded sample again gives the same log-probability
        assert torch.allclose(M.sde_step(x, v, sigma, sigma_next, 0.7, x_next=x_next)[1], logp)
        # the ODE step with the exact velocity of x_t = (1 - s) x0 + s eps lands on x_{s'} (float32)
        x0, eps = torch.randn_like(x), torch.randn_like(x)
        x_s = M.ode_step((1 - sigma) * x0 + sigma * eps, eps - x0, sigma, sigma_next)
        assert torch.allclose(x_s, (1 - sigma_next) * x0 + sigma_next * eps, atol=1e-5)
    x0 = torch.randn(2, 3, 4, 4)
    x_next, logp, mean, std = M.renoise_step(x0, 0.625)
    ref = torch.distributions.Normal(0.375 * x0.double(), 0.625).log_prob(x_next.double()).flatten(1).mean(1)
    assert torch.allclose(logp.double(), ref, atol=1e-4)


def test_few_step_schedule():
    s = M.few_step_sigmas()
    assert torch.allclose(s, torch.tensor([1.0, 0.9375, 0.833333, 0.625]), atol=1e-5)


def test_stream_makes_a_video():
    cfg = M.CONFIGS["tiny"]
    net = random_dit(cfg)
    g = torch.Generator().manual_seed(0)
    ctx_a, ctx_b = torch.randn(1, 4, cfg.text_dim), torch.randn(1, 4, cfg.text_dim)
    chunks = list(M.stream(net, [ctx_a, ctx_b, ctx_b], (1, 9, 4, 8, 8), generator=g, switch_recache=True))
    video = torch.cat(chunks, dim=1)
    assert video.shape == (1, 9, 4, 8, 8) and torch.isfinite(video).all()


def test_configurator_rejects_bad_keys(tmp_path, capsys):
    g = {"lr": 1e-4, "steps": 10, "name": "world", "use_kernel": True}
    configure(g, ["--lr=3e-4", "--steps=20", "--name=x"])
    assert g == {"lr": 3e-4, "steps": 20, "name": "x", "use_kernel": True}
    (tmp_path / "c.py").write_text("steps = 5\n")
    configure(g, [str(tmp_path / "c.py")])
    assert g["steps"] == 5
    for bad in (["--nope=1"], ["--steps=1.5"], ["--use_kernel=3"]):
        with pytest.raises(SystemExit):
            configure(g, bad)
        assert capsys.readouterr().err.count("\n") == 1


# -----------------------------------------------------------------------------
# world: the shapes world (world.py) and its exact judges (rewards.py)

ITEMS = [it for name in ("simple", "hard") for it in world.benchmark(name)]
SUBSET = ITEMS[::7]  # 29 items, 1-4 steps


def test_sampling_and_rendering_are_deterministic():
    a = [world.sample_instruction(random.Random(7), n) for n in (1, 2, 3, 4)]
    b = [world.sample_instruction(random.Random(7), n) for n in (1, 2, 3, 4)]
    assert a == b
    assert np.array_equal(world.render(a[3]), world.render(a[3]))
    # the files in data/ are exactly what the documented command writes
    assert list(world.benchmark("simple")) == world.make_benchmark("simple")
    assert list(world.benchmark("hard")) == world.make_benchmark("hard")


def test_parser_round_trips():
    rng = random.Random(0)
    for i in range(300):
        text = world.sample_instruction(rng, 1 + i % 4, need_pair=i % 3 == 0)
        objs, steps = world.parse(text)
        assert world.describe(objs, steps) == text
        for prompt in world.step_prompts(text):  # step prompts name their state and parse back too
            o, step = world.parse_step_prompt(prompt)
            assert world.step_prompts((o, (step,))) == [prompt]
            assert len(o) == len(objs)  # the whole scene: the executor reads nothing else
    # user prompts may leave size and position out; the layout is then chosen so the script fits
    objs, steps = world.parse("A red circle moves right, and then turns blue.")
    assert [s.kind for s in steps] == ["move", "turn"] and objs[0].size == "small"
    assert world.describe(objs, steps) == "a small red circle in the middle moves right, then turns blue"


def test_benchmark_and_ground_truth_plans():
    assert len(world.benchmark("simple")) == len(world.benchmark("hard")) == 100
    assert len({it["instruction"] for it in ITEMS}) == 200
    for it in ITEMS:
        objs, steps = world.parse(it["instruction"])
        plan = [tuple(p) for p in it["plan"]]
        assert plan == world.ground_truth_plan(it["instruction"])
        name = "simple" if it in world.benchmark("simple") else "hard"
        assert len(steps) in ((1, 2) if name == "simple" else (3, 4))
        assert name == "simple" or any(s.kind in world.TWO_OBJECT for s in steps)
        assert plan[0][1] == 0 and plan[-1][2] == world.T
        for (p, s, e), step, nxt in zip(plan, steps, plan[1:] + [(None, world.T, None)]):
            assert s % world.CHUNK == 0 and e == nxt[1] and e - s >= world.DURATION[step.kind]
            assert world.parse_step_prompt(p)[1].kind == step.kind


def test_training_sampler_never_yields_benchmark_instructions():
    bench = {it["instruction"] for it in ITEMS}
    # the benchmark's own rng stream reproduces its first instruction; the training sampler skips it
    rng = random.Random(world.SIMPLE_SEED)
    first = world.sample_instruction(rng, rng.choice((1, 2)))
    assert first == ITEMS[0]["instruction"]
    rng = random.Random(world.SIMPLE_SEED)
    assert world.sample_training_instruction(rng, rng.choice((1, 2))) not in bench
    rng = random.Random(1)
    assert not any(world.sample_training_instruction(rng, 1) in bench for _ in range(500))


@pytest.mark.parametrize("text, word", [("a red circle wobbles", "wobbles"), ("a red hexagon moves left", "hexagon"),
                                        ("a red circle moves sideways", "sideways"), ("a red circle moves right quickly", "quickly")])
def test_parse_errors_name_the_word(text, word):
    with pytest.raises(world.ParseError) as e:
        world.parse(text)
    msg = str(e.value)
    assert f"cannot parse '{word}' in \"{text}\"" in msg and "\n" not in msg


def test_parse_errors_empty_and_unfinished():
    for text in ("", "   "):
        with pytest.raises(ValueError, match="^empty prompt"):
            world.parse(text)
    with pytest.raises(world.ParseError, match="ends after 'then'"):
        world.parse("a red circle moves right, then")


def test_colour_classes_skip_only_background():
    # classify projects only pixels far enough from the background to reach half-way along a colour line;
    # the skipped ones must be exactly those every projection calls background: compared with projecting
    # every pixel, on clean, noisy, blurred and random videos
    def every_pixel(v):  # the projection of world._nearest_line, without the shortcut
        rel = v - world._BG
        proj = rel @ world._DIRS.T
        n2 = (world._DIRS ** 2).sum(1)
        resid2 = np.where((proj / n2 >= 0.5) & (proj / n2 <= 1.5), (rel ** 2).sum(-1, keepdims=True) - proj ** 2 / n2, np.inf)
        return np.where(resid2.min(-1) < world.COLOUR_TOL ** 2, resid2.argmin(-1), -1)

    rng, nrng = random.Random(5), np.random.default_rng(5)
    for n in range(6):
        v = world.render(world.sample_training_instruction(rng, 3))
        v = [v, world.add_noise(v, 25.0, nrng), world.blur(v, 5), nrng.integers(0, 256, v.shape, dtype=np.uint8)][n % 4]
        v = v.astype(np.float32)
        smooth = sum(np.pad(v, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")[:, i:i + v.shape[1], j:j + v.shape[2]]
                     for i in range(3) for j in range(3)) / 9
        for x in (v, smooth):
            assert np.array_equal(world._nearest_line(x), every_pixel(x))


def test_components_match_a_flood_fill():
    # world._components against a plain flood fill, on random labels (dense and sparse, odd sizes)
    def flood(lab):
        seen, out = np.zeros(lab.shape, bool), []
        for t, y, x in zip(*np.nonzero(lab >= 0)):
            if seen[t, y, x]:
                continue
            seen[t, y, x], todo, pts = True, [(y, x)], []
            while todo:
                cy, cx = todo.pop()
                pts.append((cy, cx))
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < lab.shape[1] and 0 <= nx < lab.shape[2] and not seen[t, ny, nx] and lab[t, ny, nx] == lab[t, y, x]:
                        seen[t, ny, nx] = True
                        todo.append((ny, nx))
            out.append((int(t), int(lab[t, y, x]), sorted(pts)))
        return sorted(out)

    rng = np.random.default_rng(3)
    for shape, p in (((3, 9, 11), 0.5), ((2, 17, 5), 0.9), ((4, 8, 8), 0.1), ((1, 1, 1), 1.0)):
        lab = np.where(rng.random(shape) < p, rng.integers(0, 3, shape), -1)
        got = sorted((t, c, sorted(map(tuple, pts.tolist()))) for t, c, pts in world._components(lab))
        assert got == flood(lab), shape


def test_perception_reads_object_states():
    text = "a small red circle on the left moves to a big blue square on the right, then the blue square turns green"
    objs, steps = world.parse(text)
    video = world.render(text)
    tracks, dets = world.observe(video, objs)
    assert all(len(d) == 2 for d in dets)
    for t in range(world.T):
        for tr, o in zip(tracks, objs):
            assert (tr[t].shape, tr[t].size) == (o.shape, o.size)
    assert (tracks[0][0].x, tracks[0][0].y) == pytest.approx((objs[0].x, objs[0].y), abs=0.5)  # centre, px
    assert tracks[1][-1].colour == "green" and tracks[1][0].colour == "blue"
    kinds = [(e.obj, e.kind) for e in world.detect_events(tracks)]
    assert kinds == [(0, "move"), (1, "turn")]
    assert world.gap(tracks[0][-1], tracks[1][-1]) <= world.TOUCH_TOL  # "moves to" ends touching


def _corrupted(how):
    out = []
    for i, it in enumerate(SUBSET):
        v = world.corrupted_render(it["instruction"], how, random.Random(f"{how}-{i}"))
        if v is not None:
            out.append((temporal_following(v, it["instruction"]), temporal_following_strict(v, it["instruction"])))
    return np.array(out)


def test_temporal_judges_on_ground_truth_and_corrupted_videos():
    gt = np.array([(temporal_following(world.render(it["instruction"]), it["instruction"]),
                    temporal_following_strict(world.render(it["instruction"]), it["instruction"])) for it in SUBSET])
    assert gt.mean(0).min() >= 0.98  # the acceptance bar; measured 1.000 on all 200 items
    for how in ("reordered", "missing", "blended"):
        bad = _corrupted(how)
        # full benchmark: means 0.45-0.47 (lenient), 0.29-0.44 (strict); no item above 0.75
        assert bad[:, 0].mean() <= gt[:, 0].mean() - 0.3, how
        assert bad[:, 1].mean() <= gt[:, 1].mean() - 0.3, how
        assert bad[:, 0].max() <= 0.8, how


def test_temporal_judge_is_robust_to_generator_artefacts():
    degrade = {"noise 0.05": lambda v, i: world.add_noise(v, 0.05, np.random.default_rng(i)),
               "noise 0.10": lambda v, i: world.add_noise(v, 0.10, np.random.default_rng(i)),
               "box 3x3": lambda v, i: world.blur(v, 3), "gauss 5x5": lambda v, i: world.blur(v, 5, gaussian=True),
               "drift": lambda v, i: world.colour_drift(v)}
    for name, f in degrade.items():
        scores = [temporal_following(f(world.render(it["instruction"]), i), it["instruction"]) for i, it in enumerate(SUBSET)]
        assert np.mean(scores) >= 0.95, name  # full benchmark: >= 0.99 for each of these


def test_judges_accept_torch_videos():
    it = ITEMS[150]
    v = world.render(it["instruction"])
    x = torch.from_numpy(v).permute(0, 3, 1, 2).float() / 255  # (T, 3, H, W) in [0, 1]
    assert np.array_equal(world.as_video(x), v) and np.array_equal(world.as_video(x * 2 - 1), v)
    assert temporal_following(x * 2 - 1, it["instruction"]) == temporal_following(v, it["instruction"]) == 1.0
    assert aesthetic(x) == 1.0


def test_local_step_following():
    scores = {"ground truth": [], "late": [], "unfinished": [], "blended": []}
    for it in SUBSET:
        plan, (objs, steps) = it["plan"], world.parse(it["instruction"])
        if len(plan) < 2:
            continue
        span, prev, nxt = (plan[1][1], plan[1][1] + world.CHUNK), plan[0][0], plan[1][0]
        starts = [s for _, s, _ in plan]
        variants = {"ground truth": starts, "late": [starts[0], starts[1] + world.CHUNK] + starts[2:],
                    "unfinished": [span[0] - world.DURATION[steps[0].kind] + 2] + starts[1:],  # step 1 runs into the span
                    "blended": [starts[0], starts[0]] + starts[2:]}
        for name, st in variants.items():
            scores[name].append(local_step_following(world.render_script(objs, steps, st), span, prev, nxt))
    assert min(scores["ground truth"]) == 1.0
    assert max(scores["late"]) <= 0.5 and max(scores["unfinished"]) <= 0.5 and max(scores["blended"]) <= 0.5
    it = ITEMS[0]  # the first step (no previous one) and prompts that are not step prompts
    assert local_step_following(world.render(it["instruction"]), (0, 3), None, it["plan"][0][0]) == 1.0
    assert local_step_following(world.render(it["instruction"]), (0, 3), None, "a blue blob dances") == 0.0


def test_local_step_following_graded():
    """The graded judge (train.py's default) agrees with the yes/no one at the ends and ranks what
    lies between: a previous move cut off ever shorter earns ever less, where yes/no says 0.5 to all."""
    for it in SUBSET:
        plan, (objs, steps) = it["plan"], world.parse(it["instruction"])
        if len(plan) < 2:
            continue
        span, prev, nxt, starts = (plan[1][1], plan[1][1] + world.CHUNK), plan[0][0], plan[1][0], [s for _, s, _ in plan]
        assert local_step_following(world.render(it["instruction"]), span, prev, nxt, graded=True) >= 0.95
        assert local_step_following(world.render(it["instruction"]), (0, world.CHUNK), None, prev, graded=True) >= 0.95
        for st in ([starts[0], starts[1] + world.CHUNK] + starts[2:], [starts[0], starts[0]] + starts[2:]):  # late, blended
            assert local_step_following(world.render_script(objs, steps, st), span, prev, nxt, graded=True) <= 0.5
    cases = 0
    for it in ITEMS:
        plan, (objs, steps) = it["plan"], world.parse(it["instruction"])
        if len(plan) < 2 or steps[0].kind != "move" or cases == 6:
            continue
        span, starts = (plan[1][1], plan[1][1] + world.CHUNK), [s for _, s, _ in plan]
        graded, binary = [], []
        for cut in (3, 2, 1):  # frames the first move runs: 8, 12, 16 px short of its 20
            v = world.render_script(objs, steps, starts, [starts[0] + cut] + [world.T] * (len(steps) - 1))
            graded.append(local_step_following(v, span, plan[0][0], plan[1][0], graded=True))
            binary.append(local_step_following(v, span, plan[0][0], plan[1][0]))
        assert binary == [0.5] * 3 and 1.0 > graded[0] > graded[1] > graded[2] >= 0.5, (graded, binary)
        cases += 1
    assert cases == 6


def test_local_step_following_paced():
    """paced (train.py's --local_reward=paced): ground-truth renders keep full marks; a new move that starts one
    frame late covers half the script's travel in its first chunk (4 of 8 px), which the graded judge still calls
    a full start (3 px) and the paced one does not. Paced never scores above graded (it needs at least 3 px)."""
    moves = 0
    for it in ITEMS:
        plan, (objs, steps) = it["plan"], world.parse(it["instruction"])
        if len(plan) < 2 or steps[1].kind not in ("move", *world.TWO_OBJECT):
            continue
        span, prev, nxt, starts = (plan[1][1], plan[1][1] + world.CHUNK), plan[0][0], plan[1][0], [s for _, s, _ in plan]
        assert local_step_following(world.render(it["instruction"]), span, prev, nxt, graded=True, paced=True) >= 0.95, it
        late = world.render_script(objs, steps, [starts[0], starts[1] + 1] + starts[2:])
        graded, paced = (local_step_following(late, span, prev, nxt, graded=True, paced=p) for p in (False, True))
        assert paced <= graded + 1e-9, (it, graded, paced)
        if steps[1].kind == "move":
            assert paced < graded - 0.1, (it, graded, paced)
            moves += 1
    assert moves >= 3


def test_local_step_continuing():
    """The judge of a chunk inside a step (train.py's transition="any"): full marks on ground-truth renders,
    whether the step is under way there or done by its kind's timing; half for a move that stalls while it should be under way
    (graded: no progress; yes/no: no event of the step runs through the chunk); and half where something
    else starts in the chunk, here the next step started a chunk early. Bad prompts and spans score 0."""
    from rewards import local_step_continuing
    C, under, done, stalled, early = world.CHUNK, 0, 0, 0, 0
    for it in ITEMS[::3]:
        plan, (objs, steps) = it["plan"], world.parse(it["instruction"])
        starts = [s for _, s, _ in plan]
        v = world.render(it["instruction"])
        for k, (prompt, a, b) in enumerate(plan):
            need = world.chunks_needed(steps[k].kind)
            for j in range(a // C + 1, b // C):  # the step's chunks after its first: no switch in them
                for graded in (True, False):
                    assert local_step_continuing(v, (j * C, j * C + C), prompt, a, graded=graded) == 1.0, (it, j)
                under, done = under + (j < a // C + need), done + (j >= a // C + need)
            if steps[k].kind == "move" and need >= 2:  # the move cut off after its first chunk: stalls in its second
                ends = [world.T] * len(steps)
                ends[k] = a + C
                cut = world.render_script(objs, steps, starts, ends)
                span = (a + C, a + 2 * C)
                assert local_step_continuing(cut, span, prompt, a, graded=True) == 0.5
                assert local_step_continuing(cut, span, prompt, a) == 0.5
                stalled += 1
            if k + 1 < len(plan) and b - a >= 2 * C:  # the next step starts a chunk before the plan says
                st = starts[:k + 1] + [starts[k + 1] - C] + starts[k + 2:]
                span = (starts[k + 1] - C, starts[k + 1])
                if (span[0] - a) >= world.DURATION[steps[k].kind]:  # this step is done by then
                    assert local_step_continuing(world.render_script(objs, steps, st), span, prompt, a) == 0.5
                    early += 1
    assert min(under, done, stalled, early) >= 3, (under, done, stalled, early)
    v = world.render(ITEMS[0]["instruction"])
    assert local_step_continuing(v, (3, 6), "a blue blob dances", 0) == 0.0
    assert local_step_continuing(v, (6, 3), ITEMS[0]["plan"][0][0], 0) == 0.0


def test_local_step_following_bounds_the_tracker(monkeypatch):
    """A speckled video (a policy gone wrong) shows a dozen blobs a frame; the tracker tries every
    assignment, factorial in its track count, so the judge tracks at most one object more than the
    prompt names (it hung a training run before this bound)."""
    it = next(x for x in SUBSET if len(x["plan"]) >= 2 and len(world.parse(x["instruction"])[0]) == 1)
    v = world.render(it["instruction"]).copy()
    for i in range(12):  # 5x5 blobs in palette colours along the top and bottom rows
        y, x = (1 if i % 2 else 58), 2 + 5 * i
        v[:, y:y + 5, x:x + 5] = list(world.PALETTE.values())[i % len(world.PALETTE)]
    assert np.median([len(d) for d in world.perceive(v)]) >= 10
    seen = []

    def bounded_track(dets, n):  # the real tracker, refusing the counts that would hang this test
        seen.append(n)
        assert n <= 3, f"the judge asked for {n} tracks"
        return world.track(dets, n)
    monkeypatch.setattr(judges, "track", bounded_track)
    plan = it["plan"]
    score = local_step_following(v, (plan[1][1], plan[1][1] + world.CHUNK), plan[0][0], plan[1][0])
    assert seen == [2] and 0.0 <= score <= 1.0


def test_plan_quality():
    worst = {}
    for it in ITEMS:
        assert plan_quality(it["plan"], it["instruction"]) == 1.0
        assert plan_quality([tuple(p) for p in it["plan"]], it["instruction"]) == 1.0
        for name, plan in world.corrupted_plans(it["plan"], world.parse(it["instruction"])[1]).items():
            worst[name] = max(worst.get(name, 0.0), plan_quality(plan, it["instruction"]))
    assert set(worst) == {"dropped step", "swapped order", "infeasible span", "invented step", "wrong coverage"}
    assert max(worst.values()) <= 0.9, worst  # measured maxima: wrong coverage 0.875 (21 of 24 frames), others 0.60-0.75
    text = ITEMS[0]["instruction"]
    for bad in (None, "", "[]", [], [("x", 0)], [("a", 0, 24.0)], [(1, 0, 24)], [("a", 0, 30)], [("a", 5, 3)],
                [("a", 0, 12), ("b", 6, 24)], {"a": 1}, [[None, None, None]], [(["p"], 0, 24)], [("a", True, 24)]):
        assert plan_quality(bad, text) == 0.0, bad
    assert plan_quality([["not a step at all", 0, 24]], text) == 0.0  # parses to nothing: invented


def test_aesthetic():
    v = world.render(ITEMS[120]["instruction"])
    assert aesthetic(v) == 1.0
    noisy = aesthetic(world.add_noise(v, 0.05, np.random.default_rng(0)))
    assert noisy < 0.95 and aesthetic(world.add_noise(v, 0.1, np.random.default_rng(0))) < noisy
    assert aesthetic(world.blur(v, 3)) < 1.0
    assert set(WORLD_JUDGES) == {"temporal_following", "local_step_following", "plan_quality", "aesthetic",
                                 "temporal_following_strict"}


def test_tokenizer_covers_the_world():
    tok, again = world.build_tokenizer(), world.build_tokenizer()
    assert tok.get_vocab() == again.get_vocab()
    unk = tok.unk_token_id
    for it in ITEMS[::5]:
        for text in (it["instruction"], json.dumps(it["plan"]), json.dumps({"plan": [{"prompt": it["plan"][0][0], "start": 0, "end": 12}]})):
            ids = tok(text)["input_ids"]
            assert unk not in ids, text
    ids = tok("[12, 24]")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["[", "12", ",", "24", "]"]  # frame numbers are whole words
    assert tok.decode(ids).replace(" ", "") == "[12,24]"
    assert {tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token} == {"<pad>", "<bos>", "<eos>", "<unk>"}
    assert tok("<bos> a red circle <eos>")["input_ids"][0] == tok.bos_token_id


def test_filmstrip_and_gif(tmp_path):
    from PIL import Image
    it = ITEMS[101]
    v = world.render(it["instruction"])
    world.filmstrip(v, world.frame_labels(it["plan"]), tmp_path / "strip.png")
    world.save_gif(v, tmp_path / "v.gif", fps=8)
    img = Image.open(tmp_path / "strip.png")
    assert img.size[0] == 8 * (2 * world.W + 4) and img.size[1] > 3 * 2 * world.H
    gif = Image.open(tmp_path / "v.gif")  # pillow merges repeated (idle) frames and adds up their durations
    total = 0
    for i in range(gif.n_frames):
        gif.seek(i)
        total += gif.info["duration"]
    assert abs(total - world.T * 125) <= world.T * 5  # GIF keeps durations in 10 ms steps


# -----------------------------------------------------------------------------
# planner: plan format, smoothing, sampling, GSPO, and the Hugging Face judges on tiny random models

FRAMES = 24  # latent frames in the test plans

_CHAT_TEMPLATE = (  # a small Qwen-style template: role headers, a video placeholder, the thinking switch
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>", "<think>", "</think>"]
_WORDS = ("a the red blue green circle square triangle moves left right up down then turns grows shrinks "
         "and finally it prompt start end plan user assistant video score yes no seconds").split()


def _word_tokenizer(words=_WORDS, numbers=range(25), chat_template=None, bos_eos=False):
    """Word-level tokenizer: each word, punctuation mark and number 0..24 is one token."""
    vocab = _SPECIALS + ["<unk>", "<s>"] + [":", "[", "]", "{", "}", '"', ",", ".", "<", ">"]
    vocab += list(words) + [str(i) for i in numbers]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated")])
    if bos_eos:  # CLIP pools at the end token
        tk.post_processor = processors.TemplateProcessing(single="<s> $A <|endoftext|>",
                                                          special_tokens=[("<s>", 10), ("<|endoftext|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", additional_special_tokens=_SPECIALS[1:],
                                   chat_template=chat_template)

# -----------------------------------------------------------------------------
# GSPO


def _gspo_direct(logp, logp_old, mask, adv, eps_low, eps_high):
    """The formula written per sequence in plain Python, and its analytic gradient."""
    N = len(adv)
    J, grad = 0.0, torch.zeros_like(logp)
    for i in range(N):
        n = mask[i].sum().item()
        s = np.exp(((logp[i] - logp_old[i]) * mask[i]).sum().item() / n)
        a = adv[i].item()
        J += min(s * a, min(max(s, 1 - eps_low), 1 + eps_high) * a) / N
        clipped = (s < 1 - eps_low and a < 0) or (s > 1 + eps_high and a > 0)
        if not clipped:  # d/dlogp of s*a is s*a*mask/n
            grad[i] = -a * s * mask[i] / n / N
    return -J, grad


def _random_batch(N=16, T=12, seed=0, spread=2e-3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).double()              # (N, T)
    logp_old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3      # (N, T)
    shift = (torch.rand(N, 1, generator=g, dtype=torch.float64) - 0.5) * spread  # moves s_i across the band
    logp = (logp_old + shift + 1e-4 * torch.randn(N, T, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    return logp, logp_old, mask, adv


def test_gspo_matches_formula():
    for seed in range(3):
        logp, logp_old, mask, adv = _random_batch(seed=seed)
        loss, stats = P.gspo_loss(logp, logp_old, mask, adv)
        loss.backward()
        ref_loss, ref_grad = _gspo_direct(logp.detach(), logp_old, mask, adv, 3e-4, 4e-4)
        assert abs(loss.item() - ref_loss) < 1e-12  # float64
        assert torch.allclose(logp.grad, ref_grad, atol=1e-12, rtol=0)
        assert 0 < stats["clip_frac"] < 1  # the batch has sequences on both sides of the band


def test_gspo_on_policy_gradient():
    logp, _, mask, adv = _random_batch(seed=3)
    loss, stats = P.gspo_loss(logp, logp.detach(), mask, adv)
    loss.backward()
    assert stats["ratio_mean"].item() == 1.0 and stats["clip_frac"].item() == 0.0  # exactly on-policy
    N, lengths = len(adv), mask.sum(-1, keepdim=True)
    assert torch.allclose(logp.grad, -adv[:, None] * mask / lengths / N, atol=1e-15)
    # the same as -A times the gradient of the mean log-prob (GRPO's on-policy gradient)
    lp = logp.detach().clone().requires_grad_()
    (-(adv * (lp * mask).sum(-1) / lengths[:, 0]).mean()).backward()
    assert torch.allclose(logp.grad, lp.grad, atol=1e-15)


def test_gspo_clipping():
    T, eps_low, eps_high = 4, 3e-4, 4e-4
    mask = torch.ones(4, T, dtype=torch.float64)
    log_s = torch.tensor([1e-3, -1e-3, 1e-3, -1e-3], dtype=torch.float64)  # s above, below, above, below the band
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)       # rows 0, 1 push further out: clipped
    logp_old = torch.zeros(4, T, dtype=torch.float64)
    logp = (log_s[:, None] * torch.ones(4, T, dtype=torch.float64)).requires_grad_()
    loss, stats = P.gspo_loss(logp, logp_old, mask, adv, eps_low, eps_high)
    loss.backward()
    assert torch.all(logp.grad[:2] == 0)  # ratio outside the band in the advantage's direction: no gradient
    s = torch.exp(log_s[2:])
    assert torch.allclose(logp.grad[2:], -adv[2:, None] * s[:, None] / T / 4, atol=1e-15)
    assert stats["clip_frac"].item() == 0.5
    # loss value: clipped rows contribute their clipped term
    ref = -((1 + eps_high) * 1.0 + (1 - eps_low) * -1.0 + s[0].item() * -1.0 + s[1].item() * 1.0) / 4
    assert abs(loss.item() - ref) < 1e-12


def test_group_advantages_and_minibatches():
    r = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.2, 0.9, 0.4, 0.1])
    a = P.group_advantages(r, 4).view(2, 4)
    assert torch.allclose(a.mean(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(a.std(1), torch.ones(2), atol=1e-3)  # unbiased std + eps 1e-4
    assert torch.all(P.group_advantages(torch.ones(6), 3) == 0)
    assert torch.all(P.group_advantages(r, 1) == 0)
    parts = P.minibatches(10, 4, torch.Generator().manual_seed(0))
    assert len(parts) == 4 and sorted(torch.cat(parts).tolist()) == list(range(10))


def test_batch_std_keeps_reward_weights():
    """Group 0's main reward ties (0.5 each), so only a small side reward (weight w) tells its rows
    apart; group 1's main reward differs. A group's own std makes group 0's advantages as large as
    group 1's for any w; one batch std scales them with w, as the weight says."""
    g = torch.Generator().manual_seed(0)
    side = torch.rand(8, generator=g)
    main = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 0.0, 1.0])
    for std, expect_scaled in (("group", False), ("batch", True)):
        a1, a2 = (P.group_advantages(main + w * side, 4, std=std).view(2, 4) for w in (0.01, 0.1))
        assert torch.allclose(a1.mean(1), torch.zeros(2), atol=1e-5)
        ratio = (a2[0].abs().sum() / a1[0].abs().sum()).item()  # group 0 when w grows tenfold
        if expect_scaled:
            assert 8 < ratio < 12 and a1[0].abs().max() < 0.05 * a1[1].abs().max()
        else:
            assert abs(ratio - 1) < 0.05  # eps 1e-4 against a std of about 3e-3
    r = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.2, 0.9, 0.4, 0.1])
    b = P.group_advantages(r, 4, std="batch")
    ref = (r.view(2, 4) - r.view(2, 4).mean(1, keepdim=True)).view(-1) / (r.std() + 1e-4)
    assert torch.allclose(b, ref, atol=1e-6)
    n = P.group_advantages(r, 4, std="none")  # Dr. GRPO: centred rewards on their own scale
    assert torch.allclose(n, torch.tensor([-0.5, 0.5, 0.0, 0.0, -0.2, 0.5, 0.0, -0.3]), atol=1e-6)
    a1, a2 = (P.group_advantages(main + w * side, 4, std="none").view(2, 4) for w in (0.01, 0.1))
    assert torch.allclose(a2[0], 10 * a1[0], atol=1e-6) and torch.allclose(a1[1], a2[1], atol=0.2)

# -----------------------------------------------------------------------------
# the plan format


GOOD_PLAN = [("a red circle moves right", 0, 9), ("the circle turns blue", 9, 13), ("it shrinks", 13, 24)]


def test_parse_plan_good():
    text = P.format_plan(GOOD_PLAN)
    assert P.parse_plan(text, FRAMES) == (GOOD_PLAN, "ok")
    assert P.parse_plan("Here is the plan:\n" + text + "\nDone.", FRAMES)[0] == GOOD_PLAN  # prose around the JSON
    assert P.parse_plan(text.replace('"end": 9', '"end": 9.0'), FRAMES)[0] == GOOD_PLAN
    # a word-level tokenizer's decode spaces everything out; it must still read back the same plan
    tok = _word_tokenizer()
    spaced = tok.decode(tok(text).input_ids)
    assert spaced != text and P.parse_plan(spaced, FRAMES) == (GOOD_PLAN, "ok")
    # the world's tokenizer puts a space before a step prompt's comma; the plan still reads back exactly
    wt = world.build_tokenizer()
    gt = world.ground_truth_plan("a big blue square in the middle shrinks, then a big green circle on the right turns purple")
    assert any(", with the" in p for p, _, _ in gt)
    assert P.parse_plan(wt.decode(wt(P.format_plan(gt)).input_ids), world.T) == (gt, "ok")
    assert P.parse_plan(P.format_plan([("one step", 0, FRAMES)]), FRAMES)[0] == [("one step", 0, FRAMES)]


def _plan_json(steps):
    return json.dumps([{"prompt": p, "start": s, "end": e} for p, s, e in steps])


BAD_PLANS = {  # malformed output -> a word the reason must contain
    "not text": (None, "not text"),
    "no list": ("the circle moves right and then turns blue", "no JSON list"),
    "not JSON": ('[{"prompt": "a", start: 0, "end": 24}]', "not valid JSON"),
    "truncated": (P.format_plan(GOOD_PLAN)[:40], "truncated"),
    "empty list": ("[]", "empty plan"),
    "too many steps": (_plan_json([(f"step {i}", i, i + 1) for i in range(FRAMES)]), "too many steps"),
    "not an object": ('["a", "b"]', "not an object"),
    "missing key": ('[{"prompt": "a", "start": 0}]', "has no 'end'"),
    "prompt type": ('[{"prompt": 3, "start": 0, "end": 24}]', "not a string"),
    "empty prompt": (_plan_json([("  ", 0, 24)]), "empty prompt"),
    "wrong types": ('[{"prompt": "a", "start": "0", "end": 24}]', "not integers"),
    "fractional": ('[{"prompt": "a", "start": 0, "end": 23.5}]', "not integers"),
    "bool": ('[{"prompt": "a", "start": false, "end": 24}]', "not integers"),
    "negative": (_plan_json([("a", -3, 6), ("b", 6, 24)]), "negative"),
    "out of range": (_plan_json([("a", 0, 6), ("b", 6, 30)]), "out of range"),
    "reversed span": (_plan_json([("a", 0, 6), ("b", 9, 6)]), "shorter than"),
    "not sorted": (_plan_json([("b", 6, 24), ("a", 0, 6)]), "not sorted"),
    "late start": (_plan_json([("a", 2, 6), ("b", 6, 24)]), "does not start at frame 0"),
    "overlap": (_plan_json([("a", 0, 8), ("b", 6, 24)]), "overlap"),
    "gap": (_plan_json([("a", 0, 6), ("b", 8, 24)]), "gap"),
    "not covering": (_plan_json([("a", 0, 6), ("b", 6, 20)]), "does not cover"),
    "not a list": ('{"prompt": "a"} [1, 2', "truncated"),
    "deep nesting": ("[" * 100000 + "]" * 100000, "not valid JSON"),
}


@pytest.mark.parametrize("kind", list(BAD_PLANS))
def test_parse_plan_bad(kind):
    text, word = BAD_PLANS[kind]
    plan, reason = P.parse_plan(text, FRAMES)
    assert plan is None and word in reason, (kind, reason)


def test_parse_plan_never_raises():
    rng = random.Random(0)
    good = P.format_plan(GOOD_PLAN)
    for _ in range(500):  # truncations, deletions, and random characters of a good plan
        chars = list(good[: rng.randrange(len(good) + 1)])
        for _ in range(rng.randrange(4)):
            if chars:
                chars[rng.randrange(len(chars))] = rng.choice('[]{}":,0123456789- ab\x00')
        plan, reason = P.parse_plan("".join(chars), FRAMES, min_len=2)
        assert (plan is None) == (reason != "ok") and isinstance(reason, str)
    assert P.parse_plan(P.format_plan(GOOD_PLAN), FRAMES, min_len=5)[0] is None  # min_len: the middle span has 4 frames

# -----------------------------------------------------------------------------
# prompt smoothing


def test_smooth_weights():
    plan = [("a", 0, 9), ("b", 9, 15), ("c", 15, 24)]  # chunk-aligned spans of 3, 2 and 3 chunks
    assert all(w[2] == 0.0 for w in P.smooth_weights(plan, FRAMES, 3, mode="none"))
    w = P.smooth_weights(plan, FRAMES, 3)
    assert len(w) == 8
    assert [x[0] for x in w] == [0, 0, 0, 1, 1, 2, 2, 2]
    assert [x[2] for x in w] == [0, 0, 0.5, 0, 0.5, 0, 0, 0]  # only the last chunk of a span that has a next
    assert all(k <= 2 for _, k, _ in w) and all(k == j for j, k, _ in w[5:])  # never past the last span
    w2 = P.smooth_weights(plan, FRAMES, 3, ramp_chunks=2)
    assert [x[2] for x in w2] == pytest.approx([0, 1 / 3, 2 / 3, 1 / 3, 2 / 3, 0, 0, 0])
    # unaligned spans: the switch happens at the first chunk start >= the span's end
    w3 = P.smooth_weights([("a", 0, 4), ("b", 4, 24)], FRAMES, 3)
    assert [x[0] for x in w3][:3] == [0, 0, 1] and [x[2] for x in w3][:3] == [0, 0.5, 0]
    # per frame (chunk = 1): only the frame before each switch blends
    w4 = P.smooth_weights(plan, FRAMES, 1)
    assert [i for i, x in enumerate(w4) if x[2] > 0] == [8, 14]
    ctx = torch.randn(3, 5, 4)  # (num_prompts, L, C)
    out = P.blend_contexts(ctx, w)  # (num_chunks, L, C)
    assert out.shape == (8, 5, 4)
    assert torch.equal(out[0], ctx[0]) and torch.equal(out[7], ctx[2])
    assert torch.allclose(out[2], 0.5 * ctx[0] + 0.5 * ctx[1])

# -----------------------------------------------------------------------------
# the planner model


@pytest.fixture(scope="module")
def tiny_planner():
    torch.manual_seed(0)
    tok = _word_tokenizer()
    return P.Planner(P.tiny_qwen3(tok).eval(), tok, num_frames=FRAMES)


def test_planner_sample_and_logprobs(tiny_planner):
    pl = tiny_planner
    instructions = ["a red circle moves right then turns blue", "the square grows"]
    torch.manual_seed(1)
    out = pl.sample(instructions, M=3, max_new_tokens=16, temperature=0.9)
    N, T = out["completion_ids"].shape
    assert N == 6 and T <= 16 and out["prompt_ids"].shape[0] == 6 and len(out["text"]) == 6
    assert out["prompt_mask"][3:].sum(1).eq(5).all()  # "the square grows plan :"
    assert out["prompt_mask"][:, -1].all()  # left padding
    eos = pl.tokenizer.eos_token_id
    for row, m in zip(out["completion_ids"], out["mask"]):
        hits = (row == eos).nonzero()
        n = hits[0].item() + 1 if len(hits) else T  # through the first EOS
        assert m[:n].eq(1).all() and m[n:].eq(0).all()
    # the returned old log-probs are what logprobs recomputes (same function, eval mode): tolerance 1e-6
    lp = pl.logprobs(out["prompt_ids"], out["completion_ids"], out["mask"], out["prompt_mask"], 0.9)
    assert torch.allclose(lp, out["logp"], atol=1e-6)
    assert torch.allclose(out["logp_sum"], lp.sum(1), atol=1e-5)
    # a row scores the same alone (no padding) as in the padded batch: tolerance 1e-5 (float32)
    alone = pl.encode_prompts([instructions[1]])[0]
    lp1 = pl.logprobs(alone, out["completion_ids"][3:4], out["mask"][3:4], temperature=0.9)
    assert torch.allclose(lp1, out["logp"][3:4], atol=1e-5)
    # and matches generate's own (unprocessed) logits on the same tokens: tolerance 1e-4 (KV-cache decoding)
    g = pl.model.generate(input_ids=out["prompt_ids"], attention_mask=out["prompt_mask"], do_sample=False,
                          max_new_tokens=8, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=pl.tokenizer.pad_token_id, eos_token_id=pl.eos_ids)
    seq = g.sequences[:, out["prompt_ids"].shape[1]:]
    ref = torch.stack([torch.log_softmax(l.float() / 0.9, -1).gather(1, seq[:, t:t + 1])[:, 0]
                       for t, l in enumerate(g.logits)], 1)
    m = pl.completion_mask(seq)
    assert torch.allclose(pl.logprobs(out["prompt_ids"], seq, m, out["prompt_mask"], 0.9), ref * m, atol=1e-4)


def test_planner_update_step(tiny_planner):
    pl = tiny_planner
    torch.manual_seed(2)
    out = pl.sample(["a blue triangle moves up"], M=4, max_new_tokens=8, top_p=0.9)
    adv = P.group_advantages(torch.tensor([0.0, 1.0, 0.5, 0.2]), 4)
    lp = pl.logprobs(out["prompt_ids"], out["completion_ids"], out["mask"], out["prompt_mask"])
    loss, stats = P.gspo_loss(lp, out["logp"], out["mask"], adv)
    loss.backward()
    grads = [p.grad for p in pl.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and stats["ratio_mean"].item() == pytest.approx(1.0)
    pl.model.zero_grad()
    (plan, reason, text), = pl.plan(["a red circle moves left"], max_new_tokens=8)  # random model: almost surely bad
    assert isinstance(reason, str) and (plan is None) == (reason != "ok")


def test_completion_mask_and_chat_prompt(tiny_planner):
    pl = tiny_planner
    e, x = pl.tokenizer.eos_token_id, 30
    ids = torch.tensor([[x, x, e, 0, 0], [x, x, x, x, x], [e, 0, 0, 0, 0]])
    assert pl.completion_mask(ids).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    tok = _word_tokenizer(chat_template=_CHAT_TEMPLATE)
    chat = P.Planner(pl.model, tok, num_frames=FRAMES)
    text = chat.prompt_fn("a red circle moves right", FRAMES)
    assert text.startswith("<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # enable_thinking=False
    assert "Instruction: a red circle moves right" in text and '"end": 24' in text
    assert pl.prompt_fn("a red circle", FRAMES) == "a red circle" + P.PLAIN_SEP

# -----------------------------------------------------------------------------
# Hugging Face judges


def test_score_extraction_odd_vocab():
    # "4" is missing (-> <unk>), "Yes" is two tokens, "10" is two tokens: none of them is readable from logits
    tk = Tokenizer(models.WordPiece({t: i for i, t in enumerate(
        ["[UNK]", "1", "2", "3", "5", "No", "no", "Y", "##es", "##0", "score"])}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated")])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    ids = judges.answer_token_ids(tok, judges.SCALE_1_5)
    assert sorted(ids.values()) == [0.0, 0.25, 0.5, 1.0]  # 1, 2, 3, 5
    yn = judges.answer_token_ids(tok, judges.YES_NO)
    assert list(yn.values()) == [0.0, 0.0] and len(yn) == 2  # "No" and "no" only
    assert judges.answer_token_ids(tok, {"10": 1.0}) == {}
    logits = torch.full((11,), -1e4)
    logits[3], logits[4] = 0.0, 0.0  # half on "3", half on "5"
    assert judges.expected_score(logits, ids)[0] == pytest.approx(0.75)
    logits[0] = 10.0  # most mass on [UNK]: no reading from the logits
    assert judges.expected_score(logits, ids) == (None, pytest.approx(2 / (2 + np.exp(10)), rel=1e-3))
    assert judges.expected_score(logits, {})[0] is None
    assert judges.parse_score("Score: 4/5", judges.SCALE_1_5) == 0.75
    assert judges.parse_score("I'd say YES.", judges.YES_NO) == 1.0
    for garbage in ["", None, "lorem ipsum", "score 10", "\x00\xff"]:
        assert judges.parse_score(garbage, judges.SCALE_1_5) is None


def test_llm_judge_plan_quality():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    tok = _word_tokenizer(chat_template=_CHAT_TEMPLATE)
    torch.manual_seed(0)
    model = P.tiny_qwen3(tok, hidden=32, layers=1, heads=2, kv_heads=1)
    assert isinstance(model, Qwen3ForCausalLM) and isinstance(model.config, Qwen3Config)
    judge = judges.LLMJudge(model, tok)
    instruction = "a red circle moves right then turns blue then shrinks"
    s1 = judge.plan_quality(GOOD_PLAN, instruction, FRAMES)
    assert 0.0 <= s1 <= 1.0 and s1 == judge.plan_quality(GOOD_PLAN, instruction, FRAMES)  # deterministic
    assert judge.last_reason  # random model: little mass on digits -> text fallback, reason logged
    judge.min_mass = 0.0  # read the expectation over the digit tokens whatever their mass
    s2 = judge.plan_quality(GOOD_PLAN, "a red circle moves right", FRAMES)
    assert 0.0 < s2 < 1.0 and judge.last_reason == "ok"
    assert judge.plan_quality(None, "a red circle", FRAMES) == 0.0


class _TinyVideoProcessor:
    """
    Stand-in for Qwen3VLVideoProcessor where torchvision is missing (CPU-only installs): the same
    outputs for frames already sized to a multiple of patch * merge (no resize): normalise,
    pad to an even frame count, cut into (t, h, w) patches in the merge order.
    """
    patch_size, temporal_patch_size, merge_size = 8, 2, 2

    def __call__(self, videos, video_metadata=None, return_tensors=None, **kwargs):
        from transformers import BatchFeature
        from transformers.video_utils import VideoMetadata
        pixels, grids, metas = [], [], []
        for i, v in enumerate(videos):
            v = torch.as_tensor(np.asarray(v)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, C, H, W)
            if len(v) % 2:
                v = torch.cat([v, v[-1:]])
            t, c, h, w = v.shape
            p, m = self.patch_size, self.merge_size
            x = v.view(t // 2, 2, c, h // p // m, m, p, w // p // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
            pixels.append(x.reshape(t // 2 * (h // p) * (w // p), c * 2 * p * p))
            grids.append([t // 2, h // p, w // p])
            metas.append(video_metadata[i] if video_metadata else VideoMetadata(total_num_frames=t, fps=None,
                                                                                frames_indices=list(range(t))))
        return BatchFeature({"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.tensor(grids),
                             "video_metadata": metas})


def _tiny_vlm():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tok = _word_tokenizer(chat_template=_CHAT_TEMPLATE)
    image_processor = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                               size={"shortest_edge": 256, "longest_edge": 64 * 64})
    try:  # the real video processor needs torchvision
        from transformers import Qwen3VLVideoProcessor
        video_processor = Qwen3VLVideoProcessor(patch_size=8, merge_size=2, temporal_patch_size=2,
                                                size={"shortest_edge": 256, "longest_edge": 64 * 64 * 64})
        processor = Qwen3VLProcessor(image_processor, tok, video_processor, chat_template=_CHAT_TEMPLATE)
    except ImportError:
        class Processor(Qwen3VLProcessor):  # without torchvision the class check itself cannot run
            def check_argument_for_proper_class(self, name, arg):
                return type(arg)
        processor = Processor(image_processor, tok, _TinyVideoProcessor(), chat_template=_CHAT_TEMPLATE)
    ids = dict(image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
               vision_start_token_id=processor.vision_start_token_id, vision_end_token_id=processor.vision_end_token_id)
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [4, 2, 2], "mrope_interleaved": True},
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[1]),
        **ids)
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(config), processor


def test_vlm_judge():
    model, processor = _tiny_vlm()
    judge = judges.VLMJudge(model, processor, fps=8.0, max_frames=6)
    video = np.random.RandomState(0).randint(0, 256, (9, 32, 32, 3), dtype=np.uint8)  # (T, H, W, 3), odd T
    s = judge.temporal_following(video, "a red circle moves right then turns blue")
    assert 0.0 <= s <= 1.0 and s == judge.temporal_following(video, "a red circle moves right then turns blue")
    judge.min_mass = 0.0  # read P("yes") from the logits whatever its mass
    l1 = judge.local_step_following(video, (3, 6), "a red circle moves right", "the circle turns blue")
    assert 0.0 < l1 < 1.0 and judge.last_reason == "ok"
    assert l1 == judge.local_step_following(video, (3, 6), "a red circle moves right", "the circle turns blue")
    assert 0.0 <= judge.local_step_following(video, (4, 5), "a", "b") <= 1.0  # a one-frame span
    assert judge.local_step_following(video, (20, 24), "a", "b") == 0.0 and "no frames" in judge.last_reason


def test_pickscore_and_mix():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    tok = _word_tokenizer(bos_eos=True)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=0,
                         bos_token_id=10, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(3)
    model = CLIPModel(config)
    with torch.no_grad():  # PickScore's learned scale is 100 (the cap); a random CLIP starts at 1 / 0.07
        model.logit_scale.fill_(np.log(100.0))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor, tok)
    ps = judges.PickScore(model, processor)
    frames = np.random.RandomState(1).randint(0, 256, (3, 40, 48, 3), dtype=np.uint8)  # (T, H, W, 3)
    s = ps.aesthetic(frames, "a red circle moves right")
    assert 0.0 <= s <= 1.0 and s == ps.aesthetic(frames, "a red circle moves right")
    # the formula, from the towers directly: 100 * cos(text, image) / 26, mean over frames, clamped to [0, 1]
    inputs = processor(text=["a red circle moves right"], images=list(frames), return_tensors="pt")
    with torch.no_grad():
        t = model.text_projection(model.text_model(inputs["input_ids"], inputs["attention_mask"]).pooler_output)
        i = model.visual_projection(model.vision_model(inputs["pixel_values"]).pooler_output)
        raw = (100 * torch.cosine_similarity(i, t, dim=-1)).mean().item() / 26
    assert abs(s - min(max(raw, 0.0), 1.0)) < 1e-5  # float32
    assert 0.0 <= ps.aesthetic(frames) <= 1.0  # prompt=None: the generic quality prompt
    # reward mixing
    w = judges.DEFAULT_REWARD_WEIGHTS
    assert judges.mix_rewards({"plan_quality": 1.0, "temporal_following": 0.5}, w) == pytest.approx(0.75)
    assert judges.mix_rewards({"local_step_following": 0.2, "aesthetic": float("nan")},
                              {"local_step_following": 3.0, "aesthetic": 1.0}) == pytest.approx(0.15)
    with pytest.raises(ValueError):
        judges.mix_rewards({"typo": 1.0}, w)



# -----------------------------------------------------------------------------
# sample.py and pretrain.py: the shipped world models, and what bad input gets

import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def _run(*args, cwd=ROOT):
    return _run_all(args, cwd=cwd)[0]


def _run_all(*commands, cwd=ROOT):
    """Each command (a script and its arguments) in its own Python, all at once so the cores share them."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # the product path on a CPU: the PyTorch attention
    if len(commands) > 1:  # the cores shared out: torch's threads, one set per core each, spin against each other
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(commands))))  # (3x slower on 2 cores)
    procs = [subprocess.Popen([sys.executable, *c], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:  # as subprocess.run does on a timeout: no process outlives the test
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


@pytest.mark.parametrize("args, words", [
    (["--prompt", "a red circle wobbles"], "'wobbles'"),
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "a red circle moves left", "--nonsense=1"], "unknown config key 'nonsense'"),
    (["--prompt", "a red circle moves left", "--seed=x"], "expects int"),
])
def test_sample_bad_input_one_line(args, words):
    r = _run("sample.py", *args)
    assert r.returncode == 2 and words in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def test_sample_missing_or_corrupt_checkpoint(tmp_path):
    r = _run("sample.py", "--prompt", "a red circle moves left", f"--checkpoints={tmp_path}")
    assert r.returncode == 2 and "missing executor checkpoint" in r.stderr and r.stderr.strip().count("\n") == 0
    for name in ("world_executor.safetensors", "world_text_encoder.safetensors"):
        (tmp_path / name).write_bytes(b"\x00" * 100)
    (tmp_path / "world_planner").mkdir()
    r = _run("sample.py", "--prompt", "a red circle moves left", f"--checkpoints={tmp_path}")
    assert r.returncode == 2 and "cannot read checkpoint" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def test_shipped_checkpoints_are_small_safetensors():
    # the repo's limits: weights only as safetensors, each file <= 16 MiB, all together <= 40 MiB
    r = subprocess.run(["git", "ls-files", "checkpoints"], cwd=ROOT, capture_output=True, text=True)
    files = r.stdout.split() if r.returncode == 0 and r.stdout else \
        [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "checkpoints")) for f in fs]
    sizes = {f: os.path.getsize(os.path.join(ROOT, f)) for f in files}
    assert any(f.endswith("tempact/world_executor.safetensors") for f in files), files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".ckpt"))], files
    assert max(sizes.values()) <= 16 * 2**20 and sum(sizes.values()) <= 40 * 2**20, sizes


@pytest.mark.parametrize("where", ["checkpoints", "checkpoints/tempact"])  # the base models, TempAct's
def test_shipped_world_models_generate(monkeypatch, where):
    import sample
    monkeypatch.setattr(A, "BACKEND", "torch")  # the CPU product path; the kernel has its own tests above
    models = sample.load_world(os.path.join(ROOT, where), "cpu")
    ins = "a red circle moves right, then turns blue"
    (plan, reason, _), = models["planner"].plan([ins])
    assert reason == "ok" and plan_quality(plan, ins) == 1.0, (reason, plan)  # the quick-start prompt plans well
    video = sample.generate(models, [plan], seed=0)[0]
    assert video.shape == (world.T, world.H, world.W, 3) and video.dtype == np.uint8
    first = world.perceive(video[:1])[0]  # the first frame shows the instruction's scene: one red circle
    assert [(d.colour, d.shape) for d in first] == [("red", "circle")], first


def test_pretrain_resumes_and_rejects_bad_config(tmp_path):
    out = str(tmp_path / "ck")
    args = ["pretrain.py", "--model=planner", "--batch_size=4", "--workers=1", "--device=cpu", f"--out_dir={out}",
            "--planner_hidden=32", "--planner_layers=1"]
    r = _run(*args, "--max_steps=2")
    assert r.returncode == 0, r.stderr[-500:]
    assert os.path.exists(os.path.join(out, "world_planner", "model.safetensors"))
    r = _run(*args, "--max_steps=3")  # a second run picks up the atomic state file where the first stopped
    assert r.returncode == 0 and "resumed planner from step 2" in r.stdout, r.stdout[-500:]
    r = _run("pretrain.py", "--model=painter", f"--out_dir={out}")
    assert r.returncode == 2 and "unknown model 'painter'" in r.stderr and r.stderr.strip().count("\n") == 0
    r = _run("pretrain.py", "--compile_mode=fast", f"--out_dir={out}")
    assert r.returncode == 2 and "unknown compile_mode 'fast'" in r.stderr and r.stderr.strip().count("\n") == 0
    r = _run(*args, f"--out_dir={tmp_path / 'zero'}", "--batch_size=0")  # refused before anything is written
    assert r.returncode == 2 and r.stderr.strip() == "error: batch_size must be an int >= 1, not 0", r.stderr[-500:]
    assert not os.path.exists(tmp_path / "zero")
    r = _run(*args, f"--out_dir={tmp_path / 'nan'}", "--lr=1e30", "--warmup=1", "--max_steps=3")  # later flags win
    assert r.returncode == 0 and "update skipped" in r.stdout, r.stdout[-500:]  # blown-up weights: logged, run goes on


def test_pretrain_executor_batches_from_workers_equal_in_process(tmp_path):
    # worker processes render and stack whole batches (shared memory): the same examples, in the same order,
    # as rendering in the training process, so the same losses
    losses = []
    for w in (2, 1):
        out = tmp_path / f"w{w}"
        r = _run("pretrain.py", "config/world.py", "--model=executor", "--device=cpu", "--batch_size=2", f"--workers={w}",
                 "--max_steps=2", "--log_every=1", f"--out_dir={out}")
        assert r.returncode == 0, r.stderr[-500:]
        losses.append([json.loads(line)["loss"] for line in open(out / "executor_log.jsonl")])
    assert len(losses[0]) == 2 and all(math.isfinite(x) for x in losses[0]) and losses[0] == losses[1], losses


# -----------------------------------------------------------------------------
# train.py: the TempAct loop on a micro config (the shipped world models, tiny batches, 2 Euler steps)

MICRO = ["--device=cpu", "--instructions=1", "--M=2", "--N=2", "--sample_steps=2", "--num_minibatches=2",
         "--ckpt_every=1", f"--init_from={os.path.join(ROOT, 'checkpoints')}"]


def _train(out, *args):
    r = _run("train.py", *MICRO, f"--out_dir={out}", *args)
    assert r.returncode == 0, r.stderr[-800:]
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def _train_globals(monkeypatch, out, *flags) -> dict:
    """train.py run in this process with --max_iters=0 (the models built, nothing trained): its globals, so a
    test can call rollout, rescore and executor_update itself. The CPU product path, not the kernel's interpreter."""
    import runpy
    argv = ["train.py", *MICRO, "--sample_steps=3", "--max_iters=0", "--save_checkpoints=False",
            "--train_planner=False", f"--out_dir={out}", *flags]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(A, "BACKEND", "torch")
    return runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")


def _update_moves_weights(g, groups, lat, ctx, xs, xn, logp_old, mean_ref):
    """One Flow-GRPO update on a mock reward (named as such: only the update's arithmetic is tested) takes
    finite losses and moves the executor's weights."""
    net = g["executor"]
    before = [p.detach().clone() for p in net.parameters()]
    r = torch.tensor([0.1, 0.9, 0.4, 0.2])
    adv = g["group_advantages"](r, g["N"], std="group")
    stats = g["executor_update"](groups, lat, ctx, xs, xn, logp_old, mean_ref, adv)
    assert stats["e_skipped"] == 0 and math.isfinite(stats["e_loss"]) and math.isfinite(stats["kl"]), stats
    assert any((p.detach() - b).abs().max() > 0 for p, b in zip(net.parameters(), before))


def _load_state(out):
    return torch.load(os.path.join(out, "state.pt"), map_location="cpu", weights_only=True)


def _moved(state, part: str) -> bool:
    """Whether a run's saved executor or planner differs anywhere from the shipped base model it started from."""
    from safetensors.torch import load_file
    base = (M.read_state_dict(os.path.join(ROOT, "checkpoints", "world_executor.safetensors"))[0] if part == "executor"
            else load_file(os.path.join(ROOT, "checkpoints", "world_planner", "model.safetensors")))
    return any(not torch.equal(state[part][k].float(), v.float()) for k, v in base.items())


def test_ablations_train_only_what_they_say(tmp_path):
    # --train_planner=False / --train_executor=False: one iteration each (run together), the other model moves alone.
    # The first also takes --dpo_lr's steps (executor only): the loop's pairs reach dpo_update
    runs = [(tmp_path / "p", "--train_planner=False --dpo_lr=1e-5"), (tmp_path / "e", "--train_executor=False")]
    for r in _run_all(*[("train.py", *MICRO, f"--out_dir={out}", "--max_iters=1", *flag.split()) for out, flag in runs]):
        assert r.returncode == 0, r.stderr[-800:]
    with open(tmp_path / "p" / "log.jsonl") as f:
        rec = json.loads(f.readline())
    assert rec["dpo_rows"] > 0 and rec["dpo_skipped"] == 0 and math.isfinite(rec["dpo_loss"]), rec
    sp, se = _load_state(tmp_path / "p"), _load_state(tmp_path / "e")
    assert _moved(sp, "executor") and not _moved(sp, "planner")
    assert _moved(se, "planner") and not _moved(se, "executor")


def test_train_two_iterations_and_resume(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    log = _train(a, "--max_iters=2")
    assert [r["iter"] for r in log] == [1, 2]
    for r in log:
        assert all(math.isfinite(r[k]) for k in ("p_loss", "e_loss", "kl", "r_temporal", "r_local")), r
        assert r["logp_rollout_gap"] < 1e-4  # streamed sampling and the update's full forward agree (float32)
        # the executor's reward (defaults): local step following + 0.2 aesthetic + its continuation's temporal score
        assert r["r_exec"] == pytest.approx(r["r_local"] + 0.2 * r["r_aesthetic"] + r["r_exec_temporal"], abs=3e-4), r
    sa = _load_state(a)
    assert _moved(sa, "executor") and _moved(sa, "planner")
    # killed after its first checkpoint: the resumed run reaches the same state as the uninterrupted one
    _train(b, "--max_iters=1")
    r = _run("train.py", *MICRO, f"--out_dir={b}", "--max_iters=2")
    assert r.returncode == 0 and "resumed from iteration 1" in r.stdout, r.stdout[-500:] + r.stderr[-500:]
    sb = _load_state(b)
    assert sb["iter"] == sa["iter"] == 2
    # resuming with other settings gets one line and touches nothing (AdamW's saved lr would win silently)
    log_b = open(os.path.join(b, "log.jsonl")).read()
    r = _run("train.py", *MICRO, f"--out_dir={b}", "--max_iters=3", "--executor_lr=3e-5", "--M=3")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        f"error: {b} holds a run with other settings (M=2 there, 3 here; executor_lr=2e-05 there, 3e-05 here): "
        "resume it with those, or choose another --out_dir"], r.stderr[-500:]
    assert open(os.path.join(b, "log.jsonl")).read() == log_b and _load_state(b)["iter"] == 2
    cfg = os.path.join(b, "config.json")  # a corrupt saved config: one line too
    text = open(cfg).read()
    open(cfg, "w").write(text[:20])
    r = _run("train.py", *MICRO, f"--out_dir={b}", "--max_iters=3")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and \
        r.stderr.startswith(f"error: cannot read {cfg} to resume"), r.stderr[-500:]
    open(cfg, "w").write(text)
    # the time budget counts the minutes trained before the resume: none left, no iteration
    trained = _load_state(b)["minutes"]
    r = _run("train.py", *MICRO, f"--out_dir={b}", "--max_iters=3", f"--max_minutes={trained / 2}")
    assert r.returncode == 0 and "resumed from iteration 2" in r.stdout, r.stderr[-500:]
    assert open(os.path.join(b, "log.jsonl")).read() == log_b and _load_state(b)["iter"] == 2
    for part in ("executor", "planner"):
        for k, v in sa[part].items():
            assert torch.equal(v, sb[part][k]), (part, k)
    assert os.path.exists(os.path.join(a, "rewards.png"))
    assert os.path.exists(os.path.join(a, "world_planner", "model.safetensors"))


def test_bench_quality_refuses_bad_rows(tmp_path):
    # one clear line, and before any row is scored: a bad last row does not cost the minutes of the rows before it
    missing = tmp_path / "nothere"
    cases = ((["--eval_seeds=0"], "error: --eval_seeds must be at least 1, got 0"),
             (["--rows=planner,plan"], "error: row 'plan': unknown kind 'plan' (global, planner or gt)"),
             ([f"--rows=planner,planner@{missing}"], f"error: missing executor checkpoint "
              f"{missing}/world_executor.safetensors: run pretrain.py (README) or pass --checkpoints"))
    runs = _run_all(*[("bench.py", "--quality", "--device=cpu", *args) for args, _ in cases])
    for (args, line), r in zip(cases, runs):
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [line] and r.stdout == "", (r.stdout, r.stderr)


def test_bench_quality_mixes_planner_and_executor(tmp_path):
    # `planner@P+E` plans with P's planner and films with E's executor. X: a world folder whose executor is
    # all zeros (its videos stay noise) and whose planner's weights are drowned in noise (it writes broken plans)
    from safetensors.torch import load_file, save_file
    x = tmp_path / "X"
    shutil.copytree(os.path.join(ROOT, "checkpoints", "world_planner"), x / "world_planner")
    shutil.copy(os.path.join(ROOT, "checkpoints", "world_text_encoder.safetensors"), x)
    sd, meta = M.read_state_dict(os.path.join(ROOT, "checkpoints", "world_executor.safetensors"))
    M.save_safetensors({k: torch.zeros_like(v) for k, v in sd.items()}, str(x / "world_executor.safetensors"), meta)
    p = str(x / "world_planner" / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({k: v + torch.randn(v.shape, generator=g).to(v.dtype) for k, v in load_file(p).items()}, p,
              metadata={"format": "pt"})
    base, plan_x, film_x = "checkpoints", f"{x}+checkpoints", f"checkpoints+{x}"
    r = _run("bench.py", "--quality", "--device=cpu", "--max_items=2", f"--rows=planner,planner@{plan_x},planner@{film_x}")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout.splitlines()

    def cells(where):  # Simple, Hard, Simple*, Hard*, avg, [gain,] aesthetic, plan quality
        label = f"{'step prompts (planner)' + (f' [{where}]' if where != base else ''):42s} "  # as bench pads it
        return [float(c.rstrip("%")) for c in next(ln for ln in out if ln.startswith(label))[len(label):].split()]

    def valid(row):
        return [float(ln.rsplit(" ", 1)[1]) for ln in out if ln.startswith(f"{row}: valid plans")]

    b, px, fx = cells(base), cells(plan_x), cells(film_x)
    assert "2/2 items" in r.stdout and b[4] > 0, r.stdout
    assert valid(f"planner@{film_x}") == valid("planner") == [1.0, 1.0] and fx[-1] == b[-1]  # the base planner's plans
    assert max(valid(f"planner@{plan_x}")) < 1.0 and px[-1] < b[-1]  # X's planner's
    assert fx[:5] == [0.0] * 5 and fx[-2] != b[-2]  # X's executor's noise
    r = _run("bench.py", "--quality", "--device=cpu", f"--rows=gt@{film_x}")
    assert r.returncode == 2 and r.stderr.strip() == f"error: row 'gt@{film_x}': only planner rows take two folders (P+E)", r.stderr


def test_train_refuses_unknown_choices(tmp_path, monkeypatch, capsys):
    # a mistyped option gets one clear line before anything is loaded or written, not a traceback mid-run
    # (the script runs in this process, with its command line as argv: no Python start per case)
    cases = (("--smoothing=blend", "error: smoothing must be ramp or none, not 'blend'"),
             ("--adv_std=std", "error: adv_std must be group, batch or none, not 'std'"),
             ("--instructions=-1", "error: instructions must be positive (or 0 for the backbone's default), not -1"),
             ("--policy_steps=5", "error: policy_steps must be an int >= 0 and <= 1 (0: all 1, every step of a chunk but the last), not 5"),
             ("--policy_chunks=-2", "error: policy_chunks must be an int >= 0 (0: all), not -2"),
             ("--transition=last", "error: transition must be first, random or any, not 'last'"),
             ("--M=1", "error: M must be an int >= 2 (1 only with --train_planner=False), not 1"),
             ("--num_minibatches=0", "error: num_minibatches must be an int >= 1, not 0"),
             ("--max_steps=9", "error: max_steps must be an int >= 1 and <= 8 (the world's videos have that many chunks), not 9"),
             ("--pair_frac=2", "error: pair_frac must be in [0, 1], not 2.0"),
             ("--start_frac=-0.5", "error: start_frac must be in [0, 1], not -0.5"),
             ("--backbone=selfforcing --transition=any",
              "error: transition=any needs the world's judges: the VLM judge has no question for a chunk inside a step"),
             ("--backbone=selfforcing --sft_lr=1e-5",
              "error: sft_lr needs the world: the distilled real executors were not trained by flow matching"),
             ("--backbone=selfforcing --dpo_lr=1e-5",
              "error: dpo_lr needs the world: the distilled real executors were not trained by flow matching"),
             ("--sft_lr=1e-5 --dpo_lr=1e-5", "error: sft_lr and dpo_lr share one optimizer: set one of them"))
    import runpy
    monkeypatch.chdir(ROOT)
    for i, (flag, line) in enumerate(cases):
        monkeypatch.setattr(sys, "argv", ["train.py", *MICRO, f"--out_dir={tmp_path / str(i)}", *flag.split()])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.strip().splitlines() == [line], (flag, err[-500:])
        assert not os.path.exists(tmp_path / str(i)), flag


def test_train_survives_bad_plans_and_nan(tmp_path):
    # a hot planner writes malformed plans: they get reward 0, are logged, and the run goes on
    log = _train(str(tmp_path / "c"), "--max_iters=1", "--planner_temperature=20.0")
    assert log[0]["valid_plans"] < 1 and log[0]["invalid_reasons"], log
    # a huge learning rate blows the executor up after its first update: the NaN losses are skipped and logged
    log = _train(str(tmp_path / "d"), "--max_iters=2", "--executor_lr=1e30", "--train_planner=False")
    assert sum(r["e_skipped"] for r in log) > 0, log


def test_executor_update_climbs_a_proxy_reward(tmp_path, monkeypatch):
    """train.py's rollout and Flow-GRPO update, driven by a proxy reward (a mock of the judges, named as
    such): the mean of latent channel 0 on the transition chunk, and the same with its sign flipped, each
    from the same weights. Any update also shifts the proxy by itself (a second-order drift, the same for
    both signs), so the check is paired: evaluated on fixed noise, the run rewarded for a higher mean
    must end higher than the run rewarded for a lower one. A sign error or ignored advantages fails it."""
    g = _train_globals(monkeypatch, tmp_path, "--N=4", "--executor_lr=1e-4", "--kl_beta=0")
    C, N, net, opt = g["C"], g["N"], g["executor"], g["e_opt"]
    plans = [g["stand_in_plan"](x) for x in g["instructions_for"](0)] * 4  # four execution groups

    def proxy(seed, n_groups=4):
        lat, switch, *rest = g["rollout"](plans[:n_groups], torch.Generator().manual_seed(seed))
        rows = torch.tensor([r for r in range(len(lat)) if switch[r] >= 0])
        r = torch.stack([lat[i, switch[i] * C:(switch[i] + 1) * C, 0].mean() for i in rows.tolist()])
        return r, rows, (lat, switch, *rest)

    start = {k: v.clone() for k, v in net.state_dict().items()}
    before = proxy(0, n_groups=2)[0].mean().item()  # the check's fixed noise: two groups are enough
    r, rows, (lat, switch, ctx, xs, xn, lo) = proxy(100)  # one batch from the start weights serves both signs
    assert len(rows) == 4 * N
    batch = lat[rows], ctx[rows], xs[rows], xn[rows]
    groups = g["update_groups"](switch[rows])
    logp_old, mean_ref = g["rescore"](groups, *batch)
    assert (logp_old - lo[rows]).abs().max() < 1e-4  # the update's forward re-scores the streamed steps (float32)
    moved = {}
    for sign in (1.0, -1.0):
        net.load_state_dict(start)
        opt.state.clear()
        g["executor_update"](groups, *batch, logp_old, mean_ref,
                             g["group_advantages"](sign * r, N, std="group"))  # num_minibatches Adam steps
        moved[sign] = proxy(0, n_groups=2)[0].mean().item() - before  # the same noise as `before`: only the weights differ
    assert moved[1.0] > moved[-1.0], moved
    # the noise an execution group shares: always its context; with transition_noise / later_noise also the
    # transition chunk's start noise / the chunks after it. A near-zero SDE width leaves the shared noise as the
    # only thing that can make a group's rows equal, so every chunk of a row is compared with its group's first row
    glb = g["instructions_for"].__globals__  # the module's own globals (rollout's are torch.no_grad's wrapper's)
    glb["noise_level"] = 1e-6
    # (later_noise shared after an own transition chunk is not checked this way: the later chunks then share their
    # noise but see different transition chunks in the cache, so they differ anyway)
    # --flat_groups=True (an ablation) shares nothing: every row draws its own context too
    for trans, later, flat in (("own", "own", False), ("shared", "own", False), ("shared", "shared", False),
                               ("own", "own", True)):
        glb["transition_noise"], glb["later_noise"], glb["flat_groups"] = trans, later, flat
        lat, switch = g["rollout"](plans[:1], torch.Generator().manual_seed(7))[:2]  # one execution group
        for r in range(len(lat)):
            sw, first = int(switch[r]), lat[r - r % N]
            diff = [(lat[r, j * C:(j + 1) * C] - first[j * C:(j + 1) * C]).abs().max().item() for j in range(len(lat[r]) // C)]
            want_same = [not flat and (sw < 0 or j < sw or (j == sw and trans == "shared") or (j > sw and later == "shared"))
                         for j in range(len(diff))]
            assert all((d < 1e-3) == same for d, same in zip(diff, want_same) if r % N), (trans, later, flat, r, sw, diff)
    # --pair_frac=1: every training instruction has two objects and a two-object step, as Hard's do (at 0 not all)
    def hard_like(x):
        objs, steps = world.parse(x)
        return len(objs) == 2 and any(s.kind in world.TWO_OBJECT for s in steps)
    instructions_for = g["instructions_for"]
    for frac, want in ((0.0, False), (1.0, True)):
        instructions_for.__globals__["pair_frac"] = frac  # the module's own globals, as --pair_frac sets them
        assert all(hard_like(x) for step in range(8) for x in instructions_for(step)) == want, frac


def test_policy_chunks_record_every_chunk_after_the_switch(tmp_path, monkeypatch):
    """--policy_chunks=0 --policy_steps=1: the first step of every chunk from the transition chunk to the end
    of the video is the policy's. Each recorded step sits in its own chunk's slot: the update's full forward
    (chunk_steps, one per chunk) re-scores exactly what the stream sampled, unrecorded slots stay empty, and
    one update moves the weights with finite losses. Then --transition: which switch a group branches at."""
    g = _train_globals(monkeypatch, tmp_path, "--N=2", "--policy_chunks=0", "--policy_steps=1")
    nc, N = world.T // g["C"], g["N"]
    assert (g["KP"], g["PC"], g["S"]) == (1, nc - 1, nc - 1)  # a prompt switch is never in the first chunk
    plans = [[("a red circle moves right", 0, 9), ("the red circle turns blue", 9, 24)],
             [("a red circle moves up", 0, 18), ("the red circle grows", 18, 24)]]  # switches at chunks 3 and 6
    lat, switch, ctx, xs, xn, lo = g["rollout"](plans, torch.Generator().manual_seed(3))
    assert switch.tolist() == [3] * N + [6] * N and xs.shape[1] == nc - 1
    for r, sw in enumerate(switch.tolist()):  # slot p holds chunk sw + p's first step, for as many chunks as are left
        assert (lo[r, :nc - sw] != 0).all() and (lo[r, nc - sw:] == 0).all(), (r, lo[r])
        assert (xs[r, :nc - sw].flatten(1).abs().amax(1) > 0).all() and (xs[r, nc - sw:] == 0).all()
    groups = g["update_groups"](switch)
    logp_old, mean_ref = g["rescore"](groups, lat, ctx, xs, xn)
    assert (logp_old - lo).abs().max() < 1e-4, (logp_old - lo).abs().max()  # float32 on the CPU
    _update_moves_weights(g, groups, lat, ctx, xs, xn, logp_old, mean_ref)
    # --transition=random: an execution group branches at one of its plan's switches, drawn per plan (here at
    # chunk 3 or 6), and the local judge then sees the steps on either side of that switch
    three = [("a red circle moves right", 0, 9), ("the red circle turns blue", 9, 18), ("the red circle grows", 18, 24)]
    glb = g["instructions_for"].__globals__
    for how, want in (("first", {3}), ("any", {3, 4, 5, 6, 7}), ("random", {3, 6})):
        glb["transition"] = how
        torch.manual_seed(0)  # train.py seeds the global generator every iteration
        assert set(g["transition_chunks"]([three] * 20)) == want, how
        assert g["transition_chunks"]([three[:1], plans[1]]) == [-1, 6]  # a one-step plan has no switch
    assert g["rollout"]([three], torch.Generator().manual_seed(0))[1].tolist() in ([3] * N, [6] * N)
    assert g["switch_steps"](three, 3) == ("a red circle moves right", "the red circle turns blue")
    assert g["switch_steps"](three, 6) == ("the red circle turns blue", "the red circle grows")
    # the judges: a switch chunk gets the transition judge, a chunk inside a step (transition="any") the continuing
    # one, both 1.0 on the script's own render; inside the turn (chunks 4-5: done after one chunk) the grow starting
    # a chunk early is something else starting there
    text = "a red circle moves right, then turns blue, then grows"
    objs, steps = world.parse(text)
    plan = [(p, a, b) for p, (_, a, b) in zip(world.step_prompts(text), three)]  # the prompts that name the scene
    gt = world.render_script(objs, steps, [0, 9, 18])
    assert [g["judge"]((gt, text, plan, j))["local"] for j in (3, 4, 5, 6, 7)] == [1.0] * 5
    early = world.render_script(objs, steps, [0, 9, 15])
    assert g["judge"]((early, text, plan, 5))["local"] == 0.5
    # --start_frac: that share of groups branch at chunk 0 instead (one-step plans too), judged by the transition
    # judge with no previous step: the first step should start there. A move that starts a chunk late gets half
    glb["transition"], glb["start_frac"] = "first", 0.5
    torch.manual_seed(0)
    drawn = g["transition_chunks"]([three, three[:1]] * 20)
    assert set(drawn[0::2]) == {0, 3} and set(drawn[1::2]) == {0, -1}, drawn
    assert g["switch_steps"](plan, 0) == (None, plan[0][0])
    assert g["judge"]((gt, text, plan, 0))["local"] == 1.0
    assert g["judge"]((world.render_script(objs, steps, [3, 9, 18]), text, plan, 0))["local"] == 0.5


def test_step_weights_even_out_the_policy_gradient(tmp_path, monkeypatch):
    """--step_weight=noise: each policy step's log-prob, times its weight, has a gradient in v of the same size at
    every step (float32; 4096 elements a step, so a norm varies by about 1%), where unweighted the last steps'
    exceed the first ones' 5x or more. The same for the distilled re-noise sampler, and one update with the
    weights moves the executor with finite losses. --step_weight=none weighs every step 1."""
    g = _train_globals(monkeypatch, tmp_path, "--sample_steps=10", "--step_weight=noise", "--N=2")
    glb = g["step_weights"].__globals__  # the module's own globals, as the flags set them
    world_schedule = glb["sampler"], glb["sigmas"], glb["KP"]  # the Euler SDE, 10 steps: 9 policy steps
    gen = torch.Generator().manual_seed(0)

    def grad_norms(weights):
        out = []
        for k, (s, s_next) in enumerate(zip(glb["sigmas"][:glb["KP"]], glb["sigmas"][1:])):
            x, v = torch.randn(2, 1, 4096, generator=gen)
            v.requires_grad_(True)
            x_next = g["policy_step"](x, v.detach(), s, s_next, noise=torch.randn(1, 4096, generator=gen))[0]
            (weights[k] * g["policy_step"](x, v, s, s_next, x_next=x_next)[1]).sum().backward()  # a step it took
            out.append(v.grad.norm().item())
        return torch.tensor(out)

    for sampler, sigmas in (("ode", glb["sigmas"]), ("renoise", M.few_step_sigmas().tolist() + [0.0])):
        glb["sampler"], glb["sigmas"], glb["KP"] = sampler, sigmas, len(sigmas) - 2
        w = g["step_weights"]()
        assert w.shape == (glb["KP"],) and abs(w.mean().item() - 1) < 1e-6 and (w > 0).all(), w
        plain, even = grad_norms(torch.ones_like(w)), grad_norms(w)
        assert plain[-1] > 5 * plain[0] and even.max() < 1.1 * even.min(), (sampler, plain, even)
    glb["sampler"], glb["sigmas"], glb["KP"] = world_schedule
    w = g["step_weights"]()
    assert w[0] > 10 * w[-1], w  # the world's first step weighs more than 10x its last
    plans = [[("a red circle moves right", 0, 9), ("the red circle turns blue", 9, 24)]] * 2
    lat, switch, ctx, xs, xn, lo = g["rollout"](plans, torch.Generator().manual_seed(3))
    groups = g["update_groups"](switch)
    _update_moves_weights(g, groups, lat, ctx, xs, xn, *g["rescore"](groups, lat, ctx, xs, xn))
    glb["step_weight"] = "none"
    assert (g["step_weights"]() == 1).all()


def test_start_frac_rescores_the_first_chunk(tmp_path, monkeypatch):
    """--start_frac=1: every execution group branches at chunk 0, which has no context. The group's
    continuations differ from the first frame on, the update's forward (an empty context) re-scores exactly
    what the stream sampled, and one update moves the weights with finite losses."""
    g = _train_globals(monkeypatch, tmp_path, "--start_frac=1.0")
    N = g["N"]
    plans = [[("a red circle moves right", 0, 9), ("the red circle turns blue", 9, 24)], [("a red circle grows", 0, 24)]]
    lat, switch, ctx, xs, xn, lo = g["rollout"](plans, torch.Generator().manual_seed(3))
    assert switch.tolist() == [0] * (2 * N)  # the one-step plan too
    assert (lat[0, :g["C"]] - lat[1, :g["C"]]).abs().max() > 0.1  # no shared context
    groups = g["update_groups"](switch)
    logp_old, mean_ref = g["rescore"](groups, lat, ctx, xs, xn)
    assert (lo != 0).all() and (logp_old - lo).abs().max() < 1e-4, (logp_old - lo).abs().max()
    _update_moves_weights(g, groups, lat, ctx, xs, xn, logp_old, mean_ref)


def test_sft_selects_the_best_and_fits_it(tmp_path, monkeypatch, capsys):
    """--sft_lr (RAFT, not in the paper): best_of keeps each instruction's best row where it beats the
    instruction's mean; a step of sft_update's flow matching (pretrain.py's loss) on rollouts lowers that loss at
    the noise it drew, and the second optimizer's state is saved and comes back on resume (also from "s_opt", as
    runs before --dpo_lr saved it; a state without it gets one line)."""
    g = _train_globals(monkeypatch, tmp_path, "--sft_lr=1e-5", "--num_minibatches=1")
    best_of = g["best_of"]
    r = torch.tensor([0.1, 0.9, 0.4, 0.9, 0.5, 0.5, 0.2, 0.3])
    assert best_of(r, [0, 0, 0, 0, 1, 1, 2, 2]).tolist() == [1, 7]  # ties: the first; instruction 1 ties throughout
    assert best_of(torch.zeros(0), []).tolist() == []
    plans = [[("a red circle moves right", 0, 9), ("the red circle turns blue", 9, 24)]]
    lat, _, ctx, *_ = g["rollout"](plans, torch.Generator().manual_seed(3))
    net, C = g["executor"], g["C"]

    def loss(seed: int) -> float:  # sft_update's own draws: the shuffle, a noise level per chunk, the noise
        torch.manual_seed(seed)
        idx = g["batches_of"](len(lat))[0]
        sigma = M.chunk_noise_levels(len(idx), lat.shape[1] // C, g["sample_shift"])
        with torch.no_grad():
            return M.flow_matching_loss(net, lat[idx], sigma, ctx[idx]).item()

    for seed in (0, 1):  # one step (one minibatch) at a small rate lowers the loss at the noise it was taken with
        before = loss(seed)
        torch.manual_seed(seed)
        stats = g["sft_update"](lat, ctx)
        assert stats["sft_skipped"] == 0 and stats["sft_rows"] == len(lat)
        assert stats["sft_loss"] == pytest.approx(before, rel=1e-5) and loss(seed) < before, (loss(seed), before)
    assert g["sft_update"](None, None)["sft_rows"] == 0  # a rank with no rows still takes the steps
    g["save_checkpoint"]()
    state = _load_state(tmp_path)
    saved = state["a_opt"]
    g2 = _train_globals(monkeypatch, tmp_path, "--sft_lr=1e-5", "--num_minibatches=1")
    assert g2["it"] == 0 and g2["a_opt"].state_dict()["state"][0]["step"] == saved["state"][0]["step"] == 2
    older = {("s_opt" if k == "a_opt" else k): v for k, v in state.items()}  # as runs before dpo_lr saved it
    M.save_state(older, str(tmp_path / "state.pt"))
    g2 = _train_globals(monkeypatch, tmp_path, "--sft_lr=1e-5", "--num_minibatches=1")
    assert g2["a_opt"].state_dict()["state"][0]["step"] == 2
    M.save_state({k: v for k, v in older.items() if k != "s_opt"}, str(tmp_path / "state.pt"))  # none: one line
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _train_globals(monkeypatch, tmp_path, "--sft_lr=1e-5", "--num_minibatches=1")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1] == (f"error: {tmp_path / 'state.pt'} has no state for sft_lr's or dpo_lr's "
                                             "optimizer: resume it without them"), err[-3:]


def test_dpo_pairs_and_prefers_the_winner(tmp_path, monkeypatch):
    """--dpo_lr (Diffusion-DPO, not in the paper): dpo_pairs takes each execution group's best and worst row and
    skips a group that ties; the loss is log 2 while the executor is the base; steps raise the executor's
    preference for the winners over the base's (the margin m at the draws they were taken with), and the second
    optimizer's state is saved and comes back on resume."""
    flags = ("--dpo_lr=1e-4", "--dpo_beta=500", "--num_minibatches=1", "--N=2")
    g = _train_globals(monkeypatch, tmp_path, *flags)
    w, l = g["dpo_pairs"](torch.tensor([0.1, 0.9, 0.4, 0.4, 0.7, 0.2]))
    assert w.tolist() == [1, 4] and l.tolist() == [0, 5]  # the middle group ties
    w, l = g["dpo_pairs"](torch.zeros(0))
    assert len(w) == len(l) == 0
    plans = [[("a red circle moves right", 0, 9), ("the red circle turns blue", 9, 24)],
             [("a blue square grows", 0, 12), ("the blue square moves left", 12, 24)]]
    lat, switch, ctx, *_ = g["rollout"](plans, torch.Generator().manual_seed(3))
    assert (lat[0] - lat[1]).abs().max() > 0.1  # a group's two continuations differ: the rows 0, 2 win
    lw, ll, c = lat[[0, 2]], lat[[1, 3]], ctx[[0, 2]]
    torch.manual_seed(0)
    stats = g["dpo_update"](lw, ll, c)
    assert stats["dpo_skipped"] == 0 and stats["dpo_rows"] == 2
    assert stats["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6) and stats["dpo_margin"] == 0.0  # the base
    for _ in range(3):
        stats = g["dpo_update"](lw, ll, c)
    torch.manual_seed(0)
    later = g["dpo_update"](lw, ll, c)  # the first step's draws again
    assert later["dpo_margin"] > 0 and later["dpo_loss"] < math.log(2), later
    assert g["dpo_update"](None, None, None)["dpo_rows"] == 0  # a rank with no pairs still takes the steps
    g["save_checkpoint"]()
    saved = _load_state(tmp_path)["a_opt"]
    g2 = _train_globals(monkeypatch, tmp_path, *flags)
    assert g2["a_opt"].state_dict()["state"][0]["step"] == saved["state"][0]["step"] == 5  # (no gradient, no step count)


def test_train_ddp_two_processes_gloo(tmp_path):
    # torchrun on the CPU: two ranks, gloo, one iteration; each rank its own instructions, weights kept equal,
    # also when one rank's one-step instruction leaves it no prompt switch, so no executor rows to learn from
    out, prompts = str(tmp_path / "ddp"), tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves right\na red circle moves right, then turns blue\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *MICRO, f"--out_dir={out}", "--max_iters=1", f"--prompts={prompts}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-1500:]
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert len(log) == 1 and log[0]["ranks"] == 2  # rank 0 alone writes the log
    assert log[0]["rank_weight_spread"] == 0.0, log[0]
    assert math.isfinite(log[0]["e_loss"]) and math.isfinite(log[0]["p_loss"])

# -----------------------------------------------------------------------------
# vae.py: the Wan2.1 VAE on tiny shapes

import vae as V  # noqa: E402


def random_vae(cfg: str = "tiny", seed: int = 0) -> V.WanVAE:
    """Random weights everywhere, gains away from 1: every path contributes to the output."""
    torch.manual_seed(seed)
    vae = V.WanVAE(V.VAE_CONFIGS[cfg])
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)  # unit gain per layer
    return vae.eval().requires_grad_(False)


def rel_err(x, ref):
    """max |x - ref| / max |ref|, in float64."""
    ref = ref.double()
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def test_vae_state_dict_matches_reference():
    # expected names and shapes: data derived from the public Wan2.1 VAE model definition
    ref = json.load(open(os.path.join(os.path.dirname(__file__), "data", "wan_vae_keys.json")))
    with torch.device("meta"):
        vae = V.WanVAE(V.VAE_CONFIGS["wan2.1"])
    ours = sorted((k, tuple(v.shape)) for k, v in vae.state_dict().items())
    assert ours == sorted((k, tuple(s)) for k, s in ref)
    assert len(ours) == 194
    assert sum(p.numel() for p in vae.parameters()) == 126_892_531
    assert sum(p.numel() for p in [*vae.decoder.parameters(), *vae.conv2.parameters()]) == 73_295_603


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_vae_checkpoint_loads_and_decodes(tmp_path, ext):
    vae = random_vae()
    path = str(tmp_path / ("Wan2.1_VAE" + ext))
    if ext == ".pth":
        torch.save(vae.state_dict(), path)  # the real file's format: a plain state dict
    else:
        M.save_safetensors(vae.state_dict(), path)
    loaded = V.load_vae(path, cfg="tiny")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    z = torch.randn(2, 4, 16, 3, 5)  # (B, F, C, h, w), the DiT's layout
    video = loaded.decode(z)
    assert video.shape == (2, 1 + 4 * 3, 3, 24, 40)
    assert video.abs().max() <= 1.0  # clamped
    assert (video.abs() < 1).float().mean() > 0.5  # and mostly not at the clamp
    assert torch.equal(video, vae.decode(z))


def test_vae_streaming_equals_one_shot():
    vae = random_vae(seed=1)
    z = torch.randn(1, 21, 16, 3, 5)  # odd latent sizes; 21 latent frames -> 81 frames
    one_shot = vae.decode(z, chunk_frames=21)  # one call: no past ever used but the zero start
    assert one_shot.shape == (1, 81, 3, 24, 40)
    stream = vae.stream()
    chunks = [stream(c) for c in z.split(3, dim=1)]  # as the DiT emits them
    assert [c.shape[1] for c in chunks] == [9] + [12] * 6
    # float32; only the convolutions' summation order differs
    assert rel_err(torch.cat(chunks, dim=1), one_shot) < 1e-5
    assert rel_err(vae.decode(z[:, :7]), one_shot[:, :25]) < 1e-5  # default: one latent frame at a time
    # the past matters: a later chunk decoded without it comes out different
    assert rel_err(vae.stream()(z[:, 3:6])[:, -4:], chunks[1][:, -4:]) > 1e-2


def test_vae_norm_is_wans_formula():
    # Wan writes F.normalize(x, dim=1) * sqrt(C) * gamma; ours is one F.rms_norm pass (channels-last friendly)
    torch.manual_seed(0)
    norm = V.RMSNorm(96)
    norm.gamma.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 96, 5, 7, 9)
    assert rel_err(norm(x), F.normalize(x, dim=1) * 96 ** 0.5 * norm.gamma) < 1e-6


def test_vae_encoder_decoder_round_trip_shapes():
    vae = random_vae(seed=2)
    video = torch.rand(2, 9, 3, 24, 40) * 2 - 1  # (B, 1 + 4n, 3, H, W)
    z = vae.encode(video)
    assert z.shape == (2, 3, 16, 3, 5)
    assert vae.decode(z).shape == video.shape
    assert vae.encode(video[:, :1]).shape == (2, 1, 16, 3, 5)  # a single image
    # the encoder streams too: the first frame alone, then 4 frames at a time, equals one call
    x = video.transpose(1, 2)  # (B, 3, T, H, W)
    cache = {}
    parts = [vae.encoder(x[:, :, :1], cache), vae.encoder(x[:, :, 1:5], cache), vae.encoder(x[:, :, 5:], cache)]
    assert rel_err(torch.cat(parts, dim=2), vae.encoder(x, {})) < 1e-5  # (B, 32, 3, 3, 5)
    with pytest.raises(ValueError, match="1 \\+ 4n frames, got 8"):
        vae.encode(video[:, :8])


def test_vae_bad_files_give_one_line(tmp_path):
    def message(path, **kw):
        with pytest.raises(M.CheckpointError) as e:
            V.load_vae(path, **kw)
        msg = str(e.value)
        assert path in msg and "\n" not in msg
        return msg

    assert "not found" in message(str(tmp_path / "missing.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint" * 10)
    assert "cannot read" in message(str(corrupt))
    tiny = random_vae().state_dict()
    small = str(tmp_path / "tiny_vae.pth")
    torch.save(tiny, small)
    msg = message(small)  # the full-size config expected
    assert "expected a Wan2.1 VAE" in msg and "shape mismatch" in msg and "'wan2.1'" in msg
    other = str(tmp_path / "other.pth")
    torch.save({**{k: v for k, v in tiny.items() if k != "conv2.bias"}, "head.head.weight": torch.zeros(4)}, other)
    msg = message(other, cfg="tiny")
    assert "missing conv2.bias" in msg and "unexpected head.head.weight" in msg


# -----------------------------------------------------------------------------
# backbones.py: real-backbone loaders on tiny checkpoints written here in each release's format

import re  # noqa: E402
import runpy  # noqa: E402
import types  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from transformers import UMT5EncoderModel  # noqa: E402

import backbones as B  # noqa: E402
from model import CheckpointError  # noqa: E402

# -----------------------------------------------------------------------------
# the umT5 text encoder

TINY_T5 = dict(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4)
WORDS = ["<pad>", "</s>", "<unk>"] + "a the red blue circle square moves left right then turns & big small".split()


def tiny_t5(seed=0):
    torch.manual_seed(seed)
    enc = UMT5EncoderModel(B.umt5_config(**TINY_T5)).eval()
    with torch.no_grad():  # layer norms start at 1 and a swapped pair of them would go unnoticed: randomise all
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return enc


def to_wan_names(sd: dict) -> dict:
    """transformers names -> Wan's, through the inverse of the loader's table."""
    inverse = {v: k for k, v in B.WAN_T5_NAMES.items()}
    out = {}
    for k, v in sd.items():
        if k in B.T5_TIED:
            continue
        m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", k)
        out[inverse[f"encoder.block.{{i}}.{m[2]}" if m else k].format(i=m[1] if m else "")] = v.clone()
    return out


def tiny_tokenizer(folder):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])  # as umT5
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return str(folder)


def run(enc, ids, mask):
    with torch.no_grad():
        return enc(input_ids=ids, attention_mask=mask).last_hidden_state


def test_wan_t5_pth_loads_through_the_table(tmp_path):
    ref = tiny_t5()
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(to_wan_names(ref.state_dict()), path)
    enc = B.load_t5(str(path), config=B.umt5_config(**TINY_T5))
    ids = torch.randint(3, 64, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    assert torch.equal(run(enc, ids, mask), run(ref, ids, mask))  # the same weights in the same places: exact
    assert enc.encoder.embed_tokens.weight is enc.shared.weight  # tied again after loading


def test_wan_t5_ffn_roles(tmp_path):
    # a round trip through one table cannot tell which of Wan's FFN weights goes through the GELU: Wan's
    # block computes x + fc2(fc1(y) * gelu_tanh(gate.0(y))), y = RMSNorm(x) * norm2, written out here
    wan = to_wan_names(tiny_t5().state_dict())
    torch.save(wan, tmp_path / "t5.pth")
    enc = B.load_t5(str(tmp_path / "t5.pth"), config=B.umt5_config(**TINY_T5))
    x = torch.randn(1, 5, 16)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * wan["blocks.1.norm2.weight"]
    gate = F.gelu(F.linear(y, wan["blocks.1.ffn.gate.0.weight"]), approximate="tanh")
    h = F.linear(y, wan["blocks.1.ffn.fc1.weight"]) * gate
    with torch.no_grad():
        out = enc.encoder.block[1].layer[1](x)  # transformers' norm + gated FFN + residual
    assert (out - (x + F.linear(h, wan["blocks.1.ffn.fc2.weight"]))).abs().max() < 1e-5  # float32


def test_wan_t5_unknown_key_is_one_line(tmp_path):
    sd = to_wan_names(tiny_t5().state_dict())
    sd["blocks.0.ffn.gate.1.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "t5.pth")
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.ffn\.gate\.1\.weight' is not a weight") as e:
        B.load_t5(str(tmp_path / "t5.pth"), config=B.umt5_config(**TINY_T5))
    assert "\n" not in str(e.value)
    del sd["blocks.0.ffn.gate.1.weight"], sd["blocks.1.attn.q.weight"]
    torch.save(sd, tmp_path / "t5.pth")
    with pytest.raises(CheckpointError, match="missing encoder.block.1.layer.0.SelfAttention.q.weight"):
        B.load_t5(str(tmp_path / "t5.pth"), config=B.umt5_config(**TINY_T5))


def test_t5_diffusers_folder(tmp_path):
    ref = tiny_t5()
    ref.save_pretrained(tmp_path / "text_encoder")  # config.json + model.safetensors
    enc = B.load_t5(str(tmp_path / "text_encoder"))
    ids = torch.randint(3, 64, (1, 12))
    assert torch.equal(run(enc, ids, torch.ones_like(ids)), run(ref, ids, torch.ones_like(ids)))


def test_encode_pads_with_zeros_past_the_prompt(tmp_path):
    enc, tok = tiny_t5(), B.load_tokenizer(tiny_tokenizer(tmp_path / "umt5-xxl"))
    prompts = ["the red circle moves left", "a  big blue square\n moves right &amp; then turns"]
    h = B.encode(enc, tok, prompts)  # (2, 512, 16)
    assert h.shape == (2, 512, 16)
    for i, p in enumerate(prompts):
        ids = tok([B.clean_prompt(p)], return_tensors="pt")["input_ids"]  # real tokens only, </s> included
        n = ids.shape[1]
        assert n == len(B.clean_prompt(p).split()) + 1  # '&amp;' decoded to '&', whitespace collapsed
        assert h[i, n:].abs().max() == 0  # zeros past the real length, exactly
        # padding is masked out, so the real tokens see only each other; tolerance 1e-5 (float32 sums)
        assert (h[i, :n] - run(enc, ids, torch.ones_like(ids))[0]).abs().max() < 1e-5


def test_full_size_t5_mapping_covers_transformers_once():
    # Wan's key list: data derived from the public Wan2.1 umT5-XXL encoder built on the meta device
    wan = json.load(open(os.path.join(os.path.dirname(__file__), "data", "wan_t5_keys.json")))
    assert len(wan) == 24 * 10 + 2
    mapped = B.wan_t5_to_transformers({k: torch.empty(s, device="meta") for k, s in wan})
    with torch.device("meta"):
        hf = UMT5EncoderModel(B.umt5_config()).state_dict()
    assert len(mapped) == len(wan) + len(B.T5_TIED)  # no two Wan keys land on one name ...
    assert set(mapped) == set(hf)  # ... and together they cover every transformers key
    assert all(mapped[k].shape == hf[k].shape for k in hf)
    assert sum(math.prod(s) for _, s in wan) == 5_680_910_336  # the umT5-XXL encoder's parameters


# -----------------------------------------------------------------------------
# executors: Self-Forcing / LongLive dicts, LongLive's LoRA

LORA_TARGETS = [f"blocks.{i}.{m}" for i in range(2) for m in
                ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]]


def random_lora_dit(seed):
    torch.manual_seed(seed)
    net = M.WanDiT(M.CONFIGS["tiny"]).eval()
    with torch.no_grad():  # Wan zero-inits the output layer: randomise it so every path is checked
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def save_training_dict(path, nets: dict):
    """Self-Forcing / LongLive layout: {entry: WanDiffusionWrapper state dict (prefix model.), ...}."""
    ckpt = {k: {f"model.{n}": v for n, v in net.state_dict().items()} for k, net in nets.items()}
    torch.save(ckpt | {"step": 600}, path)


def save_lora(path, net, rank, seed=0, extra=None):
    """peft's names under LongLive's generator_lora entry; returns {module: (A, B)}."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(net.named_modules())
    pairs = {name: (torch.randn(rank, mods[name].in_features, generator=g) * 0.1,
                    torch.randn(mods[name].out_features, rank, generator=g) * 0.1) for name in LORA_TARGETS}
    sd = {f"base_model.model.{name}.lora_{ab}.weight": t for name, (A, Bm) in pairs.items()
          for ab, t in (("A", A), ("B", Bm))}
    torch.save({"generator_lora": sd | (extra or {}), "critic_lora": {}, "step": 3000}, path)
    return pairs


def dit_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 4, 4, 4, generator=g)  # (B, F, C, H, W)
    return x, torch.rand(1, 3, generator=g) * 1000, torch.randn(1, 5, 32, generator=g)


def test_selfforcing_reads_the_ema_entry(tmp_path):
    ema, raw = random_lora_dit(0), random_lora_dit(1)
    save_training_dict(tmp_path / "self_forcing_dmd.pt", {"generator": raw, "generator_ema": ema})
    net = B.load_executor(str(tmp_path / "self_forcing_dmd.pt"), "tiny", key="generator_ema")
    x, t, ctx = dit_inputs()
    with torch.no_grad():
        assert torch.equal(net(x, t, ctx), ema(x, t, ctx))


def test_longlive_lora_merge_equals_base_plus_lora(tmp_path):
    base, decoy = random_lora_dit(0), random_lora_dit(1)
    save_training_dict(tmp_path / "longlive_base.pt", {"generator": base, "generator_ema": decoy})
    rank, alpha = 4, 8.0  # scale alpha / rank = 2 (LongLive's own: 256 / 256 = 1)
    pairs = save_lora(tmp_path / "lora.pt", base, rank)
    net = B.load_executor(str(tmp_path / "longlive_base.pt"), "tiny", key="generator", lora=str(tmp_path / "lora.pt"),
                          lora_rank=rank, lora_alpha=alpha)
    merged, own = net.state_dict(), base.state_dict()
    for name, (A, Bm) in pairs.items():  # float32 merge: tolerance 1e-6
        assert (merged[name + ".weight"] - (own[name + ".weight"] + alpha / rank * Bm @ A)).abs().max() < 1e-6
    assert all(torch.equal(merged[k], own[k]) for k in own if k[:-len(".weight")] not in pairs)  # the rest as is
    # the base model with the LoRA branch run explicitly beside each adapted Linear: y = W x + b + s B A x
    mods = dict(base.named_modules())
    for name, (A, Bm) in pairs.items():
        mods[name].register_forward_hook(lambda m, inp, out, A=A, Bm=Bm:
                                         out + alpha / rank * F.linear(F.linear(inp[0], A), Bm))
    x, t, ctx = dit_inputs()
    with torch.no_grad():
        y, ref = net(x, t, ctx), base(x, t, ctx)
    assert (y - ref).abs().max() / ref.abs().max() < 1e-5  # float32, summation order differs


@pytest.mark.parametrize("break_it, match", [
    ("extra", r"LoRA key 'blocks\.5\.self_attn\.q' has no weight"),
    ("rank", r"LoRA key 'blocks\.0\.self_attn\.q' has rank 4, the config says lora_rank=8"),
    ("shape", r"LoRA key 'blocks\.0\.ffn\.0' is 128x64, the base weight is \(128, 32\)"),
    ("name", r"blocks\.0\.ffn\.0\.weight' is not a LoRA weight"),
])
def test_lora_that_does_not_fit_is_one_line(tmp_path, break_it, match):
    base = random_lora_dit(0)
    save_training_dict(tmp_path / "base.pt", {"generator": base})
    extra = {"extra": {"base_model.model.blocks.5.self_attn.q.lora_A.weight": torch.zeros(4, 64),
                       "base_model.model.blocks.5.self_attn.q.lora_B.weight": torch.zeros(64, 4)},
             "name": {"base_model.model.blocks.0.ffn.0.weight": torch.zeros(128, 64)}}.get(break_it)
    save_lora(tmp_path / "lora.pt", base, 4, extra=extra)
    if break_it == "shape":  # a base whose FFN input is narrower than the LoRA's
        sd = {f"model.{k}": v for k, v in base.state_dict().items()}
        sd["model.blocks.0.ffn.0.weight"] = sd["model.blocks.0.ffn.0.weight"][:, :32]
        torch.save({"generator": sd}, tmp_path / "base.pt")
    with pytest.raises(CheckpointError, match=match) as e:
        B.load_executor(str(tmp_path / "base.pt"), "tiny", key="generator", lora=str(tmp_path / "lora.pt"),
                        lora_rank=8 if break_it == "rank" else 4, lora_alpha=4.0)
    assert "\n" not in str(e.value) and "lora.pt" in str(e.value)


# -----------------------------------------------------------------------------
# a whole backbone from a config's paths


@pytest.fixture
def tiny_backbone(tmp_path, monkeypatch):
    """A LongLive-layout download of tiny files, and a stand-in vae module (vae.py is tested elsewhere)."""
    (tmp_path / "wan").mkdir()
    base = random_lora_dit(0)
    save_training_dict(tmp_path / "longlive_base.pt", {"generator": base})
    save_lora(tmp_path / "lora.pt", base, 4)
    tiny_t5().save_pretrained(tmp_path / "wan" / "text_encoder")
    torch.save({"decoder.weight": torch.zeros(1)}, tmp_path / "wan" / "Wan2.1_VAE.pth")
    stub = types.ModuleType("vae")
    stub.load_vae = lambda path, device, dtype: ("vae", path, device, dtype)
    monkeypatch.setitem(sys.modules, "vae", stub)
    return {"backbone": "longlive", "executor_config": "tiny", "executor_ckpt": str(tmp_path / "longlive_base.pt"),
            "executor_key": "generator", "lora_ckpt": str(tmp_path / "lora.pt"), "lora_rank": 4, "lora_alpha": 4.0,
            "vae_ckpt": str(tmp_path / "wan" / "Wan2.1_VAE.pth"), "t5_ckpt": str(tmp_path / "wan" / "text_encoder"),
            "t5_tokenizer": tiny_tokenizer(tmp_path / "wan" / "umt5-xxl"), "sink_frames": 3, "window_frames": 3}


def test_load_backbone(tiny_backbone):
    parts = B.load_backbone(tiny_backbone, dtype=torch.float32)
    assert (parts["executor"].cfg.sink_frames, parts["executor"].cfg.window_frames) == (3, 3)  # config overrides
    assert parts["vae"] == ("vae", tiny_backbone["vae_ckpt"], "cpu", torch.float32)
    h = B.encode(parts["text_encoder"], parts["tokenizer"], ["a red circle"], text_len=8)  # (1, 8, 16)
    assert h.shape == (1, 8, 16) and h[0, 4:].abs().max() == 0


@pytest.mark.parametrize("key, value, match", [
    ("executor_ckpt", "nowhere/longlive_base.pt",
     r"executor checkpoint 'nowhere/longlive_base\.pt' not found \(expected LongLive's longlive_base\.pt; "
     r"set --executor_ckpt=\.\.\.\)"),
    ("lora_ckpt", "nowhere/lora.pt", r"LoRA checkpoint 'nowhere/lora\.pt' not found"),
    ("vae_ckpt", "<tmp>", r"VAE checkpoint '.*' is not a file \(expected Wan2\.1's Wan2\.1_VAE\.pth"),
    ("t5_ckpt", "<tmp>", r"text encoder '.*' is a folder without config\.json"),
    ("t5_tokenizer", "<tmp>/longlive_base.pt", r"tokenizer folder '.*longlive_base\.pt' is not a folder"),
    ("t5_tokenizer", "", r"tokenizer folder '' is not set"),
    ("backbone", "selfforcer", r"backbone 'selfforcer' is not one of"),
])
def test_bad_paths_are_one_line_naming_the_file(tiny_backbone, tmp_path, key, value, match):
    cfg = tiny_backbone | {key: value.replace("<tmp>", str(tmp_path))}
    with pytest.raises(CheckpointError, match="^config/longlive.py: " + match) as e:
        B.load_backbone(cfg, source="config/longlive.py")
    assert "\n" not in str(e.value)


def test_wrong_files_are_one_line(tiny_backbone, tmp_path):
    # a text encoder where the executor should be, and the executor where the text encoder should be
    torch.save(to_wan_names(tiny_t5().state_dict()), tmp_path / "t5.pth")
    for key, value, match in [
            ("executor_ckpt", str(tmp_path / "t5.pth"), r"t5\.pth does not fit the model: missing"),
            ("t5_ckpt", tiny_backbone["executor_ckpt"], r"longlive_base\.pt does not hold a state dict")]:
        with pytest.raises(CheckpointError, match=match) as e:
            B.load_backbone(tiny_backbone | {key: value, "lora_ckpt": ""}, dtype=torch.float32)
        assert "\n" not in str(e.value)


def test_old_format_and_truncated_files(tiny_backbone, tmp_path):
    lora = torch.load(tiny_backbone["lora_ckpt"])  # the pre-zip torch.save format cannot be memory-mapped
    torch.save(lora, tmp_path / "old_lora.pt", _use_new_zipfile_serialization=False)
    B.load_backbone(tiny_backbone | {"lora_ckpt": str(tmp_path / "old_lora.pt")}, dtype=torch.float32)
    (tmp_path / "cut.pt").write_bytes(open(tiny_backbone["executor_ckpt"], "rb").read()[:1000])
    with pytest.raises(CheckpointError, match=r"^cannot read executor checkpoint .*cut\.pt: ") as e:
        B.load_backbone(tiny_backbone | {"executor_ckpt": str(tmp_path / "cut.pt")})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["selfforcing", "longlive"])
def test_config_files(name):
    path = os.path.join(os.path.dirname(__file__), "config", f"{name}.py")
    cfg = {k: v for k, v in runpy.run_path(path).items() if not k.startswith("_")}
    assert cfg["backbone"] == name and cfg["executor_config"] in M.CONFIGS
    assert cfg["latent_frames"] % M.CONFIGS[cfg["executor_config"]].chunk_frames == 0
    assert cfg["height"] % 16 == 0 and cfg["width"] % 16 == 0  # VAE stride 8 times patch 2
    assert not any(os.path.isabs(v) for v in cfg.values() if isinstance(v, str))  # relative, as downloaded
    with pytest.raises(CheckpointError, match=f"^config/{name}.py: executor checkpoint '.*' not found"):
        B.check_paths(cfg, f"config/{name}.py")

# -----------------------------------------------------------------------------
# train.py at scale: the FSDP2 planner under gloo, the real-backbone path on tiny files written here


def _torchrun(*args, nproc=2):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_train_fsdp2_planner_two_processes_gloo(tmp_path):
    # the planner sharded with FSDP2 over two CPU ranks: one iteration, its full weights and AdamW state gathered
    # into one checkpoint; a second run resumes from it, each rank taking back its own shards
    out = str(tmp_path / "fsdp")
    r = _torchrun(*MICRO, f"--out_dir={out}", "--max_iters=1", "--planner_shard=always")
    assert r.returncode == 0, r.stderr[-1500:]
    sd = _load_state(out)
    base = P.Planner.from_pretrained(os.path.join(ROOT, "checkpoints", "world_planner"), FRAMES, device="cpu",
                                     dtype=torch.float32).model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd["planner"].items() if k in base} == {k: tuple(v.shape) for k, v in base.items()}
    assert any(not torch.equal(sd["planner"][k], base[k]) for k in base)  # the GSPO step moved the full weights
    r = _torchrun(*MICRO, f"--out_dir={out}", "--max_iters=2", "--planner_shard=always")
    assert r.returncode == 0 and "resumed from iteration 1" in r.stdout, r.stderr[-1500:]
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [x["iter"] for x in log] == [1, 2] and all(x["ranks"] == 2 for x in log)
    assert all(x["rank_weight_spread"] == 0.0 for x in log), log  # the replicated executor stays identical
    assert all(math.isfinite(x["p_loss"]) and math.isfinite(x["e_loss"]) and x["rollouts"] > 0 for x in log), log


def test_train_real_backbone_tiny(tmp_path, monkeypatch):
    """train.py on config/selfforcing.py with every file a real run reads, written here at tiny size: a
    Self-Forcing .pt (16 latent channels), a diffusers umT5 folder and tokenizer, a Wan VAE .pth, a Qwen3
    planner folder (also the plan-quality judge), a Qwen3-VL judge and a PickScore CLIP. One iteration."""
    import runpy
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, Qwen3VLForConditionalGeneration
    torch.manual_seed(0)
    exe = M.WanDiT(M.CONFIGS["tiny-wan"])
    with torch.no_grad():  # Wan zero-inits its output layer: randomise it so the rollout is not all zeros
        exe.head.head.weight.normal_(0, 0.02)
    torch.save({"generator_ema": {f"model.{k}": v for k, v in exe.state_dict().items()}}, tmp_path / "sf.pt")
    tiny_t5().save_pretrained(tmp_path / "text_encoder")
    torch.save(random_vae("tiny").state_dict(), tmp_path / "Wan2.1_VAE.pth")
    tok = _word_tokenizer(chat_template=_CHAT_TEMPLATE)
    P.tiny_qwen3(tok).save_pretrained(tmp_path / "planner")
    tok.save_pretrained(tmp_path / "planner")
    vlm, processor = _tiny_vlm()
    vlm.save_pretrained(tmp_path / "vlm")
    try:
        import torchvision  # noqa: F401  the real video processor: save it and load it as users do
        processor.save_pretrained(tmp_path / "vlm")
    except ImportError:  # stand-in for the processor only (see _TinyVideoProcessor); the weights load from the folder
        def from_pretrained(path, device="cuda", dtype=torch.bfloat16, **kw):
            return judges.VLMJudge(Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device),
                                   processor, **kw)
        monkeypatch.setattr(judges.VLMJudge, "from_pretrained", from_pretrained)
    ctok = _word_tokenizer(bos_eos=True)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(ctok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, eos_token_id=0, bos_token_id=10, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                           patch_size=8), projection_dim=16))
    clip.save_pretrained(tmp_path / "pickscore")
    CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  ctok).save_pretrained(tmp_path / "clip_processor")
    out = tmp_path / "out"
    argv = ["train.py", "config/selfforcing.py", "--device=cpu", "--executor_config=tiny-wan",
            f"--executor_ckpt={tmp_path / 'sf.pt'}", f"--t5_ckpt={tmp_path / 'text_encoder'}",
            f"--t5_tokenizer={tiny_tokenizer(tmp_path / 'umt5-xxl')}", f"--vae_ckpt={tmp_path / 'Wan2.1_VAE.pth'}",
            "--vae_config=tiny", "--height=32", "--width=32", "--latent_frames=6", f"--planner_path={tmp_path / 'planner'}",
            f"--judge_vlm={tmp_path / 'vlm'}", f"--pickscore={tmp_path / 'pickscore'}",
            f"--pickscore_processor={tmp_path / 'clip_processor'}", "--instructions=1", "--M=2", "--N=2", "--max_steps=2",
            "--num_minibatches=2", "--plan_tokens=8", "--stand_in_plans=True", "--rollout_rows=2", "--micro_batch=1",
            "--grad_ckpt=True", "--max_iters=1", f"--out_dir={out}"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(A, "BACKEND", "torch")  # the CPU product path
    runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 1 and log[0]["rollouts"] == 4, log  # 2 (stand-in) plans x 2 continuations
    rec = log[0]
    assert all(math.isfinite(rec[k]) for k in ("p_loss", "e_loss", "kl", "r_local", "r_aesthetic", "r_temporal")), rec
    assert rec["logp_rollout_gap"] < 1e-4, rec  # streamed sampler == the update's full forward (float32)
    assert 0.0 <= rec["r_aesthetic"] <= 1.0 and rec["t_decode"] > 0
    assert os.path.exists(out / "executor.safetensors") and os.path.exists(out / "planner" / "model.safetensors")
    net = M.from_pretrained(str(out / "executor.safetensors"))  # the exported executor loads back in our format
    assert net.cfg == M.CONFIGS["tiny-wan"]

# -----------------------------------------------------------------------------
# real backbones end to end: LongLive's re-cache against its own arithmetic, sample.py on tiny checkpoints


class LongLiveCache:
    """LongLive's KV-cache arithmetic, transcribed (NVlabs/LongLive at 2462895, the last Wan2.1 release:
    wan/modules/causal_model.py, CausalWanSelfAttention.forward with kv_cache and
    CausalWanModel._apply_cache_updates), behind model.KVCache's interface. All layers share the
    indices; `global_end` / `local_end` are its global_end_index / local_end_index, in tokens."""

    def __init__(self, cfg, batch, S, local_attn_size, sink_size, num_frames):
        self.S, self.sink_tokens = S, sink_size * S
        size = num_frames * S if local_attn_size == -1 else local_attn_size * S  # kv_cache_size
        self.max_attention_size = 10 ** 9 if local_attn_size == -1 else local_attn_size * S
        self.k = torch.zeros(cfg.num_layers, batch, size, cfg.num_heads, cfg.head_dim)
        self.v = torch.zeros_like(self.k)
        self.global_end = self.local_end = 0
        self.local_attn = local_attn_size != -1
        self.clear_cross()

    def clear_cross(self):
        self.cross = [None] * self.k.shape[0]

    def begin(self, start_frame, num_frames, S):
        current_start, num_new = start_frame * S, num_frames * S
        current_end = current_start + num_new
        size, sink = self.k.shape[2], self.sink_tokens
        self.is_recompute = current_end <= self.global_end and current_start > 0
        self.roll = self.local_attn and current_end > self.global_end and num_new + self.local_end > size
        if self.roll:
            self.evicted = num_new + self.local_end - size
            self.rolled = self.local_end - self.evicted - sink
            local_end = self.local_end + current_end - self.global_end - self.evicted
        else:
            local_end = self.local_end + current_end - self.global_end
        local_start = local_end - num_new
        self.write = (max(local_start, sink) if self.is_recompute else local_start, local_start, local_end)
        if sink > 0:  # attention reads the sink, then the newest keys up to local_end
            self.keys = (max(sink, local_end - (self.max_attention_size - sink)), local_end)
        else:
            self.keys = (max(0, local_end - self.max_attention_size), local_end)
        if not self.is_recompute:  # "do not roll back pointers during recomputation"
            self.global_end, self.local_end = current_end, local_end
        return (self.sink_tokens + self.keys[1] - self.keys[0]) - num_new  # queries are the newest keys

    def update(self, layer, k, v):
        K, V, sink = self.k[layer], self.v[layer], self.sink_tokens
        if self.roll:
            n, e = self.rolled, self.evicted
            K[:, sink:sink + n] = K[:, sink + e:sink + e + n].clone()
            V[:, sink:sink + n] = V[:, sink + e:sink + e + n].clone()
        write_start, local_start, local_end = self.write
        off = write_start - local_start
        K[:, write_start:local_end] = k[:, off:]
        V[:, write_start:local_end] = v[:, off:]
        a, b = self.keys
        if sink > 0:
            return torch.cat([K[:, :sink], K[:, a:b]], 1), torch.cat([V[:, :sink], V[:, a:b]], 1)
        return K[:, a:b], V[:, a:b]


def longlive_inference(net, prompts, switch_frame_indices, shape, seed, local_attn_size, sink_size):
    """LongLive's InteractiveCausalInferencePipeline.inference with _recache_after_switch (global_sink:
    true, context_noise 0), written over its cache arithmetic; the chunk sampler is ours (same noise)."""
    cfg, (B, nf, C, H, W) = net.cfg, shape
    S, c = (H // 2) * (W // 2), cfg.chunk_frames
    cache = LongLiveCache(cfg, B, S, local_attn_size, sink_size, nf)
    g = torch.Generator().manual_seed(seed)
    output = torch.zeros(shape)
    segment, switches = 0, list(switch_frame_indices) + [None]
    for current_start in range(0, nf, c):
        if switches[segment] is not None and current_start >= switches[segment]:
            segment += 1
            cache.clear_cross()
            n = current_start if local_attn_size == -1 else min(local_attn_size, current_start)
            frames = output[:, current_start - n:current_start]
            net(frames, torch.zeros(B, n), prompts[segment], cache=cache, start_frame=current_start - n, causal=False)
            cache.clear_cross()
        noise = torch.randn((B, c, C, H, W), generator=g)
        output[:, current_start:current_start + c] = M.sample_chunk(net, noise, prompts[segment], cache, current_start,
                                                                    M.few_step_sigmas(), g)
    return output


@pytest.mark.parametrize("sink, window, switches", [(3, 9, [9]), (3, 9, [15]), (3, 9, [6, 18]), (0, 0, [9])])
def test_recache_matches_longlive_arithmetic(sink, window, switches, monkeypatch):
    monkeypatch.setattr(A, "BACKEND", "torch")  # the kernel has its own tests; the interpreter is slow
    # our KVCache (sliding in place) + recache against LongLive's index arithmetic: a 21-frame video with
    # prompt switches before the cache is full (the sink re-run too), after it (sink kept), and twice;
    # (0, 0): a global cache, which LongLive re-runs whole (local_attn_size -1)
    cfg = M.ModelConfig(**{**M.asdict(M.CONFIGS["tiny"]), "sink_frames": sink, "window_frames": window})
    net = random_dit(cfg)
    prompts = [torch.randn(1, 5, cfg.text_dim, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    shape = (1, 21, cfg.in_dim, 4, 6)
    bounds = [0] + switches + [21]
    contexts = [prompts[i] for i in range(len(bounds) - 1) for _ in range(bounds[i], bounds[i + 1], 3)]
    with torch.no_grad():
        ours = torch.cat(list(M.stream(net, contexts, shape, generator=torch.Generator().manual_seed(7),
                                       switch_recache=True)), dim=1)
        ref = longlive_inference(net, prompts, switches, shape, 7, sink + window if window else -1, sink)
        plain = torch.cat(list(M.stream(net, contexts, shape, generator=torch.Generator().manual_seed(7))), dim=1)
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-5  # float32; only summation order differs
    assert (plain - ref).abs().max() / ref.abs().max() > 1e-3  # and the re-cache does change the video


TINY_WAN = M.ModelConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=16, text_len=8)
REAL = dict(height=32, width=48)  # -> 4x6 latents, 2x3 tokens a frame


@pytest.fixture
def real_files(tmp_path, monkeypatch):
    """A Self-Forcing and a LongLive download of tiny random files in the real formats, and the flags that
    point sample.py at them (a 16-channel DiT 'tiny-wan' for the tiny VAE, the tiny umT5's 16 dims)."""
    monkeypatch.setitem(M.CONFIGS, "tiny-wan", TINY_WAN)
    monkeypatch.setattr(A, "BACKEND", "torch")  # the CPU product path
    torch.manual_seed(0)
    nets = [random_dit(TINY_WAN, seed=i) for i in range(2)]
    save_training_dict(tmp_path / "self_forcing_dmd.pt", {"generator_ema": nets[0], "generator": nets[1]})
    save_training_dict(tmp_path / "longlive_base.pt", {"generator": nets[1]})
    save_lora(tmp_path / "lora.pt", nets[1], 4)
    torch.save(random_vae().state_dict(), tmp_path / "Wan2.1_VAE.pth")
    tiny_t5().save_pretrained(tmp_path / "text_encoder")
    flags = [f"--executor_config=tiny-wan", "--vae_config=tiny", f"--vae_ckpt={tmp_path / 'Wan2.1_VAE.pth'}",
             f"--t5_ckpt={tmp_path / 'text_encoder'}", f"--t5_tokenizer={tiny_tokenizer(tmp_path / 'umt5-xxl')}",
             f"--height={REAL['height']}", f"--width={REAL['width']}", "--device=cpu", f"--out={tmp_path / 'out'}"]
    return tmp_path, {"selfforcing": flags + [f"--executor_ckpt={tmp_path / 'self_forcing_dmd.pt'}"],
                      "longlive": flags + [f"--executor_ckpt={tmp_path / 'longlive_base.pt'}",
                                           f"--lora_ckpt={tmp_path / 'lora.pt'}", "--lora_rank=4", "--lora_alpha=4.0"]}


def run_sample(monkeypatch, *args):
    """sample.py's main() in a fresh namespace, as `python sample.py ARGS` runs it; returns what main returns."""
    monkeypatch.setattr(sys, "argv", ["sample.py", *args])
    return runpy.run_path(os.path.join(ROOT, "sample.py"), run_name="sample_under_test")["main"]()


@pytest.mark.parametrize("name", ["selfforcing", "longlive"])
def test_sample_real_backbone_end_to_end(real_files, monkeypatch, capsys, name):
    # config/<name>.py with tiny files: step prompts, streamed chunk by chunk, each chunk VAE-decoded as it comes
    tmp, flags = real_files
    nf, switch = (6, 3) if name == "selfforcing" else (9, 6)  # LongLive: a 3 + 3 frame cache, re-cache at frame 6
    steps = ["the red circle moves left", "the red circle turns blue"]
    extra = ["--sink_frames=3", "--window_frames=3"] if name == "longlive" else []
    video = run_sample(monkeypatch, f"config/{name}.py", *flags[name], *extra, f"--latent_frames={nf}",
                       "--prompt=a red circle moves left then turns blue", "--mode=steps",
                       f"--steps={' | '.join(steps)}", f"--switch={switch}")
    out = capsys.readouterr().out
    assert f"frames  0- {switch - 1}  {steps[0]}" in out and f"frames  {switch}- {nf - 1}  {steps[1]}" in out
    T = 1 + 4 * (nf - 1)
    assert video.shape == (T, REAL["height"], REAL["width"], 3) and video.dtype == np.uint8
    from PIL import Image
    with Image.open(tmp / "out" / "sample.webp") as anim:
        assert anim.n_frames == T and anim.size == (REAL["width"], REAL["height"])
        anim.seek(T - 1)
        anim.load()
        assert abs(anim.info["duration"] - 1000 / 16) <= 1  # 16 fps (whole milliseconds)
    assert Image.open(tmp / "out" / "sample.png").size[0] > REAL["width"] // 4 * 3
    # the same video made independently: the backbone's parts loaded directly, all latents first, then one decode
    import vae as V
    ckpt = flags[name][-1 if name == "selfforcing" else -4].split("=", 1)[1]
    kw = dict(lora=str(tmp / "lora.pt"), lora_rank=4, lora_alpha=4.0, sink_frames=3, window_frames=3) \
        if name == "longlive" else {}
    net = B.load_executor(ckpt, "tiny-wan", "generator" if name == "longlive" else "generator_ema", **kw)
    ctx = B.encode(B.load_t5(str(tmp / "text_encoder")), B.load_tokenizer(str(tmp / "umt5-xxl")), steps, text_len=8)
    contexts = [ctx[int(f >= switch):int(f >= switch) + 1] for f in range(0, nf, 3)]
    with torch.no_grad():
        latents = torch.cat(list(M.stream(net, contexts, (1, nf, 16, 4, 6), M.few_step_sigmas(),
                                          generator=torch.Generator().manual_seed(0),
                                          switch_recache=name == "longlive")), dim=1)
        ref = V.load_vae(str(tmp / "Wan2.1_VAE.pth"), cfg="tiny").decode(latents, chunk_frames=nf)[0]
    ref = ((ref + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    assert np.abs(video.astype(int) - ref.astype(int)).max() <= 1  # float32 both ways; uint8 rounding may differ


def test_sample_real_backbone_with_a_planner(real_files, monkeypatch, capsys):
    # --planner: a Hugging Face causal LM folder with a chat template (Qwen3-8B in real use; a random tiny one
    # here, whose plan is not valid, so the global prompt stands in, as on the world)
    tmp, flags = real_files
    tok = _word_tokenizer(chat_template=_CHAT_TEMPLATE)
    torch.manual_seed(0)
    P.tiny_qwen3(tok).save_pretrained(tmp / "qwen3")
    tok.save_pretrained(tmp / "qwen3")
    video = run_sample(monkeypatch, "config/selfforcing.py", *flags["selfforcing"], "--latent_frames=3",
                       "--prompt=a red circle moves left", f"--planner={tmp / 'qwen3'}", "--animation=gif")
    out = capsys.readouterr().out
    assert "the planner's plan is not valid" in out and "frames  0- 2  a red circle moves left" in out
    assert video.shape[0] == 9 and (tmp / "out" / "sample.gif").exists()


@pytest.mark.parametrize("args, words", [
    ([], "--mode=plan on a real backbone needs --planner="),
    (["--mode=global", "--executor_ckpt=nowhere/self_forcing_dmd.pt"],
     "config/selfforcing.py: executor checkpoint 'nowhere/self_forcing_dmd.pt' not found (expected Self-Forcing's"),
    (["--mode=global", "--latent_frames=4"], "--latent_frames must be a multiple of the chunk (3), got 4"),
    (["--mode=global", "--animation=mp4"], "unknown animation format 'mp4'"),
    (["--mode=steps", "--steps=a | b", "--switch=30"], "--switch needs 1 increasing frames in 1..20"),
])
def test_sample_real_backbone_bad_input_one_line(real_files, monkeypatch, capsys, args, words):
    _, flags = real_files
    with pytest.raises(SystemExit) as e:
        run_sample(monkeypatch, "config/selfforcing.py", *flags["selfforcing"], "--prompt=a red circle", *args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and err.strip().count("\n") == 0, err


def test_vae_channels_last_equals_default_layout():
    # the GPU decodes channels-last (NDHWC); the same arithmetic in either layout (float32, on the CPU here)
    vae = random_vae(seed=3)
    z = torch.randn(1, 6, 16, 3, 5)
    s1, s2 = vae.stream(), vae.stream()
    for c in z.split(3, dim=1):
        a = s1(c)
        zc = c.transpose(1, 2).contiguous(memory_format=torch.channels_last_3d)  # what StreamDecoder does on a GPU
        mean, std = vae.stats(zc)
        b = vae.decoder(vae.conv2(zc * std + mean), s2.cache).clamp(-1, 1).transpose(1, 2)
        assert rel_err(b, a) < 1e-5
