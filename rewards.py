"""Judges. Every judge is a pure function that returns a float in [0, 1], shared by training
(rewards) and evaluation (bench.py). The world's judges below are exact: they read the
instruction with the grammar and the video with perception (world.py).

    temporal_following(video, instruction)                  every step realised, in order, nothing premature
    local_step_following(video, span, prev_step, next_step)  the transition chunk: new step starts, old one done
    local_step_continuing(video, span, step, since)          a chunk inside a step: it gets on, nothing else starts
    plan_quality(plan, instruction, num_frames)              coverage, order, no invented steps, feasible spans
    aesthetic(frames)                                        clean frames (the PickScore stand-in)
    temporal_following_strict(video, instruction)            evaluation only (the out-of-domain judge)

Videos: uint8 numpy (T, H, W, 3) or a float torch tensor (T, 3, H, W) in [0, 1] or [-1, 1].
"""
import logging
import math
import re
from collections import Counter

import numpy as np
import torch

from planner import format_plan
from world import (BACKGROUND, CHUNK, DIRECTIONS, DURATION, MOVE_DIST, PALETTE, TOUCH_TOL, TWO_OBJECT, T, Det, ParseError,
                   cosine, obj_cost, as_video, chunks_needed, detect_events, gap, observe, parse, parse_step_prompt, perceive,
                   simulate, Step, step_prompts, track)

# -----------------------------------------------------------------------------
# does one detected event realise one step of the script?


def _realises(step, ev, tracks, before, after, strict: bool, partial: bool = False) -> bool:
    """before/after: the script's states around the step (strict checks absolute positions with them).
    partial: the event may be cut off (the local judge sees only the first chunk of a step)."""
    if ev.obj != step.actor or ev.kind != {"move_to": "move", "move_until": "move"}.get(step.kind, step.kind):
        return False
    if step.kind == "turn":
        return ev.value == step.arg
    if step.kind in ("grow", "shrink"):
        return not strict or abs(ev.end - ev.start - DURATION[step.kind]) <= CHUNK
    dx, dy = ev.value
    if step.kind in ("move", "move_until"):
        ux, uy = DIRECTIONS[step.arg]
        along, across = dx * ux + dy * uy, abs(dx * uy - dy * ux)
        need = 2.0 if partial else (0.6 * MOVE_DIST if step.kind == "move" else 4.0)
        ok = along >= need and across <= 0.4 * along
    else:  # move_to: heads for where the target was
        tgt = tracks[step.target][max(ev.start - 1, 0)]
        ok = tgt is not None and cosine((dx, dy), (tgt.x - ev.before.x, tgt.y - ev.before.y)) >= 0.8
    if ok and step.kind in ("move_to", "move_until") and not partial:
        tgt = tracks[step.target][ev.end - 1]
        ok = tgt is not None and gap(ev.after, tgt) <= (TOUCH_TOL - 1 if strict else TOUCH_TOL)
    if ok and strict:  # right place, natural speed
        a, b = before[step.actor], after[step.actor]
        ok = (math.hypot(ev.before.x - a.x, ev.before.y - a.y) <= 5 and math.hypot(ev.after.x - b.x, ev.after.y - b.y) <= 5
              and abs(ev.end - ev.start - DURATION[step.kind]) <= CHUNK)
    return ok


def _in_order(n: int, events: list, ok) -> int:
    """Most steps matched to distinct events, both in order, each event starting after the previous
    matched one ended: a step that starts too early does not count."""
    best = {}  # (step, event) -> most matches ending with this pair
    for k in range(n):
        for j, ev in enumerate(events):
            if ok(k, j):
                prev = [v for (k2, j2), v in best.items() if k2 < k and j2 < j and events[j2].end <= ev.start]
                best[k, j] = 1 + max(prev, default=0)
    return max(best.values(), default=0)


