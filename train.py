"""
train.py -- the training loop, built from its parts.

A language model learns by next-token prediction: read a window of token ids, predict each next
id, measure the surprise (cross-entropy), step the weights downhill. Everything that makes this
work at scale is a small, separate idea, and each one is written here from scratch so you can
read it, test it against PyTorch's own version, and change it:

  1. `cross_entropy`     -- the loss, computed stably with the log-sum-exp trick.
  2. `AdamW`             -- Adam (Kingma & Ba 2014, arXiv:1412.6980) with decoupled weight decay
                            (Loshchilov & Hutter 2017, arXiv:1711.05101).
     `Muon`              -- momentum + Newton-Schulz orthogonalization for 2-D hidden weights
                            (Jordan et al. 2024, modded-nanogpt; Liu et al. 2025, arXiv:2502.16982).
  3. `lr_cosine_schedule`-- linear warmup (Goyal et al. 2017, arXiv:1706.02677), then cosine decay
                            (Loshchilov & Hutter 2016, arXiv:1608.03983).
     `clip_grad_norm`    -- rescale the whole gradient when its global L2 norm is too large.
  4. `get_batch`         -- random windows from a flat memmapped token file.
  5. checkpoints         -- everything needed for a *bitwise* resume: weights, optimizer moments,
                            step, and every random-number-generator state.
  6. the loop            -- gradient accumulation, bf16 autocast, eval (loss / perplexity / bits
                            per byte), samples, JSONL metrics, DDP / FSDP under torchrun
                            (PyTorch DDP: Li et al. 2020, arXiv:2006.15704; ZeRO/FSDP: Rajbhandari
                            et al. 2019, arXiv:1910.02054; the from-scratch versions are in parallel.py).

Three ideas carry the loop. Gradient accumulation: B sequences x --grad-accum micro-steps give
the gradient of one batch of B x accum, in the memory of B, because backward *adds* into p.grad.
Under DDP the all-reduce is linear too, so we run it once, on the last micro-step. Mixed
precision: matmuls in bf16 on CUDA (half the bytes, tensor cores), but the loss and the
optimizer's master weights and moments stay fp32. Resumability: a run killed at any moment
continues from its last checkpoint as if it had never stopped (the test checks it bit for bit).
MFU, the fraction of the chip's peak we use, is (tokens/s x FLOPs/token) / peak FLOP/s with
FLOPs/token = 6N + 12*L*d*T (Chowdhery et al. 2022, PaLM, arXiv:2204.02311, appendix B).

The objective is causal LM by default; `--objective mlm` trains a bidirectional model with
BERT-style masking (Devlin et al. 2018, arXiv:1810.04805) instead.

Run it (data dir from `python data.py` + `python bpe.py ...`, see README):
    python train.py --data data/pydocs                                 # CPU, a few minutes
    python train.py --data data/pydocs --d-model 768 --num-layers 12 --num-heads 12 \\
        --context-length 1024 --batch-size 32 --max-steps 5000 --compile   # one GPU
    torchrun --standalone --nproc_per_node 8 train.py --data data/pydocs ...   # DDP (add --fsdp to shard)
    python train.py --data data/pydocs --resume                        # continue OUT/ckpt.pt
    python train.py --sample --ckpt out/ckpt.pt --prompt "def main("   # sample from a checkpoint
    python train.py --data data/pydocs --objective mlm                 # bidirectional masked-LM encoder

Outputs in --out-dir: ckpt.pt (atomic; model, optimizer, step, config, args, every RNG state) and
metrics.jsonl, one JSON object per line:
    {"step", "loss", "lr", "ms", "tok_per_s", "mfu", "tokens"}            every --log-every steps
    {"step", "val_loss", "val_ppl", "val_bpb"}                             every --eval-every steps
    {"final": true, "step", "val_loss", "val_ppl", "val_bpb", "params", "non_embedding_params",
     "tokens", "flops", "unigram_entropy", "val_unigram_entropy", "objective", "wall_s"}   at the end
(mfu is null on CPU; val_bpb is null without a tokenizer or for MLM; entropies are in nats/token.)
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time

import numpy as np
import torch

from model import (ModelConfig, TransformerLM, estimate_mfu, flops_per_token, generate, load_model, mlm_corrupt, pick_device,
                   read_checkpoint)

# ---------------------------------------------------------------
# 1. The loss: cross-entropy with the log-sum-exp trick
# ---------------------------------------------------------------


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean of -log softmax(logits)[target] over all positions whose target != ignore_index.

    logits (..., V), targets (...). -log p_y = logsumexp(z) - z_y. Computing exp(z) directly
    overflows for large logits (exp(1000) = inf), so we subtract the row max m first:
    logsumexp(z) = m + log sum exp(z - m), where every exponent is <= 0.
    ignore_index = -100 marks positions that carry no loss (the unmasked tokens in MLM).
    """
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
# ---------------------------------------------------------------


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (arXiv:1711.05101), same update order as torch.optim.AdamW.

    Per parameter, with gradient g at step t:
        theta <- theta - lr * wd * theta               (decay, *not* folded into g: "decoupled")
        m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2
        theta <- theta - lr/(1 - b1^t) * m / (sqrt(v)/sqrt(1 - b2^t) + eps)   (bias correction)
    The bias correction undoes the zero initialization of m and v in the first steps.
    """

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

    For X = U S V^T, the odd polynomial f(X) = aX + b(XX^T)X + c(XX^T)^2 X = U f(S) V^T acts on
    the singular values only. The quintic coefficients (3.4445, -4.7750, 2.0315) are tuned to
    push every s in (0, 1] towards 1 as fast as possible in 5 steps; they do not converge exactly,
    they leave the values in a band of roughly [0.7, 1.2], which works just as well for training.
    """
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
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D hidden weight matrices only.

    update = NS(nesterov_momentum(g)): every direction of the update gets the same magnitude, so
    rare-but-useful directions are not drowned by the dominant ones. Embeddings, lm_head and
    norm gains are not "hidden linear maps" and stay with AdamW (see `build_optimizers`).
    """

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
                # an orthogonal (out, in) matrix has per-element RMS 1/sqrt(max(out, in)); the factor
                # sqrt(out/in) on tall ones makes it 1/sqrt(in) for every shape
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
# ---------------------------------------------------------------


def lr_cosine_schedule(it, max_lr, min_lr, warmup_iters, cosine_cycle_iters):
    """Linear warmup it/T_w * max_lr, cosine from max_lr down to min_lr at T_c, min_lr after.

    Warmup: Adam's second moment is noisy in the first steps, so a full-size step would be
    too big. Cosine: large steps while far from a minimum, small ones to settle into it.
    """
    if it < warmup_iters:
        return it / warmup_iters * max_lr
    if it > cosine_cycle_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, cosine_cycle_iters - warmup_iters)  # 0 -> 1
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


@torch.no_grad()
def clip_grad_norm(params, max_norm, eps=1e-6):
    """If ||g||_2 over *all* grads exceeds max_norm, scale every grad by max_norm/(||g|| + eps).

    One global norm (not per tensor) keeps the update direction; only its length is capped, so a
    single bad batch cannot throw the weights far away. Returns the norm before clipping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = [g.detach().float().norm() for g in grads]
    # under FSDP each grad is a sharded DTensor; full_tensor() sums the shards' squares across ranks
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    total = torch.stack(norms).norm()
    coef = (max_norm / (total + eps)).clamp(max=1.0)
    for g in grads:  # a sharded DTensor grad cannot be multiplied by a plain tensor: give it a float
        g.mul_(coef.to(g.device, g.dtype) if not hasattr(g, "full_tensor") else coef.item())
    return total


