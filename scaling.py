"""Scaling laws: how big a model to train, on how many tokens, for a given compute budget.

The question. You have C floating-point operations to spend. A bigger model (N parameters) learns more per token
but costs more FLOPs per token, so it sees fewer tokens (D ~= C / 6N). Which split of C gives the lowest loss?
Kaplan et al. (2020, arXiv:2001.08361) found loss to be a smooth power law in N, D and C and concluded
N_opt ~ C^0.73: spend compute on the model. Hoffmann et al. ("Chinchilla", 2022, arXiv:2203.15556) gave every run
a cosine schedule as long as the run itself (Kaplan's fixed long schedule penalised the short-data runs) and found
N_opt ~ C^0.5: N and D grow together, ~20 tokens per parameter, and most large models of the time were
undertrained. Chinchilla estimates the exponent a (N_opt ~ C^a) three ways:
  approach 1  fix N, vary D (here: WSD decay branches); the lower envelope of the loss curves gives N_opt(C).
  approach 2  IsoFLOP profiles: at each fixed C train several N, fit loss vs log N with a parabola, take its
              minimum N_opt(C); then fit log N_opt = a log C + k.
  approach 3  fit L(N, D) = E + A/N^alpha + B/D^beta to every run, solve for the optimum.
The paper gets a = 0.50, 0.49, 0.46. Besiroglu et al. (2024, arXiv:2404.10102) refit approach 3 from the paper's own
data and found the published fit inconsistent with the other two and its confidence intervals implausibly narrow;
their lesson (fit so the optimizer can converge, then bootstrap) is why every number here comes with a CI.

This file does the whole loop at toy scale: 1. FLOP accounting (C ~= 6ND, our exact count, where 6ND is off);
2. reading runs (our sweep's JSONL or any published CSV/JSONL); 3-5. approaches 1-3 (2 and 3 with bootstrap
CIs); 6. sweeps that drive train.py; 7. the fit reports.

Run it on CPU (byte-level pydocs; the README's sweep, its cost measured there). Each budget gets the
sizes that bracket its optimum; the sweep is resumable, so several invocations fill one results.jsonl:
    python scaling.py flops --vocab-size 256 --context-length 64   # exact FLOPs vs 6ND table
    python data.py                                                  # -> data/pydocs/{train,val}.txt
    python scaling.py bytes --text data/pydocs --out data/pydocs-bytes   # vocab-256 token files
    S="python scaling.py sweep --data data/pydocs-bytes --vocab-size 256 --out-dir runs/scaling"
    $S --budgets 3e10 --sizes 8 12 16 24 32 48
    $S --budgets 1e11 --sizes 12 16 24 32 48
    $S --budgets 3e11 --sizes 16 24 32 48 64
    python scaling.py fit --runs runs/scaling/results.jsonl --target 1e12   # -> d_model to train
    $S --budgets 1e12 --sizes 48 --results runs/scaling/verify.jsonl       # check the prediction
    python scaling.py fit --runs published.csv --target 5.76e23   # any CSV/JSONL: N, D or C, loss
    python scaling.py approach1    # 7 sizes x 5 WSD branches on data/pydocs-bytes (rerun: refit)
One GPU, BPE data, bigger models:
    python scaling.py sweep --data data/pydocs --device cuda --context-length 256 --batch-size 64 \
        --head-dim 64 --num-layers 4 --sizes 128 192 256 384 512 --budgets 1e15 3e15 1e16 --fit
"""
import argparse
import csv
import hashlib
import io
import itertools
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

from model import ModelConfig, count_params

ROOT = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------
# 1. FLOP accounting
#
# A matmul (m, k) @ (k, n) costs 2mkn FLOPs (a multiply and an add per term), so per token a weight matrix with P
# entries costs 2P and a forward pass 2N. The backward does two matmuls per forward one (grads w.r.t. input and
# weight): 4N. Training is 6N per token, C = 6ND, the rule both papers budget with. Where it is off (`flops` shows):
#   * Attention scores. QK^T and AV have no parameters, yet each costs 2*T*d per token and layer (T = keys attended
#     to): 12*L*d*T per training token for the full T x T square (PaLM's 6N + 12LdT), ~half that for a causal kernel.
#     Against the body's 6N ~ 72*L*d^2 that is T/(6d) extra: negligible at d_model 4096, tens of percent at 16-64.
#   * Embeddings. A token-embedding lookup is a gather, not a matmul, so Kaplan leaves it out of N; the lm_head
#     (d_model x vocab) is a real matmul and stays in. For small models with a big vocabulary the lm_head IS most
#     of N, and 6 * N_total (Chinchilla counts every parameter) overstates the cost ~2x (the exact/6N_tot column).
#   * RMSNorm gains cost O(d), not 2 FLOPs each: we leave them out (model.flops_per_token keeps them in its 6N).

def forward_flops_per_token(cfg: ModelConfig, causal=True):
    """Exact matmul FLOPs of one forward pass per token (norms, softmax, SiLU ignored: O(d) each): 2 per matmul
    weight, plus QK^T and AV. causal=True counts unmasked keys only, a causal flash kernel's work (query t sees t
    keys: (T+1)/2 on average); causal=False the full square, as FlopCounterMode and model.flops_per_token do."""
    L, d, T = cfg.num_layers, cfg.d_model, cfg.context_length
    matmul_params = count_params(cfg, non_embedding=True) - (2 * L + 1) * d   # minus ln1, ln2, ln_final
    t_att = (T + 1) / 2 if causal else T
    return 2 * matmul_params + L * (2 + 2) * t_att * d                       # + QK^T and AV


def train_flops_per_token(cfg: ModelConfig, causal=True):
    """Forward + backward = 3x forward (the backward does two matmuls per forward matmul)."""
    return 3 * forward_flops_per_token(cfg, causal)