def _follow(video, instruction: str, strict: bool) -> float:
    objs, steps = parse(instruction)
    states = simulate(objs, steps)
    tracks, dets = observe(as_video(video), objs, min_area=6 if strict else 12)
    events = detect_events(tracks, move_min=2.5 if strict else 4.0, size_min=1.5 if strict else 2.5)
    matched = _in_order(len(steps), events, lambda k, j: _realises(steps[k], events[j], tracks, states[k], states[k + 1], strict))
    score = matched / (len(steps) + len(events) - matched)  # unmatched events are extra or premature actions
    # objects consistent: the right number of objects in every frame, each keeping its shape (strict: the
    # instruction's shape; lenient: its own usual shape, since heavy blur can round a small square)
    shapes = [o.shape for o in objs] if strict else [Counter(d.shape for d in tr if d).most_common(1)[0][0]
                                                     if any(tr) else None for tr in tracks]
    steady = np.mean([len(ds) == len(objs) and all(tr[t] is not None and tr[t].shape == s for tr, s in zip(tracks, shapes))
                      for t, ds in enumerate(dets)])
    start_ok = np.mean([_looks_like(tr[0], o, strict) for tr, o in zip(tracks, objs)])  # the scene the instruction sets up
    if not strict:
        return float(score * steady * (0.5 + 0.5 * start_ok))
    end_ok = np.mean([_looks_like(tr[-1], o, strict) for tr, o in zip(tracks, states[-1])])  # and where the script ends
    return float(score * steady ** 2 * (0.5 + 0.5 * start_ok) * (0.5 + 0.5 * end_ok))


def _looks_like(d: Det | None, o, strict: bool) -> bool:
    return (d is not None and d.colour == o.colour and d.size == o.size and (d.shape == o.shape or not strict)
            and math.hypot(d.x - o.x, d.y - o.y) <= (5 if strict else 10))


def temporal_following(video, instruction: str) -> float:
    """Every step realised, in order, nothing premature or extra, objects consistent."""
    return _follow(video, instruction, strict=False)


def temporal_following_strict(video, instruction: str) -> float:
    """Stricter and never a reward: absolute positions within 5 px of the script, steps at natural
    speed (within a chunk), no overlap at all, smaller extra motions count, the final scene must match."""
    return _follow(video, instruction, strict=True)

# -----------------------------------------------------------------------------


def _chunk_tracks(video, span, step_prompt: str):
    """The local judges' view of one chunk span = (start, end): the video up to its end perceived and tracked,
    events at a lower threshold (a chunk holds only part of a move), the step's actor and target mapped to
    tracks by where the objects are just before the chunk. Returns (s, e, tracks, events, step, who, at),
    or None for a bad span or prompt."""
    try:
        s, e = int(span[0]), int(span[1])
        v = as_video(video)[:e]
        n_objs, n_step = parse_step_prompt(step_prompt)
    except (ParseError, ValueError, TypeError, IndexError):
        return None
    if not 0 <= s < e <= len(v):
        return None
    dets = perceive(v)
    # objects shown; one more than the prompt names is enough to see an extra one move, and the
    # tracker's exhaustive assignment grows factorially with it (a speckled video shows dozens)
    n = min(max(1, int(np.median([len(d) for d in dets]))), len(n_objs) + 1)
    tracks = track(dets, n)
    events = detect_events(tracks, move_min=2.0)
    at = lambda tr: tr[max(s - 1, 0)]
    who = lambda o: min(range(n), key=lambda i: obj_cost(at(tracks[i]), o))  # the track the prompt describes
    ids = [who(o) for o in n_objs]
    step = Step(n_step.kind, ids[n_step.actor], n_step.arg, None if n_step.target is None else ids[n_step.target])
    return s, e, tracks, events, step, who, at


