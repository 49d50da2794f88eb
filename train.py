"""
TempAct: planner-executor RL that makes an autoregressive video model follow temporally ordered
instructions. One iteration, for each instruction of the batch (SPEC "The TempAct loop"):

  1. the planner samples M plans (the planning group), keeping their token log-probs;
  2. per plan, the executor streams the shared context up to the first prompt switch (or, not in the
     paper, with transition="random" one drawn at random, with start_frac the video's start), then N
     continuations (the execution group): the transition chunk's denoising steps are sampled from the
     policy's Gaussian and their log-probs recorded, the rest runs to the end of the video
     (policy_chunks, policy_steps: not in the paper, the later chunks' steps can be the policy's too);
  3. rewards: plan quality + temporal following (mean over the N continuations) for the planner;
     local step following + aesthetic on the transition chunk for the executor, plus (w_exec_temporal;
     not in the paper, which has it at 0) the temporal following of the continuation's own video;
  4. GSPO for the planner (advantages within the M plans); Flow-GRPO for the executor on the
     transition chunk (advantages within each group of N, clipped ratio, KL to the frozen base); not in
     the paper, sft_lr adds RAFT: flow matching on each instruction's best continuation, every chunk; dpo_lr
     Diffusion-DPO on each execution group's best and worst continuation.

    python train.py                                            # the shapes world, one GPU or the CPU
    torchrun --standalone --nproc_per_node=4 train.py          # K GPUs: each rank its own instructions
    python train.py --train_planner=False --out_dir=out-noplanner   # an ablation
    torchrun --nproc_per_node=8 train.py config/selfforcing.py --planner_path=Qwen3-8B --judge_vlm=Qwen3-VL-8B-Instruct \
        --pickscore=PickScore_v1 --pickscore_processor=CLIP-ViT-H-14-laion2B-s32B-b79K   # a real backbone
    torchrun --standalone --nproc_per_node=4 train.py config/wan_bench.py   # one Wan-scale iteration, random weights

The world's executor denoises with Euler ODE steps, and the transition chunk with Flow-GRPO's SDE
(every step but the last). Self-Forcing / LongLive denoise with their distilled few-step sampler
(predict x0, re-noise with fresh noise): the re-noise is itself a Gaussian step, N((1 - s') x0, s'^2),
so the transition chunk samples those steps as they are and records their log-probs.

The shared context: the N rows of a plan draw the same noise for every chunk before the switch (the
ODE is deterministic and a re-noise draws shared noise too), so the context they see is the same
(flat_groups gives each row its own). All noise is drawn before streaming, so rows can stream in
batches of rollout_rows (a Wan-size KV cache is 6 GB a row) with the same result.

Processes: each rank takes its own instructions (drawn together, never the same twice in one
iteration) and its own seed; a plan's M x N group never leaves its rank, so advantages are
computed locally. The executor is replicated with gradients averaged by hand (DDP-style); the
planner is sharded with FSDP2 (fully_shard) for real backbones (planner_shard).
"""

import copy
import json
import os
import random
import shutil
import time
from contextlib import contextmanager, nullcontext

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
max_minutes = 9.0         # ... or this much training time (counted across resumes), whichever comes first
instructions = 0          # instructions per iteration, per rank; 0: 32 on the world (fewer, larger updates
                          # beat 8 there in the same minutes, EXPERIMENTS.md), 8 on real backbones
M = 4                     # plans per instruction (the planning group)
N = 4                     # continuations per plan (the execution group)
min_steps, max_steps = 2, 4   # training instructions have this many steps (a switch is needed)
pair_frac = 0.0           # the world: this share of training instructions has two objects and a two-object step (as Hard;
                          # 0.5 did not help Hard, EXPERIMENTS.md)
prompts = ""              # a file of instructions, one a line ('': sampled from the shapes world's grammar)
train_planner = True
train_executor = True
smoothing = "none"        # prompt smoothing at span ends: ramp (the paper's) | none (did better on the world, EXPERIMENTS.md)
flat_groups = False       # ablation: no shared context, every continuation its own rollout
transition_noise = "own"  # the transition chunk's start noise in an execution group: shared | own (see rollout)
later_noise = "own"       # the noise of the chunks after it: shared | own. Both shared: a group's continuations differ
                          # only by the policy's recorded steps (common random numbers, see rollout)
transition = "first"      # the prompt switch an execution group branches at: first (the paper's) | random (one of the
                          # plan's switches, drawn per plan, so the later steps of long instructions get policy steps
                          # too; on the world not told apart from first, EXPERIMENTS.md) | any (the world, not in the
                          # paper: any chunk from the first switch on, drawn per plan; a chunk inside a step is judged by
                          # rewards.local_step_continuing, so unasked changes are charged to the chunk they start in;
                          # it gained half what first did and left the unasked changes as they were, EXPERIMENTS.md)
start_frac = 0.0          # not in the paper: this share of execution groups (drawn per plan) branches at the video's start
                          # instead: chunk 0 is the policy's, the group shares only its plan, and the local judge asks for
                          # the first step to start there and nothing else. Every plan's first step starts at chunk 0,
                          # which the paper's groups never explore; one-step plans then train the executor too (0.5 on
                          # the world: not told apart from 0, and the first chunk came out as before, EXPERIMENTS.md)
# planner (GSPO)
planner_lr = 3e-5
planner_temperature = 1.0
plan_tokens = 256         # the planner's budget of new tokens per plan
gspo_eps_low, gspo_eps_high = 3e-4, 4e-4
w_plan_quality, w_temporal = 1.0, 1.0
# executor (Flow-GRPO)
executor_lr = 2e-5        # full-weight RL: at 1e-4 the world executor collapsed; 2e-5 beat 1e-5, 4e-5 did no better (EXPERIMENTS.md)
sample_steps = 10         # the world: Euler steps per chunk
denoising_steps = (1000, 750, 500, 250)  # real backbones: the distilled few-step sampler's timesteps per chunk
sample_shift = 3.0        # the Euler schedule's shift (pretrain.py's train_shift)
noise_level = 1.0         # Flow-GRPO's a (the world's SDE; Flow-GRPO uses 0.7, 1.0 did better here on two bases, EXPERIMENTS.md)
policy_chunks = 1         # chunks, from the transition chunk on, whose steps are the policy's (sampled, log-probs recorded,
                          # updated): 1 = the transition chunk alone (the paper); 0 = every chunk to the end of the video.
                          # Each chunk's re-scoring runs its context again: 0 cost 3-4.5x per update on the world and
                          # gained less in the same minutes (EXPERIMENTS.md)
policy_steps = 0          # of each such chunk's steps, the first this many (0: all K, every step but the last); the
                          # others run the ODE (Flow-GRPO-Fast likewise trains a few early steps)
step_weight = "none"      # not in the paper (TempFlow-GRPO's noise-aware weighting, He et al. 2025, in our terms): none | noise.
                          # A policy step's log-prob gradient in v is A eps |d mean / d v| / std, so unweighted the world's late,
                          # low-noise steps pull 20x harder than its first ones, though the reward depends most on the early ones;
                          # noise scales each step's terms by std / |d mean / d v| (mean 1 over the steps): every step the same
                          # (+14.4% and +15.2% at lr 2e-5 and 4e-5 on the world, the defaults' band: EXPERIMENTS.md)
clip_range = 1e-3         # executor ratio clip
kl_beta = 0.01            # KL to the frozen base executor
w_local, w_aesthetic = 1.0, 0.2
w_exec_temporal = 1.0     # the continuation's whole-video temporal score in the executor's reward too: what its
                          # transition chunk leads to (the paper judges that chunk alone: 0; 1 did better, 3 no better, EXPERIMENTS.md)
sft_lr = 0.0              # not in the paper (RAFT, Dong et al. 2023): after the Flow-GRPO steps, flow matching (pretrain.py's
                          # loss) on each instruction's best continuation by the executor's reward, its whole video under its
                          # own plan's prompts, num_minibatches steps of a second AdamW at this rate; 0: off. Flow-GRPO's
                          # signal reaches the transition chunk's steps only, this one every chunk (the world only)
dpo_lr = 0.0              # not in the paper (Diffusion-DPO, Wallace et al. 2024, in flow matching's terms): after the Flow-GRPO
                          # steps, each execution group's best and worst continuation by the executor's reward make a pair, and
                          # num_minibatches steps of a second AdamW at this rate raise the winner's flow-matching likelihood over
                          # the loser's, each against the frozen base, so what the two share cancels (the context, and the
                          # executor's own artefacts that sft_lr fits); every chunk, the world only. 0: off
