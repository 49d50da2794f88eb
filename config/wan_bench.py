# One TempAct iteration at Wan scale with random weights (no download), to time it and read its memory:
#   torchrun --standalone --nproc_per_node=4 train.py config/wan_bench.py
# Self-Forcing's executor (Wan2.1-T2V-1.3B) and its frozen reference, a planner shaped like Qwen3-8B (FSDP2
# over the ranks), a Qwen3-8B-shaped plan-quality judge, a Qwen3-VL-8B-shaped video judge, a PickScore-sized
# CLIP ViT-H/14, umT5-XXL and the Wan VAE; M = 4 plans x N = 4 continuations of one instruction per GPU,
# 480x832, 21 latent frames. Random planners write no valid plan, so the instruction's own steps are
# rolled out in their place (the planner still gets reward 0 and its GSPO update runs).
backbone = "selfforcing"
executor_config = "wan-1.3b"
denoising_steps = (1000, 750, 500, 250)
timestep_shift = 5.0
height = 480
width = 832
latent_frames = 21
random_weights = True
stand_in_plans = True
instructions = 1
M = 4
N = 4
min_steps, max_steps = 2, 3
rollout_rows = 2          # a 21-frame KV cache is 6 GB a row
micro_batch = 1           # the update: one 32760-token row per forward/backward
grad_ckpt = True
max_iters = 1
save_checkpoints = False
out_dir = "out-wan-bench"
warmup = True             # kernel tuning at every attention shape before the timed iteration
