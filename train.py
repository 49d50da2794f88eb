"""
TempAct: planner-executor RL that makes an autoregressive video model follow temporally ordered
instructions. One iteration, for each instruction of the batch (SPEC "The TempAct loop"):

  1. the planner samples M plans (the planning group), keeping their token log-probs;
  2. per plan, the executor streams the shared context up to the first prompt switch, then N
     continuations (the execution group): the first transition chunk is sampled with Flow-GRPO's
     SDE and its per-step log-probs are recorded, the rest runs to the end of the video;
  3. rewards: plan quality + temporal following (mean over the N continuations) for the planner;
     local step following + aesthetic on the transition chunk for the executor;
  4. GSPO for the planner (advantages within the M plans); Flow-GRPO for the executor on the
     transition chunk (advantages within each group of N, clipped ratio, KL to the frozen base).

    python train.py                                            # the shapes world, one GPU or the CPU
    torchrun --standalone --nproc_per_node=4 train.py          # K GPUs: each rank its own instructions
    python train.py --train_planner=False --out_dir=out-noplanner   # an ablation

The shared context: the N rows of a plan start from the same noise for every chunk before the
switch, and the ODE sampler is deterministic, so the context they see is the same (flat_groups
gives each row its own context instead). Computing it once and copying the KV cache would save
the (N-1)/N duplicate work; on the world it is a few ms and the batched form reads more simply.
"""

import copy
import json
import os
import random
import shutil
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

# -----------------------------------------------------------------------------
# config
out_dir = "out-tempact"   # checkpoints, log.jsonl, rewards.png
init_from = "checkpoints"  # the base models (pretrain.py's shipped world models)
device = "cuda" if torch.cuda.is_available() else "cpu"
seed = 0
max_iters = 60            # RL iterations ...
max_minutes = 9.0         # ... or this much wall time, whichever comes first
instructions = 8          # instructions per iteration, per rank
M = 4                     # plans per instruction (the planning group)
N = 4                     # continuations per plan (the execution group)
min_steps, max_steps = 2, 4   # training instructions have this many steps (a switch is needed)
train_planner = True
train_executor = True
smoothing = "ramp"        # prompt smoothing: ramp | none (ablation)
flat_groups = False       # ablation: no shared context, every continuation its own rollout
# planner (GSPO)
planner_lr = 1e-5
planner_temperature = 1.0
gspo_eps_low, gspo_eps_high = 3e-4, 4e-4
w_plan_quality, w_temporal = 1.0, 1.0
# executor (Flow-GRPO)
executor_lr = 1e-4
sample_steps = 10         # Euler steps per chunk; the transition chunk's first sample_steps-1 are SDE steps
sample_shift = 3.0        # the schedule's shift (pretrain.py's train_shift)
noise_level = 0.7         # Flow-GRPO's a
clip_range = 1e-3         # executor ratio clip
kl_beta = 0.01            # KL to the frozen base executor
w_local, w_aesthetic = 1.0, 1.0
adv_clip = 5.0
num_minibatches = 4       # each rollout batch is split in 4 updates, for both models
grad_clip = 1.0
ckpt_every = 10           # iterations between checkpoints
# -----------------------------------------------------------------------------
from configurator import configure, die  # noqa: E402

config = configure(globals())

import model as Mod  # noqa: E402
import rewards  # noqa: E402
import world  # noqa: E402
from planner import gspo_loss, group_advantages, minibatches, parse_plan  # noqa: E402
from sample import SetupError, chunk_contexts, load_world  # noqa: E402

# -----------------------------------------------------------------------------
# processes: torchrun gives every rank different instructions; gradients are averaged by hand

ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
else:
    rank, world_size = 0, 1
master = rank == 0
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
if not (train_planner or train_executor):
    die("nothing to train: set train_planner or train_executor")


def all_mean(x: torch.Tensor) -> torch.Tensor:
    if ddp:
        dist.all_reduce(x)  # SUM (gloo has no AVG)
        x /= world_size
    return x


def sync_grads(params):
    for p in params:
        if p.grad is None:  # a rank with nothing to learn from this time still joins the all-reduce
            p.grad = torch.zeros_like(p)
        all_mean(p.grad)


# -----------------------------------------------------------------------------
# models: the trained planner and executor, the frozen reference executor, the frozen text encoder

try:
    models = load_world(init_from, device)
except (SetupError, ValueError) as e:
    die(str(e))
