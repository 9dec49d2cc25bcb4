"""The whole pipeline in one command: raw pages -> corpus -> tokenizer -> model -> aligned model -> report.

Each stage is one of the repo's files run as a script, exactly as you would run it by hand; this
file only chains them, skips stages whose outputs already exist (so a rerun after a crash picks
up where it stopped), times them, and writes `report.md` from the artifacts they left behind.

    python pipeline.py                 # embedded corpus, CPU: ~5.5 min on 2 quiet cores -> runs/cpu/report.md
    python pipeline.py --fresh         # redo every stage
    python pipeline.py --preset gpu    # same pipeline, 124M-class model, meant for ~1 h on one H100 (untested)
    python pipeline.py --preset gpu --url https://.../TinyStoriesV2-GPT4-train.txt   # real data instead
    python pipeline.py --preset tiny   # a smoke test (used by test_all.py), ~1-2 min
    python pipeline.py --scaling       # also run the scaling-law sweep and fit

The report is generated, never hand-written: every number in it is read from a stage's output
(stats.json, metrics.jsonl, eval.json, ...).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>"]

# ---------------------------------------------------------------
# Presets: one dict of extra flags per stage. Everything else is each script's own default.

PRESETS = {
    "cpu": {
        "data": [],
        "bpe": ["--vocab-size", "4096"],
        "train": [],
        "align": [],
    },
    "tiny": {
        "data": ["--modules", "json,textwrap,string,csv,base64,difflib"],
        "bpe": ["--vocab-size", "512"],
        "train": ["--max-steps", "20", "--d-model", "64", "--num-layers", "2", "--num-heads", "2",
                  "--context-length", "128", "--batch-size", "8", "--eval-every", "10", "--eval-steps", "2"],
        "align": ["--tiny"],
    },
    "gpu": {
        "data": [],
        "bpe": ["--vocab-size", "8192"],
        "train": ["--d-model", "768", "--num-layers", "12", "--num-heads", "12",
                  "--context-length", "1024", "--batch-size", "32", "--compile"],
        "align": [],
        # 5000 steps x 32 x 1024 = 164M tokens, but the embedded corpus has ~1M: 150 passes would
        # only memorize it. Repeating data costs little up to ~4 epochs (Muennighoff et al. 2023,
        # arXiv:2305.16264), so we stop there; real data (--input / --url) lifts the cap.
        "max_steps": 5000, "max_epochs": 4,
    },
}


def capped_steps(train_bin, batch_size, context_length, max_steps, max_epochs):
    """Optimizer steps = min(max_steps, max_epochs passes over the uint16 token file)."""
    tokens = os.path.getsize(train_bin) // 2
    return max(1, min(max_steps, max_epochs * tokens // (batch_size * context_length)))


def stage_plan(out, preset, sources=(), scaling=False):
    """The stages in order: (name, command, inputs, artifacts that prove it finished).
    `sources` are data.py flags for real data (e.g. ["--url", URL]); none = the embedded corpus."""
    py = sys.executable
    p = PRESETS[preset]
    d = os.path.join(out, "data")
    tok = os.path.join(d, "tokenizer")
    tok_files = [os.path.join(tok, f) for f in ("vocab.json", "merges.txt", "special_tokens.json")]
    base = os.path.join(out, "base")
    al = os.path.join(out, "align")
    local = [x for x in sources[1:] if sources and sources[0] == "--input"]  # real data files: inputs too
    plan = [
        ("data", [py, "data.py", "--out", d, *p["data"], *sources], local,
         [os.path.join(d, "train.txt"), os.path.join(d, "val.txt"), os.path.join(d, "stats.json")]),
        ("bpe", [py, "bpe.py", "train", "--input", os.path.join(d, "train.txt"), "--out", tok,
                 "--special-tokens", *SPECIALS, *p["bpe"]], [os.path.join(d, "train.txt")], tok_files),
        *[(f"encode-{s}", [py, "bpe.py", "encode", "--tokenizer", tok, "--input", os.path.join(d, f"{s}.txt"),
                           "--out", os.path.join(d, f"{s}.bin")], [*tok_files, os.path.join(d, f"{s}.txt")],
           [os.path.join(d, f"{s}.bin")]) for s in ("train", "val")],
        ("pretrain", [py, "train.py", "--data", d, "--out-dir", base, *p["train"]],
         [*tok_files, os.path.join(d, "train.bin"), os.path.join(d, "val.bin")], [os.path.join(base, "ckpt.pt")]),
        ("align", [py, "align.py", "all", "--ckpt", os.path.join(base, "ckpt.pt"), "--tokenizer", tok,
                   "--out-dir", al, *p["align"]], [os.path.join(base, "ckpt.pt"), *tok_files],
         [os.path.join(al, "eval.json")]),
    ]
    if scaling:
        # Byte-level tokens (vocab 256) so the lm_head does not dominate tiny models, and sizes that bracket
        # each budget's optimum (see scaling.py's docstring for the measured sweep these follow).
        sc, bd = os.path.join(out, "scaling"), os.path.join(out, "data-bytes")
        plan.append(("scaling-bytes", [py, "scaling.py", "bytes", "--text", d, "--out", bd],
                     [os.path.join(d, "train.txt"), os.path.join(d, "val.txt")],
                     [os.path.join(bd, "train.bin"), os.path.join(bd, "val.bin")]))
        plan.append(("scaling", [py, "scaling.py", "sweep", "--data", bd, "--vocab-size", "256", "--out-dir", sc,
                                 "--budgets", "3e10", "1e11", "3e11", "--sizes", "12", "16", "24", "32", "48", "--fit",
                                 "--target", "1e12"], [os.path.join(bd, "train.bin"), os.path.join(bd, "val.bin")],
                     [os.path.join(sc, "fit.json")]))
    return plan


# ---------------------------------------------------------------
# Done-markers. A stage counts as finished only when its marker -- written as its very last act --
# holds the same command line and the same input fingerprints as now. So a killed stage, a stage run
# with other flags or data, or a stage whose inputs an upstream rerun replaced, runs again, and once
# one stage runs, every stage after it runs too (its inputs are new).

def fingerprint(paths):
    """(size, mtime) of every input file: cheap on a 20 GB train.bin, and any rewrite changes it."""
    fp = {}
    for p in paths:
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs) if os.path.isdir(p) else [p]
        for f in files:
            st = os.stat(f) if os.path.exists(f) else None
            fp[f] = [st.st_size, st.st_mtime_ns] if st else None
    return fp


def stage_record(cmd, inputs):
    return {"cmd": cmd[1:], "inputs": fingerprint(inputs)}  # cmd[0] is the interpreter: not part of the recipe


def read_marker(out, name):
    try:
        with open(os.path.join(out, ".done", f"{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):  # missing or half-written: not done
        return None


def write_marker(out, name, record):
    path = os.path.join(out, ".done", f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def is_done(out, name, record, artifacts):
    return all(os.path.exists(a) for a in artifacts) and read_marker(out, name) == record


def pretrain_cmd(out, preset, cmd):
    """The gpu preset caps steps at max_epochs of the data: known only once train.bin exists."""
    p = PRESETS[preset]
    if "max_steps" not in p:
        return cmd
    t = p["train"]
    steps = capped_steps(os.path.join(out, "data", "train.bin"), int(t[t.index("--batch-size") + 1]),
                         int(t[t.index("--context-length") + 1]), p["max_steps"], p["max_epochs"])
    return cmd + ["--max-steps", str(steps)]


def run_stage(out, name, cmd, record, artifacts, fresh=False):
    """Run one stage; resume pretraining that was killed with this very recipe; mark it done last."""
    if name == "pretrain" and not fresh and read_marker(out, "pretrain.started") == record and os.path.exists(artifacts[0]):
        cmd = cmd + ["--resume"]  # the periodic ckpt.pt of the same run: pick up where it stopped
    write_marker(out, f"{name}.started", record)
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"error: stage '{name}' failed with exit code {rc}; fix it and rerun (finished stages are kept)")
    missing = [a for a in artifacts if not os.path.exists(a)]
    if missing:
        raise SystemExit(f"error: stage '{name}' finished but did not write {missing[0]}")
    write_marker(out, name, record)  # the last act: a stage killed before this line is not done


def run_stages(out, preset, fresh, scaling, sources=()):
    """Run each stage that is not done (see the done-markers above); wall time per stage -> timings.json."""
    os.makedirs(out, exist_ok=True)
    tpath = os.path.join(out, "timings.json")
    timings = json.load(open(tpath)) if os.path.exists(tpath) and not fresh else {}
    plan = stage_plan(out, preset, sources, scaling)
    rerun = fresh  # once one stage runs, every later one runs too
    for i, (name, cmd, inputs, artifacts) in enumerate(plan):
        cmd = pretrain_cmd(out, preset, cmd) if name == "pretrain" else cmd
        record = stage_record(cmd, inputs)
        if not rerun and is_done(out, name, record, artifacts):
            print(f"[{i + 1}/{len(plan)}] {name}: done already, skipping (--fresh to redo)", flush=True)
            continue
        rerun = True
        print(f"[{i + 1}/{len(plan)}] {name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        run_stage(out, name, cmd, record, artifacts, fresh)
        timings[name] = round(time.time() - t0, 1)
        with open(tpath + ".tmp", "w") as f:
            json.dump(timings, f, indent=1)
        os.replace(tpath + ".tmp", tpath)
        print(f"[{i + 1}/{len(plan)}] {name}: {timings[name]:.0f} s", flush=True)
    return timings


# ---------------------------------------------------------------
# The report: read each stage's artifacts and write report.md (+ a loss-curve PNG).

def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def section_corpus(out):
    path = os.path.join(out, "data", "stats.json")
    if not os.path.exists(path):
        return "## Corpus\n\n(data stage did not run)\n"
    st = json.load(open(path))
    flat = [(k, v) for k, v in st.items() if not isinstance(v, (dict, list))]
    text = "## Corpus\n\n" + md_table(["stat", "value"], flat) + "\n"
    for k, v in st.items():
        if isinstance(v, dict) and v and all(not isinstance(x, (dict, list)) for x in v.values()):
            text += f"\n**{k}**\n\n" + md_table(["key", "value"], sorted(v.items(), key=lambda kv: str(kv[0]))) + "\n"
    return text


def section_tokenizer(out):
    import bpe
    d = os.path.join(out, "data")
    tok = bpe.Tokenizer.load(os.path.join(d, "tokenizer"))
    with open(os.path.join(d, "val.txt"), encoding="utf-8") as f:
        sample = f.read(200_000)
    ids = tok.encode(sample)
    nbytes = len(sample.encode("utf-8"))
    examples = ["The quick brown fox jumps over the lazy dog.",
                "def encode(self, text: str) -> list[int]:",
                "    return 12345 + 67890",
                "Die Katze schläft auf dem Sofa."]
    rows = []
    for e in examples:
        # Show each token's raw bytes: a token may hold half of a UTF-8 character (shown as \\xNN).
        pieces = [tok.vocab[i].decode("utf-8", errors="backslashreplace") for i in tok.encode(e)]
        rows.append((f"`{e}`", len(pieces), " · ".join(p.replace("|", "\\|").replace(" ", "␣") for p in pieces)))
    return (f"## Tokenizer\n\nvocab {len(tok)}; on the first {nbytes / 1e3:.0f} kB of val.txt: "
            f"**{nbytes / max(1, len(ids)):.2f} bytes/token**.\n\n"
            + md_table(["text", "tokens", "pieces"], rows) + "\n")


def section_pretrain(out):
    import torch
    import model as M
    base = os.path.join(out, "base")
    rows = read_jsonl(os.path.join(base, "metrics.jsonl"))
    final = next((r for r in reversed(rows) if r.get("final")), {})
    net, ck = M.load_model(os.path.join(base, "ckpt.pt"))
    cfg = net.cfg
    text = "## Model and pretraining\n\n" + md_table(["", ""], [
        ("config", ", ".join(f"{k}={v}" for k, v in ck["config"].items())),
        ("parameters", f"{net.num_params():,} ({net.num_params(non_embedding=True):,} non-embedding)"),
        ("train FLOPs/token (fwd+bwd)", f"{M.flops_per_token(cfg):.3g}"),
        ("steps", final.get("step", ck.get("iteration"))),
        ("tokens seen", f"{final.get('tokens', 0):,}"),
        ("total training FLOPs", f"{final.get('flops', 0):.3g}"),
        ("final val loss (nats/token)", f"{final.get('val_loss', float('nan')):.3f}"),
        ("unigram entropy of the train tokens", f"{final.get('unigram_entropy', float('nan')):.3f}"),
        ("wall time", f"{final.get('wall_s', 0):.0f} s"),
    ]) + "\n"
    steps = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r and not r.get("final")]
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r and not r.get("final")]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*steps), label="train loss", lw=1)
        if vals:
            ax.plot(*zip(*vals), "o-", label="val loss")
        if "unigram_entropy" in final:
            ax.axhline(final["unigram_entropy"], ls="--", c="gray", label="unigram entropy")
        ax.set_xlabel("step"); ax.set_ylabel("loss (nats/token)"); ax.legend(); fig.tight_layout()
        fig.savefig(os.path.join(out, "loss.png"), dpi=110)
        text += "\n![loss curve](loss.png)\n"
    except ImportError:
        every = max(1, len(steps) // 12)
        text += "\n" + md_table(["step", "train loss"], [(s, f"{l:.3f}") for s, l in steps[::every]]) + "\n"
    # Samples: a few continuations from the pretrained model, seeded so the report is reproducible.
    import bpe
    tok = bpe.Tokenizer.load(os.path.join(out, "data", "tokenizer"))
    g = torch.Generator().manual_seed(0)
    text += "\n**Samples** (temperature 0.8, top-k 50):\n"
    for prompt in ["The function", "Return a"]:
        idx = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            y = M.generate(net, idx, 48, temperature=0.8, top_k=50, generator=g,
                           stop_token=tok.special_ids.get("<|endoftext|>"))
        text += "\n```\n" + tok.decode(y[0].tolist()) + "\n```\n"
    return text


def section_align(out):
    path = os.path.join(out, "align", "eval.json")
    if not os.path.exists(path):
        return "## Alignment\n\n(align stage did not run)\n"
    ev = json.load(open(path))
    rows = []
    for stage in ["base", "sft", "dpo", "grpo"]:
        if stage in ev:
            r = ev[stage]
            rows.append((stage, f"{100 * r['acc']:.1f}%", f"[{100 * r['ci_lo']:.1f}, {100 * r['ci_hi']:.1f}]", r["n"],
                         ", ".join(f"{k}: {100 * v:.0f}%" for k, v in r.get("by_difficulty", {}).items())))
    text = ("## Alignment (held-out math problems, greedy decoding)\n\n"
            + md_table(["stage", "accuracy", "95% CI (Wilson)", "n", "by difficulty"], rows) + "\n")
    # Paired differences on the same problems: tighter than comparing two independent intervals.
    paired = [(k, f"{100 * v['delta']:+.1f} points", f"[{100 * v['ci_lo']:+.1f}, {100 * v['ci_hi']:+.1f}]",
               f"{v['wins']} gained, {v['losses']} lost") for k, v in ev.get("paired", {}).items()]
    if paired:
        text += "\n" + md_table(["comparison", "difference", "paired 95% CI", "problems"], paired) + "\n"
    return text


def section_scaling(out):
    path = os.path.join(out, "scaling", "fit.json")
    if not os.path.exists(path):
        return ""
    fit = json.load(open(path))
    a2, a3 = fit["approach2"], fit["approach3"]
    rows = [("approach 2: N_opt ~ C^a", f"a = {a2['a']:.3f} [{a2['a_ci'][0]:.3f}, {a2['a_ci'][1]:.3f}]"),
            ("approach 2: D_opt ~ C^b", f"b = {a2['b']:.3f} [{a2['b_ci'][0]:.3f}, {a2['b_ci'][1]:.3f}]"),
            ("approach 3: L = E + A/N^alpha + B/D^beta",
             ", ".join(f"{k} = {a3[k]:.3g}" for k in ("E", "A", "B", "alpha", "beta")))]
    text = f"## Scaling-law fit\n\n{fit['n_runs']} runs.\n\n" + md_table(["", ""], rows) + "\n"
    if os.path.exists(os.path.join(out, "scaling", "scaling.png")):
        text += "\n![scaling](scaling/scaling.png)\n"
    return text


def write_report(out, timings):
    import torch
    parts = [f"# Pipeline report\n\nGenerated {time.strftime('%Y-%m-%d %H:%M:%S')} by `python pipeline.py`.\n"]
    for fn in (section_corpus, section_tokenizer, section_pretrain, section_align, section_scaling):
        try:
            parts.append(fn(out))
        except Exception as e:  # a report with a hole beats no report; the hole names its cause
            parts.append(f"## {fn.__name__[8:].title()}\n\n(could not build this section: {type(e).__name__}: {e})\n")
    parts.append("## Wall time per stage\n\n" + md_table(["stage", "seconds"], list(timings.items())) + "\n")
    import numpy
    parts.append("## Versions and hardware\n\n" + md_table(["", ""], [
        ("python", platform.python_version()), ("torch", torch.__version__), ("numpy", numpy.__version__),
        ("machine", f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"),
        ("GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"),
    ]) + "\n")
    path = os.path.join(out, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(parts))
    os.replace(path + ".tmp", path)
    return path


# ---------------------------------------------------------------

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="where every stage writes (data/, base/, align/, report.md); default runs/PRESET")
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="size: cpu (default), tiny (smoke test), gpu")
    ap.add_argument("--fresh", action="store_true", help="redo every stage even if its outputs exist")
    ap.add_argument("--scaling", action="store_true", help="also run the scaling-law sweep and fit (slow)")
    ap.add_argument("--report-only", action="store_true", help="only regenerate report.md from existing artifacts")
    ap.add_argument("--input", nargs="+", default=None, help="real data for data.py: WARC/WET, .jsonl, .html, .txt files or dirs")
    ap.add_argument("--url", default=None, help="real data for data.py: a remote text/jsonl/warc file (downloaded once)")
    args = ap.parse_args()
    sources = (["--input", *args.input] if args.input else []) + (["--url", args.url] if args.url else [])
    args.out = args.out or os.path.join("runs", args.preset)
    os.chdir(ROOT)
    t0 = time.time()
    tpath = os.path.join(args.out, "timings.json")
    if args.report_only:
        timings = json.load(open(tpath)) if os.path.exists(tpath) else {}
    else:
        timings = run_stages(args.out, args.preset, args.fresh, args.scaling, sources)
    print(f"report: {write_report(args.out, timings)} ({time.time() - t0:.0f} s)")
