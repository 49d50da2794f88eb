"""
Train the shapes world's base models from scratch; the results ship in checkpoints/.

    python pretrain.py config/world.py config/world_executor.py --model=executor   # DiT + tiny umT5, flow matching
    python pretrain.py config/world.py --model=planner    # tiny Qwen3 on imperfect plans

The executor learns from rendered videos with two kinds of caption, as a plain multi-caption
video pretraining would have: the global instruction over the whole clip, or step captions over
the chunks each step spans (the ground-truth plan). Step captions are coarse, like real dense
captions: the caption switch often leads its event by a chunk, and a step that starts late runs
on into the next caption. So with step prompts the base model tends to react late and to blend
neighbouring steps, the failure modes TempAct's executor RL fixes. Noise is drawn per chunk
(diffusion forcing); for half the clips a random prefix of chunks is clean (teacher forcing), as
the KV cache presents it at generation time.

The planner learns imperfect plans: uniform spans whatever the steps need, and now and then a
dropped or swapped step, so GSPO has something real to fix.

Training resumes from out_dir/<model>_state.pt (written atomically); exported weights are
safetensors. A kill loses at most the steps since the last checkpoint.
"""

import itertools
import json
import math
import os
import random
import re
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

# -----------------------------------------------------------------------------
# config
model = "executor"        # executor | planner
out_dir = "checkpoints"   # exported weights and the resumable state go here
device = "cuda" if torch.cuda.is_available() else "cpu"
seed = 0
max_steps = 20000         # stop at this many optimizer steps ...
max_minutes = 8.0         # ... or after this much training time (counted across resumes), whichever comes first
batch_size = 32
lr = 3e-4
warmup = 300              # linear warm-up steps, then constant ...
decay_lr = False          # ... or a cosine decay to min_lr by the end of the budget (max_steps or max_minutes)
min_lr = 3e-5
weight_decay = 0.01
grad_clip = 1.0
ema = 0.999               # exported executor weights are this EMA
ckpt_every = 1000         # steps between resumable checkpoints
log_every = 50
workers = 0               # processes rendering videos; 0 = all CPUs
init_from = ""            # start from exported weights in this folder (no optimizer state), when out_dir has no state
compile = False           # torch.compile the executor: fuses its many small float32 norm/modulation ops ...
compile_mode = "reduce-overhead"  # ... and replays them as CUDA graphs (a torch.compile mode; "default": no graphs)
# executor
executor_config = "world"         # a model.CONFIGS name
global_caption_frac = 0.3         # clips captioned with the global instruction; the rest get step captions
caption_lead_frac = 0.5           # a step caption switches one chunk before its event this often
clean_chunk_frac = 0.25           # diffusion forcing: fraction of chunks left clean ...
clean_prefix_frac = 0.5           # ... and clips whose first chunks (a random number) are all clean
train_shift = 3.0                 # noise levels: u ~ U(0, 1) warped by this shift, per chunk
text_layers = 2                   # the tiny umT5 text encoder
# planner
planner_hidden = 128
planner_layers = 4
drop_step_frac = 0.15             # imperfect targets: a step dropped ...
swap_step_frac = 0.15             # ... or two neighbouring steps swapped
short_form_frac = 0.3             # instructions as users write them: size and position left out
# -----------------------------------------------------------------------------
from configurator import configure, die, require_int  # noqa: E402

config = configure(globals())
# every setting checked before anything is written (out_dir defaults to the shipped checkpoints' folder)
if model not in ("executor", "planner"):
    die(f"unknown model '{model}': executor or planner")
if compile_mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
    die(f"unknown compile_mode '{compile_mode}': default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs")
for name, least in (("batch_size", 1), ("ckpt_every", 1), ("log_every", 1), ("max_steps", 1), ("workers", 0), ("warmup", 0)):
    require_int(name, globals()[name], least)

