# The shapes world's base executor, trained from scratch in one ~9-minute run on one H200:
# python pretrain.py config/world.py config/world_executor.py --model=executor --workers=14
batch_size = 64
lr = 5e-4
decay_lr = True
min_lr = 3e-5
warmup = 200
max_steps = 5000
max_minutes = 9.5
