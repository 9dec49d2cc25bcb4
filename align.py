"""Alignment on a verifiable task: SFT -> DPO -> GRPO on generated math problems.

A pretrained language model continues text; it does not answer questions. InstructGPT (Ouyang et al. 2022,
arXiv:2203.02155) set the recipe that turns one into an assistant: supervised fine-tuning on demonstrations, then a
learned reward model and PPO against it. This file walks through that recipe and the two simplifications most used
today, on a task where "better" is arithmetic, not taste, so an exact verifier stands in for the reward model:

1. The task: graded math problems with exact answers, held out by arithmetic fact, the chat format
   `<|user|>question<|assistant|>answer<|endoftext|>`, a verifier that *parses* the answer.
2. SFT: next-token loss on response tokens only (the CS336 assignment-5 function API).
3. DPO (Rafailov et al. 2023, arXiv:2305.18290): preference pairs train the policy directly
   against a frozen reference, the closed-form optimum of the KL-regularized RL objective.
4. GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300): RL from the verifier, the group mean
   reward as baseline instead of a value network, PPO's clip (Schulman et al. 2017, arXiv:1707.06347).
5. Evaluation: greedy held-out accuracy, Wilson (1927) and paired intervals; test-time compute: majority or best-of-N.
6. Chat: `chat` talks to a checkpoint, multi-turn, streaming tokens as they are sampled.
Asides: a Bradley-Terry (1952) reward model (`rm`, not in `all`); LoRA for SFT/DPO (Hu et al. 2021, arXiv:2106.09685).

Where DPO here departs from the paper:
1. Pairs: the SFT model's own samples, right over wrong by the verifier (else gold / perturbed gold); no human labels.
2. The chosen answer's per-token NLL is added, as in RPO (Pang et al. 2024, arXiv:2404.19733)
   (`--dpo-nll 1`); without it DPO lowered accuracy (README, "What did not work").
Where GRPO here departs from DeepSeekMath:
1. The reward is the verifier (answer right: 1) plus a 0.1 format bonus; no reward model.
2. No KL penalty by default (`--kl-coef 0`; the paper uses 0.04 with the same k3 estimator).
3. One gradient step per rollout batch (`--epochs-per-rollout 1`): on-policy, so ratio = 1 and the clip never binds.
4. Linear lr warmup, AdamW betas (0.9, 0.95). `--no-std-norm` is Dr. GRPO (Liu et al. 2025,
   arXiv:2503.20783): no std division, and each response's loss summed over a constant, not |o|.

Run it (CPU, ~10 CPU minutes; `python pipeline.py` runs exactly this after pretraining):
    python align.py all --ckpt runs/cpu/base/ckpt.pt --tokenizer runs/cpu/data/tokenizer --out-dir runs/cpu/align
or stage by stage, each at its own defaults (`python align.py sft -h`), the tokenizer found through the checkpoint:
    python align.py eval --ckpt runs/cpu/base/ckpt.pt --stage-name base
    python align.py sft  --ckpt runs/cpu/base/ckpt.pt             # -> runs/align/sft.pt
    python align.py dpo  --ckpt runs/align/sft.pt --beta 0.1      # -> runs/align/dpo.pt
    python align.py grpo --ckpt runs/align/dpo.pt --group-size 8  # -> runs/align/grpo.pt
    python align.py sft  --ckpt runs/cpu/base/ckpt.pt --lora-rank 8  # LoRA; the saved sft.pt is merged
    python align.py rm   --ckpt runs/align/sft.pt                 # -> runs/align/rm.pt, rm_metrics.jsonl
    python align.py eval --ckpt runs/align/sft.pt --samples 16 --vote majority   # (or --vote rm --rm runs/align/rm.pt)
    python align.py chat --ckpt runs/cpu/align/grpo.pt --show-probs           # or: echo "3 + 4 =" | python align.py chat ...
One GPU: the same commands (cuda is autodetected); no torchrun mode. Smoke test: `--tiny`.
Your own data: `--data-jsonl FILE` with prompt/response (SFT), prompt/chosen/rejected (DPO) or
prompt/answer (GSM8K-style; SFT, GRPO and eval) lines; train rows train, test rows evaluate.
Outputs in OUT_DIR: {sft,dpo,grpo}.pt, {stage}_metrics.jsonl, eval.json (fields: README).
"""
import argparse
import codecs
import copy
import functools
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

from bpe import Tokenizer
from model import generate, load_model, pick_device, stream
from train import AdamW, save_checkpoint

USER, ASSISTANT, EOT = "<|user|>", "<|assistant|>", "<|endoftext|>"
CHAT_SPECIALS = [EOT, USER, ASSISTANT]

# ---------------------------------------------------------------
# 1. The task: math problems with exact answers, graded difficulty, a held-out split by fact. The base model is a
#    few-M-parameter model trained for minutes on Python docs, so the ladder starts low. The response is the bare
#    answer ("7") and <|endoftext|>: the answer appears once. With "3 + 4 = 7. #### 7" a wrong GRPO sample's negative
#    advantage also punished the repeat after "####" and the <|endoftext|>: the policy learned to stop stopping.

LEVELS = {1: "add/sub 1-digit", 2: "mul 1x1", 3: "word mul 1x1", 4: "word 1-digit", 5: "add/sub 2-digit",
          6: "add/sub 3-digit, mul 2x1", 7: "mul 2x2"}
NAMES = ["Ann", "Ben", "Cat", "Dan", "Eve", "Sam", "Tom", "Zoe"]
THINGS = ["apples", "books", "coins", "eggs", "pens", "stamps"]
ASK = ["What is {e}?", "Compute {e}.", "{e} = ?", "Calculate {e}.", "What do you get for {e}?"]


def make_problem(rng: random.Random, level: int) -> dict:
    """One problem {"prompt", "response", "answer", "level", "fact"}: uniform operands, subtraction kept >= 0."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level}")
    if level == 6:
        da, db, ops = (3, 3, "+-") if rng.random() < 0.5 else (2, 1, "*")
    else:
        da, db, ops = {1: (1, 1, "+-"), 2: (1, 1, "*"), 3: (1, 1, "*"), 4: (1, 1, "+-*"), 5: (2, 2, "+-"), 7: (2, 2, "*")}[level]
    a, b = rng.randint(0, 10 ** da - 1), rng.randint(0, 10 ** db - 1)
    op = rng.choice(ops) if len(ops) > 1 else ops  # (a choice of one still draws from rng)
    if op == "-" and a < b:
        a, b = b, a
    c = a + b if op == "+" else a - b if op == "-" else a * b
    if level in (3, 4):  # the same arithmetic, dressed as a one-line story
        who, what = rng.choice(NAMES), rng.choice(THINGS)
        q = {"+": f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?",
             "-": f"{who} has {a} {what} and gives away {b}. How many {what} are left?",
             "*": f"{who} buys {a} bags with {b} {what} in each. How many {what} is that?"}[op]
    else:
        q = rng.choice(ASK).format(e=f"{a} {op} {b}")
    fact = f"{a} - {b}" if op == "-" else f"{min(a, b)} {op} {max(a, b)}"  # 3 + 4 and 4 + 3: one fact
    return {"prompt": q, "response": f"{c}", "answer": c, "level": level, "fact": fact}


def split_of(key: str, test_percent: int = 20) -> str:
    """'test' or 'train', a pure function of a key (sha256: unlike Python's salted hash(), stable across runs). A
    generated problem's key is its arithmetic *fact* ("3 + 4", "2 * 7"), not its text: split by text, every held-out
    problem had its fact trained on in another wording, and "held-out accuracy" measured recall of a table."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")  # 64 uniform bits
    return "test" if h % 100 < test_percent else "train"