# ---------------------------------------------------------------
# 4. Data: random windows from a flat token file
# ---------------------------------------------------------------


def get_batch(data, batch_size, context_length, device, generator=None):
    """Sample B windows of T+1 consecutive tokens; x = first T, y = last T (shifted by one).

    data is a 1-D np.memmap of token ids: the OS pages in only the windows we touch, so a file
    bigger than RAM is fine. `generator` is a dedicated torch.Generator whose state is saved
    in checkpoints: the batch sequence then replays exactly after a resume.
    """
    T = context_length
    starts = torch.randint(len(data) - T, (batch_size,), generator=generator).tolist()  # 0..n-T-1
    x = torch.from_numpy(np.stack([data[s : s + T] for s in starts]).astype(np.int64))  # (B, T)
    y = torch.from_numpy(np.stack([data[s + 1 : s + T + 1] for s in starts]).astype(np.int64))  # (B, T)
    if str(device).startswith("cuda"):  # page-locked host memory: the copy runs async to the GPU's work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def load_tokens(path, vocab_size):
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found (run data.py and bpe.py encode first)")
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32  # the contract's reader rule
    return np.memmap(path, dtype=dtype, mode="r")


def unigram_entropy(tokens, vocab_size):
    """H = -sum p log p (nats) of the token frequencies: the loss of the best model that ignores
    context. A model that has learned anything must get below it."""
    # bincount grows past minlength if some id >= vocab_size: that is how a wrong --vocab-size shows
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    if len(counts) > vocab_size:
        raise SystemExit(f"error: data has token id {len(counts) - 1} >= vocab size {vocab_size}")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def bytes_per_token(tok, tokens):
    """Average UTF-8 bytes per token on a sample, so loss can be reported in bits per byte
    (bpb = loss / ln 2 / bytes_per_token), a number comparable across tokenizers."""
    ids = np.asarray(tokens[:200_000]).tolist()
    vocab = getattr(tok, "vocab", None)
    if isinstance(vocab, dict):  # exact: sum the byte lengths of the tokens
        return sum(len(vocab[i]) for i in ids) / len(ids)
    return len(tok.decode(ids).encode("utf-8")) / len(ids)


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
# ---------------------------------------------------------------
# A resumed run must produce the very losses the uninterrupted run would have. That needs more
# than the weights: AdamW's moments and step counts (the bias correction depends on t), the step
# (it sets the learning rate), and every RNG state, above all the batch generator's, which *is*
# the data position: it decides which windows come next. We store no offset into the data file.