dpo_beta = 2000.0         # Diffusion-DPO's beta, on the rows' mean flow-matching errors
local_reward = "graded"   # the world's local judge: graded (each half in [0, 1]) | binary (yes/no halves; ties in ~half the groups)
                          # | paced (graded, a move's start against the script's pace, not a 3 px start: not in the paper;
                          # two-object steps that start slow mostly stop short; level with graded in one 7.0-minute run,
                          # EXPERIMENTS.md, twenty-sixth attempt)
adv_clip = 5.0
adv_std = "none"          # advantages (r - group mean) / std of: group (GRPO) | batch (Flow-GRPO's global_std) | none (Dr. GRPO)
num_minibatches = 4       # each rollout batch is split in 4 updates, for both models
grad_clip = 1.0
ckpt_every = 10           # iterations between checkpoints
save_checkpoints = True   # False: write nothing but the log (benchmarks)
# real backbones (config/selfforcing.py, config/longlive.py set these; backbones.py reads the files)
backbone = "world"        # world | selfforcing | longlive
executor_config = "world"
executor_ckpt = ""
executor_key = "generator_ema"
lora_ckpt = ""
lora_rank = 256
lora_alpha = 256.0
vae_ckpt = ""
vae_config = "wan2.1"     # vae.VAE_CONFIGS
t5_ckpt = ""
t5_tokenizer = ""
sink_frames = 0
window_frames = 0
height = 480              # video pixels; latents are height/8 x width/8
width = 832
latent_frames = 21
timestep_shift = 5.0      # the distilled sampler's shift
switch_recache = False    # LongLive: re-run the cached frames with the new prompt at a switch
planner_path = ""         # a Qwen3 folder (Qwen3-8B), tokenizer included
judge_llm = ""            # plan quality: a Qwen3 folder ('': planner_path's base weights, frozen)
judge_vlm = ""            # temporal and local step following: a Qwen3-VL folder (Qwen3-VL-8B-Instruct)
pickscore = ""            # aesthetic: PickScore_v1 ...
pickscore_processor = ""  # ... and its processor (CLIP-ViT-H-14-laion2B-s32B-b79K)
video_fps = 16.0          # Wan's frame rate, for the VLM's timestamps
# scale
planner_shard = "auto"    # FSDP2 for the planner under torchrun: auto (real backbones) | always | never
rollout_rows = 0          # rows streamed (and VAE-decoded) together; 0 = all
micro_batch = 0           # executor update: rows per forward/backward; 0 = a whole minibatch
grad_ckpt = False         # recompute activations in the backward (executor blocks, planner layers)
sdpa = False              # attention through torch's SDPA instead of our Triton kernel (model.SDPA)
fuse_rollouts = True      # CUDA: the rollout's float32 norms and modulations torch.compile'd (model.COMPILE). They, not
                          # the matmuls, bound a world rollout; re-scoring and the update stay eager, so the first ratio is 1
offload = False           # frozen models wait in host memory and visit the GPU for their phase only
random_weights = False    # benchmarks: every model built at full size with random weights, nothing read
planner_layers = 36       # random_weights: the Qwen3-8B-shaped planner's depth
stand_in_plans = False    # random-weight planners write no valid plan: roll out the instruction's own steps instead
warmup = False            # benchmarks: first run the executor once at every attention shape (kernel tuning), untimed
# -----------------------------------------------------------------------------
from configurator import configure, die, require_int  # noqa: E402

config = configure(globals())

import backbones  # noqa: E402
import model as Mod  # noqa: E402
import rewards  # noqa: E402
import world  # noqa: E402
from planner import Planner, blend_contexts, gspo_loss, group_advantages, minibatches, parse_plan, smooth_weights  # noqa: E402
from sample import SetupError, load_world  # noqa: E402

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
cuda = device.startswith("cuda")
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
real = backbone != "world"
if real and (sft_lr or dpo_lr):
    die(f"{'sft_lr' if sft_lr else 'dpo_lr'} needs the world: the distilled real executors were not trained by flow matching")
if sft_lr and dpo_lr:
    die("sft_lr and dpo_lr share one optimizer: set one of them")
if real and transition == "any":
    die("transition=any needs the world's judges: the VLM judge has no question for a chunk inside a step")
instructions = config["instructions"] = instructions or (8 if real else 32)
if instructions < 0:
    die(f"instructions must be positive (or 0 for the backbone's default), not {instructions}")
fsdp = ddp and (planner_shard == "always" or (planner_shard == "auto" and real))
if not (train_planner or train_executor):
    die("nothing to train: set train_planner or train_executor")
for name, choices in (("planner_shard", ("auto", "always", "never")), ("smoothing", ("ramp", "none")),
                      ("transition", ("first", "random", "any")), ("transition_noise", ("shared", "own")), ("later_noise", ("shared", "own")), ("local_reward", ("graded", "binary", "paced")),
                      ("adv_std", ("group", "batch", "none")), ("step_weight", ("none", "noise"))):
    if globals()[name] not in choices:
        die(f"{name} must be {', '.join(choices[:-1])} or {choices[-1]}, not '{globals()[name]}'")