def local_step_following(video, span, prev_step: str | None, next_step: str, graded: bool = False,
                         paced: bool = False) -> float:
    """On the transition chunk span = (start, end): half for the new step starting inside it, half for
    the previous step being finished by then; anything else starting in the chunk halves the score.
    graded: each half in [0, 1] instead of yes/no (how far the new step got, how close the previous
    one ended), so that an execution group's continuations rarely tie (a VLM judge's P("Yes") is graded too).
    paced (with graded): a move's start is graded against the script's own pace, not a 3 px start (_progress)."""
    try:
        p_objs, p_step = parse_step_prompt(prev_step) if prev_step is not None else (None, None)
    except (ParseError, ValueError, TypeError, IndexError):
        return 0.0
    view = _chunk_tracks(video, span, next_step)
    if view is None:
        return 0.0
    s, e, tracks, events, step, who, at = view
    started = [ev for ev in events if s <= ev.start < e and _realises(step, ev, tracks, None, None, False, partial=True)]
    begun = _progress(step, tracks, s, e, paced=paced) if graded else float(bool(started))
    done = 1.0
    if p_step is not None:
        after = simulate(p_objs, (p_step,))[1]
        a = who(after[p_step.actor])
        d, want = at(tracks[a]), after[p_step.actor]
        if d is None:
            miss = math.inf
        elif p_step.kind in ("move_to", "move_until"):
            tgt = at(tracks[who(after[p_step.target])])
            miss = gap(d, tgt) - TOUCH_TOL if tgt is not None else math.inf
        else:
            miss = math.hypot(d.x - want.x, d.y - want.y) - 8
        # graded: full marks where the yes/no judge says placed, none 12 px further off
        placed = min(1.0, max(0.0, 1 - miss / 12)) if graded else float(miss <= 0)
        looks = d is not None and d.colour == want.colour and d.size == want.size
        going = any(ev.obj == a and ev.start < s < ev.end for ev in events)  # still moving into the chunk
        done = placed * looks * (not going)
    extra = [ev for ev in events if s <= ev.start < e and ev not in started]
    return (0.5 * begun + 0.5 * done) * (0.5 if extra else 1.0)


def local_step_continuing(video, span, step_prompt: str, since: int, graded: bool = False) -> float:
    """On a chunk inside a step that took over at frame `since` (no prompt switch in the chunk; train.py's
    transition="any", not in the paper): half for the step getting on if it is still under way by the script's
    timing (its kind's DURATION, in whole chunks from `since`; graded: how far it got within this chunk; yes/no:
    one of its events runs through the chunk), or full marks for that half if it should be done; the other half
    always; anything else starting in the chunk halves the score, as on the transition chunk. Unasked size
    changes and stray moves, which the whole-video judge counts against a video, are then charged to the chunk
    where they start."""
    view = _chunk_tracks(video, span, step_prompt)
    if view is None:
        return 0.0
    s, e, tracks, events, step, _, _ = view
    under_way = s < since + chunks_needed(step.kind) * CHUNK
    mine = [ev for ev in events if ev.start < e and ev.end > s and _realises(step, ev, tracks, None, None, False, partial=True)]
    going = 1.0 if not under_way else _progress(step, tracks, s, e, fresh=False) if graded else float(bool(mine))
    extra = [ev for ev in events if s <= ev.start < e and ev not in mine]
    return (0.5 * going + 0.5) * (0.5 if extra else 1.0)


def _progress(step: Step, tracks, s: int, e: int, fresh: bool = True, paced: bool = False) -> float:
    """How far the actor got into the step within the chunk, in [0, 1]: full marks for travelling 3 px
    the right way (the slowest natural move covers that in a chunk), turning to the new colour, or a
    size change the event detector would call one; less whatever it already did in the chunk before
    (a step that started early is premature, as for the yes/no judge). fresh=False: a step under way
    since before the chunk, whose progress before it is no fault. paced: a move's full marks need 0.8 of
    what the script covers in the step's first chunk (world.render_script: (CHUNK - 1) / (DURATION - 1) of
    its distance; a two-object step's distance is the gap to its target), at least 3 px. Two-object steps
    that start slower than that mostly stop short of their target (EXPERIMENTS.md, twenty-sixth attempt)."""
    tr, t = tracks[step.actor], max(s - 1, 0)
    ref = tracks[step.target][t] if step.kind in TWO_OBJECT else None  # the target just before the chunk
    if tr[t] is None or (step.kind == "move_to" and ref is None):
        return 0.0
    need = 3.0  # px of travel for full marks
    if paced and step.kind in ("move", *TWO_OBJECT):
        distance = MOVE_DIST if step.kind == "move" else gap(tr[t], ref) if ref is not None else 0.0
        need = max(need, 0.8 * distance * (CHUNK - 1) / (DURATION[step.kind] - 1))

    def gain(t0: int, t1: int) -> float:  # the step's progress from frame t0 to frame t1
        if t1 <= max(t0, 0):  # no frames (the chunk before the video's start)
            return 0.0
        a, b = tr[max(t0, 0)], tr[t1]
        if a is None or b is None:
            return 0.0
        if step.kind == "turn":
            return float(a.colour != step.arg and b.colour == step.arg)
        if step.kind in ("grow", "shrink"):
            change = math.sqrt(b.area) - math.sqrt(a.area)
            return min(1.0, max(0.0, (change if step.kind == "grow" else -change) / 2.5))
        ux, uy = DIRECTIONS[step.arg] if step.kind != "move_to" else (ref.x - tr[t].x, ref.y - tr[t].y)
        norm = math.hypot(ux, uy) or 1.0  # move_to: heads for where the target was
        dx, dy = b.x - a.x, b.y - a.y
        along, across = (dx * ux + dy * uy) / norm, abs(dx * uy - dy * ux) / norm
        return min(1.0, max(0.0, (along - 0.5 * across) / need))
    if not fresh:  # a step under way since before the chunk: its progress within the chunk
        return gain(s - 1, e - 1)
    return max(0.0, gain(s - 1, e - 1) - gain(s - 1 - (e - s), s - 1))

