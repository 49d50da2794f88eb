"""
The Wan2.1 VAE: a causal 3D-convolution autoencoder between video in [-1, 1] and the
16-channel latents that the Self-Forcing / LongLive DiT denoises. Time is compressed 4x and
space 8x: a video of 1 + 4n frames at H x W <-> 1 + n latent frames at H/8 x W/8.

Only the real backbones need it (the shapes world runs in pixel space). The state-dict names
and shapes are Wan's own, so `Wan2.1_VAE.pth` loads unchanged under a strict check. Both
halves are built: the decoder turns the DiT's chunks into frames as they come, the encoder
turns clips into latents.

Streaming is exact because every 3D convolution is causal: it pads only in the past along
time, and keeps the last frames it saw (at most 2) as the past of its next call. So decoding
latents chunk by chunk gives the frames that decoding them all at once gives (test_vae.py
checks it). The first frame is special: it is coded alone (1 latent frame <-> 1 frame), and
each later latent frame carries 4 frames. Hence 21 latent frames -> 81 frames; a first chunk
of 3 latent frames -> 9 frames and every later chunk -> 12.

Layout: latents and videos outside are (B, F, C, H, W), frames before channels, as in
model.py; inside the network tensors are (B, C, T, H, W), the Conv3d layout.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import check_state_dict, read_state_dict

CHANNELS_LAST = True  # GPU decoding in NDHWC (bench.py --generate measures both layouts)

# -----------------------------------------------------------------------------
# config


@dataclass
class VAEConfig:
    z_dim: int = 16                          # latent channels (the DiT's in_dim); LATENT_MEAN/STD are per channel
    dim: int = 96                            # base width; stage widths are dim * dim_mult
    dim_mult: tuple = (1, 2, 4, 4)           # 4 stages: 3 spatial halvings -> 8x
    num_res_blocks: int = 2                  # residual blocks per encoder stage (the decoder has one more)
    temporal_down: tuple = (False, True, True)  # encoder stages that also halve time -> 4x (decoder: reversed)


VAE_CONFIGS = {
    # Wan2.1_VAE.pth: 126.9 M parameters (encoder 53.6 M, decoder 73.3 M), 194 tensors
    "wan2.1": VAEConfig(),
    # for tests: the same strides and layers, 0.22 M parameters
    "tiny": VAEConfig(dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
}

# per-channel statistics of Wan2.1 latents: the DiT sees (z - mean) / std
LATENT_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENT_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


# -----------------------------------------------------------------------------
# building blocks; `cache` is a dict that each module with a past keys by itself


class CausalConv3d(nn.Conv3d):
    """Conv3d that pads kernel_t - 1 frames in the past and none in the future (same padding
    in space). The past is zeros at the start of a video, then the previous call's last
    input frames, kept in `cache`: a stream of chunks sees what one long call would."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
        super().__init__(c_in, c_out, kernel, stride, padding=(0, kernel[1] // 2, kernel[2] // 2))

    def forward(self, x, cache: dict | None = None):  # (B, C, T, H, W) -> (B, C_out, T, H, W)
        past = self.kernel_size[0] - 1  # 2 for the 3-frame kernels, 0 for pointwise ones
        if past:
            prev = cache.get(self) if cache is not None else None
            if prev is None:  # the video's start, in x's memory layout (channels-last on the GPU)
                prev = x.new_zeros(x.shape[0], x.shape[1], past, *x.shape[3:]).contiguous(memory_format=layout(x))
            x = torch.cat([prev, x], dim=2)  # (B, C, past + T, H, W)
            if cache is not None:
                cache[self] = x[:, :, -past:].clone()  # a copy, so the chunk itself can be freed
        return super().forward(x)


def layout(x: torch.Tensor):
    """channels_last_3d for a video tensor stored channels-last (how the GPU path runs), else contiguous."""
    cl = x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return torch.channels_last_3d if cl else torch.contiguous_format


class RMSNorm(nn.Module):
    """Wan's norm: unit L2 norm over channels times sqrt(C), i.e. RMS normalisation at each
    position, then a per-channel gain. gamma is (C, 1, 1, 1) on videos, (C, 1, 1) on frames."""

    def __init__(self, dim: int, video: bool = True):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1) if video else torch.ones(dim, 1, 1))

    def forward(self, x):  # (B, C, ...)
        # x / max(|x|, 1e-12) * sqrt(C) is x / rms(x) but for the eps: one fused pass over channels-last memory
        # (Wan writes F.normalize, several passes). Returns channels-last whatever x's layout.
        return F.rms_norm(x.movedim(1, -1), x.shape[1:2], self.gamma.flatten(), 1e-12).movedim(-1, 1)


def apply(layer, x, cache):
    # causal convs and the blocks made of them carry a past; norms, activations, attention do not
    return layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, Resample)) else layer(x)


