"""
The executor: a Wan2.1-style causal chunked video DiT, its streaming KV cache and its
few-step flow-matching sampler.

The same class serves the shapes world (tiny configs, trained by pretrain.py) and the real
Self-Forcing / LongLive checkpoints (`wan-1.3b`): the state-dict names and shapes are Wan's
own, so their files load unchanged. A video is made chunk by chunk (3 latent frames): each
chunk is denoised in a few steps while attending to the cached keys/values of the chunks
before it; training sees the whole clip at once under a block-causal mask, which gives the
same function (test_all.py checks that invariant).

Layout conventions: latents are (B, F, C, H, W); tokens are ordered (frame, row, column);
attention tensors are (B, L, H, D) as Wan keeps them in its cache.
"""

import functools
import json
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# a custom operator: torch.compile (pretrain.py --compile) fuses the float32 norms and modulations around
# it and calls the Triton kernel as it is, inside the compiled graph
from attention import attention, attention_mask, visible_pairs

# Switches for inference speed, flipped by bench.py --generate and sample.py (like attention.BACKEND):
SDPA = False      # attention through torch's scaled_dot_product_attention instead of our Triton kernel
COMPILE = False   # CUDA inference: the elementwise helpers marked @fusable run as torch.compile'd kernels

# -----------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    dim: int = 1536                  # hidden size
    ffn_dim: int = 8960              # feed-forward hidden size
    num_heads: int = 12              # head dim = dim // num_heads (128 for Wan)
    num_layers: int = 30
    freq_dim: int = 256              # sinusoidal timestep embedding size
    text_dim: int = 4096             # text encoder width (umT5-XXL)
    text_len: int = 512              # text tokens after zero padding
    in_dim: int = 16                 # latent channels in (VAE z_dim; 3 for the pixel-space world)
    out_dim: int = 16                # channels predicted
    patch_size: tuple = (1, 2, 2)    # (frames, rows, columns) per token; frames must be 1
    eps: float = 1e-6
    qk_norm: bool = True             # RMSNorm over all channels of q and k
    cross_attn_norm: bool = True     # affine LayerNorm before cross-attention
    chunk_frames: int = 3            # latent frames per autoregressive chunk
    sink_frames: int = 0             # LongLive: first frames attended forever (needs window_frames)
    window_frames: int = 0           # LongLive: most recent frames attended, current chunk included; 0 = all
    abs_pos: bool = False            # add a fixed sin-cos (frame, row, column) embedding to the tokens (not in Wan)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


CONFIGS = {
    # Wan2.1-T2V-1.3B as used by Self-Forcing: 1.42 B parameters, 825 tensors
    "wan-1.3b": ModelConfig(),
    # LongLive: the same weights attend to a 3-frame sink plus the 9 most recent frames
    "longlive-1.3b": ModelConfig(sink_frames=3, window_frames=9),
    # the shapes world's executor, in pixel space (64x64 RGB, 8x8 patches -> 64 tokens a frame)
    # abs_pos: RoPE alone tells a token only relative offsets, and a pure-noise first chunk gives it
    # nothing else to learn where "top left" is; a small model trained for minutes needs the hint
    "world": ModelConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=6, freq_dim=256,
                         text_dim=128, text_len=32, in_dim=3, out_dim=3, patch_size=(1, 8, 8), abs_pos=True),
    # for tests: 0.1 M parameters
    "tiny": ModelConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32,
                        text_dim=32, text_len=8, in_dim=4, out_dim=4),
    # for tests of the real-backbone path: Wan's 16 latent channels, a 16-wide text encoder
    "tiny-wan": ModelConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=16, text_len=8),
}


