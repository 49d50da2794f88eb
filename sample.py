"""
One prompt -> a plan -> a video streamed chunk by chunk -> GIF + filmstrip PNG (+ the world's scores).

    python sample.py --prompt "a red circle moves right, then turns blue"                  # the planner's plan
    python sample.py --prompt "..." --mode=steps --steps="the red circle moves right | the red circle turns blue" --switch=12
    python sample.py --prompt "..." --mode=global                                          # one global prompt

Without a config it loads the shapes world's shipped TempAct models from checkpoints/tempact/
(--checkpoints=checkpoints: the base models they were trained from) and runs on a CPU in seconds.
With config/selfforcing.py or config/longlive.py it runs a real backbone from the files you downloaded:
480x832, 21 latent frames -> 81 frames at 16 fps, each chunk VAE-decoded as it arrives, written as an
animated WebP (or GIF) plus a filmstrip PNG:

    python sample.py config/longlive.py --prompt "..." --mode=steps --steps="first step | second step" --switch=9
    python sample.py config/selfforcing.py --prompt "..." --planner=/path/to/Qwen3-8B    # the LLM's plan
"""

import json
import os
import sys
import time

import numpy as np
import torch

from tqdm import tqdm

import model as M
import rewards
import world
from configurator import configure, die
from planner import Planner, blend_contexts, smooth_weights

# -----------------------------------------------------------------------------
# config
prompt = ""                 # the instruction (world grammar)
mode = "plan"               # plan: the planner's plan | steps: --steps/--switch | global: one prompt throughout
steps = ""                  # mode=steps: step prompts separated by '|'
switch = ""                 # mode=steps: latent frames where each next step starts, comma separated (default: even split)
smoothing = "none"          # prompt smoothing at span ends: none | ramp (TempAct's; the base executor never saw blends)
sample_steps = 10           # Euler steps per chunk (the world executor is trained by plain flow matching)
seed = 0
device = "cuda" if torch.cuda.is_available() else "cpu"
out = "out"                 # writes <out>/sample.gif and <out>/sample.png
checkpoints = "checkpoints/tempact"  # the world's models: TempAct's; --checkpoints=checkpoints for the base ones
# real backbones: config/selfforcing.py and config/longlive.py set these (no backbone: the shapes world)
backbone = ""               # selfforcing | longlive
executor_config = "wan-1.3b"  # model.CONFIGS entry
executor_ckpt = ""          # Self-Forcing's self_forcing_dmd.pt / LongLive's longlive_base.pt
executor_key = "generator_ema"  # the entry of that dict that holds the DiT
lora_ckpt = ""              # LongLive's lora.pt, merged at load time
lora_rank = 256
lora_alpha = 256.0
vae_ckpt = ""               # Wan2.1_VAE.pth
vae_config = "wan2.1"       # vae.VAE_CONFIGS entry
t5_ckpt = ""                # models_t5_umt5-xxl-enc-bf16.pth, or a diffusers text_encoder/ folder
t5_tokenizer = ""           # the google/umt5-xxl folder
sink_frames = 0             # LongLive: a 3-frame sink ...
window_frames = 0           # ... plus the 9 most recent frames (0: a global cache)
height = 480                # video pixels
width = 832
latent_frames = 21          # 7 chunks of 3 -> 81 frames
denoising_steps = (1000, 750, 500, 250)  # the distilled few-step sampler's timesteps per chunk
timestep_shift = 5.0
switch_recache = False      # LongLive's KV re-cache at prompt switches
planner = ""                # --mode=plan on a real backbone: a local Hugging Face causal LM folder (Qwen3-8B)
fps = 16
animation = "webp"          # webp | gif
torch_compile = False       # compile the DiT's elementwise parts (model.COMPILE; pays off from the second video)
# -----------------------------------------------------------------------------


class SetupError(Exception):
    pass


def world_paths(ckpt_dir: str) -> dict:
    """The world's three checkpoint paths in a folder, each checked to exist."""
    paths = {k: os.path.join(ckpt_dir, f) for k, f in [("executor", "world_executor.safetensors"),
                                                        ("text", "world_text_encoder.safetensors"),
                                                        ("planner", "world_planner")]}
    for k, p in paths.items():
        if not os.path.exists(p):
            raise SetupError(f"missing {k} checkpoint {p}: run pretrain.py (README) or pass --checkpoints")
    return paths