# -----------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _valid_plan(plan, num_frames: int) -> bool:
    try:
        spans = [(p, s, e) for p, s, e in plan]
    except (TypeError, ValueError):
        return False
    return (len(spans) > 0 and all(isinstance(p, str) and _is_int(s) and _is_int(e) and 0 <= s < e <= num_frames
                                   for p, s, e in spans)
            and all(a[2] <= b[1] for a, b in zip(spans, spans[1:])))  # sorted, non-overlapping


def _step_key(objs, step) -> tuple:
    """What a step is, whatever state it names: who does what (to whom). Shapes identify objects."""
    return (objs[step.actor].shape, step.kind, step.arg, None if step.target is None else objs[step.target].shape)


def plan_quality(plan, instruction: str, num_frames: int = T) -> float:
    """Steps matched in order to the instruction's, over (steps + invented entries); a matched step
    gets 1 if its span is chunk-aligned and long enough (0.5 if not) and its prompt names the right
    state (0.8 if not); times the fraction of frames covered. Not a valid plan: 0."""
    if not _valid_plan(plan, num_frames):
        return 0.0
    objs, steps = parse(instruction)
    truth = step_prompts((objs, steps))
    keys = [_step_key(objs, s) for s in steps]
    entries = []
    for prompt, s, e in plan:
        try:
            o, st = parse_step_prompt(prompt)
            entries.append((_step_key(o, st), prompt, s, e, st.kind))
        except ParseError:
            entries.append((None, prompt, s, e, None))
    # best in-order matching (longest common subsequence, weighted by each pair's credit)
    def credit(k, j):
        key, prompt, s, e, kind = entries[j]
        if key != keys[k]:
            return 0.0
        feasible = e - s >= DURATION[kind] and s % CHUNK == 0
        return (1.0 if feasible else 0.5) * (1.0 if prompt == truth[k] else 0.8)
    n, m = len(steps), len(entries)
    best = np.zeros((n + 1, m + 1))
    used = np.zeros((n + 1, m + 1), int)  # how many entries the best matching uses
    for k in range(1, n + 1):
        for j in range(1, m + 1):
            c = credit(k - 1, j - 1)
            options = [(best[k - 1, j], used[k - 1, j]), (best[k, j - 1], used[k, j - 1])]
            if c > 0:
                options.append((best[k - 1, j - 1] + c, used[k - 1, j - 1] + 1))
            best[k, j], used[k, j] = max(options)
    covered = sum(e - s for _, s, e in plan) / num_frames
    return float(best[n, m] / (n + m - used[n, m]) * covered)

# -----------------------------------------------------------------------------


