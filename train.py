"""
train.py -- the training loop, built from its parts.

A language model learns by next-token prediction: read a window of token ids, predict each next id, measure the
surprise (cross-entropy), step the weights downhill. Everything that makes this work at scale is a small, separate
idea, each written here from scratch so you can read it, test it against PyTorch's own version, and change it:

  1. `cross_entropy`      -- the loss, computed stably with the log-sum-exp trick.
  2. `AdamW`, `Muon`      -- Adam (Kingma & Ba 2014, arXiv:1412.6980) with decoupled weight decay (Loshchilov &
                             Hutter 2017, arXiv:1711.05101); momentum + Newton-Schulz orthogonalization for 2-D
                             hidden weights (Jordan et al. 2024, modded-nanogpt; Liu et al. 2025, arXiv:2502.16982).
  3. `lr_cosine_schedule` -- linear warmup (Goyal et al. 2017, arXiv:1706.02677), then cosine decay (Loshchilov &
                             Hutter 2016, arXiv:1608.03983), or `lr_wsd_schedule` (warmup-stable-decay);
                             `clip_grad_norm` caps the global gradient norm.
  4. `get_batch`          -- random windows from a flat memmapped token file.
  5. checkpoints          -- everything a *bitwise* resume needs: weights, optimizer moments, step, RNG states.
  6. the loop             -- gradient accumulation, bf16 autocast, eval (loss / perplexity / bits per byte), samples,
                             JSONL metrics, DDP / FSDP under torchrun (PyTorch DDP: Li et al. 2020, arXiv:2006.15704;
                             ZeRO/FSDP: Rajbhandari et al. 2019, arXiv:1910.02054; from scratch in parallel.py).

Three ideas carry the loop. Gradient accumulation: B sequences x --grad-accum micro-steps give the gradient of one
batch of B x accum in the memory of B, because backward *adds* into p.grad; the DDP all-reduce is linear too, so it
runs once, on the last micro-step. Mixed precision: bf16 matmuls on CUDA (half the bytes, tensor cores), but the loss,
master weights and moments stay fp32. Resumability: a killed run continues from its last checkpoint as if it had never
stopped (tested bit for bit). MFU, the fraction of the chip's peak we use, is (tokens/s x FLOPs/token) / peak FLOP/s
with FLOPs/token = 6N + 12*L*d*T (Chowdhery et al. 2022, PaLM, arXiv:2204.02311, appendix B). `--objective mlm` trains
a bidirectional model with BERT-style masking (Devlin et al. 2018, arXiv:1810.04805).

Run it (data dir from `python data.py` + `python bpe.py ...`, see README):
    python train.py --data data/pydocs                                 # CPU, a few minutes
    python train.py --data data/pydocs --d-model 768 --num-layers 12 --num-heads 12 \\
        --context-length 1024 --batch-size 32 --max-steps 5000 --compile   # one GPU
    torchrun --standalone --nproc_per_node 8 train.py --data data/pydocs ...   # DDP (add --fsdp to shard)
    python train.py --data data/pydocs --resume                        # continue OUT/ckpt.pt
    python train.py sample --ckpt out/ckpt.pt --prompt "def main("     # sample from a checkpoint
    python train.py --data data/pydocs --objective mlm                 # bidirectional masked-LM encoder

Outputs in --out-dir: ckpt.pt (atomic; 5. + config, args) and metrics.jsonl (a record per log step, per eval, final).
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import time

import numpy as np
import torch

import parallel
from model import (CHOICES, ModelConfig, MoE, TransformerLM, estimate_mfu, flops_per_token, generate, load_model, mlm_corrupt, pick_device,
                   read_checkpoint)

# ---------------------------------------------------------------
# 1. The loss: cross-entropy with the log-sum-exp trick


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean of -log softmax(logits)[target] over positions whose target != ignore_index (-100: MLM's unmasked tokens).

    logits (..., V), targets (...). -log p_y = logsumexp(z) - z_y. exp(z) alone overflows (exp(1000) = inf), so we
    subtract the row max m first: logsumexp(z) = m + log sum exp(z - m), where every exponent is <= 0."""
    V = logits.size(-1)
    z = logits.reshape(-1, V).float()  # (N, V) -- upcast: bf16 log-sum-exp loses digits
    y = targets.reshape(-1)  # (N,)
    keep = y != ignore_index  # (N,)
    m = z.max(dim=-1, keepdim=True).values  # (N, 1)
    lse = m.squeeze(-1) + (z - m).exp().sum(dim=-1).log()  # (N,)
    z_y = z.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)  # (N,) clamp: -100 is not an index
    nll = (lse - z_y) * keep  # (N,) zero where ignored
    return nll.sum() / keep.sum().clamp(min=1)