def load_world(ckpt_dir: str = "checkpoints", device: str = "cpu") -> dict:
    """The world's executor, text encoder, tokenizer and planner, or one clear error line."""
    from transformers import UMT5Config, UMT5EncoderModel
    paths = world_paths(ckpt_dir)
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    executor = M.from_pretrained(paths["executor"], device=device, dtype=dt).eval()
    text_sd, meta = M.read_state_dict(paths["text"])
    text_enc = UMT5EncoderModel(UMT5Config(**json.loads(meta["config"])))
    M.check_state_dict(text_enc, text_sd, paths["text"])
    text_enc.load_state_dict(text_sd)
    text_enc = text_enc.to(device=device, dtype=dt).eval()
    try:
        planner = Planner.from_pretrained(paths["planner"], num_frames=world.T, device=device, dtype=dt)
    except Exception as e:  # transformers' own errors are long: keep the first line
        raise SetupError(f"cannot load planner {paths['planner']}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    planner.model.eval()
    return {"executor": executor, "text_enc": text_enc, "tokenizer": world.build_tokenizer(), "planner": planner,
            "device": device}


@torch.no_grad()
def chunk_contexts(models: dict, plans: list, smooth: str = "ramp") -> list[torch.Tensor]:
    """Plans (one per video) -> per chunk a (B, text_len, text_dim) context, with prompt smoothing."""
    cfg = models["executor"].cfg
    per_video = []
    for plan in plans:
        ctx = M.encode_text(models["text_enc"], models["tokenizer"], [p for p, _, _ in plan], cfg.text_len,
                            models["device"])  # (P, text_len, text_dim)
        per_video.append(blend_contexts(ctx, smooth_weights(plan, world.T, cfg.chunk_frames, smooth)))  # (chunks, L, C)
    both = torch.stack(per_video, dim=1)  # (chunks, B, L, C)
    return list(both.to(models["executor"].patch_embedding.weight.dtype))


@torch.no_grad()
def generate(models: dict, plans: list, seed: int = 0, smooth: str = "ramp", steps: int = 10,
             progress=None, shift: float = 3.0) -> np.ndarray:
    """Plans -> videos (B, T, H, W, 3) uint8, streamed chunk by chunk; `steps` Euler steps per chunk through
    the schedule shifted by `shift` (pretrain.py's train_shift)."""
    contexts = chunk_contexts(models, plans, smooth)
    g = torch.Generator(models["device"]).manual_seed(seed)
    shape = (len(plans), world.T, 3, world.H, world.W)
    sigmas = M.ode_sigmas(steps, shift)
    chunks = []
    for x0 in M.stream(models["executor"], contexts, shape, sigmas, generator=g, device=models["device"],
                       sampler="ode"):
        chunks.append(x0)
        if progress:
            progress()
    x = torch.cat(chunks, dim=1)  # (B, T, 3, H, W) in [-1, 1]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 1, 3, 4, 2).cpu().numpy()


def step_plan(steps: str, switch, num_frames: int) -> list:
    """--steps='a | b | c' and --switch='s1,s2' (latent frames; default: an even split) -> a plan, or one error line."""
    prompts = [s.strip() for s in steps.split("|") if s.strip()]
    if not prompts:
        die("--mode=steps needs --steps='first step | second step | ...'")
    n = len(prompts)
    try:
        starts = [int(s) for s in str(switch).split(",") if s.strip()] if switch != "" else \
            [round(num_frames * j / n) for j in range(1, n)]
    except ValueError:
        die(f"--switch must be comma-separated frame numbers, got '{switch}'")
    if len(starts) != n - 1 or starts != sorted(starts) or any(not 0 < s < num_frames for s in starts):
        die(f"--switch needs {n - 1} increasing frames in 1..{num_frames - 1}, got '{switch}'")
    b = [0] + starts + [num_frames]
    return [(p, s, e) for p, s, e in zip(prompts, b, b[1:])]


def print_plan(plan: list):
    print("plan:")
    for p, s, e in plan:
        print(f"  frames {s:2d}-{e - 1:2d}  {p}")


# -----------------------------------------------------------------------------
# real backbones: Self-Forcing and LongLive


def empty_cache():
    """Give freed GPU memory back: Qwen3-8B and umT5-XXL need not share the GPU with the DiT."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_animation(frames: np.ndarray, path: str, fps: int):
    """uint8 (T, H, W, 3) -> an animated WebP or GIF (by the file's extension), looping."""
    from PIL import Image
    imgs = [Image.fromarray(f) for f in frames]
    kw = dict(quality=90) if path.endswith(".webp") else {}
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=round(1000 / fps), loop=0, **kw)


def real_filmstrip(frames: np.ndarray, labels: list[str], path: str, chunk: int):
    """One frame per latent frame (the last video frame it decodes to), a quarter size, a chunk per row,
    each captioned with its latent frame and the prompt that chunk was generated with."""
    from PIL import Image
    picks = frames[[4 * f for f in range(len(labels))]]  # latent frame f -> video frames 4f-3..4f (frame 0 alone)
    h, w = max(1, frames.shape[1] // 4), max(1, frames.shape[2] // 4)
    small = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR)) for f in picks])
    world.filmstrip(small, labels, path, scale=1, per_row=chunk)


