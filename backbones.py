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


# -----------------------------------------------------------------------------
# full-size models with random weights: benchmarks and memory plans need no download
# (shapes from the public config.json files; the weights are random, so nothing they judge or plan means anything)

QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
QWEN3_VL_8B_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                          spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
                          num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])
QWEN3_VL_8B_TEXT = {**QWEN3_8B, "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                                    "mrope_interleaved": True}}
CLIP_VIT_H14 = dict(  # PickScore_v1 is a fine-tuned CLIP ViT-H/14 (laion2B)
    text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=1024)

# Qwen's chat format, enough of it for the planner and judges: role headers, the video placeholder, thinking off
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>", "<think>", "</think>"]


def random_tokenizer(vocab_size: int = 2000, clip: bool = False):
    """A byte-level BPE learnt from the project's own prompt texts (plan prompt, judge prompts, world sentences),
    with Qwen's special tokens and chat template: token counts near a real tokenizer's, any text encodable.
    clip=True: CLIP's framing instead (<|startoftext|> ... <|endoftext|>, pooled at the end token)."""
    import random as _random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    import planner
    import rewards
    import world
    rng = _random.Random(0)
    corpus = [planner.PLAN_PROMPT, rewards.PLAN_QUALITY_PROMPT, rewards.TEMPORAL_FOLLOWING_PROMPT,
              rewards.LOCAL_STEP_PROMPT] + [world.sample_instruction(rng, rng.randint(1, 4)) for _ in range(300)]
    corpus += [planner.format_plan(world.ground_truth_plan(world.sample_instruction(rng, 2))) for _ in range(100)]
    specials = ["<|startoftext|>"] + QWEN_SPECIALS if clip else QWEN_SPECIALS
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus * 3, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if clip:
        tk.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>",
            special_tokens=[(t, tk.token_to_id(t)) for t in ("<|startoftext|>", "<|endoftext|>")])
        return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   additional_special_tokens=QWEN_SPECIALS[1:], chat_template=QWEN_CHAT_TEMPLATE)


def qwen3_config(tokenizer, layers: int = 36):
    """Qwen3-8B's shape (8.19 B parameters at 36 layers), with this tokenizer's special ids."""
    from transformers import Qwen3Config
    return Qwen3Config(**{**QWEN3_8B, "num_hidden_layers": layers}, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None)