def config_from_dict(d: dict) -> ModelConfig:
    names = {f.name for f in fields(ModelConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown model config keys: {sorted(unknown)}")
    d = dict(d)
    if "patch_size" in d:
        d["patch_size"] = tuple(d["patch_size"])
    return ModelConfig(**d)


# -----------------------------------------------------------------------------
# embeddings


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's sinusoid: float64, [cos, sin] order, frequencies 10000^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.double().flatten()[:, None] * freqs  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()  # (N, dim)


def grid_angles(dims: list[int], grid: tuple, start_frame, device, theta: float) -> list[torch.Tensor]:
    """Angles pos * theta^(-2i/n) for tokens ordered (frame, row, column), one (L, n/2) tensor per axis,
    with n = dims[axis]. The frame index is absolute: start_frame + 0, 1, ..., or start_frame itself
    when it is a tensor of every frame's index (copies of a chunk share one chunk's indices)."""
    f, h, w = grid
    ar = functools.partial(torch.arange, dtype=torch.float64, device=device)
    frames = start_frame.to(device, torch.float64) if torch.is_tensor(start_frame) else ar(start_frame, start_frame + f)
    out = []
    for axis, (n, pos) in enumerate(zip(dims, (frames, ar(h), ar(w)))):
        inv = 1.0 / theta ** (ar(0, n, 2) / n)
        ang = torch.outer(pos, inv)  # (size, n/2)
        shape = [1, 1, 1, -1]
        shape[axis] = len(pos)
        out.append(ang.view(shape).expand(f, h, w, -1).flatten(0, 2))  # (L, n/2)
    return out


def rope_cos_sin(head_dim: int, grid: tuple, start_frame: int, device, theta: float = 10000.0):
    """Wan's 3D RoPE angles: the head dim is split into time / height / width parts (44 / 42 / 42
    for d = 128) and adjacent channel pairs rotate together. The absolute time index keeps cached
    keys at their positions. Returns cos, sin of shape (L, head_dim / 2), float32."""
    dims = [head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)]
    ang = torch.cat(grid_angles(dims, grid, start_frame, device, theta), dim=-1)  # (L, head_dim/2)
    return torch.cos(ang).float(), torch.sin(ang).float()


def sincos_positions(dim: int, grid: tuple, start_frame: int, device) -> torch.Tensor:
    """Fixed absolute (frame, row, column) embedding, (L, dim): [sin, cos] of each axis's angles,
    the three axes concatenated. No parameters, any grid size."""
    dims = [2 * (dim // 6), 2 * (dim // 6)]
    dims.append(dim - sum(dims))
    return torch.cat([t for a in grid_angles(dims, grid, start_frame, device, 100.0) for t in (a.sin(), a.cos())],
                     dim=-1).float()


@torch.compiler.disable  # computed eagerly: compiled, Inductor recomputed the float64 cos/sin in every kernel
def position_tables(cfg, grid: tuple, start_frame, device):  # that read them (15 ms a layer in a backward)
    """The absolute position embedding (L, dim), or None without abs_pos, and RoPE's cos, sin (L, head_dim / 2)."""
    pos = sincos_positions(cfg.dim, grid, start_frame, device) if cfg.abs_pos else None
    return pos, rope_cos_sin(cfg.head_dim, grid, start_frame, device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, L, H, D): rotate channel pairs (2i, 2i+1) as complex numbers, in float32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, D/2) each
    c, s = cos[:, None], sin[:, None]  # (L, 1, D/2)
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


# -----------------------------------------------------------------------------
# the elementwise parts of a block, in float32 as Wan computes them: in eager mode each is several full
# passes over a (tokens, 1536) tensor; compiled (COMPILE, CUDA inference), one kernel each


@contextmanager
def compiled(on: bool = True):
    """COMPILE set to `on` inside this block only, and restored after it, an error included."""
    global COMPILE
    was, COMPILE = COMPILE, on
    try:
        yield
    finally:
        COMPILE = was


def fusable(fn):
    """fn in eager mode, or, with COMPILE set, compiled by torch.compile for CUDA inference (no grad).
    Training, autograd and the CPU always take the eager path; the arithmetic is the same."""
    compiled = None

    @functools.wraps(fn)
    def call(*args):
        nonlocal compiled
        if COMPILE and args[0].is_cuda and not torch.is_grad_enabled():
            compiled = compiled or torch.compile(fn)
            return compiled(*args)
        return fn(*args)
    return call


def rms_norm(x, weight, eps: float):
    """Wan's RMSNorm: normalised in float32 whatever x's dtype; the result in x's dtype."""
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).type_as(x) * weight.to(x.dtype)


@fusable
def norm_rope(x, weight, eps: float, heads: int, cos=None, sin=None):
    """A q or k projection (B, L, C) -> RMSNorm (weight None: none) -> heads (B, L, H, D) -> RoPE (cos None: none)."""
    x = x if weight is None else rms_norm(x, weight, eps)
    x = x.unflatten(-1, (heads, -1))  # (B, L, H, D)
    return x if cos is None else apply_rope(x, cos, sin)


@fusable
def adaln(x, shift, scale, eps: float, dtype):
    """Wan's adaLN per latent frame: LayerNorm(x) * (1 + scale) + shift, every token of frame f using row f.
    x (B, L, C) float32; shift, scale (B, F, C) -> (B, L, C) in dtype."""
    nf = shift.shape[1]
    h = F.layer_norm(x.float(), x.shape[-1:], eps=eps).unflatten(1, (nf, -1))  # (B, F, L/F, C)
    return (h * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2).to(dtype)


@fusable
def gated_residual(x, h, gate):
    """x + gate * h per latent frame, in float32. x (B, L, C) float32, h (B, L, C), gate (B, F, C)."""
    nf = gate.shape[1]
    return x + (h.float().unflatten(1, (nf, -1)) * gate[:, :, None]).flatten(1, 2)


@fusable
def layer_norm(x, weight, bias, eps: float, dtype):
    """Affine LayerNorm in float32 (Wan's norm3), the result in dtype."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(dtype)


def attend(q, k, v, **mask):
    """Our Triton attention, or with SDPA set torch's scaled_dot_product_attention (given a boolean mask
    only where the mask hides something: streaming chunks and LongLive's re-cache need none)."""
    if not SDPA:
        return attention(q, k, v, **mask)
    Lq, Lk = q.shape[1], k.shape[1]
    m = None if visible_pairs(Lq, Lk, **mask) == Lq * Lk else attention_mask(Lq, Lk, **mask, device=q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m)
    return out.transpose(1, 2)  # (B, Lq, H, D)


# -----------------------------------------------------------------------------
# the transformer


class RMSNorm(nn.Module):
    """Wan's norm_q / norm_k parameters; computed by norm_rope together with the heads split and RoPE."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class LayerNorm(nn.Module):
    """Wan's float32 LayerNorms (norm1, norm2, head.norm: no parameters; norm3: affine); computed by adaln
    together with the modulation, or by layer_norm."""

    def __init__(self, dim: int, eps: float, affine: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None


class Attention(nn.Module):
    """Wan's self- or cross-attention: q, k, v, o projections with RMSNorm on q and k."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def heads(self, x):
        return x.unflatten(-1, (self.h, self.d))  # (B, L, C) -> (B, L, H, D)

    def qk(self, x, linear, norm, rope=(None, None)):
        """q or k: projection, RMSNorm, heads, RoPE (rope: cos, sin; none for cross-attention) -> (B, L, H, D)."""
        weight = norm.weight if isinstance(norm, RMSNorm) else None
        return norm_rope(linear(x), weight, getattr(norm, "eps", 0.0), self.h, *rope)

    def self_attn(self, x, rope, mask: dict, cache=None, layer: int = 0):
        q = self.qk(x, self.q, self.norm_q, rope)  # (B, L, H, D)
        k = self.qk(x, self.k, self.norm_k, rope)  # (B, L, H, D)
        v = self.heads(self.v(x))  # (B, L, H, D)
        if cache is not None:  # write this chunk in place, attend to everything the cache holds
            k, v = cache.update(layer, k, v)  # views (B, L_valid, H, D), no copies
        return self.o(attend(q, k, v, **mask).flatten(2))

    def cross_attn(self, x, context, cache=None, layer: int = 0):
        q = self.qk(x, self.q, self.norm_q)  # (B, L, H, D)
        kv = cache.cross[layer] if cache is not None else None
        if kv is None:  # keys/values of a prompt are computed once and reused by every chunk
            kv = (self.qk(context, self.k, self.norm_k), self.heads(self.v(context)))  # (B, [n,] Lt, H, D)
            if cache is not None:
                cache.cross[layer] = kv
        if kv[0].dim() == 5:  # one prompt per chunk (a plan's step prompts): chunks fold into the batch
            B, n = kv[0].shape[:2]
            out = attend(q.unflatten(1, (n, -1)).flatten(0, 1), kv[0].flatten(0, 1), kv[1].flatten(0, 1))
            return self.o(out.unflatten(0, (B, n)).flatten(1, 2).flatten(2))  # (B, L, C)
        return self.o(attend(q, *kv).flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, cfg.eps, affine=False)
        self.self_attn = Attention(cfg)
        self.norm3 = LayerNorm(cfg.dim, cfg.eps, affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(cfg)
        self.norm2 = LayerNorm(cfg.dim, cfg.eps, affine=False)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e, context, rope, mask, cache=None, layer=0):
        """x (B, L, C) float32 residual stream; e (B, F, 6, C) per-frame modulation; context (B, Lt, C)."""
        dt = self.modulation.dtype
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float()[:, None] + e).unbind(2)  # (B, F, C)
        h = self.self_attn.self_attn(adaln(x, shift1, scale1, self.norm1.eps, dt), rope, mask, cache, layer)
        x = gated_residual(x, h, gate1)
        n3 = self.norm3
        h = layer_norm(x, n3.weight, n3.bias, n3.eps, dt) if isinstance(n3, LayerNorm) else x.to(dt)
        x = x + self.cross_attn.cross_attn(h, context, cache, layer)  # float32 + dt -> float32
        return gated_residual(x, self.ffn(adaln(x, shift2, scale2, self.norm2.eps, dt)), gate2)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e):
        """x (B, L, C); e (B, F, C) the time embedding before projection -> (B, L, prod(patch) * out_dim)."""
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)  # (B, F, C)
        return self.head(adaln(x, shift, scale, self.norm.eps, self.head.weight.dtype))