import world  # noqa: E402
from planner import PLAIN_SEP, format_plan, tiny_qwen3  # noqa: E402
from model import (CONFIGS, CheckpointError, WanDiT, chunk_noise_levels, encode_text, flow_matching_loss,  # noqa: E402
                   load_state, read_state_dict, save_pretrained, save_safetensors, save_state, tiny_text_encoder, to_device)

torch.manual_seed(seed)
os.makedirs(out_dir, exist_ok=True)
dev_type = "cuda" if "cuda" in device else "cpu"
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev_type == "cuda" else nullcontext()
tokenizer = world.build_tokenizer()


# -----------------------------------------------------------------------------
# data: rendered on the fly by worker processes (one video takes ~2 ms)


def executor_example(i: int):
    """Example i -> (video uint8 (T, H, W, 3), one caption per chunk). Deterministic in (seed, i)."""
    rng = random.Random(seed * 1_000_003 + i)
    text = world.sample_training_instruction(rng, rng.randint(1, 4))
    chunks = world.T // world.CHUNK
    if rng.random() < global_caption_frac:
        return world.render(text), [text] * chunks
    objs, steps = world.parse(text)
    plan = world.ground_truth_plan((objs, steps))
    starts = [s + (world.CHUNK if k > 0 and s + world.CHUNK < world.T and rng.random() < caption_lead_frac else 0)
              for k, (_, s, _) in enumerate(plan)]  # the event starts at the caption switch, or a chunk later
    captions = [p for p, s, e in plan for _ in range(s // world.CHUNK, e // world.CHUNK)]
    return world.render_script(objs, steps, starts), captions


SHORTEN = re.compile(r"\b(small|big) |\s(at the (top|bottom)( left| right)?|on the (left|right)|in the middle)\b")


def planner_example(i: int):
    """Example i -> (instruction, imperfect plan as text)."""
    rng = random.Random(seed * 1_000_003 + i)
    text = world.sample_training_instruction(rng, rng.randint(1, 4))
    if rng.random() < short_form_frac:  # the parser fills size and position in; the plan names them
        short = SHORTEN.sub("", text)
        try:  # keep it only if it parses, and its scene (defaults filled in) is not a held-out one
            if world.describe(*world.parse(short)) not in world._benchmark_instructions():
                text = short
        except ValueError:
            pass
    prompts = [p for p, _, _ in world.ground_truth_plan(text)]
    if len(prompts) > 1 and rng.random() < drop_step_frac:
        prompts.pop(rng.randrange(len(prompts)))
    elif len(prompts) > 1 and rng.random() < swap_step_frac:
        j = rng.randrange(len(prompts) - 1)
        prompts[j], prompts[j + 1] = prompts[j + 1], prompts[j]
    chunks = world.T // world.CHUNK  # uniform spans in whole chunks, whatever each step needs
    bounds = [round(chunks * j / len(prompts)) * world.CHUNK for j in range(len(prompts) + 1)]
    plan = [(p, s, e) for p, s, e in zip(prompts, bounds, bounds[1:])]
    return text, format_plan(plan)


class Examples(torch.utils.data.Dataset):
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, i: int):
        return self.fn(i)


def collate(examples: list) -> tuple:
    """A batch, stacked where it is rendered: videos become one uint8 tensor (B, T, H, W, 3)."""
    a, b = zip(*examples)
    return (torch.from_numpy(np.stack(a)) if isinstance(a[0], np.ndarray) else list(a)), list(b)


def batches(example_fn, start: int):
    """Endless batches of examples start, start+1, ...; worker processes render and stack whole batches
    ahead. A batch's videos come back as one tensor in shared memory, pinned on a side thread, so the
    training loop neither unpickles nor copies them (with a process pool's pickled arrays it ran a
    third slower)."""
    n = workers or os.cpu_count()
    index = (range(i, i + batch_size) for i in itertools.count(start, batch_size))
    kw = dict(num_workers=n, multiprocessing_context="fork") if n > 1 else {}  # each worker 2 batches ahead
    return iter(DataLoader(Examples(example_fn), batch_sampler=index, collate_fn=collate,
                           pin_memory=dev_type == "cuda", **kw))


# -----------------------------------------------------------------------------
# the executor


def executor_loss(net, text_enc, videos, captions):
    x0 = videos.to(device, non_blocking=True).permute(0, 1, 4, 2, 3).float() / 127.5 - 1  # (B, T, 3, H, W)
    sigma = chunk_noise_levels(len(x0), x0.shape[1] // net.cfg.chunk_frames, train_shift, clean_chunk_frac,
                               clean_prefix_frac, device)  # (B, chunks)
    with autocast:
        unique = sorted(set(c for caps in captions for c in caps))  # encode each distinct caption once
        states = encode_text(text_enc, tokenizer, unique, net.cfg.text_len, device)  # (U, Lt, text_dim)
    where = {c: j for j, c in enumerate(unique)}
    index = to_device(torch.tensor([[where[c] for c in caps] for caps in captions]), device)  # (B, chunks)
    return flow_matching_loss(net, x0, sigma, states[index], autocast)  # per-chunk prompts (B, chunks, Lt, text_dim)


def train_executor():
    cfg = CONFIGS[executor_config]
    net = WanDiT(cfg).to(device)
    text_enc = tiny_text_encoder(len(tokenizer), d_model=cfg.text_dim, layers=text_layers).to(device)
    params = list(net.parameters()) + list(text_enc.parameters())
    ema_params = [p.detach().clone() for p in params]
    return net, text_enc, params, ema_params, executor_loss


def compiled(net):
    """The same module, compiled (it shares parameters); state dicts come from the plain one."""
    return torch.compile(net, mode=compile_mode) if compile else net


def export_executor(net, text_enc, ema_params, step):
    """Ship the EMA weights in bf16; the live weights keep training."""
    ema_of = {id(p): e for p, e in zip(params, ema_params)}

    def ema_state(module):  # tied weights appear under several names: each gets its parameter's EMA
        return {k: ema_of.get(id(v), v).detach().to(torch.bfloat16) for k, v in module.state_dict(keep_vars=True).items()}
    save_pretrained(net, os.path.join(out_dir, "world_executor.safetensors"), extra={"step": step, "train_config": config},
                    state_dict=ema_state(net))
    save_safetensors(ema_state(text_enc), os.path.join(out_dir, "world_text_encoder.safetensors"),
                     {"config": text_enc.config.to_json_string(), "step": str(step)})


# -----------------------------------------------------------------------------
# the planner


def train_planner():
    net = tiny_qwen3(tokenizer, hidden=planner_hidden, layers=planner_layers, heads=4, kv_heads=2).to(device)
    return net, None, list(net.parameters()), None, planner_loss


def planner_loss(net, _, instructions, plans):
    eos = tokenizer.eos_token_id
    rows, targets = [], []
    for ins, plan in zip(instructions, plans):  # loss only on the plan tokens and the closing eos
        a = tokenizer(ins + PLAIN_SEP, add_special_tokens=False)["input_ids"]
        b = tokenizer(" " + plan, add_special_tokens=False)["input_ids"] + [eos]
        rows.append(a + b)
        targets.append([-100] * len(a) + b)
    L = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (L - len(r)) for r in rows], device=device)
    tgt = torch.tensor([t + [-100] * (L - len(t)) for t in targets], device=device)
    with autocast:
        logits = net(input_ids=ids).logits  # (B, L, V)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tgt[:, 1:].flatten())


