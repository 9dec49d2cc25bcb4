"""bench.py -- every speed and memory target of the repo, each measured as a ratio against a peer in the same run.

A unit test tells you the code is right; a benchmark tells you whether it is fast, and "fast" only means something
next to a reference measured on the same machine, at the same moment, on the same input. So every number here is
printed as ours / peer with the peer's version, never as an absolute threshold. Peers are optional imports
(tiktoken, HF tokenizers, transformers, datasketch, torch's own DDP / SDPA / compile): a missing one is skipped
with the `pip install` line that brings it.

    python bench.py                      # everything that can run here (CPU: minutes)
    python bench.py --only bpe           # one group: bpe | model | kernels | parallel | data
    python bench.py --only model --device cuda --preset 124m    # the GPU targets, on a GPU

Targets (from the issues; measured numbers live in README.md with the machine they came from):
    bpe       train 133 KB / vocab 500 < 0.4 s; >=100 MB / vocab 10k <= 2x HF tokenizers, RSS <= 2 GB;
              encode >= 1.0x tiktoken MB/s (one thread)
    model     CPU fwd+bwd tok/s >= 1.0x HF LlamaForCausalLM; H100 124M bf16+compile >= 50% MFU
    kernels   FA2 fwd >= 0.9x SDPA-flash, fwd+bwd >= 0.7x; RMSNorm >= 1.0x torch.compile, >= 70% of HBM
    parallel  BucketedDDP step time <= 1.05x torch DDP on 2 gloo ranks
    data      MinHash dedup >= 5x datasketch docs/s with the same clusters
"""
import contextlib
import glob
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import data

# ---------------------------------------------------------------
# bpe.py benchmarks: training time vs HF `tokenizers`, encode MB/s vs tiktoken (same vocab, same text).
# Goals (issue 2): 133 KB / vocab 500 < 0.4 s; >=100 MB / vocab 10k <= 2x HF's wall time and
# peak RSS <= 2 GB; encode one thread >= 1.0x tiktoken.
#   python bench.py --only bpe                       # 20 MB train text (a few minutes on 2 cores)
#   python bench.py --only bpe --bpe-mb 100          # the size the issue asks for



def add_args_bpe(parser):
    parser.add_argument("--bpe-mb", type=float, default=20, help="size of the large training text, MB")
    parser.add_argument("--bpe-vocab", type=int, default=10000, help="vocab size for the large training run")
    parser.add_argument("--bpe-encode-mb", type=float, default=10, help="MB of text for the encode speed test")
    parser.add_argument("--bpe-workdir", default=None, help="where to write the texts (default: a temp dir)")


def _bench_docs():
    """English-ish text that is on every machine with Python: the stdlib's pydoc topics, the
    stdlib sources (code + comments + docstrings) and, if present, vim's help files."""
    import pydoc_data.topics as t
    yield from (t.topics[k] for k in sorted(t.topics))
    lib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(lib, "**", "*.py"), recursive=True))
    files = [f for f in files if "site-packages" not in f] + sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt"))
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                yield fh.read()
        except (UnicodeDecodeError, OSError):
            continue


def _write_text(path, n_bytes):
    """Documents joined by <|endoftext|> up to n_bytes; the sources repeat if they run out."""
    if os.path.exists(path) and os.path.getsize(path) >= n_bytes * 0.99:
        return path
    done = 0
    with open(path, "w", encoding="utf-8") as f:
        while done < n_bytes:
            for d in _bench_docs():
                d = d.encode("utf-8")[: n_bytes - done].decode("utf-8", "ignore") + "<|endoftext|>"
                f.write(d)
                done += len(d.encode("utf-8"))
                if done >= n_bytes:
                    break
    return path