def sample_problems(split: str, n: int, levels, seed: int, test_percent: int = 20, unique=False) -> list:
    """n problems of one split, levels round-robin; unique (the eval set): each fact at most once per level."""
    rng, out, seen = random.Random(seed), [], set()
    for i, level in enumerate(levels):
        want = n // len(levels) + (i < n % len(levels))
        got, tries = 0, 0
        while got < want and tries < 200 * want:
            tries += 1
            p = make_problem(rng, level)
            if split_of(p["fact"], test_percent) != split or (unique and (level, p["fact"]) in seen):
                continue
            seen.add((level, p["fact"]))
            out.append(p)
            got += 1
    return out


def load_jsonl(path: str) -> list:
    """--data-jsonl rows (formats: module docstring) like make_problem's, "answer" the parsed gold number if any."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{i}: not JSON ({e.msg})")
            if not isinstance(r, dict) or "prompt" not in r:
                raise SystemExit(f"error: {path}:{i}: each line needs a 'prompt' field")
            r = dict(r, level=r.get("level", "jsonl"))
            if "answer" in r:  # GSM8K style: the worked answer is also the SFT response
                r.setdefault("response", str(r["answer"]))
                r["answer"] = parse_answer(str(r["answer"]))
            rows.append(r)
    if not rows:
        raise SystemExit(f"error: {path} has no records")
    return rows


def user_rows(args, split: str) -> list:
    """The --data-jsonl rows of one split, by a hash of the prompt: train rows train, test rows evaluate."""
    rows = [r for r in load_jsonl(args.data_jsonl) if split_of(r["prompt"], args.test_percent) == split]
    if not rows:
        raise SystemExit(f"error: {args.data_jsonl} has no {split}-split rows (a hash of the prompt, --test-percent)")
    return rows


# ---------------------------------------------------------------
# 2. The verifier: parse a number out of free text, by plain string parsing: model output is data, never code (no
#    eval, no sympy.sympify). Priority: the last "#### N" marker, then the last "answer: N", then the last number.

_NUM = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"  # -12, 1,000, 3.5; not the 3 in x3
_PATTERNS = [re.compile(r"####\s*(" + _NUM + ")"), re.compile(r"answer\s*(?:is)?\s*[:=]?\s*(" + _NUM + ")", re.I),
             re.compile(_NUM)]  # in priority order
_MAX_DIGITS = 100  # longer "numbers" are garbage, and int() of huge strings is slow


def parse_answer(text: str):
    """The final numeric answer in text as an int (or a Fraction for decimals), None if absent."""
    for pat in _PATTERNS:
        found = pat.findall(text)
        if found:
            return _to_number(found[-1])
    return None


def _to_number(s: str):
    s = s.replace(",", "")
    if len(s) > _MAX_DIGITS:
        return None
    v = Fraction(s)  # exact: "0.1" stays 1/10, no float rounding
    return int(v) if v.denominator == 1 else v


_FINAL = re.compile(r"(?:^|####|=)\s*" + _NUM + r"\s*$")  # a bare number, or text that *ends* in '= N' / '#### N'


def reward_fn(response: str, ground_truth, format_weight: float = 0.1) -> dict:
    """answer_reward: parsed answer == gold; format_reward (_FINAL): a bonus for stopping right after the answer."""
    fmt = float(_FINAL.search(response) is not None)
    ans = float(ground_truth is not None and parse_answer(response) == ground_truth)
    return {"reward": ans + format_weight * fmt, "format_reward": fmt, "answer_reward": ans}


# ---------------------------------------------------------------
# 3. Chat format and tokenization. Prompt and output are tokenized separately and concatenated (so the boundary is
#    exact), right-padded, then shifted by one for next-token prediction.

def chat_prompt(question: str) -> str:
    return f"{USER}{question}{ASSISTANT}"


def ensure_chat_tokens(tok, model):
    """Missing chat specials get new ids; embedding / lm_head grow, new rows at the mean (not off-distribution)."""
    missing = [s for s in CHAT_SPECIALS if s not in tok.special_ids]
    if missing:  # the Tokenizer constructor appends specials absent from the vocab as new ids
        tok = Tokenizer(tok.vocab, tok.merges, list(tok.special_ids) + missing, tok.pattern)
    V, old = tok.vocab_size, model.token_embeddings.weight.shape[0]
    if V > old:
        with torch.no_grad():
            for mod in (model.token_embeddings, model.lm_head):
                w = mod.weight  # (V_old, C)
                mod.weight = torch.nn.Parameter(torch.cat([w, w.mean(0, keepdim=True).expand(V - old, -1)]))  # (V, C)
            if model.cfg.tie_embeddings:
                model.token_embeddings.weight = model.lm_head.weight
        model.cfg.vocab_size = V
    return tok, model


def pack_prompt_and_output_ids(prompt_ids: list, output_ids: list, pad_id: int) -> dict:
    """Lists of token-id lists -> {input_ids, labels, response_mask}, each (B, L-1)."""
    full = [p + o for p, o in zip(prompt_ids, output_ids)]
    L = max(len(f) for f in full)
    ids = torch.full((len(full), L), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(full), L), dtype=torch.bool)  # (B, L): True on response tokens
    for i, (p, f) in enumerate(zip(prompt_ids, full)):
        ids[i, :len(f)] = torch.tensor(f)
        mask[i, len(p):len(f)] = True
    # label j is token j+1, so the response mask shifts with the labels
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "response_mask": mask[:, 1:]}


def tokenize_prompt_and_output(prompts: list, outputs: list, tokenizer) -> dict:
    """CS336 API: strings in, {input_ids, labels, response_mask} (B, max_len - 1) out."""
    pad = tokenizer.special_ids.get(EOT, 0)  # padded positions are masked out; any id works
    return pack_prompt_and_output_ids([tokenizer.encode(p) for p in prompts],
                                      [tokenizer.encode(o) for o in outputs], pad)


# ---------------------------------------------------------------
# 4. Per-token log-probs, entropy, and masked reductions: the vocabulary every loss below uses.

def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p_v log p_v over the last dim, via logsumexp so large logits do not overflow."""
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)  # (..., V)
    return -(logp.exp() * logp).sum(-1)  # (...)


def get_response_log_probs(model, input_ids, labels, return_token_entropy=False, temperature=1.0) -> dict:
    """log p(label_t | tokens <= t) for every position: {"log_probs": (B, T), "token_entropy"?}, at
    the temperature the tokens were sampled at (the policy GRPO samples from is softmax(logits / T))."""
    logits = model(input_ids).float() / temperature  # (B, T, V); fp32 for the log-softmax
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    out = {"log_probs": logp}
    if return_token_entropy:
        with torch.no_grad():  # a diagnostic, not a loss term
            out["token_entropy"] = compute_entropy(logits)  # (B, T)
    return out