planner, executor, text_enc = models["planner"], models["executor"], models["text_enc"]
reference = copy.deepcopy(executor).eval()  # the base executor as loaded, frozen, for the KL term
planner.model.float()  # float32 master weights; the forwards run under autocast
executor.float()
for p in list(text_enc.parameters()) + list(reference.parameters()):
    p.requires_grad_(False)
p_opt = torch.optim.AdamW(planner.model.parameters(), lr=planner_lr, betas=(0.9, 0.99), weight_decay=0.0)
e_opt = torch.optim.AdamW(executor.parameters(), lr=executor_lr, betas=(0.9, 0.99), weight_decay=0.0)
sigmas = Mod.ode_sigmas(sample_steps, sample_shift).tolist() + [0.0]  # sigma_0 = 1 > ... > sigma_K = 0
C = executor.cfg.chunk_frames
state_path = os.path.join(out_dir, "state.pt")
it = 0
try:
    state = Mod.load_state(state_path, device)
except Mod.CheckpointError as e:
    die(str(e))
if state is not None:
    planner.model.load_state_dict(state["planner"])
    executor.load_state_dict(state["executor"])
    p_opt.load_state_dict(state["p_opt"])
    e_opt.load_state_dict(state["e_opt"])
    it = state["iter"]
    if master:
        print(f"resumed from iteration {it}")