def flops_table(vocab_size=4096, context_length=256):
    """Exact training FLOPs/token vs 6N, 6N_total: d_model 16 (attention, lm_head dominate) to 4096 (6N within 1%)."""
    rows = []
    for d, L in [(16, 2), (32, 2), (64, 2), (128, 4), (256, 4), (512, 8), (768, 12), (2048, 24), (4096, 32)]:
        cfg = ModelConfig(vocab_size=vocab_size, context_length=context_length, d_model=d, num_layers=L,
                          num_heads=max(1, d // 64))
        N, N_total = count_params(cfg, non_embedding=True), count_params(cfg)
        exact, full = train_flops_per_token(cfg), train_flops_per_token(cfg, causal=False)
        rows.append({"d_model": d, "layers": L, "N": N, "N_total": N_total, "exact": exact,
                     "exact/6N": exact / (6 * N), "full/6N": full / (6 * N), "exact/6N_total": exact / (6 * N_total)})
    return rows


def print_flops_table(vocab_size, context_length):
    """The `flops` command: the table above, one row per size."""
    print(f"training FLOPs per token, vocab {vocab_size}, context {context_length} "
          f"(N = non-embedding params; lm_head counted, token embedding not)")
    print(f"{'d_model':>7} {'layers':>6} {'N':>14} {'N_total':>14} {'exact':>14} "
          f"{'exact/6N':>9} {'full/6N':>8} {'exact/6N_tot':>12}")
    for r in flops_table(vocab_size, context_length):
        print(f"{r['d_model']:>7} {r['layers']:>6} {r['N']:>14,} {r['N_total']:>14,} "
              f"{r['exact']:>14,.0f} {r['exact/6N']:>9.3f} {r['full/6N']:>8.3f} {r['exact/6N_total']:>12.3f}")
    print("exact = causal attention (unmasked keys only); full = the whole T x T square, as model.flops_per_token counts it")


# ---------------------------------------------------------------
# 2. Reading runs: our sweep's results.jsonl, or any published table (CSV or JSONL)
#
# Columns: N (parameters), loss, and D (tokens) or C (FLOPs); the missing one comes from C = 6ND. An optional "budget"
# column names the IsoFLOP group (our sweep writes one). Without it we infer the groups from C, which published tables
# often jitter (C = 6ND from rounded N and D): rounding C to 2 digits would split a budget wherever it straddles a
# rounding edge, giving spurious 3-point IsoFLOP minima and a confident wrong exponent, so we cluster log C instead.

BUDGET_TOL = 0.05   # decades: runs whose C differ by < 12% (with no bigger gap between) share a budget


def load_runs(path):
    """Return dict of numpy arrays N, D, C, loss, budget (one entry per run)."""
    if not os.path.exists(path):
        raise SystemExit(f"error: no such file: {path}")
    with open(path) as f:
        rows = list(csv.DictReader(f)) if path.endswith(".csv") else [json.loads(l) for l in f if l.strip()]
    vals = []
    for i, r in enumerate(rows):
        r = {k.strip(): v for k, v in r.items()}
        N, D, C, loss, budget = (_number(r, k, f"{path} row {i + 1}") for k in ("N", "D", "C", "loss", "budget"))
        if N is None or loss is None or (D is None and C is None):
            raise SystemExit(f"error: {path} row {i + 1}: need columns N, loss and D or C")
        D = D if D is not None else C / (6 * N)
        C = C if C is not None else 6 * N * D
        vals.append((N, D, C, loss, budget or math.nan))
    runs = dict(zip(("N", "D", "C", "loss", "budget"), np.array(vals, dtype=np.float64).reshape(-1, 5).T))
    missing = np.isnan(runs["budget"])
    if missing.any():
        runs["budget"][missing] = isoflop_budgets(runs["C"][missing])
    return runs


def _number(row, key, where):
    """row[key] as a float; None when the column is missing or empty; a one-line error if not a number."""
    if row.get(key) in (None, ""):
        return None
    try:
        return float(row[key])
    except (TypeError, ValueError):
        raise SystemExit(f"error: {where}: {key} = {row[key]!r} is not a number")


def isoflop_budgets(C, tol=BUDGET_TOL):
    """Group runs by C: sort log10 C, start a new budget at each gap over `tol` decades, named by its median C."""
    order = np.argsort(C)
    group = np.concatenate([[0], np.cumsum(np.diff(np.log10(C[order])) > tol)])
    budget = np.empty_like(C)
    for g in np.unique(group):
        budget[order[group == g]] = np.median(C[order[group == g]])
    return budget


def _subset(runs, idx):
    return {k: v[idx] for k, v in runs.items()}


# ---------------------------------------------------------------
# 3. Approach 1: the lower envelope of the loss curves
#
# Train each size N to several token counts D; at every compute C the size with the lowest loss is N_opt(C), and
# D_opt(C) = C / (FLOPs per token of N_opt). No form for L(N, D), no parabola; but each D must be a full schedule
# of that length (a cosine run's loss mid-run is not a shorter run's loss), which WSD branches make cheap
# (`approach1_sweep`). A size's loss is interpolated linearly in log D (= log C + const at fixed N), never
# extrapolated. N_opt can only be a size we trained, so it climbs in steps; its slope still estimates the exponent.

def approach1(runs, n_grid=40):
    """runs: N, D, loss (and C, else 6ND) -> {"a", "b", "log_k_N", "log_k_D", "points"}. At each of n_grid
    log-spaced C the sizes reaching C compete; a winner counts only if flanked by smaller and larger
    competitors (at the edge the optimum may lie beyond the sizes tried: approach 2's bracketing rule)."""
    N, D, loss = (np.asarray(runs[k], dtype=np.float64) for k in ("N", "D", "loss"))
    C = np.asarray(runs["C"], dtype=np.float64) if "C" in runs else 6 * N * D
    sizes, order = np.unique(N), np.argsort(C)
    curves = [(np.log(C[order][N[order] == n]), loss[order][N[order] == n], (C / D)[N == n][0]) for n in sizes]
    points = []                                                    # curves: (log C ascending, loss, FLOPs/token)
    for lc in np.linspace(min(c[0][0] for c in curves), max(c[0][-1] for c in curves), n_grid):
        reach = [i for i, c in enumerate(curves) if c[0][0] <= lc <= c[0][-1]]
        ls = [np.interp(lc, curves[i][0], curves[i][1]) for i in reach]
        if 0 < (j := int(np.argmin(ls)) if ls else 0) < len(reach) - 1:
            points.append({"C": math.exp(lc), "N_opt": sizes[reach[j]], "D_opt": math.exp(lc) / curves[reach[j]][2], "loss": ls[j]})
    if len(points) < 2:
        raise SystemExit("error: approach 1 needs >= 2 compute values where >= 3 sizes overlap and a middle one wins")
    x = np.log([p["C"] for p in points])
    a, kN = np.polyfit(x, np.log([p["N_opt"] for p in points]), 1)   # log N_opt = a log C + kN
    b, kD = np.polyfit(x, np.log([p["D_opt"] for p in points]), 1)   # log D_opt = b log C + kD
    return {"a": a, "b": b, "log_k_N": kN, "log_k_D": kD, "points": points}


# ---------------------------------------------------------------
# 4. Approach 2: IsoFLOP profiles
#
# At fixed C, loss vs log N is a valley: too small a model underfits, too big a model sees too few tokens. Near
# the bottom the valley is close to a parabola in log N, so we fit
#     loss = p0 (log N)^2 + p1 log N + p2,   log N_opt = -p1 / (2 p0)
# and across budgets log N_opt = a log C + k is a straight line whose slope a is the exponent. Approach 2 assumes
# no form for L(N, D), its strength; its weakness: each minimum rests on a handful of noisy runs (the bootstrap's job).

def isoflop_minimum(N, D, loss, window=2):
    """Parabola fit of loss vs log N at one budget -> (N_opt, D_opt, coefficients, N range) or None.
    Only the best size and its `window` nearest sizes on each side enter the fit: the valley is asymmetric (steeper
    on the small-N side), so a parabola through far-away sizes misplaces the bottom (README: by how much)."""
    x = np.log(N)
    ux = np.unique(x)                                   # distinct sizes (a budget may repeat one)
    j = np.searchsorted(ux, x[np.argmin(loss)])
    near = ux[max(0, j - window):j + window + 1]        # the best size and its neighbours
    if len(near) < 3:                                   # a parabola needs three distinct sizes
        return None
    m = np.isin(x, near)
    p = np.polyfit(x[m], loss[m], 2)
    if p[0] <= 0:                       # no valley: the sizes do not bracket the optimum
        return None
    x_opt = -p[1] / (2 * p[0])
    if not x[m].min() <= x_opt <= x[m].max():  # a minimum outside the sampled sizes is extrapolation
        return None
    # At fixed C, D is a function of N: fit log D linearly in log N rather than assume 6ND, so exact-FLOP budgets work.
    q = np.polyfit(x, np.log(D), 1)
    return math.exp(x_opt), math.exp(np.polyval(q, x_opt)), p, np.exp([x[m].min(), x[m].max()])


def isoflop_fit(runs):
    """One pass of approach 2 -> ((a, kN, b, kD, g, kL), per-budget minima); (None, minima) if < 2
    budgets have a minimum. Each minimum is (C, N_opt, D_opt, parabola, N range)."""
    per_budget = [(c, isoflop_minimum(*(runs[k][runs["budget"] == c] for k in ("N", "D", "loss"))))
                  for c in np.unique(runs["budget"])]
    mins = [(c, *res) for c, res in per_budget if res is not None]
    if len(mins) < 2:
        return None, mins
    logC = np.log([m[0] for m in mins])
    a, kN = np.polyfit(logC, np.log([m[1] for m in mins]), 1)   # log N_opt = a log C + kN
    b, kD = np.polyfit(logC, np.log([m[2] for m in mins]), 1)   # log D_opt = b log C + kD
    # The valley floors give a loss forecast too: log L_opt = g log C + kL (a pure power law,
    # no irreducible term -- fine over a decade or two, wrong in the limit; approach 3 has E).
    g, kL = np.polyfit(logC, np.log([np.polyval(m[3], math.log(m[1])) for m in mins]), 1)
    return (a, kN, b, kD, g, kL), mins


def _ci(v):
    """The central 95% interval of bootstrap values (NaNs when no resample succeeded)."""
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else [math.nan] * 2


def approach2(runs, n_boot=200, seed=0, targets=()):
    """Fit N_opt ~ C^a, D_opt ~ C^b and L_opt ~ C^g across IsoFLOP budgets, bootstrap CIs -> {"budgets": [minima],
    "a", "b", "a_ci", "b_ci", "log_k_N", "log_k_D", "loss_exponent", "log_k_L", "predict": {target: {N_opt, N_ci,
    D_opt, D_ci, loss, loss_ci}}}."""
    groups = [np.flatnonzero(runs["budget"] == c) for c in np.unique(runs["budget"])]   # run indices per budget
    if (few := sum(len(np.unique(runs["N"][g])) < 3 for g in groups)) > len(groups) / 2:
        print(f"warning: {few} of {len(groups)} budgets have fewer than 3 model sizes, too few for a "
              f"parabola; if their C values are jittered, add a budget column naming each run's IsoFLOP group")
    params, mins = isoflop_fit(runs)
    if params is None:
        raise SystemExit("error: approach 2 needs >= 2 budgets whose sizes bracket a loss minimum")
    # Why bootstrap: a, b come out of a chain of fits (parabola per budget, then a line through ~5 minima) with no
    # textbook error formula. So we resample runs with replacement *within each budget* (each keeps its size), refit
    # the whole chain and read 95% CIs off the refits' spread: crude, but honest about how little noisy runs pin down.
    rng = np.random.default_rng(seed)
    resamples = (np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups]) for _ in range(n_boot))
    fits = [isoflop_fit(_subset(runs, idx))[0] for idx in resamples]
    boots = np.array([p for p in fits if p is not None]).reshape(-1, 6)   # (n_boot that found >= 2 minima, 6 params)
    a, kN, b, kD, g, kL = params
    out = {"budgets": [{"C": float(c), "N_opt": n, "D_opt": d, "parabola": p.tolist(), "N_range": r.tolist(),
                        "loss": float(np.polyval(p, math.log(n)))} for c, n, d, p, r in mins],
           "a": a, "b": b, "log_k_N": kN, "log_k_D": kD, "loss_exponent": g, "log_k_L": kL,
           "a_ci": _ci(boots[:, 0]), "b_ci": _ci(boots[:, 2]), "n_boot": len(boots), "predict": {}}
    for C in targets:
        lc = math.log(C)
        # each bootstrap refit predicts at C; the spread of those predictions is the CI
        n_b, d_b, l_b = (np.exp(boots[:, i] * lc + boots[:, i + 1]) for i in (0, 2, 4))
        out["predict"][C] = {"N_opt": math.exp(a * lc + kN), "N_ci": _ci(n_b),
                             "D_opt": math.exp(b * lc + kD), "D_ci": _ci(d_b),
                             "loss": math.exp(g * lc + kL), "loss_ci": _ci(l_b)}
    return out


