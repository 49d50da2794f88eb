# The shapes world (the default): tiny models the project trains and ships.
# python pretrain.py config/world.py --model=executor
executor_config = "world"
batch_size = 64
lr = 3e-4
max_minutes = 8.0