# ---------------------------------------------------------------
# 2. Optimizers: AdamW and Muon


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (arXiv:1711.05101), same update order as torch.optim.AdamW.

    Per parameter, with gradient g at step t:
        theta <- theta - lr * wd * theta               (decay, *not* folded into g: "decoupled")
        m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2
        theta <- theta - lr/(1 - b1^t) * m / (sqrt(v)/sqrt(1 - b2^t) + eps)   (bias correction: m, v start at 0)"""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:  # torch's key names, so a state_dict reads like torch.optim.AdamW's
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))  # m, v
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - lr * wd)  # theta -= lr*wd*theta, before and apart from the Adam step
                m.lerp_(g, 1 - b1)  # m = b1 m + (1-b1) g
                v.mul_(b2).addcmul_(g, g, value=1 - b2)  # v = b2 v + (1-b2) g^2
                denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)  # sqrt(v_hat) + eps, v_hat = v/(1-b2^t)
                p.addcdiv_(m, denom, value=-lr / (1 - b1**t))  # theta -= lr * m_hat / denom, m_hat = m/(1-b1^t)
        return loss


def newton_schulz(G, steps=5):
    """Approximately orthogonalize G (replace its singular values by ~1), as in modded-nanogpt.

    For X = U S V^T, the odd polynomial f(X) = aX + b(XX^T)X + c(XX^T)^2 X = U f(S) V^T acts on the singular values
    only. The quintic coefficients a, b, c are tuned to push every s in (0, 1] towards 1 as fast as possible in 5
    steps; not all the way: they leave the values in a band of roughly [0.7, 1.2], which trains just as well."""
    a, b, c = 3.4445, -4.7750, 2.0315
    # bf16 is fine on GPU (the iteration is self-correcting); on CPU fp32 is faster and exact.
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # work with the wide orientation so X X^T is the small Gram matrix
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # Frobenius norm >= spectral: s <= 1
    for _ in range(steps):
        A = X @ X.mT  # (m, m)
        B = b * A + c * A @ A
        X = a * X + B @ X  # X <- aX + b(XX^T)X + c(XX^T)^2 X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D hidden weight matrices only. Its update
    NS(nesterov_momentum(g)) gives every direction the same magnitude, so rare-but-useful ones are not drowned by the
    dominant ones. Embeddings, lm_head and norm gains stay with AdamW (`build_optimizers`)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)  # buf = mu buf + (1-mu) g
                g = p.grad.lerp(buf, mu) if group["nesterov"] else buf  # look ahead along buf
                u = newton_schulz(g, group["ns_steps"])  # (out, in), singular values ~1
                # NS(g)'s element RMS is 1/sqrt(max(out, in)); sqrt(out/in) on tall ones makes it 1/sqrt(in) always
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(u.to(p.dtype), alpha=-group["lr"] * scale)  # theta -= lr * scale * NS(g)
        return loss


def build_optimizers(model, args):
    """AdamW everywhere, or Muon for 2-D hidden weights + AdamW for the rest. Returns a list."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    betas = (args.beta1, args.beta2)
    if args.optimizer == "muon":
        # an embedding row or an lm_head row is a per-token vector, not a hidden linear map: AdamW
        hidden = [p for n, p in named if p.ndim == 2 and "token_embeddings" not in n and "lm_head" not in n]
        other = [p for n, p in named if not (p.ndim == 2 and "token_embeddings" not in n and "lm_head" not in n)]
        opts = [Muon(hidden, lr=args.muon_lr, momentum=0.95), AdamW(other, lr=args.lr, betas=betas, weight_decay=0.0)]
    else:
        # weight decay on matrices only: shrinking a norm gain towards 0 has no regularizing meaning
        groups = [{"params": [p for n, p in named if p.ndim >= 2], "weight_decay": args.weight_decay},
                  {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
        opts = [AdamW(groups, lr=args.lr, betas=betas)]
    for opt in opts:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]  # the schedule multiplies this by a factor in [0, 1]
    return opts


# ---------------------------------------------------------------
# 3. Learning-rate schedule and gradient clipping


def lr_cosine_schedule(it, max_lr, min_lr, warmup_iters, cosine_cycle_iters):
    """Linear warmup it/T_w * max_lr, cosine from max_lr to min_lr at T_c, min_lr after. Warmup: Adam's second moment
    is noisy at first, so full steps are too big. Cosine: big steps far from a minimum, small ones to settle in."""
    if it < warmup_iters:
        return it / warmup_iters * max_lr
    if it > cosine_cycle_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, cosine_cycle_iters - warmup_iters)  # 0 -> 1
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def lr_wsd_schedule(it, max_lr, min_lr, warmup_iters, decay_start, total_iters):
    """Warmup-stable-decay (Hu et al. 2024, MiniCPM, arXiv:2404.06395): linear warmup, max_lr until decay_start, then
    the "1-sqrt" cooldown max_lr - (max_lr - min_lr) sqrt(progress) to min_lr at total_iters (it beats a linear one:
    Hägele et al. 2024, arXiv:2405.18392). The stable phase ignores the run's length: a decay can branch off any
    checkpoint in it, so one long run gives the loss at many token counts."""
    if it < warmup_iters:
        return it / warmup_iters * max_lr
    progress = min(1.0, max(0, it - decay_start) / max(1, total_iters - decay_start))  # 0 while stable -> 1
    return max_lr - (max_lr - min_lr) * math.sqrt(progress)


@torch.no_grad()
def clip_grad_norm(params, max_norm, eps=1e-6):
    """If ||g||_2 over *all* grads exceeds max_norm, scale every grad by max_norm/(||g|| + eps). One global norm (not
    per tensor) keeps the update direction; only its length is capped, so a single bad batch cannot throw the weights
    far away. Returns the norm before clipping. (FSDP: parallel.fsdp_clip_grad_norm.)"""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.stack([g.detach().float().norm() for g in grads]).norm()  # sqrt(sum of every squared entry)
    coef = (max_norm / (total + eps)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device, g.dtype))
    return total


# ---------------------------------------------------------------
# 4. Data: random windows from a flat token file