def masked_mean(t: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean over mask==1 entries; an all-zero row gives 0, not NaN (0/0): one empty response can't poison a batch."""
    m = mask.to(t.dtype)
    return (t * m).sum(dim) / m.sum(dim).clamp(min=1)  # dim=None: over all entries


def masked_normalize(t: torch.Tensor, mask: torch.Tensor, dim=None, normalize_constant: float = 1.0):
    """Sum over mask==1 / a constant (Dr. GRPO, CS336 SFT): unlike dividing by length, no bias to short answers."""
    return (t * mask.to(t.dtype)).sum(dim) / normalize_constant


# ---------------------------------------------------------------
# 5. SFT: maximize log p(response | prompt) over response tokens only. The prompt is given, never generated, so a loss
#    on it would only teach writing questions; and prompts here, several times longer than answers, would dominate it.

def sft_microbatch_train_step(policy_log_probs, response_mask, gradient_accumulation_steps, normalize_constant=1.0):
    """Backward on one microbatch of loss -(1/B) sum_b sum_t mask_bt log pi(y_bt) / c / k, c = normalize_constant,
    k = gradient_accumulation_steps (1/k: k microbatches sum to one big batch's gradient) -> (loss, metadata)."""
    per_seq = masked_normalize(policy_log_probs, response_mask, dim=-1, normalize_constant=normalize_constant)  # (B,)
    loss = -per_seq.mean() / gradient_accumulation_steps
    loss.backward()
    return loss.detach(), {"nll": -masked_mean(policy_log_probs, response_mask).detach(),
                           "response_tokens": response_mask.sum()}


def sft_step(model, tok, batches: list, device) -> dict:
    """Backward on k microbatches (lists of problems) as one batch: each one's summed response log-prob is divided
    by all k's response-token count, the big batch's per-token mean (its own count would weight short ones up)."""
    bs = [tokenize_prompt_and_output([chat_prompt(p["prompt"]) for p in rows], [p["response"] + EOT for p in rows], tok)
          for rows in batches]
    n_tok = sum(b["response_mask"].sum().item() for b in bs)
    for b, rows in zip(bs, batches):
        lp = get_response_log_probs(model, b["input_ids"].to(device), b["labels"].to(device))["log_probs"]  # (B, T)
        # the step divides the summed log-prob by B * c * k; with c = n_tok / (B k) that is n_tok
        loss, meta = sft_microbatch_train_step(lp, b["response_mask"].to(device), len(bs), n_tok / (len(rows) * len(bs)))
    return meta


def run_sft(model, tok, args, log):
    # Fresh train-split problems every step: the generator is unlimited, so there are no epochs.
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)  # LoRA: adapters only
    data = user_rows(args, "train") if args.data_jsonl else None
    rng, t_start = random.Random(args.seed), time.time()
    for step in range(1, args.steps + 1):
        # linear warmup over the first 10% of steps, then linear decay to 10% of the peak
        lr = args.lr * min(1.0, step / max(1, args.steps // 10)) * (0.1 + 0.9 * (1 - step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.time()
        batches = [rng.sample(data, min(args.batch_size, len(data))) if data else
                   sample_problems("train", args.batch_size, args.levels, rng.randrange(2**31), args.test_percent)
                   for _ in range(args.grad_accum)]
        meta = sft_step(model, tok, batches, args.device)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps:
            nll, ms = meta["nll"].item(), 1000 * (time.time() - t0)
            log({"step": step, "loss": nll, "lr": lr, "ms": ms},
                f"sft step {step}/{args.steps} | nll {nll:.3f} | lr {lr:.1e} | {ms:.0f} ms | "
                f"eta {(time.time() - t_start) / step * (args.steps - step):.0f} s")
    return model, opt


# ---------------------------------------------------------------
# 6. Sampling from the policy (model.generate: KV cache) and scoring with the verifier.

@torch.no_grad()
def sample_responses(model, tok, prompts: list, n: int, temperature: float, max_new_tokens: int, generator=None):
    """n completions per prompt -> (prompt_ids, completion_ids, texts), flat, prompt-major, each cut after its first
    <|endoftext|> (kept: the policy learns to stop). generate() has no padding mask: prompts are batched by length."""
    eot = tok.special_ids.get(EOT)
    enc = [tok.encode(chat_prompt(p)) for p in prompts]
    by_len, rows = {}, [None] * len(prompts)
    for i, e in enumerate(enc):
        by_len.setdefault(len(e), []).append(i)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    for L, idxs in by_len.items():
        idx = torch.tensor([enc[i] for i in idxs for _ in range(n)], device=dev)  # (len(idxs) * n, L)
        out = generate(model, idx, max_new_tokens, temperature=temperature, stop_token=eot, generator=generator)
        out = out[:, L:].tolist()  # drop the prompt: len(idxs) * n rows of <= max_new_tokens ids
        for j, i in enumerate(idxs):
            rows[i] = out[j * n:(j + 1) * n]
    model.train(was_training)
    C = [row[:row.index(eot) + 1] if eot in row else row for group in rows for row in group]
    return [e for e in enc for _ in range(n)], C, [tok.decode([t for t in c if t != eot]) for c in C]


def max_response_tokens(tok, problems) -> int:
    """Room for the longest gold response plus slack: enough to answer, short enough to be fast."""
    return max(len(tok.encode(p.get("response", "") + EOT)) for p in problems) + 4


# ---------------------------------------------------------------
# 7. DPO. RLHF's objective max_pi E[r] - beta KL(pi || ref) is maximized by pi*(y|x) = ref(y|x) exp(r / beta) / Z(x),
#    so r = beta log(pi*/ref) + beta log Z(x): the policy is its own reward model. In the Bradley-Terry preference
#    model p(y_w > y_l) = sigmoid(r_w - r_l) the intractable beta log Z(x) is the same for both answers and cancels:
#        loss = -log sigmoid(beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])
#    a logistic regression that the chosen answer out-scores the rejected one. Plain DPO lowered accuracy here:
#    answers are bare numbers, the same few tokens everywhere, so pushing "9" down as a wrong answer to one problem
#    pushes it down where it is right. The RPO anchor and more pairs made it harmless (README, "What did not work").

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
             alpha: float = 0.0, chosen_lengths=1.0):
    """Per-pair loss and implicit rewards of chosen and rejected, (B,) each, from summed response log-probs; the loss
    is log 2 at policy == reference. alpha > 0 is RPO (Pang 2024): loss = -log sigmoid(chosen - rejected) + alpha *
    (-log pi(y_w) / |y_w|). The DPO term only sees the *difference* of the log-ratios, so it is as happy to push both
    down as to push the chosen one up, and does; the chosen side's per-token NLL holds it up."""
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)  # (B,)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)  # (B,)
    nll = -policy_chosen_logps / chosen_lengths  # (B,): mean per-token NLL of the chosen response
    return -F.logsigmoid(chosen - rejected) + alpha * nll, chosen.detach(), rejected.detach()  # (B,) x 3


def sequence_log_probs(model, tok, prompts, responses, device) -> torch.Tensor:
    """log pi(response | prompt) summed over response tokens, (B,)."""
    b = tokenize_prompt_and_output([chat_prompt(p) for p in prompts], [r + EOT for r in responses], tok)
    lp = get_response_log_probs(model, b["input_ids"].to(device), b["labels"].to(device))["log_probs"]
    return masked_normalize(lp, b["response_mask"].to(device), dim=-1)


def perturb(problem: dict, rng: random.Random) -> str:
    """A wrong version of the gold response: the same text with the final number moved by 1-3."""
    wrong = problem["answer"] + rng.choice([-3, -2, -1, 1, 2, 3])
    return re.sub(r"-?\d+(\D*)$", lambda m: f"{wrong}{m.group(1)}", problem["response"])