def export_planner(net, _, ema_params, step):
    net.save_pretrained(os.path.join(out_dir, "world_planner"), safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(out_dir, "world_planner"))


# -----------------------------------------------------------------------------
# the loop

net, text_enc, params, ema_params, loss_fn = train_executor() if model == "executor" else train_planner()
export = export_executor if model == "executor" else export_planner
optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay,
                              fused=dev_type == "cuda")  # one kernel for all parameters on a GPU
state_path = os.path.join(out_dir, f"{model}_state.pt")
step, minutes_before = 0, 0.0
try:
    state = load_state(state_path, device)
except CheckpointError as e:
    die(str(e))
if state is not None:
    net.load_state_dict(state["net"])
    if text_enc is not None:
        text_enc.load_state_dict(state["text_enc"])
    optimizer.load_state_dict(state["optimizer"])
    for e, s in zip(ema_params or [], state["ema"] or []):
        e.copy_(s)
    step, minutes_before = state["step"], state.get("minutes", 0.0)
    print(f"resumed {model} from step {step} ({minutes_before:.1f} minutes trained)")
elif init_from:  # continue from exported weights, e.g. a run on another machine (fresh optimizer and EMA)
    if model == "executor":
        net.load_state_dict(read_state_dict(os.path.join(init_from, "world_executor.safetensors"))[0])
        text_enc.load_state_dict(read_state_dict(os.path.join(init_from, "world_text_encoder.safetensors"))[0])
    else:
        from transformers import AutoModelForCausalLM
        net.load_state_dict(AutoModelForCausalLM.from_pretrained(os.path.join(init_from, "world_planner")).state_dict())
    for e, p in zip(ema_params or [], params):
        e.copy_(p.detach())
    print(f"initialised {model} from {init_from}")