def per_frame(fn, x):
    """Run a 2D module on every frame: (B, C, T, H, W) -> (B, C', T, H', W')."""
    B, T = x.shape[0], x.shape[2]
    y = fn(x.transpose(1, 2).flatten(0, 1))  # (B*T, C', H', W')
    return y.unflatten(0, (B, T)).transpose(1, 2)


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        # index 5 is a parameterless slot (Wan's dropout, 0 at inference) so that names match
        self.residual = nn.Sequential(RMSNorm(c_in), nn.SiLU(), CausalConv3d(c_in, c_out, 3),
                                      RMSNorm(c_out), nn.SiLU(), nn.Identity(), CausalConv3d(c_out, c_out, 3))
        self.shortcut = CausalConv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, cache):  # (B, C_in, T, H, W) -> (B, C_out, T, H, W)
        h = x
        for layer in self.residual:
            h = apply(layer, h, cache)
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the positions of each frame (none across time, so it
    needs no cache). Only in the lowest-resolution middle of the encoder and decoder."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def attend(self, x):  # (N, C, H, W) frames
        H, W = x.shape[2:]
        q, k, v = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # (N, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v)  # (N, HW, C)
        return self.proj(h.transpose(1, 2).unflatten(2, (H, W)))  # (N, C, H, W)

    def forward(self, x):  # (B, C, T, H, W)
        return x + per_frame(self.attend, x)


class Resample(nn.Module):
    """Space x2 (nearest + conv, halving the channels) or /2 (strided conv), and with
    temporal=True time x2 / 2 as well. The first frame of a video is never resampled in
    time: that is what makes 1 + 4n frames <-> 1 + n latent frames."""

    def __init__(self, dim: int, up: bool, temporal: bool):
        super().__init__()
        self.up, self.temporal = up, temporal
        if up:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
            if temporal:  # each frame's channels become 2 frames; causal, like every conv in time
                self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1))
        else:
            # pad right/bottom only: a 3x3 stride-2 conv then maps H to H // 2, odd sizes included
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if temporal:  # frames (0, 1, 2), (2, 3, 4), ...: no padding, the first frame passes alone
                self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x, cache: dict):  # (B, C, T, H, W)
        if self.up and self.temporal:
            if self not in cache:  # the video's first frame: kept as one frame
                cache[self] = True
                first, x = x[:, :, :1], x[:, :, 1:]
            else:
                first = x[:, :, :0]
            if x.shape[2]:  # the later frames see zeros, not the first frame, as their start
                C = x.shape[1]
                y = self.time_conv(x, cache)  # (B, 2C, T, H, W)
                x = y.unflatten(1, (2, C)).permute(0, 2, 3, 1, 4, 5).flatten(2, 3)  # (B, C, 2T, H, W)
            x = torch.cat([first, x], dim=2)  # (B, C, T', H, W)
        x = per_frame(self.resample, x)  # (B, C', T', H*2 or H/2, W*2 or W/2)
        if not self.up and self.temporal:
            prev = cache.get(self)  # the last frame of the previous call, else the video starts here
            out = [x[:, :, :1]] if prev is None else []
            seq = x if prev is None else torch.cat([prev, x], dim=2)  # (B, C, 1 + T, H, W)
            cache[self] = x[:, :, -1:].clone()
            if seq.shape[2] >= 3:
                out.append(self.time_conv(seq))  # (B, C, (len - 1) // 2, H, W)
            x = torch.cat(out, dim=2)
        return x


# -----------------------------------------------------------------------------
# encoder, decoder, the VAE


def middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def head(dim: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, c_out, 3))


class Encoder(nn.Module):
    """(B, 3, T, H, W) -> (B, 2 z_dim, 1 + (T - 1) // 4, H // 8, W // 8): posterior mean and log-variance."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv1 = CausalConv3d(3, cfg.dim, 3)
        blocks, c = [], cfg.dim
        for i, m in enumerate(cfg.dim_mult):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(c, cfg.dim * m))
                c = cfg.dim * m
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Resample(c, up=False, temporal=cfg.temporal_down[i]))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = middle(c)
        self.head = head(c, 2 * cfg.z_dim)

    def forward(self, x, cache: dict):
        x = self.conv1(x, cache)
        for layer in [*self.downsamples, *self.middle, *self.head]:
            x = apply(layer, x, cache)
        return x


class Decoder(nn.Module):
    """(B, z_dim, F, h, w) -> (B, 3, T, 8h, 8w); T = 1 + 4(F - 1) on a video's first call, 4F after."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c = cfg.dim * cfg.dim_mult[-1]
        self.conv1 = CausalConv3d(cfg.z_dim, c, 3)
        self.middle = middle(c)
        blocks, temporal_up = [], cfg.temporal_down[::-1]
        for i, m in enumerate(cfg.dim_mult[::-1]):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(c, cfg.dim * m))
                c = cfg.dim * m
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Resample(c, up=True, temporal=temporal_up[i]))
                c //= 2  # the upsampling conv halves the channels
        self.upsamples = nn.Sequential(*blocks)
        self.head = head(c, 3)

    def forward(self, x, cache: dict):
        x = self.conv1(x, cache)
        for layer in [*self.middle, *self.upsamples, *self.head]:
            x = apply(layer, x, cache)
        return x