# ---------------------------------------------------------------
# 5. Approach 3: the parametric loss L(N, D) = E + A / N^alpha + B / D^beta
#
# E is the irreducible loss (entropy of text), A/N^alpha the penalty for a finite model, B/D^beta for finite data.
# Following Chinchilla we fit in log space: with A = e^a, B = e^b, E = e^e,
#     log L = LSE(a - alpha log N, b - beta log D, e)         (LSE = log-sum-exp)
# which keeps A, B, E positive and makes residuals relative (a 1% miss costs the same at loss 4 as at loss 1). The
# objective is a Huber loss on the log-loss residuals, *summed* over runs (why summed: see _lbfgs); delta = 1e-3 is
# quadratic below a 0.1% miss and linear beyond, so a diverged or mislogged run pulls with bounded force, not
# squared. The problem is non-convex with long flat valleys (A and alpha trade off), so L-BFGS polishes the best few
# points of Chinchilla's whole init grid, scored in one vectorized pass.

HUBER_DELTA = 1e-3
INIT_GRID = {"e": np.arange(-1.0, 1.01, 0.5), "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0),
             "alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5)}   # Chinchilla's grid, 4500 starts


def huber(r, delta=HUBER_DELTA):
    """0.5 r^2 for |r| <= delta, delta (|r| - delta/2) beyond: quadratic core, linear tails."""
    ar = r.abs() if torch.is_tensor(r) else np.abs(r)
    return (ar <= delta) * 0.5 * r ** 2 + (ar > delta) * delta * (ar - 0.5 * delta)


def log_loss_pred(theta, logN, logD):
    """theta = (e, a, b, alpha, beta) -> predicted log L for each run (torch or numpy)."""
    e, a, b, alpha, beta = theta
    if torch.is_tensor(logN):
        terms = torch.stack([a - alpha * logN, b - beta * logD, e.expand_as(logN)])
        return torch.logsumexp(terms, dim=0)
    return np.logaddexp(np.logaddexp(a - alpha * logN, b - beta * logD), e)


def _lbfgs(theta0, logN, logD, logL, max_iter=500):
    """Polish one starting point with L-BFGS (float64, strong-Wolfe line search)."""
    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        # Summed, not averaged: L-BFGS stops on *absolute* tolerances, and with delta = 1e-3 each run adds only
        # ~delta * |r| ~ 1e-5. Dividing that by the number of runs shrinks objective and gradient toward the
        # tolerances, and L-BFGS stops long before converging (the pitfall Besiroglu et al. found in the original fit).
        loss = huber(log_loss_pred(theta, logN, logD) - logL).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return theta.detach().numpy(), closure().item()   # the objective at the final theta


def fit_parametric(N, D, loss, top_k=8, inits=None):
    """Fit (E, A, B, alpha, beta) -> dict. `inits` overrides the grid (used by the bootstrap)."""
    logN, logD, logL = (torch.tensor(np.log(v), dtype=torch.float64) for v in (N, D, loss))
    if inits is None:
        grid = np.array(list(itertools.product(*INIT_GRID.values())))        # (4500, 5)
        # Vectorized objective for every grid point at once: (G, 1) params x (1, R) runs.
        pred = log_loss_pred(grid.T[:, :, None], np.log(N)[None], np.log(D)[None])  # (G, R)
        score = huber(pred - np.log(loss)[None]).sum(1)
        inits = grid[np.argsort(score)[:top_k]]
    polished = (_lbfgs(theta0, logN, logD, logL) for theta0 in inits)
    theta, obj = min((r for r in polished if np.all(np.isfinite(r[0]))), key=lambda r: r[1])   # best finite fit
    e, a, b, alpha, beta = theta
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": float(alpha),
            "beta": float(beta), "objective": obj, "theta": theta.tolist()}