def sample_real():
    """The real-backbone path: plan -> umT5 -> the DiT streamed chunk by chunk -> the VAE per chunk."""
    import backbones
    import vae as V
    cfg = {k: globals()[k] for k in ("backbone", "executor_ckpt", "lora_ckpt", "vae_ckpt", "t5_ckpt", "t5_tokenizer")}
    source = next((a for a in sys.argv[1:] if not a.startswith("--")), "sample.py")
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    nf = latent_frames
    try:
        backbones.check_paths(cfg, source)
        if not prompt.strip():
            raise ValueError("empty prompt: pass --prompt='...'")
        if height % 16 or width % 16:
            raise ValueError(f"--height and --width must be multiples of 16 (VAE stride 8, patch 2), got {height}x{width}")
        if animation not in ("webp", "gif"):
            raise ValueError(f"unknown animation format '{animation}': webp or gif")
        if mode == "plan" and not planner:
            raise ValueError("--mode=plan on a real backbone needs --planner=/path/to/Qwen3-8B (a local Hugging Face "
                             "folder), or use --mode=steps or --mode=global")
        if mode == "plan" and not os.path.isdir(planner):
            raise ValueError(f"planner folder '{planner}' not found (expected a Hugging Face causal LM folder)")
        if executor_config not in M.CONFIGS:
            raise ValueError(f"executor_config '{executor_config}' is not one of model.CONFIGS {sorted(M.CONFIGS)}")
        chunk = M.CONFIGS[executor_config].chunk_frames
        if nf % chunk:
            raise ValueError(f"--latent_frames must be a multiple of the chunk ({chunk}), got {nf}")
    except (ValueError, backbones.CheckpointError) as e:
        die(str(e))
    torch.manual_seed(seed)
    t0 = time.time()

    if mode == "plan":  # the planner first, then freed: Qwen3-8B and the DiT need not share the GPU
        try:
            plan_model = Planner.from_pretrained(planner, num_frames=nf, device=device, dtype=dt)
        except Exception as e:  # transformers' own errors are long: keep the first line
            die(f"cannot load planner {planner}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        (plan, reason, text), = plan_model.plan([prompt])
        del plan_model
        empty_cache()
        if plan is None:
            print(f"the planner's plan is not valid ({reason}); using the global prompt instead")
            plan = [(prompt, 0, nf)]
    elif mode == "steps":
        plan = step_plan(steps, switch, nf)
    elif mode == "global":
        plan = [(prompt, 0, nf)]
    else:
        die(f"unknown mode '{mode}': plan, steps or global")
    print_plan(plan)

    try:  # umT5 encodes the step prompts once and goes, then the DiT and the VAE load
        text_enc = backbones.load_t5(t5_ckpt, device, dt)
        ctx = backbones.encode(text_enc, backbones.load_tokenizer(t5_tokenizer), [p for p, _, _ in plan],
                               M.CONFIGS[executor_config].text_len, device)  # (steps, 512, 4096)
        del text_enc
        empty_cache()
        weights = smooth_weights(plan, nf, chunk, smoothing)  # which step prompt (or blend) each chunk sees
        contexts = list(blend_contexts(ctx, weights)[:, None].to(dt))  # chunks x (1, 512, 4096)
        executor = backbones.load_executor(executor_ckpt, executor_config, executor_key, lora_ckpt, lora_rank,
                                           lora_alpha, device, dt, sink_frames=sink_frames, window_frames=window_frames)
        vae = V.load_vae(vae_ckpt, device, dt, cfg=vae_config)
    except (ValueError, backbones.CheckpointError) as e:
        die(str(e))
    print(f"loaded {backbone} ({executor.num_params() / 1e9:.2f} B parameters) in {time.time() - t0:.1f} s")

    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # the VAE's conv shapes repeat every chunk
        M.COMPILE = torch_compile
    shape = (1, nf, executor.cfg.in_dim, height // 8, width // 8)
    sigmas = M.few_step_sigmas(denoising_steps, timestep_shift)
    g = torch.Generator(device).manual_seed(seed)
    decoder, video = vae.stream(), []
    t1 = time.time()
    for x0 in tqdm(M.stream(executor, contexts, shape, sigmas, generator=g, switch_recache=switch_recache,
                            device=device), total=nf // chunk, desc="chunks", unit="chunk"):
        x = decoder(x0)[0]  # (9 or 12, 3, H, W) in [-1, 1]: this chunk's frames, ready to show
        video.append(((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy())
    video = np.concatenate(video)  # (T, H, W, 3) uint8
    dt_gen = time.time() - t1
    print(f"{len(video)} frames in {dt_gen:.1f} s ({len(video) / dt_gen:.1f} FPS, streamed and decoded chunk by chunk)")

    from PIL import features
    ext = animation if animation == "gif" or features.check("webp") else "gif"  # Pillow built without WebP: GIF
    os.makedirs(out, exist_ok=True)
    anim, png = os.path.join(out, f"sample.{ext}"), os.path.join(out, "sample.png")
    save_animation(video, anim, fps)
    labels = [plan[weights[f // chunk][0]][0] + (" (-> next)" if weights[f // chunk][2] > 0 else "") for f in range(nf)]
    real_filmstrip(video, labels, png, chunk)
    print(f"wrote {anim} ({fps} fps) and {png} in {time.time() - t0:.1f} s")
    return video


def main():
    configure(globals())
    if backbone:
        return sample_real()

    try:
        world.parse(prompt)  # one clear line for an empty prompt or a word the grammar cannot place
        models = load_world(checkpoints, device)
    except (world.ParseError, SetupError, ValueError) as e:
        die(str(e))
    torch.manual_seed(seed)
    t0 = time.time()
    if mode == "plan":
        (plan, reason, text), = models["planner"].plan([prompt])
        if plan is None:
            print(f"the planner's plan is not valid ({reason}); using the global prompt instead")
            plan = [(prompt, 0, world.T)]
    elif mode == "steps":
        plan = step_plan(steps, switch, world.T)
    elif mode == "global":
        plan = [(prompt, 0, world.T)]
    else:
        die(f"unknown mode '{mode}': plan, steps or global")
    print_plan(plan)
    nchunks = world.T // models["executor"].cfg.chunk_frames
    with tqdm(total=nchunks, desc="chunks", unit="chunk") as bar:
        video = generate(models, [plan], seed, smoothing, sample_steps, progress=lambda: bar.update(1))[0]
    os.makedirs(out, exist_ok=True)
    gif, png = os.path.join(out, "sample.gif"), os.path.join(out, "sample.png")
    world.save_gif(video, gif)
    world.filmstrip(video, world.frame_labels(plan), png)
    print(f"wrote {gif} and {png} in {time.time() - t0:.1f} s")
    scores = {"temporal following": rewards.temporal_following(video, prompt),
              "temporal following (strict)": rewards.temporal_following_strict(video, prompt),
              "plan quality": rewards.plan_quality(plan, prompt, world.T),
              "aesthetic": rewards.aesthetic(video)}
    print("scores: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