def build_preference_pairs(model, tok, args, log, split="train") -> list:
    """(prompt, chosen, rejected): of k samples from the SFT model, chosen = a correct one (else the gold response),
    rejected = a wrong one (else a perturbed gold). DPO's pairs are train-split; the RM also ranks "test" pairs."""
    if args.data_jsonl:
        rows = user_rows(args, split)
        bad = [r for r in rows if "chosen" not in r or "rejected" not in r]
        if bad:
            raise SystemExit(f"error: DPO data needs prompt/chosen/rejected on every line ({len(bad)} lack them)")
        return [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    rng, gen = random.Random(args.seed), torch.Generator(args.device).manual_seed(args.seed)
    problems = sample_problems(split, args.num_pairs, args.levels, args.seed + 1, args.test_percent)
    T = max_response_tokens(tok, problems)
    pairs, sampled, t0, k = [], 0, time.time(), args.samples_per_prompt
    _, _, texts = sample_responses(model, tok, [p["prompt"] for p in problems], k, 1.0, T, gen)
    for i, p in enumerate(problems):
        ok = [(t, reward_fn(t, p["answer"])["answer_reward"] == 1) for t in texts[i * k:(i + 1) * k]]
        good, bad = [t for t, y in ok if y], [t for t, y in ok if not y]
        sampled += bool(good) and bool(bad)  # pairs made only of the model's own samples
        pairs.append((p["prompt"], good[0] if good else p["response"], bad[0] if bad else perturb(p, rng)))
    log({"pairs": len(pairs), "both_sampled": sampled, "s": time.time() - t0},
        f"{len(pairs)} preference pairs ({sampled} with both sides sampled) in {time.time() - t0:.0f} s")
    return pairs


def run_dpo(model, tok, args, log):
    # The reference is the policy's starting point (the SFT model); beta sets how far the policy may move from it
    # (pi* ~ ref exp(r / beta)). Under --lora-rank the copy has B = 0: the model before.
    pairs = build_preference_pairs(model, tok, args, log)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    with torch.no_grad():  # the reference never changes: score all P pairs once, 64 at a time -> (P,) each
        ref_c, ref_r = (torch.cat([sequence_log_probs(ref, tok, [r[0] for r in pairs[i:i + 64]], [r[side] for r in pairs[i:i + 64]],
                                                      args.device) for i in range(0, len(pairs), 64)]) for side in (1, 2))
    # |y_w| for the per-token NLL, tokenized alone as in tokenize_prompt_and_output: the masked count
    len_c = torch.tensor([len(tok.encode(c + EOT)) for _, c, _ in pairs], dtype=torch.float, device=args.device)
    for step in range(1, args.steps + 1):
        i = rng.sample(range(len(pairs)), min(args.batch_size, len(pairs)))
        rows = [pairs[j] for j in i]
        pc, pr = (sequence_log_probs(model, tok, [r[0] for r in rows], [r[side] for r in rows], args.device) for side in (1, 2))
        loss, rc, rr = dpo_loss(pc, pr, ref_c[i], ref_r[i], args.beta, args.dpo_nll, len_c[i])
        loss = loss.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc, margin = (rc > rr).float().mean().item(), (rc - rr).mean().item()  # implicit reward r = beta log pi/ref
        # log pi - log ref of each side, in nats: a falling chosen log-prob is the failure RPO guards against
        dc, dr = (pc - ref_c[i]).mean().item(), (pr - ref_r[i]).mean().item()
        if step % args.log_every == 0 or step == args.steps:
            log({"step": step, "loss": loss.item(), "reward_acc": acc, "margin": margin,
                 "chosen_dlogp": dc, "rejected_dlogp": dr},
                f"dpo step {step}/{args.steps} | loss {loss.item():.4f} | reward acc {acc:.2f} | margin {margin:.3f} "
                f"| dlogp chosen {dc:+.2f} rejected {dr:+.2f}")
    return model, opt


# ---------------------------------------------------------------
# 8. GRPO. The policy gradient E[grad log pi(y|x) r] is unbiased but noisy. A baseline b(x) independent of y keeps
#    it unbiased (E_y[grad log pi(y|x)] = 0) and cuts its variance when b(x) tracks x's expected reward. PPO learns
#    b(x) with a policy-sized value network; GRPO, for the price of G samples per prompt, uses their mean reward.

def compute_group_normalized_rewards(reward_fn, rollout_responses, repeated_ground_truths, group_size,
                                     advantage_eps=1e-6, normalize_by_std=True):
    """(advantages, raw rewards) (N,) and meta of group_size-major rollouts, A = (r - mean_group) / (std_group + eps).
    Dividing by std weights each question by 1 / std = 1 / sqrt(p(1-p)) with 0/1 rewards, so questions nearly always
    right or wrong get the biggest updates (7 of 8 right: the wrong one gets A = -2.47, not -0.875)."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    scores = [reward_fn(r, g) for r, g in zip(rollout_responses, repeated_ground_truths)]
    raw = torch.tensor([s["reward"] for s in scores], dtype=torch.float32)  # (N,)
    grouped = raw.view(-1, group_size)  # (n_prompts, G)
    adv = grouped - grouped.mean(-1, keepdim=True)  # (n_prompts, G): r - mean_group, the baseline
    if normalize_by_std:
        adv = adv / (grouped.std(-1, keepdim=True) + advantage_eps)  # unbiased std, as in the paper's code
    meta = dict({k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}, reward_std=grouped.std(-1).mean().item())
    return adv.reshape(-1), raw, meta


def compute_naive_policy_gradient_loss(raw_rewards_or_advantages, policy_log_probs):
    """REINFORCE: -A * log pi(token), per token. (B, 1) broadcast against (B, T)."""
    return -raw_rewards_or_advantages * policy_log_probs


def compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, cliprange):
    """PPO's clipped surrogate per token: -min(rho A, clip(rho, 1-eps, 1+eps) A), rho = pi/pi_old. Past 1 + eps with
    A > 0 (or below 1 - eps with A < 0) the clipped term is the min and constant, so that token stops pushing (moves
    back toward 1 are never clipped): one rollout batch moves the policy only so far, making several epochs safe."""
    ratio = torch.exp(policy_log_probs - old_log_probs)  # (B, T): rho = exp(log pi - log pi_old)
    unclipped = ratio * advantages  # (B, T): rho A, A (B, 1) broadcast over tokens
    clipped = ratio.clamp(1 - cliprange, 1 + cliprange) * advantages  # clip(rho, 1-eps, 1+eps) A
    return -torch.minimum(unclipped, clipped), {"clipped": (clipped < unclipped).detach(), "ratio": ratio.detach()}


def compute_policy_gradient_loss(policy_log_probs, loss_type, raw_rewards=None, advantages=None,
                                 old_log_probs=None, cliprange=None):
    if loss_type in ("no_baseline", "reinforce_with_baseline"):
        return compute_naive_policy_gradient_loss(raw_rewards if loss_type == "no_baseline" else advantages,
                                                  policy_log_probs), {}
    if loss_type == "grpo_clip":
        return compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, cliprange)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def grpo_microbatch_train_step(policy_log_probs, response_mask, gradient_accumulation_steps, loss_type,
                               raw_rewards=None, advantages=None, old_log_probs=None, cliprange=None,
                               ref_log_probs=None, kl_coef=0.0, normalize_constant=None):
    """Per-token loss -> mean over each response's tokens -> mean over the batch -> backward. The 1/|o| shrinks the
    penalty on long wrong answers; Dr. GRPO sums over a normalize_constant instead. Optional KL penalty to a reference,
    k3 estimator (Schulman 2020): with d = log ref - log pi on tokens sampled from pi, E[e^d] = 1, so E[e^d - d - 1] =
    E[-d] = KL(pi || ref): unbiased like plain -d, but each sample is >= 0 (e^d >= 1 + d) and, near ref, less noisy."""
    loss, meta = compute_policy_gradient_loss(policy_log_probs, loss_type, raw_rewards, advantages, old_log_probs, cliprange)
    if kl_coef and ref_log_probs is not None:
        d = ref_log_probs - policy_log_probs
        kl = torch.exp(d) - d - 1  # (B, T), k3 >= 0
        loss = loss + kl_coef * kl
        meta["kl"] = masked_mean(kl.detach(), response_mask)
    per_seq = (masked_mean(loss, response_mask, dim=-1) if normalize_constant is None else
               masked_normalize(loss, response_mask, dim=-1, normalize_constant=normalize_constant))  # (B, T) -> (B,)
    loss = per_seq.mean() / gradient_accumulation_steps
    loss.backward()
    return loss.detach(), meta


@torch.no_grad()
def batched_log_probs(model, ids, labels, mb: int, temperature: float) -> torch.Tensor:
    """log model(token) over a whole rollout batch, mb sequences at a time: (N, T)."""
    return torch.cat([get_response_log_probs(model, ids[i:i + mb], labels[i:i + mb], temperature=temperature)["log_probs"]
                      for i in range(0, len(ids), mb)])


def grpo_step(policy, optimizer, prompt_ids, completion_ids, texts, ground_truths, reward_fn, args, ref=None,
              max_new_tokens=None):
    """One GRPO step on G-grouped rollouts (prompt-major, already sampled): score, normalize within groups, then
    `epochs` passes of microbatch updates against the sampler's log-probs (--no-std-norm sums over max_new_tokens)."""
    dev = next(policy.parameters()).device
    adv, raw, meta = compute_group_normalized_rewards(reward_fn, texts, ground_truths, args.group_size,
                                                      1e-6, not args.no_std_norm)
    b = pack_prompt_and_output_ids(prompt_ids, completion_ids, pad_id=0)
    ids, labels, mask = b["input_ids"].to(dev), b["labels"].to(dev), b["response_mask"].to(dev)  # (N, T) each
    N, mb = len(texts), args.micro_batch_size
    on_policy = args.epochs_per_rollout == 1
    with torch.no_grad():  # pi_old (the sampler) and the reference, scored once per rollout batch
        # On-policy, pi_old's log-probs are the training forward's, detached (ratio == 1 exactly): one forward saved.
        old = None if on_policy else batched_log_probs(policy, ids, labels, mb, args.temperature)
        ref_lp = batched_log_probs(ref, ids, labels, mb, args.temperature) if ref is not None and args.kl_coef else None
    accum = math.ceil(N / mb)  # microbatches per optimizer step: one step per pass over the batch
    const = (max_new_tokens or mask.shape[1]) if args.no_std_norm else None
    clip, ent = [], []
    for _ in range(args.epochs_per_rollout):
        for i in range(0, N, mb):
            s = slice(i, i + mb)
            out = get_response_log_probs(policy, ids[s], labels[s], return_token_entropy=True, temperature=args.temperature)
            loss, m = grpo_microbatch_train_step(
                out["log_probs"], mask[s], accum, args.loss_type, raw[s, None].to(dev), adv[s, None].to(dev),
                out["log_probs"].detach() if on_policy else old[s], args.cliprange, None if ref_lp is None else ref_lp[s], args.kl_coef,
                const)
            ent.append(masked_mean(out["token_entropy"], mask[s]).item())
            if "clipped" in m:  # grpo_clip only: share of response tokens whose gradient the clip cut
                clip.append(masked_mean(m["clipped"].float(), mask[s]).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    meta.update(entropy=sum(ent) / len(ent), clip_frac=sum(clip) / len(clip) if clip else 0.0,
                response_len=mask.sum().item() / N, loss=loss.item() * accum)  # last microbatch's, sans 1/accum
    return meta


def run_grpo(model, tok, args, log):
    # RL re-weights answers the policy already samples, so the starting point decides (README).
    # AdamW betas (0.9, 0.95): a shorter second-moment memory adapts faster to noisy RL gradients.
    data = user_rows(args, "train") if args.data_jsonl else None
    ref = copy.deepcopy(model).eval().requires_grad_(False) if args.kl_coef else None  # frozen start: the KL anchor
    opt = AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng, gen = random.Random(args.seed), torch.Generator(args.device).manual_seed(args.seed)
    T = max_response_tokens(tok, data or sample_problems("train", 64, args.levels, args.seed, args.test_percent))
    rf = functools.partial(reward_fn, format_weight=args.format_weight)
    t_start = time.time()
    for step in range(1, args.steps + 1):
        # Warmup: a fresh Adam's first updates are ~lr * sign(g) on *every* weight, noise that knocked points off SFT.
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / max(1, args.steps // 10))
        t0 = time.time()
        batch = (rng.sample(data, min(args.prompts_per_step, len(data))) if data else
                 sample_problems("train", args.prompts_per_step, args.levels, rng.randrange(2**31), args.test_percent))
        P, C, texts = sample_responses(model, tok, [p["prompt"] for p in batch], args.group_size,
                                       args.temperature, T, gen)
        gts = [p["answer"] for p in batch for _ in range(args.group_size)]
        m = grpo_step(model, opt, P, C, texts, gts, rf, args, ref, max_new_tokens=T)
        if step % args.log_every == 0 or step == args.steps:
            log(dict(step=step, **m, ms=1000 * (time.time() - t0)),
                f"grpo step {step}/{args.steps} | reward {m['reward']:.3f} | acc {m['answer_reward']:.3f} | "
                f"len {m['response_len']:.1f} | ent {m['entropy']:.3f} | clip {m['clip_frac']:.3f} | "
                f"{time.time() - t0:.1f} s/step | eta {(time.time() - t_start) / step * (args.steps - step):.0f} s")
    return model, opt


# ---------------------------------------------------------------
# 9. Aside: the reward model DPO does without (InstructGPT's step 2). Bradley & Terry (1952): p(y_w > y_l) =
#    sigmoid(r_w - r_l), so maximum likelihood is loss = -log sigmoid(r_w - r_l), DPO's loss with a network for r (a
#    head at the last response token, which has read x and y) instead of beta log pi/ref.

class RewardModel(nn.Module):
    """r(x, y) = h_last . w, w = 0 at init (loss log 2). No bias: only r_w - r_l matters."""

    def __init__(self, body):
        super().__init__()
        self.body, self.head = body, nn.Parameter(torch.zeros(body.cfg.d_model, device=body.lm_head.weight.device))

    def forward(self, tok, prompts, responses):  # -> (B,)
        b = tokenize_prompt_and_output([chat_prompt(p) for p in prompts], [r + EOT for r in responses], tok)
        mask = b["response_mask"].to(self.head.device)  # (B, T): label j = token j+1
        h = self.body.hidden(b["input_ids"].to(self.head.device))  # (B, T, C)
        # the last masked label is <|endoftext|>; its input position holds the response's last token
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)  # (B,)
        return h[torch.arange(len(h)), last] @ self.head

    def score_pairs(self, tok, rows, side: int):  # r of each row's chosen (side 1) or rejected (side 2) answer, (B,)
        return self(tok, [r[0] for r in rows], [r[side] for r in rows])


def bradley_terry_loss(r_chosen, r_rejected):
    """-log sigmoid(r_w - r_l) per pair, (B,): log 2 at equal rewards."""
    return -F.logsigmoid(r_chosen - r_rejected)


def run_rm(model, tok, args, log):
    """Fit on train-split pairs, rank held-out pairs, save body (a TransformerLM) + ckpt["reward_head"]."""
    train, test = (build_preference_pairs(model, tok, args, log, split) for split in ("train", "test"))
    rm = RewardModel(model)
    opt = AdamW(rm.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    for step in range(1, args.steps + 1):
        rows = rng.sample(train, min(args.batch_size, len(train)))
        rc, rr = rm.score_pairs(tok, rows, 1), rm.score_pairs(tok, rows, 2)  # (B,) each
        loss = bradley_terry_loss(rc, rr).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps:
            acc = (rc > rr).float().mean().item()
            log({"step": step, "loss": loss.item(), "pair_acc": acc},
                f"rm step {step}/{args.steps} | loss {loss.item():.4f} | pair acc {acc:.2f}")
    with torch.no_grad():  # a tie counts as wrong
        k = sum((rm.score_pairs(tok, test[i:i + 64], 1) > rm.score_pairs(tok, test[i:i + 64], 2)).sum().item()
                for i in range(0, len(test), 64))
    out, (lo, hi) = args.out or os.path.join(args.out_dir, "rm.pt"), wilson_interval(k, len(test))
    save_checkpoint(model, opt, args.steps, out, stage="rm", reward_head=rm.head.detach().cpu(), align_args=vars(args))
    log({"heldout_pair_acc": k / len(test), "n": len(test), "ci_lo": lo, "ci_hi": hi}, f"rm: held-out pair accuracy "
        f"{100 * k / len(test):.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] on {len(test)} pairs, saved {out}")
    return rm


# ---------------------------------------------------------------
# 10. Aside: LoRA (Hu et al. 2021, arXiv:2106.09685). Fine-tuning updates have low intrinsic rank, so we freeze W
#    (out, in) and learn W' = W + (alpha / r) B A, A (r, in), B (out, r): r (in + out) trainable, not in * out, and
#    Adam state for those only. B = 0 at the start, so at step 0 the adapted model *is* the base model. New facts for
#    a tiny model are not the small change low rank assumes: LoRA falls far short of full SFT (README).

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")  # not embeddings, not lm_head


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) (x A^T) B^T around a frozen model.Linear (weight (out, in), y = x W^T)."""

    def __init__(self, base, rank: int, alpha: float):
        super().__init__()
        w = base.weight.requires_grad_(False)  # (out, in)
        self.base, self.scale = base, alpha / rank
        self.A = nn.Parameter(torch.randn(rank, w.shape[1], device=w.device, dtype=w.dtype) / math.sqrt(w.shape[1]))  # N(0, 1/in)
        self.B = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.A.t()) @ self.B.t()  # (..., in) -> (..., r) -> (..., out)


def add_lora(model, rank: int, alpha: float, targets=LORA_TARGETS):
    """In place: freeze every weight, then wrap each Linear named in targets in a LoRALinear."""
    model.requires_grad_(False)
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if name in targets:
                setattr(mod, name, LoRALinear(child, rank, alpha))
    return model


@torch.no_grad()
def merge_lora(model):
    """In place: W += (alpha / r) B A, plain Linears back, all unfrozen: same function, plain keys."""
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight += child.scale * child.B @ child.A  # (out, r) @ (r, in) -> (out, in)
                setattr(mod, name, child.base)
    return model.requires_grad_(True)


# ---------------------------------------------------------------
# 11. Evaluation: greedy held-out accuracy with a Wilson 95% interval; test-time compute: a vote over N samples.

def wilson_interval(k: int, n: int, z: float = 1.96):
    """Wilson (1927) score interval: every p with |k/n - p| <= z sqrt(p(1-p)/n), the variance taken at the candidate
    p. The Wald interval q +/- z sqrt(q(1-q)/n) collapses to [0, 0] at 0 of 10 and covers far less than 95% at small
    n or p near 0 or 1, where early stages live; Wilson stays near."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    # the two roots of that quadratic in p; the center is the estimate pulled toward 1/2
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


@torch.no_grad()
def evaluate_accuracy(model, tok, problems: list, max_new_tokens=None, samples=1, vote="majority", rm=None,
                      temperature=1.0, generator=None) -> dict:
    """Greedy (samples=1): one temperature-0 answer per problem. Test-time compute (samples=N): N answers at
    `temperature`, one picked by vote(); also accuracy at every power of two n < N from the first n samples (nested:
    one run draws the whole curve), and pass@n, the share where *some* sample is right (a perfect picker's score)."""
    T = max_new_tokens or max_response_tokens(tok, problems)
    prompts = [p["prompt"] for p in problems]
    _, _, texts = sample_responses(model, tok, prompts, samples, temperature if samples > 1 else 0.0, T, generator)
    groups = [texts[i * samples:(i + 1) * samples] for i in range(len(problems))]  # (problems, N) answers
    scores = rm_scores(rm, tok, [p for p in prompts for _ in range(samples)], texts) if vote == "rm" and samples > 1 else texts
    scores = [scores[i * samples:(i + 1) * samples] for i in range(len(problems))]
    results = [(p["level"], p["answer"] is not None and vote_answer(g, vote, s) == p["answer"])
               for p, g, s in zip(problems, groups, scores)]
    k, n = sum(ok for _, ok in results), len(results)
    lo, hi = wilson_interval(k, n)
    res = {"acc": k / max(n, 1), "n": n, "ci_lo": lo, "ci_hi": hi, "by_difficulty": {}, "by_difficulty_n": {},
           "correct": [int(ok) for _, ok in results]}  # per problem, same order every stage: paired tests
    for level in sorted({lv for lv, _ in results}, key=str):
        oks = [ok for lv, ok in results if lv == level]
        name = LEVELS.get(level, str(level))
        res["by_difficulty"][name] = sum(oks) / len(oks)
        res["by_difficulty_n"][name] = len(oks)
    if samples > 1:
        res.update(samples=samples, vote=vote, temperature=temperature, by_samples={})
        for m in [2 ** i for i in range(samples.bit_length()) if 2 ** i < samples] + [samples]:
            km = sum(vote_answer(g[:m], vote, s[:m]) == p["answer"] for p, g, s in zip(problems, groups, scores))
            any_ok = sum(any(parse_answer(t) == p["answer"] for t in g[:m]) for p, g in zip(problems, groups))
            res["by_samples"][m] = {"acc": km / n, "ci": wilson_interval(km, n), "pass_at_n": any_ok / n}
    return res


def vote_answer(texts: list, vote: str, scores: list):
    """majority (self-consistency, Wang et al. 2022, arXiv:2203.11171): the most frequent parsed answer, ties to the
    first sampled, unparseable ones never win. rm (best-of-N): the answer the reward model scores highest."""
    answers = [parse_answer(t) for t in texts]
    if vote == "rm":
        return answers[max(range(len(texts)), key=lambda i: scores[i])]
    counts = Counter(a for a in answers if a is not None)
    return next((a for a in answers if a is not None and counts[a] == max(counts.values())), None)


@torch.no_grad()
def rm_scores(rm, tok, prompts: list, responses: list, batch: int = 64) -> list:
    return torch.cat([rm(tok, prompts[i:i + batch], responses[i:i + batch]) for i in range(0, len(prompts), batch)]).tolist()


def load_reward_model(path: str, tok, device):
    if not os.path.exists(path):
        raise SystemExit(f"error: reward model {path} not found (train one: python align.py rm --ckpt runs/align/sft.pt)")
    body, ckpt = load_model(path, device=device)
    if "reward_head" not in ckpt:
        raise SystemExit(f"error: {path} has no reward head (it is not an `align.py rm` checkpoint)")
    rm = RewardModel(ensure_chat_tokens(tok, body)[1])
    rm.head.data.copy_(ckpt["reward_head"])
    return rm.eval()


def eval_problems(args) -> list:
    """The held-out set: fixed seed, one problem per test fact and level (or the user's test rows)."""
    if args.data_jsonl:
        return [r for r in user_rows(args, "test") if r.get("answer") is not None]
    return sample_problems("test", args.n_eval, args.levels, seed=1234, test_percent=args.test_percent, unique=True)


def paired_difference(a: list, b: list, z: float = 1.96) -> dict:
    """Gain of stage a over b on the *same* problems: mean(d) +/- z sd(d) / sqrt(n), d_i = a_i - b_i. Var(a_i - b_i)
    = Var(a) + Var(b) - 2 Cov(a, b), and both stages find the same problems easy, so this is far tighter than two
    separate Wilson intervals (which read most real gains as noise)."""
    n = len(a)
    if n == 0 or len(b) != n:
        raise ValueError(f"paired_difference needs the same problems in both stages ({n} vs {len(b)}; no problems?)")
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(1, n - 1))  # sample sd of the d_i
    return {"delta": mean, "ci_lo": mean - z * sd / math.sqrt(n), "ci_hi": mean + z * sd / math.sqrt(n),
            "wins": d.count(1), "losses": d.count(-1), "n": n}


def write_eval(path: str, stage: str, res: dict):
    """Merge {stage: result} into the eval JSON the pipeline report reads; atomic write."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    allres = json.load(open(path)) if os.path.exists(path) else {}
    allres[stage] = res
    with open(path + ".tmp", "w") as f:
        json.dump(allres, f, indent=1)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------
# 12. Chat: turns repeat the training template, <|user|>q1<|assistant|>a1<|endoftext|><|user|>q2<|assistant|>...
#    SFT saw one turn only, so earlier turns are context the model was never taught to use.

def chat(model, tok, args, lines=None, out=None):
    """Read questions line by line (a terminal or a pipe), stream each reply; EOF or /quit ends."""
    lines, out = lines or sys.stdin, out or sys.stdout
    keep = model.cfg.context_length - args.max_new_tokens  # prompt room; older turns fall off the left
    if keep < 8 or args.max_new_tokens < 1:
        raise SystemExit(f"error: --max-new-tokens must be in [1, {model.cfg.context_length - 8}] (context_length - 8)")
    gen, history = torch.Generator(device=args.device).manual_seed(args.seed), []
    tty = hasattr(lines, "isatty") and lines.isatty()
    while True:
        print("you> " if tty else "", end="", file=out, flush=True)
        line = lines.readline()
        if not line or line.strip() in ("/quit", "/exit"):  # "" = EOF
            return
        if line.strip() == "/reset":
            history = []
            print("(history cleared)", file=out, flush=True)
        elif line.strip():
            prompt = (history + tok.encode(chat_prompt(line.strip())))[-keep:]
            history = prompt + stream_reply(model, tok, prompt, args, gen, out)


def stream_reply(model, tok, prompt: list, args, gen, out) -> list:
    """Stream the reply -> its ids; an incremental UTF-8 decoder holds back a character split across byte tokens."""
    eot, utf8 = tok.special_ids[EOT], codecs.getincrementaldecoder("utf-8")(errors="replace")
    idx, reply = torch.tensor([prompt], device=args.device), []
    print("bot> ", end="", file=out, flush=True)
    for nxt, logits in stream(model.eval(), idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                              stop_token=eot, generator=gen):
        t = nxt.item()
        reply.append(t)
        if t != eot:  # the model's own probability of t: before temperature and truncation reshape it
            p = f"[{F.softmax(logits[0].float(), -1)[t].item():.2f}]" if args.show_probs else ""
            print(utf8.decode(tok.vocab.get(t, b"")) + p, end="", file=out, flush=True)
    print(utf8.decode(b"", final=True), file=out, flush=True)
    return reply if reply[-1] == eot else reply + [eot]


# ---------------------------------------------------------------
# 13. CLI: load, run a stage, save (train.save_checkpoint format), evaluate.

def load_policy(args):
    if not os.path.exists(args.ckpt):
        raise SystemExit(f"error: checkpoint {args.ckpt} not found (pretrain one with: python train.py --data data/pydocs --out-dir runs/base)")
    model, ckpt = load_model(args.ckpt, device=args.device)
    tdir = (args.tokenizer or (ckpt.get("align_args") or {}).get("tokenizer")
            or os.path.join((ckpt.get("args") or {}).get("data", "data/pydocs"), "tokenizer"))
    args.tokenizer = tdir  # recorded in the output checkpoint, so later stages find it
    if not os.path.isdir(tdir):
        raise SystemExit(f"error: tokenizer dir {tdir} not found (pass --tokenizer)")
    tok, model = ensure_chat_tokens(Tokenizer.load(tdir), model)
    return model.to(args.device), tok


class MetricsLog:
    """log(record, line): one line for the eye on stdout, one JSONL record for the plots."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.file = open(path, "w")

    def __call__(self, record, line):
        print(line, flush=True)
        print(json.dumps(record), file=self.file, flush=True)


def run_eval_and_record(model, tok, args, stage, timing=None):
    t0, N = time.time(), getattr(args, "samples", 1)
    rm = load_reward_model(args.rm, tok, args.device) if N > 1 and args.vote == "rm" else None
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    r = evaluate_accuracy(model, tok, eval_problems(args), None, N, getattr(args, "vote", "majority"), rm,
                          getattr(args, "temperature", 1.0), gen)
    r.update(timing or {}, eval_s=round(time.time() - t0, 1))
    write_eval(os.path.join(args.out_dir, "eval.json"), stage, r)
    by = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["by_difficulty"].items())
    print(f"eval {stage}: acc {100 * r['acc']:.1f}% [{100 * r['ci_lo']:.1f}, {100 * r['ci_hi']:.1f}] "
          f"n={r['n']} ({by}) in {time.time() - t0:.0f} s", flush=True)
    for m, b in r.get("by_samples", {}).items():
        print(f"  {args.vote} of {m:2d}: acc {100 * b['acc']:5.1f}% [{100 * b['ci'][0]:.1f}, {100 * b['ci'][1]:.1f}]"
              f"  pass@{m} {100 * b['pass_at_n']:.1f}%", flush=True)
    return r