def unwrap(model):
    """The plain TransformerLM under DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def is_fsdp(model):
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def rng_state(batch_gen):
    """Every RNG that influences training, as plain types: weights_only=True loading refuses
    arbitrary pickles (a checkpoint from the internet cannot run code), numpy arrays included."""
    np_state = np.random.get_state()
    return {
        "batch": batch_gen.get_state(),  # the data-loader generator: the one that matters most
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state, batch_gen):
    batch_gen.set_state(state["batch"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))


def save_checkpoint(model, optimizer, iteration, out, **extra):
    """torch.save a dict of plain types. `out` is a path (written to a temp name then
    os.replace'd, so a kill mid-write never leaves a half file where the last good one was) or a file object.
    `optimizer` is one optimizer or a list (Muon + AdamW). Under FSDP every rank must call this
    (gathering the shards is collective); only rank 0 writes."""
    opts = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
        o = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(model, options=o)
        opt_sds = [get_optimizer_state_dict(model, opt, options=o) for opt in opts]
        if int(os.environ.get("RANK", 0)) != 0:  # the gather was collective; the write is rank 0's
            return
    else:
        model_sd, opt_sds = unwrap(model).state_dict(), [opt.state_dict() for opt in opts]
    raw = unwrap(model)
    ckpt = {
        "model": model_sd,
        "optimizer": opt_sds if isinstance(optimizer, (list, tuple)) and len(opts) > 1 else opt_sds[0],
        "iteration": int(iteration),
        "config": dataclasses.asdict(raw.cfg) if hasattr(raw, "cfg") else {},
        **extra,
    }
    if isinstance(out, (str, os.PathLike)):
        torch.save(ckpt, f"{out}.tmp")
        os.replace(f"{out}.tmp", out)  # atomic on POSIX: readers see the old file or the new one, never half
    else:
        torch.save(ckpt, out)


def check_config(saved, current):
    """Refuse to load weights into a model of another shape, naming the first mismatch."""
    for key, val in sorted(current.items(), key=lambda kv: kv[0] != "causal"):  # objective first: it also shifts vocab_size
        if key in saved and key != "attn_backend" and saved[key] != val:
            if key == "causal":
                obj = {True: "clm", False: "mlm"}
                raise SystemExit(f"error: checkpoint was trained with --objective {obj[saved[key]]}, not {obj[val]}")
            name = key.replace("_", "-")
            raise SystemExit(f"error: checkpoint {key}={saved[key]} but --{name} {val}")


def load_checkpoint(src, model, optimizer=None):
    """Restore model (and optimizer[s]) from `src` (path, file object or an already-read dict);
    returns the iteration. RNG states are left to the caller (see `train`)."""
    ckpt = src if isinstance(src, dict) else read_checkpoint(src)
    raw = unwrap(model)
    if hasattr(raw, "cfg") and ckpt.get("config"):
        check_config(ckpt["config"], dataclasses.asdict(raw.cfg))
    opts = optimizer if isinstance(optimizer, (list, tuple)) else ([optimizer] if optimizer is not None else [])
    opt_sds = ckpt["optimizer"] if isinstance(ckpt.get("optimizer"), list) else [ckpt.get("optimizer")]
    if opts and len(opt_sds) != len(opts):
        raise SystemExit(f"error: checkpoint has {len(opt_sds)} optimizer(s) but --optimizer needs {len(opts)}")
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
        o = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, ckpt["model"], options=o)
        for opt, sd in zip(opts, opt_sds):
            set_optimizer_state_dict(model, opt, sd, options=o)
    else:
        raw.load_state_dict(ckpt["model"])
        for opt, sd in zip(opts, opt_sds):
            opt.load_state_dict(sd)
    return int(ckpt["iteration"])


# ---------------------------------------------------------------
# 6. The training loop
# ---------------------------------------------------------------


def truncate_metrics(path, step):
    """On resume, drop records written after the checkpoint (a killed run may have logged past it)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    keep = [r for r in recs if not r.get("final") and r.get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(path + ".tmp", path)


def train(args):
    t_start = time.time()
    # --- distributed setup: one process per GPU under torchrun, plain single process otherwise
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import parallel
        rank, _, world, device = parallel.setup_distributed()
        if args.fsdp and args.optimizer == "muon":
            raise SystemExit("error: --optimizer muon needs whole matrices; not supported with --fsdp")
    else:
        rank, device = 0, pick_device(args.device)
    master = rank == 0
    # flush: a log piped to a file (or killed mid-run) must still show every finished step
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)

    # --- data, tokenizer, vocab
    if not args.data:
        raise SystemExit("error: --data DIR is required (or --sample --ckpt PATH)")
    if not os.path.isdir(args.data):
        raise SystemExit(f"error: data dir {args.data} not found (run data.py and bpe.py encode first)")
    tok = load_tokenizer(args.tokenizer or os.path.join(args.data, "tokenizer"))
    if args.vocab_size is None and tok is None:
        raise SystemExit(f"error: no tokenizer in {args.data}/tokenizer; pass --vocab-size")
    data_vocab = args.vocab_size or len(tok)
    train_data = load_tokens(os.path.join(args.data, "train.bin"), data_vocab)
    val_data = load_tokens(os.path.join(args.data, "val.bin"), data_vocab)
    for name, d in (("train", train_data), ("val", val_data)):
        if len(d) <= args.context_length + 1:
            raise SystemExit(f"error: {name}.bin has {len(d)} tokens, needs > --context-length {args.context_length}")
    H_unigram = unigram_entropy(train_data, data_vocab)  # the baseline to beat (a context-free model)
    H_unigram_val = unigram_entropy(val_data, data_vocab)
    bpt = bytes_per_token(tok, val_data) if tok is not None else None

    # --- model: MLM gets one extra embedding row, the [MASK] token, and bidirectional attention
    mlm = args.objective == "mlm"
    try:
        cfg = ModelConfig(
            vocab_size=data_vocab + (1 if mlm else 0), context_length=args.context_length, d_model=args.d_model,
            num_layers=args.num_layers, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, d_ff=args.d_ff,
            rope_theta=args.rope_theta, tie_embeddings=args.tie_embeddings, causal=not mlm, attn_backend=args.attn_backend,
        )  # fmt: skip
    except ValueError as e:  # e.g. d_model not divisible by num_heads
        raise SystemExit(f"error: {e}")
    torch.manual_seed(args.seed)  # same init on every rank
    np.random.seed(args.seed)  # nothing here draws from numpy or python's RNG; seeded and saved anyway
    random.seed(args.seed)
    raw_model = TransformerLM(cfg).to(device)
    # a dedicated generator for batches (and MLM masks): its state is all a resume needs to replay
    # the same data order. Every rank draws the same *global* batch and keeps its own slice (see
    # next_batch), so the data seen per step does not depend on how many ranks share it
    batch_gen = torch.Generator().manual_seed(args.seed)

    # --- resume: read now, load after wrapping (FSDP loads into the sharded parameters)
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    ckpt = read_checkpoint(ckpt_path if args.resume == "auto" else args.resume) if args.resume else None
    start, wall_before = 0, 0.0

    # --- wrap: compile, then DDP (bucketed all-reduce) or FSDP (sharded params, grads, moments)
    model = raw_model
    if world > 1 and args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in raw_model.layers:
            fully_shard(block)  # each block gathers its params just in time, frees them after
        fully_shard(raw_model)  # the root: embeddings, final norm and lm_head
    # optimizers after sharding: fully_shard swaps the parameters for sharded DTensors
    optimizers = build_optimizers(raw_model, args)
    params = [p for p in raw_model.parameters() if p.requires_grad]  # what clip_grad_norm sees
    if ckpt is not None:
        start = load_checkpoint(ckpt, raw_model, optimizers)
        per_rank = ckpt["rng"]["batch_per_rank"]  # every rank's batch-generator state, gathered at save
        set_rng_state({**ckpt["rng"], "batch": per_rank[rank] if len(per_rank) == world else per_rank[0]}, batch_gen)
        if len(per_rank) != world:
            batch_gen.manual_seed(args.seed + 1000 * start)  # world size changed: fresh (shared) stream
        wall_before = ckpt.get("wall_s", 0.0)
        log(f"resumed from step {start}")
    if args.compile:
        model = torch.compile(model)
    if world > 1 and not args.fsdp:  # our DDP hooks the parameters, which the compiled module shares
        model = parallel.BucketedDDP(model, bucket_size_mb=25)
    if master:
        if ckpt is not None:
            truncate_metrics(metrics_path, start)
        elif os.path.exists(metrics_path):
            os.remove(metrics_path)

    def write_metrics(rec):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    # bf16 keeps fp32's exponent range, so unlike fp16 it needs no loss scaling; autocast runs the
    # matmuls in bf16 and keeps the weights (and so the optimizer's update) in fp32
    bf16 = str(device).startswith("cuda") and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    mask_id = data_vocab  # the extra row

    def next_batch(data, gen):
        """(inputs, targets) on device. CLM: targets = next tokens. MLM: corrupt x, predict originals.
        Under torchrun each rank draws the global batch of world x B windows and keeps rows
        [rank·B, (rank+1)·B): then 2 ranks x accum 2 see exactly the batches of 1 rank x accum 4
        (what the torchrun test checks), at the price of reading world x more windows per rank."""
        n, mine = args.batch_size * world, slice(rank * args.batch_size, (rank + 1) * args.batch_size)
        if not mlm:
            x, y = get_batch(data, n, args.context_length, device, gen)  # (world·B, T) each
            return x[mine], y[mine]  # (B, T)
        x, _ = get_batch(data, n, args.context_length, "cpu", gen)  # on CPU: the mask draws use the CPU generator
        inp, labels = mlm_corrupt(x, mask_id, data_vocab, generator=gen, mask_prob=args.mask_prob)
        return inp[mine].to(device), labels[mine].to(device)

    def all_mean(t):
        if world > 1:
            torch.distributed.all_reduce(t)  # SUM works on every backend (gloo has no AVG)
            t /= world
        return t

    def ppl_bpb(loss):
        # ppl = e^loss (capped: a diverged run must log, not overflow); bpb = loss / ln 2 / bytes per token
        return math.exp(min(loss, 50)), (loss / math.log(2) / bpt if bpt and not mlm else None)

    @torch.no_grad()
    def evaluate():
        """Mean val loss over fixed batches (own generator: eval never perturbs training RNG)."""
        model.eval()
        gen = torch.Generator().manual_seed(10_000 + rank)  # the same val batches every eval: curves compare
        total = torch.zeros((), device=device)
        for _ in range(args.eval_steps):
            x, y = next_batch(val_data, gen)
            with autocast:
                total += cross_entropy(model(x), y).float()
        model.train()
        return all_mean(total / args.eval_steps).item()

    def sample_text(n=64):
        if tok is None or mlm or args.fsdp:  # FSDP: a forward on rank 0 alone would wait forever for the other shards
            return None
        eot = getattr(tok, "special_ids", {}).get("<|endoftext|>")
        prompt = torch.tensor([[eot if eot is not None else int(val_data[0])]], device=device)
        out = generate(raw_model, prompt, n, temperature=0.8, top_k=50, generator=torch.Generator(device).manual_seed(args.seed))
        return tok.decode(out[0, 1:].tolist())

    def checkpoint(step):
        states = [batch_gen.get_state()]
        if world > 1:  # rank 0 saves every rank's batch stream, so each resumes its own
            states = [None] * world
            torch.distributed.all_gather_object(states, batch_gen.get_state())
        rng = {**rng_state(batch_gen), "batch_per_rank": states}
        extra = dict(args=vars(args), rng=rng, wall_s=wall_before + time.time() - t_start)
        if master or is_fsdp(model):
            save_checkpoint(model if is_fsdp(model) else raw_model, optimizers, step, ckpt_path, **extra)
        if master and args.keep_ckpts:
            shutil.copyfile(ckpt_path, os.path.join(args.out_dir, f"ckpt-{step}.pt"))

    # --- bookkeeping for logs
    tokens_per_step = args.batch_size * args.context_length * args.grad_accum * world
    n_params, n_non_emb = raw_model.num_params(), raw_model.num_params(non_embedding=True)
    log(f"model: {n_params / 1e6:.2f}M params ({n_non_emb / 1e6:.2f}M non-embedding) | "
        f"{tokens_per_step} tokens/step | device {device} x{world} | unigram entropy {H_unigram:.3f} nats")  # fmt: skip

    val_loss = None
    for step in range(start + 1, args.max_steps + 1):
        # 1-based step, not the 0-based index: the first update then already moves (lr > 0) and the last one uses min_lr
        factor = lr_cosine_schedule(step, 1.0, args.min_lr / args.lr, args.warmup_steps, args.max_steps)
        for opt in optimizers:
            for g in opt.param_groups:  # one schedule shape, each group from its own peak (AdamW's, Muon's)
                g["lr"] = g["base_lr"] * factor
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)  # on device: no .item() per micro-step, no GPU stall
        for micro in range(args.grad_accum):
            last = micro == args.grad_accum - 1
            x, y = next_batch(train_data, batch_gen)
            # Communication is the expensive part of a distributed step, and the all-reduce is linear:
            # sum_ranks(g_1 + ... + g_k) = sum_ranks(g_1) + ... + sum_ranks(g_k). So non-final
            # micro-steps accumulate locally (no_sync) and the last one all-reduces (FSDP:
            # reduce-scatters) the accumulated grads: the same gradient for 1/k of the traffic.
            if world > 1 and args.fsdp:
                model.set_requires_gradient_sync(last)
            sync = model.no_sync() if world > 1 and not args.fsdp and not last else contextlib.nullcontext()
            with sync:
                with autocast:  # bf16 matmuls on CUDA; cross_entropy upcasts to fp32 itself
                    loss = cross_entropy(model(x), y)
                # the loss is a mean over one micro-batch and .backward() *adds* into p.grad, so
                # grad = sum_k grad(loss_k / k) = grad(mean of the k losses): B x grad_accum
                # sequences give exactly the gradient of one big batch (up to float rounding)
                (loss / args.grad_accum).backward()
            loss_sum += loss.detach().float()
        if world > 1 and not args.fsdp:
            model.finish_gradient_synchronization()  # wait for the last buckets' all-reduce
        if args.grad_clip > 0:  # after the all-reduce: every rank must clip the same gradient
            clip_grad_norm(params, args.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)  # None, not zeros: the next backward writes instead of adds

        if step % args.log_every == 0 or step == args.max_steps:
            loss_val = all_mean(loss_sum / args.grad_accum).item()  # .item() waits for the GPU
            dt = time.perf_counter() - t0
            tps = tokens_per_step / dt
            # mfu = tok/s per GPU x (6N + 12·L·d·T) FLOPs/token / peak FLOP/s; None on CPU (no peak)
            mfu = estimate_mfu(cfg, tps / world, device=device)
            lr = args.lr * factor
            mfu_s = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
            log(f"step {step}/{args.max_steps} | loss {loss_val:.3f} | lr {lr:.1e} | {dt * 1000:.0f} ms | {tps / 1e3:.1f}k tok/s | mfu {mfu_s}")
            write_metrics(dict(step=step, loss=loss_val, lr=lr, ms=dt * 1000, tok_per_s=tps, mfu=mfu, tokens=step * tokens_per_step))
        if step % args.eval_every == 0 or step == args.max_steps:
            val_loss = evaluate()
            ppl, bpb = ppl_bpb(val_loss)
            log(f"eval step {step} | val loss {val_loss:.3f} | ppl {ppl:.1f}" + (f" | bpb {bpb:.3f}" if bpb else ""))
            write_metrics(dict(step=step, val_loss=val_loss, val_ppl=ppl, val_bpb=bpb))
        if args.sample_every and step % args.sample_every == 0 and master and (text := sample_text()) is not None:
            log("sample: " + repr(text[:300]))
        if step % args.ckpt_every == 0 or step == args.max_steps:
            checkpoint(step)

    if val_loss is None:  # resumed at or past max-steps: nothing ran, still report
        val_loss = evaluate()
    wall = wall_before + time.time() - t_start
    tokens = args.max_steps * tokens_per_step
    ppl, bpb = ppl_bpb(val_loss)
    # The unigram entropy is the loss of the best model that ignores context (it only knows token
    # frequencies); getting well below it is the evidence that the model uses its context at all.
    log(f"done: val loss {val_loss:.3f} nats (ppl {ppl:.1f}" + (f", {bpb:.3f} bits/byte" if bpb else "")
        + f") vs unigram entropy {H_unigram:.3f} (train) / {H_unigram_val:.3f} (val) nats | {args.max_steps} steps, "
        f"{tokens / 1e6:.2f}M tokens in {wall:.0f}s")  # fmt: skip
    final = dict(final=True, step=args.max_steps, val_loss=val_loss, val_ppl=ppl, val_bpb=bpb, params=n_params,
                 non_embedding_params=n_non_emb, tokens=tokens, flops=flops_per_token(cfg) * tokens,
                 unigram_entropy=H_unigram, val_unigram_entropy=H_unigram_val, objective=args.objective, wall_s=wall)  # fmt: skip
    write_metrics(final)
    if world > 1:
        parallel.cleanup_distributed()
    return final