_OURS = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import bpe
t = time.time()
vocab, merges = bpe.train_bpe({path!r}, {vocab}, ["<|endoftext|>"])
dt = time.time() - t
bpe.Tokenizer(vocab, merges, ["<|endoftext|>"]).save({out!r})
print(json.dumps(dict(s=dt, rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      rss_child=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)))
"""

_HF = """
import json, resource, time
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
tk = Tokenizer(models.BPE())
tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tr = trainers.BpeTrainer(vocab_size={vocab}, special_tokens=["<|endoftext|>"], show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
t = time.time()
tk.train([{path!r}], tr)
print(json.dumps(dict(s=time.time() - t, rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rss_child=0)))
"""


def _run(script):
    """Run a training script in a fresh process, so peak RSS is its own."""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_bpe(args):
    repo = os.path.dirname(os.path.abspath(__file__))
    if os.path.basename(repo) == ".parts":
        repo = os.path.dirname(repo)
    sys.path.insert(0, repo)
    import bpe
    try:
        import tokenizers
    except ImportError:
        tokenizers = None
        print("bpe: HF tokenizers skipped: pip install tokenizers")
    try:
        import tiktoken
    except ImportError:
        tiktoken = None
        print("bpe: tiktoken skipped: pip install tiktoken")
    mb = getattr(args, "bpe_mb", 20)
    vocab_size = getattr(args, "bpe_vocab", 10000)
    enc_mb = getattr(args, "bpe_encode_mb", 10)
    work = getattr(args, "bpe_workdir", None) or tempfile.mkdtemp(prefix="bench_bpe_")
    os.makedirs(work, exist_ok=True)

    # --- 1. small train: 133 KB, vocab 500 (goal < 0.4 s; CS336 reference 0.38 s) ---
    small = os.path.join(work, "small_133k.txt")
    with open(small, "w", encoding="utf-8") as f:
        import pydoc_data.topics as t
        text = "<|endoftext|>".join(t.topics[k] for k in sorted(t.topics))
        f.write(text.encode("utf-8")[:133_000].decode("utf-8", "ignore"))
    times = []
    for _ in range(3):
        t0 = time.time()
        bpe.train_bpe(small, 500, ["<|endoftext|>"])
        times.append(time.time() - t0)
    line = f"bpe train 133 KB vocab 500: {min(times):.3f} s (best of 3; goal < 0.4 s)"
    if tokenizers is not None:
        hf = _run(_HF.format(path=small, vocab=500))
        line += f" | HF tokenizers {tokenizers.__version__}: {hf['s']:.3f} s | ours/HF {min(times) / hf['s']:.2f}x"
    print(line, flush=True)

    # --- 2. large train: --bpe-mb MB, vocab --bpe-vocab, both in fresh processes ---
    big = _write_text(os.path.join(work, f"big_{mb:g}mb.txt"), int(mb * 1e6))
    tok_dir = os.path.join(work, "tok")
    ours = _run(_OURS.format(repo=repo, path=big, vocab=vocab_size, out=tok_dir))
    line = (f"bpe train {mb:g} MB vocab {vocab_size}: {ours['s']:.1f} s, peak RSS {ours['rss'] / 1024:.0f} MB "
            f"(largest worker {ours['rss_child'] / 1024:.0f} MB; goal <= 2 GB)")
    if tokenizers is not None:
        hf = _run(_HF.format(path=big, vocab=vocab_size))
        line += (f" | HF tokenizers {tokenizers.__version__}: {hf['s']:.1f} s, peak RSS {hf['rss'] / 1024:.0f} MB"
                 f" | ours/HF wall {ours['s'] / hf['s']:.2f}x (goal <= 2x)")
    print(line, flush=True)

    # --- 3. encode, one thread, same vocab and text, vs tiktoken built from our ranks ---
    with open(big, encoding="utf-8", newline="") as f:
        text = f.read(int(enc_mb * 1e6))
    n = len(text.encode("utf-8")) / 1e6
    enc = None
    if tiktoken is not None:
        tok = bpe.Tokenizer.load(tok_dir)
        sp = {s: tok.special_ids[s] for s in tok.special_tokens}
        enc = tiktoken.Encoding("ours", pat_str=tok.pattern, special_tokens=sp,
                                mergeable_ranks={b: i for i, b in tok.vocab.items() if i not in sp.values()})

    def mb_per_s(fn):
        t0 = time.perf_counter()
        out = fn(text)
        return out, n / (time.perf_counter() - t0)

    cold = warm = tk = 0.0  # MB/s, best of 2 interleaved runs (the machine is noisy)
    for _ in range(2):
        tok = bpe.Tokenizer.load(tok_dir)  # fresh, so the pre-token cache starts empty
        ids, r = mb_per_s(tok.encode)
        cold = max(cold, r)
        warm = max(warm, mb_per_s(tok.encode)[1])
        if enc is not None:
            ref, r = mb_per_s(lambda s: enc.encode(s, allowed_special="all"))
            tk = max(tk, r)
    line = f"bpe encode {n:.1f} MB, 1 thread: {cold:.1f} MB/s cold cache, {warm:.1f} MB/s warm"
    if enc is not None:
        line += (f" | tiktoken {tiktoken.__version__}: {tk:.1f} MB/s | ours/tiktoken {cold / tk:.2f}x cold, "
                 f"{warm / tk:.2f}x warm (goal >= 1.0x) | ids identical: {ids == ref}")
    print(line, flush=True)


# ---------------------------------------------------------------
# data.py benchmark: MinHash + LSH near-duplicate detection vs datasketch (MinHashLSH).
# Same documents, same normalization and word 5-gram shingles, same 128 permutations in 16 bands
# of 8 rows, same exact-Jaccard verification and union-find on the candidates: the clusters must
# be identical, and we report documents per second from raw text to clusters for both.



def add_args_data(parser):
    parser.add_argument("--dedup-docs", type=int, default=3000, help="documents in the MinHash benchmark")
    parser.add_argument("--dedup-words", type=int, default=300, help="words per benchmark document")


def _bench_corpus(n_docs, n_words, seed=0):
    """Zipf-ish random prose; a third of the documents are near-copies (1-3 word edits) of another."""
    rng = random.Random(seed)
    vocab = [f"word{i}" for i in range(20000)]
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    docs = []
    for i in range(n_docs):
        if docs and rng.random() < 1 / 3:
            d = docs[rng.randrange(len(docs))].split()
            for _ in range(rng.randint(1, 3)):
                d[rng.randrange(len(d))] = rng.choice(vocab)
        else:
            d = rng.choices(vocab, weights, k=n_words)
        docs.append(" ".join(d))
    return docs


def _datasketch_clusters(texts, num_hashes, num_bands, ngrams, threshold):
    """The same algorithm built from datasketch's MinHash.bulk + MinHashLSH (its fastest paths)."""
    from datasketch import MinHash, MinHashLSH
    shingles = []
    for t in texts:
        w = data.normalize_for_dedup(t).split()
        shingles.append({" ".join(w[i:i + ngrams]).encode() for i in range(max(1, len(w) - ngrams + 1))})
    sigs = MinHash.bulk([list(s) for s in shingles], num_perm=num_hashes)
    lsh = MinHashLSH(num_perm=num_hashes, params=(num_bands, num_hashes // num_bands))
    for i, m in enumerate(sigs):
        lsh.insert(i, m)
    parent = list(range(len(texts)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, m in enumerate(sigs):
        for j in lsh.query(m):
            if j > i and find(i) != find(j):
                a, b = shingles[i], shingles[j]
                if len(a & b) / len(a | b) >= threshold:
                    ri, rj = find(i), find(j)
                    parent[max(ri, rj)] = min(ri, rj)
    groups = {}
    for i in range(len(texts)):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _best_of(repeats, fn, *args):
    """(fastest wall time, result): on a shared machine the minimum is the least noisy estimate."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_data(args):
    n_docs, n_words = getattr(args, "dedup_docs", 3000), getattr(args, "dedup_words", 300)
    K, bands, n, thr = 128, 16, 5, 0.8
    texts = _bench_corpus(n_docs, n_words)
    print(f"MinHash dedup: {n_docs} docs x {n_words} words, {K} hashes, {bands} bands, {n}-grams, "
          f"Jaccard >= {thr} (best of 2 runs each)")
    t_ours, ours = _best_of(2, data.minhash_dedup_docs, texts, K, bands, n, thr)
    ours = ours[1]
    print(f"  data.py      {t_ours:7.2f} s  {n_docs / t_ours:9.0f} docs/s  {len(ours)} clusters, "
          f"{sum(len(c) - 1 for c in ours)} docs removed")
    try:
        import datasketch
    except ImportError:
        print("  datasketch   skipped: pip install datasketch")
        return
    t_ds, theirs = _best_of(2, _datasketch_clusters, texts, K, bands, n, thr)
    same = sorted(map(sorted, ours)) == sorted(map(sorted, theirs))
    print(f"  datasketch {datasketch.__version__:<6}{t_ds:5.2f} s  {n_docs / t_ds:9.0f} docs/s  {len(theirs)} clusters, "
          f"{sum(len(c) - 1 for c in theirs)} docs removed")
    print(f"  same clusters: {same} | speedup {t_ds / t_ours:.1f}x docs/s vs datasketch (goal >= 5x)")


# ---------------------------------------------------------------
# model.py benchmark: fwd+bwd tokens/s of our TransformerLM vs Hugging Face LlamaForCausalLM with
# the same config and the same weights (mapped by model.to_hf_llama), plus the logits check.
# Goals (issue 3): CPU ratio >= 1.0x; on an H100, the 124M config at T=1024 in bf16 + torch.compile
# at >= 50% MFU.
#   python bench.py --only model                                        # CPU, small config (~1 min)
#   python bench.py --only model --model-device cuda --model-preset 124m  # one GPU, bf16 + compile


PRESETS = {
    # name: (vocab_size, d_model, num_layers, num_heads, context_length, batch_size)
    "cpu": (4096, 256, 4, 4, 128, 8),
    "124m": (50304, 768, 12, 12, 1024, 16),
}


def add_args_model(parser):
    parser.add_argument("--model-device", default=None, help="model bench: cpu | cuda (default: cuda if available)")
    parser.add_argument("--model-preset", default=None, choices=sorted(PRESETS), help="model bench: config (default: cpu on CPU, 124m on GPU)")
    parser.add_argument("--model-steps", type=int, default=5, help="model bench: timed fwd+bwd steps per round")
    parser.add_argument("--model-rounds", type=int, default=3, help="model bench: interleaved timing rounds (median)")
    parser.add_argument("--model-no-compile", action="store_true", help="model bench: skip torch.compile on GPU")


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_fwd_bwd(fn, params, x, steps, device, autocast):
    """Median-free single round: ms per fwd+bwd (grads zeroed between steps, not timed)."""
    for p in params:
        p.grad = None
    with autocast:
        fn(x).float().square().mean().backward()  # warm-up (and compile, on the first call)
    _sync(device)
    t = 0.0
    for _ in range(steps):
        for p in params:
            p.grad = None
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            out = fn(x)
        out.float().square().mean().backward()
        _sync(device)
        t += time.perf_counter() - t0
    return 1000 * t / steps


def bench_model(args):
    import model as M

    device = getattr(args, "model_device", None) or getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("model: skipped: --model-device cuda but no GPU is visible")
        return
    gpu = device.startswith("cuda")
    preset = getattr(args, "model_preset", None) or ("124m" if gpu else "cpu")
    V, d, L, H, T, B = PRESETS[preset]
    steps, rounds = getattr(args, "model_steps", 5), getattr(args, "model_rounds", 3)
    torch.manual_seed(0)
    cfg = M.ModelConfig(vocab_size=V, context_length=T, d_model=d, num_layers=L, num_heads=H, attn_backend="sdpa")
    ours = M.TransformerLM(cfg).to(device)
    x = torch.randint(0, V, (B, T), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext()
    fn = ours
    if gpu and not getattr(args, "model_no_compile", False):
        fn = torch.compile(ours)
    print(f"model bench: preset {preset} (V={V}, d={d}, L={L}, H={H}, T={T}, B={B}) on {device}"
          f"{' bf16 + compile' if gpu else ' fp32, ' + str(torch.get_num_threads()) + ' threads'} | "
          f"{ours.num_params() / 1e6:.1f}M params | {M.flops_per_token(cfg) / 1e6:.0f} MFLOP/token (fwd+bwd)")

    try:
        import transformers
        from transformers import LlamaForCausalLM
    except ImportError:
        transformers = None
        print("  HF peer skipped: pip install transformers")
    hf = None
    if transformers is not None:
        hf_cfg, sd = M.to_hf_llama(ours)
        hf_cfg._attn_implementation = "sdpa"
        hf = LlamaForCausalLM(hf_cfg)
        hf.load_state_dict(sd)
        hf = hf.to(device)
        with torch.no_grad():
            a, b = ours(x[:2, :64]).float(), hf(x[:2, :64]).logits.float()
        print(f"  logits after weight mapping: max |ours - HF| = {(a - b).abs().max().item():.2e} (fp32 eager)")
        hf_fn = lambda t: hf(t).logits  # noqa: E731

    res = {"ours": [], "hf": []}
    for _ in range(rounds):  # interleave, so load changes on a shared machine hit both alike
        res["ours"].append(_time_fwd_bwd(fn, list(ours.parameters()), x, steps, device, autocast))
        if hf is not None:
            res["hf"].append(_time_fwd_bwd(hf_fn, list(hf.parameters()), x, steps, device, autocast))
    ms = statistics.median(res["ours"])
    tps = B * T / ms * 1000
    mfu = M.estimate_mfu(cfg, tps, device=device)
    line = f"  ours: {ms:.1f} ms/step, {tps / 1e3:.1f}k tok/s fwd+bwd"
    if mfu is not None:
        line += f", MFU {100 * mfu:.1f}% of {M.device_peak_flops(device) / 1e12:.0f} TFLOP/s bf16 peak (goal >= 50% on H100)"
    print(line)
    if hf is not None:
        ms_hf = statistics.median(res["hf"])
        print(f"  HF LlamaForCausalLM (transformers {transformers.__version__}, sdpa, eager): {ms_hf:.1f} ms/step, "
              f"{B * T / ms_hf:.1f}k tok/s | ours / HF throughput = {ms_hf / ms:.2f}x (goal >= 1.0x)")


# ---------------------------------------------------------------
# kernels.py: Triton RMSNorm and FlashAttention-2 vs torch eager, torch.compile and SDPA-flash.
# On a GPU: TFLOP/s, GB/s and % of peak (goals: FA2 fwd >= 0.9x SDPA-flash and fwd+bwd >= 0.7x at
# causal d=64 T=4096 bf16; RMSNorm fwd+bwd >= 1.0x torch.compile and >= 70% of HBM bandwidth).
# On a CPU the Triton timings are meaningless (interpreter), so only the PyTorch-level tiled
# attention and chunked cross-entropy are timed, against SDPA / naive / full-logits peers.


if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def add_args_kernels(parser):
    parser.add_argument("--kernels-full", action="store_true",
                        help="kernels: full-size shapes (GPU: T=4096 B=4 H=16; CPU: T=1024) instead of quick ones")


def bench_kernels(args):
    """Returns kernels.run_bench's rows: ours/peer in ms, ratio = peer / ours (> 1: we are faster)."""
    import kernels
    full = getattr(args, "kernels_full", False) or torch.cuda.is_available()  # GPU goals are stated at full size
    return kernels.run_bench(quick=not full)


# ---------------------------------------------------------------
# parallel: our BucketedDDP vs torch.nn.parallel.DistributedDataParallel, 2 gloo CPU ranks
# ---------------------------------------------------------------
# Same model, same batch, same bucket size (25 MB, first bucket 1 MB in both). Variants are timed
# in interleaved rounds (local-only, ours, torch, ours, torch, ...) so a burst of load from other
# processes hits all of them alike; we report medians. "Exposed communication" is the part of a
# step that overlap did not hide: (t_variant - t_local) / t_variant, where t_local is the very
# same step with no communication at all.



def add_args_parallel(parser):
    parser.add_argument("--parallel-rounds", type=int, default=5, help="parallel bench: interleaved timing rounds")
    parser.add_argument("--parallel-steps", type=int, default=3, help="parallel bench: steps per variant per round")
    parser.add_argument("--parallel-d-model", type=int, default=256, help="parallel bench: model width (4 layers)")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bench_worker(rank, world, port, rounds, steps, d_model, out):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    import parallel
    from model import ModelConfig, TransformerLM

    cfg = ModelConfig(vocab_size=2048, context_length=64, d_model=d_model, num_layers=4, num_heads=4)

    def fresh():
        torch.manual_seed(0)
        return TransformerLM(cfg)

    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, cfg.vocab_size, (8, 64), generator=g)
    y = torch.randint(0, cfg.vocab_size, (8, 64), generator=g)
    local = fresh()
    ours = parallel.BucketedDDP(fresh(), bucket_size_mb=25)
    # broadcast_buffers=False: by default torch re-broadcasts every buffer (here RoPE's cos/sin
    # tables, which never change) at each forward; ours does not, and that is not what we compare
    import inspect
    kw = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
          else "broadcast_buffers")   # torch 2.13 renamed it
    theirs = torch.nn.parallel.DistributedDataParallel(fresh(), bucket_cap_mb=25, **{kw: False})
    variants = {"local (no comm)": local, "ours BucketedDDP": ours, "torch DDP": theirs}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in variants.items()}

    def step(name):
        m, opt = variants[name], opts[name]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x).flatten(0, 1), y.reshape(-1)).backward()
        if name == "ours BucketedDDP":
            m.finish_gradient_synchronization()
        opt.step()

    times = {k: [] for k in variants}
    for name in variants:                 # warm-up: first-call allocations, gloo connections
        step(name)
    for _ in range(rounds):
        for name in variants:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(name)
            times[name].append((time.perf_counter() - t0) / steps * 1e3)
    if rank == 0:
        n_params = sum(p.numel() for p in local.parameters())
        out.put((n_params, {k: statistics.median(v) for k, v in times.items()}))
    dist.destroy_process_group()