def aesthetic(frames) -> float:
    """Fraction of pixels within 30 of a palette or background colour (sharp, flat, noise-free),
    less the fraction of isolated pixels (speckle)."""
    v = as_video(frames).astype(np.float32)
    colours = np.array([BACKGROUND, *PALETTE.values()], np.float32)  # (C, 3)
    d2 = ((v[..., None, :] - colours) ** 2).sum(-1)                   # (T, H, W, C)
    cls = d2.argmin(-1)
    clean = d2.min(-1) <= 30 ** 2
    inner = cls[:, 1:-1, 1:-1]
    alone = ((inner != cls[:, :-2, 1:-1]) & (inner != cls[:, 2:, 1:-1])
             & (inner != cls[:, 1:-1, :-2]) & (inner != cls[:, 1:-1, 2:]))  # differs from all 4 neighbours
    return float(clean.mean() * (1 - alone.mean()))


WORLD_JUDGES = {
    "temporal_following": temporal_following,
    "local_step_following": local_step_following,
    "plan_quality": plan_quality,
    "aesthetic": aesthetic,
    "temporal_following_strict": temporal_following_strict,
}

# -----------------------------------------------------------------------------
# Hugging Face judges (real backbones)
# The same call signatures as the world's exact judges above, on real models: Qwen3-VL for
# temporal and local step following, a Qwen3 LLM for plan quality, PickScore for aesthetics.
# Every judge reads its score from one forward pass (the answer tokens' probabilities at the
# answer position), so it is deterministic; messy output falls back to greedy text, and
# garbage scores 0.0 with a logged reason instead of raising.

judge_log = logging.getLogger(__name__)

PLAN_QUALITY_PROMPT = """You are checking a plan for a video generator. The plan splits an instruction into
ordered steps and gives each step an interval [start, end) of latent frames, out of {num_frames}.

Instruction: {instruction}
Plan: {plan}

Judge the plan on four points:
1. Faithfulness: each step says what the instruction says, with the same subjects, attributes and actions.
2. Event coverage: every event of the instruction appears in exactly one step; none is dropped or merged.
3. Temporal coherence: the steps follow the instruction's order, and each interval is long enough for its step.
4. No hallucination: no step, object or detail that the instruction does not ask for.

Score 1 to 5: 5 = all four hold; 4 = one small flaw (for example an interval a little too short);
3 = one clear flaw; 2 = several flaws, or a step dropped or out of order; 1 = unrelated or unusable.
Answer with the digit only."""

TEMPORAL_FOLLOWING_PROMPT = """Watch the video. It should show these events, in this order: "{instruction}"

Judge the whole video on three points:
1. Temporal order: every event happens, in the given order, and none starts before the previous one ends.
2. Physical consistency: objects keep their identity and do not vanish, jump or change without cause.
3. Text-video alignment: the subjects, attributes and actions are the ones the text names.

Score 1 to 5: 5 = all events, in order, consistent and aligned; 4 = all events in order with a small
flaw; 3 = one event missing, early, blended or late; 2 = most events missing or out of order;
1 = unrelated to the text. Answer with the digit only."""

LOCAL_STEP_PROMPT = """This clip is the moment where a video should move from one step to the next.
Previous step: "{prev_step}"
Next step: "{next_step}"

Within this clip, does the previous step finish and the next step begin, in that order, with the
same objects? Answer Yes or No."""

SCALE_1_5 = {"1": 0.0, "2": 0.25, "3": 0.5, "4": 0.75, "5": 1.0}  # answer token -> score in [0, 1]
YES_NO = {"Yes": 1.0, "No": 0.0}

# -----------------------------------------------------------------------------
# score extraction


def answer_token_ids(tokenizer, answers: dict[str, float]) -> dict[int, float]:
    """
    Token id -> score, for every spelling of an answer that is one token in this vocabulary
    ("4", " 4", "yes", " Yes", ...). An answer that is several tokens, or unknown (decodes
    to something else, as [UNK] does), has no id and just cannot be read from the logits.
    """
    ids = {}
    for answer, value in answers.items():
        for spelling in {answer, " " + answer, answer.lower(), " " + answer.lower()}:
            tok = tokenizer.encode(spelling, add_special_tokens=False)
            if len(tok) == 1 and tokenizer.decode(tok).strip().lower() == answer.lower():
                ids.setdefault(tok[0], value)
    return ids


