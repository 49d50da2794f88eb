"""
The TempAct planner: an LLM that turns one global instruction into span-aware step prompts.

A plan is a plain list of (step prompt, start, end) in latent frames, end exclusive, sorted
and contiguous over [0, F). The planner is any Hugging Face causal LM: a tiny Qwen3 with a
word-level tokenizer for the shapes world, or Qwen3-8B through its chat template. This file
also holds prompt smoothing (how the executor sees the current and the upcoming step), plan
sampling with per-token log-probabilities, and the GSPO loss that trains the planner.
"""

import json
import math

import torch

# -----------------------------------------------------------------------------
# the plan format

MAX_STEPS = 8       # a plan with more steps than this is rejected
PLAIN_SEP = " plan:"  # tiny world planner: the prompt is the instruction followed by this

PLAN_PROMPT = """You plan videos for a generator that makes a video chunk by chunk.
Split the instruction into its steps, in the order they must happen, and give each step an
interval of latent frames.

Instruction: {instruction}

The video has {num_frames} latent frames, numbered 0 to {last}. Rules:
- Keep the order the instruction gives; do not add steps, objects or details it does not ask for.
- Each step prompt is one self-contained sentence that names its subject and describes only that step.
- Give each step as many frames as it needs: a movement takes longer than a change of colour.
- Intervals are [start, end) with end exclusive: the first starts at 0, each next one starts
  where the previous ends, and the last ends at {num_frames}.
- Use at most {max_steps} steps.

Answer with the JSON list only, in exactly this format:
[{{"prompt": "...", "start": 0, "end": 6}}, {{"prompt": "...", "start": 6, "end": {num_frames}}}]"""


def format_plan(plan: list[tuple[str, int, int]]) -> str:
    """The canonical JSON text of a plan: the supervised target, and what parse_plan reads back."""
    return json.dumps([{"prompt": p, "start": int(s), "end": int(e)} for p, s, e in plan], ensure_ascii=False)


def _as_int(x):
    # JSON numbers only: 6 and 6.0 pass, "6", true and 6.5 do not (bool is an int in Python)
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, float) and math.isfinite(x) and x == int(x):
        return int(x)
    return None


def parse_plan(text, num_frames: int, max_steps: int = MAX_STEPS, min_len: int = 1):
    """
    LLM text -> (plan, "ok") or (None, reason). Never raises: during RL a bad plan is a
    reward of 0 with a logged reason, not a crash. Prose around the JSON is tolerated (the
    first [...] value is read); keys are matched after stripping spaces and lower-casing and
    prompts have their whitespace collapsed and lose the space before a comma, so the spaced-out
    text of a word-level tokenizer (`[ { " prompt " : " a red circle , with ... " , ...`) parses
    like the canonical form.
    """
    if not isinstance(text, str):
        return None, f"output is not text ({type(text).__name__})"
    i = text.find("[")
    if i < 0:
        return None, "no JSON list in the output"
    try:
        steps, _ = json.JSONDecoder().raw_decode(text[i:])  # reads the first value, ignores what follows
    except json.JSONDecodeError as e:
        if e.pos >= len(text[i:].rstrip()):
            return None, "truncated JSON (the list never closes)"
        return None, f"not valid JSON: {e.msg} at char {i + e.pos}"
    except RecursionError:
        return None, "not valid JSON: nested too deep"
    if not isinstance(steps, list):
        return None, "JSON is not a list"
    if len(steps) == 0:
        return None, "empty plan"
    if len(steps) > max_steps:
        return None, f"too many steps ({len(steps)} > {max_steps})"
    plan = []
    for k, step in enumerate(steps):
        if not isinstance(step, dict):
            return None, f"step {k} is not an object"
        step = {str(key).strip().lower(): v for key, v in step.items()}
        for key in ("prompt", "start", "end"):
            if key not in step:
                return None, f"step {k} has no '{key}'"
        if not isinstance(step["prompt"], str):
            return None, f"step {k} prompt is not a string"
        prompt = " ".join(step["prompt"].split()).replace(" ,", ",")
        if not prompt:
            return None, f"step {k} has an empty prompt"
        start, end = _as_int(step["start"]), _as_int(step["end"])
        if start is None or end is None:
            return None, f"step {k} start/end are not integers"
        if start < 0 or end < 0:
            return None, f"step {k} has a negative frame index"
        if end > num_frames or start >= num_frames:
            return None, f"step {k} [{start}, {end}) is out of range [0, {num_frames})"
        if end - start < min_len:
            return None, f"step {k} [{start}, {end}) is shorter than {min_len} frame(s)"
        plan.append((prompt, start, end))
    for k in range(1, len(plan)):
        if plan[k][1] < plan[k - 1][1]:
            return None, f"steps are not sorted (step {k} starts before step {k - 1})"
    if plan[0][1] != 0:
        return None, f"plan does not start at frame 0 (starts at {plan[0][1]})"
    for k in range(1, len(plan)):
        prev_end, start = plan[k - 1][2], plan[k][1]
        if start < prev_end:
            return None, f"steps {k - 1} and {k} overlap (frame {start} < {prev_end})"
        if start > prev_end:
            return None, f"gap between steps {k - 1} and {k} (frames {prev_end}..{start - 1})"
    if plan[-1][2] != num_frames:
        return None, f"plan does not cover the video (ends at {plan[-1][2]}, not {num_frames})"
    return plan, "ok"

