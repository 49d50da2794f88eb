# Self-Forcing (Wan2.1-T2V-1.3B distilled to 4 steps with DMD, chunk-wise) as the executor.
# The paths are where Self-Forcing's README puts the files, run from this folder:
#   huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B --local-dir wan_models/Wan2.1-T2V-1.3B
#   huggingface-cli download gdhe17/Self-Forcing checkpoints/self_forcing_dmd.pt --local-dir .
backbone = "selfforcing"
executor_config = "wan-1.3b"          # model.CONFIGS: the Wan2.1-T2V-1.3B DiT, 3 latent frames a chunk
executor_ckpt = "checkpoints/self_forcing_dmd.pt"
executor_key = "generator_ema"        # the EMA weights, what Self-Forcing's inference loads (--use_ema)
lora_ckpt = ""                        # no adapter
vae_ckpt = "wan_models/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth"
t5_ckpt = "wan_models/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth"  # or a diffusers text_encoder/ folder
t5_tokenizer = "wan_models/Wan2.1-T2V-1.3B/google/umt5-xxl"
sink_frames = 0                       # global KV cache: every earlier chunk stays visible
window_frames = 0
height = 480                          # video pixels; latents are 60x104 (VAE stride 8), 1560 tokens a frame
width = 832
latent_frames = 21                    # 7 chunks of 3 -> 81 video frames at 16 fps
denoising_steps = (1000, 750, 500, 250)  # the distilled sampler's timesteps per chunk (denoising_step_list)
timestep_shift = 5.0                  # ... warped through the shifted flow schedule
switch_recache = False                # a prompt switch only rebuilds the cross-attention cache