def predict_loss(fit, N, D):
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    return fit["E"] + fit["A"] / np.power(N, fit["alpha"]) + fit["B"] / np.power(D, fit["beta"])


def compute_optimal(fit, C):
    """Minimize L(N, C/6N) over N in closed form -> (N_opt, D_opt). With D = C/(6N), dD/dN = -D/N, so dL/dN = 0
    reads alpha A / N^alpha = beta B / D^beta (at the optimum 1% more N buys as much loss as 1% more D). Substituting:
        N^(alpha+beta) = (alpha A / (beta B)) (C/6)^beta, i.e. with G = (alpha A / (beta B))^(1/(alpha+beta)),
        N_opt = G (C/6)^(beta/(alpha+beta)),   D_opt = C/(6 N_opt) = G^-1 (C/6)^(alpha/(alpha+beta)).
    So N_opt ~ C^a with a = beta/(alpha+beta), the same exponent approach 2 measures. (This uses C = 6ND; with exact
    FLOPs per token slightly above 6N the true optimum is a few percent smaller, well inside any CI we can afford.)"""
    A, B, al, be = fit["A"], fit["B"], fit["alpha"], fit["beta"]
    G = (al * A / (be * B)) ** (1 / (al + be))                               # G = (aA/bB)^(1/(a+b))
    return G * (C / 6) ** (be / (al + be)), (C / 6) ** (al / (al + be)) / G  # N_opt, D_opt


def approach3(runs, n_boot=100, seed=0, targets=()):
    """Parametric fit on all runs + bootstrap CIs for the parameters and the allocation. Unlike approach 2, it uses
    every run (not just those near a minimum) and predicts the loss at any (N, D): what a held-out run checks."""
    fit = fit_parametric(runs["N"], runs["D"], runs["loss"])
    # Why bootstrap: five parameters from ~25 runs on a flat, non-convex surface, where the curvature at the optimum
    # is a poor guide to how far the fit could move (Chinchilla's own intervals proved implausibly narrow).
    # Resampling runs and refitting gives a CI on every derived quantity (N_opt at each target), no error propagation.
    rng = np.random.default_rng(seed)
    keys = ["E", "A", "B", "alpha", "beta"]
    samples = {k: [] for k in keys + [f"N_opt@{C:g}" for C in targets] + [f"D_opt@{C:g}" for C in targets]}
    n = len(runs["N"])
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        # Resamples start from the full-data optimum (they only perturb it); a grid search per resample costs more.
        f = fit_parametric(runs["N"][idx], runs["D"][idx], runs["loss"][idx], inits=[fit["theta"]])
        for k in keys:
            samples[k].append(f[k])
        for C in targets:
            for k, v in zip(("N_opt", "D_opt"), compute_optimal(f, C)):
                samples[f"{k}@{C:g}"].append(v)
    fit["ci"] = {k: _ci(v) for k, v in samples.items() if v}
    fit["a"] = fit["beta"] / (fit["alpha"] + fit["beta"])
    fit["predict"] = {}
    for C in targets:
        N_opt, D_opt = compute_optimal(fit, C)
        fit["predict"][C] = {"N_opt": N_opt, "D_opt": D_opt, "loss": float(predict_loss(fit, N_opt, D_opt))}
    return fit


# ---------------------------------------------------------------
# 6. The sweep: train every (budget, size) pair with train.py
#
# Model sizes are d_model values (size_config). For each budget C the number of steps follows from the exact FLOPs:
#     steps = C / (train_flops_per_token(model) * tokens_per_step)      (or 6N with --flops 6nd)
# Each run gets its own cosine schedule ending at its last step: Chinchilla's fix to Kaplan (module docstring).