def bench_parallel(args):
    rounds = getattr(args, "parallel_rounds", 5)
    steps = getattr(args, "parallel_steps", 3)
    d_model = getattr(args, "parallel_d_model", 256)
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.spawn(_bench_worker, args=(2, _free_port(), rounds, steps, d_model, q), nprocs=2, join=True)
    n_params, ms = q.get()
    print(f"parallel: TransformerLM {n_params / 1e6:.2f}M params (fp32 grads {4 * n_params / 2**20:.1f} MB), "
          f"2 gloo CPU ranks x batch 8 x T 64, bucket 25 MB; median of {rounds} rounds x {steps} steps; torch {torch.__version__}")
    for name, t in ms.items():
        print(f"  {name:18s} {t:8.1f} ms/step")
    t_local = ms["local (no comm)"]
    for name in ("ours BucketedDDP", "torch DDP"):
        print(f"  {name:18s} exposed communication {100 * max(0.0, ms[name] - t_local) / ms[name]:5.1f}% of the step")
    ratio = ms["ours BucketedDDP"] / ms["torch DDP"]
    print(f"  ours / torch DDP step time = {ratio:.3f}x (goal <= 1.05x)")
    return {"ours_ms": ms["ours BucketedDDP"], "torch_ms": ms["torch DDP"], "local_ms": t_local, "ratio": ratio}


# ---------------------------------------------------------------
# One entry point: `python bench.py [--only NAME ...]`. Each group adds its own flags (prefixed by its name).

GROUPS = {"bpe": (add_args_bpe, bench_bpe), "data": (add_args_data, bench_data), "model": (add_args_model, bench_model),
          "kernels": (add_args_kernels, bench_kernels), "parallel": (add_args_parallel, bench_parallel)}

if __name__ == "__main__":
    import argparse
    import platform
    ap = argparse.ArgumentParser(description="Every benchmark of the repo, as ratios against peers measured in the same run.")
    ap.add_argument("--only", nargs="+", choices=sorted(GROUPS), help="run only these groups (default: all)")
    for add_args, _ in GROUPS.values():
        add_args(ap)
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {gpu} | python {platform.python_version()}, torch {torch.__version__}")
    for name in args.only or list(GROUPS):
        print(f"\n=== {name} " + "=" * (60 - len(name)), flush=True)
        t0 = time.time()
        GROUPS[name][1](args)
        print(f"[{name}: {time.time() - t0:.0f} s]", flush=True)
