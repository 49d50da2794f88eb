"""
Benchmarks. Each mode warms up, synchronises, takes medians of timed repeats and prints ratios
against references measured in the same run, with the GPU named.

    python bench.py --kernel          # our Triton attention vs cuDNN SDPA, flash SDPA, FlexAttention
    python bench.py --kernel --check  # also max relative errors of output and gradients at Wan shapes
    python bench.py --quality         # the paper's Table 1 on the shapes world's held-out benchmark
    python bench.py --scaling         # train.py's rollouts per second on 1, 2 and 4 GPUs (torchrun), and the efficiency
    python bench.py --memory          # the per-GPU memory plan of one Wan-scale TempAct iteration (8x H100 80 GB)
    python bench.py --generate        # streaming generation at Wan-1.3B size (random weights): FPS, latency, memory
    python bench.py --update          # train.py's executor update: K copies of a chunk in one forward vs K forwards
"""

import gc
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config
mode = "kernel"     # kernel | quality | generate | scaling | memory | update
check = False       # kernel: also check bf16 output/gradients against the float32 reference
heads = 12          # Wan: 12 heads of 128
head_dim = 128
frame_tokens = 1560 # 480x832 video -> 30x52 tokens per latent frame
chunk_frames = 3
dtype = "bfloat16"
warmup_ms = 100     # do_bench warm-up and repetition budgets
rep_ms = 500
kernel_rounds = 3   # every shape's columns timed this many times, interleaved; the table gives medians
# quality
checkpoints = "checkpoints"           # the world's models
rows = "global,planner,gt"            # which rows: global prompt, base planner's step prompts, ground-truth plans
sample_steps = 10         # the world executor's Euler steps per chunk
smoothing = "none"                    # prompt smoothing for rows without a train.py config.json: none | ramp
seed = 0                              # generation seed (the benchmark sets themselves are fixed data) ...
eval_seeds = 1                        # ... and how many seeds from it each row is averaged over (seed, seed+1, ...)
max_items = 0                         # the first this many items of each set (0: all 100; fewer only for smoke tests)
device = "cuda" if torch.cuda.is_available() else "cpu"
# scaling (train.py on the world, weak scaling: every rank its own `instructions`)
gpus = "1,2,4"            # process counts to run
scaling_iters = 5         # iterations per run ...
warmup_iters = 2          # ... the first of which (kernel tuning, first allocations) are not counted
scaling_out = "out-scaling"
scaling_args = "--instructions=8"  # more train.py flags (8: what README's scaling table measured)
# memory
mem_gpus = 8              # the plan's GPUs ...
mem_gpu_gb = 80.0         # ... and their memory (H100 80 GB)
# generate
size = "wan-1.3b"                     # model.CONFIGS entry of the DiT
height = 480                          # video pixels -> 60x104 latents, 1560 tokens a latent frame
width = 832
latent_frames = 21                    # 7 chunks of 3 -> 81 frames
repeats = 3                           # timed videos per row (after one warm-up video), median reported
switch_frame = 12                     # LongLive rows: the prompt switch (and its re-cache) at this latent frame
rows_generate = "triton,sdpa,longlive,longlive-sdpa,eager,no-decode,vae-layout,profile"  # what to run, in order
budget_s = 0.0                        # stop starting new rows after this many seconds (0: no limit)
# -----------------------------------------------------------------------------
for a in list(sys.argv[1:]):  # `--kernel`, `--check`, `--quality`, ... are shorthands for --mode=..., --check=True
    if a in ("--kernel", "--quality", "--generate", "--scaling", "--memory", "--update"):
        sys.argv.remove(a)
        mode = a[2:]
    elif a == "--check":
        sys.argv.remove(a)
        check = True
from configurator import configure, die  # noqa: E402

configure(globals())


def tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def bench_kernel():
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attention import attention, attention_flops, attention_mask

    dev, dt = "cuda", getattr(torch, dtype)
    flex = torch.compile(flex_attention, dynamic=False)
    H, D, S, c = heads, head_dim, frame_tokens, chunk_frames
    chunk = c * S

    def median_ms(fn):
        # with the garbage collector off while timing, as timeit does: a collection inside the
        # timed loop would stall the Python side of short calls
        gc.collect()
        gc.disable()
        try:
            return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        finally:
            gc.enable()

    def sdpa(backend, q, k, v, mask=None):
        with sdpa_kernel(backend):  # SDPA wants (B, H, L, D): transposed views, no copies
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)

    def flex_mask(Lq, Lk, q_offset, chunk_, sink, window):
        def mask_mod(b, h, qi, kj):  # the same rule as attention.attention_mask
            p = qi + q_offset
            hi = torch.clamp((p // chunk_ + 1) * chunk_, max=Lk) if chunk_ else Lk
            vis = kj < hi
            if window:
                vis = vis & ((kj >= hi - window) | (kj < sink))
            return vis
        return create_block_mask(mask_mod, 1, 1, Lq, Lk, device=dev)

    rows = {}
    # (name, Lq, Lk, q_offset, chunk, sink, window, backward)
    shapes = [(f"chunk vs {n}-frame cache", c * S, n * S, (n - c) * S, 0, 0, 0, False) for n in (3, 12, 21)]
    shapes += [("LongLive sink+window (12 fr)", c * S, 12 * S, 9 * S, 0, 0, 0, False),
               ("cross-attn, 512 text keys", c * S, 512, 0, 0, 0, 0, False)]
    shapes += [("block-causal 21 fr fwd", 21 * S, 21 * S, 0, chunk, 0, 0, False),
               ("block-causal 21 fr fwd+bwd", 21 * S, 21 * S, 0, chunk, 0, 0, True)]
    for name, Lq, Lk, q_off, ch, sink, window, bwd in shapes:
        torch.manual_seed(0)
        q = torch.randn(1, Lq, H, D, device=dev, dtype=dt, requires_grad=bwd)
        if name.startswith("LongLive"):  # keys read straight out of a preallocated cache buffer
            buf = torch.randn(2, 1, 12 * S + 3 * S, H, D, device=dev, dtype=dt)
            k, v = buf[0, :, :Lk], buf[1, :, :Lk]
        else:
            k = torch.randn(1, Lk, H, D, device=dev, dtype=dt, requires_grad=bwd)
            v = torch.randn(1, Lk, H, D, device=dev, dtype=dt, requires_grad=bwd)
        flops = attention_flops(1, H, Lq, Lk, D, q_off, ch, sink, window) * (3.5 if bwd else 1.0)
        dense = None if ch == 0 else attention_mask(Lq, Lk, q_offset=q_off, chunk=ch, sink=sink, window=window, device=dev)
        bm = flex_mask(Lq, Lk, q_off, ch, sink, window)
        fns = {
            "ours": lambda: attention(q, k, v, q_offset=q_off, chunk=ch, sink=sink, window=window, backend="triton"),
            "cudnn": lambda: sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, dense),
            "flash": (lambda: sdpa(SDPBackend.FLASH_ATTENTION, q, k, v)) if ch == 0 else None,
            "flex": lambda: flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm),
        }
        if bwd:
            do = torch.randn(1, Lq, H, D, device=dev, dtype=dt)

            def with_grad(f, do=do):
                def fn():
                    o = f()
                    o = o if o.shape == do.shape else o.transpose(1, 2)
                    torch.autograd.grad(o, (q, k, v), do)
                return fn
            fns = {key: fn and with_grad(fn) for key, fn in fns.items()}
        res = {key: [] for key in fns}
        for _ in range(kernel_rounds):  # interleaved, so that a drifting clock hits every column alike
            for key, fn in fns.items():
                if fn is None or None in res[key]:
                    continue
                try:
                    res[key].append(tflops(flops, median_ms(fn)))
                except Exception as e:  # a backend that refuses a shape is reported, not fatal
                    print(f"  {key} failed on {name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    res[key].append(None)
        rows[name] = {key: None if not r or None in r else sorted(r)[len(r) // 2] for key, r in res.items()}
        ref = "cudnn" if ch == 0 else "flex"  # the target's reference: cuDNN at inference, FlexAttention in training
        if res["ours"] and res[ref] and None not in res["ours"] + res[ref]:
            rows[name]["rounds"] = f"ours / {ref} by round: " + " ".join(f"{a / b:.3f}" for a, b in zip(res["ours"], res[ref]))

    block = bench_dit_block(median_ms)
    gpu = torch.cuda.get_device_name()
    print(f"\nattention TFLOP/s (median of {kernel_rounds} interleaved rounds), {dtype}, {H} heads x {D}, "
          f"{S} tokens/frame, {c}-frame chunks, on {gpu}")
    print(f"torch {torch.__version__}, triton {triton.__version__}; FLOPs = 4*H*D*(visible pairs), backward 2.5x")
    hdr = f"{'shape':32s} {'ours':>7s} {'cuDNN':>7s} {'flash':>7s} {'flex':>7s} {'/cuDNN':>7s} {'/flex':>7s}"
    print(hdr)
    for name, r in rows.items():
        f = lambda x: f"{x:7.0f}" if x else f"{'-':>7s}"
        ratio = lambda a, b: f"{a / b:7.2f}" if a and b else f"{'-':>7s}"
        print(f"{name:32s} {f(r['ours'])} {f(r['cudnn'])} {f(r['flash'])} {f(r['flex'])} "
              f"{ratio(r['ours'], r['cudnn'])} {ratio(r['ours'], r['flex'])}")
    for name, r in rows.items():
        print(f"{name:32s} {r.get('rounds', '')}")
    print(f"\none Wan-1.3B DiT block (self-attention, cross-attention, FFN, norms; elementwise parts compiled), "
          f"a 3-frame chunk against a 21-frame cache, ms (median of {kernel_rounds} rounds):")
    print(f"  ours {block['ours']:.3f}   SDPA (default backend) {block['sdpa']:.3f}   SDPA / ours {block['sdpa'] / block['ours']:.3f}")


def bench_dit_block(median_ms) -> dict:
    """One wan-1.3b block streaming its last chunk (3 frames, 4680 queries) against a 21-frame global cache,
    bf16, random weights, the prompt's cross-attention keys cached as in streaming: our kernel vs SDPA."""
    import dataclasses

    import model as M

    cfg = dataclasses.replace(M.CONFIGS["wan-1.3b"], num_layers=1)
    S, nf, C = frame_tokens, 21, cfg.chunk_frames
    torch.manual_seed(0)
    with torch.device("cuda"):
        blk = M.Block(cfg).to(torch.bfloat16).eval().requires_grad_(False)
        cache = M.KVCache(cfg, 1, S, nf, dtype=torch.bfloat16)
        x = torch.randn(1, C * S, cfg.dim)  # (B, L, C) float32 residual stream
        e = torch.randn(1, C, 6, cfg.dim) * 0.1  # (B, F, 6, C) per-frame modulation
        ctx = torch.randn(1, cfg.text_len, cfg.dim, dtype=torch.bfloat16)  # embedded prompt
    _, rope = M.position_tables(cfg, (C, 30, 52), nf - C, "cuda")
    cache.end = nf - C  # as if the first 18 frames had streamed (their keys stay zeros: speed only)
    mask = dict(q_offset=cache.begin(nf - C, C, S), chunk=C * S)
    compile_was, sdpa_was = M.COMPILE, M.SDPA
    res = {"ours": [], "sdpa": []}
    try:
        M.COMPILE = True
        with torch.no_grad():
            for _ in range(kernel_rounds):
                for key in res:
                    M.SDPA = key == "sdpa"
                    cache.clear_cross()
                    blk(x, e, ctx, rope, mask, cache, 0)  # fills the prompt's cross-attention keys once
                    res[key].append(median_ms(lambda: blk(x, e, None, rope, mask, cache, 0)))
    finally:
        M.COMPILE, M.SDPA = compile_was, sdpa_was
    return {key: sorted(r)[len(r) // 2] for key, r in res.items()}


def check_kernel():
    """bf16 kernel vs a float32 reference at the Wan shapes and at the world executor's training shapes
    (several rows, 4 heads of 64, 64 tokens a frame): max relative errors of out, dq, dk, dv."""
    from attention import attention, attention_reference

    dev = "cuda"
    H, D, S, c = heads, head_dim, frame_tokens, chunk_frames
    # (name, B, H, D, Lq, Lk, q_offset, chunk, sink, window)
    cases = [("chunk vs 21-frame cache", 1, H, D, c * S, 21 * S, 18 * S, 0, 0, 0),  # inference: no mask, split-KV
             ("chunk vs 21-frame, chunked", 1, H, D, c * S, 21 * S, 18 * S, c * S, 0, 0),
             ("block-causal 21 frames", 1, H, D, 21 * S, 21 * S, 0, c * S, 0, 0),
             ("LongLive window 21 frames", 1, H, D, 21 * S, 21 * S, 0, c * S, 3 * S, 9 * S),
             ("Wan update, 18 + 3x3 frames", 1, H, D, 27 * S, 27 * S, 0, c * S, 18 * S, c * S),  # train.py's copies
             ("world update, 21 + 9x3 frames", 8, 4, 64, 48 * 64, 48 * 64, 0, 3 * 64, 21 * 64, 3 * 64),
             ("world update, 6 + 9x3 frames", 3, 4, 64, 33 * 64, 33 * 64, 0, 3 * 64, 6 * 64, 3 * 64),
             ("world rollout, chunk vs cache", 16, 4, 64, 3 * 64, 15 * 64, 12 * 64, 0, 0, 0),
             ("odd sizes", 2, 3, 64, 1000, 1000, 0, 200, 0, 0)]
    print(f"\nbf16 kernel vs float32 reference (fresh random inputs), on {torch.cuda.get_device_name()}")
    print(f"{'case':30s} {'out':>9s} {'dq':>9s} {'dk':>9s} {'dv':>9s}   (max |a-b| / max |b|)")
    for name, B, h, d, Lq, Lk, q_off, ch, sink, window in cases:
        torch.manual_seed(len(name))
        q, k, v = (torch.randn(B, L, h, d, device=dev) for L in (Lq, Lk, Lk))
        do = torch.randn(B, Lq, h, d, device=dev)
        kw = dict(q_offset=q_off, chunk=ch, sink=sink, window=window)
        errs = []
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = attention_reference(*ref_in, **kw)
        ref_g = torch.autograd.grad(ref, ref_in, do)
        our_in = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
        out = attention(*our_in, **kw, backend="triton")
        our_g = torch.autograd.grad(out, our_in, do.to(torch.bfloat16))
        for a, b in zip((out, *our_g), (ref, *ref_g)):
            errs.append(((a.float() - b).abs().max() / b.abs().max()).item())
        print(f"{name:30s} " + " ".join(f"{e:9.2e}" for e in errs))


def judge_videos(videos, instructions, plans):
    """World judges for each video, in parallel processes (they run on the CPU)."""
    from multiprocessing import get_context
    with get_context("fork").Pool(min(16, os.cpu_count())) as pool:
        return pool.starmap(judge_one, zip(videos, instructions, plans))


def judge_one(video, instruction, plan):
    import rewards
    return {"temporal": rewards.temporal_following(video, instruction),
            "strict": rewards.temporal_following_strict(video, instruction),
            "aesthetic": rewards.aesthetic(video),
            "plan": rewards.plan_quality(plan, instruction)}


def bench_quality():
    """Table 1 on the world: temporal order on Simple / Hard under the reward judge and the stricter
    evaluation judge (never a reward), their average, and the aesthetic score, per row.

    A row is `kind` or `kind@dir`: kind global (one prompt), planner (the planner's greedy plans as
    step prompts) or gt (ground-truth plans); models from `checkpoints`, or from a train.py out_dir
    (its smoothing setting comes from its config.json). `planner@P+E` plans with P's planner and
    films with E's executor, which tells a TempAct run's two models' shares of its gain apart.
    Gains are relative to the `planner` row."""
    if eval_seeds < 1:
        die(f"--eval_seeds must be at least 1, got {eval_seeds}")
    if max_items < 0:
        die(f"--max_items must be 0 (all) or more, got {max_items}")
    import world
    from sample import SetupError, generate, load_world, world_paths
    specs = []  # (row, kind, planner's folder, executor's folder): every row checked before any video is made
    for row in rows.split(","):
        kind, _, where = row.partition("@")
        plan_from, plus, film_from = (where or checkpoints).partition("+")
        if kind not in ("global", "gt", "planner"):
            die(f"row '{row}': unknown kind '{kind}' (global, planner or gt)")
        if plus and kind != "planner":
            die(f"row '{row}': only planner rows take two folders (P+E)")
        specs.append((row, kind, plan_from, film_from or plan_from))  # E: the executor's and text encoder's folder
    folders = list(dict.fromkeys(w for spec in specs for w in spec[2:]))
    try:
        for w in folders:  # all there before any is loaded
            world_paths(w)
        loaded = {w: load_world(w, device) for w in folders}
    except (SetupError, ValueError) as e:
        die(str(e))
    sets = {name: world.benchmark(name)[:max_items or None] for name in ("simple", "hard")}
    table, extra = {}, {}
    for row, kind, plan_from, film_from in specs:
        models = {**loaded[film_from], "planner": loaded[plan_from]["planner"]}
        conf = os.path.join(film_from, "config.json")
        smooth = json.load(open(conf)).get("smoothing", smoothing) if os.path.exists(conf) else smoothing
        t0 = time.time()
        res = {}
        for name, items in sets.items():
            ins = [it["instruction"] for it in items]
            if kind == "global":
                plans = [[(x, 0, world.T)] for x in ins]
            elif kind == "planner":
                out = models["planner"].plan(ins)
                extra[f"{row}: valid plans {name}"] = sum(p is not None for p, _, _ in out) / len(out)
                plans = [p if p is not None else [(x, 0, world.T)] for (p, _, _), x in zip(out, ins)]
            else:  # gt
                plans = [[tuple(s) for s in it["plan"]] for it in items]
            scores = []  # one score dict per (generation seed, item): the row's mean is over both
            for g in range(seed, seed + eval_seeds):
                videos = generate(models, plans, seed=g, smooth=smooth if kind != "global" else "none",
                                  steps=sample_steps)
                scores += judge_videos(list(videos), ins, plans)
            res[name] = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
        table[row] = res
        print(f"  {row}: {time.time() - t0:.1f} s")
    items = [it for name in sets for it in sets[name]]  # ground-truth renders: the aesthetic reference
    ref = judge_videos([world.render(it["instruction"]) for it in items], [it["instruction"] for it in items],
                       [[tuple(s) for s in it["plan"]] for it in items])
    ref_aes = sum(r["aesthetic"] for r in ref) / len(ref)
    dev = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    seeds = f"seed {seed}" if eval_seeds == 1 else f"seeds {seed}-{seed + eval_seeds - 1}"
    print(f"\nTable 1 on the shapes world (held-out Simple/Hard, {len(sets['simple'])}/{len(sets['hard'])} items), "
          f"{seeds}, {sample_steps} Euler steps per chunk, on {dev}")
    print(f"{'row':42s} {'Simple':>7s} {'Hard':>7s} {'Simple*':>8s} {'Hard*':>7s} {'avg':>6s} {'gain':>7s} {'aesth':>6s} {'planQ':>6s}")
    names = {"global": "single prompt", "planner": "step prompts (planner)", "gt": "step prompts (ground truth)"}
    avg = {row: (r["simple"]["temporal"] + r["hard"]["temporal"] + r["simple"]["strict"] + r["hard"]["strict"]) / 4
           for row, r in table.items()}
    base = avg.get("planner")
    for row, r in table.items():
        s, h = r["simple"], r["hard"]
        aes, pq = (s["aesthetic"] + h["aesthetic"]) / 2, (s["plan"] + h["plan"]) / 2
        kind, _, where = row.partition("@")
        label = names.get(kind, kind) + (f" [{where}]" if where else "")
        gain = f"{100 * (avg[row] / base - 1):+6.1f}%" if base and row != "planner" else ""
        print(f"{label:42s} {s['temporal']:7.3f} {h['temporal']:7.3f} {s['strict']:8.3f} {h['strict']:7.3f} "
              f"{avg[row]:6.3f} {gain:>7s} {aes:6.3f} {pq:6.3f}")
    print(f"{'ground-truth renders':42s} {'':>7s} {'':>7s} {'':>8s} {'':>7s} {'':>6s} {'':>7s} {ref_aes:6.3f}")
    print("(* = the stricter evaluation judge, never used as a reward; avg = mean of the four temporal columns;")
    print(" gain = avg relative to the base planner's step prompts; planQ = plan-quality judge)")
    for row, r in table.items():
        if row.partition("@")[0] == "planner":
            print(f"{row}: plan quality {r['simple']['plan']:.3f} Simple, {r['hard']['plan']:.3f} Hard")
    for k, v in extra.items():
        print(f"{k}: {v:.2f}")


def bench_scaling():
    """Weak scaling of train.py on the world: `torchrun --nproc_per_node=K` for each K, each rank its own
    instructions; rollouts per second from log.jsonl over the iterations after the warm-up ones, against K
    times the one-process figure of the same run."""
    import subprocess
    rows = []
    for k in [int(x) for x in gpus.split(",")]:
        out = os.path.join(scaling_out, f"gpus{k}")
        if os.path.exists(os.path.join(out, "log.jsonl")):
            os.remove(os.path.join(out, "log.jsonl"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}", "train.py",
               f"--out_dir={out}", f"--max_iters={scaling_iters}", "--save_checkpoints=False", f"--device={device}",
               *scaling_args.split()]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{k} GPU(s) failed: " + r.stderr[-1500:])
            continue
        log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))][warmup_iters:]
        secs = sum(x["t_plan"] + x["t_rollout"] + x["t_judge"] + x["t_update"] for x in log)
        phases = {p: sum(x[f"t_{p}"] for x in log) / len(log) for p in ("plan", "rollout", "judge", "update")}
        rows.append((k, sum(x["rollouts"] for x in log) / len(log), secs / len(log), sum(x["rollouts"] for x in log) / secs,
                     phases, {t: sum(x[t] for x in log) / len(log) for t in ("r_temporal", "r_local")}))
        print(f"  {k} GPU(s): {rows[-1][3]:.2f} rollouts/s over {len(log)} timed iterations ({rows[-1][2]:.2f} s each), "
              f"{time.time() - t0:.0f} s with start-up", flush=True)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\ntrain.py on the shapes world, weak scaling ({scaling_args or 'default config'}), {scaling_iters} iterations "
          f"per run of which the first {warmup_iters} are not timed, on {name}")
    print(f"{'GPUs':>4s} {'rollouts/iter':>13s} {'s/iter':>7s} {'rollouts/s':>10s} {'speed-up':>8s} {'efficiency':>10s}   "
          f"{'plan':>5s} {'rollout':>7s} {'judge':>5s} {'update':>6s} (s)   temporal  local")
    for k, per_iter, s_iter, rps, ph, r in rows:
        one = rows[0][3] / rows[0][0]  # rollouts/s per GPU of the first row
        print(f"{k:4d} {per_iter:13.0f} {s_iter:7.2f} {rps:10.2f} {rps / rows[0][3]:8.2f} {rps / (k * one):10.2f}   "
              f"{ph['plan']:5.2f} {ph['rollout']:7.2f} {ph['judge']:5.2f} {ph['update']:6.2f}       {r['r_temporal']:.3f}  {r['r_local']:.3f}")
    print("(speed-up = rollouts/s over the first row's; efficiency = rollouts/s / (GPUs x the first row's per GPU))")


def bench_memory():
    """The memory plan per GPU of one Wan-scale iteration (config/wan_bench.py's setup), from the model shapes."""
    import backbones
    sizes = backbones.model_sizes()
    for off in (False, True):
        backbones.memory_plan(mem_gpus, mem_gpu_gb, sizes, offload=off)


def bench_generate():
    """Streaming text-to-video at Wan2.1-1.3B size with random weights (no download): 480x832, 21 latent
    frames in 7 chunks of 3, Self-Forcing's 4-step sampler plus the clean pass per chunk, batch 1, bf16,
    each chunk VAE-decoded as it arrives (to uint8 frames on the GPU). Text encoding is excluded: the
    prompts' umT5 states are given (random). A row times `repeats` whole videos after one warm-up video
    (CUDA-synchronised wall clock, median): FPS = 81 frames / wall time; first chunk = wall time until the
    first chunk's 9 frames are decoded; DiT only = FPS without the VAE, from CUDA events around each
    decode in the same videos; peak = max GPU memory allocated during the row. "ours" is the Triton attention
    kernel with the block's elementwise parts compiled (model.COMPILE); the rows name what they change."""
    import statistics

    import model as M
    import vae as V

    dev, dt = device, torch.bfloat16
    torch.backends.cudnn.benchmark = True  # the VAE's conv shapes repeat every chunk
    t_start = time.time()
    torch.manual_seed(0)
    with torch.device(dev):
        net = M.WanDiT(M.ModelConfig(**M.asdict(M.CONFIGS[size])))  # its own config: rows set the cache
        torch.nn.init.normal_(net.head.head.weight, std=0.02)  # Wan zero-inits the output layer
        vae = V.WanVAE(V.VAE_CONFIGS["wan2.1"])
    net = net.to(dt).eval().requires_grad_(False)
    vae = V.channels_last(vae.to(dt).eval().requires_grad_(False))
    prompts = [torch.randn(1, net.cfg.text_len, net.cfg.text_dim, device=dev, dtype=dt) for _ in range(2)]  # umT5
    nf, c = latent_frames, net.cfg.chunk_frames
    shape = (1, nf, 16, height // 8, width // 8)
    frames = 1 + 4 * (nf - 1)

    def video(switch: bool, decode: bool = True):
        """One streamed video -> (wall s, first-chunk s, VAE GPU s)."""
        contexts = [prompts[1 if switch and j * c >= switch_frame else 0] for j in range(nf // c)]
        decoder, events, first = vae.stream(), [], None
        g = torch.Generator(dev).manual_seed(0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for j, x0 in enumerate(M.stream(net, contexts, shape, generator=g, device=dev, switch_recache=switch)):
            if decode:
                events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
                events[-1][0].record()
                x = decoder(x0)  # (1, 9 or 12, 3, H, W) in [-1, 1]
                x = ((x + 1) * 127.5).round().to(torch.uint8)
                events[-1][1].record()
            if j == 0:
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
        torch.cuda.synchronize()
        return time.perf_counter() - t0, first, sum(a.elapsed_time(b) for a, b in events) / 1000

    def row(name, switch=False, sdpa=False, compiled=True, decode=True):
        M.SDPA, M.COMPILE = sdpa, compiled
        video(switch, decode)  # warm-up: autotuning, compilation, cuDNN plans, the allocator's pool
        torch.cuda.reset_peak_memory_stats()
        runs = [video(switch, decode) for _ in range(repeats)]
        wall, first, vae_s = (statistics.median(r[i] for r in runs) for i in range(3))
        dit = f"{frames / (wall - vae_s):9.1f}" if decode else f"{frames / wall:9.1f}"
        print(f"{name:44s} {frames / wall if decode else float('nan'):7.1f} {dit} {1000 * first:9.0f} "
              f"{wall:7.2f} {vae_s:6.2f} {torch.cuda.max_memory_allocated() / 2 ** 30:8.1f}", flush=True)

    def vae_layout():
        """The VAE alone on a whole video's latents, channels-last vs PyTorch's default layout."""
        z = torch.randn(shape, device=dev, dtype=dt)
        for cl in (False, True):  # channels-last last: the layout the other rows use
            V.CHANNELS_LAST = cl
            V.channels_last(vae)
            times = []
            for i in range(repeats + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                s = vae.stream()
                for x in z.split(c, dim=1):
                    s(x)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            print(f"VAE decode of {frames} frames alone, {'channels-last' if cl else 'default layout':15s}: "
                  f"{statistics.median(times[1:]):.3f} s", flush=True)
        V.CHANNELS_LAST = True

    def profile():
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile
        M.SDPA, M.COMPILE = False, True
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            wall = video(False)[0]
        kernels = [e for e in prof.key_averages() if str(e.device_type).endswith("CUDA")]  # GPU kernels only
        total = sum(e.self_device_time_total for e in kernels) / 1e6
        print(f"\nprofile of one global-cache video (ours, compiled, decode), under the profiler: wall {wall:.2f} s, "
              f"GPU kernels {total:.2f} s (the difference: the GPU waiting on Python)")
        groups = {"attention (Triton, or SDPA)": ("_attn_fwd", "flash", "fmha", "sdpa"),
                  "convolutions (VAE, patch embedding; cuDNN)": ("conv", "fprop", "implicit", "winograd", "cudnn"),
                  "GEMMs (DiT linears)": ("gemm", "nvjet", "cutlass", "sm90", "cublas"),
                  "fused elementwise (torch.compile)": ("triton_",),
                  "other elementwise, norms, copies": ("elementwise", "vectorized", "copy", "cat", "reduce", "norm",
                                                       "upsample", "fill", "index", "gelu", "silu")}
        spent = {k: 0.0 for k in groups}
        spent["other"] = 0.0
        for e in kernels:
            k = next((k for k, keys in groups.items() if any(s in e.key.lower() for s in keys)), "other")
            spent[k] += e.self_device_time_total / 1e6
        for k, s in spent.items():
            print(f"  {k:44s} {s:6.2f} s  {100 * s / max(total, 1e-9):5.1f}%")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60))

    gpu = torch.cuda.get_device_name()
    print(f"\nstreaming generation, {size} DiT ({net.num_params() / 1e9:.2f} B parameters, random weights), "
          f"{height}x{width}, {nf} latent frames -> {frames} frames, chunks of {c}, 4 steps + 1 clean pass per chunk, "
          f"batch 1, bf16, on {gpu}; torch {torch.__version__}; text encoding excluded")
    print(f"{'row':44s} {'FPS':>7s} {'DiT only':>9s} {'first ms':>9s} {'wall s':>7s} {'VAE s':>6s} {'peak GiB':>8s}")
    plan = {
        "eager": lambda: row("global cache, ours, eager (no torch.compile)", compiled=False),
        "triton": lambda: row("global cache (Self-Forcing), ours"),
        "sdpa": lambda: row("global cache (Self-Forcing), SDPA", sdpa=True),
        "longlive": lambda: row(f"sink+window, re-cache at frame {switch_frame}, ours", switch=True),
        "longlive-sdpa": lambda: row(f"sink+window, re-cache at frame {switch_frame}, SDPA", switch=True, sdpa=True),
        "no-decode": lambda: row("global cache, ours, no VAE decode", decode=False),
        "vae-layout": vae_layout,
        "profile": profile,
    }
    unknown = [name for name in rows_generate.split(",") if name not in plan]
    if unknown:
        raise SystemExit(f"error: unknown row '{unknown[0]}' (one of {', '.join(plan)})")
    for name in rows_generate.split(","):
        if budget_s and time.time() - t_start > budget_s:
            print(f"(skipped '{name}': the {budget_s:.0f} s budget is spent)")
            continue
        if name.startswith("longlive"):
            net.cfg.sink_frames, net.cfg.window_frames = 3, 9  # the same weights as LongLive: a 3 + 9 frame cache
        else:
            net.cfg.sink_frames, net.cfg.window_frames = 0, 0
        try:
            plan[name]()
        except Exception as e:  # one failed row (a backend, the compiler) is reported, not fatal
            print(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", flush=True)
    print(f"FPS = {frames} frames / wall time of the whole streamed video, VAE decode included; DiT only = without "
          f"the VAE (its CUDA-event time taken out); first ms = until the first chunk's frames are decoded; "
          f"SDPA = torch's scaled_dot_product_attention with its default backend choice")


def bench_update():
    """train.py's executor update re-scores the K policy steps of a transition chunk at chunk j. Before: K
    forward + backward passes of the context frames [0, jC) followed by the chunk at sigma_k. Now
    (transition_steps): one pass of the context followed by K copies of the chunk, each seeing the context
    and itself (model.forward_copies). Both in bf16 autocast on float32 weights, as train.py trains; the
    Wan-1.3B rows (random weights, 480x832, K = 3 re-noise steps, one row a pass) recompute each block in
    the backward as config/wan_bench.py does; the world rows (K = 9 Euler steps) take 32 rows a pass.
    Median of `repeats` timed runs after one warm-up; the same weights and inputs for both."""
    import statistics

    import model as M

    dev = device
    print(f"executor update, one transition chunk's K steps re-scored, forward + backward, on {torch.cuda.get_device_name()}")
    print(f"{'model':10s} {'rows':>4s} {'chunk j':>7s} {'K':>2s} {'K passes ms':>12s} {'copies ms':>10s} {'speed-up':>8s}")
    for name, B, K, hw, js in (("wan-1.3b", 1, 3, (height // 8, width // 8), (2, 6)), ("world", 32, 9, (64, 64), (2, 7))):
        torch.manual_seed(0)
        cfg = M.CONFIGS[name]
        with torch.device(dev):
            net = M.WanDiT(cfg)
        if name != "world":  # memory for one block's activations at a time (train.py's grad_ckpt)
            M.recompute_blocks(net)
        C, shape = cfg.chunk_frames, (cfg.in_dim, *hw)
        for j in js:
            ctx = torch.randn(B, j * C, *shape, device=dev)
            xs = torch.randn(B, K, C, *shape, device=dev)
            text = torch.randn(B, j + 1, cfg.text_len, cfg.text_dim, device=dev)
            sig = torch.linspace(900, 100, K, device=dev)

            def separate():
                for k in range(K):
                    t = torch.cat([torch.zeros(B, j * C, device=dev), sig[k].expand(B, C)], 1)
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        v = net(torch.cat([ctx, xs[:, k]], 1), t, text)[:, j * C:]
                    v.float().square().mean().backward()

            def copies():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    v = M.forward_copies(net, ctx, xs, sig, text)
                v.float().square().mean().backward()

            ms = {}
            for fn in (separate, copies):
                times = []
                for i in range(repeats + 1):  # the first: kernel tuning, allocations
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    net.zero_grad(set_to_none=True)
                ms[fn.__name__] = 1000 * statistics.median(times[1:])
            print(f"{name:10s} {B:4d} {j:7d} {K:2d} {ms['separate']:12.1f} {ms['copies']:10.1f} "
                  f"{ms['separate'] / ms['copies']:7.2f}x", flush=True)
        del net
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if mode in ("kernel", "generate", "scaling", "update") and not torch.cuda.is_available():
        die(f"--{mode} measures GPUs: no CUDA GPU here")
    if mode == "generate":
        bench_generate()
    elif mode == "scaling":
        bench_scaling()
    elif mode == "memory":
        bench_memory()
    elif mode == "update":
        bench_update()
    elif mode == "kernel":
        if check:
            check_kernel()
        bench_kernel()
    elif mode == "quality":
        bench_quality()
    else:
        raise SystemExit(f"error: unknown mode '{mode}'")