def qwen3_vl_processor(tokenizer):
    """Qwen3-VL's processor (16 px patches, 2x2 merge, frame pairs) around this tokenizer."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor
    return Qwen3VLProcessor(Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2), tokenizer,
                            Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2),
                            chat_template=QWEN_CHAT_TEMPLATE)


def qwen3_vl_config(tokenizer):
    """Qwen3-VL-8B's shape (8.77 B parameters), with this tokenizer's vision token ids."""
    from transformers import Qwen3VLConfig
    ids = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(f"<|{v}|>") for k, v in
           [("image", "image_pad"), ("video", "video_pad"), ("vision_start", "vision_start"), ("vision_end", "vision_end")]}
    return Qwen3VLConfig(text_config={**QWEN3_VL_8B_TEXT, "pad_token_id": tokenizer.pad_token_id},
                         vision_config=QWEN3_VL_8B_VISION, tie_word_embeddings=False, **ids)


def clip_processor(tokenizer):
    from transformers import CLIPImageProcessor, CLIPProcessor
    return CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}), tokenizer)


def clip_config(tokenizer):
    from transformers import CLIPConfig
    text = {**CLIP_VIT_H14["text_config"], "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    return CLIPConfig(**{**CLIP_VIT_H14, "text_config": text})


def build(cls, config, device, dtype):
    """A transformers model built straight on `device` (its random init runs there, not on the CPU); meta: no memory."""
    with torch.device(device):
        return cls._from_config(config, dtype=dtype)


@torch.no_grad()
def init_random_(model: torch.nn.Module, device, std: float = 0.02):
    """Memory on `device` and random weights for a model built on the meta device (or its FSDP2 shards):
    normal(0, std) matrices, zero biases, unit gains; buffers that are computed, not learnt (RoPE frequencies),
    computed again."""
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)
    for m in model.modules():
        if hasattr(m, "inv_freq") and hasattr(m, "config"):
            with torch.device(device):
                fresh = type(m)(m.config)
            for k in ("inv_freq", "original_inv_freq"):  # a buffer or a plain attribute, by version
                if isinstance(getattr(fresh, k, None), torch.Tensor):
                    setattr(m, k, getattr(fresh, k))
    return model


def random_backbone(executor_config: str, device, dtype=torch.bfloat16, vae_config: str = "wan2.1"):
    """Executor, umT5-XXL encoder (and a tokenizer), Wan VAE: full size, random, built on `device`."""
    from transformers import UMT5EncoderModel

    import vae as V
    with torch.device(device):
        executor = M.WanDiT(M.CONFIGS[executor_config]).to(dtype).eval()
        net = V.WanVAE(V.VAE_CONFIGS[vae_config]).to(dtype).eval().requires_grad_(False)
    return {"executor": executor, "text_encoder": build(UMT5EncoderModel, umt5_config(), device, dtype).eval(),
            "tokenizer": random_tokenizer(), "vae": net}


# -----------------------------------------------------------------------------
# the memory plan of one TempAct iteration at Wan scale, per GPU, from the models' shapes

GB = 1e9


def model_sizes(planner_layers: int = 36) -> dict:
    """Parameter counts of every model of the Wan-scale setup, counted on the meta device."""
    from transformers import CLIPModel, Qwen3ForCausalLM, Qwen3VLForConditionalGeneration, UMT5EncoderModel

    import vae as V
    tok = random_tokenizer(vocab_size=600)
    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        sizes = {"executor": count(M.WanDiT(M.CONFIGS["wan-1.3b"])), "vae": count(V.WanVAE(V.VAE_CONFIGS["wan2.1"]))}
    meta = lambda cls, cfg: count(build(cls, cfg, "meta", torch.bfloat16))
    sizes["planner"] = meta(Qwen3ForCausalLM, qwen3_config(tok, planner_layers))
    sizes["llm_judge"] = meta(Qwen3ForCausalLM, qwen3_config(tok))
    sizes["vlm_judge"] = meta(Qwen3VLForConditionalGeneration, qwen3_vl_config(tok))
    sizes["pickscore"] = meta(CLIPModel, clip_config(random_tokenizer(vocab_size=600, clip=True)))
    sizes["text_encoder"] = meta(UMT5EncoderModel, umt5_config())
    return sizes


def memory_plan(gpus: int, gpu_gb: float, sizes: dict, M_plans: int = 4, N_rows: int = 4, instructions: int = 1,
                rollout_rows: int = 2, latent_frames: int = 21, frame_tokens: int = 1560, plan_tokens: int = 256,
                prompt_tokens: int = 450, vlm_tokens: int = 6240, update_frames: int = 27, offload: bool = False,
                out=print) -> dict:
    """Bytes per GPU of one TempAct iteration at Wan scale: each model's parameters, gradients and AdamW
    states, the rollout's KV cache, the update's activations, and the peak of each phase. The executor is
    replicated (DDP-style) with float32 master weights, gradients and AdamW states; the planner is sharded
    with FSDP2 over `gpus` (float32 shards, bf16 compute); frozen models are bf16 replicas, on the GPU
    throughout, or (offload) only during their phase. update_frames: the update's longest forward, the
    context before the last transition chunk plus one copy of that chunk per policy step (train.py's
    transition_steps: 18 + 3 x 3 latent frames). Returns {phase: GB}."""
    cfg = M.CONFIGS["wan-1.3b"]
    Pe, Pp = sizes["executor"], sizes["planner"]
    L = latent_frames * frame_tokens                                   # tokens of a whole video: 32760
    Lu = update_frames * frame_tokens                                  # the update's longest forward: 42120
    rows = {  # name: (params, grads, optimizer, activations, kv cache) in bytes
        "executor (trained, replicated)": (4 * Pe, 4 * Pe, 8 * Pe, 0, 0),
        "reference executor (frozen)": (2 * Pe, 0, 0, 0, 0),
        f"planner (FSDP2 / {gpus})": (4 * Pp / gpus, 4 * Pp / gpus, 8 * Pp / gpus, 0, 0),
        "LLM judge (plan quality)": (2 * sizes["llm_judge"], 0, 0, 0, 0),
        "VLM judge": (2 * sizes["vlm_judge"], 0, 0, 0, 0),
        "PickScore": (2 * sizes["pickscore"], 0, 0, 0, 0),
        "umT5-XXL text encoder": (2 * sizes["text_encoder"], 0, 0, 0, 0),
        "Wan VAE": (2 * sizes["vae"], 0, 0, 0, 0),
    }
    # transient pieces, each alive in one phase only
    kv_rollout = rollout_rows * cfg.num_layers * L * 2 * cfg.dim * 2           # global cache, bf16 keys + values
    planner_full = 2 * Pp                                                    # the bf16 planner gathered for generation
    q = sizes.get("planner_kv_heads", 8) * 128
    kv_plan = instructions * M_plans * (prompt_tokens + plan_tokens) * 36 * 2 * q * 2
    # the update, one row at a time with per-block recomputation: the fp32 residual saved at every block,
    # plus one block's working set (bf16 q, k, v, o, attention, modulated inputs; fp32 norms; FFN hidden)
    act_update = cfg.num_layers * Lu * cfg.dim * 4 + Lu * (cfg.dim * 40 + cfg.ffn_dim * 4)
    logits = instructions * M_plans * (plan_tokens + 1) * 151936 * 4 * 3   # GSPO: fp32 logits, log-softmax, grad
    act_judge = vlm_tokens * 36 * 2 * q * 2 + vlm_tokens * 4096 * 2 * 8    # VLM: its KV cache and working set
    vae_decode = rollout_rows * 96 * 4 * 480 * 832 * 2 * 6                   # full-resolution 96-channel maps
    frozen_judges = ["LLM judge (plan quality)", "VLM judge", "PickScore"]
    total = lambda name: sum(rows[name])
    always = [n for n in rows if not offload or (n not in frozen_judges and not n.startswith("umT5"))]
    base = sum(total(n) for n in always) - (rows["executor (trained, replicated)"][1]
                                             + rows[f"planner (FSDP2 / {gpus})"][1])  # gradients: update only
    extra = lambda names: sum(total(n) for n in names if n not in always)
    phases = {
        "planning": base + planner_full + kv_plan,
        "rollout": base + extra(["umT5-XXL text encoder"]) + kv_rollout,
        "judging": base + extra(frozen_judges) + max(act_judge, vae_decode),
        "update": base + rows["executor (trained, replicated)"][1] + rows[f"planner (FSDP2 / {gpus})"][1]
        + max(act_update, logits),
    }
    out(f"\nmemory per GPU, one TempAct iteration at Wan scale on {gpus} GPUs of {gpu_gb:.0f} GB "
        f"(M={M_plans} plans x N={N_rows} continuations per instruction, {instructions} instruction(s) per GPU, "
        f"{latent_frames} latent frames of {frame_tokens} tokens; frozen models {'offloaded between phases' if offload else 'resident'})")
    out(f"{'component':34s} {'params':>8s} {'grads':>8s} {'optim':>8s} {'activ':>8s} {'KV':>8s} {'total':>8s}   (GB)")
    for name, r in rows.items():
        out(f"{name:34s} " + " ".join(f"{x / GB:8.2f}" for x in r) + f" {sum(r) / GB:8.2f}")
    out(f"{'rollout KV cache (' + str(rollout_rows) + ' rows at a time)':34s} {'':>8s} {'':>8s} {'':>8s} {'':>8s} {kv_rollout / GB:8.2f}")
    out(f"{'planner gathered for generation':34s} {planner_full / GB:8.2f} {'':>8s} {'':>8s} {'':>8s} {kv_plan / GB:8.2f}")
    out(f"{'executor update, per row':34s} {'':>8s} {'':>8s} {'':>8s} {act_update / GB:8.2f}")
    out(f"{'judging (VLM / VAE decode)':34s} {'':>8s} {'':>8s} {'':>8s} {max(act_judge, vae_decode) / GB:8.2f}")
    out("phase peaks: " + ", ".join(f"{k} {v / GB:.1f}" for k, v in phases.items())
        + f"  -> {'fits' if max(phases.values()) < 0.92 * gpu_gb * GB else 'does NOT fit'} in {gpu_gb:.0f} GB")
    return {k: v / GB for k, v in phases.items()}