# ---------------------------------------------------------------
# 7. Sampling from a checkpoint, and the command line
# ---------------------------------------------------------------


def sample(args):
    if not args.ckpt:
        raise SystemExit("error: --sample needs --ckpt PATH")
    device = pick_device(args.device)
    model, ckpt = load_model(args.ckpt, device)
    data_dir = ckpt.get("args", {}).get("data") or ""
    tok = load_tokenizer(args.tokenizer or ckpt.get("args", {}).get("tokenizer") or os.path.join(data_dir, "tokenizer"))
    if tok is None:
        raise SystemExit("error: no tokenizer found; pass --tokenizer DIR")
    ids = tok.encode(args.prompt) or [tok.special_ids.get("<|endoftext|>", 0)]
    idx = torch.tensor([ids], device=device)
    gen = torch.Generator(device).manual_seed(args.seed)
    out = generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                   min_p=args.min_p, stop_token=tok.special_ids.get("<|endoftext|>"), generator=gen)  # fmt: skip
    print(tok.decode(out[0].tolist()))


def _positive(text):
    """argparse type for sizes and counts: a clear error for 0 or negatives instead of a traceback."""
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def build_parser():
    p = argparse.ArgumentParser(description="Train a Transformer LM from scratch (see the module docstring).")
    # data and output
    p.add_argument("--data", help="dir with train.bin, val.bin and optionally tokenizer/")
    p.add_argument("--out-dir", default="out", help="where ckpt.pt and metrics.jsonl go")
    p.add_argument("--vocab-size", type=int, default=None, help="vocab size (default: from DIR/tokenizer; required without one)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: DIR/tokenizer)")
    # model
    p.add_argument("--d-model", type=_positive, default=192, help="residual stream width")
    p.add_argument("--num-layers", type=_positive, default=4, help="Transformer blocks")
    p.add_argument("--num-heads", type=_positive, default=4, help="attention heads")
    p.add_argument("--num-kv-heads", type=int, default=None, help="KV heads for GQA (default: --num-heads)")
    p.add_argument("--d-ff", type=int, default=None, help="SwiGLU hidden size (default ~8/3 d_model)")
    p.add_argument("--context-length", type=_positive, default=128, help="tokens per training window")
    p.add_argument("--rope-theta", type=float, default=10000.0, help="RoPE base")
    p.add_argument("--tie-embeddings", action="store_true", help="share token_embeddings and lm_head")
    p.add_argument("--attn-backend", default="sdpa", choices=["scratch", "sdpa", "triton"], help="attention: from-scratch math, torch SDPA, or kernels.py Triton")
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
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay (matrices only)")
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0 = off)")
    # evaluation, logging, checkpoints
    p.add_argument("--eval-every", type=_positive, default=100, help="eval on val every N steps (and at the end)")
    p.add_argument("--eval-steps", type=_positive, default=10, help="val batches per eval")
    p.add_argument("--log-every", type=_positive, default=1, help="print/log train loss every N steps")
    p.add_argument("--sample-every", type=int, default=100, help="print a sample every N steps (0 = off; needs a tokenizer)")
    p.add_argument("--ckpt-every", type=_positive, default=100, help="write OUT/ckpt.pt every N steps (and at the end)")
    p.add_argument("--keep-ckpts", action="store_true", help="also keep OUT/ckpt-STEP.pt for every checkpoint")
    p.add_argument("--resume", nargs="?", const="auto", default=None, help="resume from OUT/ckpt.pt (or a given path)")
    # system
    p.add_argument("--seed", type=int, default=1337, help="random seed (all ranks share one batch stream; rank r keeps slice r)")
    p.add_argument("--device", default=None, help="cuda | mps | cpu (default: autodetect)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard with torch fully_shard instead of DDP")
    # sampling mode
    p.add_argument("--sample", action="store_true", help="sample from --ckpt instead of training")
    p.add_argument("--ckpt", default=None, help="checkpoint for --sample")
    p.add_argument("--prompt", default="", help="prompt for --sample")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this much mass")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min-p times the top probability")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return sample(args) if args.sample else train(args)


if __name__ == "__main__":
    main()