def expected_score(logits: torch.Tensor, ids: dict[int, float], min_mass: float = 0.5):
    """logits (V,) at the answer position -> (E[score] over the answer tokens or None, their total mass)."""
    if not ids:
        return None, 0.0
    probs = torch.softmax(logits.float(), -1)[list(ids)].cpu()  # (A,) on the host, where the scores are
    mass = probs.sum().item()
    if not math.isfinite(mass) or mass < min_mass:  # the model is not answering on this scale
        return None, mass
    return (probs * torch.tensor(list(ids.values()))).sum().item() / mass, mass


def parse_score(text: str, answers: dict[str, float]):
    """The first word or number of `text` that is an answer ('Score: 4' -> 0.75), or None."""
    lookup = {a.lower(): v for a, v in answers.items()}
    for word in re.findall(r"\d+|[A-Za-z]+", text or ""):
        if word.lower() in lookup:
            return lookup[word.lower()]
    return None


@torch.no_grad()
def read_score(model, inputs: dict, tokenizer, answers: dict[str, float], min_mass: float = 0.5,
               max_new_tokens: int = 8):
    """
    One forward pass -> expected score over the answer tokens; if they hold too little of the
    probability, greedy text -> the first answer in it; else 0.0. Returns (score, reason).
    Only the model's output is forgiven here: a model that fails to run still raises.
    """
    logits = model(**inputs, logits_to_keep=1).logits[0, -1]  # (V,) next-token logits at the answer position
    ids = {i: v for i, v in answer_token_ids(tokenizer, answers).items() if i < logits.shape[-1]}
    score, mass = expected_score(logits, ids, min_mass)
    if score is not None:
        return min(max(score, 0.0), 1.0), "ok"
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    score = parse_score(text, answers)
    if score is not None:
        return score, f"answer tokens hold {mass:.2f} of the probability; read {text!r}"
    reason = f"no answer: answer tokens hold {mass:.2f} of the probability and the text is {text!r}"
    judge_log.warning("judge scored 0.0: %s", reason)
    return 0.0, reason

# -----------------------------------------------------------------------------
# the judges


def to_model(inputs, model) -> dict:
    """A processor's tensors on the model's device; floating ones (pixels) in the model's dtype too."""
    return {k: (v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device))
            for k, v in inputs.items() if isinstance(v, torch.Tensor)}


class VLMJudge:
    """Qwen3-VL judge of a video (uint8 numpy (T, H, W, 3)): temporal and local step following."""

    def __init__(self, model, processor, fps: float = 16.0, max_frames: int = 32):
        self.model, self.processor = model.eval(), processor
        self.fps, self.max_frames = fps, max_frames  # fps of the frames given, for the timestamps
        self.min_mass = 0.5  # below this much probability on the answer tokens, read the text instead
        self.last_reason = ""

    @classmethod
    def from_pretrained(cls, path: str, device="cuda", dtype=torch.bfloat16, **kwargs):
        from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)
        return cls(model.to(device), processor, **kwargs)

    def score(self, video: np.ndarray, text: str, answers: dict[str, float]) -> float:
        from transformers.video_utils import VideoMetadata
        video = np.asarray(video)
        if video.ndim != 4 or len(video) == 0:
            self.last_reason = f"no frames to judge (video of shape {video.shape})"
            judge_log.warning("judge scored 0.0: %s", self.last_reason)
            return 0.0
        idx = np.linspace(0, len(video) - 1, min(len(video), self.max_frames)).round().astype(int)
        if len(idx) < 2:  # the vision tower merges frames in pairs
            idx = np.repeat(idx, 2)
        frames = video[idx]  # (T', H, W, 3)
        messages = [{"role": "user", "content": [{"type": "video", "video": frames, "fps": self.fps},
                                                 {"type": "text", "text": text}]}]
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # frames are already chosen: no resampling, and timestamps from the real frame indices
        meta = VideoMetadata(total_num_frames=len(video), fps=self.fps, frames_indices=idx.tolist())
        inputs = self.processor(text=[prompt], videos=[frames], video_metadata=[meta], do_sample_frames=False,
                                return_tensors="pt")
        score, self.last_reason = read_score(self.model, to_model(inputs, self.model), self.processor.tokenizer,
                                             answers, self.min_mass)
        return score

    def temporal_following(self, video, instruction: str) -> float:
        return self.score(video, TEMPORAL_FOLLOWING_PROMPT.format(instruction=instruction), SCALE_1_5)

    def local_step_following(self, video, span, prev_step: str, next_step: str) -> float:
        """span = (start, end) pixel frames of the transition chunk; P("Yes") on that clip."""
        start, end = span
        clip = np.asarray(video)[max(start, 0):max(end, start + 1)]  # at least one frame when start is inside
        text = LOCAL_STEP_PROMPT.format(prev_step=prev_step or "(nothing)", next_step=next_step)
        return self.score(clip, text, YES_NO)