def summarize(path: str):
    """The before/after table, and paired gains (same problems) written back as eval.json["paired"]."""
    ev = json.load(open(path))
    print(f"{'stage':6} {'acc':>6}  95% CI (Wilson)   n    train s (CPU s)")
    for st in [st for st in ("base", "sft", "dpo", "grpo") if st in ev]:
        r = ev[st]
        print(f"{st:6} {100 * r['acc']:5.1f}%  [{100 * r['ci_lo']:4.1f}, {100 * r['ci_hi']:4.1f}]   {r['n']:4d} "
              f"{r.get('train_s', 0):6.0f} ({r.get('train_cpu_s', 0):.0f})")
    ev["paired"] = {}
    for a, b in (("sft", "base"), ("dpo", "sft"), ("grpo", "sft"), ("grpo", "dpo")):
        if a in ev and b in ev and len(ev[a]["correct"]) == len(ev[b]["correct"]) > 0:
            d = ev["paired"][f"{a}-{b}"] = paired_difference(ev[a]["correct"], ev[b]["correct"])
            print(f"{a} - {b}: {100 * d['delta']:+.1f} points, paired 95% CI [{100 * d['ci_lo']:+.1f}, "
                  f"{100 * d['ci_hi']:+.1f}] ({d['wins']} problems gained, {d['losses']} lost)")
    write_eval(path, "paired", ev["paired"])