# -----------------------------------------------------------------------------
# prompt smoothing


def smooth_weights(plan, num_frames: int, chunk: int, mode: str = "ramp", ramp_chunks: int = 1):
    """
    TempAct's prompt smoothing: span j is conditioned on Smooth(s_j, s_{j+1}), so that the
    executor sees the upcoming subgoal before the switch. The paper gives no formula; ours
    interpolates the text embeddings. Returns one (j, k, alpha) per chunk of `chunk` latent
    frames, and the executor cross-attends to (1 - alpha) * ctx_j + alpha * ctx_k.

    - j is the span that holds the chunk's first frame: a switch takes effect at the first
      chunk start at or after the span's end (LongLive's rule), so spans need not be aligned.
    - mode="ramp": over the last `ramp_chunks` chunks of each span but the last, alpha ramps
      r / (ramp_chunks + 1) for r = 1..ramp_chunks (0.5 for the default single chunk), then
      the next span starts at alpha 0 on its own prompt. With chunk=1 this is per frame.
    - mode="none": alpha is 0 everywhere (plain step prompts, the paper's baseline).
    The last span never blends: there is no upcoming prompt (k == j there).
    """
    assert mode in ("none", "ramp"), f"unknown smoothing mode {mode!r}"
    num_chunks = -(-num_frames // chunk)
    # each chunk's span: the last one that starts at or before the chunk's first frame
    span = [max(j for j, (_, s, _) in enumerate(plan) if s <= c * chunk) for c in range(num_chunks)]
    weights = [(j, min(j + 1, len(plan) - 1), 0.0) for j in span]
    if mode == "ramp":
        for j in range(len(plan) - 1):  # the last span has no upcoming prompt
            last = [c for c in range(num_chunks) if span[c] == j][-ramp_chunks:]
            for r, c in enumerate(reversed(last)):  # r = 0: the chunk just before the switch
                weights[c] = (j, j + 1, (ramp_chunks - r) / (ramp_chunks + 1))
    return weights


def blend_contexts(contexts: torch.Tensor, weights) -> torch.Tensor:
    """contexts (num_prompts, L, C) text embeddings of the plan's step prompts -> (num_chunks, L, C)."""
    j = torch.tensor([w[0] for w in weights], device=contexts.device)
    k = torch.tensor([w[1] for w in weights], device=contexts.device)
    a = torch.tensor([w[2] for w in weights], device=contexts.device, dtype=contexts.dtype)[:, None, None]
    return (1 - a) * contexts[j] + a * contexts[k]  # (num_chunks, L, C)

# -----------------------------------------------------------------------------
# GSPO (planner RL)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, std: str = "group") -> torch.Tensor:
    """
    GRPO advantages (r - group mean) / (std + eps) for each consecutive group of `group_size`, with std
    the group's own (GRPO, TRL) or, std="batch", one std of all the rewards (Flow-GRPO's global_std),
    or, std="none", no division at all (Dr. GRPO: r - group mean).
    A group's own std turns differences however small into advantages of order 1: where the main
    reward ties within a group, a side reward decides alone, whatever its weight. One batch std keeps
    the weights meaningful, but when most groups tie it is small and the few untied groups dominate.
    No division keeps every group's advantages on the rewards' own scale.
    """
    r = rewards.view(-1, group_size)  # (B, M)
    r = r if r.is_floating_point() else r.float()
    centred = r - r.mean(1, keepdim=True)
    if std == "none" or group_size < 2:  # a group of one is all zeros either way
        return centred.view(-1)
    s = r.std(1, keepdim=True) if std == "group" else r.std().expand_as(r)  # unbiased, as GRPO/TRL
    return (centred / (s + eps)).view(-1)  # (B*M,)


def minibatches(n: int, num_minibatches: int = 4, generator=None) -> list[torch.Tensor]:
    """
    Shuffled row indices split into `num_minibatches` parts. The paper splits each rollout
    batch into 4 minibatches: the first update is on-policy (ratio exactly 1), the later ones
    see a policy that has moved, which is what the clip is for. Usage:
        for idx in minibatches(len(adv)):
            loss, stats = gspo_loss(planner.logprobs(pids[idx], cids[idx], mask[idx], pmask[idx], T),
                                    logp_old[idx], mask[idx], adv[idx]); loss.backward(); opt.step()
    """
    return list(torch.randperm(n, generator=generator).chunk(num_minibatches))


def gspo_loss(logp, logp_old, mask, adv, eps_low: float = 3e-4, eps_high: float = 4e-4):
    """
    GSPO: PPO's clipped surrogate with one importance ratio per sequence instead of per token.
    Kept from GRPO: group-normalised advantages instead of a value model (a plan has one reward).
    Kept from PPO: the pessimistic min of the unclipped and clipped terms, so a sequence whose
    ratio already left the trust region in the advantage's direction gets no gradient.
    Changed: the ratio is the length-normalised sequence likelihood ratio, which matches the
    sequence-level reward and avoids the variance of per-token ratios; hence the tiny clip band.
    Dropped: the KL penalty (the paper uses none).
    logp, logp_old, mask: (N, T) per completion token; adv: (N,). Returns (loss, stats).
    """
    lengths = mask.sum(-1).clamp(min=1)                              # (N,)
    log_s = ((logp - logp_old) * mask).sum(-1) / lengths             # (N,) GSPO: mean token log-ratio
    s = torch.exp(log_s)                                             # (N,) s_i = (pi / pi_old)^(1/|y_i|)
    s_clip = torch.clamp(s, 1 - eps_low, 1 + eps_high)               # (N,)
    J = torch.minimum(s * adv, s_clip * adv).mean()                  # GSPO objective
    loss = -J
    with torch.no_grad():
        clipped = ((s < 1 - eps_low) & (adv < 0)) | ((s > 1 + eps_high) & (adv > 0))
        stats = {"clip_frac": clipped.float().mean(), "ratio_mean": s.mean(),
                 "ratio_min": s.min(), "ratio_max": s.max()}
    return loss, stats

# -----------------------------------------------------------------------------
# the planner model


def tiny_qwen3(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    """A random-init Qwen3ForCausalLM sized to `tokenizer` (tests, and the world's planner)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


class Planner:
    """
    A causal LM plus its tokenizer. Prompts come from `prompt_fn(instruction, num_frames)`;
    by default the chat template with thinking off when the tokenizer has one (Qwen3-8B),
    else the bare instruction followed by PLAIN_SEP (the tiny world planner).
    Sampled rows are instruction-major: row i*M + m is sample m of instruction i.
    """

    def __init__(self, model, tokenizer, num_frames: int, prompt_fn=None, max_steps: int = MAX_STEPS):
        self.model, self.tokenizer, self.num_frames, self.max_steps = model, tokenizer, num_frames, max_steps
        self.tokenizer.padding_side = "left"  # generate appends on the right
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if prompt_fn is None:
            prompt_fn = self.chat_prompt if getattr(tokenizer, "chat_template", None) else self.plain_prompt
        self.prompt_fn = prompt_fn
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = sorted(set(eos + [tokenizer.eos_token_id]) - {None})

    @classmethod
    def from_pretrained(cls, path: str, num_frames: int, device="cuda", dtype=torch.bfloat16, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
        return cls(model, tokenizer, num_frames, **kwargs)

    def plain_prompt(self, instruction: str, num_frames: int) -> str:
        return instruction.strip() + PLAIN_SEP

    def chat_prompt(self, instruction: str, num_frames: int) -> str:
        text = PLAN_PROMPT.format(instruction=instruction.strip(), num_frames=num_frames,
                                  last=num_frames - 1, max_steps=self.max_steps)
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)

    def encode_prompts(self, instructions: list[str]):
        texts = [self.prompt_fn(x, self.num_frames) for x in instructions]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        device = self.model.device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def completion_mask(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """1 up to and including the first EOS, 0 after (generate pads finished rows)."""
        is_eos = torch.isin(completion_ids, torch.tensor(self.eos_ids, device=completion_ids.device))
        after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # (N, T) strictly after the first EOS
        return (~after).float()

    def logprobs(self, prompt_ids, completion_ids, mask, prompt_mask=None, temperature: float = 1.0):
        """
        Per-token log pi(y_t | x, y_<t) of the completion under softmax(logits / temperature),
        with grad; (N, T), zero where mask is 0. Positions are counted from the first real
        prompt token, as generate does with left padding, so a row scores the same alone or
        in a padded batch.
        """
        if prompt_mask is None:  # left padding: pads are the leading pad tokens
            prompt_mask = ((prompt_ids != self.tokenizer.pad_token_id).long().cumsum(1) > 0).long()
        T = completion_ids.shape[1]
        ids = torch.cat([prompt_ids, completion_ids], 1)                         # (N, P+T)
        attn = torch.cat([prompt_mask.long(), torch.ones_like(completion_ids)], 1)
        pos = (attn.cumsum(1) - 1).clamp(min=0)                                  # (N, P+T)
        logits = self.model(input_ids=ids, attention_mask=attn, position_ids=pos,
                            logits_to_keep=T + 1).logits[:, :-1]                 # (N, T, V) predicts y_t
        logits = logits.float() / temperature
        logp = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # (N, T)
        return logp * mask

    @torch.no_grad()
    def sample(self, instructions: list[str], M: int, max_new_tokens: int = 256,
               temperature: float = 1.0, top_p: float = 1.0) -> dict:
        """
        M plans per instruction in one batched generate. The old log-probs for GSPO are
        recomputed with `logprobs` (one extra forward) instead of read from generate's scores:
        generate's processed scores are already top-p-truncated, and its cached decoding is not
        bit-identical to a full forward. Recomputing makes the first GSPO ratio exactly 1, which
        matters with a clip band of 3e-4. With top_p < 1 the tokens come from the truncated
        distribution but are scored under the full one (as TRL does).
        """
        was_training = self.model.training
        self.model.eval()
        prompt_ids, prompt_mask = self.encode_prompts([x for x in instructions for _ in range(M)])  # (N, P)
        out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
                                  temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids)
        completion_ids = out[:, prompt_ids.shape[1]:]                            # (N, T)
        mask = self.completion_mask(completion_ids)                              # (N, T)
        logp = self.logprobs(prompt_ids, completion_ids, mask, prompt_mask, temperature)  # (N, T)
        self.model.train(was_training)
        text = self.tokenizer.batch_decode(completion_ids.masked_fill(mask == 0, self.tokenizer.pad_token_id),
                                           skip_special_tokens=True)
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                "mask": mask, "text": text, "logp": logp, "logp_sum": logp.sum(-1),
                "logp_mean": logp.sum(-1) / mask.sum(-1).clamp(min=1)}

    @torch.no_grad()
    def plan(self, instructions: list[str], max_new_tokens: int = 256) -> list[tuple]:
        """Greedy plans in one batched generate -> [(plan or None, reason, raw text)] per instruction."""
        prompt_ids, prompt_mask = self.encode_prompts(instructions)
        out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False,
                                  max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=self.eos_ids)
        completion_ids = out[:, prompt_ids.shape[1]:]
        mask = self.completion_mask(completion_ids)
        texts = self.tokenizer.batch_decode(completion_ids.masked_fill(mask == 0, self.tokenizer.pad_token_id),
                                            skip_special_tokens=True)
        return [(*parse_plan(t, self.num_frames, self.max_steps), t) for t in texts]