class LLMJudge:
    """Qwen3 text judge of plan quality; chat template with thinking off when the tokenizer has one."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.min_mass = 0.5  # below this much probability on the answer tokens, read the text instead
        self.last_reason = ""

    @classmethod
    def from_pretrained(cls, path: str, device="cuda", dtype=torch.bfloat16):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        return cls(model.to(device), tokenizer)

    def plan_quality(self, plan, instruction: str, num_frames: int) -> float:
        if not plan:  # an unparsable plan is worth nothing, and needs no judge
            self.last_reason = "no plan"
            return 0.0
        text = PLAN_QUALITY_PROMPT.format(instruction=instruction, plan=format_plan(plan), num_frames=num_frames)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=False)
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        inputs = {k: enc[k].to(self.model.device) for k in ("input_ids", "attention_mask")}
        score, self.last_reason = read_score(self.model, inputs, self.tokenizer, SCALE_1_5, self.min_mass)
        return score


class PickScore:
    """
    PickScore (a CLIP fine-tuned on human preferences): logit_scale.exp() * cos(text, image) / 26,
    averaged over frames and clamped to [0, 1] (Flow-GRPO's /26 keeps it near that range).
    It scores an image against a prompt, so aesthetic(frames, prompt) takes the step prompt;
    with prompt=None a generic quality prompt stands in (the world's judge needs none).
    """
    DEFAULT_PROMPT = "a sharp, clean, high quality video frame"

    def __init__(self, model, processor):
        self.model, self.processor = model.eval(), processor

    @classmethod
    def from_pretrained(cls, model_path: str, processor_path: str, device="cuda", dtype=torch.float16):
        from transformers import CLIPModel, CLIPProcessor
        processor = CLIPProcessor.from_pretrained(processor_path, local_files_only=True)
        model = CLIPModel.from_pretrained(model_path, dtype=dtype, local_files_only=True)
        return cls(model.to(device), processor)

    @torch.no_grad()
    def aesthetic(self, frames, prompt: str | None = None) -> float:
        frames = [np.asarray(f) for f in frames]  # list of (H, W, 3) uint8
        inputs = self.processor(text=[prompt or self.DEFAULT_PROMPT], images=frames, padding=True,
                                truncation=True, max_length=77, return_tensors="pt")
        out = self.model(**to_model(inputs, self.model))
        score = out.logits_per_image[:, 0].float().mean().item() / 26  # logits = logit_scale.exp() * cos
        return min(max(score, 0.0), 1.0) if math.isfinite(score) else 0.0

    __call__ = aesthetic

# -----------------------------------------------------------------------------
# reward mixing

DEFAULT_REWARD_WEIGHTS = {  # untuned, equal: advantages are normalised within groups anyway
    "plan_quality": 1.0,          # planner reward (GSPO)
    "temporal_following": 1.0,    # planner reward, averaged over the plan's N continuations
    "local_step_following": 1.0,  # executor reward (Flow-GRPO), on the transition chunk
    "aesthetic": 1.0,             # executor reward, on the transition chunk
}


def mix_rewards(terms: dict[str, float], weights: dict[str, float] = DEFAULT_REWARD_WEIGHTS) -> float:
    """Weighted mean of the given reward terms (each in [0, 1], so the mix is too); NaN counts as 0."""
    unknown = set(terms) - set(weights)
    if unknown:
        raise ValueError(f"reward terms without a weight: {sorted(unknown)}")
    total = sum(weights[k] for k in terms)
    if total <= 0:
        return 0.0
    return sum(weights[k] * (v if math.isfinite(v) else 0.0) for k, v in terms.items()) / total