# counts and ranges, refused here in one line rather than as a traceback after the run's folder is written.
# A group of one has no advantage: GSPO compares an instruction's M plans, Flow-GRPO a plan's N continuations
require_int("M", M, 2 if train_planner else 1, why=" (1 only with --train_planner=False)")
require_int("N", N, 2 if train_executor else 1, why=" (1 only with --train_executor=False)")
require_int("num_minibatches", num_minibatches, 1)
require_int("ckpt_every", ckpt_every, 1)
require_int("max_steps", max_steps, 1, world.T // world.CHUNK, why=" (the world's videos have that many chunks)")
require_int("min_steps", min_steps, 1, max_steps)
for name in ("pair_frac", "start_frac"):
    if not (isinstance(globals()[name], (int, float)) and 0 <= globals()[name] <= 1):
        die(f"{name} must be in [0, 1], not {globals()[name]!r}")
if not (isinstance(planner_temperature, (int, float)) and planner_temperature > 0):
    die(f"planner_temperature must be > 0, not {planner_temperature!r}")
# resuming: out_dir's run must be this one. Only how long and how it runs may change: a run that
# switched settings halfway is no run anyone can reproduce (and AdamW's saved lr would override a new one)
RESUME_FREE = {"max_iters", "max_minutes", "ckpt_every", "save_checkpoints", "out_dir", "device", "rollout_rows",
               "micro_batch", "grad_ckpt", "sdpa", "offload", "warmup", "planner_shard", "fuse_rollouts"}
saved_config = os.path.join(out_dir, "config.json")  # state.pt holds it too, but is read after the models load
if os.path.exists(os.path.join(out_dir, "state.pt")) and os.path.exists(saved_config):
    try:
        with open(saved_config) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        die(f"cannot read {saved_config} to resume: {e}")
    now = json.loads(json.dumps(config))  # tuples as lists, as saved
    changed = [f"{k}={saved[k]!r} there, {now[k]!r} here" for k in sorted(now)
               if k in saved and k not in RESUME_FREE and saved[k] != now[k]]
    if changed:
        die(f"{out_dir} holds a run with other settings ({'; '.join(changed)}): resume it with those, or choose another --out_dir")
Mod.SDPA = sdpa
T = latent_frames if real else world.T
if not real and isinstance(sample_steps, int) and sample_steps >= 2:
    sampler, sigmas = "ode", Mod.ode_sigmas(sample_steps, sample_shift).tolist() + [0.0]  # sigma_0 = 1 > ... > 0
elif real and len(denoising_steps) >= 2 and all(isinstance(t, int) and 0 < t <= 1000 for t in denoising_steps):
    sampler, sigmas = "renoise", Mod.few_step_sigmas(denoising_steps, timestep_shift).tolist() + [0.0]
elif real:
    die(f"denoising_steps must be a tuple of >= 2 timesteps in 1..1000, not {denoising_steps!r}")
else:
    die(f"sample_steps must be an int >= 2 (Euler steps per chunk), not {sample_steps!r}")
K = len(sigmas) - 2  # steps a chunk could give the policy: every step but the last (its Gaussian has no width)
require_int("policy_chunks", policy_chunks, 0, why=" (0: all)")
require_int("policy_steps", policy_steps, 0, K, why=f" (0: all {K}, every step of a chunk but the last)")
KP = policy_steps or K                        # policy steps per policy chunk: sigma_0 .. sigma_KP-1


def all_mean(x: torch.Tensor) -> torch.Tensor:
    if ddp:
        dist.all_reduce(x)  # SUM (gloo has no AVG)
        x /= world_size
    return x


def sync_grads(params):
    """DDP by hand: every rank adds its gradients into every other's, then they are averaged."""
    if not ddp:
        return
    params = list(params)
    for p in params:
        if p.grad is None:  # a rank with nothing to learn from this time still joins the all-reduce
            p.grad = torch.zeros_like(p)
    for w in [dist.all_reduce(p.grad, async_op=True) for p in params]:  # queued together, waited once
        w.wait()
    for p in params:
        p.grad /= world_size


def sync():
    if cuda:
        torch.cuda.synchronize()


@contextmanager
def resident(*models):
    """offload: a frozen model waits in host memory and is on the GPU only inside this block."""
    if offload and cuda:
        for m in models:
            m.to(device)
    try:
        yield
    finally:
        if offload and cuda:
            for m in models:
                m.to("cpu")


def shard(model):
    """FSDP2: every decoder layer and then the whole model fully_shard-ed over all ranks. Float32 shards (the
    master weights and AdamW states, 16 bytes a parameter / ranks); real backbones compute in bf16."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh("cuda" if cuda else "cpu", (world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda and real else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model._is_fsdp_managed_module = True  # transformers' generate then keeps the ranks in step (synced_gpus)
    return model


@contextmanager
def gathered(model):
    """FSDP2 during generation: keep each layer's gathered weights from the first token on (one all-gather
    per layer per plan batch, not per token); shards again afterwards."""
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)] if fsdp else []
    mods = [m for m in mods if hasattr(m, "set_reshard_after_forward")]  # older torch: one gather per token
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


# -----------------------------------------------------------------------------
# models: the trained planner and executor, the frozen reference executor, the frozen text encoder,
# (real backbones) the VAE and the judges

torch.manual_seed(seed)  # random_weights: every rank builds the same models
dt = torch.bfloat16 if cuda else torch.float32
home = "cpu" if offload and cuda else device  # where frozen models wait
try:
    if not real:
        models = load_world(init_from, device)
        planner, executor, text_enc, tokenizer = models["planner"], models["executor"], models["text_enc"], models["tokenizer"]
        frame_shape = (executor.cfg.in_dim, world.H, world.W)  # pixel space
    else:
        from transformers import CLIPModel, Qwen3ForCausalLM, Qwen3VLForConditionalGeneration

        import vae as V
        if height % 16 or width % 16 or T % 3:
            die(f"height and width must be multiples of 16 and latent_frames of 3, got {height}x{width}, {T}")
        if random_weights:  # full-size shapes, random weights, built on the GPU
            parts = backbones.random_backbone(executor_config, device, dt, vae_config)
            tok = backbones.random_tokenizer()
            with torch.device("meta"):
                pmodel = Qwen3ForCausalLM._from_config(backbones.qwen3_config(tok, planner_layers), dtype=torch.float32)
            if fsdp:
                shard(pmodel)  # shards on the meta device; each rank then materialises its own shards only
            backbones.init_random_(pmodel, device)
            planner = Planner(pmodel, tok, T)
            llm_judge = rewards.LLMJudge(backbones.build(Qwen3ForCausalLM, backbones.qwen3_config(tok), device, dt), tok)
            vlm_judge = rewards.VLMJudge(backbones.build(Qwen3VLForConditionalGeneration, backbones.qwen3_vl_config(tok),
                                                         device, dt), backbones.qwen3_vl_processor(tok), fps=video_fps)
            ctok = backbones.random_tokenizer(clip=True)
            pick = rewards.PickScore(backbones.build(CLIPModel, backbones.clip_config(ctok), device, dt).eval(),
                                     backbones.clip_processor(ctok))
            for m in (parts["text_encoder"], llm_judge.model, vlm_judge.model, pick.model):
                m.requires_grad_(False).to(home)
            # random judges put no mass on the answer tokens: read the expectation over them anyway, one forward
            # per question as a trained judge needs, instead of the text fallback's extra decoding
            llm_judge.min_mass = vlm_judge.min_mass = 0.0
        else:
            backbones.check_paths(config, "config")
            for key in ("planner_path", "judge_vlm", "pickscore", "pickscore_processor") + (("judge_llm",) if judge_llm else ()):
                if not globals()[key] or not os.path.isdir(globals()[key]):
                    die(f"{key} '{globals()[key]}' is not a folder: real backbones need it (see train.py's docstring)")
            exe = backbones.load_executor(executor_ckpt, executor_config, executor_key, lora_ckpt, lora_rank, lora_alpha,
                                          device, dt, sink_frames=sink_frames, window_frames=window_frames)
            parts = {"executor": exe, "text_encoder": backbones.load_t5(t5_ckpt, home, dt),
                     "tokenizer": backbones.load_tokenizer(t5_tokenizer), "vae": V.load_vae(vae_ckpt, device, dt, vae_config)}
            planner = Planner.from_pretrained(planner_path, T, device="cpu" if fsdp else device, dtype=torch.float32)
            if fsdp:
                shard(planner.model)
            llm_judge = rewards.LLMJudge.from_pretrained(judge_llm or planner_path, home, dt)
            vlm_judge = rewards.VLMJudge.from_pretrained(judge_vlm, home, dt, fps=video_fps)
            pick = rewards.PickScore.from_pretrained(pickscore, pickscore_processor, home, dt)
        executor, text_enc, tokenizer, vae = parts["executor"], parts["text_encoder"], parts["tokenizer"], parts["vae"]
        frame_shape = (executor.cfg.in_dim, height // 8, width // 8)  # latents: the VAE's stride is 8
except (SetupError, ValueError, OSError) as e:
    die(str(e).splitlines()[0] if str(e) else type(e).__name__)
reference = copy.deepcopy(executor).eval()  # the base executor as loaded, frozen, for the KL term
if not (fsdp and real):  # (real backbones' planners are float32 already, and sharded)
    planner.model.float()  # float32 master weights (FSDP2 on a GPU: bf16 forwards)
if fsdp and not real:
    shard(planner.model)
executor.float()
for p in list(text_enc.parameters()) + list(reference.parameters()):
    p.requires_grad_(False)
if grad_ckpt:  # memory for one block's activations instead of all of them, for a second forward
    Mod.recompute_blocks(executor)
    enable = getattr(planner.model, "activation_checkpointing_enable", None)  # newer transformers' name ...
    (enable or planner.model.gradient_checkpointing_enable)({"use_reentrant": False})  # ... older ones have only this
p_opt = torch.optim.AdamW(planner.model.parameters(), lr=planner_lr, betas=(0.9, 0.99), weight_decay=0.0)
e_opt = torch.optim.AdamW(executor.parameters(), lr=executor_lr, betas=(0.9, 0.99), weight_decay=0.0)
a_opt = (torch.optim.AdamW(executor.parameters(), lr=sft_lr or dpo_lr, betas=(0.9, 0.99), weight_decay=0.0)
         if sft_lr or dpo_lr else None)  # the executor's steps after Flow-GRPO's (sft_lr or dpo_lr)
C = executor.cfg.chunk_frames
PC = max(1, min(policy_chunks or T // C, T // C - (start_frac == 0)))  # policy chunks a row has at most: a switch is
                                                                     # never in chunk 0, where only start_frac's groups begin
S = PC * KP                                   # a row's recorded steps: chunk p's step k at p * KP + k
state_path = os.path.join(out_dir, "state.pt")
it, minutes_before = 0, 0.0
full = None
if fsdp:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
try:
    state = Mod.load_state(state_path, "cpu" if fsdp else device)
except Mod.CheckpointError as e:
    die(str(e))
if state is not None:
    if fsdp:  # every rank reads the full state and keeps its own shards
        set_model_state_dict(planner.model, state["planner"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(planner.model, p_opt, state["p_opt"], options=StateDictOptions(full_state_dict=True))
    else:
        planner.model.load_state_dict(state["planner"])
        p_opt.load_state_dict(state["p_opt"])
    executor.load_state_dict(state["executor"])
    e_opt.load_state_dict(state["e_opt"])
    if a_opt is not None:  # (sft_lr runs saved before dpo_lr came called it s_opt)
        a_state = state.get("a_opt", state.get("s_opt"))
        if a_state is None:
            die(f"{state_path} has no state for sft_lr's or dpo_lr's optimizer: resume it without them")
        a_opt.load_state_dict(a_state)
    it, minutes_before = state["iter"], state.get("minutes", 0.0)
    if master:
        print(f"resumed from iteration {it} ({minutes_before:.1f} minutes trained)")


def save_checkpoint():
    """The resumable state first, then the exported models; both written atomically. Every rank calls it
    (an FSDP2 planner's full weights are gathered from all of them); rank 0 writes."""
    if fsdp:
        p_sd, p_opt_sd = get_model_state_dict(planner.model, options=full), get_optimizer_state_dict(planner.model, p_opt, options=full)
    else:
        p_sd, p_opt_sd = planner.model.state_dict(), p_opt.state_dict()
    if not master:
        return
    os.makedirs(out_dir, exist_ok=True)
    state = {"planner": p_sd, "executor": executor.state_dict(), "p_opt": p_opt_sd, "e_opt": e_opt.state_dict(),
             **({"a_opt": a_opt.state_dict()} if a_opt else {}), "iter": it, "minutes": (time.time() - t_start) / 60,
             "config": config}
    Mod.save_state(state, state_path)
    name = "executor" if real else "world_executor"
    Mod.save_pretrained(executor, os.path.join(out_dir, f"{name}.safetensors"), extra={"iter": it},
                        state_dict={k: v.to(torch.bfloat16) for k, v in executor.state_dict().items()})
    if not real:
        text = os.path.join(out_dir, "world_text_encoder.safetensors")  # frozen: the base's file as it is
        shutil.copyfile(os.path.join(init_from, "world_text_encoder.safetensors"), text + ".tmp")
        os.replace(text + ".tmp", text)
    tmp = os.path.join(out_dir, "planner.tmp")
    planner.model.save_pretrained(tmp, state_dict=p_sd, safe_serialization=True)
    planner.tokenizer.save_pretrained(tmp)
    final = os.path.join(out_dir, "planner" if real else "world_planner")
    if os.path.exists(final):
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    if os.path.exists(final + ".old"):
        shutil.rmtree(final + ".old")


# -----------------------------------------------------------------------------
# instructions, text, rollouts


prompt_list = None
if prompts:
    try:
        prompt_list = [line.strip() for line in open(prompts) if line.strip()]
    except OSError as e:
        die(f"cannot read prompts file {prompts}: {e.strerror}")
    if not prompt_list:
        die(f"prompts file {prompts} holds no instruction")
    prompt_list = random.Random(seed).sample(prompt_list, len(prompt_list))  # walked in this shuffled order


def instructions_for(step: int) -> list[str]:
    """This rank's instructions. All ranks draw the whole iteration's batch from one stream and take their
    own slice, so no instruction is done twice in an iteration; a prompts file is walked in a shuffled order."""
    if prompt_list is not None:
        first = (step * world_size + rank) * instructions
        return [prompt_list[(first + k) % len(prompt_list)] for k in range(instructions)]
    rng = random.Random(seed * 1_000_003 + step * 1009)
    batch = []
    while len(batch) < world_size * instructions:
        n = rng.randint(min_steps, max_steps)
        pair = pair_frac > 0 and rng.random() < pair_frac  # no draw at 0: the default's instruction stream stays as it was
        x = world.sample_training_instruction(rng, n, need_pair=pair)
        if x not in batch:
            batch.append(x)
    return batch[rank * instructions:(rank + 1) * instructions]


def stand_in_plan(instruction: str):
    """stand_in_plans: the instruction's own steps on their ground-truth spans (even spans if they do not fit)."""
    try:
        return world.ground_truth_plan(instruction, T)
    except world.ParseError:
        try:
            steps = world.step_prompts(instruction)[:T // C]
        except world.ParseError:  # not the world's grammar: one step
            return [(instruction, 0, T)]
        b = [round(k * (T // C) / len(steps)) * C for k in range(len(steps) + 1)]
        return [(p, s, e) for p, s, e in zip(steps, b, b[1:])]


@torch.no_grad()
def encode(texts: list[str]) -> torch.Tensor:
    """Step prompts -> (P, text_len, text_dim) text-encoder states, zeros past each prompt."""
    return Mod.encode_text(text_enc, tokenizer, [backbones.clean_prompt(t) if real else t for t in texts],
                           executor.cfg.text_len, device)


@torch.no_grad()
def plan_contexts(plans: list) -> list[torch.Tensor]:
    """Plans -> per chunk a (P, text_len, text_dim) float32 context, with prompt smoothing. Every distinct
    step prompt is encoded once."""
    texts = sorted({p for plan in plans for p, _, _ in plan})
    with resident(text_enc):
        states = encode(texts)  # (U, L, D)
    where = {t: i for i, t in enumerate(texts)}
    per_plan = [blend_contexts(states[[where[p] for p, _, _ in plan]], smooth_weights(plan, T, C, smoothing))
                for plan in plans]  # each (chunks, L, D)
    return list(torch.stack(per_plan, dim=1).float())


def sampler_step(x, v, s: float, s_next: float, noise):
    """The executor's own step: Euler (world), or x0 prediction re-noised with fresh noise (Self-Forcing)."""
    if sampler == "ode":
        return Mod.ode_step(x.float(), v.float(), s, s_next)
    x0 = x.float() - s * v.float()
    return Mod.renoise_step(x0, s_next, noise=noise)[0] if s_next > 0 else x0


def policy_step(x, v, s: float, s_next: float, noise=None, x_next=None):
    """The transition chunk's stochastic step and its Gaussian log-prob: Flow-GRPO's SDE for the Euler
    sampler, the re-noise itself for the distilled one. Returns (x_next, logp, mean, std)."""
    if sampler == "ode":
        return Mod.sde_step(x, v, s, s_next, noise_level, noise=noise, x_next=x_next)
    return Mod.renoise_step(x.float() - s * v.float(), s_next, noise=noise, x_next=x_next)


def step_weights() -> torch.Tensor:
    """(KP,) each policy step's weight in the executor's loss: ones, or (step_weight="noise") std / |d mean / d v|
    over their mean. A step's log-prob gradient in v is A eps |d mean / d v| / std, so weighted it is A eps times
    one constant at every step. The mean is linear in v: a unit v gives the slope."""
    if step_weight == "none":
        return torch.ones(KP)
    zero, one = torch.zeros(1, 1), torch.ones(1, 1)  # (batch, element)
    w = []
    for s, s_next in zip(sigmas[:KP], sigmas[1:KP + 1]):
        _, _, m0, std = policy_step(zero, zero, s, s_next, x_next=zero)
        w.append(float(std) / abs(float(policy_step(zero, one, s, s_next, x_next=zero)[2] - m0)))
    return torch.tensor(w) / (sum(w) / KP)


def start_chunk(step: tuple) -> int:
    """The chunk where a plan step (prompt, start, end) takes over: its start frame rounded up to a chunk."""
    return -(-step[1] // C)


def transition_chunks(plans: list) -> list[int]:
    """Per plan, the chunk its execution group branches at: where its second step starts (transition="first"),
    where one of its later steps starts (random), or any chunk from there to the end (any), the last two drawn
    from the global generator; -1: no switch in the video. With start_frac, that share of plans (drawn) branch
    at chunk 0, where the first step starts, one-step plans included."""
    starts = [sorted({start_chunk(s) for s in p[1:]} & set(range(T // C))) for p in plans]
    if transition == "any":
        starts = [list(range(js[0], T // C)) if js else [] for js in starts]
    at_start = (torch.rand(len(plans)) < start_frac).tolist() if start_frac > 0 else [False] * len(plans)
    return [0 if first else (js[0] if transition == "first" else js[int(torch.randint(len(js), ()))]) if js else -1
            for js, first in zip(starts, at_start)]


@torch.no_grad()
def rollout(plans: list, g: torch.Generator):
    """
    plans: P valid plans -> P*N rows (row r is continuation r % N of plan r // N).
    Returns latents (R, T, c, h, w) float, the switch chunk per row (-1: none, a one-step plan), the per-chunk
    contexts (R, chunks, L, D), and the policy's recorded steps, the first KP of each of the PC chunks from
    the switch on: xs, x_nexts (R, S, C, c, h, w), logp_old (R, S) (zeros past the video's end).
    """
    P, R, nc = len(plans), len(plans) * N, T // C
    ctx = torch.stack([c.repeat_interleave(N, 0) for c in plan_contexts(plans)], 1)  # (R, nc, L, D)
    switch = torch.tensor(transition_chunks(plans)).repeat_interleave(N)  # (R,) -1: no transition
    shape = (C, *frame_shape)
    # every draw up front: a chunk's start noise, plus (re-noise sampler) one per re-noise step; shared within a plan
    draws = 1 if sampler == "ode" else len(sigmas) - 1
    own = torch.randn((R, nc, draws, *shape), generator=g, device=device)
    shared = torch.randn((P, nc, draws, *shape), generator=g, device=device).repeat_interleave(N, 0)
    eps = torch.randn((R, S, *shape), generator=g, device=device)  # the policy's steps
    lat = torch.zeros(R, T, *frame_shape, device=device)
    xs = torch.zeros(R, S, *shape, device=device)
    x_nexts, logp_old = torch.zeros_like(xs), torch.zeros(R, S, device=device)
    ph, pw = executor.cfg.patch_size[1:]
    executor.eval()
    for r0 in range(0, R, rollout_rows or R):
        rows = slice(r0, min(R, r0 + (rollout_rows or R)))
        B, sw = rows.stop - rows.start, switch[rows].to(device)
        cache = Mod.KVCache(executor.cfg, B, (frame_shape[1] // ph) * (frame_shape[2] // pw), T, device=device,
                            dtype=torch.bfloat16 if cuda else torch.float32)  # autocast's k, v
        for j in range(nc):
            cj = ctx[rows, j]
            if j > 0 and not torch.equal(cj, ctx[rows, j - 1]):
                if switch_recache:  # LongLive: the cached frames are run again with the new prompt
                    with autocast:
                        Mod.recache(executor, cache, lat[rows, :j * C], cj)
                else:
                    cache.clear_cross()
            # a group shares its plan's noise up to the switch. With transition_noise="shared" the transition
            # chunk also starts from one noise, so its N continuations differ only by the recorded SDE steps: the
            # group mean is then the value of the state those steps act from, and the start noise (no action of
            # the policy) adds nothing to the advantages' variance. later_noise="shared" does the same for the chunks
            # after it, which the whole-video terms see. On the world neither gained, alone or together (EXPERIMENTS.md)
            together = ((sw < 0) | (j < sw) | ((j == sw) & (transition_noise == "shared"))
                        | ((j > sw) & (later_noise == "shared")))
            noise = own[rows, j] if flat_groups else torch.where(together[:, None, None, None, None, None],
                                                                 shared[rows, j], own[rows, j])  # (B, draws, C, c, h, w)
            x = noise[:, 0]
            p = j - sw                                 # (B,) this chunk's place among a row's policy chunks
            sde = (sw >= 0) & (p >= 0) & (p < PC)      # rows for which it is a policy chunk
            at = torch.arange(r0, rows.stop, device=device)  # (B,) the rows' indices in the batch
            for i in range(len(sigmas) - 1):
                s, s_next = sigmas[i], sigmas[i + 1]
                with autocast:
                    v = executor(x, torch.full((B, C), 1000 * s, device=device), cj, cache=cache, start_frame=j * C)
                x_new = sampler_step(x, v, s, s_next, noise[:, i + 1] if i + 1 < draws else None)
                if i < KP and sde.any():
                    slot = p.clamp(0, PC - 1) * KP + i  # (B,) where each row records this step
                    x_pol, logp, _, _ = policy_step(x, v, s, s_next, noise=eps[at, slot])
                    at_s = (at[sde], slot[sde])
                    xs[at_s], x_nexts[at_s], logp_old[at_s] = x[sde].float(), x_pol[sde], logp[sde]
                    x_new = torch.where(sde[:, None, None, None, None], x_pol, x_new)
                x = x_new
            with autocast:
                executor(x, torch.zeros(B, C, device=device), cj, cache=cache, start_frame=j * C)
            lat[rows, j * C:(j + 1) * C] = x
        del cache
    return lat, switch, ctx, xs, x_nexts, logp_old


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(R, F, 3, H, W) in [-1, 1] -> (R, F, H, W, 3) uint8 on the host."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 1, 3, 4, 2).cpu().numpy()


@torch.no_grad()
def decode(lat: torch.Tensor) -> np.ndarray:
    """Latents (R, T, 16, h, w) -> videos (R, 1 + 4 (T - 1), H, W, 3) uint8 through the Wan VAE."""
    step = rollout_rows or len(lat)
    return np.concatenate([to_uint8(vae.decode(lat[r:r + step].to(dt))) for r in range(0, len(lat), step)])


def pixel_span(j: int) -> tuple[int, int]:
    """Video frames of latent chunk j: the first latent frame is one frame, each later one four."""
    return max(0, 4 * j * C - 3), 4 * (j + 1) * C - 3


def switch_steps(plan, sw: int) -> tuple[str | None, str]:
    """The step prompts on either side of the switch in transition chunk sw (the first step that starts there;
    None before the first step, at chunk 0)."""
    k = next(k for k in range(len(plan)) if start_chunk(plan[k]) == sw)
    return plan[k - 1][0] if k else None, plan[k][0]


def judge(args):
    """World judges for one continuation (runs in a worker process)."""
    video, instruction, plan, sw = args
    out = {"temporal": rewards.temporal_following(video, instruction)}
    if sw >= 0:  # the transition chunk: the new step should start in it, the previous one (if any) be done
        span, graded = (sw * C, sw * C + C), local_reward in ("graded", "paced")
        if any(start_chunk(s) == sw for s in plan):
            out["local"] = rewards.local_step_following(video, span, *switch_steps(plan, sw), graded=graded,
                                                        paced=local_reward == "paced")
        else:  # transition="any" branched inside a step: it should get on (if under way) and nothing else start
            step = [s for s in plan if start_chunk(s) <= sw][-1]  # the step under way (a plan's steps are in order)
            out["local"] = rewards.local_step_continuing(video, span, step[0], start_chunk(step) * C, graded=graded)
        out["aesthetic"] = rewards.aesthetic(video[span[0]:span[1]])
    return out


judge_errors = []


def judged(fn, *args) -> float:
    """A judge's score; a judge that fails scores 0 and the failure is counted and logged, not fatal."""
    try:
        return fn(*args)
    except Exception as e:
        judge_errors.append(f"{getattr(fn, '__name__', 'judge')}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return 0.0


def judge_real(videos, jobs) -> list[dict]:
    """The Qwen3-VL judge on each whole video and its transition chunk, PickScore on that chunk's frames
    against the step that should start there."""
    scores = []
    with resident(vlm_judge.model, pick.model):
        for video, (_, instruction, plan, sw) in zip(videos, jobs):
            out = {"temporal": judged(vlm_judge.temporal_following, video, instruction)}
            if sw >= 0:
                a, b = pixel_span(sw)
                before, after = switch_steps(plan, sw)
                out["local"] = judged(vlm_judge.local_step_following, video, (a, b), before, after)
                out["aesthetic"] = judged(pick.aesthetic, video[a:b], after)
            scores.append(out)
    return scores


# -----------------------------------------------------------------------------
# the executor's policy: the policy chunks' stochastic steps under the current weights


def batches_of(n: int) -> list[torch.Tensor]:
    """Always num_minibatches parts (some empty when n is small): every rank takes the same number of steps."""
    parts = minibatches(n, num_minibatches)
    return parts + [torch.zeros(0, dtype=torch.long)] * (num_minibatches - len(parts))


def chunk_steps(net, lat, ctx, j: int, xs, x_nexts):
    """Re-score the KP recorded steps of chunk j. One forward holds the clean context frames [0, jC) at t = 0
    and then the chunk at every sigma_k (model.forward_copies): each copy's v is the one the streamed
    sampler computed (test_all.py checks streaming == this forward; LongLive's re-cache, which re-encodes
    the cached frames with the new prompt, is the exception), and the context runs once, not KP times. A
    windowed model (LongLive) cannot show a copy the context: one forward per step.
    lat (B, T, c, h, w), ctx (B, chunks, L, D), xs, x_nexts (B, KP, C, c, h, w) -> logp (B, KP),
    mean (B, KP, C, c, h, w), std (KP,)."""
    B, f, dev = len(lat), j * C, lat.device
    with autocast:
        if not net.cfg.window_frames:
            v = Mod.forward_copies(net, lat[:, :f], xs, 1000 * torch.tensor(sigmas[:KP], device=dev), ctx[:, :j + 1])
        else:
            t_ctx = torch.zeros(B, f, device=dev)
            v = torch.stack([net(torch.cat([lat[:, :f], xs[:, k]], 1),
                                 torch.cat([t_ctx, torch.full((B, C), 1000 * sigmas[k], device=dev)], 1),
                                 ctx[:, :j + 1])[:, f:] for k in range(KP)], 1)                     # (B, KP, C, c, h, w)
    steps = [policy_step(xs[:, k], v[:, k], sigmas[k], sigmas[k + 1], x_next=x_nexts[:, k]) for k in range(KP)]
    return (torch.stack([s[1] for s in steps], 1), torch.stack([s[2] for s in steps], 1),
            torch.tensor([float(s[3]) for s in steps], device=dev))


def update_groups(switch: torch.Tensor) -> list[list[tuple[int, torch.Tensor]]]:
    """The executor update's minibatches (batches_of), each as (j, rows) groups: rows of one transition chunk
    j, in micro-batches of micro_batch rows. A group's rows then share their policy chunks (policy_chunks_of)."""
    return [[(j, i) for j in switch[idx].unique().tolist() for i in micro(idx[switch[idx] == j])]
            for idx in batches_of(len(switch))]


def micro(idx: torch.Tensor) -> list[torch.Tensor]:
    return list(idx.split(micro_batch)) if micro_batch else [idx]


def policy_chunks_of(j: int) -> list[tuple[int, slice]]:
    """A row whose transition chunk is j: each of its policy chunks and where its steps lie in xs (rollout)."""
    return [(j + p, slice(p * KP, (p + 1) * KP)) for p in range(min(PC, T // C - j))]


@torch.no_grad()
def rescore(groups, lat, ctx, xs, x_nexts):
    """Before the update: the recorded steps' log-probs under the current executor, through the update's own
    groups and code path so that the first ratio is exactly 1, and the frozen reference's means for the KL.
    Needs no reward, so on the world it runs while the judges do. Returns logp_old (R, S), mean_ref (R, S, C, c, h, w)."""
    executor.eval()
    logp_old, mean_ref = torch.zeros(xs.shape[:2], device=xs.device), torch.zeros_like(xs)
    for j, i in (g for part in groups for g in part):
        i = i.to(xs.device)
        for c, k in policy_chunks_of(j):
            logp_old[i, k] = chunk_steps(executor, lat[i], ctx[i], c, xs[i, k], x_nexts[i, k])[0]
            mean_ref[i, k] = chunk_steps(reference, lat[i], ctx[i], c, xs[i, k], x_nexts[i, k])[1]
    return logp_old, mean_ref


def executor_update(groups, lat, ctx, xs, x_nexts, logp_old, mean_ref, adv):
    """Flow-GRPO (FACTS 5): per policy step k, loss_k = mean(max(-A r, -A clip(r, 1 +- eps))) + beta KL,
    r = exp(logp - logp_old), KL = |mu - mu_ref|^2 / (2 std^2); a row's steps' losses averaged with weights
    w_k (step_weights; KP in each of its policy chunks, all with the row's advantage), one optimizer step per
    minibatch. A minibatch's groups, and a group's chunks (one backward each), add their gradients up to the
    minibatch's."""
    stats = {"e_loss": 0.0, "kl": 0.0, "e_clip_frac": 0.0, "e_grad_norm": 0.0, "e_skipped": 0}
    w = step_weights().to(device)                                                         # (KP,)
    executor.train()
    for part in groups:
        n = sum(len(i) for _, i in part)
        for j, i in part:
            i = i.to(xs.device)
            A = adv[i, None]                                                                      # (B, 1)
            chunks = policy_chunks_of(j)
            steps = KP * len(chunks)                                                              # per row
            for c, k in chunks:
                logp, mean, std = chunk_steps(executor, lat[i], ctx[i], c, xs[i, k], x_nexts[i, k])  # (B, KP), (B, KP, ...)
                ratio = torch.exp(logp - logp_old[i, k])                                          # (B, KP)
                policy = torch.maximum(-A * ratio, -A * ratio.clamp(1 - clip_range, 1 + clip_range))  # (B, KP)
                kl = ((mean - mean_ref[i, k]) ** 2).flatten(2).mean(2) / (2 * std ** 2)           # (B, KP)
                loss = ((policy + kl_beta * kl) * w).sum() / n / steps                            # summed over k
                if not torch.isfinite(loss):
                    stats["e_skipped"] += 1
                    continue
                loss.backward()
                stats["e_loss"] += loss.item()
                stats["kl"] += kl.sum().item() / n / steps
                stats["e_clip_frac"] += ((ratio - 1).abs() > clip_range).float().sum().item() / n / steps
        sync_grads(executor.parameters())
        stats["e_grad_norm"] += torch.nn.utils.clip_grad_norm_(executor.parameters(), grad_clip).item()  # before clipping
        e_opt.step()
        e_opt.zero_grad(set_to_none=True)
    return {k: v / len(groups) if k in ("e_loss", "kl", "e_clip_frac", "e_grad_norm") else v for k, v in stats.items()}


def best_of(r: torch.Tensor, key: list) -> torch.Tensor:
    """RAFT's selection: per key (an instruction), the position of its highest reward in r, the first on ties, where
    it beats the key's mean (a key whose rows all tie has nothing to teach). r (n,), key (n,) -> positions (k,)."""
    best, total, count = {}, {}, {}
    for q, k in enumerate(key):
        best[k] = q if k not in best or r[q] > r[best[k]] else best[k]
        total[k], count[k] = total.get(k, 0.0) + float(r[q]), count.get(k, 0) + 1
    return torch.tensor([q for k, q in best.items() if float(r[q]) > total[k] / count[k] + 1e-6], dtype=torch.long)


def aux_steps(n: int, loss_of, name: str) -> dict:
    """num_minibatches steps of a_opt (sft_lr, dpo_lr) over n rows; loss_of(rows) -> (loss, {stat: value}). A rank
    with no rows still takes the steps (DDP: the same all-reduces on every rank)."""
    means, taken, skipped = {f"{name}_loss": 0.0}, 0, 0
    executor.train()
    for idx in batches_of(n):
        if len(idx):
            loss, extra = loss_of(idx.to(device))
            if torch.isfinite(loss):
                loss.backward()
                taken += 1
                for k, v in {f"{name}_loss": loss.item(), **extra}.items():
                    means[k] = means.get(k, 0.0) + v
            else:
                skipped += 1
        sync_grads(executor.parameters())
        torch.nn.utils.clip_grad_norm_(executor.parameters(), grad_clip)
        a_opt.step()
        a_opt.zero_grad(set_to_none=True)
    # means over the steps that had rows and a finite loss (not over num_minibatches: some may be empty)
    return {**{k: v / max(taken, 1) for k, v in means.items()}, f"{name}_rows": n, f"{name}_skipped": skipped}


def sft_update(lat, ctx):
    """sft_lr (not in the paper): flow matching on the selected continuations' whole videos, as pretrain.py trained
    the executor (a noise level per chunk, some chunks clean). lat (B, T, c, h, w), ctx (B, chunks, L, D), or None."""
    def loss_of(i):
        sigma = Mod.chunk_noise_levels(len(i), T // C, sample_shift, device=device)  # (B, chunks) as pre-training drew them
        return Mod.flow_matching_loss(executor, lat[i], sigma, ctx[i], autocast), {}
    return aux_steps(0 if lat is None else len(lat), loss_of, "sft")


def dpo_pairs(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dpo_lr's pairs: per execution group (N consecutive rows of r), its best and worst row (the first on ties),
    where they differ. r (groups * N,) -> winner, loser positions (k,), (k,)."""
    r = r.view(-1, N)
    first = torch.arange(len(r)) * N
    keep = r.amax(1) - r.amin(1) > 1e-6
    return (first + r.argmax(1))[keep], (first + r.argmin(1))[keep]


def dpo_update(lat_w, lat_l, ctx):
    """dpo_lr (not in the paper): Diffusion-DPO (Wallace et al. 2024, eq. 14) with the flow-matching error e of a
    row's whole video (pre-training's noise levels, some chunks clean) for the noise-prediction error. Winner and
    loser of a pair share their noise levels and noise, and
        loss = -log sigmoid(beta m),  m = -((e_w - e_w_ref) - (e_l - e_l_ref)),
    e_ref the frozen base's error: m > 0 where the executor prefers the winner more than the base does. The loss
    is log 2 at the base (on a GPU up to the bf16 base's rounding); frames equal in both videos (the group's shared
    context) give equal errors and cancel. lat_w, lat_l (B, T, c, h, w), ctx (B, chunks, L, D): a pair's plan, or
    None where this rank has no pairs (or, with every plan invalid, no rollout at all)."""
    def loss_of(i):
        B = len(i)
        sigma = Mod.chunk_noise_levels(B, T // C, sample_shift, device=device).repeat(2, 1)  # (2B, chunks)
        x0 = torch.cat([lat_w[i], lat_l[i]])                                                 # (2B, T, c, h, w)
        eps = torch.randn_like(x0[:B]).repeat(2, 1, 1, 1, 1)
        c = ctx[i].repeat(2, 1, 1, 1)
        e = Mod.flow_matching_loss(executor, x0, sigma, c, autocast, eps, per_row=True)      # (2B,)
        with torch.no_grad():
            e_ref = Mod.flow_matching_loss(reference, x0, sigma, c, autocast, eps, per_row=True)
        d = (e - e_ref).view(2, B)                                                           # (2, B): winners, losers
        m = -(d[0] - d[1])                                                                   # (B,)
        loss = -torch.nn.functional.logsigmoid(dpo_beta * m).mean()
        return loss, {"dpo_acc": (m > 0).float().mean().item(), "dpo_margin": m.mean().item()}
    return aux_steps(0 if lat_w is None else len(lat_w), loss_of, "dpo")


def planner_update(samples, adv):
    """GSPO (planner.gspo_loss) in num_minibatches steps. Under FSDP2 every rank runs every backward (the
    gradients are reduce-scattered), so a non-finite loss backpropagates zero and a non-finite gradient
    norm, the same on all ranks, skips the step everywhere."""
    stats = {"p_loss": 0.0, "p_clip_frac": 0.0, "p_skipped": 0}
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
                stats["p_skipped"] += 1
                if fsdp:
                    (loss.nan_to_num(0.0, 0.0, 0.0) * 0).backward()
        if not fsdp:
            sync_grads(planner.model.parameters())
        norm = torch.nn.utils.clip_grad_norm_(planner.model.parameters(), grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if fsdp and not torch.isfinite(norm):
            stats["p_skipped"] += 1
        else:
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


def peak_gb() -> float:
    """The GPU memory high-water mark since the last call (0 on the CPU)."""
    if not cuda:
        return 0.0
    m = torch.cuda.max_memory_allocated() / 1e9
    torch.cuda.reset_peak_memory_stats()
    return m


if master:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:  # bench.py reads smoothing from here
        json.dump(config, f, indent=1)
log_path = os.path.join(out_dir, "log.jsonl")
pool = None
if not real:  # the world's judges run on the CPU, in worker processes
    from multiprocessing import get_context
    pool = get_context("fork").Pool(max(1, min(16, (os.cpu_count() or 2) // world_size)))
if master and real:
    n_par = lambda m: sum(p.numel() for p in m.parameters())  # an FSDP2 DTensor counts its whole shape
    print(f"{backbone}{' (random weights)' if random_weights else ''}: executor {n_par(executor) / 1e9:.2f} B, "
          f"planner {n_par(planner.model) / 1e9:.2f} B{' (FSDP2)' if fsdp else ''}, LLM judge {n_par(llm_judge.model) / 1e9:.2f} B, "
          f"VLM judge {n_par(vlm_judge.model) / 1e9:.2f} B, PickScore {n_par(pick.model) / 1e9:.2f} B, "
          f"text encoder {n_par(text_enc) / 1e9:.2f} B, VAE {n_par(vae) / 1e9:.3f} B; {world_size} rank(s), "
          f"{sampler} sampler with {len(sigmas) - 1} steps a chunk, {T} latent frames of {frame_shape}")
if warmup:  # every attention shape of the iteration once, so kernel autotuning is not inside the timings
    t_w = time.time()
    ph, pw = executor.cfg.patch_size[1:]
    L, D = executor.cfg.text_len, executor.cfg.text_dim
    cache = Mod.KVCache(executor.cfg, 1, (frame_shape[1] // ph) * (frame_shape[2] // pw), T, device=device,
                        dtype=torch.bfloat16 if cuda else torch.float32)
    with torch.no_grad(), autocast:
        for j in range(T // C):  # a chunk against its growing cache
            executor(torch.randn(1, C, *frame_shape, device=device), torch.full((1, C), 500.0, device=device),
                     torch.zeros(1, L, D, device=device), cache=cache, start_frame=j * C)
    del cache
    for j in range(1, T // C):  # the update's forward and backward (chunk_steps), for each chunk that can be a policy's
        xs = torch.randn(1, KP, C, *frame_shape, device=device)
        chunk_steps(executor, torch.randn(1, T, *frame_shape, device=device), torch.zeros(1, T // C, L, D, device=device),
                         j, xs, xs)[0].sum().backward()
    executor.zero_grad(set_to_none=True)
    sync()
    if master:
        print(f"warm-up (kernel tuning at every attention shape): {time.time() - t_w:.1f} s", flush=True)
sync()
peak_gb()
t_start = time.time() - 60 * minutes_before  # the budget counts the minutes trained before a resume
bar = tqdm(total=max_iters, initial=it, desc="tempact", disable=not master or real)
while it < max_iters and (time.time() - t_start) / 60 < max_minutes:
    g = torch.Generator(device).manual_seed(seed * 1_000_003 + it * 1009 + rank)  # each rank its own noise
    torch.manual_seed(seed * 1_000_003 + it * 1009 + rank)  # minibatch shuffles, planner sampling
    batch = instructions_for(it)
    mem = {}
    sync()
    t0 = time.time()

    # 1. the planning group: M plans per instruction
    with gathered(planner.model):
        samples = planner.sample(batch, M, max_new_tokens=plan_tokens, temperature=planner_temperature)
    parsed = [parse_plan(t, T) for t in samples["text"]]   # (plan or None, reason) per row
    run = [p if p is not None else stand_in_plan(batch[i // M]) if stand_in_plans else None
           for i, (p, _) in enumerate(parsed)]             # the plans the executor rolls out
    valid = [i for i, p in enumerate(run) if p is not None]
    sync()
    t1, mem["plan"] = time.time(), peak_gb()

    # 2. the execution groups: N continuations of every plan
    plans = [run[i] for i in valid]
    if plans:
        with Mod.compiled(fuse_rollouts):  # the streaming only (CUDA): re-scoring and the update run eager
            lat, switch, ctx, xs, x_nexts, logp_rollout = rollout(plans, g)
    sync()
    t2, mem["rollout"] = time.time(), peak_gb()

    # 3. rewards: an invalid plan gets 0, never a crash. The world's judges run in CPU workers while the GPU
    # re-scores the recorded transition steps, which needs no reward (rescore)
    jobs = [(None, batch[valid[r // N] // M], plans[r // N], int(switch[r])) for r in range(len(plans) * N)]
    has_switch = [vi for vi in range(len(plans)) if switch[vi * N] >= 0]  # execution groups with a transition
    rows = torch.tensor([vi * N + n for vi in has_switch for n in range(N)], dtype=torch.long)
    d = rows.to(device)
    groups = update_groups(switch[rows]) if len(rows) else []
    if not real:
        videos = to_uint8(lat) if plans else []
        pending = pool.map_async(judge, [(v, *j[1:]) for v, j in zip(videos, jobs)], chunksize=4) if jobs else None
    if train_executor and len(rows):
        logp_old, mean_ref = rescore(groups, lat[d], ctx[d], xs[d], x_nexts[d])
        rollout_gap = (logp_old - logp_rollout[d]).abs().max().item()  # streamed vs full forward: bf16 noise only
    sync()
    t_rescored = time.time()
    if not real:
        scores = pending.get() if jobs else []
    else:
        with resident(vae):
            videos = decode(lat) if plans else []
        sync()
        t_decode = time.time() - t_rescored
        scores = judge_real(videos, jobs)
    terms = {"plan_quality": torch.zeros(len(batch) * M), "temporal": torch.zeros(len(batch) * M)}
    with resident(*([llm_judge.model] if real else [])):
        for vi, i in enumerate(valid):
            if parsed[i][0] is None:  # a stand-in plan was rolled out: the planner still earns nothing
                continue
            terms["plan_quality"][i] = (judged(llm_judge.plan_quality, parsed[i][0], batch[i // M], T) if real else
                                        rewards.plan_quality(parsed[i][0], batch[i // M], T))
            terms["temporal"][i] = float(np.mean([scores[vi * N + n]["temporal"] for n in range(N)]))
    r_plan = w_plan_quality * terms["plan_quality"] + w_temporal * terms["temporal"]
    # the executor's rows, each (groups * N,): transition chunk's local and aesthetic scores, its own video's temporal
    local, aesthetic, temporal = (torch.tensor([scores[r][k] for r in rows.tolist()]) for k in ("local", "aesthetic", "temporal"))
    r_exec = w_local * local + w_aesthetic * aesthetic + w_exec_temporal * temporal
    sync()
    t3, mem["judge"] = time.time(), peak_gb()

    # 4. the updates
    stats = {}
    if train_planner:
        adv = group_advantages(r_plan, M, std=adv_std).clamp(-adv_clip, adv_clip).to(device)
        stats |= planner_update(samples, adv)
    sync()
    t_planner = time.time() - t3
    if train_executor:
        if len(rows):
            adv = group_advantages(r_exec, N, std=adv_std).clamp(-adv_clip, adv_clip).to(device)
            stats |= executor_update(groups, lat[d], ctx[d], xs[d], x_nexts[d], logp_old, mean_ref, adv)
            stats["logp_rollout_gap"] = rollout_gap
        elif ddp:  # nothing to learn from here; still join the other ranks' all-reduces and take their
            # optimizer steps (AdamW moves weights even on a zero gradient), or the weights drift apart
            stats |= executor_update([[] for _ in range(num_minibatches)], None, None, None, None, None, None, None)
        if sft_lr:  # each instruction's best continuation, among this rank's own rows (none: the steps still run)
            sel = d[best_of(r_exec, [valid[r // N] // M for r in rows.tolist()]).to(device)]
            stats |= sft_update(lat[sel] if len(sel) else None, ctx[sel] if len(sel) else None)
        if dpo_lr:  # each execution group's best and worst continuation, on this rank (none: the steps still run)
            w, l = (d[x.to(device)] for x in dpo_pairs(r_exec))
            stats |= dpo_update(lat[w], lat[l], ctx[w]) if len(w) else dpo_update(None, None, None)
    sync()
    t4, mem["update"] = time.time(), peak_gb()

    # 5. log (rank 0, every term averaged over ranks), checkpoint
    it += 1
    row_mean = lambda x: x.mean() if len(rows) else torch.tensor(0.0)  # over the executor's rows (0 if none)
    means = {"r_plan_quality": terms["plan_quality"].mean(), "r_temporal": terms["temporal"].mean(),
             "r_local": row_mean(local), "r_aesthetic": row_mean(aesthetic), "r_exec_temporal": row_mean(temporal),
             "r_exec": row_mean(r_exec),
             # execution groups whose N continuations tie on the local reward: the aesthetic alone ranks them
             "local_ties": (local.view(-1, N).amax(1) == local.view(-1, N).amin(1)).float().mean() if len(rows) else torch.tensor(0.0),
             "valid_plans": torch.tensor(sum(p is not None for p, _ in parsed) / len(parsed))}
    means = {k: all_mean(v.float().to(device)).item() for k, v in means.items()}
    per_rank = torch.tensor([len(plans) * N] + [mem[k] for k in ("plan", "rollout", "judge", "update")], device=device)
    if ddp:  # rollouts summed over ranks; memory peaks gathered per rank
        gathered_rows = [torch.zeros_like(per_rank) for _ in range(world_size)]
        dist.all_gather(gathered_rows, per_rank)
        per_rank = torch.stack(gathered_rows)
    per_rank = per_rank.view(-1, 5).cpu()
    rollouts = int(per_rank[:, 0].sum())
    if ddp:  # the ranks' weights must stay identical: averaged gradients, same optimizer steps
        params = list(executor.parameters()) + ([] if fsdp else list(planner.model.parameters()))  # FSDP2: one copy
        sums = torch.stack([p.detach().double().sum() for p in params]).sum().view(1).to(device)
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        stats["rank_weight_spread"] = (hi - lo).item()
    rec = {"iter": it, "ranks": world_size, **{k: round(v, 4) for k, v in means.items()}, **{k: round(float(v), 6) for k, v in stats.items()},
           "invalid_reasons": sorted({r for p, r in parsed if p is None})[:3],
           "t_plan": round(t1 - t0, 2), "t_rollout": round(t2 - t1, 2), "t_judge": round(t3 - t2, 2), "t_rescore": round(t_rescored - t2, 2),
           "t_update": round(t4 - t3, 2), "t_update_planner": round(t_planner, 2), "rollouts": rollouts,
           "rollouts_per_s": round(rollouts / (t4 - t0), 3), "minutes": round((time.time() - t_start) / 60, 2)}
    if real:
        rec["t_decode"] = round(t_decode, 2)
        rec["judge_errors"] = len(judge_errors)
        if judge_errors and master:
            print(f"{len(judge_errors)} judge call(s) failed and scored 0; the first: {judge_errors[0]}", flush=True)
        judge_errors.clear()
    if cuda:
        rec["peak_gb"] = [round(float(x), 1) for x in per_rank[:, 1:].max(1).values]  # per rank, the iteration's peak
        rec["phase_peak_gb"] = {k: round(float(per_rank[:, c].max()), 1)
                                for c, k in enumerate(("plan", "rollout", "judge", "update"), start=1)}
    if master:
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.update(1)
        bar.set_postfix(temporal=f"{means['r_temporal']:.3f}", local=f"{means['r_local']:.3f}")
        if real:
            print(f"iter {it}: {rollouts} rollouts on {world_size} rank(s) in {t4 - t0:.1f} s: planning {t1 - t0:.1f} s, "
                  f"rollout {t2 - t1:.1f} s, judging {t3 - t2:.1f} s (re-scoring {t_rescored - t2:.1f}, VAE decode {t_decode:.1f}), update {t4 - t3:.1f} s "
                  f"(planner {t_planner:.1f}); peak GPU memory per rank (GB) {rec.get('peak_gb', '-')}, "
                  f"per phase {rec.get('phase_peak_gb', '-')}; losses p {stats.get('p_loss', 0.0):.4g}, "
                  f"e {stats.get('e_loss', 0.0):.4g}", flush=True)
    if save_checkpoints and it % ckpt_every == 0:
        save_checkpoint()
        if master:
            reward_curve(os.path.join(out_dir, "rewards.png"), log_path)
bar.close()
if save_checkpoints:
    save_checkpoint()
if master:
    if save_checkpoints:
        reward_curve(os.path.join(out_dir, "rewards.png"), log_path)
    print(f"tempact: {it} iterations" + (f", exported to {out_dir}" if save_checkpoints else ""))
if master and real and cuda and random_weights:  # the plan computed from these models' shapes, next to what was measured
    ph, pw = executor.cfg.patch_size[1:]
    sizes = {"executor": n_par(executor), "planner": n_par(planner.model), "llm_judge": n_par(llm_judge.model),
             "vlm_judge": n_par(vlm_judge.model), "pickscore": n_par(pick.model), "text_encoder": n_par(text_enc),
             "vae": n_par(vae)}
    backbones.memory_plan(world_size, torch.cuda.get_device_properties(device).total_memory / 1e9, sizes, M, N,
                          instructions, rollout_rows or M * N, T, (frame_shape[1] // ph) * (frame_shape[2] // pw),
                          plan_tokens, offload=offload,  # the update's longest forward (chunk_steps):
                          update_frames=KP * T if executor.cfg.window_frames else T - C + KP * C)
if ddp:
    dist.destroy_process_group()
if pool is not None:
    pool.terminate()