def run_stage(stage, args):
    """Load args.ckpt, train one stage, save OUT_DIR/STAGE.pt (or --out), evaluate; -> the saved path."""
    torch.manual_seed(args.seed)
    model, tok = load_policy(args)
    model.train()
    log = MetricsLog(os.path.join(args.out_dir, f"{stage}_metrics.jsonl"))
    lora, n_all = stage in ("sft", "dpo") and args.lora_rank > 0, model.num_params()  # grpo has no --lora-rank
    if lora:  # the stage's optimizer then sees the adapters only (it takes the requires_grad ones)
        n = sum(p.numel() for p in add_lora(model, args.lora_rank, args.lora_alpha).parameters() if p.requires_grad)
        log({"lora_rank": args.lora_rank, "trainable_params": n, "params": n_all},
            f"lora: rank {args.lora_rank}, alpha {args.lora_alpha:g}: {n:,} trainable of {n_all:,} params ({100 * n / n_all:.1f}%)")
    t0, c0 = time.time(), time.process_time()
    model, opt = {"sft": run_sft, "dpo": run_dpo, "grpo": run_grpo}[stage](model, tok, args, log)
    if lora:  # save an ordinary TransformerLM checkpoint; the adapters' Adam moments died with them
        opt = AdamW(merge_lora(model).parameters(), lr=args.lr)
    # CPU seconds next to wall seconds: on a shared machine the wall clock measures the neighbours
    timing = {"train_s": round(time.time() - t0, 1), "train_cpu_s": round(time.process_time() - c0, 1)}
    out = args.out or os.path.join(args.out_dir, f"{stage}.pt")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    save_checkpoint(model, opt, args.steps, out, stage=stage, align_args=vars(args))
    print(f"{stage}: {timing['train_s']:.0f} s ({timing['train_cpu_s']:.0f} CPU s), saved {out}", flush=True)
    if not args.no_eval:
        run_eval_and_record(model, tok, args, stage, timing)
    return out