class WanVAE(nn.Module):
    """Encoder and decoder with the pointwise convs between them and the latents; the DiT sees
    normalised latents (z - LATENT_MEAN) / LATENT_STD in its (B, F, C, h, w) layout."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        assert cfg.z_dim == len(LATENT_MEAN), "the latent statistics are Wan's 16 channels"
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)  # after the encoder
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)  # before the decoder
        self.decoder = Decoder(cfg)

    def stats(self, x):
        mean = torch.tensor(LATENT_MEAN, device=x.device, dtype=x.dtype)
        std = torch.tensor(LATENT_STD, device=x.device, dtype=x.dtype)
        return mean[:, None, None, None], std[:, None, None, None]  # (C, 1, 1, 1)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, 1 + 4n, 3, H, W) in [-1, 1] -> normalised latents (B, 1 + n, 16, H // 8, W // 8),
        the posterior mean. The first frame goes alone, then 4 frames at a time (memory stays bounded)."""
        T = video.shape[1]
        if (T - 1) % 4:
            raise ValueError(f"the Wan VAE encodes 1 + 4n frames, got {T}")
        x = video.transpose(1, 2).to(self.conv1.weight.dtype)  # (B, 3, T, H, W)
        cache, starts = {}, [0, *range(1, T, 4)]  # one latent frame per call
        h = torch.cat([self.encoder(x[:, :, i:i + (4 if i else 1)], cache) for i in starts], dim=2)  # (B, 2z, 1+n, h, w)
        mu = self.conv1(h)[:, :self.cfg.z_dim]  # the log-variance half is not needed for the mean
        mean, std = self.stats(mu)
        return ((mu - mean) / std).transpose(1, 2)  # (B, 1 + n, z_dim, h, w)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def decode(self, latents: torch.Tensor, chunk_frames: int = 1) -> torch.Tensor:
        """Normalised latents (B, F, 16, h, w) -> video (B, 1 + 4(F - 1), 3, 8h, 8w) in [-1, 1].
        Streams chunk_frames latent frames at a time (1, as Wan does, bounds memory; the result
        does not depend on it)."""
        stream = self.stream()
        return torch.cat([stream(c) for c in latents.split(chunk_frames, dim=1)], dim=1)


class StreamDecoder:
    """Decodes one video's latents chunk by chunk as the DiT produces them; holds every causal
    conv's past between calls. A new video needs a new StreamDecoder. On the GPU activations are
    kept channels-last (NDHWC), the layout cuDNN's fast bf16 convolution kernels use."""

    def __init__(self, vae: WanVAE):
        self.vae, self.cache = vae, {}

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, f, 16, h, w) normalised latents -> (B, 4f frames, or 1 + 4(f - 1) on the first call, 3, 8h, 8w)."""
        vae = self.vae
        z = latents.transpose(1, 2).to(vae.conv2.weight.dtype)  # (B, 16, f, h, w)
        if z.is_cuda and CHANNELS_LAST:
            z = z.contiguous(memory_format=torch.channels_last_3d)
        mean, std = vae.stats(z)
        x = vae.decoder(vae.conv2(z * std + mean), self.cache)  # (B, 3, T, 8h, 8w)
        return x.clamp(-1, 1).transpose(1, 2)  # (B, T, 3, 8h, 8w)


# -----------------------------------------------------------------------------
# checkpoints


def load_vae(path: str, device="cpu", dtype=torch.float32, cfg: VAEConfig | str = "wan2.1") -> WanVAE:
    """Wan2.1_VAE.pth (a plain state dict) or a .safetensors file -> WanVAE in eval mode, frozen.
    Any problem is one CheckpointError line that names the file."""
    name = cfg if isinstance(cfg, str) else "custom"
    if isinstance(cfg, str):
        if cfg not in VAE_CONFIGS:
            raise ValueError(f"unknown VAE config '{cfg}': one of {sorted(VAE_CONFIGS)}")
        cfg = VAE_CONFIGS[cfg]
    sd, _ = read_state_dict(path)
    with torch.device("meta"):  # no memory for weights that are about to be replaced
        vae = WanVAE(cfg)
    check_state_dict(vae, sd, f"{path} (expected a Wan2.1 VAE state dict, config '{name}', "
                              f"{len(vae.state_dict())} tensors)")
    vae.load_state_dict(sd, assign=True)
    return channels_last(vae.to(device=device, dtype=dtype).eval().requires_grad_(False))


def channels_last(vae: WanVAE) -> WanVAE:
    """Convolution weights stored channels-last on the GPU, to match the activations there (with
    CHANNELS_LAST unset: back in the default layout)."""
    if next(vae.parameters()).is_cuda:
        for m in vae.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                fmt = (torch.channels_last_3d if m.weight.dim() == 5 else torch.channels_last) if CHANNELS_LAST \
                    else torch.contiguous_format
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)
    return vae

