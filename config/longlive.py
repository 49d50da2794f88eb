# LongLive (Self-Forcing-style Wan2.1-T2V-1.3B with a frame sink and a short attention window,
# tuned for long videos and prompt switches) as the executor: the base weights plus a LoRA that
# backbones.py merges at load time. The paths are where LongLive's README puts the files:
#   huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B --local-dir wan_models/Wan2.1-T2V-1.3B
#   huggingface-cli download Efficient-Large-Model/LongLive --local-dir longlive_models
backbone = "longlive"
executor_config = "longlive-1.3b"     # model.CONFIGS: the same DiT, sink + short-window KV cache
executor_ckpt = "longlive_models/models/longlive_base.pt"
executor_key = "generator"            # LongLive's inference reads this entry (use_ema: false)
lora_ckpt = "longlive_models/models/lora.pt"
lora_rank = 256                       # peft LoRA on every Linear of the 30 attention blocks
lora_alpha = 256.0                    # merged as W += (alpha / rank) B A
vae_ckpt = "wan_models/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth"
t5_ckpt = "wan_models/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth"
t5_tokenizer = "wan_models/Wan2.1-T2V-1.3B/google/umt5-xxl"
sink_frames = 3                       # the first chunk stays visible forever ...
window_frames = 9                     # ... next to the 9 most recent frames: a 12-frame cache (local_attn_size 12)
height = 480
width = 832
latent_frames = 21                    # LongLive's own demos run 120-240; TempAct's videos are 21
denoising_steps = (1000, 750, 500, 250)  # as Self-Forcing (denoising_step_list)
timestep_shift = 5.0
switch_recache = True                 # at a prompt switch, the cached frames re-run with the new prompt (model.recache)