def get_lr(it: int, minutes: float) -> float:
    if it < warmup or not decay_lr:
        return lr * min(1.0, (it + 1) / warmup)
    # how far through the budget: steps or time, whichever runs out first (a fixed-time run decays fully
    # whatever the GPU's speed)
    done = max((it - warmup) / max(1, max_steps - warmup), minutes / max_minutes)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, done)))


def checkpoint():
    save_state({"net": net.state_dict(), "text_enc": text_enc.state_dict() if text_enc is not None else None,
                 "optimizer": optimizer.state_dict(), "ema": ema_params, "step": step, "minutes": minutes(),
                 "config": config}, state_path)
    export(net, text_enc, ema_params, step)


fwd = compiled(net) if model == "executor" else net
n_params = sum(p.numel() for p in params)
print(f"training the {model}: {n_params / 1e6:.2f} M parameters on {device}")
data = batches(executor_example if model == "executor" else planner_example, step * batch_size)
log = open(os.path.join(out_dir, f"{model}_log.jsonl"), "a")
t0 = time.time()
minutes = lambda: minutes_before + (time.time() - t0) / 60  # training time so far, across resumes
bar = tqdm(total=max_steps, initial=step, desc=model)
t_data = 0.0  # seconds spent waiting for data since the last log line
while step < max_steps and minutes() < max_minutes:
    t1 = time.time()
    a, b = next(data)
    t_data += time.time() - t1
    for g in optimizer.param_groups:
        g["lr"] = get_lr(step, minutes())
    loss = loss_fn(fwd, text_enc, a, b)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    # the one wait for the GPU in a step, after the backward is queued: a non-finite loss or gradient
    # skips the update, and the run goes on and says so
    if not torch.isfinite(gnorm):
        print(f"step {step}: non-finite loss or gradient, update skipped")
        log.write(json.dumps({"step": step, "skipped": "non-finite loss or gradient"}) + "\n")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        continue
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema_params is not None:
        with torch.no_grad():
            d = min(ema, (1 + step) / (10 + step))  # a short EMA early on, `ema` later
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - d)
    step += 1
    bar.update(1)
    if step % log_every == 0:
        rec = {"step": step, "loss": loss.item(), "grad_norm": gnorm.item(), "lr": optimizer.param_groups[0]["lr"],
               "minutes": round(minutes(), 3), "data_wait_s": round(t_data, 3)}
        t_data = 0.0
        log.write(json.dumps(rec) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{rec['loss']:.4f}")
    if step % ckpt_every == 0:
        checkpoint()
bar.close()
checkpoint()
print(f"{model}: {step} steps, exported to {out_dir}")
os._exit(0)  # do not wait on the render pool's workers