def get_batch(data, batch_size, context_length, device, generator=None):
    """Sample B windows of T+1 consecutive tokens; x = first T, y = last T (shifted by one). data: a 1-D np.memmap of
    token ids (the OS pages in only the windows we touch: a file bigger than RAM is fine)."""
    T = context_length
    starts = torch.randint(len(data) - T, (batch_size,), generator=generator).tolist()  # 0..n-T-1
    x = torch.from_numpy(np.stack([data[s : s + T] for s in starts]).astype(np.int64))  # (B, T)
    y = torch.from_numpy(np.stack([data[s + 1 : s + T + 1] for s in starts]).astype(np.int64))  # (B, T)
    if str(device).startswith("cuda"):  # page-locked host memory: the copy runs async to the GPU's work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def unigram_entropy(tokens, vocab_size, chunk=1 << 22):
    """H = -sum p log p (nats) of the token frequencies: the loss of the best model that ignores context; getting well
    below it shows the model uses its context at all. Counted `chunk` tokens at a time: bincount copies its input to
    int64 (4x a uint16 file) and train.bin may exceed RAM."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(0, len(tokens), chunk):
        # bincount grows past minlength if some id >= vocab_size: that is how a wrong --vocab-size shows
        c = np.bincount(tokens[i : i + chunk], minlength=vocab_size)
        if len(c) > vocab_size:
            raise SystemExit(f"error: data has token id {len(c) - 1} >= vocab size {vocab_size}")
        counts += c
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def bytes_per_token(tok, tokens):
    """Mean UTF-8 bytes per token on a sample, for loss in bits per byte (ppl_bpb), a number comparable across
    tokenizers. A special token (<|endoftext|>) is 0 bytes: a marker, not the 13 characters that spell it."""
    ids, special = np.asarray(tokens[:200_000]).tolist(), set(tok.special_ids.values())
    return sum(len(tok.vocab[i]) for i in ids if i not in special) / len(ids)  # exact: the byte lengths of the tokens


def load_tokenizer(tok_dir):
    """bpe.Tokenizer from DIR or None: the tokenizer is optional (only samples and bpb need it)."""
    if not tok_dir or not os.path.isdir(tok_dir):
        return None
    from bpe import Tokenizer  # here, not at the top: bpe is only needed when a tokenizer exists
    try:
        return Tokenizer.load(tok_dir)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load tokenizer {tok_dir}: {e}")


# ---------------------------------------------------------------
# 5. Checkpoints: atomic, complete, checked
# A resumed run must produce the very losses the uninterrupted run would have. That needs more than the weights: AdamW's
# moments and step counts (the bias correction depends on t), the step (it sets the lr), and the RNG states, above all the
# batch generator's, which *is* the data position (it decides which windows come next): we store no offset into the data.


def is_master():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def save_checkpoint(model, optimizer, iteration, out, **extra):
    """Save a plain (unwrapped) model, optimizer[s] (one or a list: Muon + AdamW), step and config as plain types
    (weights_only loading refuses arbitrary pickles: a checkpoint cannot run code) to a path (atomically) or a file
    object. Under FSDP every rank must call this (gathering the shards is collective); only rank 0 writes."""
    opts = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    if parallel.is_fsdp(model):
        model_sd, opt_sds = parallel.fsdp_state_dicts(model, opts)
    else:
        model_sd, opt_sds = model.state_dict(), [opt.state_dict() for opt in opts]
    if not is_master():
        return
    ckpt = {"model": model_sd, "optimizer": opt_sds if len(opts) > 1 else opt_sds[0], "iteration": int(iteration),
            "config": dataclasses.asdict(model.cfg), **extra}  # fmt: skip
    if not isinstance(out, (str, os.PathLike)):
        return torch.save(ckpt, out)
    # temp name, fsync, rename: a kill (or a power cut) mid-write leaves the old file or the new one,
    # never half of one. Without the fsync the rename can reach the disk before the data does.
    with open(f"{out}.tmp", "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{out}.tmp", out)  # atomic on POSIX


def check_config(saved, current):
    """Refuse to load weights into a model of another shape, naming the first mismatch."""
    for key, val in sorted(current.items(), key=lambda kv: kv[0] != "causal"):  # objective first: it also shifts vocab_size
        if key in saved and key != "attn_backend" and saved[key] != val:
            if key == "causal":
                obj = {True: "clm", False: "mlm"}
                raise SystemExit(f"error: checkpoint was trained with --objective {obj[saved[key]]}, not {obj[val]}")
            raise SystemExit(f"error: checkpoint {key}={saved[key]} but --{key.replace('_', '-')} {val}")


def load_checkpoint(src, model, optimizer=None):
    """Restore model (and optimizer[s]) from a path, file object or read dict; returns the step (RNG: see build_model)."""
    ckpt = src if isinstance(src, dict) else read_checkpoint(src)
    check_config(ckpt["config"], dataclasses.asdict(model.cfg))
    opts = optimizer if isinstance(optimizer, (list, tuple)) else ([optimizer] if optimizer is not None else [])
    opt_sds = ckpt["optimizer"] if isinstance(ckpt.get("optimizer"), list) else [ckpt.get("optimizer")]
    if opts and len(opt_sds) != len(opts):
        raise SystemExit(f"error: checkpoint has {len(opt_sds)} optimizer(s) but --optimizer needs {len(opts)}")
    if parallel.is_fsdp(model):
        parallel.fsdp_load_state_dicts(model, opts, ckpt["model"], opt_sds)
    else:
        model.load_state_dict(ckpt["model"])
        for opt, sd in zip(opts, opt_sds):
            opt.load_state_dict(sd)
    return int(ckpt["iteration"])


def save(model, optimizers, step, batch_gen, args, wall_s):
    """OUT/ckpt.pt (+ ckpt-STEP.pt with --keep-ckpts). Every rank calls it: each rank's batch stream is gathered."""
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
           "batch_per_rank": parallel.gather_object(batch_gen.get_state())}  # fmt: skip
    path = os.path.join(args.out_dir, "ckpt.pt")
    save_checkpoint(model, optimizers, step, path, args=vars(args), rng=rng, wall_s=wall_s)
    if is_master() and args.keep_ckpts:
        shutil.copyfile(path, os.path.join(args.out_dir, f"ckpt-{step}.pt"))