def size_config(d_model, args, vocab_size):
    """One size knob: d_model. Depth and head size stay fixed, so N ~ 12 L d^2 + V d grows with width alone: the
    simplest family in which "bigger" means one thing. -> (ModelConfig, FLOPs/token)."""
    # d_ff = 8/3 d rounded to a multiple of 8, passed to train.py explicitly: model.py's default rounds to 64 with a
    # floor of 64, which at d_model <= 48 makes the MLP jump in steps: the family stops being "the same shape, wider".
    cfg = ModelConfig(vocab_size=vocab_size, context_length=args.context_length, d_model=d_model, num_layers=args.num_layers,
                      num_heads=max(1, d_model // args.head_dim), d_ff=max(8, 8 * round(d_model / 3)))
    per_tok = 6 * count_params(cfg, non_embedding=True) if args.flops == "6nd" else train_flops_per_token(cfg)
    return cfg, per_tok


def data_vocab_size(data_dir):
    """Vocab size the way train.py sees it: len(bpe.Tokenizer.load(DATA/tokenizer))."""
    tok = os.path.join(data_dir, "tokenizer")
    if not os.path.isdir(tok):
        raise SystemExit(f"error: no tokenizer at {tok} (run data.py and bpe.py, or pass --vocab-size)")
    from bpe import Tokenizer
    return len(Tokenizer.load(tok))


def write_atomic(path, data):
    """Write PATH.tmp (str or bytes), fsync it, rename it over PATH: a killed sweep leaves the old file
    or the new one, never half of one (and after the fsync not an empty one after a power cut)."""
    with open(path + ".tmp", "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def write_byte_dataset(text_dir, out_dir):
    """train.txt/val.txt -> train.bin/val.bin of raw UTF-8 bytes (vocab 256, no tokenizer needed). Why: with a
    4096-token vocab the lm_head alone is 4096*d_model parameters, so CPU-sized models are mostly lm_head; with
    bytes the Transformer body is most of N, and a tiny budget still trains for hundreds of steps."""
    os.makedirs(out_dir, exist_ok=True)
    for split in ("train", "val"):
        src = os.path.join(text_dir, f"{split}.txt")
        if not os.path.exists(src):
            raise SystemExit(f"error: no {src} (run data.py first)")
        ids = np.fromfile(src, dtype=np.uint8).astype(np.uint16)   # contract: uint16 for V <= 65536
        write_atomic(os.path.join(out_dir, f"{split}.bin"), ids.tobytes())
        print(f"{split}: {len(ids):,} byte tokens -> {out_dir}/{split}.bin")


def read_final(metrics_path):
    """The {"final": true, ...} line of a train.py metrics.jsonl, or None if the run did not finish."""
    final = None
    for line in open(metrics_path) if os.path.exists(metrics_path) else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue                      # a half-written last line of a killed run
        if rec.get("final"):
            final = rec
    return final


# Every sweep flag that changes a run's result, apart from the budget, width and depth in its name.
TRAIN_FLAGS = ("data", "flops", "head_dim", "context_length", "batch_size", "lr", "eval_steps", "seed", "device", "train_args")


def flags_hash(args, vocab_size, keys=TRAIN_FLAGS):
    """8 hex digits of TRAIN_FLAGS in every run name: a rerun with another --lr in the same --out-dir trains anew."""
    flags = {k: getattr(args, k) for k in keys} | {"vocab_size": vocab_size}
    return hashlib.sha1(json.dumps(flags, sort_keys=True).encode()).hexdigest()[:8]


def run_name(C, d_model, args, flags):
    return f"C{C:.1e}_d{d_model}_L{args.num_layers}_{flags}"


def train_command(args, cfg, run_dir, steps):
    """The train.py command line of one sweep run: its own cosine schedule over exactly `steps`."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", args.data,
           "--out-dir", run_dir, "--d-model", str(cfg.d_model), "--num-layers", str(args.num_layers),
           "--num-heads", str(cfg.num_heads), "--d-ff", str(cfg.d_ff),
           "--context-length", str(args.context_length), "--batch-size", str(args.batch_size),
           "--max-steps", str(steps), "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
           "--warmup-steps", str(max(1, steps // 20)), "--eval-every", str(steps),
           "--eval-steps", str(args.eval_steps), "--log-every", str(max(1, steps // 5)),
           "--sample-every", "0", "--ckpt-every", str(steps), "--seed", str(args.seed), "--device", args.device]
    return cmd + (["--vocab-size", str(cfg.vocab_size)] if args.vocab_size else []) + args.train_args.split()


def run_train(cmd, run_dir, threads):
    """Run train.py (log to RUN_DIR/train.log) -> its final metrics record; a failure is a one-line error."""
    os.makedirs(run_dir, exist_ok=True)
    # Tiny models are bound by per-op overhead, not FLOPs: one thread per run stops OpenMP threads spinning (README).
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    final = read_final(os.path.join(run_dir, "metrics.jsonl"))
    if rc != 0 or final is None:
        raise SystemExit(f"error: train.py failed (exit {rc}); see {run_dir}/train.log")
    return final


def result_row(name, C, cfg, args, per_tok, final, steps):
    """One results.jsonl row. N and C are our exact counts (train.py's own "flops" uses the
    full-square attention estimate, kept as train_flops for comparison); loss is the final val loss."""
    N, N_total = count_params(cfg, non_embedding=True), count_params(cfg)
    D = final.get("tokens") or steps * args.batch_size * args.context_length
    if final.get("params") not in (None, N_total):
        print(f"  warning: train.py reports {final['params']:,} params, we count {N_total:,}")
    return {"run": name, "budget": C, "d_model": cfg.d_model, "num_layers": args.num_layers,
            "head_dim": args.head_dim, "vocab_size": cfg.vocab_size, "context_length": args.context_length,
            "N": N, "N_total": N_total, "D": D, "C": per_tok * D, "C_6ND": 6 * N * D, "loss": final["val_loss"],
            "steps": steps, "wall_s": final.get("wall_s"), "train_flops": final.get("flops")}


def open_results(path, flags):
    """The rows of a results JSONL ([] and its dir made, if new); one fit must not mix runs trained differently."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
    if {r.get("flags") for r in rows} - {flags}:
        raise SystemExit(f"error: {path} holds runs made with other training flags than these ({flags}); "
                         f"pass the same flags, or --results / --out-dir NEW")
    return rows


def sweep(args):
    """Run train.py for each (budget, size); append to results.jsonl; skip finished runs."""
    if not os.path.exists(os.path.join(ROOT, "train.py")):
        raise SystemExit("error: train.py not found next to scaling.py")
    results_path = args.results or os.path.join(args.out_dir, "results.jsonl")
    flags = flags_hash(args, V := args.vocab_size or data_vocab_size(args.data))
    results = open_results(results_path, flags)
    done = {r["run"] for r in results}
    tokens_per_step = args.batch_size * args.context_length
    plan = [(C, d) for C in args.budgets for d in args.sizes]
    spent_C, t0 = 0.0, time.time()     # FLOPs trained by *this* invocation, for the ETA
    for i, (C, d) in enumerate(plan):
        cfg, per_tok = size_config(d, args, V)
        # The budget fixes the steps (4x the model, ~4x fewer tokens); under --min-steps a run measures only warmup.
        name, steps = run_name(C, d, args, flags), int(round(C / (per_tok * tokens_per_step)))
        run_dir, tag = os.path.join(args.out_dir, name), f"[{i + 1}/{len(plan)}] {name}"
        skip = "done" if name in done else f"only {steps} steps at this budget" if steps < args.min_steps else None
        if skip:
            print(f"{tag}: {skip}, skipping")
            continue
        # A run dir with a finished metrics.jsonl (e.g. results.jsonl was deleted) is reused.
        final = read_final(os.path.join(run_dir, "metrics.jsonl"))
        if final is not None and final.get("step") == steps:
            print(f"{tag}: finished earlier, reusing its metrics.jsonl")
        else:
            spent_C += C
            print(f"{tag}: N={count_params(cfg, non_embedding=True):,} steps={steps} "
                  f"D={steps * tokens_per_step:,}", flush=True)
            final = run_train(train_command(args, cfg, run_dir, steps), run_dir, args.threads)
        results.append(result_row(name, C, cfg, args, per_tok, final, steps) | {"flags": flags})
        write_atomic(results_path, "".join(json.dumps(r) + "\n" for r in results))
        el = time.time() - t0
        left = sum(c for c, dd in plan[i + 1:] if run_name(c, dd, args, flags) not in done)
        rate = spent_C / el if spent_C else float("nan")
        print(f"  val_loss {results[-1]['loss']:.4f} | {el:.0f}s elapsed | {rate:.2e} FLOP/s | "
              f"ETA {left / rate:.0f}s", flush=True)
    return results_path


def approach1_sweep(args):
    """Per size ONE WSD run; from its checkpoint at each decay start k a branch decays to min-lr (the run's own
    decay is the longest branch). Cheap because a WSD lr is flat until its decay: the checkpoint at k *is* every
    longer run at step k (train.py's tests: bit for bit), so a branch costs only its ~k F/(1-F) decay steps.
    One approach1.jsonl row per (size, k); finished rows are skipped, a killed stable run resumes."""
    path, F, ks = os.path.join(args.out_dir, "approach1.jsonl"), args.decay_frac, sorted(args.decay_starts)
    V = args.vocab_size or data_vocab_size(args.data)
    flags = flags_hash(args, V, TRAIN_FLAGS + ("decay_frac", "warmup_steps"))
    rows = open_results(path, flags)
    wsd = ["--lr-schedule", "wsd", "--decay-frac", str(F), "--warmup-steps", str(args.warmup_steps)]
    # the branch from k lasts M steps, the fewest whose decay (train.py: the last round(F*M)) starts at or after k
    total = {k: next(m for m in itertools.count(k) if m - round(F * m) >= k) for k in ks}
    for d in args.sizes:
        (cfg, per_tok), base = size_config(d, args, V), f"d{d}_L{args.num_layers}_{flags}"
        stable, todo = os.path.join(args.out_dir, base, "stable"), [k for k in ks if f"{base}_k{k}" not in {r["run"] for r in rows}]
        final = read_final(os.path.join(stable, "metrics.jsonl"))
        if todo and (final is None or final.get("step") != total[ks[-1]]):
            print(f"{base}: N={count_params(cfg, non_embedding=True):,}, stable run of {total[ks[-1]]} steps", flush=True)
            cmd = train_command(args, cfg, stable, total[ks[-1]]) + wsd + ["--ckpt-every", str(math.gcd(*ks)), "--keep-ckpts"]
            final = run_train(cmd + ["--resume"] * os.path.exists(os.path.join(stable, "ckpt.pt")), stable, args.threads)
        for k in todo:
            run_dir, D = os.path.join(args.out_dir, base, f"branch{k}"), total[k] * args.batch_size * args.context_length
            fin = final if k == ks[-1] else run_train(train_command(args, cfg, run_dir, total[k]) + wsd + [
                "--resume", os.path.join(stable, f"ckpt-{k}.pt")], run_dir, args.threads)
            rows.append(result_row(f"{base}_k{k}", per_tok * D, cfg, args, per_tok, fin, total[k]) | {"decay_start": k, "flags": flags})
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
            print(f"  {base}_k{k}: {total[k]} steps, D={D:,}, val_loss {rows[-1]['loss']:.4f}", flush=True)
    return path


# ---------------------------------------------------------------
# 7. Fit report: both approaches, the allocation for a target budget, and a plot

def fit_report(runs_path, targets, out_dir=None, n_boot=100, seed=0, min_budget=0.0):
    """Fit both approaches, print parameters + CIs + the allocation at each target, write fit.json (pipeline.py's
    report reads it) and scaling.png. They usually disagree at toy scale: the honest output is both, with CIs."""
    runs = load_runs(runs_path)
    # Budgets of a few dozen steps measure warmup, not capacity: --min-budget drops them (a choice: report it).
    runs = _subset(runs, runs["budget"] >= min_budget)
    out_dir = out_dir or os.path.dirname(os.path.abspath(runs_path))
    print(f"{len(runs['N'])} runs, {len(np.unique(runs['budget']))} budgets, from {runs_path}")
    report = {"runs": runs_path, "n_runs": len(runs["N"]), "targets": list(targets)}
    try:
        a2 = report["approach2"] = approach2(runs, n_boot=n_boot, seed=seed, targets=targets)
        print_approach2(a2)
    except SystemExit as e:
        a2 = None
        print(f"\nApproach 2 skipped: {e}")
    if len(runs["N"]) < 5:
        raise SystemExit(f"error: {len(runs['N'])} runs; the parametric fit has 5 parameters, need >= 5")
    a3 = report["approach3"] = approach3(runs, n_boot=n_boot, seed=seed, targets=targets)
    print_approach3(a3, runs)
    if (family := print_family(runs_path, a3, targets)) is not None:
        report["family"] = family
    resid = np.log(predict_loss(a3, runs["N"], runs["D"])) - np.log(runs["loss"])
    print(f"  fit residual (log loss): rms {np.sqrt(np.mean(resid ** 2)):.4f}, max {np.abs(resid).max():.4f}")
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, "fit.json"), json.dumps(report, indent=1, default=float))
    plot(runs, a2, a3, targets, out_dir)
    return report


def print_approach2(a2):
    print("\nApproach 2 (IsoFLOP parabolas):")
    for m in a2["budgets"]:
        print(f"  C={m['C']:.2e}  N_opt={m['N_opt']:.3g}  D_opt={m['D_opt']:.3g}")
    print(f"  N_opt ~ C^a, a = {a2['a']:.3f}  95% CI [{a2['a_ci'][0]:.3f}, {a2['a_ci'][1]:.3f}]")
    print(f"  D_opt ~ C^b, b = {a2['b']:.3f}  95% CI [{a2['b_ci'][0]:.3f}, {a2['b_ci'][1]:.3f}]")
    for C, p in a2["predict"].items():
        print(f"  at C={C:.2e}: N_opt={p['N_opt']:.3g} [{p['N_ci'][0]:.3g}, {p['N_ci'][1]:.3g}]"
              f"  D_opt={p['D_opt']:.3g} [{p['D_ci'][0]:.3g}, {p['D_ci'][1]:.3g}]"
              f"  loss={p['loss']:.4f} [{p['loss_ci'][0]:.4f}, {p['loss_ci'][1]:.4f}]")


def print_approach3(a3, runs):
    print("\nApproach 3 (parametric L = E + A/N^alpha + B/D^beta):")
    for k in ("E", "A", "B", "alpha", "beta"):
        lo, hi = a3["ci"][k]
        print(f"  {k:5s} = {a3[k]:10.4g}   95% CI [{lo:.4g}, {hi:.4g}]")
    if a3["E"] < 0.01 * runs["loss"].min():
        # At toy scale every run is far above the entropy floor, so A/N^alpha + B/D^beta alone fits as well: E
        # slides to 0, where its gradient vanishes (dL/de = e^e); the bootstrap, started there, cannot move it: no CI.
        print("  note: E collapsed to ~0 -- these runs do not constrain the irreducible loss")
    print(f"  implied a = beta/(alpha+beta) = {a3['a']:.3f}")
    for C, p in a3["predict"].items():
        lo, hi = a3["ci"][f"N_opt@{C:g}"]
        print(f"  at C={C:.2e}: N_opt={p['N_opt']:.3g} [{lo:.3g}, {hi:.3g}]  D_opt={p['D_opt']:.3g}"
              f"  tokens/param={p['D_opt'] / p['N_opt']:.1f}  predicted loss={p['loss']:.4f}")


def print_family(runs_path, a3, targets):
    """The closed form assumes C = 6ND; our runs spend exact FLOPs, so for runs from our own sweep we also search
    the sweep's actual model family (its knobs are in every results.jsonl row): the width whose exact-FLOP budget
    split minimizes the fitted L(N, D), what `sweep` would train next. -> {C: best row}, or None if not our sweep's."""
    family = json.loads(open(runs_path).readline()) if runs_path.endswith(".jsonl") else {}
    if not all(k in family for k in ("vocab_size", "num_layers", "head_dim", "context_length")):
        return None
    print(f"  in the sweep's family (L={family['num_layers']}, head_dim {family['head_dim']}, "
          f"T={family['context_length']}, exact FLOPs):")
    best_rows = {}
    for C in targets:
        rows = family_table(family, a3, C)
        best = min(range(len(rows)), key=lambda j: rows[j]["loss"])
        best_rows[C] = rows[best]
        for r in rows[max(0, best - 2):best + 3]:
            print(f"    C={C:.2e} d_model={r['d_model']:4d}  N={r['N']:>9,}  D={r['D']:.3g}  "
                  f"predicted loss={r['loss']:.4f}" + ("   <- optimum" if r is rows[best] else ""))
    return best_rows


def family_table(family, fit, C, widths=range(8, 257, 4)):
    """Predicted loss of every valid width of the family when trained on exactly C FLOPs."""
    args = argparse.Namespace(flops="exact", **{k: family[k] for k in ("num_layers", "head_dim", "context_length")})
    rows = []
    for d in widths:
        H = max(1, d // args.head_dim)
        if d % H or (d // H) % 2:        # model.py needs an even head_dim (RoPE)
            continue
        cfg, per_tok = size_config(d, args, family["vocab_size"])
        N, D = count_params(cfg, non_embedding=True), C / per_tok
        rows.append({"d_model": d, "N": N, "D": D, "loss": float(predict_loss(fit, N, D))})
    return rows


def plot(runs, a2, a3, targets, out_dir):
    """IsoFLOP curves with fitted minima + N_opt vs C on log-log (PNG, or a text table)."""
    budgets = np.unique(runs["budget"])
    if (plt := pyplot()) is None:
        print("IsoFLOP table instead:")
        for c in budgets:
            pts = sorted(zip(runs["N"][runs["budget"] == c], runs["loss"][runs["budget"] == c]))
            print(f"  C={c:.2e}: " + "  ".join(f"N={n:.3g}:{l:.3f}" for n, l in pts))
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
    for c, col in zip(budgets, colors):
        m = runs["budget"] == c
        ax1.scatter(runs["N"][m], runs["loss"][m], color=col, label=f"C={c:.1e}")
        for b in [b for b in a2["budgets"] if b["C"] == c] if a2 is not None else []:
            x = np.linspace(*np.log(b["N_range"]), 50)   # only the sizes the parabola saw
            ax1.plot(np.exp(x), np.polyval(b["parabola"], x), color=col)
            ax1.plot(b["N_opt"], np.polyval(b["parabola"], np.log(b["N_opt"])), "*", color=col, ms=14, mec="k")
    ax1.set(xscale="log", xlabel="N (non-embedding params)", ylabel="val loss", title="IsoFLOP profiles")
    ax1.xaxis.set_minor_formatter(plt.NullFormatter())   # no overlapping labels
    ax1.legend(fontsize=8)
    Cs = np.logspace(np.log10(budgets.min()) - 0.3, np.log10(max([budgets.max(), *targets])) + 0.3, 50)
    if a2 is not None:
        ax2.scatter([b["C"] for b in a2["budgets"]], [b["N_opt"] for b in a2["budgets"]], color="C0", label="IsoFLOP minima")
        ax2.plot(Cs, np.exp(a2["a"] * np.log(Cs) + a2["log_k_N"]), "C0", label=f"approach 2: a={a2['a']:.2f}")
    ax2.plot(Cs, [compute_optimal(a3, C)[0] for C in Cs], "C1--", label=f"approach 3: a={a3['a']:.2f}")
    for C in targets:
        ax2.axvline(C, color="gray", lw=0.8, ls=":")
    ax2.set(xscale="log", yscale="log", xlabel="C (FLOPs)", ylabel="N_opt", title="compute-optimal N")
    save_png(fig, ax2, os.path.join(out_dir, "scaling.png"))


def approach1_report(path):
    """Fit approach 1 to approach1.jsonl, print it, write approach1_fit.json and approach1.png next to it."""
    rows, out = [json.loads(l) for l in open(path)], os.path.dirname(os.path.abspath(path))
    a1 = approach1({k: [r[k] for r in rows] for k in ("N", "D", "C", "loss")})
    print(f"\nApproach 1 ({len(rows)} branches; lower envelope, every 4th point):")
    for p in a1["points"][::4]:
        print(f"  C={p['C']:.2e}  N_opt={p['N_opt']:.3g}  D_opt={p['D_opt']:.3g}  loss={p['loss']:.4f}")
    print(f"  N_opt ~ C^a, a = {a1['a']:.3f};  D_opt ~ C^b, b = {a1['b']:.3f}")
    write_atomic(os.path.join(out, "approach1_fit.json"), json.dumps(a1, indent=1, default=float))
    if (plt := pyplot()) is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for n in sorted({r["N"] for r in rows}):
        ax.plot(*zip(*sorted((r["C"], r["loss"]) for r in rows if r["N"] == n)), "o-", ms=3, label=f"N={n:.3g}")
    ax.plot(*zip(*[(p["C"], p["loss"]) for p in a1["points"]]), "k*", label=f"envelope: a={a1['a']:.2f}, b={a1['b']:.2f}")
    ax.set(xscale="log", xlabel="C (FLOPs)", ylabel="val loss", title="approach 1: WSD decay branches")
    save_png(fig, ax, os.path.join(out, "approach1.png"))


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (and a note) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("\nmatplotlib not installed: no plot")


def save_png(fig, ax, path):
    """Legend, tight layout, PNG written atomically."""
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    write_atomic(path, png.getvalue())
    print(f"\nwrote {path}")


# ---------------------------------------------------------------
# 8. CLI

def add_train_knobs(p, out_dir, sizes, data, vocab_size):
    """The flags `sweep` and `approach1` share: what to train and how, the same for every run."""
    p.add_argument("--data", default=data, help="dir with train.bin, val.bin (and tokenizer/)")
    p.add_argument("--vocab-size", type=int, default=vocab_size, help="vocab size (None: from DATA/tokenizer)")
    p.add_argument("--out-dir", default=out_dir, help="one subdir per run + the results JSONL")
    p.add_argument("--sizes", type=int, nargs="+", default=sizes, help="d_model values")
    p.add_argument("--flops", choices=["exact", "6nd"], default="exact", help="FLOPs per token rule")
    # model and training knobs, shared by every run
    p.add_argument("--num-layers", type=int, default=2, help="depth of every model")
    p.add_argument("--head-dim", type=int, default=8, help="num_heads = d_model / head_dim")
    p.add_argument("--context-length", type=int, default=64, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (decays to lr/10)")
    p.add_argument("--eval-steps", type=int, default=40, help="val batches for the final loss")
    p.add_argument("--seed", type=int, default=0, help="seed for every run")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for each run (0 = inherit)")
    p.add_argument("--train-args", default="", help="extra flags passed to train.py verbatim")


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("flops", help="exact training FLOPs per token vs 6N")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size")
    p.add_argument("--context-length", type=int, default=256, help="tokens per sequence")
    p = sub.add_parser("bytes", help="byte-level train.bin/val.bin from a corpus dir (vocab 256)")
    p.add_argument("--text", default="data/pydocs", help="dir with train.txt and val.txt")
    p.add_argument("--out", default="data/pydocs-bytes", help="output dir for train.bin, val.bin")
    p = sub.add_parser("sweep", help="train each (budget, size) with train.py (resumable)")
    add_train_knobs(p, "runs/scaling", [16, 24, 32, 48, 64, 96], "data/pydocs", None)
    p.add_argument("--results", default=None, help="results file (default OUT_DIR/results.jsonl)")
    p.add_argument("--budgets", type=float, nargs="+", default=[3e10, 1e11, 3e11, 1e12], help="FLOP budgets")
    p.add_argument("--min-steps", type=int, default=50, help="skip runs with fewer steps (they measure warmup)")
    p.add_argument("--fit", action="store_true", help="fit the results afterwards (writes fit.json)")
    p.add_argument("--target", type=float, nargs="*", default=None, help="budgets to extrapolate to")
    p = sub.add_parser("approach1", help="per size one WSD run + decay branches, then the envelope fit (resumable)")
    add_train_knobs(p, "runs/approach1", [8, 12, 16, 24, 32, 48, 64], "data/pydocs-bytes", 256)
    p.add_argument("--decay-starts", type=int, nargs="+", default=[100, 200, 400, 800, 1600], help="steps where branches decay")
    p.add_argument("--decay-frac", type=float, default=0.2, help="each branch decays over this last fraction of its steps")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warmup of the stable runs")
    p = sub.add_parser("fit", help="fit approaches 2 and 3 to a results file (CSV or JSONL)")
    p.add_argument("--runs", required=True, help="results.jsonl from sweep, or CSV/JSONL: N, D|C, loss")
    p.add_argument("--target", type=float, nargs="+", default=None, help="budgets to extrapolate to")
    p.add_argument("--out-dir", default=None, help="where fit.json and scaling.png go (default: next to runs)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for CIs")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--min-budget", type=float, default=0.0, help="ignore runs of smaller budgets")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.cmd == "flops":
        print_flops_table(args.vocab_size, args.context_length)
    elif args.cmd == "bytes":
        write_byte_dataset(args.text, args.out)
    elif args.cmd == "approach1":
        approach1_report(approach1_sweep(args))
    elif args.cmd == "sweep":
        path = sweep(args)
        if args.fit:
            fit_report(path, args.target or [10 * max(args.budgets)], args.out_dir)
    else:
        targets = args.target or [10 * float(load_runs(args.runs)["C"].max())]
        fit_report(args.runs, targets, args.out_dir, n_boot=args.bootstrap, seed=args.seed, min_budget=args.min_budget)


if __name__ == "__main__":
    main()