def save_checkpoint():
    """The resumable state first, then the exported models; both written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    state = {"planner": planner.model.state_dict(), "executor": executor.state_dict(), "p_opt": p_opt.state_dict(),
             "e_opt": e_opt.state_dict(), "iter": it, "config": config}
    Mod.save_state(state, state_path)
    Mod.save_pretrained(executor, os.path.join(out_dir, "world_executor.safetensors"), extra={"iter": it},
                        state_dict={k: v.to(torch.bfloat16) for k, v in executor.state_dict().items()})
    text = os.path.join(out_dir, "world_text_encoder.safetensors")  # frozen: the base's file as it is
    shutil.copyfile(os.path.join(init_from, "world_text_encoder.safetensors"), text + ".tmp")
    os.replace(text + ".tmp", text)
    tmp = os.path.join(out_dir, "world_planner.tmp")
    planner.model.save_pretrained(tmp, safe_serialization=True)
    planner.tokenizer.save_pretrained(tmp)
    final = os.path.join(out_dir, "world_planner")
    if os.path.exists(final):
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    if os.path.exists(final + ".old"):
        shutil.rmtree(final + ".old")


# -----------------------------------------------------------------------------
# rollouts


@torch.no_grad()
def rollout(plans: list, g: torch.Generator):
    """
    plans: P valid plans -> P*N videos (row r is continuation r % N of plan r // N).
    Returns latents (R, T, 3, H, W) float, uint8 videos, the switch chunk per row (-1: one-step plan),
    and the transition chunk's recorded steps: xs, x_nexts (R, K, C, 3, H, W), logp_old (R, K).
    """
    P, R, nc = len(plans), len(plans) * N, world.T // C
    ctx = [c.float().repeat_interleave(N, 0) for c in chunk_contexts(models, plans, smoothing)]  # nc x (R, L, D)
    first = [-(-p[1][1] // C) if len(p) > 1 else -1 for p in plans]  # the chunk where the second step starts
    switch = torch.tensor([j if j < nc else -1 for j in first]).repeat_interleave(N)  # (R,) -1: no transition
    shape = (C, 3, world.H, world.W)
    ph, pw = executor.cfg.patch_size[1:]
    cache = Mod.KVCache(executor.cfg, R, (world.H // ph) * (world.W // pw), world.T, device=device,
                        dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32)  # autocast's k, v
    K = len(sigmas) - 2  # SDE steps: every step but the last (its Gaussian has no width)
    xs = torch.zeros(R, K, *shape, device=device)
    x_nexts, logp_old = torch.zeros_like(xs), torch.zeros(R, K, device=device)
    chunks = []
    executor.eval()
    for j in range(nc):
        if j > 0 and not torch.equal(ctx[j], ctx[j - 1]):
            cache.clear_cross()
        own = torch.randn((R, *shape), generator=g, device=device)
        shared = torch.randn((P, *shape), generator=g, device=device).repeat_interleave(N, 0)
        before = (switch < 0) | (j < switch)  # rows still in their plan's shared context
        x = own if flat_groups else torch.where(before.to(device)[:, None, None, None, None], shared, own)
        sde = (switch == j).to(device)  # rows whose transition chunk this is
        for i in range(len(sigmas) - 1):
            s, s_next = sigmas[i], sigmas[i + 1]
            with autocast:
                v = executor(x, torch.full((R, C), 1000 * s, device=device), ctx[j], cache=cache, start_frame=j * C)
            x_ode = Mod.ode_step(x.float(), v.float(), s, s_next)
            if i < K and sde.any():
                eps = torch.randn(x.shape, generator=g, device=device)
                x_sde, logp, _, _ = Mod.sde_step(x, v, s, s_next, noise_level, noise=eps)
                xs[sde, i], x_nexts[sde, i], logp_old[sde, i] = x[sde].float(), x_sde[sde], logp[sde]
                x = torch.where(sde[:, None, None, None, None], x_sde, x_ode)
            else:
                x = x_ode
        with autocast:
            executor(x, torch.zeros(R, C, device=device), ctx[j], cache=cache, start_frame=j * C)
        chunks.append(x)
    lat = torch.cat(chunks, 1)  # (R, T, 3, H, W)
    videos = ((lat.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 1, 3, 4, 2).cpu().numpy()
    return lat, videos, switch, torch.stack(ctx, 1), xs, x_nexts, logp_old


def judge(args):
    """World judges for one continuation (runs in a worker process)."""
    video, instruction, plan, sw = args
    out = {"temporal": rewards.temporal_following(video, instruction)}
    if sw >= 0:  # the transition chunk: the new step should start in it, the previous one be done
        span = (sw * C, sw * C + C)
        out["local"] = rewards.local_step_following(video, span, plan[0][0], plan[1][0])
        out["aesthetic"] = rewards.aesthetic(video[span[0]:span[1]])
    return out


# -----------------------------------------------------------------------------
# the executor's policy: the transition chunk's SDE step under the current weights


def batches_of(n: int) -> list[torch.Tensor]:
    """Always num_minibatches parts (some empty when n is small): every rank takes the same number of steps."""
    parts = minibatches(n, num_minibatches)
    return parts + [torch.zeros(0, dtype=torch.long)] * (num_minibatches - len(parts))


def transition_step(net, lat, ctx, switch, x_t, x_next, k: int):
    """Re-score the recorded SDE step k of each row's transition chunk. One block-causal forward over
    the clean context frames (t = 0) and the chunk at sigma_k gives the same v as the streamed
    sampler did (test_all.py checks streaming == full forward). Returns (logp, mean, std)."""
    R = lat.shape[0]
    end = int(switch.max() + 1) * C  # frames after the last transition chunk do not matter (causal)
    rows = torch.arange(R, device=lat.device)
    frames = switch.to(lat.device)[:, None] * C + torch.arange(C, device=lat.device)  # (R, C)
    x = lat[:, :end].clone()
    x[rows[:, None], frames] = x_t
    t = torch.zeros(R, end, device=lat.device)
    t[rows[:, None], frames] = 1000 * sigmas[k]
    with autocast:
        v = net(x, t, ctx[:, :end // C])[rows[:, None], frames]  # (R, C, 3, H, W)
    _, logp, mean, std = Mod.sde_step(x_t, v, sigmas[k], sigmas[k + 1], noise_level, x_next=x_next)
    return logp, mean, std


def executor_update(lat, ctx, switch, xs, x_nexts, logp_old, adv):
    """Flow-GRPO (FACTS 5): per SDE step, loss = mean(max(-A r, -A clip(r, 1 +- eps))) + beta KL,
    r = exp(logp - logp_old), KL = |mu - mu_ref|^2 / (2 std^2); gradients summed over the steps."""
    stats = {"e_loss": 0.0, "kl": 0.0, "e_clip_frac": 0.0, "e_skipped": 0}
    K = xs.shape[1]
    with torch.no_grad():  # old log-probs through the update's own code path, so the first ratio is exactly 1
        old = torch.stack([transition_step(executor, lat, ctx, switch, xs[:, k], x_nexts[:, k], k)[0]
                           for k in range(K)], 1)  # (R, K)
    stats["logp_rollout_gap"] = (old - logp_old).abs().max().item()  # streamed vs full forward: bf16 noise only
    logp_old = old
    executor.train()
    n_mb = 0
    for idx in batches_of(len(adv)):
        n_mb += 1
        if len(idx) == 0:
            sync_grads(executor.parameters())
            continue
        for k in range(K):
            a = [t[idx] for t in (lat, ctx, switch, xs[:, k], x_nexts[:, k])]
            logp, mean, std = transition_step(executor, *a, k)
            with torch.no_grad():
                _, mean_ref, _ = transition_step(reference, *a, k)
            ratio = torch.exp(logp - logp_old[idx, k])                            # (B,)
            A = adv[idx]
            policy = torch.maximum(-A * ratio, -A * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
            kl = ((mean - mean_ref) ** 2).flatten(1).mean(1).mean() / (2 * std ** 2)
            loss = (policy + kl_beta * kl) / K
            if not torch.isfinite(loss):
                stats["e_skipped"] += 1
                continue
            loss.backward()
            stats["e_loss"] += loss.item()
            stats["kl"] += kl.item() / K
            stats["e_clip_frac"] += ((ratio - 1).abs() > clip_range).float().mean().item() / K
        sync_grads(executor.parameters())
        torch.nn.utils.clip_grad_norm_(executor.parameters(), grad_clip)
        e_opt.step()
        e_opt.zero_grad(set_to_none=True)
    return {k: v / max(n_mb, 1) if k in ("e_loss", "kl", "e_clip_frac") else v for k, v in stats.items()}


def planner_update(samples, adv):
    stats = {"p_loss": 0.0, "p_clip_frac": 0.0}
    planner.model.train()
    for idx in batches_of(len(adv)):
        if len(idx):  # float32 as in planner.sample, so the first GSPO ratio is exactly 1 (the clip band is 3e-4)
            logp = planner.logprobs(samples["prompt_ids"][idx], samples["completion_ids"][idx], samples["mask"][idx],
                                    samples["prompt_mask"][idx], planner_temperature)
            loss, s = gspo_loss(logp, samples["logp"][idx], samples["mask"][idx], adv[idx], gspo_eps_low, gspo_eps_high)
            if torch.isfinite(loss):
                loss.backward()
                stats["p_loss"] += loss.item() / num_minibatches
                stats["p_clip_frac"] += s["clip_frac"].item() / num_minibatches
            else:
                stats["p_skipped"] = stats.get("p_skipped", 0) + 1
        sync_grads(planner.model.parameters())
        torch.nn.utils.clip_grad_norm_(planner.model.parameters(), grad_clip)
        p_opt.step()
        p_opt.zero_grad(set_to_none=True)
    return stats


# -----------------------------------------------------------------------------
# the loop


def reward_curve(path: str, log_path: str):
    """rewards.png: each reward term against the iteration (pillow only)."""
    from PIL import Image, ImageDraw
    recs = [json.loads(line) for line in open(log_path) if '"iter"' in line]
    keys = [("r_temporal", (220, 60, 60)), ("r_plan_quality", (60, 120, 220)), ("r_local", (40, 160, 60)),
            ("r_aesthetic", (160, 100, 20))]
    W, H, pad = 640, 360, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, pad, W - pad, H - pad], outline="black")
    n = max(len(recs) - 1, 1)
    for ki, (k, col) in enumerate(keys):
        pts = [(pad + (W - 2 * pad) * i / n, H - pad - (H - 2 * pad) * r[k]) for i, r in enumerate(recs) if k in r]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        d.text((pad + 5 + 150 * ki, 10), k, fill=col)
    d.text((pad, H - pad + 5), f"iterations 0..{recs[-1]['iter'] if recs else 0}  (reward 0..1)", fill="black")
    img.save(path)


if master:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:  # bench.py reads smoothing from here
        json.dump(config, f, indent=1)
log_path = os.path.join(out_dir, "log.jsonl")
from multiprocessing import get_context  # noqa: E402
pool = get_context("fork").Pool(max(1, min(16, (os.cpu_count() or 2) // world_size)))
t_start = time.time()
bar = tqdm(total=max_iters, initial=it, desc="tempact", disable=not master)
while it < max_iters and (time.time() - t_start) / 60 < max_minutes:
    rng = random.Random(seed * 1_000_003 + it * 1009 + rank)  # every rank, every iteration: new instructions
    g = torch.Generator(device).manual_seed(seed * 1_000_003 + it * 1009 + rank)
    torch.manual_seed(seed * 1_000_003 + it * 1009 + rank)  # minibatch shuffles
    batch = [world.sample_training_instruction(rng, rng.randint(min_steps, max_steps)) for _ in range(instructions)]
    t0 = time.time()

    # 1. the planning group: M plans per instruction
    samples = planner.sample(batch, M, temperature=planner_temperature)
    parsed = [parse_plan(t, world.T) for t in samples["text"]]   # (plan or None, reason) per row
    valid = [i for i, (p, _) in enumerate(parsed) if p is not None]
    t1 = time.time()

    # 2. the execution groups: N continuations of every valid plan
    plans = [parsed[i][0] for i in valid]
    if plans:
        lat, videos, switch, ctx, xs, x_nexts, logp_old = rollout(plans, g)
    t2 = time.time()

    # 3. rewards: an invalid plan gets 0, never a crash
    jobs = [(videos[r], batch[valid[r // N] // M], plans[r // N], int(switch[r])) for r in range(len(plans) * N)]
    scores = pool.map(judge, jobs, chunksize=4) if jobs else []
    terms = {"plan_quality": torch.zeros(len(batch) * M), "temporal": torch.zeros(len(batch) * M)}
    for vi, i in enumerate(valid):
        terms["plan_quality"][i] = rewards.plan_quality(parsed[i][0], batch[i // M], world.T)
        terms["temporal"][i] = float(np.mean([scores[vi * N + n]["temporal"] for n in range(N)]))
    r_plan = w_plan_quality * terms["plan_quality"] + w_temporal * terms["temporal"]
    has_switch = [vi for vi in range(len(plans)) if switch[vi * N] >= 0]  # execution groups with a transition
    rows = torch.tensor([vi * N + n for vi in has_switch for n in range(N)], dtype=torch.long)
    r_exec = torch.tensor([w_local * scores[r]["local"] + w_aesthetic * scores[r]["aesthetic"] for r in rows.tolist()])
    t3 = time.time()

    # 4. the updates
    stats = {}
    if train_planner:
        adv = group_advantages(r_plan, M).clamp(-adv_clip, adv_clip).to(device)
        stats |= planner_update(samples, adv)
    if train_executor:
        if len(rows):
            adv = group_advantages(r_exec, N).clamp(-adv_clip, adv_clip).to(device)
            d = rows.to(device)
            stats |= executor_update(lat[d], ctx[d], switch[rows], xs[d], x_nexts[d], logp_old[d], adv)
        else:  # nothing to learn from here; still join the other ranks' all-reduces
            for _ in range(num_minibatches):
                sync_grads(executor.parameters())
                e_opt.zero_grad(set_to_none=True)
    t4 = time.time()

    # 5. log (rank 0, every term averaged over ranks), checkpoint
    it += 1
    means = {"r_plan_quality": terms["plan_quality"].mean(), "r_temporal": terms["temporal"].mean(),
             "r_local": torch.tensor([scores[r]["local"] for r in rows.tolist()]).mean() if len(rows) else torch.tensor(0.0),
             "r_aesthetic": torch.tensor([scores[r]["aesthetic"] for r in rows.tolist()]).mean() if len(rows) else torch.tensor(0.0),
             "valid_plans": torch.tensor(len(valid) / len(parsed))}
    means = {k: all_mean(v.float().to(device)).item() for k, v in means.items()}
    if ddp:  # the ranks' weights must stay identical: averaged gradients, same optimizer steps
        sums = torch.tensor([sum(p.double().sum() for p in list(executor.parameters()) + list(planner.model.parameters()))],
                            device=device)
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        stats["rank_weight_spread"] = (hi - lo).item()
    rec = {"iter": it, "ranks": world_size, **{k: round(v, 4) for k, v in means.items()}, **{k: round(float(v), 6) for k, v in stats.items()},
           "invalid_reasons": sorted({r for p, r in parsed if p is None})[:3],
           "t_plan": round(t1 - t0, 2), "t_rollout": round(t2 - t1, 2), "t_judge": round(t3 - t2, 2),
           "t_update": round(t4 - t3, 2), "minutes": round((time.time() - t_start) / 60, 2)}
    if master:
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.update(1)
        bar.set_postfix(temporal=f"{means['r_temporal']:.3f}", local=f"{means['r_local']:.3f}")
        if it % ckpt_every == 0:
            save_checkpoint()
            reward_curve(os.path.join(out_dir, "rewards.png"), log_path)
bar.close()
if master:
    save_checkpoint()
    reward_curve(os.path.join(out_dir, "rewards.png"), log_path)
    print(f"tempact: {it} iterations, exported to {out_dir}")
if ddp:
    dist.destroy_process_group()
pool.terminate()
