"""
Loading real Self-Forcing / LongLive backbones from the files users already downloaded.

A backbone is four parts, each read from its own release format:
- the executor: Self-Forcing's `self_forcing_dmd.pt` or LongLive's `longlive_base.pt` (torch dicts
  whose generator entry holds the Wan2.1 DiT in Wan's own naming, which model.WanDiT keeps), plus,
  for LongLive, its peft LoRA `lora.pt`, merged into the weights here so no adapter code runs later;
- the umT5-XXL text encoder as transformers' UMT5EncoderModel, from Wan's
  `models_t5_umt5-xxl-enc-bf16.pth` (renamed through WAN_T5_NAMES) or a diffusers `text_encoder/`
  folder, with the `google/umt5-xxl` tokenizer;
- the Wan VAE (vae.py).
Every path is checked before anything loads; a wrong or missing file is one line naming it.
"""

import html
import os
import re

import torch

import model as M
from model import CheckpointError

# -----------------------------------------------------------------------------
# the umT5 text encoder


def load_pt(path: str, what: str):
    """torch.load of tensors only, memory-mapped where the file allows it: the entries a loader skips (a
    critic, an optimizer state) are never read, and ranks on one machine share the page cache."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # a pre-zip torch.save file
    except Exception as e:  # a truncated or foreign file: say which, in one line
        raise CheckpointError(f"cannot read {what} {path}: {type(e).__name__}: {first_line(e)}")


def umt5_config(**overrides):
    """umT5-XXL's encoder as Wan2.1 uses it: 5.68 B parameters, 24 layers of width 4096."""
    from transformers import UMT5Config
    cfg = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,  # Wan: 32 buckets, max_dist 128
               feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5Config(**{**cfg, **overrides})