def run_all(args, stage_parsers):
    """eval base; sft -> dpo -> grpo, each from the last checkpoint at its subcommand's defaults; paired gains."""
    run_eval_and_record(*load_policy(args), args, "base")
    ckpt = args.ckpt
    for stage in ("sft", "dpo", "grpo"):
        own = {k: stage_parsers[stage].get_default(k) for k in ("steps", "lr", "batch_size")}
        ckpt = run_stage(stage, argparse.Namespace(**{**vars(args), **own, "ckpt": ckpt, "out": None, "no_eval": False}))
    summarize(os.path.join(args.out_dir, "eval.json"))


def parse_levels(text: str) -> list:
    levels = [int(x) for x in text.split(",") if x.strip().isdigit()]
    if len(levels) != len(text.split(",")) or not all(x in LEVELS for x in levels):
        raise argparse.ArgumentTypeError(f"--levels must be comma-separated numbers from {list(LEVELS)}")
    return levels


def add_optim_flags(p, tiny: bool, steps: int, lr: float, batch_size: int, what: str):
    """A stage's own optimizer defaults; --tiny (smoke test) runs 1/100 of the steps."""
    p.add_argument("--steps", type=int, default=max(2, steps // 100) if tiny else steps, help="optimizer steps")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    p.add_argument("--batch-size", type=int, default=batch_size, help=what)


def build_parser(tiny=False):
    """Subcommands sharing flag groups (argparse parents); each stage has its own defaults."""
    common, single, sft, lora, pairs, dpo, grpo = (argparse.ArgumentParser(add_help=False) for _ in range(7))
    # common: io, task, device (every subcommand)
    common.add_argument("--ckpt", required=True, help="input checkpoint (train.save_checkpoint format)")
    common.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the checkpoint's, else <ckpt args.data>/tokenizer)")
    common.add_argument("--out-dir", default="runs/align", help="where checkpoints, metrics JSONL and eval.json go")
    common.add_argument("--data-jsonl", default=None, help="user data instead of the generated task (see docstring)")
    common.add_argument("--device", default=None, help="cpu / cuda / mps (default: autodetect)")
    common.add_argument("--seed", type=int, default=0, help="seed for sampling, data order, init")
    common.add_argument("--levels", type=parse_levels, default="5",
                        help="difficulty levels, comma-separated: " + "; ".join(f"{k}={v}" for k, v in LEVELS.items()))
    common.add_argument("--test-percent", type=int, default=20, help="share of facts held out (jsonl: of prompts; a hash split)")
    common.add_argument("--n-eval", type=int, default=60 if tiny else 600, help="held-out problems to evaluate, split evenly "
                        "over levels (a level with fewer held-out facts gives all it has: mul 1x1 has 12)")
    common.add_argument("--log-every", type=int, default=10, help="print/log every N steps")
    common.add_argument("--tiny", action="store_true", help="smoke-test sizes (pipeline --preset tiny)")
    # single: one training stage run alone
    single.add_argument("--out", default=None, help="output checkpoint (default: OUT_DIR/STAGE.pt)")
    single.add_argument("--no-eval", action="store_true", help="skip the eval after training")
    sft.add_argument("--grad-accum", type=int, default=1, help="SFT microbatches per optimizer step")
    lora.add_argument("--lora-rank", type=int, default=0, help="sft/dpo: train rank-r LoRA adapters, merged before saving (0 = full fine-tuning)")
    lora.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha: the update is scaled by alpha / rank")
    # pairs: preference pairs, for dpo and rm
    pairs.add_argument("--num-pairs", type=int, default=16 if tiny else 512, help="preference pairs built from the task")
    pairs.add_argument("--samples-per-prompt", type=int, default=4, help="SFT samples per prompt to find a correct and a wrong answer")
    dpo.add_argument("--beta", type=float, default=0.1, help="DPO beta: strength of the implicit KL to the reference")
    dpo.add_argument("--dpo-nll", type=float, default=1.0, help="RPO alpha: weight of the chosen answer's per-token NLL (0 = plain DPO)")
    grpo.add_argument("--group-size", type=int, default=8, help="GRPO G: completions per prompt")
    grpo.add_argument("--prompts-per-step", type=int, default=4 if tiny else 16, help="GRPO prompts per rollout batch")
    grpo.add_argument("--micro-batch-size", type=int, default=32, help="GRPO sequences per forward/backward")
    grpo.add_argument("--temperature", type=float, default=1.0, help="GRPO sampling temperature")
    grpo.add_argument("--loss-type", default="grpo_clip", choices=["no_baseline", "reinforce_with_baseline", "grpo_clip"],
                      help="policy-gradient loss")
    grpo.add_argument("--cliprange", type=float, default=0.2, help="PPO/GRPO clip epsilon")
    grpo.add_argument("--epochs-per-rollout", type=int, default=1, help="1 = on-policy; >1 = reuse each rollout batch (off-policy)")
    grpo.add_argument("--no-std-norm", action="store_true", help="Dr. GRPO: advantages r - mean, no std division")
    grpo.add_argument("--kl-coef", type=float, default=0.0, help="KL penalty to the initial policy (k3 estimator)")
    grpo.add_argument("--format-weight", type=float, default=0.1, help="reward bonus for a well-formed answer (a bare number, "
                      "or text ending in '= N' / '#### N'): among all-wrong samples the only signal, it pushes junk down")

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="stage", required=True, metavar="{sft,dpo,grpo,rm,eval,all,chat}")
    # steps / lr / batch size per stage: sft+dpo+grpo+4 evals take ~10 CPU minutes (README)
    p = sub.add_parser("sft", parents=[common, single, sft, lora], help="supervised fine-tuning -> OUT_DIR/sft.pt")
    add_optim_flags(p, tiny, 2000, 1e-3, 32, "sequences per microbatch")
    p = sub.add_parser("dpo", parents=[common, single, pairs, dpo, lora], help="DPO (+ RPO NLL) -> OUT_DIR/dpo.pt")
    add_optim_flags(p, tiny, 30, 5e-5, 16, "preference pairs per step")
    p = sub.add_parser("grpo", parents=[common, single, grpo], help="GRPO against the verifier -> OUT_DIR/grpo.pt")
    add_optim_flags(p, tiny, 100, 3e-5, 16, "unused by GRPO (see --prompts-per-step)")  # 3e-4 hurt: README
    p = sub.add_parser("rm", parents=[common, single, pairs], help="Bradley-Terry reward model (an aside) -> OUT_DIR/rm.pt")
    add_optim_flags(p, tiny, 40, 1e-4, 16, "preference pairs per step")
    p = sub.add_parser("eval", parents=[common], help="greedy held-out accuracy of --ckpt -> OUT_DIR/eval.json")
    p.add_argument("--stage-name", default=None, help="key in eval.json (default: ckpt file stem, +@N-VOTE-tTEMP if --samples > 1)")
    p.add_argument("--samples", type=int, default=1, help="answers per problem: 1 = greedy; N = sample N, pick one by --vote")
    p.add_argument("--vote", default="majority", choices=["majority", "rm"], help="majority of parsed answers, or best-of-N by --rm")
    p.add_argument("--rm", default=None, help="reward model checkpoint for --vote rm (from `align.py rm`)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature when --samples > 1")
    p = sub.add_parser("chat", parents=[common], help="talk to --ckpt: multi-turn, streamed; /reset, /quit; reads a pipe too")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set with this much mass")
    p.add_argument("--max-new-tokens", type=int, default=64, help="reply length cap (a reply ends at <|endoftext|>)")
    p.add_argument("--show-probs", action="store_true", help="print the model's probability of each token after it, as token[0.93] (before temperature/top-k/top-p)")
    sub.add_parser("all", parents=[common, sft, pairs, dpo, lora, grpo], help="eval base, then sft, dpo, grpo at their defaults")
    return ap, sub.choices


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap, stage_parsers = build_parser(tiny="--tiny" in argv)  # --tiny shrinks the defaults, not the flags you give
    args = ap.parse_args(argv)
    if args.stage in ("grpo", "all") and args.group_size < 2:  # checked before any work is done
        raise SystemExit("error: --group-size must be >= 2 (the baseline is a group's mean; the std of one sample is NaN)")
    args.device = pick_device(args.device)
    if args.stage == "all":
        run_all(args, stage_parsers)
    elif args.stage == "eval":
        if args.samples < 1 or (args.vote == "rm" and args.samples > 1 and not args.rm):
            raise SystemExit("error: --samples must be >= 1, and --vote rm needs --rm CKPT (from `align.py rm`)")
        name = os.path.splitext(os.path.basename(args.ckpt))[0] + (f"@{args.samples}-{args.vote}-t{args.temperature:g}" if args.samples > 1 else "")
        run_eval_and_record(*load_policy(args), args, args.stage_name or name)
    elif args.stage == "chat":
        chat(*load_policy(args), args)
    elif args.stage == "rm":  # a lesson, not a pipeline stage: `all` never runs it
        torch.manual_seed(args.seed)
        model, tok = load_policy(args)
        run_rm(model, tok, args, MetricsLog(os.path.join(args.out_dir, "rm_metrics.jsonl")))
    else:
        run_stage(args.stage, args)


if __name__ == "__main__":
    main()