class WanDiT(nn.Module):
    """Wan2.1 DiT with per-latent-frame timesteps and block-causal attention over chunks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.patch_size[0] == 1, "per-frame timesteps need one latent frame per token"
        assert cfg.window_frames == 0 or (cfg.sink_frames % cfg.chunk_frames == 0 and
                                          cfg.window_frames % cfg.chunk_frames == 0), "sink/window in whole chunks"
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        # Wan's init: xavier linears, zero biases, small normal embeddings, a zero output layer
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in list(self.text_embedding) + list(self.time_embedding):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """([B, n,] Lt, text_dim) text-encoder states -> (..., text_len, dim); zero-padded like Wan, no mask."""
        pad = self.cfg.text_len - context.shape[-2]
        assert pad >= 0, f"context has {context.shape[-2]} tokens, more than text_len {self.cfg.text_len}"
        context = F.pad(context, (0, 0, 0, pad))
        return self.text_embedding(context.to(self.patch_embedding.weight.dtype))

    def forward(self, x, t, context, cache=None, start_frame: int = 0, text_embedded: bool = False,
                causal: bool = True, copies: int = 0):
        """Flow prediction v = noise - x0.

        x (B, F, C, H, W) latents, t (B, F) timesteps in [0, 1000] (one per latent frame), context the
        text encoder's states (B, Lt, text_dim), or one prompt per chunk of x (B, F / chunk, Lt, text_dim)
        (a plan's step prompts), or embed_text's output with text_embedded=True.
        Without a cache: the whole clip under a block-causal mask (training; teacher forcing is
        t = 0 on the context frames). With a cache: x is the chunk(s) starting at start_frame; its
        queries attend to the cached frames plus themselves, and its keys/values are written to the cache.
        causal=False: every query sees every key (the cache's, with a cache), as LongLive's re-cache runs.
        copies=K (no cache, no window): x is clean context frames followed by K versions of the next chunk
        (an RL update's K noise levels of one transition chunk). Each version sits at that chunk's frame
        indices and sees the context and itself only (the mask's sink = the context, window = one chunk),
        so its v is that of a separate forward of context + version, with the context computed once.
        """
        cfg, dt = self.cfg, self.patch_embedding.weight.dtype
        B, nf = x.shape[:2]
        h = self.patch_embedding(x.transpose(1, 2).to(dt))  # (B, dim, F, H/p, W/p)
        grid = tuple(h.shape[2:])
        S = grid[1] * grid[2]  # tokens per latent frame
        h = h.flatten(2).transpose(1, 2).float()  # (B, L, dim) residual stream kept in float32
        C = cfg.chunk_frames
        if copies:
            n_ctx = nf - copies * C  # context frames
            assert cache is None and causal and cfg.window_frames == 0 and n_ctx >= 0 and n_ctx % C == 0, \
                "copies: context chunks then whole copies of one chunk, block-causal without a window"
            ar = functools.partial(torch.arange, device=x.device)
            start_frame = torch.cat([ar(n_ctx), n_ctx + ar(C).repeat(copies)]) + start_frame  # (F,) frame indices
        pos, rope = position_tables(cfg, grid, start_frame, x.device)
        if pos is not None:
            h = h + pos

        e = self.time_embedding(timestep_embedding(t, cfg.freq_dim).to(dt)).float()  # (B*F, dim)
        e0 = self.time_projection(e.to(dt)).float().unflatten(1, (6, cfg.dim)).unflatten(0, (B, nf))  # (B, F, 6, dim)
        e = e.unflatten(0, (B, nf))  # (B, F, dim)

        if cache is not None and cache.cross[0] is not None:
            ctx = None  # every layer has the prompt's keys/values already
        else:
            ctx = context if text_embedded else self.embed_text(context)  # (B, text_len, dim)
        if copies:
            mask = dict(chunk=C * S, sink=n_ctx * S, window=C * S)
        elif cache is None:
            mask = dict(chunk=C * S, sink=cfg.sink_frames * S, window=cfg.window_frames * S)
        else:
            q_offset = cache.begin(start_frame, nf, S)
            mask = dict(q_offset=q_offset, chunk=C * S)
        if not causal:
            mask = {}
        for i, block in enumerate(self.blocks):
            h = block(h, e0, ctx, rope, mask, cache, i)
        out = self.head(h, e).float()  # (B, L, p*q*r*out_dim)

        # unpatchify: tokens (f, h, w), channels (p, q, r, c) with c fastest
        p, q, r = cfg.patch_size
        out = out.view(B, nf, grid[1], grid[2], p, q, r, cfg.out_dim)
        out = out.permute(0, 1, 4, 7, 2, 5, 3, 6)  # (B, f, p, c, h, q, w, r)
        return out.reshape(B, nf * p, cfg.out_dim, grid[1] * q, grid[2] * r)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def checkpointed(fwd, *args, **kwargs):
    """A block's forward whose activations are recomputed in the backward instead of kept."""
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fwd, *args, use_reentrant=False, **kwargs)
    return fwd(*args, **kwargs)


def recompute_blocks(model: WanDiT):
    """Training memory for one block's activations at a time instead of all of them (train.py --grad_ckpt)."""
    for block in model.blocks:
        block.forward = functools.partial(checkpointed, block.forward)


def forward_copies(model: WanDiT, context, versions, t, prompts) -> torch.Tensor:
    """v of K versions of the chunk that follows `context`, each as if alone after the context, in one
    forward (copies=K): an RL update re-scoring the K noise levels of one chunk runs the context once.
    context (B, f, C, H, W) clean frames (t = 0); versions (B, K, chunk, C, H, W) at timesteps t (K,);
    prompts (B, f / chunk + 1, Lt, text_dim): one per context chunk, then the versions' -> (B, K, chunk, C, H, W)."""
    B, f = context.shape[:2]
    K, c = versions.shape[1:3]
    x = torch.cat([context, versions.flatten(1, 2)], 1)                                   # (B, f + K c, C, H, W)
    t = torch.cat([torch.zeros(B, f, device=x.device), t.repeat_interleave(c).expand(B, -1)], 1)  # (B, f + K c)
    prompts = torch.cat([prompts[:, :-1], prompts[:, -1:].expand(-1, K, -1, -1)], 1)    # (B, f / c + K, Lt, D)
    return model(x, t, prompts, copies=K)[:, f:].unflatten(1, (K, c))


# -----------------------------------------------------------------------------
# streaming KV cache


class KVCache:
    """Preallocated per-layer self-attention keys (after RoPE) and values, written in place.

    Frames are kept in temporal order: [sink frames | the most recent frames]. A global cache
    (window_frames = 0, Self-Forcing) holds the whole video. LongLive's cache holds the sink plus
    `window_frames` recent frames (the current chunk included); when a new chunk would not fit,
    the window part slides left in place by one chunk. That copy moves (window - chunk) frames
    per layer, about 1 ms per chunk at Wan size on an H100, next to ~50 ms of compute, and it keeps
    keys in temporal order, so attention reads one contiguous view and a re-cache is a plain
    block-causal prefill. Cross-attention keys/values are cached per prompt in `cross`.
    """

    def __init__(self, cfg: ModelConfig, batch: int, frame_tokens: int, num_frames: int, device=None, dtype=None):
        self.chunk, self.sink, self.window = cfg.chunk_frames, cfg.sink_frames, cfg.window_frames
        self.S = frame_tokens
        capacity = self.sink + self.window if self.window else num_frames
        shape = (cfg.num_layers, batch, capacity * frame_tokens, cfg.num_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.reset()

    def reset(self):
        self.first = self.sink  # absolute index of the oldest frame in the window part
        self.end = 0            # absolute index one past the newest frame held
        self.start = self.valid = 0
        self.clear_cross()

    def clear_cross(self):
        self.cross = [None] * self.k.shape[0]

    def slot(self, frame: int) -> int:
        return frame if frame < self.sink or not self.window else self.sink + frame - self.first

    def begin(self, start_frame: int, num_frames: int, frame_tokens: int) -> int:
        """Make room for frames [start_frame, start_frame + num_frames); returns their first token slot."""
        end = start_frame + num_frames
        assert frame_tokens == self.S, "frame size changed within one video"
        assert start_frame <= self.end <= end, "chunks go in order; a re-run must reach the newest frame"
        if self.window:
            assert start_frame < self.sink or start_frame >= max(self.first, end - self.window), "frames no longer cached"
            first = max(self.sink, end - self.window)
            if first > self.first:  # slide the window part left by (first - self.first) frames
                a, b = (self.sink + first - self.first) * self.S, (self.sink + self.end - self.first) * self.S
                n = self.sink * self.S
                if b > a:
                    self.k[:, :, n:n + b - a] = self.k[:, :, a:b].clone()
                    self.v[:, :, n:n + b - a] = self.v[:, :, a:b].clone()
                self.first = first
        self.end = end
        self.start = self.slot(start_frame) * self.S
        self.valid = (self.slot(end - 1) + 1) * self.S
        assert self.valid <= self.k.shape[2], "cache is full: allocate it for more frames"
        return self.start

    def update(self, layer: int, k, v):
        """Write a chunk's keys/values (B, L, H, D) at the slots begin() chose; return all valid ones."""
        self.k[layer, :, self.start:self.start + k.shape[1]] = k
        self.v[layer, :, self.start:self.start + v.shape[1]] = v
        return self.k[layer, :, :self.valid], self.v[layer, :, :self.valid]


@torch.no_grad()
def recache(model: WanDiT, cache: KVCache, latents: torch.Tensor, context: torch.Tensor, num_frames: int = 0):
    """LongLive's KV re-cache at a prompt switch (its `_recache_after_switch` in
    pipeline/interactive_causal_inference.py, with `global_sink` as its released config sets it).

    The cross-attention keys/values go, then the last min(num_frames, frames so far) clean latent
    frames run again at t = 0 with the new prompt, which rewrites their self-attention keys/values.
    num_frames defaults to what the cache holds (LongLive: local_attn_size = sink + window = 12; a
    global cache: every frame). As in LongLive, whose cached attention takes no mask, every re-run
    query sees every key the cache holds (the sink, the window, all re-run frames), not only the
    earlier ones. The sink slots keep the first prompt's keys unless the re-run starts at frame 0
    (LongLive treats a re-run from frame 0 as a fresh prefill and rewrites them); re-run frames that
    fall outside the window (LongLive computes them and discards their keys) are skipped.
    latents (B, F, C, H, W): every clean frame generated so far.
    """
    cache.clear_cross()
    end = latents.shape[1]
    capacity = cache.sink + cache.window if cache.window else end
    start = max(0, end - min(num_frames or capacity, capacity))
    if start > 0 and cache.window:
        start = max(start, cache.first)  # the sink's slots are protected; frames that left the window are gone
    if start >= end:
        return
    x = latents[:, start:end]
    model(x, torch.zeros(x.shape[:2], device=x.device), context, cache=cache, start_frame=start, causal=False)


# -----------------------------------------------------------------------------
# flow matching: schedule, few-step sampler, stochastic steps with log-probabilities


def shifted_sigmas(shift: float = 5.0, n: int = 1000) -> torch.Tensor:
    """The shifted flow schedule: sigma = s*u / (1 + (s-1)*u), u = linspace(1, 0, n+1)[:-1]; t = 1000*sigma."""
    u = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
    return shift * u / (1 + (shift - 1) * u)


def few_step_sigmas(steps=(1000, 750, 500, 250), shift: float = 5.0) -> torch.Tensor:
    """Self-Forcing's 4 steps warped through the shifted schedule: about [1, 0.9375, 0.8333, 0.625]."""
    return shifted_sigmas(shift)[[1000 - s for s in steps]].float()


def ode_sigmas(steps: int = 10, shift: float = 3.0) -> torch.Tensor:
    """`steps` Euler steps through the shifted schedule, from sigma = 1 down to (not including) 0."""
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    return (shift * u / (1 + (shift - 1) * u)).float()


def chunk_noise_levels(B: int, chunks: int, shift: float = 3.0, clean_frac: float = 0.25, prefix_frac: float = 0.5,
                       device=None) -> torch.Tensor:
    """Diffusion forcing's training noise, one sigma per chunk: u ~ U(0, 1) warped by the shift; clean_frac of the
    chunks clean, and for prefix_frac of the clips a random number of first chunks clean too (teacher forcing, the
    context as the KV cache shows it at generation time). The defaults are pretrain.py's. -> (B, chunks)"""
    u = torch.rand(B, chunks, device=device)
    sigma = shift * u / (1 + (shift - 1) * u)
    prefix = torch.randint(0, chunks, (B, 1), device=device) * (torch.rand(B, 1, device=device) < prefix_frac)
    clean = (torch.rand(B, chunks, device=device) < clean_frac) | (torch.arange(chunks, device=device) < prefix)
    return torch.where(clean, torch.zeros_like(sigma), sigma)


def flow_matching_loss(net, x0, sigma, context, autocast=None, eps=None, per_row=False) -> torch.Tensor:
    """The executor's pre-training loss. x0 (B, T, c, h, w), sigma (B, chunks), context (B, chunks, L, D): one prompt
    per chunk. x_t = (1 - sigma) x0 + sigma eps, and the model predicts v = eps - x0; the mean squared error over
    the noisy frames (clean ones are context and carry no target). eps: the noise (drawn if None); per_row: each
    row's own mean (B,) instead of the batch's, as Diffusion-DPO compares rows."""
    sigma = sigma.repeat_interleave(net.cfg.chunk_frames, dim=1)  # (B, T): a compiled net passes .cfg through
    eps = torch.randn_like(x0) if eps is None else eps
    s = sigma[:, :, None, None, None]
    xt = (1 - s) * x0 + s * eps
    with autocast or nullcontext():
        v = net(xt, 1000 * sigma, context)  # (B, T, c, h, w)
    err = (v.float() - (eps - x0)).pow(2).mean(dim=(2, 3, 4))  # (B, T)
    noisy = (sigma > 0).float()
    if per_row:
        return (err * noisy).sum(1) / noisy.sum(1).clamp(min=1)  # (B,)
    return (err * noisy).sum() / noisy.sum().clamp(min=1)


def gaussian_logp(x, mean, std) -> torch.Tensor:
    """log N(x; mean, std^2), averaged over all non-batch dimensions (Flow-GRPO), in float32."""
    x, mean = x.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    lp = -((x - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)  # (B,)


def ode_step(x, v, sigma: float, sigma_next: float):
    """Euler step of dx/dsigma = v."""
    return x + (sigma_next - sigma) * v


def sde_step(x, v, sigma: float, sigma_next: float, noise_level: float = 0.7, noise=None, x_next=None):
    """Flow-GRPO's SDE step with the same marginals as the ODE. Returns (x_next, logp, mean, std).

    std_t = a * sqrt(sigma / (1 - sigma)) (the next sigma in the denominator at sigma = 1);
    mean = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt, dt = sigma_next - sigma < 0.
    Pass x_next to score a recorded transition instead of sampling one.
    """
    x, v = x.float(), v.float()
    dt = sigma_next - sigma
    std_t = noise_level * math.sqrt(sigma / (1 - (sigma_next if sigma >= 1 else sigma)))
    mean = x * (1 + std_t ** 2 / (2 * sigma) * dt) + v * (1 + std_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * math.sqrt(-dt)
    if x_next is None:
        x_next = mean + std * (torch.randn_like(mean) if noise is None else noise)
    return x_next, gaussian_logp(x_next, mean, std), mean, std


def renoise_step(x0, sigma_next: float, noise=None, x_next=None):
    """Self-Forcing's transition: re-noise the x0 prediction with fresh noise, x_next ~ N((1 - s') x0, s'^2).

    That Gaussian is the policy's step for Flow-GRPO on a few-step sampler. Returns (x_next, logp, mean, std).
    """
    mean = (1 - sigma_next) * x0.float()
    if x_next is None:
        x_next = mean + sigma_next * (torch.randn_like(mean) if noise is None else noise)
    return x_next, gaussian_logp(x_next, mean, sigma_next), mean, sigma_next


@torch.no_grad()
def sample_chunk(model: WanDiT, noise, context, cache: KVCache, start_frame: int, sigmas, generator=None,
                 sampler: str = "renoise"):
    """Denoise one chunk, then run its clean x0 once at t = 0 so the cache holds clean keys/values.

    sampler "renoise": Self-Forcing's few-step sampler for its distilled models (predict x0, re-noise
    with fresh noise, repeat). "ode": Euler steps sigmas[0] -> ... -> 0, what a model trained by plain
    flow matching (the world's executor) needs: its x0 prediction at high noise is a blurred mean.
    noise (B, c, C, H, W)."""
    x, B, nf = noise, noise.shape[0], noise.shape[1]
    for i, s in enumerate(sigmas.tolist()):
        v = model(x, torch.full((B, nf), 1000 * s, device=x.device), context, cache=cache, start_frame=start_frame)
        s_next = sigmas[i + 1].item() if i + 1 < len(sigmas) else 0.0
        if sampler == "ode":
            x = x0 = ode_step(x.float(), v.float(), s, s_next)  # (B, c, C, H, W)
            continue
        x0 = x.float() - s * v  # (B, c, C, H, W)
        if i + 1 < len(sigmas):
            eps = torch.randn(x0.shape, generator=generator, device=x0.device)
            x = renoise_step(x0, s_next, noise=eps)[0]
    model(x0, torch.zeros(B, nf, device=x.device), context, cache=cache, start_frame=start_frame)
    return x0


@torch.no_grad()
def stream(model: WanDiT, contexts: list, shape: tuple, sigmas=None, generator=None, switch_recache: bool = False,
           device=None, dtype=None, sampler: str = "renoise"):
    """Generate a video chunk by chunk, yielding each chunk's clean latents (B, c, C, H, W) as it is made.

    contexts: one text-encoder state tensor (B, Lt, text_dim) per chunk. Where it changes between
    chunks (a prompt switch, or a smoothed blend), the cross-attention cache is rebuilt, and with
    switch_recache LongLive's re-cache runs. shape: (B, F, C, H, W) of the whole video.
    """
    cfg = model.cfg
    sigmas = few_step_sigmas() if sigmas is None else sigmas
    B, nf, C, H, W = shape
    c = cfg.chunk_frames
    assert nf % c == 0 and len(contexts) == nf // c, "one context per chunk, whole chunks"
    S = (H // cfg.patch_size[1]) * (W // cfg.patch_size[2])
    cache = KVCache(cfg, B, S, nf, device=device, dtype=dtype or model.patch_embedding.weight.dtype)
    frames = []
    for j in range(nf // c):
        if j > 0 and contexts[j] is not contexts[j - 1] and not torch.equal(contexts[j], contexts[j - 1]):
            if switch_recache:
                recache(model, cache, torch.cat(frames, dim=1), contexts[j])
            else:
                cache.clear_cross()
        noise = torch.randn((B, c, C, H, W), generator=generator, device=device)
        x0 = sample_chunk(model, noise, contexts[j], cache, j * c, sigmas, generator, sampler)
        frames.append(x0)
        yield x0


# -----------------------------------------------------------------------------
# text encoder: umT5 (transformers' UMT5EncoderModel), tiny for the world, XXL for Wan


def tiny_text_encoder(vocab_size: int, d_model: int = 128, layers: int = 2, heads: int = 4, d_ff: int = 256):
    """A small UMT5 encoder with the world's vocabulary, trained jointly with the world's executor."""
    from transformers import UMT5Config, UMT5EncoderModel
    cfg = UMT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
                     num_heads=heads, relative_attention_num_buckets=16, relative_attention_max_distance=32,
                     dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, decoder_start_token_id=0)
    return UMT5EncoderModel(cfg)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor onto `device`; to a GPU through pinned memory without waiting (a plain copy from
    pageable memory waits for the GPU to finish all queued work first)."""
    if device is None or torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def encode_text(encoder, tokenizer, prompts: list[str], text_len: int, device=None) -> torch.Tensor:
    """prompts -> (B, text_len, d_model) states, zeros past each prompt's real length (Wan pads that way)."""
    tok = tokenizer(prompts, padding="max_length", truncation=True, max_length=text_len, return_tensors="pt")
    ids, mask = to_device(tok["input_ids"], device), to_device(tok["attention_mask"], device)
    h = encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, text_len, d_model)
    return h * mask[..., None].to(h.dtype)


# -----------------------------------------------------------------------------
# checkpoints


class CheckpointError(ValueError):
    pass


def read_state_dict(path: str) -> tuple[dict, dict]:
    """Weights from our safetensors files or Self-Forcing / LongLive .pt files; returns (state_dict, metadata)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        else:
            meta = {}
            sd = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("generator_ema", "generator", "model", "state_dict"):  # Self-Forcing: generator_ema
                if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                    sd = sd[key]
                    break
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or foreign file: say which, in one line
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    out = {}
    for k, v in sd.items():  # strip wrappers: FSDP, torch.compile, Self-Forcing's `model.` prefix
        k = k.replace("_fsdp_wrapped_module.", "").replace("_orig_mod.", "")
        out[k.removeprefix("model.")] = v
    return out, meta


def check_state_dict(model: nn.Module, sd: dict, name: str = "checkpoint"):
    """Raise one line naming missing and unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def few(xs):
            return ", ".join(xs[:4]) + (f", ... ({len(xs)} in all)" if len(xs) > 4 else "")
        parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                 f"shape mismatch {few(shapes)}" if shapes else ""]
        raise CheckpointError(f"{name} does not fit the model: " + "; ".join(p for p in parts if p))


def save_safetensors(tensors: dict, path: str, meta: dict | None = None):
    """Atomic safetensors write: a temp file, then a rename, so a kill never leaves half a file."""
    from safetensors.torch import save_file
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
    os.replace(tmp, path)


def save_state(obj: dict, path: str):
    """A training run's resumable state (weights, optimizers, step), written atomically like the weights."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_state(path: str, device) -> dict | None:
    """The state save_state wrote, None when there is none, CheckpointError (one line) when it is unreadable."""
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot resume from {path} ({type(e).__name__}); move it away to start afresh")


def save_pretrained(model: WanDiT, path: str, extra: dict | None = None, state_dict: dict | None = None):
    """Our checkpoint: the weights (or the given state dict, e.g. an EMA) with the config in the metadata."""
    meta = {"config": json.dumps(asdict(model.cfg))}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    save_safetensors(model.state_dict() if state_dict is None else state_dict, path, meta)


def from_pretrained(path: str, cfg: ModelConfig | str | None = None, device="cpu", dtype=None, **overrides) -> WanDiT:
    """Load our safetensors (config inside) or a Self-Forcing / LongLive .pt (pass cfg, e.g. 'wan-1.3b')."""
    sd, meta = read_state_dict(path)
    if cfg is None:
        if "config" not in meta:
            raise CheckpointError(f"{path} carries no config: pass one, e.g. cfg='wan-1.3b'")
        cfg = config_from_dict(json.loads(meta["config"]))
    elif isinstance(cfg, str):
        cfg = CONFIGS[cfg]
    if overrides:
        cfg = ModelConfig(**{**asdict(cfg), **overrides})
    with torch.device("meta"):
        model = WanDiT(cfg)
    check_state_dict(model, sd, path)
    model.load_state_dict(sd, assign=True)
    return model.to(device=device, dtype=dtype)