# Wan's T5 names -> transformers' UMT5EncoderModel names; {i} is the block index. Like UMT5, Wan gives
# every layer its own relative-position table (shared_pos=False), so the tables map one to one.
WAN_T5_NAMES = {
    "token_embedding.weight": "shared.weight",
    "blocks.{i}.norm1.weight": "encoder.block.{i}.layer.0.layer_norm.weight",
    "blocks.{i}.attn.q.weight": "encoder.block.{i}.layer.0.SelfAttention.q.weight",
    "blocks.{i}.attn.k.weight": "encoder.block.{i}.layer.0.SelfAttention.k.weight",
    "blocks.{i}.attn.v.weight": "encoder.block.{i}.layer.0.SelfAttention.v.weight",
    "blocks.{i}.attn.o.weight": "encoder.block.{i}.layer.0.SelfAttention.o.weight",
    "blocks.{i}.pos_embedding.embedding.weight":
        "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
    "blocks.{i}.norm2.weight": "encoder.block.{i}.layer.1.layer_norm.weight",
    "blocks.{i}.ffn.gate.0.weight": "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "blocks.{i}.ffn.fc1.weight": "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight",     # the linear branch
    "blocks.{i}.ffn.fc2.weight": "encoder.block.{i}.layer.1.DenseReluDense.wo.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
T5_TIED = {"encoder.embed_tokens.weight": "shared.weight"}  # transformers keeps the embedding under both names


def wan_t5_to_transformers(sd: dict, path: str = "checkpoint") -> dict:
    """Rename a Wan T5 state dict through WAN_T5_NAMES; a key the table does not know is an error."""
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
        name = WAN_T5_NAMES.get(f"blocks.{{i}}.{m[2]}" if m else k)
        if name is None:
            raise CheckpointError(f"{path}: '{k}' is not a weight of Wan's umT5 encoder "
                                  f"(expected models_t5_umt5-xxl-enc-bf16.pth)")
        out[name.format(i=m[1] if m else "")] = v
    out.update({alias: out[src] for alias, src in T5_TIED.items() if src in out})
    return out


def load_t5(path: str, device="cpu", dtype=None, config=None):
    """UMT5EncoderModel from Wan's .pth (config: umt5_config() unless given) or a diffusers-layout folder."""
    from transformers import UMT5EncoderModel
    if os.path.isdir(path):  # config.json + safetensors, as the diffusers Wan2.1 release ships text_encoder/
        try:
            enc = UMT5EncoderModel.from_pretrained(path, torch_dtype=dtype)
        except Exception as e:  # transformers' messages run over many lines: keep the first
            raise CheckpointError(f"cannot load text encoder folder {path}: {type(e).__name__}: {first_line(e)}")
        return enc.to(device).eval()
    sd = load_pt(path, "text encoder")
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state dict (expected models_t5_umt5-xxl-enc-bf16.pth)")
    sd = wan_t5_to_transformers(sd, path)
    with torch.device("meta"):
        enc = UMT5EncoderModel(config or umt5_config())
    M.check_state_dict(enc, sd, path)
    enc.load_state_dict(sd, assign=True)
    enc.set_input_embeddings(enc.shared)  # assign=True gave the two names two Parameters: tie them again
    return enc.to(device=device, dtype=dtype).eval()


def load_tokenizer(folder: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise CheckpointError(f"cannot load tokenizer {folder}: {type(e).__name__}: {first_line(e)}")


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: HTML entities decoded (twice, as Wan does), whitespace collapsed.
    Wan also runs ftfy.fix_text, which only repairs mis-decoded unicode; it is left out as a dependency."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


@torch.no_grad()
def encode(text_encoder, tokenizer, prompts: list[str], text_len: int = 512, device=None) -> torch.Tensor:
    """prompts -> (B, text_len, d_model) umT5 states, zeros past each prompt's real length (Wan's padding)."""
    return M.encode_text(text_encoder, tokenizer, [clean_prompt(p) for p in prompts], text_len, device)


# -----------------------------------------------------------------------------
# the executor: Self-Forcing / LongLive checkpoints, LongLive's LoRA merged at load time


def read_generator(path: str, key: str) -> dict:
    """The DiT state dict in a Self-Forcing / LongLive training dict: entry `key` first (Self-Forcing's
    inference reads generator_ema, LongLive's reads generator), else another generator entry."""
    ckpt = load_pt(path, "executor checkpoint")
    for k in (key, "generator_ema", "generator", "model"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(k), dict):
            ckpt = ckpt[k]
            break
    if not isinstance(ckpt, dict) or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise CheckpointError(f"{path} holds no generator state dict (expected a Self-Forcing / LongLive .pt)")
    # strip wrappers: FSDP, torch.compile, and the `model.` of Self-Forcing's WanDiffusionWrapper
    return {k.replace("_fsdp_wrapped_module.", "").replace("_orig_mod.", "").removeprefix("model."): v
            for k, v in ckpt.items()}


# peft's names: base_model.model.<module>.lora_{A,B}[.default].weight
LORA_KEY = re.compile(r"(?:base_model\.model\.)?(?:model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight")


def read_lora(path: str) -> dict:
    """LongLive's lora.pt ({"generator_lora": peft state dict, ...} or the bare peft state dict)
    -> {module name: {"A": (r, in), "B": (out, r)}}."""
    ckpt = load_pt(path, "LoRA checkpoint")
    sd = ckpt.get("generator_lora", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{path} holds no LoRA state dict (expected LongLive's lora.pt)")
    pairs = {}
    for k, v in sd.items():
        m = LORA_KEY.fullmatch(k.replace("_fsdp_wrapped_module.", ""))
        if m is None or not torch.is_tensor(v):
            raise CheckpointError(f"{path}: '{k}' is not a LoRA weight (expected peft names such as "
                                  f"base_model.model.blocks.0.self_attn.q.lora_A.weight)")
        pairs.setdefault(m[1], {})[m[2]] = v
    return pairs


def merge_lora(sd: dict, pairs: dict, rank: int, alpha: float, path: str = "LoRA") -> dict:
    """W += (alpha / rank) B A on every adapted Linear: peft's merge, without peft. In place; returns sd."""
    for name, ab in pairs.items():
        w = sd.get(name + ".weight")
        if w is None:
            raise CheckpointError(f"{path}: LoRA key '{name}' has no weight '{name}.weight' in the base checkpoint")
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{path}: LoRA key '{name}' has lora_{''.join(ab)} but not both lora_A and lora_B")
        A, B = ab["A"], ab["B"]  # (r, in), (out, r)
        if A.shape[0] != rank or B.shape[1] != rank:
            raise CheckpointError(f"{path}: LoRA key '{name}' has rank {A.shape[0]}, the config says lora_rank={rank}")
        if (B.shape[0], A.shape[1]) != tuple(w.shape):
            raise CheckpointError(f"{path}: LoRA key '{name}' is {B.shape[0]}x{A.shape[1]}, "
                                  f"the base weight is {tuple(w.shape)}")
        sd[name + ".weight"] = (w.float() + (alpha / rank) * (B.float() @ A.float())).to(w.dtype)  # (out, in)
    return sd


def load_executor(path: str, cfg="wan-1.3b", key: str = "generator_ema", lora: str = "", lora_rank: int = 256,
                  lora_alpha: float = 256.0, device="cpu", dtype=None, **overrides) -> M.WanDiT:
    """The DiT from a Self-Forcing / LongLive checkpoint (cfg: a model.CONFIGS name), with the LoRA merged."""
    if isinstance(cfg, str) and cfg not in M.CONFIGS:
        raise CheckpointError(f"executor_config '{cfg}' is not one of model.CONFIGS {sorted(M.CONFIGS)}")
    sd = read_generator(path, key)
    if lora:
        merge_lora(sd, read_lora(lora), lora_rank, lora_alpha, lora)
    cfg = M.CONFIGS[cfg] if isinstance(cfg, str) else cfg
    if overrides:
        cfg = M.ModelConfig(**{**M.asdict(cfg), **overrides})
    with torch.device("meta"):
        net = M.WanDiT(cfg)
    M.check_state_dict(net, sd, path)
    net.load_state_dict(sd, assign=True)
    return net.to(device=device, dtype=dtype).eval()


# -----------------------------------------------------------------------------
# a whole backbone from a config's paths

# config key -> (what it is, what users downloaded); the executor depends on the backbone
EXECUTORS = {"selfforcing": "Self-Forcing's self_forcing_dmd.pt", "longlive": "LongLive's longlive_base.pt"}
PATHS = {
    "executor_ckpt": ("executor checkpoint", None),
    "lora_ckpt": ("LoRA checkpoint", "LongLive's lora.pt, or '' for none"),
    "vae_ckpt": ("VAE checkpoint", "Wan2.1's Wan2.1_VAE.pth"),
    "t5_ckpt": ("text encoder", "Wan2.1's models_t5_umt5-xxl-enc-bf16.pth or a diffusers text_encoder/ folder"),
    "t5_tokenizer": ("tokenizer folder", "the google/umt5-xxl/ folder inside Wan2.1-T2V-1.3B/"),
}


def check_paths(cfg: dict, source: str = "config"):
    """Every path of the backbone exists and is the right kind of thing, else one line naming it."""
    if cfg.get("backbone") not in EXECUTORS:
        raise CheckpointError(f"{source}: backbone '{cfg.get('backbone')}' is not one of {sorted(EXECUTORS)}")
    for key, (what, expected) in PATHS.items():
        path, expected = cfg.get(key, ""), expected or EXECUTORS[cfg["backbone"]]
        if key == "lora_ckpt" and not path:
            continue
        if not path:
            problem = "is not set"
        elif not os.path.exists(path):
            problem = "not found"
        elif key == "t5_tokenizer" and not os.path.isdir(path):
            problem = "is not a folder"
        elif key == "t5_tokenizer" and not any(os.path.exists(os.path.join(path, f)) for f in
                                               ("tokenizer.json", "spiece.model", "tokenizer_config.json")):
            problem = "holds no tokenizer files"
        elif key == "t5_ckpt" and os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
            problem = "is a folder without config.json"
        elif key not in ("t5_ckpt", "t5_tokenizer") and not os.path.isfile(path):
            problem = "is not a file"
        else:
            continue
        raise CheckpointError(f"{source}: {what} '{path}' {problem} (expected {expected}; set --{key}=...)")


def load_backbone(cfg: dict, device="cpu", dtype=torch.bfloat16, source: str = "config") -> dict:
    """Executor, text encoder, tokenizer and VAE from a config dict (see config/selfforcing.py)."""
    check_paths(cfg, source)
    overrides = {k: cfg[k] for k in ("sink_frames", "window_frames") if k in cfg}
    executor = load_executor(cfg["executor_ckpt"], cfg["executor_config"], cfg.get("executor_key", "generator_ema"),
                             cfg.get("lora_ckpt", ""), cfg.get("lora_rank", 256), cfg.get("lora_alpha", 256.0),
                             device, dtype, **overrides)
    import vae  # the VAE is only needed for real backbones
    return {"executor": executor, "text_encoder": load_t5(cfg["t5_ckpt"], device, dtype),
            "tokenizer": load_tokenizer(cfg["t5_tokenizer"]), "vae": vae.load_vae(cfg["vae_ckpt"], device, dtype)}


def first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:200]