# ---------------------------------------------------------------
# 6. The training loop: setup, the steps, the report


def log(text, metrics=None, rec=None):
    """Print on rank 0 only (flush: a log piped to a file must show every finished step); append `rec` to `metrics`."""
    if is_master():
        print(text, flush=True)
        if rec is not None:
            with open(metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")


def log_step(step, loss, lr, norm, dt, tokens_per_step, raw_model, args, world, device, metrics):
    """The step's log line and metrics record (an MoE run adds its aux loss and per-layer expert fractions)."""
    tps = tokens_per_step / dt
    mfu = estimate_mfu(raw_model.cfg, tps / world, device=device)  # tok/s per GPU x (6N + 12·L·d·T) / peak; None on CPU
    moe = dict(zip(("moe_aux", "expert_fractions"), raw_model.moe_stats())) if args.num_experts > 1 else {}
    log(f"step {step}/{args.max_steps} | loss {loss:.3f} | lr {lr:.1e} | {dt * 1000:.0f} ms | {tps / 1e3:.1f}k tok/s | mfu "
        + (f"{100 * mfu:.1f}%" if mfu is not None else "n/a") + (f" | moe aux {moe['moe_aux']:.3f}" if moe else ""), metrics,
        dict(step=step, loss=loss, lr=lr, grad_norm=norm.item(), ms=dt * 1000, tok_per_s=tps, mfu=mfu, tokens=step * tokens_per_step) | moe)


def reset_metrics(path, step):
    """Fresh run (step 0): an empty file. Resumed: drop records written after the checkpoint (a killed run may log past it)."""
    if not is_master():
        return
    keep = []
    if step and os.path.exists(path):
        with open(path) as f:
            keep = [r for r in map(json.loads, filter(str.strip, f)) if not r.get("final") and r.get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(path + ".tmp", path)


def load_data(args):
    """(tokenizer or None, vocab size, train tokens, val tokens), with one-line errors."""
    if not args.data:
        raise SystemExit("error: --data DIR is required (or: python train.py sample --ckpt PATH)")
    if not os.path.isdir(args.data):
        raise SystemExit(f"error: data dir {args.data} not found (run data.py and bpe.py encode first)")
    tok = load_tokenizer(args.tokenizer or os.path.join(args.data, "tokenizer"))
    if args.vocab_size is None and tok is None:
        raise SystemExit(f"error: no tokenizer in {args.data}/tokenizer; pass --vocab-size")
    vocab = args.vocab_size or len(tok)
    splits = []
    for name in ("train", "val"):
        path = os.path.join(args.data, f"{name}.bin")
        if not os.path.exists(path):
            raise SystemExit(f"error: {path} not found (run data.py and bpe.py encode first)")
        d = np.memmap(path, dtype=np.uint16 if vocab <= 65536 else np.uint32, mode="r")  # the contract's reader rule
        if len(d) <= args.context_length + 1:
            raise SystemExit(f"error: {name}.bin has {len(d)} tokens, needs > --context-length {args.context_length}")
        splits.append(d)
    return tok, vocab, *splits


def build_model(args, data_vocab, device, batch_gen, rank, world):
    """The model the flags ask for, wrapped, with its optimizers, resumed (weights, moments, RNG states)
    when asked. Returns (plain model, model to train, optimizers, start step, wall seconds before)."""
    mlm = args.objective == "mlm"  # MLM: one extra embedding row, the [MASK] token, and bidirectional attention
    init = read_checkpoint(args.init_from) if args.init_from else None  # fine-tune: its config and weights, fresh optimizer
    try:
        shape = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size", "causal", "bias", "norm_eps", "quant_bits", "quant_group_size"}  # each a flag
        cfg = ModelConfig(**init["config"]) if init else ModelConfig(
            vocab_size=data_vocab + (1 if mlm else 0), causal=not mlm, **{k: getattr(args, k) for k in shape})
    except (ValueError, TypeError) as e:  # e.g. d_model not divisible by num_heads
        raise SystemExit(f"error: {e}")
    if init and (data_vocab > cfg.vocab_size or args.resume):
        raise SystemExit(f"error: --init-from needs no --resume and data ids < its vocab_size {cfg.vocab_size} (data: {data_vocab})")
    torch.manual_seed(args.seed)  # same init on every rank
    raw_model = TransformerLM(cfg).to(device)
    if init:  # training windows must fit the imported model's context
        raw_model.load_state_dict(init["model"])
        args.context_length = min(args.context_length, cfg.context_length)
        log(f"initialized from {args.init_from} (its architecture; the model-shape flags are ignored)")
    if world > 1 and args.fsdp:  # sharded params, grads and moments (torch's FSDP2)
        parallel.fsdp_wrap(raw_model)
    optimizers = build_optimizers(raw_model, args)  # after sharding: fully_shard swaps the params for DTensors
    start, ckpt = 0, {}
    if args.resume:  # after wrapping too: FSDP loads into the sharded parameters
        ckpt = read_checkpoint(os.path.join(args.out_dir, "ckpt.pt") if args.resume == "auto" else args.resume)
        asked = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in optimizers]
        start, per_rank = load_checkpoint(ckpt, raw_model, optimizers), ckpt["rng"]["batch_per_rank"]
        for opt, groups in zip(optimizers, asked):  # the state dict brought the old run's lr, wd, betas:
            for g, hyper in zip(opt.param_groups, groups):  # this run's flags win (the moments stay)
                g.update(hyper)
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        if len(per_rank) == world:
            batch_gen.set_state(per_rank[rank])  # each rank continues its own stream
        else:
            batch_gen.manual_seed(args.seed + 1000 * start)  # world size changed: a fresh (shared) stream
        log(f"resumed from step {start}")
    model = torch.compile(raw_model) if args.compile else raw_model
    if world > 1 and not args.fsdp:  # our DDP (bucketed all-reduce) hooks the parameters, which the compiled module shares
        model = parallel.BucketedDDP(model, bucket_size_mb=25)
    return raw_model, model, optimizers, start, ckpt.get("wall_s", 0.0)


def next_batch(data, gen, args, rank, world, device, mask_id=None):
    """(inputs, targets) on device. CLM: targets = next tokens. MLM (mask_id = the [MASK] id): corrupt x, predict the
    originals. Under torchrun each rank draws the global batch of world x B windows and keeps rows [rank·B, (rank+1)·B):
    2 ranks x accum 2 then see the batches of 1 rank x accum 4 (the torchrun test), for world x more windows read."""
    n, mine = args.batch_size * world, slice(rank * args.batch_size, (rank + 1) * args.batch_size)
    if mask_id is None:
        x, y = get_batch(data, n, args.context_length, device, gen)  # (world·B, T) each
        return x[mine], y[mine]  # (B, T)
    x, _ = get_batch(data, n, args.context_length, "cpu", gen)  # on CPU: the mask draws use the CPU generator
    inp, labels = mlm_corrupt(x, mask_id, mask_id, generator=gen, mask_prob=args.mask_prob)  # real ids: 0..mask_id-1
    return inp[mine].to(device), labels[mine].to(device)


def all_mean(t):
    """The mean of t over ranks, in place (t itself on one process)."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)  # SUM works on every backend (gloo has no AVG)
        t /= torch.distributed.get_world_size()
    return t


def set_lr(optimizers, step, args):
    """Set every group's lr for this step; one schedule shape, each group from its own peak (AdamW's,
    Muon's). Returns AdamW's lr as used. 1-based step: the first update already moves, the last uses min_lr."""
    if args.lr_schedule == "wsd":  # the decay is the last --decay-frac of *this* run's --max-steps (a resumed branch's too)
        factor = lr_wsd_schedule(step, 1.0, args.min_lr / args.lr, args.warmup_steps, wsd_decay_start(args), args.max_steps)
    else:
        factor = lr_cosine_schedule(step, 1.0, args.min_lr / args.lr, args.warmup_steps, args.max_steps)
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
    return optimizers[-1].param_groups[0]["lr"]


def wsd_decay_start(args):
    return args.max_steps - round(args.decay_frac * args.max_steps)


def train_step(model, optimizers, draw, data, gen, args, autocast):
    """One optimizer step on args.grad_accum micro-batches. Returns (mean micro-batch loss, pre-clip grad norm), on
    device, and whether both were finite: if not, every rank skips the update (weights never become NaN)."""
    ddp, fsdp = isinstance(model, parallel.BucketedDDP), parallel.is_fsdp(model)
    loss_sum = 0.0  # becomes a tensor on device: no .item() per micro-step, no GPU stall
    for micro in range(args.grad_accum):
        last = micro == args.grad_accum - 1
        x, y = draw(data, gen)
        # The all-reduce is linear, sum_ranks(g_1 + ... + g_k) = sum_k sum_ranks(g_k), so non-final micro-steps
        # accumulate locally (no_sync) and the last all-reduces (FSDP: reduce-scatters) the sum: 1/k of the traffic
        if fsdp:
            model.set_requires_gradient_sync(last)
        with model.no_sync() if ddp and not last else contextlib.nullcontext():
            with autocast:  # bf16 matmuls (--dtype); cross_entropy upcasts to fp32 itself
                loss = cross_entropy(model(x), y)
            # MoE: + the load-balancing loss, in the gradient only (the logged loss stays comparable)
            aux = args.moe_aux_coef * sum(m.aux_loss for m in model.modules() if isinstance(m, MoE)) if args.num_experts > 1 else 0
            # backward *adds* into p.grad: sum_k grad(loss_k / k) = grad(mean of k losses), one big batch's gradient
            ((loss + aux) / args.grad_accum).backward()
        loss_sum += loss.detach().float()
    if ddp:
        model.finish_gradient_synchronization()  # wait for the last buckets' all-reduce
    # after the all-reduce: every rank clips the same gradient (inf = no clipping, the norm only)
    params = [p for p in model.parameters() if p.requires_grad]  # (a DDP or compile wrapper holds the same ones)
    norm = (parallel.fsdp_clip_grad_norm if fsdp else clip_grad_norm)(params, args.grad_clip if args.grad_clip > 0 else math.inf)
    loss = loss_sum / args.grad_accum
    ok = all_mean((~torch.isfinite(loss) | ~torch.isfinite(norm)).float()).item() == 0  # one verdict for all ranks
    for opt in optimizers:
        if ok:
            opt.step()
        opt.zero_grad(set_to_none=True)  # None, not zeros: the next backward writes instead of adds
    return loss, norm, ok


def mask_fill_counts(logits, labels, k=5):
    """BERT's held-out mask-fill accuracy, as counts: (top-1 hits, top-k hits, masked positions) of one MLM batch.
    Counts, not fractions: summed over batches and ranks, then divided once."""
    keep = labels != -100  # (B, T)
    top = logits[keep].topk(k, dim=-1).indices  # (n, k), largest first
    hit = top == labels[keep].unsqueeze(-1)  # (n, k)
    return torch.stack([hit[:, 0].sum(), hit.any(dim=-1).sum(), keep.sum()]).float()


@torch.no_grad()
def evaluate(model, draw, val_data, args, autocast, rank, world):
    """Mean val loss (+ MLM's mlm_top1/5) over fixed batches (own generator: training RNG untouched), the same for any
    world size: each rank draws all --eval-steps batches (draw: one rank's B windows) and scores every world-th."""
    model.eval()
    gen = torch.Generator().manual_seed(10_000)  # the same val batches every eval: curves compare
    total = torch.zeros(4, device=next(model.parameters()).device)  # loss sum; MLM top-1 hits, top-5 hits, masked
    for i in range(-(-args.eval_steps // world) * world):  # whole rounds: FSDP ranks must run as many forwards
        x, y = draw(val_data, gen)
        if i % world == rank:
            with autocast:
                logits = model(x)
            w = float(i < args.eval_steps)  # a padding batch weighs 0
            total[0] += cross_entropy(logits, y).float() * w
            if args.objective == "mlm":  # scored where the input is [MASK] (the last id), not at the 10% kept or 10% random
                total[1:] += mask_fill_counts(logits.float(), torch.where(x == logits.size(-1) - 1, y, -100)) * w
    model.train()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)  # the sum of every rank's share
    out = {"val_loss": (total[0] / args.eval_steps).item()}
    if args.objective == "mlm":
        out.update(mlm_top1=(total[1] / total[3]).item(), mlm_top5=(total[2] / total[3]).item())
    return out


def skip_or_stop(step, loss, norm, last_ok, skipped, args):
    """A non-finite loss or grad norm: skip the batch (--skip-nonfinite N times, as PaLM skips loss spikes),
    then stop with a one-line error, before any save: OUT/ckpt.pt keeps the last finite weights."""
    if skipped > args.skip_nonfinite:
        last = f"{all_mean(last_ok).item():.4f}" if last_ok is not None else "none"
        raise SystemExit(f"error: step {step}: loss {loss.item()}, grad norm {norm.item()} (last finite loss {last}); "
                         f"stopped before saving, {args.out_dir}/ckpt.pt is the last good state; lower --lr (now {args.lr:g})")
    log(f"step {step}: non-finite loss or grad norm, batch skipped ({skipped} of --skip-nonfinite {args.skip_nonfinite})")
    return skipped


def ppl_bpb(loss, bpt):
    """ppl = e^loss (capped: a diverged run must log, not overflow); bpb = loss / ln 2 / bytes per token."""
    return math.exp(min(loss, 50)), (loss / math.log(2) / bpt if bpt else None)


def mlm_text(ev):
    """The log line's mask-fill accuracy for MLM, "" otherwise."""
    return f" | mask-fill top-1 {ev['mlm_top1']:.3f}, top-5 {ev['mlm_top5']:.3f}" if "mlm_top1" in ev else ""


def sample_text(model, tok, val_data, args, device):
    """A sample to watch it learn; None without a tokenizer, for MLM, or under FSDP (rank 0 alone would wait forever)."""
    if tok is None or args.objective == "mlm" or args.fsdp:
        return None
    eot = tok.special_ids.get("<|endoftext|>")
    prompt = torch.tensor([[eot if eot is not None else int(val_data[0])]], device=device)
    out = generate(model, prompt, 64, temperature=0.8, top_k=50, generator=torch.Generator(device).manual_seed(args.seed))
    return tok.decode(out[0, 1:].tolist())


def train(args):
    t_start = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one process per GPU
        rank, _, world, device = parallel.setup_distributed()
        if args.fsdp and args.optimizer == "muon":
            raise SystemExit("error: --optimizer muon needs whole matrices; not supported with --fsdp")
    else:
        rank, world, device = 0, 1, pick_device(args.device)
    tok, data_vocab, train_data, val_data = load_data(args)
    H_train, H_val = unigram_entropy(train_data, data_vocab), unigram_entropy(val_data, data_vocab)  # the baselines to beat
    mask_id = data_vocab if args.objective == "mlm" else None  # MLM's [MASK]: the extra embedding row
    bpt = bytes_per_token(tok, val_data) if tok is not None and mask_id is None else None  # bits/byte: causal LM only
    # a dedicated generator for batches (and MLM masks): its state is all a resume needs to replay the data order
    batch_gen = torch.Generator().manual_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    raw_model, model, optimizers, start, wall_before = build_model(args, data_vocab, device, batch_gen, rank, world)
    metrics = os.path.join(args.out_dir, "metrics.jsonl")
    reset_metrics(metrics, start)
    draw = functools.partial(next_batch, args=args, rank=rank, world=world, device=device, mask_id=mask_id)
    val_draw = functools.partial(next_batch, args=args, rank=0, world=1, device=device, mask_id=mask_id)  # see evaluate
    # bf16 matmuls (auto: on CUDA): fp32's exponent range, so no loss scaling (unlike fp16); weights and updates stay fp32
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and str(device).startswith("cuda") and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    tokens_per_step = args.batch_size * args.context_length * args.grad_accum * world
    log(f"model: {raw_model.num_params() / 1e6:.2f}M params ({raw_model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding, "
        f"{raw_model.num_params(non_embedding=True, active=True) / 1e6:.2f}M active) | "
        f"{tokens_per_step} tokens/step | device {device} x{world} | unigram entropy {H_train:.3f} nats")  # fmt: skip

    ev, last_ok, skipped = None, None, 0
    for step in range(start + 1, args.max_steps + 1):
        lr = set_lr(optimizers, step, args)
        t0 = time.perf_counter()
        loss, norm, ok = train_step(model, optimizers, draw, train_data, batch_gen, args, autocast)
        last_ok = loss if ok else last_ok
        if not ok:  # the update was skipped on every rank: the weights are still the last finite ones
            skipped = skip_or_stop(step, loss, norm, last_ok, skipped + 1, args)
        elif step % args.log_every == 0 or step == args.max_steps:
            loss, dt = all_mean(loss).item(), time.perf_counter() - t0  # .item() waits for the GPU
            log_step(step, loss, lr, norm, dt, tokens_per_step, raw_model, args, world, device, metrics)
        if step % args.eval_every == 0 or step == args.max_steps:
            ev = evaluate(model, val_draw, val_data, args, autocast, rank, world)
            val_loss, (ppl, bpb) = ev["val_loss"], ppl_bpb(ev["val_loss"], bpt)
            log(f"eval step {step} | val loss {val_loss:.3f} | ppl {ppl:.1f}" + (f" | bpb {bpb:.3f}" if bpb else "") + mlm_text(ev),
                metrics, dict(step=step, val_loss=val_loss, val_ppl=ppl, val_bpb=bpb) | ev)  # fmt: skip
        if args.sample_every and step % args.sample_every == 0 and is_master() and (text := sample_text(raw_model, tok, val_data, args, device)) is not None:
            log("sample: " + repr(text[:300]))
        if step % args.ckpt_every == 0 or step == args.max_steps:
            save(raw_model, optimizers, step, batch_gen, args, wall_before + time.time() - t_start)

    if ev is None:  # resumed at or past max-steps: nothing ran, still report
        ev = evaluate(model, val_draw, val_data, args, autocast, rank, world)
    final = report(raw_model, ev, bpt, (H_train, H_val), tokens_per_step, wall_before + time.time() - t_start, args, metrics)
    if world > 1:
        parallel.cleanup_distributed()
    return final


def report(model, ev, bpt, entropies, tokens_per_step, wall, args, metrics):
    """Log the final line and the final metrics record (ev: the last evaluate's); returns the record."""
    tokens, val_loss = args.max_steps * tokens_per_step, ev["val_loss"]
    ppl, bpb = ppl_bpb(val_loss, bpt)
    final = dict(final=True, step=args.max_steps, val_loss=val_loss, val_ppl=ppl, val_bpb=bpb, params=model.num_params(),
                 non_embedding_params=model.num_params(non_embedding=True), tokens=tokens, flops=flops_per_token(model.cfg) * tokens,
                 unigram_entropy=entropies[0], val_unigram_entropy=entropies[1], objective=args.objective, wall_s=wall) | ev  # fmt: skip
    log(f"done: val loss {val_loss:.3f} nats (ppl {ppl:.1f}" + (f", {bpb:.3f} bits/byte" if bpb else "")
        + f") vs unigram entropy {entropies[0]:.3f} (train) / {entropies[1]:.3f} (val) nats | {args.max_steps} steps, "
        f"{tokens / 1e6:.2f}M tokens in {wall:.0f}s" + mlm_text(ev), metrics, final)  # fmt: skip
    return final


# ---------------------------------------------------------------
# 7. Sampling from a checkpoint, and the command line


def sample(args):
    if not args.ckpt:
        raise SystemExit("error: sample needs --ckpt PATH")
    device = pick_device(args.device)
    model, ckpt = load_model(args.ckpt, device)
    trained = ckpt.get("args", {})  # the training run's flags: its tokenizer is the one to decode with
    tok = load_tokenizer(args.tokenizer or trained.get("tokenizer") or os.path.join(trained.get("data") or "", "tokenizer"))
    if tok is None:
        raise SystemExit("error: no tokenizer found; pass --tokenizer DIR")
    idx = torch.tensor([tok.encode(args.prompt) or [tok.special_ids.get("<|endoftext|>", 0)]], device=device)  # (1, T)
    gen = torch.Generator(device).manual_seed(args.seed)
    try:  # --top-p 0, a negative --temperature, ...: one line, not a traceback
        out = generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                       top_p=args.top_p, min_p=args.min_p, stop_token=tok.special_ids.get("<|endoftext|>"), generator=gen)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(tok.decode(out[0].tolist()))


def _positive(text):
    """argparse type for sizes and counts: a clear error for 0 or negatives instead of a traceback."""
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def build_parser():
    d = ModelConfig()  # the model-shape defaults: `python train.py` trains ModelConfig()
    p = argparse.ArgumentParser(description="Train a Transformer LM from scratch (see the module docstring).")
    p.add_argument("command", nargs="?", default="train", choices=["train", "sample"], help="train (the default) or sample from --ckpt")
    # data and output
    p.add_argument("--data", help="dir with train.bin, val.bin and optionally tokenizer/")
    p.add_argument("--out-dir", default="out", help="where ckpt.pt and metrics.jsonl go")
    p.add_argument("--vocab-size", type=int, default=None, help="vocab size (default: from DIR/tokenizer; required without one)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: DIR/tokenizer)")
    # model
    p.add_argument("--d-model", type=_positive, default=d.d_model, help="residual stream width")
    p.add_argument("--num-layers", type=_positive, default=d.num_layers, help="Transformer blocks")
    p.add_argument("--num-heads", type=_positive, default=d.num_heads, help="attention heads")
    p.add_argument("--num-kv-heads", type=int, default=None, help="KV heads for GQA (default: --num-heads)")
    p.add_argument("--d-ff", type=int, default=None, help="FFN hidden size (default: ~8/3 d_model for SwiGLU, 4 d_model otherwise)")
    p.add_argument("--context-length", type=_positive, default=d.context_length, help="tokens per training window")
    p.add_argument("--rope-theta", type=float, default=d.rope_theta, help="RoPE base")
    p.add_argument("--tie-embeddings", action="store_true", help="share token_embeddings and lm_head")
    p.add_argument("--attn-backend", default=d.attn_backend, choices=["scratch", "sdpa", "triton"], help="attention: from-scratch math, torch SDPA, or kernels.py Triton")
    # the architecture ablations (model.CHOICES; the defaults are Llama's; GPT-2 = layernorm, learned, gelu, tied)
    p.add_argument("--norm", default=d.norm, choices=CHOICES["norm"], help="rmsnorm (Llama), layernorm (GPT-2) or none")
    p.add_argument("--norm-position", default=d.norm_position, choices=CHOICES["norm_position"], help="pre-norm, or post-norm (Vaswani et al.)")
    p.add_argument("--pos-emb", default=d.pos_emb, choices=CHOICES["pos_emb"], help="rope, sinusoidal, learned table, or none (NoPE)")
    p.add_argument("--ffn", default=d.ffn, choices=CHOICES["ffn"], help="swiglu, or a two-matrix MLP with silu / gelu / relu² (d_ff 4·d)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="residual and attention dropout in training (0 = off)")
    p.add_argument("--window", type=_positive, default=d.window, help="sliding-window attention: each token sees its last W (default: all)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward: less memory, more time")
    p.add_argument("--num-experts", type=int, default=d.num_experts, help="> 1: mixture-of-experts FFN with E experts (0: dense)")
    p.add_argument("--experts-top-k", type=_positive, default=d.experts_top_k, help="MoE: experts per token (the active ones)")
    p.add_argument("--moe-aux-coef", type=float, default=0.01, help="MoE: weight of the Switch load-balancing loss")
    p.add_argument("--objective", default="clm", choices=["clm", "mlm"], help="causal LM or masked LM (bidirectional)")
    p.add_argument("--mask-prob", type=float, default=0.15, help="MLM: fraction of positions to predict")
    # optimization
    p.add_argument("--batch-size", type=_positive, default=16, help="sequences per micro-step (per rank)")
    p.add_argument("--grad-accum", type=_positive, default=1, help="micro-steps per optimizer step")
    p.add_argument("--max-steps", type=_positive, default=300, help="optimizer steps")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"], help="muon = Muon for hidden matrices + AdamW for the rest")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--muon-lr", type=float, default=0.02, help="peak Muon learning rate")
    p.add_argument("--min-lr", type=float, default=2e-4, help="final learning rate (Muon scaled alike)")
    p.add_argument("--warmup-steps", type=int, default=30, help="linear warmup steps")
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "wsd"], help="after warmup: cosine decay, or warmup-stable-decay")
    p.add_argument("--decay-frac", type=float, default=0.2, help="wsd: decay (1-sqrt) to --min-lr over this last fraction of --max-steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay (matrices only)")
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0 = off)")
    p.add_argument("--skip-nonfinite", type=int, default=0, help="skip up to N batches whose loss or grad norm is NaN/inf, then stop")
    # evaluation, logging, checkpoints
    p.add_argument("--eval-every", type=_positive, default=100, help="eval on val every N steps (and at the end)")
    p.add_argument("--eval-steps", type=_positive, default=10, help="val batches per eval")
    p.add_argument("--log-every", type=_positive, default=1, help="print/log train loss every N steps")
    p.add_argument("--sample-every", type=int, default=100, help="print a sample every N steps (0 = off; needs a tokenizer)")
    p.add_argument("--ckpt-every", type=_positive, default=100, help="write OUT/ckpt.pt every N steps (and at the end)")
    p.add_argument("--keep-ckpts", action="store_true", help="also keep OUT/ckpt-STEP.pt for every checkpoint")
    p.add_argument("--resume", nargs="?", const="auto", default=None, help="resume from OUT/ckpt.pt (or a given path)")
    p.add_argument("--init-from", default=None, help="start from this checkpoint's weights (e.g. model.py import-hf), fresh optimizer, step 0")
    # system
    p.add_argument("--seed", type=int, default=1337, help="random seed (all ranks share one batch stream; rank r keeps slice r)")
    p.add_argument("--device", default=None, help="cuda | mps | cpu (default: autodetect)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="matmul precision (autocast); auto = bf16 on CUDA that has it")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard with torch fully_shard instead of DDP")
    # sampling: python train.py sample --ckpt PATH (old spelling: --sample)
    p.add_argument("--sample", action="store_true", help="same as the sample subcommand")
    p.add_argument("--ckpt", default=None, help="sample: the checkpoint to sample from")
    p.add_argument("--prompt", default="", help="sample: text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="sample: tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="sample: temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this much mass")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min-p times the top probability")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.warmup_steps >= args.max_steps:  # the lr would rise to the end and never decay
        if os.environ.get("RANK", "0") == "0":
            print(f"warning: --warmup-steps {args.warmup_steps} >= --max-steps {args.max_steps}; using {args.max_steps // 10}")
        args.warmup_steps = args.max_steps // 10
    if args.lr_schedule == "wsd" and not (0 <= args.decay_frac <= 1 and args.warmup_steps <= wsd_decay_start(args)):
        raise SystemExit(f"error: --decay-frac {args.decay_frac} must be in [0, 1] and start the decay after --warmup-steps {args.warmup_steps}")
    return sample(args) if args.command == "sample" or args.sample else train(args)


if __name__ == "__main__":
    main()
