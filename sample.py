"""
One prompt -> a plan -> a video streamed chunk by chunk -> GIF + filmstrip PNG (+ the world's scores).

    python sample.py --prompt "a red circle moves right, then turns blue"                  # the planner's plan
    python sample.py --prompt "..." --mode=steps --steps="the red circle moves right | the red circle turns blue" --switch=12
    python sample.py --prompt "..." --mode=global                                          # one global prompt

It loads the shapes world's shipped models from checkpoints/ and runs on a CPU in seconds.
"""

import json
import os
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
checkpoints = "checkpoints"
# -----------------------------------------------------------------------------


class SetupError(Exception):
    pass


def load_world(ckpt_dir: str = "checkpoints", device: str = "cpu") -> dict:
    """The world's executor, text encoder, tokenizer and planner, or one clear error line."""
    from transformers import UMT5Config, UMT5EncoderModel
    paths = {k: os.path.join(ckpt_dir, f) for k, f in [("executor", "world_executor.safetensors"),
                                                        ("text", "world_text_encoder.safetensors"),
                                                        ("planner", "world_planner")]}
    for k, p in paths.items():
        if not os.path.exists(p):
            raise SetupError(f"missing {k} checkpoint {p}: run pretrain.py (README) or pass --checkpoints")
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


def main():
    configure(globals())

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
        prompts = [s.strip() for s in steps.split("|") if s.strip()]
        if not prompts:
            die("--mode=steps needs --steps='first step | second step | ...'")
        n = len(prompts)
        try:
            starts = [int(s) for s in str(switch).split(",") if s.strip()] if switch != "" else \
                [round(world.T * j / n) for j in range(1, n)]
        except ValueError:
            die(f"--switch must be comma-separated frame numbers, got '{switch}'")
        if len(starts) != n - 1 or starts != sorted(starts) or any(not 0 < s < world.T for s in starts):
            die(f"--switch needs {n - 1} increasing frames in 1..{world.T - 1}, got '{switch}'")
        b = [0] + starts + [world.T]
        plan = [(p, s, e) for p, s, e in zip(prompts, b, b[1:])]
    elif mode == "global":
        plan = [(prompt, 0, world.T)]
    else:
        die(f"unknown mode '{mode}': plan, steps or global")
    print("plan:")
    for p, s, e in plan:
        print(f"  frames {s:2d}-{e - 1:2d}  {p}")
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
