"""test_all.py -- every test of the repo, one file, grouped by concept in pipeline order.

    python -m pytest -q test_all.py                  # everything (CI), CPU only
    python -m pytest -q -m "not slow" test_all.py    # the inner loop: no subprocesses, no whole CLIs
    python -m pytest -q -k bpe test_all.py           # one concept: every test is named test_<concept>_*

Contents (selector: what the group checks -- against what trusted reference)
    -k data      data.py stages on small inline inputs with known answers; MinHash against exact Jaccard on
                 Python sets and brute-force clustering; WARC/jsonl/HTML files written here, some broken
    -k bpe       bpe.py: a naive trainer recounting every pair after every merge; tiktoken on our ranks
                 (same ids); round trips on arbitrary Unicode; GPT-2's byte table
    -k model     model.py: torch's own ops (softmax, SDPA, RMSNorm, SiLU, cross-entropy), complex-number RoPE,
                 no-cache generation, the exact speculative joint, HF LlamaForCausalLM logits
    -k train     train.py: torch.optim.AdamW, clip_grad_norm_, closed-form schedules, hand-computed steps;
                 SIGKILL + resume == the uninterrupted run, bit for bit
    -k kernels   kernels.py in Triton's CPU interpreter: torch's ops in fp32 on the same rounded inputs
    -k parallel  parallel.py and torchrun train.py on 2 gloo ranks == one process
    -k scaling   scaling.py: torch's FlopCounterMode, model.py's parameter count, synthetic Chinchilla laws
                 with known exponents
    -k align     align.py: hand computations and closed forms (DPO loss = log 2 at init, PPO ratio = 1 on
                 policy), grad accumulation == one big batch, a held-out split no fact crosses
    -k pipeline  pipeline.py: done-markers on a fake plan; the whole chain at a tiny size, every artifact

No network, no GPU needed: Triton kernels run in Triton's CPU interpreter, distributed tests in 2-process gloo
groups. Tests marked skipif(not cuda) are the compiled-GPU variants and run on a GPU machine (gpu_check.sh).
"""
# Triton reads TRITON_INTERPRET when a @triton.jit decorator runs, so it must be set before kernels.py is imported.
import os
import torch
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import argparse
import copy
import dataclasses
import datetime
import gzip
import hashlib
import http.server
import importlib.util
import io
import itertools
import json
import pydoc_data.topics as pydoc_topics
import math
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import tracemalloc
import unicodedata
import warnings
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import regex
import tiktoken
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import align
import bpe
import data
import kernels
import model as M
import parallel
import pipeline
import scaling
import train as TR
from model import ModelConfig, TransformerLM



torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.abspath(M.__file__))


def tiny_cfg(**kw):
    base = dict(vocab_size=61, context_length=32, d_model=32, num_layers=2, num_heads=4, d_ff=48)
    base.update(kw)
    return M.ModelConfig(**base)




# ---------------------------------------------------------------
# data.py: raw pages -> clean corpus. Each stage on small inline inputs with known answers, the
# MinHash dedup against a brute-force all-pairs reference, WARC files written here (including
# broken ones), and the default stdlib-docs corpus built end to end on a few modules.



# --- HTML -> text ---

def test_data_extract_text_structure_and_skipped_tags():
    """Block tags become paragraph breaks, skipped subtrees vanish, <pre> stays verbatim (hand-written expected text)."""
    page = b"""<html><head><title>T</title><style>p {color: red}</style></head><body>
    <nav><a href="/">Home</a> | <a href="/about">About</a></nav>
    <h1>Heading</h1><p>First   paragraph
    spans lines.</p><script>var x = "<p>not text</p>";</script>
    <ul><li>one</li><li>two</li></ul><p>Caf&eacute; &amp; more</p>
    <pre>def f():
    return 1</pre></body></html>"""
    assert data.extract_text_from_html_bytes(page) == (
        "Heading\n\nFirst paragraph spans lines.\n\none\ntwo\n\nCafé & more\n\ndef f():\n    return 1")


def test_data_extract_text_charsets_and_garbage():
    """<meta charset>, BOM and unknown codecs decode as the HTML5 sniffing order says; random bytes are None."""
    latin1 = '<meta charset="iso-8859-1"><p>Gr\xfc\xdfe aus M\xfcnchen</p>'.encode("latin-1")
    assert data.extract_text_from_html_bytes(latin1) == "Grüße aus München"
    utf16 = "\ufeff<p>naïve café</p>".encode("utf-16-le")  # BOM first
    assert data.extract_text_from_html_bytes(utf16) == "naïve café"
    bogus = b'<meta charset="no-such-codec"><p>caf\xc3\xa9</p>'  # unknown codec: fall back to UTF-8
    assert data.extract_text_from_html_bytes(bogus) == "café"
    garbage = bytes(random.Random(0).randrange(256) for _ in range(5000))
    assert data.extract_text_from_html_bytes(garbage) is None


# --- language ID ---

LANG_SAMPLES = {
    "en": "The committee published its findings after reviewing the evidence, and it is clear that the "
          "results of this study are important for all of us who work in the field.",
    "de": "Die Kommission hat ihre Ergebnisse veröffentlicht, nachdem sie die Beweise geprüft hatte, und es ist "
          "klar, dass die Ergebnisse dieser Studie für uns alle wichtig sind.",
    "fr": "La commission a publié ses conclusions après avoir examiné les preuves, et il est clair que les "
          "résultats de cette étude sont importants pour tous ceux qui travaillent dans le domaine.",
    "es": "La comisión publicó sus conclusiones después de revisar las pruebas, y está claro que los "
          "resultados de este estudio son importantes para todos los que trabajamos en el campo.",
    "it": "La commissione ha pubblicato le sue conclusioni dopo aver esaminato le prove, ed è chiaro che i "
          "risultati di questo studio sono importanti per tutti coloro che lavorano nel settore.",
    "pt": "A comissão publicou as suas conclusões depois de analisar as provas, e é claro que os resultados "
          "deste estudo são importantes para todos nós que trabalhamos na área.",
    "nl": "De commissie heeft haar bevindingen gepubliceerd na het bekijken van het bewijs, en het is "
          "duidelijk dat de resultaten van dit onderzoek belangrijk zijn voor iedereen die in het veld werkt.",
    "zh": "委员会在审查证据后公布了调查结果，很明显，这项研究的结果对我们所有在该领域工作的人都很重要。",
    "ja": "委員会は証拠を検討した後に調査結果を発表しました。この研究の結果は、この分野で働くすべての人にとって重要です。",
    "ru": "Комиссия опубликовала свои выводы после изучения доказательств, и ясно, что результаты этого "
          "исследования важны для всех нас, кто работает в этой области.",
}


@pytest.mark.parametrize("lang", sorted(LANG_SAMPLES))
def test_data_identify_language(lang):
    """Each sample sentence is identified as its language with confidence >= 0.5 (labels written by hand)."""
    got, conf = data.identify_language(LANG_SAMPLES[lang])
    assert got == lang and 0.5 <= conf <= 1.0, (got, conf)


def test_data_identify_language_nothing_to_go_on():
    """Text without letters is ('unk', 0.0)."""
    assert data.identify_language("1234 5678 !!! ---") == ("unk", 0.0)


# --- PII masking ---

@pytest.mark.parametrize("number", ["2831823829", "(283)-182-3829", "(283) 182 3829", "283-182-3829"])
def test_data_mask_phone_numbers_four_us_formats(number):
    """The four US phone formats are masked exactly once each."""
    text, n = data.mask_phone_numbers(f"Call {number} today.")
    assert (text, n) == ("Call |||PHONE_NUMBER||| today.", 1)


def test_data_mask_phone_numbers_negatives():
    """Long integers, decimals, digit strings, dates and versions are not phone numbers."""
    # Digits glued to more digits, a decimal, the digit string, a date: not phone numbers.
    for s in ["id 123456789012345", "pi 3.1415926535", "0123456789", "2024-01-15", "version 1.2.3"]:
        assert data.mask_phone_numbers(s) == (s, 0), s


def test_data_mask_emails_and_already_masked_not_recounted():
    """E-mail masking counts each address once and is idempotent on its own placeholders."""
    text, n = data.mask_emails("Write to guido@python.org or a.b-c+tag@mail.example.co.uk, please.")
    assert (text, n) == ("Write to |||EMAIL_ADDRESS||| or |||EMAIL_ADDRESS|||, please.", 2)
    again, n2 = data.mask_emails(text)  # masking is idempotent: placeholders are not addresses
    assert (again, n2) == (text, 0)
    mixed, n3 = data.mask_emails("old |||EMAIL_ADDRESS||| and new bob@example.org")
    assert (mixed, n3) == ("old |||EMAIL_ADDRESS||| and new |||EMAIL_ADDRESS|||", 1)
    assert data.mask_emails("no @ here, nor user@localhost") == ("no @ here, nor user@localhost", 0)


def test_data_mask_ips():
    """Valid dotted quads are masked; out-of-range octets and 3 or 5 groups are not."""
    text, n = data.mask_ips("hosts 192.168.0.1, 8.8.8.8 and 255.255.255.255.")
    assert (text, n) == ("hosts |||IP_ADDRESS|||, |||IP_ADDRESS||| and |||IP_ADDRESS|||.", 3)
    for s in ["256.1.1.1", "1.2.3", "1.2.3.4.5", "version 10.0.0.1a"]:  # out of range / not four octets
        assert data.mask_ips(s) == (s, 0), s
    assert data.mask_ips(text) == (text, 0)


# --- Gopher rules: each threshold exactly at the edge passes, one step past it fails ---

def _words(n, length=5):
    return " ".join(["abcdefghijk"[:length]] * n)


def test_data_gopher_word_count_edges():
    """The Gopher word-count rule passes exactly at 50 and 100,000 words and fails one past each."""
    assert data.gopher_failure(_words(49)) == "too_few_words"
    assert data.gopher_failure(_words(50)) is None
    assert data.gopher_failure(_words(100_000)) is None
    assert data.gopher_failure(_words(100_001)) == "too_many_words"


def test_data_gopher_mean_word_length_edges():
    """The mean-word-length rule passes at exactly 3 and 10 and fails just outside."""
    assert data.gopher_failure(_words(60, 3)) is None  # mean exactly 3
    assert data.gopher_failure(" ".join(["ab"] * 30 + ["abc"] * 30)) == "mean_word_length"  # 2.5
    assert data.gopher_failure(_words(60, 10)) is None  # mean exactly 10
    assert data.gopher_failure(" ".join(["a" * 10] * 59 + ["a" * 11])) == "mean_word_length"  # 10.017


def test_data_gopher_ellipsis_lines_edges():
    """The ellipsis rule passes at 30% of lines and fails at 40%, for '...' and U+2026."""
    def doc(n_ellipsis, n_lines=10):
        return "\n".join(_words(6) + (" ..." if i < n_ellipsis else " end") for i in range(n_lines))
    assert data.gopher_failure(doc(3)) is None  # exactly 30% of lines end in "..."
    assert data.gopher_failure(doc(4)) == "ellipsis_lines"
    assert data.gopher_failure(doc(4).replace("...", "\u2026")) == "ellipsis_lines"  # the one-char ellipsis


def test_data_gopher_alpha_words_edges():
    """The alphabetic-words rule passes at exactly 80% and fails at 79%; one letter makes a word count."""
    assert data.gopher_failure(" ".join(["word"] * 80 + ["1234"] * 20)) is None  # exactly 80% with a letter
    assert data.gopher_failure(" ".join(["word"] * 79 + ["1234"] * 21)) == "non_alpha_words"
    assert data.gopher_failure(" ".join(["word"] * 79 + ["12a4"] * 21)) is None  # one letter is enough


# --- fastText-style classifiers ---

def _classify_one(kind, text):
    """CS336's classify_quality / classify_toxic_speech / classify_nsfw: one text -> (label, probability)."""
    return data.classify_batch(kind, [text])[0]


def test_data_default_classifiers_on_obvious_cases():
    """The default classifiers label blatant navigation, insults and explicit spam, and clean prose, correctly."""
    nav = "Home | About us | Contact | Privacy policy | Login Register | Cart (0) | Share on Facebook"
    prose = "The function returns a new list with the items sorted, and raises an error for bad input."
    assert _classify_one("quality", nav)[0] == "low" and _classify_one("quality", prose)[0] == "high"
    assert _classify_one("toxic", "you stupid worthless idiot, everyone hates you")[0] == "toxic"
    assert _classify_one("toxic", prose)[0] == "clean"
    assert _classify_one("nsfw", "explicit nude sex videos for adults, xxx porn")[0] == "nsfw"
    assert _classify_one("nsfw", prose)[0] == "clean"
    label, score = _classify_one("quality", prose)
    assert 0.5 <= score <= 1.0


def test_data_classifier_cli_roundtrip(tmp_path):
    """train-classifier writes a weights_only-loadable model that separates its two labeled vocabularies."""
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(["apple", "pear", "plum"]) for _ in range(8)), "label": "fruit"}
            for _ in range(20)] + [{"text": " ".join(rng.choice(["bolt", "nut", "gear"]) for _ in range(8)),
                                    "label": "metal"} for _ in range(20)]
    src, out = tmp_path / "lab.jsonl", tmp_path / "m.pt"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    data.main(["train-classifier", "--input", str(src), "--out", str(out), "--epochs", "40", "--num-buckets", "4096"])
    blob = torch.load(out, weights_only=True)  # plain tensors + lists: loads without unpickling code
    assert blob["labels"] == ["fruit", "metal"]
    data.set_classifier("quality", str(out))  # any kind can use any trained model
    try:
        assert data.classify_batch("quality", ["plum apple pear", "gear bolt"]) and \
            [lbl for lbl, _ in data.classify_batch("quality", ["plum apple pear", "gear bolt nut"])] == ["fruit", "metal"]
    finally:
        data._CLASSIFIERS.pop("quality", None)  # back to the default model for other tests


# --- exact line dedup ---

def test_data_exact_line_dedup_docs_min_docs():
    """A line goes when it occurs in >= min_docs documents (documents, not copies); blank lines stay."""
    docs = ["keep me\nboiler\n\nalso", "boiler\nother", "boiler\nthird\nthird"]
    out, removed = data.exact_line_dedup_docs(docs, min_docs=3)
    assert out == ["keep me\n\nalso", "other", "third\nthird"] and removed == 3  # counts documents, not copies
    out2, _ = data.exact_line_dedup_docs(docs, min_docs=2)
    assert out2 == ["keep me\n\nalso", "other", "third\nthird"]


# --- MinHash near-dedup ---

def _naive_normalize(text):
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^\w\s]|_", " ", text).split())


def _naive_shingles(text, n):
    w = _naive_normalize(text).split()
    return {tuple(w[i:i + n]) for i in range(max(1, len(w) - n + 1))} if w else set()


def _naive_jaccard(x, y, n=5):
    a, b = _naive_shingles(x, n), _naive_shingles(y, n)
    return len(a & b) / len(a | b)


def _shingle_hashes(text, n):
    return np.unique(data.shingle_hashes_batch([text], n)[0])  # one document's sorted unique shingle hashes


def test_data_normalization_in_c_matches_reference():
    """The byte-table normalization equals the unicodedata reference, and hashed shingles equal set shingles in number."""
    for t in ["Héllo, WÖRLD!  it's_a  test\n\tof   naïve façade — ok?", "plain ascii, with CAPS & 42 numbers",
              "  leading and trailing  ", "日本語 テキスト、です。", ""]:
        assert data.normalize_for_dedup(t) == _naive_normalize(t)
        assert b" ".join(data._ascii_or_stripped(t).translate(data._TABLE).split()).decode() == _naive_normalize(t)
        assert len(_shingle_hashes(t, 3)) == len(_naive_shingles(t, 3))  # no hash collisions here


def test_data_shingle_batch_matches_one_document_at_a_time():
    """Vectorized batch shingle hashes equal per-document hashes and the readable set-based shingles (no shingle crosses documents)."""
    # The batch path lays documents end to end; no shingle may cross a boundary, short and empty
    # documents included. Each document's shingle count must match the inline reference.
    texts = ["", "!!! ---", "one", "a b", "Ünïcödé wörds, ça va?", "x " * 9, "w" * 45 + " " + "v" * 50,
             PROSE, "", PROSE.upper(), "日本語 テキスト です"]
    for n in (1, 3, 5):
        batch = data.shingle_hashes_batch(texts, n, batch_docs=4)
        for t, hashes in zip(texts, batch):
            assert np.array_equal(np.unique(hashes), _shingle_hashes(t, n))
            assert len(np.unique(hashes)) == len(_naive_shingles(t, n)) == len(data.shingles(t, n)), (t[:20], n)
    assert np.array_equal(batch[7], batch[9])  # case is normalized away


def _doc(rng, vocab, n=200):
    return [rng.choice(vocab) for _ in range(n)]


def test_data_jaccard_matches_python_sets():
    """jaccard on sorted hash arrays equals Jaccard on Python sets."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        x, y = (np.unique(rng.integers(0, 50, rng.integers(0, 30)).astype(np.uint64)) for _ in range(2))
        ref = len(set(x) & set(y)) / len(set(x) | set(y)) if len(x) or len(y) else 1.0
        assert data.jaccard(x, y) == pytest.approx(ref)


def test_data_minhash_merges_090_not_050():
    """A J=0.9 pair is merged (first kept) and a J=0.4 pair is not."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    base = _doc(rng, vocab)
    near = list(base)
    for i in (40, 140):  # two substitutions -> 10 of 196 shingles change
        near[i] = "changed"
    half = base[:100] + _doc(rng, vocab, 100)  # shares half its text with base
    other = _doc(rng, vocab)
    texts = [" ".join(base), " ".join(near), " ".join(half), " ".join(other)]
    j_near, j_half = _naive_jaccard(texts[0], texts[1]), _naive_jaccard(texts[0], texts[2])
    assert 0.88 <= j_near <= 0.92 and 0.3 <= j_half <= 0.5, (j_near, j_half)
    keep, clusters = data.minhash_dedup_docs(texts, num_hashes=128, num_bands=16, ngrams=5, jaccard_threshold=0.8)
    assert keep == [True, False, True, True] and clusters == [[0, 1]]  # the first of the near pair stays


def test_data_minhash_signature_estimates_jaccard():
    """Signature agreement estimates the exact Jaccard within 0.08 (std ~0.02 at K=512)."""
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(5000)]
    base = _doc(rng, vocab, 400)
    for edits in (4, 20, 60):
        other = list(base)
        for i in rng.sample(range(400), edits):
            other[i] = "x"
        x, y = " ".join(base), " ".join(other)
        a, b = data.minhash_params(512, seed=3)
        s = data.minhash_signatures([_shingle_hashes(x, 5), _shingle_hashes(y, 5)], a, b)
        est, true = float((s[0] == s[1]).mean()), _naive_jaccard(x, y)
        assert abs(est - true) < 0.08, (edits, est, true)  # std of the estimate ~ 0.02


def test_data_minhash_clusters_equal_brute_force():
    """LSH clusters equal the connected components of the brute-force all-pairs Jaccard graph."""
    # 25 families of 5 variants (0-1 edits each) shuffled together: the LSH clusters must equal the
    # connected components of the all-pairs exact-Jaccard graph (many clusters share buckets).
    rng = random.Random(2)
    vocab = [f"w{i}" for i in range(3000)]
    texts = []
    for _ in range(25):
        base = _doc(rng, vocab, 150)
        for _ in range(5):
            t = list(base)
            for _ in range(rng.choice([0, 1])):  # within a family J >= 0.87, far from 0.8
                t[rng.randrange(150)] = rng.choice(vocab)
            texts.append(" ".join(t))
    rng.shuffle(texts)
    sh = [_naive_shingles(t, 5) for t in texts]
    parent = list(range(len(texts)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i
    for i, j in itertools.combinations(range(len(texts)), 2):
        if len(sh[i] & sh[j]) / len(sh[i] | sh[j]) >= 0.8:
            ri, rj = find(i), find(j)
            parent[max(ri, rj)] = min(ri, rj)
    comps = {}
    for i in range(len(texts)):
        comps.setdefault(find(i), []).append(i)
    ref = sorted(c for c in comps.values() if len(c) > 1)
    keep, clusters = data.minhash_dedup_docs(texts, 128, 16, 5, 0.8)
    assert sorted(sorted(c) for c in clusters) == ref
    assert keep == [find(i) == i for i in range(len(texts))]  # the earliest member of each cluster stays


def test_data_minhash_chains_merge_through_the_middle_document():
    """A ~ M ~ B with A !~ B forms one cluster even when a bucket must fold two clusters."""
    # A and B each differ from M by 2 words: J(A, M) = J(B, M) = 0.87 but J(A, B) = 0.76 < 0.8, so
    # A and B only join through M. Ordered (A, B, M), a bucket holding all three must fold two
    # existing clusters into one while it is being scanned. With r = 4 rows per band every pair is a
    # candidate (P(miss at J=0.87) ~ 1e-12), so the answer must be exactly one cluster per triple.
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(5000)]
    texts = []
    for _ in range(20):
        m = _doc(rng, vocab, 150)
        a, b = list(m), list(m)
        a[30], a[90], b[60], b[120] = "xa", "ya", "xb", "yb"
        texts += [" ".join(a), " ".join(b), " ".join(m)]
    assert _naive_jaccard(texts[0], texts[1]) < 0.8 <= _naive_jaccard(texts[0], texts[2])
    keep, clusters = data.minhash_dedup_docs(texts, num_hashes=128, num_bands=32, ngrams=5, jaccard_threshold=0.8)
    assert sorted(sorted(c) for c in clusters) == [[i, i + 1, i + 2] for i in range(0, 60, 3)]
    assert keep == [i % 3 == 0 for i in range(60)]


# --- sources: WARC (written here, some of it broken), jsonl, HTML, txt ---

PROSE = ("The library provides a small set of tools for reading and writing structured files, and each "
         "of them is described in the sections below with an example. We start with the simplest case, in "
         "which a file is read line by line and every line is parsed into a record, and then show how the "
         "same idea extends to streams that do not fit in memory, such as logs or network data. ")


def _warc_record(kind, body, headers=""):
    return (f"WARC/1.0\r\nWARC-Type: {kind}\r\nWARC-Record-ID: <urn:uuid:{kind}-{len(body)}>\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body + b"\r\n\r\n"


def _write_warc(path, records):
    with open(path, "wb") as f:  # one gzip member per record, as Common Crawl does
        for r in records:
            f.write(gzip.compress(r))


def _good_records():
    html_page = f"<html><body><nav>Home | About</nav><p>{PROSE}</p><p>Mail jane@example.com.</p></body></html>"
    http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html_page.encode()
    return [_warc_record("warcinfo", b"software: test\r\n"),
            _warc_record("request", b"GET / HTTP/1.1\r\n\r\n"),
            _warc_record("response", http),
            _warc_record("response", b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n\x89PNG\x00\x01"),
            _warc_record("conversion", (PROSE * 2).encode()),
            b"WARC/1.0\r\nWARC-Type: response\r\n\r\n",  # malformed: no Content-Length
            b"this line is not a WARC header\r\n"]  # garbage between records


def test_data_iter_warc_records_and_broken_files(tmp_path):
    """Every WARC record, malformed, truncated and corrupt ones included, yields exactly one counted item."""
    path = tmp_path / "crawl.warc.gz"
    _write_warc(path, _good_records())
    got = [(it[1], it[2] if it[1] == "bad" else None) for it in data.iter_source(str(path))]  # (+ http charset)
    assert got == [("bad", "not_a_document"), ("bad", "not_a_document"), ("html", None), ("bad", "not_html"),
                   ("text", None), ("bad", "malformed_warc"), ("bad", "malformed_warc")]
    raw = path.read_bytes()
    trunc = tmp_path / "trunc.warc.gz"
    trunc.write_bytes(raw[:len(raw) * 2 // 3])  # cut inside a gzip member
    got = list(data.iter_source(str(trunc)))
    assert got[-1][1:] == ("bad", "truncated") and len(got) < 7
    junk = tmp_path / "junk.warc.gz"
    junk.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)  # gzip magic, then garbage
    assert [x[1:] for x in data.iter_source(str(junk))] == [("bad", "corrupt_file")]
    plain = tmp_path / "plain.warc"  # uncompressed, body shorter than its Content-Length
    plain.write_bytes(_warc_record("conversion", b"x" * 100)[:-60])
    assert [x[1:] for x in data.iter_source(str(plain))] == [("bad", "truncated")]


@pytest.mark.slow
def test_data_build_from_mixed_sources_accounts_for_every_document(tmp_path):
    """Mixed WARC/jsonl/html/txt inputs: every document is kept or dropped with a reason, and PII is masked."""
    _write_warc(tmp_path / "a.warc.gz", _good_records())
    raw = (tmp_path / "a.warc.gz").read_bytes()
    (tmp_path / "b.warc.gz").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": PROSE + " Call 283-182-3829."}) + "\nnot json\n"
                                      + json.dumps({"text": "Ceci est un texte en français, qui ne sera pas gardé "
                                                            "dans le corpus anglais, car la langue est différente."}) + "\n")
    (tmp_path / "d.html").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(3000)))  # binary
    (tmp_path / "e.txt").write_text(PROSE + "<|endoftext|>" + "This is far too short to keep." + "<|endoftext|>" + PROSE)  # dup
    out = tmp_path / "out"
    stats = data.main(["--input", str(tmp_path / "a.warc.gz"), str(tmp_path / "b.warc.gz"), str(tmp_path / "c.jsonl"),
                       str(tmp_path / "d.html"), str(tmp_path / "e.txt"), "--out", str(out), "--workers", "1",
                       "--val-fraction", "0.5"])
    saved = json.loads((out / "stats.json").read_text())
    assert saved["docs_in"] == stats["docs_in"] == saved["kept"] + sum(saved["dropped_by_reason"].values())
    d = saved["dropped_by_reason"]
    assert d["source:truncated"] == 1 and d["source:bad_json"] == 1 and d["extract:undecodable"] == 1
    assert d["lang:other_language"] == 1 and d["gopher:too_few_words"] >= 1 and d["minhash:near_duplicate"] >= 2
    assert saved["pii"]["email"] >= 1 and saved["pii"]["phone"] == 1
    after = list(saved["docs_after_stage"].values())
    assert after == sorted(after, reverse=True) and after[-1] == saved["kept"]
    docs = [t for split in ("train", "val") for t in (out / f"{split}.txt").read_text().split("<|endoftext|>")[:-1]]
    assert len(docs) == saved["kept"] == saved["train_docs"] + saved["val_docs"]
    body = "".join(docs)
    assert "|||EMAIL_ADDRESS|||" in body and "jane@example.com" not in body and "Home | About" not in body


def test_data_download_file_url_is_cached(tmp_path):
    """A file:// download replaces a stale partial, and a second call uses the cache."""
    src = tmp_path / "remote.jsonl"
    src.write_text('{"text": "hello"}\n')
    cache = tmp_path / "cache"
    (cache).mkdir()
    url = "file://" + str(src)
    # A stale partial download: the file:// handler ignores Range, so it must be rewritten whole.
    part = cache / (hashlib.sha1(url.encode()).hexdigest()[:12] + "_remote.jsonl.part")
    part.write_text('{"te')
    path = data.download(url, str(cache))
    assert open(path).read() == '{"text": "hello"}\n' and not part.exists()
    src.unlink()  # second call must not touch the source
    assert data.download(url, str(cache)) == path


def test_data_download_resumes_with_http_range(tmp_path):
    """An interrupted download resumes with an HTTP Range request and gives the whole file (local server)."""
    body = bytes(range(256)) * 64
    ranges = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-"))
            ranges.append(start)
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)  # port 0: any free port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/shard.txt"
        part = tmp_path / (hashlib.sha1(url.encode()).hexdigest()[:12] + "_shard.txt.part")
        part.write_bytes(body[:5000])  # an interrupted earlier download
        path = data.download(url, str(tmp_path))
        assert ranges == [5000] and open(path, "rb").read() == body
        assert data.download(url, str(tmp_path)) == path and ranges == [5000]  # cached: no request
    finally:
        server.shutdown()
        server.server_close()


# --- the default corpus, end to end on a few modules ---

@pytest.mark.slow
def test_data_default_corpus_small_subset_deterministic(tmp_path):
    """The stdlib-docs corpus is byte-identical across two runs, free of machine paths and addresses."""
    outs = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        data.main(["--modules", "textwrap,json,this,no_such_module_xyz", "--out", str(out), "--workers", "2"])
        outs.append(out)
    s = json.loads((outs[0] / "stats.json").read_text())
    assert s["docs_in"] == 4 + len(pydoc_topics.topics)  # modules + topics
    assert s["dropped_by_reason"]["source:import_error"] == 1  # the missing module is counted, not fatal
    assert s["kept"] + sum(s["dropped_by_reason"].values()) == s["docs_in"] and s["kept"] > 50
    assert s["minhash_clusters"] >= 1  # the docs have real near-duplicates (e.g. the if/else topics)
    train = (outs[0] / "train.txt").read_text()
    assert train.endswith("<|endoftext|>") and "textwrap" in train and len(train) > 100_000
    assert os.getcwd() not in train and "0x7f" not in train  # no machine paths, no memory addresses
    for name in ("train.txt", "val.txt"):  # identical on every run
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


@pytest.mark.slow
def test_data_token_files_with_byte_level_tokenizer(tmp_path):
    """--tokenizer writes one id per byte and one id per <|endoftext|> (byte-level tokenizer)."""
    tok_dir = tmp_path / "tok"
    bpe.Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"]).save(str(tok_dir))
    src = tmp_path / "in.txt"
    src.write_text(PROSE + "<|endoftext|>" + PROSE.replace("library", "program") * 2)
    out = tmp_path / "out"
    s = data.main(["--input", str(src), "--out", str(out), "--workers", "1", "--tokenizer", str(tok_dir),
                   "--no-dedup", "--val-fraction", "0.5"])
    for split in ("train", "val"):
        text = (out / f"{split}.txt").read_bytes()
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        # byte-level: one id per byte, except each 13-byte <|endoftext|> is the single id 256
        n_docs = s[f"{split}_docs"]
        assert len(ids) == s[f"{split}_tokens"] == len(text) - 12 * n_docs and (ids == 256).sum() == n_docs



# --- edge cases a review found (issue 13, item 7) ---

def test_data_extract_text_broken_structure_keeps_the_content():
    """Omitted </head>, an ASP.NET <form> around the body and an unclosed <nav> still give the prose."""
    no_head_end = b"<html><head><title>T</title><meta charset='utf-8'><body><p>Real content here.</p></body></html>"
    assert data.extract_text_from_html_bytes(no_head_end) == "Real content here."
    aspnet = b"<html><body><form id='form1' runat='server'><input type='hidden'><h1>Title</h1><p>Text.</p></form></body></html>"
    assert data.extract_text_from_html_bytes(aspnet) == "Title\n\nText."
    nav = b"<body><nav><a href='/'>Home</a> <a href='/x'>About</a><p>Article text.</p></body>"
    assert "Article text." in data.extract_text_from_html_bytes(nav)
    closed = b"<body><nav><a href='/'>Home</a></nav><p>Article text.</p></body>"  # a closed nav still vanishes
    assert data.extract_text_from_html_bytes(closed) == "Article text."


def test_data_decode_html_whatwg_labels_and_http_charset():
    """WHATWG: meta iso-8859-1 means windows-1252, meta utf-16 on ASCII bytes means UTF-8; HTTP beats meta."""
    cp1252 = b'<meta charset="iso-8859-1"><p>\x93quoted\x94 costs \x805</p>'
    assert data.extract_text_from_html_bytes(cp1252) == "\u201cquoted\u201d costs \u20ac5"
    assert data.extract_text_from_html_bytes(b'<meta charset="utf-16"><p>plain ascii</p>') == "plain ascii"
    latin = '<meta charset="utf-8"><p>Gr\xfc\xdfe</p>'.encode("latin-1")  # the server says latin-1, the page lies
    assert data.extract_text_from_html_bytes(latin, http_charset="ISO-8859-1") == "Grüße"


def test_data_warc_http_charset_and_status(tmp_path, monkeypatch):
    """WARC responses: the HTTP Content-Type charset reaches the decoder, and non-200 responses are skipped."""
    page = "<html><body><p>Gr\xfc\xdfe aus M\xfcnchen</p></body></html>".encode("latin-1")
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=ISO-8859-1\r\n\r\n" + page
    gone = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\n\r\n<html><p>Not here</p></html>"
    _write_warc(tmp_path / "c.warc.gz", [_warc_record("response", ok), _warc_record("response", gone)])
    items = list(data.iter_source(str(tmp_path / "c.warc.gz")))
    assert [it[1] for it in items] == ["html", "bad"] and items[0][3].lower() == "iso-8859-1" and items[1][2] == "http_404"
    assert data.process_document({}, items[0])[1] == "Grüße aus München"  # no language filter, no PII: extraction only


@pytest.mark.slow
def test_data_lone_surrogate_in_jsonl_is_replaced_and_counted(tmp_path):
    """A jsonl "\\ud800" escape cannot be encoded: it becomes U+FFFD (counted), the build finishes, no .tmp left."""
    src = tmp_path / "s.jsonl"
    src.write_text('{"text": "' + PROSE + ' broken \\ud800 escape"}\n')
    out = tmp_path / "out"
    s = data.main(["--input", str(src), "--out", str(out), "--workers", "1", "--no-dedup"])
    assert s["kept"] == 1 and s["repairs"]["lone_surrogate"] == 1
    assert "broken \ufffd escape" in (out / "train.txt").read_text() + (out / "val.txt").read_text()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_data_atomic_write_leaves_no_tmp_on_error(tmp_path):
    """A write that fails midway leaves the old file untouched and no .tmp behind."""
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        with data.atomic_write(str(path)) as f:
            f.write("\ud800")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


@pytest.mark.slow
def test_data_special_tokens_in_documents_are_neutralized(tmp_path):
    """Literal <|endoftext|>, <|user|>, <|assistant|> in a document never reach the corpus as special tokens."""
    text, n = data.neutralize_special_tokens("a <|endoftext|> b <|user|> c <|assistant|> d <|x")
    assert "<|" not in text.replace("<|x", "") and n == 3
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps({"text": PROSE + " The separator is <|endoftext|>, chat uses <|user|>."}) + "\n")
    out = tmp_path / "out"
    data.main(["--input", str(src), "--out", str(out), "--workers", "1", "--no-dedup", "--val-fraction", "0"])
    corpus = (out / "train.txt").read_text() + (out / "val.txt").read_text()
    assert corpus.count("<|endoftext|>") == 1 and "<|user|>" not in corpus  # only the real separator


def test_data_email_regex_starts_only_at_the_start_of_an_address_run():
    """A match may begin only where a run of address characters begins: each run is scanned once (linear time)."""
    assert data._EMAIL_RE.match("ab@example.com", 1) is None  # inside the run "ab": no new attempt
    assert data.mask_emails("x" * 20000 + " and bob@example.org") == ("x" * 20000 + " and |||EMAIL_ADDRESS|||", 1)
    assert data.mask_emails("a.b" * 5000) == ("a.b" * 5000, 0)
    assert data.mask_emails("a@b@example.com") == ("a@|||EMAIL_ADDRESS|||", 1)


def test_data_phone_regex_does_not_cross_newlines():
    """A column of numbers is not a phone number; spaces, dots and dashes still separate."""
    assert data.mask_phone_numbers("283\n182\n3829") == ("283\n182\n3829", 0)
    assert data.mask_phone_numbers("call 283 182 3829") == ("call |||PHONE_NUMBER|||", 1)


def test_data_spanish_portuguese_stopwords_have_de():
    """'de', the commonest Spanish and Portuguese word, counts for es and pt (not only for Dutch)."""
    assert data.identify_language("Casa de madera de pino de la sierra")[0] == "es"
    assert data.identify_language("Receita de bolo de chocolate da avó")[0] == "pt"


# --- toxicity and NSFW filters on real text (issue 13, item 10) ---

def test_data_toxic_nsfw_heldout_precision_recall():
    """On the held-out labeled set (>= 100 per class, never trained on), both filters have P >= 0.95, R >= 0.9."""
    held = data.read_labeled(data.HELDOUT_SET)
    train = {t for rows in data.read_labeled(data.TRAIN_SET).values() for t in rows}
    assert min(len(held[k]) for k in ("clean", "toxic", "nsfw")) >= 100
    assert not train.intersection(t for rows in held.values() for t in rows)  # held out means held out
    report = data.evaluate_classifiers()
    for kind in ("toxic", "nsfw"):
        assert report[kind]["precision"] >= 0.95 and report[kind]["recall"] >= 0.9, report


def test_data_bad_word_rule_sees_through_obfuscation():
    """Asterisks, digits or symbols for letters, inner dots and repeated letters do not hide a listed word."""
    assert data.deobfuscate("STUUUPID f.u.c.k sh1t b!tch a**hole p0rn") == "stupid fuck shit bitch ashole porn"
    for t in ["what a f*ck up", "this is sh1t", "you b!tch", "you a**hole", "f.u.c.k this", "shiiiit"]:
        assert _classify_one("toxic", t) == ("toxic", 1.0), t
    assert _classify_one("nsfw", "free p0rn here") == ("nsfw", 1.0)
    for t in ["The idiot light on the dashboard came on.", "A nude marble statue from ancient Greece.",
              "Use kill -9 only if the process ignores SIGTERM.", "def f(*args, **kwargs): pass",
              "Return *x* *or* *other*, see *n*-1 and *lo* *nd*."]:  # reST emphasis is not a disguise
        assert _classify_one("toxic", t)[0] == "clean" and _classify_one("nsfw", t)[0] == "clean", t


# ---------------------------------------------------------------
# bpe.py: byte-level BPE tokenizer
# Trusted references: a naive BPE trainer written inline (recount every pair after every merge),
# tiktoken (same ranks -> must give the same ids), round-trip invariants, GPT-2's byte table.


SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>"]
MIXED = ("Hello, world! It's 2024-05-17; we'll pay $3.14 for 1,000,000 items.\n"
         "    def f(x):\n        return x  # indented code\n\n\n"
         "Größenordnung, l'élève français. Привет, мир! 日本語のテキスト。 مرحبا بالعالم\n"
         "emoji: 🙂🎉 👩‍💻   trailing spaces   \n\t\ttabs\r\nwindows line\n")


def _corpus():
    """~60 KB of English from the stdlib docs plus mixed scripts, code and numbers, cut into
    documents by special tokens."""
    docs = [pydoc_topics.topics[k] for k in sorted(pydoc_topics.topics)[:40]]
    docs = [d for d in docs] + [MIXED * 3] * 5
    return "<|endoftext|>".join(docs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    path = d / "corpus.txt"
    path.write_text(_corpus(), encoding="utf-8")
    vocab, merges = bpe.train_bpe(str(path), 700, SPECIALS)
    return str(path), vocab, merges, bpe.Tokenizer(vocab, merges, SPECIALS)


# --- a naive trainer: the definition, recounted from scratch after every merge ---

def _naive_words(text, specials, pattern):
    pieces = regex.split("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)), text) \
        if specials else [text]
    words = Counter()
    for piece in pieces:
        for w in regex.findall(pattern, piece):
            words[tuple(bytes([x]) for x in w.encode("utf-8"))] += 1
    return words


def _naive_merge(w, pair):
    out, i = [], 0
    while i < len(w):
        if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
            out.append(w[i] + w[i + 1])
            i += 2
        else:
            out.append(w[i])
            i += 1
    return tuple(out)


def naive_train(text, vocab_size, specials, pattern=bpe.GPT2_PATTERN, score="count"):
    words = _naive_words(text, specials, pattern)
    merges = []
    for _ in range(vocab_size - 256 - len(specials)):
        pairs, syms = Counter(), Counter()
        for w, c in words.items():
            for s in w:
                syms[s] += c
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        if score == "count":
            best = max(pairs, key=lambda p: (pairs[p], p))
        else:  # WordPiece / PMI: count(ab) / (count(a) count(b)), ties -> greatest bytes
            best = max(pairs, key=lambda p: (pairs[p] / (syms[p[0]] * syms[p[1]]), p))
        merges.append(best)
        new = Counter()
        for w, c in words.items():
            new[_naive_merge(w, best)] += c
        words = new
    return merges


def _tie_corpus(seed):
    """Small alphabet, short words, repeats: many pairs share the top count, so ties decide."""
    r = random.Random(seed)
    words = ["".join(r.choice("abcab") for _ in range(r.randint(1, 6))) for _ in range(300)]
    text = " ".join(words) + " aaaa aaa abab ba ba ab ab éé ü 日本"
    return text.replace("cab", "cab<|endoftext|>", 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bpe_merges_match_naive_reference(tmp_path, seed):
    """train_bpe's merges equal the naive trainer's on tie-heavy corpora (ties -> greatest bytes)."""
    text = _tie_corpus(seed)
    p = tmp_path / "c.txt"
    p.write_text(text, encoding="utf-8")
    vocab, merges = bpe.train_bpe(str(p), 256 + 1 + 120, ["<|endoftext|>"])
    ref = naive_train(text, 256 + 1 + 120, ["<|endoftext|>"])
    assert merges == ref
    # vocab: bytes, then the special, then one entry per merge in order
    assert [vocab[i] for i in range(256)] == [bytes([i]) for i in range(256)]
    assert vocab[256] == b"<|endoftext|>"
    assert [vocab[257 + k] for k in range(len(merges))] == [a + b for a, b in merges]
    # "<|", "|>" and "endoftext" occur only inside the special: cut out first, so never learned
    assert not any(x in a + b for a, b in merges for x in (b"<|", b"|>", b"endoftext", b"<", b">"))


def test_bpe_merges_match_naive_on_real_text(tmp_path):
    """train_bpe's merges equal the naive trainer's on real mixed text with specials."""
    text = _corpus()[:20000]
    p = tmp_path / "c.txt"
    p.write_text(text, encoding="utf-8")
    _, merges = bpe.train_bpe(str(p), 256 + 3 + 150, SPECIALS)
    assert merges == naive_train(text, 256 + 3 + 150, SPECIALS)


def test_bpe_merging_stops_when_no_pairs_left(tmp_path):
    """Training stops early, like the naive trainer, once every word is one token."""
    p = tmp_path / "c.txt"
    p.write_text("ab ab", encoding="utf-8")
    vocab, merges = bpe.train_bpe(str(p), 1000, [])
    assert merges == naive_train("ab ab", 1000, []) and len(vocab) == 256 + len(merges)


@pytest.mark.slow
def test_bpe_chunked_counts_equal_single_process(tmp_path):
    """Word counts over safe chunks in a process pool equal one regex pass over the whole text."""
    # Chunks cut at special tokens or "x\n" line ends must not change a single pre-token.
    text = (_corpus()[:30000] + "\n\n\n   \n" + MIXED) * 2 + "no newline at the end"
    p = tmp_path / "c.txt"
    p.write_text(text, encoding="utf-8")
    ref = Counter(w.encode() for piece in regex.split(r"<\|endoftext\|>|<\|user\|>|<\|assistant\|>", text)
                  for w in regex.findall(bpe.GPT2_PATTERN, piece))
    bounds = bpe._chunk_boundaries(str(p), 12, SPECIALS, scan=512)
    assert len(bounds) > 8 and bounds == sorted(set(bounds))
    assert bpe.count_file_words(str(p), SPECIALS, workers=2, chunk_bytes=4096) == ref == bpe.count_words(text, SPECIALS)
    # without specials, cuts fall on line ends only
    assert bpe.count_file_words(str(p), [], workers=1, chunk_bytes=4096) == \
        Counter(w.encode() for w in regex.findall(bpe.GPT2_PATTERN, text))


def test_bpe_ascii_twin_agrees_with_unicode_regex():
    """The `re` ASCII twin and the mixed-text splitter give exactly `regex`'s pre-tokens."""
    r = random.Random(0)
    alphabet = [chr(i) for i in range(128)] + list("   \n\n'sdmtlvre")
    for pattern in (bpe.GPT2_PATTERN, bpe.SPLIT_DIGITS_PATTERN):
        full, fast = regex.compile(pattern), bpe.ascii_twin(pattern)
        for _ in range(1000):
            s = "".join(r.choice(alphabet) for _ in range(r.randint(0, 30)))
            assert fast.findall(s) == full.findall(s), repr(s)
        mixed = "".join(r.choice(alphabet + ["é", "日", "\u00a0", "\u2028", "٣"]) for _ in range(5000))
        assert bpe._findall(full, fast, mixed) == full.findall(mixed)  # dense non-ASCII
        for _ in range(300):      # sparse non-ASCII runs, also at the very start and end
            s = "".join(r.choice(alphabet) if r.random() > 0.02 else r.choice("é日\u00a0\u2028٣")
                        for _ in range(r.randint(0, 400)))
            assert bpe._findall(full, fast, s) == full.findall(s), repr(s)
    with pytest.raises(ValueError, match="pattern"):
        bpe.Tokenizer({i: bytes([i]) for i in range(256)}, [], pattern=r"\w+")


def test_bpe_pmi_matches_naive_reference(tmp_path):
    """PMI merges equal the naive PMI trainer's, and differ from count merges."""
    text = _tie_corpus(3) + " " + _corpus()[:3000]
    p = tmp_path / "c.txt"
    p.write_text(text, encoding="utf-8")
    _, merges = bpe.train_bpe(str(p), 256 + 1 + 60, ["<|endoftext|>"], merge_score="pmi")
    assert merges == naive_train(text, 256 + 1 + 60, ["<|endoftext|>"], score="pmi")
    _, by_count = bpe.train_bpe(str(p), 256 + 1 + 60, ["<|endoftext|>"])
    assert merges != by_count  # the option does change what is learned


def test_bpe_split_digits(tmp_path):
    """--split-digits matches the naive trainer on the LLaMA-style pattern and never merges a digit."""
    text = "in 2024 we sold 1234567 units for 99.99 dollars, 2024 again 2024 2024\n" * 50
    p = tmp_path / "c.txt"
    p.write_text(text, encoding="utf-8")
    _, plain = bpe.train_bpe(str(p), 300, [])
    vocab, merges = bpe.train_bpe(str(p), 300, [], split_digits=True)
    assert merges == naive_train(text, 300, [], pattern=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    digit = lambda t: any(48 <= x <= 57 for x in t)
    assert any(digit(a + b) for a, b in plain)                    # default: numbers get merged
    assert not any(digit(a + b) for a, b in merges)               # split: a digit never merges
    tok = bpe.Tokenizer(vocab, merges, pattern=bpe.SPLIT_DIGITS_PATTERN)
    assert len(tok.encode("1234567")) == 7
    tok.save(tmp_path / "tok")                                    # the pattern survives save/load
    assert bpe.Tokenizer.load(str(tmp_path / "tok")).encode(text) == tok.encode(text)


def test_bpe_merge_score_and_vocab_size_validation(tmp_path):
    """A bad merge_score or a vocab smaller than bytes + specials is a ValueError."""
    p = tmp_path / "c.txt"
    p.write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match="merge_score"):
        bpe.train_bpe(str(p), 300, [], merge_score="nope")
    with pytest.raises(ValueError, match="vocab_size"):
        bpe.train_bpe(str(p), 257, ["<|a|>", "<|b|>"])


# --- Tokenizer ---

def test_bpe_round_trips(trained):
    """decode(encode(t)) == t for every text, with and without specials; ids stay in range."""
    _, _, _, tok = trained
    plain = bpe.Tokenizer(trained[1], trained[2])
    r = random.Random(0)
    texts = ["", "hello world", "🙂🎉👩‍💻", "Größe Привет 日本語 مرحبا ok", MIXED, _corpus()[:5000],
             "<|endoftext|>x<|user|><|assistant|>", "\x00\x01\x7f\r\n"]
    texts += [bytes(r.randrange(256) for _ in range(200)).decode("utf-8", errors="replace") for _ in range(20)]
    for t in texts:
        for k in (tok, plain):
            ids = k.encode(t)
            assert k.decode(ids) == t
            assert all(0 <= i < len(k) for i in ids)
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_bpe_decode_invalid_utf8_gives_replacement(trained):
    """Ids that cut a character decode to U+FFFD; out-of-range ids are a ValueError."""
    tok = trained[3]
    ids = tok.encode("é")                       # 2 bytes; decode a lone first byte
    assert tok.decode([tok.byte_to_id[b"\xc3"]]) == "\ufffd"
    assert tok.decode([tok.byte_to_id[b"\xff"], *ids]) == "\ufffdé"
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "é"
    for bad in ([len(tok)], [-1], [0, 10 ** 9]):
        with pytest.raises(ValueError, match="out of range"):
            tok.decode(bad)


def test_bpe_matches_tiktoken(trained):
    """Our encode equals tiktoken's with the same ranks and specials, id for id."""
    path, vocab, merges, tok = trained
    sp = {s: tok.special_ids[s] for s in SPECIALS}
    enc = tiktoken.Encoding("ours", pat_str=bpe.GPT2_PATTERN, special_tokens=sp,
                            mergeable_ranks={b: i for i, b in vocab.items() if i not in sp.values()})
    r = random.Random(1)
    text = open(path, encoding="utf-8").read() + MIXED + "<|user|>hi<|assistant|>yo<|endoftext|><|endoftext|>"
    text += "".join(chr(r.choice([r.randrange(32, 127), r.randrange(160, 0x3000), 10, 32])) for _ in range(3000))
    assert tok.encode(text) == enc.encode(text, allowed_special="all")
    plain = bpe.Tokenizer(vocab, merges)          # no specials: "<|endoftext|>" is ordinary text
    assert plain.encode(text) == enc.encode_ordinary(text)
    assert tok.special_ids["<|endoftext|>"] not in plain.encode("<|endoftext|>")


def test_bpe_fast_encode_equals_plain(trained):
    """The fast encode (ASCII twin, cache, gc pause) gives the ids of the plain loop, `ids = _bpe(piece)`."""
    path, vocab, merges, tok = trained
    r = random.Random(2)
    text = open(path, encoding="utf-8").read() + MIXED + "<|user|>hi<|assistant|><|endoftext|><|endoftext|>"
    text += "".join(chr(r.choice([r.randrange(32, 127), r.randrange(160, 0x3000), 10, 13, 32])) for _ in range(3000))
    for specials, pattern in [(SPECIALS, bpe.GPT2_PATTERN), ([], bpe.SPLIT_DIGITS_PATTERN)]:
        plain = bpe.Tokenizer(vocab, merges, specials, pattern, fast=False)
        assert bpe.Tokenizer(vocab, merges, specials, pattern).encode(text) == plain.encode(text)


def test_bpe_special_tokens_longest_match_and_appended(trained):
    """Overlapping specials match longest first; specials missing from the vocab are appended in order."""
    _, vocab, merges, _ = trained
    eot = "<|endoftext|>"
    tok = bpe.Tokenizer(vocab, merges, [eot, eot + eot, "<|new|>"])
    ids = tok.encode(f"a{eot}{eot}b{eot}c<|new|>")
    assert ids[1] == tok.special_ids[eot + eot] and ids.count(tok.special_ids[eot]) == 1
    # specials missing from the vocab are appended, in order
    assert [tok.special_ids[eot + eot], tok.special_ids["<|new|>"]] == [len(vocab), len(vocab) + 1]
    assert tok.decode(ids) == f"a{eot}{eot}b{eot}c<|new|>"


def test_bpe_encode_iterable_equals_encode(trained, tmp_path):
    """encode_iterable over any chunking of a stream equals encode of the whole text."""
    path, vocab, merges, tok = trained
    text = open(path, encoding="utf-8").read()[:30000] + "\n\n\n  \n" + MIXED + "end<|user|>\n<|assistant|>"
    p = tmp_path / "t.txt"
    p.write_text(text, encoding="utf-8")
    with open(p, encoding="utf-8", newline="") as f:
        it = tok.encode_iterable(f)
        assert not isinstance(it, list)
        assert list(it) == tok.encode(text)
    chunks = [text[i:i + 7] for i in range(0, len(text), 7)]      # arbitrary cuts, mid-word too
    assert list(tok.encode_iterable(chunks)) == tok.encode(text)
    odd = bpe.Tokenizer(vocab, merges, ["x\n<|sep|>"])             # a special spanning a newline
    assert list(odd.encode_iterable(["ab x\n", "<|sep|>cd\n"])) == odd.encode("ab x\n<|sep|>cd\n")


def test_bpe_save_from_files_identical(trained, tmp_path):
    """save -> from_files/load gives the same vocab, merges and ids (GPT-2 file format)."""
    path, vocab, merges, tok = trained
    tok.save(tmp_path / "tok")
    names = sorted(os.listdir(tmp_path / "tok"))
    assert names == ["merges.txt", "special_tokens.json", "vocab.json"]
    raw = json.load(open(tmp_path / "tok" / "vocab.json", encoding="utf-8"))
    assert raw["Ġthe"] == tok.byte_to_id[b" the"] and raw["<|endoftext|>"] == tok.special_ids["<|endoftext|>"]
    lines = open(tmp_path / "tok" / "merges.txt", encoding="utf-8").read().splitlines()
    assert lines[0].startswith("#version") and len(lines) == len(merges) + 1
    back = bpe.Tokenizer.from_files(str(tmp_path / "tok" / "vocab.json"), str(tmp_path / "tok" / "merges.txt"),
                                    SPECIALS)
    text = open(path, encoding="utf-8").read()[:20000] + MIXED
    assert back.vocab == tok.vocab and back.merges == tok.merges
    assert back.encode(text) == tok.encode(text)
    assert bpe.Tokenizer.load(str(tmp_path / "tok")).encode(text) == tok.encode(text)


def test_bpe_bytes_to_unicode_is_gpt2_table():
    """bytes_to_unicode is GPT-2's table: a bijection onto printable non-space characters."""
    t = bpe.bytes_to_unicode()
    assert len(set(t.values())) == 256
    assert t[ord(" ")] == "Ġ" and t[ord("\n")] == "Ċ" and t[ord("A")] == "A" and t[0] == "Ā"
    assert all(ch.isprintable() and not ch.isspace() for ch in t.values())


@pytest.mark.slow
def test_bpe_encode_file_memmap(trained, tmp_path):
    """encode_file over chunks in a process pool writes exactly encode's ids as a uint16 memmap."""
    path, _, _, tok = trained
    tok.save(tmp_path / "tok")
    n = bpe.encode_file(str(tmp_path / "tok"), path, str(tmp_path / "a.bin"), workers=2, chunk_bytes=8192,
                        verbose=False)
    arr = np.memmap(tmp_path / "a.bin", dtype=np.uint16, mode="r")
    assert n == len(arr) and arr.tolist() == tok.encode(open(path, encoding="utf-8", newline="").read())
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_bpe_encode_file_uint32_for_big_vocab(tmp_path):
    """Ids above 65535 are written as uint32 (token_dtype's rule)."""
    vocab = {i: bytes([i]) for i in range(256)}
    vocab[70000] = b"<|big|>"                       # ids above 65535 need uint32
    tok = bpe.Tokenizer(vocab, [], ["<|big|>"])
    tok.save(tmp_path / "tok")
    (tmp_path / "t.txt").write_text("hi<|big|>", encoding="utf-8")
    bpe.encode_file(str(tmp_path / "tok"), str(tmp_path / "t.txt"), str(tmp_path / "t.bin"), verbose=False)
    assert np.fromfile(tmp_path / "t.bin", dtype=np.uint32).tolist() == [104, 105, 70000]
    assert bpe.token_dtype(65536) == np.uint16 and bpe.token_dtype(65537) == np.uint32


# --- CLI ---

@pytest.mark.slow
def test_bpe_cli_fit_encode_stats(tmp_path, capsys):
    """The train/encode/stats subcommands run end to end; the .bin equals Tokenizer.encode."""
    p = tmp_path / "c.txt"
    p.write_text(_corpus()[:20000], encoding="utf-8")
    bpe.main(["train", "--input", str(p), "--vocab-size", "400", "--out", str(tmp_path / "tok"),
              "--special-tokens", *SPECIALS])
    out = capsys.readouterr()
    assert "bytes/token" in out.out and "merges" in out.err
    bpe.main(["encode", "--tokenizer", str(tmp_path / "tok"), "--input", str(p), "--out", str(tmp_path / "c.bin")])
    tok = bpe.Tokenizer.load(str(tmp_path / "tok"))
    assert np.fromfile(tmp_path / "c.bin", dtype=np.uint16).tolist() == tok.encode(p.read_text(encoding="utf-8"))
    bpe.main(["stats", "--tokenizer", str(tmp_path / "tok"), "--input", str(p)])
    out = capsys.readouterr().out
    assert "bytes/token" in out and "multilingual cost" in out and "digits" in out


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "bpe.py", *args], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.abspath(bpe.__file__)))


@pytest.mark.slow
def test_bpe_cli_bad_input(tmp_path):
    """Bad inputs end in a one-line error, no traceback, and clobber no file."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "ok.txt").write_text("hello hello world\n")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "vocab.json").write_text("{not json")
    (tmp_path / "junk" / "merges.txt").write_text("")
    (tmp_path / "keep.bin").write_bytes(b"old")
    cases = [
        (["train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "300", "--out", str(tmp_path / "t1")],
         "not found", tmp_path / "t1"),
        (["train", "--input", str(tmp_path / "empty.txt"), "--vocab-size", "300", "--out", str(tmp_path / "t2")],
         "empty", tmp_path / "t2"),
        (["train", "--input", str(tmp_path / "ok.txt"), "--vocab-size", "200", "--out", str(tmp_path / "t3")],
         "vocab_size", tmp_path / "t3"),
        (["encode", "--tokenizer", str(tmp_path / "nodir"), "--input", str(tmp_path / "ok.txt"),
          "--out", str(tmp_path / "o.bin")], "not found", tmp_path / "o.bin"),
        (["encode", "--tokenizer", str(tmp_path / "junk"), "--input", str(tmp_path / "ok.txt"),
          "--out", str(tmp_path / "keep.bin")], "JSON", None),
        (["stats", "--tokenizer", str(tmp_path / "junk"), "--input", str(tmp_path / "ok.txt")], "JSON", None),
    ]
    for args, needle, must_not_exist in cases:
        r = _cli(*args)
        assert r.returncode != 0, args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)
        if must_not_exist is not None:
            assert not must_not_exist.exists()
    assert (tmp_path / "keep.bin").read_bytes() == b"old"          # a failed run clobbers nothing
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


# --- edge cases: overlapping specials, wider safe cuts, long words ---

def test_bpe_chunker_never_splits_overlapping_specials(tmp_path):
    """With overlapping specials ("<|endoftext|>" inside its double), encode_file at 1 KB chunks == encode."""
    eot = "<|endoftext|>"
    r = random.Random(5)
    for specials in ([eot, eot + eot], ["<|a|>", "x<|a|>"]):
        docs = ["".join(r.choice("abc de\n") for _ in range(r.randint(0, 60))) for _ in range(400)]
        text = "".join(d + r.choice(specials) * r.randint(1, 3) for d in docs)
        tok = bpe.Tokenizer({i: bytes([i]) for i in range(256)}, [], specials)
        tok.save(tmp_path / "tok")
        (tmp_path / "t.txt").write_text(text, encoding="utf-8")
        bpe.encode_file(str(tmp_path / "tok"), str(tmp_path / "t.txt"), str(tmp_path / "t.bin"), workers=1,
                        chunk_bytes=1024, verbose=False)
        assert np.fromfile(tmp_path / "t.bin", dtype=np.uint16).tolist() == tok.encode(text)


def _pretok(pattern, text):
    return regex.findall(pattern, text)


EDGE_TEXTS = {  # files whose lines end in CRLF, in CJK, in trailing spaces
    "crlf": "".join(f"line {i} of a windows file, words and 12.5 numbers\r\n" for i in range(300)),
    "cjk": "".join(f"日本語のテキスト{i}です。中文句子。\n" for i in range(300)),
    "trailing": "".join(f"a line with trailing spaces {i}   \n\t\n" for i in range(300)),
}


def test_bpe_safe_cuts_keep_pretokens():
    """Cutting at every safe cut leaves each pre-token of one regex pass unchanged (random text, both patterns)."""
    r = random.Random(7)
    alphabet = list("ab1.' \t\r\n\n") + ["\xa0", "\u3000", "\x85", "\x1c", "日", "é", "'s", "\r\n", "  \n"]
    for n in range(400):
        s = "".join(r.choice(alphabet) for _ in range(r.randint(0, 40)))
        for pattern in (bpe.GPT2_PATTERN, bpe.SPLIT_DIGITS_PATTERN):
            for m in bpe._CUT.finditer(s):
                k = m.start()
                assert _pretok(pattern, s[:k]) + _pretok(pattern, s[k:]) == _pretok(pattern, s), (s, k)
        assert bpe._cut_before(s, 0, len(s)) == max([m.start() for m in bpe._CUT.finditer(s)] + [0])
    ascii_part = _corpus()[:3000].encode("ascii", "ignore").decode()
    full, fast = regex.compile(bpe.GPT2_PATTERN), bpe.ascii_twin(bpe.GPT2_PATTERN)
    for name, s in EDGE_TEXTS.items():
        assert bpe._cut_before(s, 0, len(s)) > len(s) // 2, name  # the new rule finds cuts in them
        mixed = ascii_part + s[:2000] + ascii_part + s[:300] + "\n" + ascii_part[:100]
        assert bpe._findall(full, fast, mixed) == full.findall(mixed), name  # ASCII twin around these cuts


def test_bpe_edge_files_get_chunks_and_equal_one_pass(trained, tmp_path):
    """CRLF, CJK and trailing-space files split into several chunks, and chunked counts/ids == one pass."""
    _, vocab, merges, tok = trained
    tok.save(tmp_path / "tok")
    for name, text in EDGE_TEXTS.items():
        text = text + "<|endoftext|>" + text.replace("\n", " \u3000\n")  # a wide space must not count as x
        p = tmp_path / f"{name}.txt"
        p.write_text(text, encoding="utf-8", newline="")
        bounds = bpe._chunk_boundaries(str(p), 16, [], scan=256)
        assert len(bounds) > 8, (name, bounds)
        assert bpe.count_file_words(str(p), SPECIALS, workers=1, chunk_bytes=512) == bpe.count_words(text, SPECIALS)
        bpe.encode_file(str(tmp_path / "tok"), str(p), str(tmp_path / "t.bin"), workers=1, chunk_bytes=512,
                        verbose=False)
        assert np.fromfile(tmp_path / "t.bin", dtype=np.uint16).tolist() == tok.encode(text), name


def test_bpe_encode_iterable_streams_edge_files(trained):
    """encode_iterable yields ids before a CRLF/CJK/trailing-space stream ends, and the ids == encode."""
    tok = trained[3]
    for name, text in EDGE_TEXTS.items():
        lines = text.splitlines(keepends=True)
        read = []

        def stream():
            for line in lines:
                read.append(line)
                yield line

        it = tok.encode_iterable(stream())
        first = next(it)
        assert len(read) < len(lines) // 2, name       # a paragraph, not the whole stream, was buffered
        assert [first, *it] == tok.encode(text), name
        chunks = [text[i:i + 5] for i in range(0, len(text), 5)]
        assert list(tok.encode_iterable(chunks)) == tok.encode(text), name


def test_bpe_long_word_merge_equals_plain(trained):
    """The heap + linked-list merge of long pre-tokens gives the plain merge loop's ids."""
    _, vocab, merges, tok = trained
    r = random.Random(3)
    words = ["".join(r.choice(alpha) for _ in range(r.randint(1000, 4000)))
             for alpha in ("abcdefghijklmnopqrstuvwxyz", "ab", "etaoin ", "éü日")] + ["ab" * 2000, "a" * 3001]
    for w in words:
        assert bpe._bpe_long(tok, w) == tok._bpe(w)
    plain = bpe.Tokenizer(vocab, merges, SPECIALS, fast=False)
    text = " ".join(words)
    assert tok.encode(text) == plain.encode(text)


# --- stats: the pathology sections ---

def test_bpe_stats_rare_tokens_equal_naive_count(trained):
    """under_trained == a naive count over encode's ids: learned, non-special entries used <= max_count times."""
    _, vocab, _, tok = trained
    text = _corpus()[:8000] + "<|user|>"
    naive = {i: 0 for i in tok.vocab}
    for i in tok.encode(text):
        naive[i] += 1
    for m in (0, 1, 3):
        want = sorted((c, i) for i, c in naive.items() if c <= m and len(tok.vocab[i]) > 1 and i not in (256, 257, 258))
        assert bpe.under_trained(tok, text, m) == want and want
    assert all(c <= 1 for c, _ in bpe.under_trained(tok, text)) and (0, 257) not in bpe.under_trained(tok, "x")


def test_bpe_stats_cost_by_group_equals_naive_sums(trained):
    """cost_by_group == per-group sums of (tokens, bytes, chars, strings) done by hand; bytes-only: tokens == bytes."""
    tok, r = trained[3], random.Random(5)
    pairs = [(r.choice("abc"), MIXED[r.randrange(300):][:r.randrange(40)]) for _ in range(60)]
    got = bpe.cost_by_group(tok, pairs)
    for g in "abc":
        mine = [(len(tok.encode(s)), len(s.encode("utf-8")), len(s)) for h, s in pairs if h == g]
        assert list(got[g]) == [sum(x[0] for x in mine), sum(x[1] for x in mine), sum(x[2] for x in mine), len(mine)]
    raw = bpe.Tokenizer({i: bytes([i]) for i in range(256)}, [])
    for t, b, _, _ in bpe.cost_by_group(raw, pairs).values():
        assert t == b  # no merges: one token per byte, tokens/byte == 1 in every language


def test_bpe_stats_sections(trained, tmp_path, capsys):
    """`stats` prints the four sections; with a bytes-only vocab each indent costs its width and every language
    1 token/byte (closed forms); --ckpt's median embedding norm == torch's on the checkpoint."""
    (tmp_path / "par.txt").write_text("# c\nen\tThe cat.\nru\tКошка.\n", encoding="utf-8")
    raw = bpe.Tokenizer({i: bytes([i]) for i in range(256)}, [])
    text = "x = 1\n    y = 22\n    z\n\tw 4444\n"
    bpe.print_stats(raw, text, parallel=str(tmp_path / "par.txt"))
    out = capsys.readouterr().out
    for title in ("under-trained tokens", "multilingual cost", "digits", "code"):
        assert f"\n{title}" in out
    assert "'····' (2): 4.00" in out and "'\\t' (1): 1.00" in out and "1: 1.00 (1.00) | 2: 2.00 (1.00) | 4: 4.00" in out
    assert "1.000 tokens/byte" in out and "ru" in out and "Кошка" not in out
    m = M.TransformerLM(tiny_cfg(vocab_size=len(trained[3])))
    torch.save({"model": m.state_dict(), "config": dict(vars(m.cfg))}, tmp_path / "c.pt")
    trained[3].save(tmp_path / "tok")
    bpe.main(["stats", "--tokenizer", str(tmp_path / "tok"), "--input", trained[0], "--ckpt", str(tmp_path / "c.pt")])
    assert f"median {m.token_embeddings.weight.detach().norm(dim=1).median():.3f}," in capsys.readouterr().out


# ---------------------------------------------------------------
# bpe.py, other tokenizers: WordPiece (MaxMatch) and the Unigram LM (EM, Viterbi, sampling).
# Trusted references: brute-force enumeration of every segmentation of short strings, hand-worked
# MaxMatch, the definition of one EM step, round trips on random Unicode.

ALGO_SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>"]


def _algo_corpus():
    """~40 KB: stdlib docs, mixed scripts, numbers, code; documents cut by a special token."""
    t = pydoc_topics
    mixed = ("Größenordnung, l'élève français. Привет, мир! 日本語のテキスト。 مرحبا 🙂🎉 👩‍💻\n"
             "    def f(x):\n        return x + 1234567  # code\n\n\t\ttabs\r\n")
    return "<|endoftext|>".join([t.topics[k] for k in sorted(t.topics)[:12]] + [mixed * 3] * 4)


@pytest.fixture(scope="module")
def algo_toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("algos")
    (d / "corpus.txt").write_text(_algo_corpus(), encoding="utf-8")
    toks = {a: bpe.train_tokenizer(a, str(d / "corpus.txt"), 420, ALGO_SPECIALS, workers=1)
            for a in ("bpe", "wordpiece")}
    toks["unigram"] = bpe.train_tokenizer("unigram", str(d / "corpus.txt"), 420, ALGO_SPECIALS, workers=1,
                                         seed_size=1500, shrink=0.6)  # fewer rounds: a faster test
    return toks


def _random_unicode(rng, n):
    """Random code points: ASCII, Latin-1, combining marks, Cyrillic, CJK, astral, digits, whitespace runs, specials."""
    ranges = [(0x20, 0x7E), (0xA0, 0xFF), (0x300, 0x36F), (0x400, 0x4FF), (0x4E00, 0x4E80), (0x1F300, 0x1F6FF),
              (0x10000, 0x1007F), (0x30, 0x39)]
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.1:
            out.append(rng.choice([" " * rng.randint(1, 9), "\n" * rng.randint(1, 4), "\t\t", "\r\n", "\u3000 "]))
        elif r < 0.15:
            out.append(rng.choice(ALGO_SPECIALS))
        else:
            lo, hi = rng.choice(ranges)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def _segmentations(word, pieces):
    """Every way to spell `word` as a sequence of `pieces` (the naive reference)."""
    if not word:
        return [[]]
    return [[word[:k]] + rest for k in range(1, len(word) + 1) if word[:k] in pieces
            for rest in _segmentations(word[k:], pieces)]


def _toy_logp(rng, pieces):
    raw = {p: rng.random() + 0.05 for p in pieces}
    total = sum(raw.values())
    return {p: math.log(v / total) for p, v in raw.items()}


def test_bpe_digit_groups_pattern():
    """Digit groups = naive left-to-right 3-chunks of every digit run, no text lost; n=1 == SPLIT_DIGITS_PATTERN."""
    p3 = bpe.digit_groups_pattern(bpe.GPT2_PATTERN, 3)
    assert regex.findall(p3, "1234567") == ["123", "456", "7"]
    assert regex.findall(p3, "x 2024.5") == ["x", " ", "202", "4", ".", "5"]
    rng = random.Random(0)
    for _ in range(200):
        s = "".join(rng.choice(["1", "23", "4567", "a", "bc", " ", "  ", ".", "\n", "٣"]) for _ in range(12))
        got = regex.findall(p3, s)
        want = [run[i:i + 3] for run in regex.findall(r"\p{N}+", s) for i in range(0, len(run), 3)]
        assert [t for t in got if regex.fullmatch(r"\p{N}+", t)] == want
        assert all(not regex.search(r"\p{N}", t) for t in got if not regex.fullmatch(r"\p{N}+", t))
        assert "".join(got) == s
        p1 = bpe.digit_groups_pattern(bpe.GPT2_PATTERN, 1)
        assert regex.findall(p1, s) == regex.findall(bpe.SPLIT_DIGITS_PATTERN, s)
    with pytest.raises(ValueError):
        bpe.digit_groups_pattern(bpe.SPLIT_DIGITS_PATTERN, 3)


def test_bpe_wordpiece_maxmatch_by_hand():
    """WordPiece = greedy longest match (worked by hand), byte fallback; word-initial " the" != internal "the"."""
    vocab = {i: bytes([i]) for i in range(256)}
    for p in [b"xa", b"xab", b"bcd", b" the", b"the", b"\xc3\xa9t\xc3\xa9"]:
        vocab[len(vocab)] = p
    tok = bpe.WordPieceTokenizer(vocab)
    spell = lambda s: [tok.vocab[i] for i in tok.encode(s)]
    assert spell("xabcd") == [b"xab", b"c", b"d"]  # the fewest would be xa|bcd
    assert spell(" the bathe") == [b" the", b" ", b"b", b"a", b"the"]
    assert spell("été!") == [b"\xc3\xa9t\xc3\xa9", b"!"]
    assert spell("xé") == [b"x", b"\xc3", b"\xa9"]  # no piece: single bytes
    assert tok.encode(" the") != tok.encode("the")


def test_bpe_unigram_viterbi_equals_brute_force():
    """Viterbi == the best of all enumerated segmentations of short strings (random scores: a unique best)."""
    rng = random.Random(1)
    for trial in range(30):
        pieces = {bytes([c]) for c in b"abc"} | {bytes(rng.choice(b"abc") for _ in range(rng.randint(2, 4)))
                                                 for _ in range(12)}
        logp = _toy_logp(rng, pieces)
        for _ in range(5):
            w = bytes(rng.choice(b"abc") for _ in range(rng.randint(1, 9)))
            best = max(_segmentations(w, pieces), key=lambda seg: sum(logp[p] for p in seg))
            assert bpe.unigram_segment(w, logp, 4) == best


def test_bpe_unigram_em_step_by_hand():
    """One EM step == its definition on a toy corpus: counts and log-likelihood by enumerating segmentations."""
    rng = random.Random(2)
    pieces = {b"a", b"b", b"c", b"ab", b"bc", b"abc", b"ca"}
    logp = _toy_logp(rng, pieces)
    words = {b"ab": 3, b"abc": 1, b"bca": 2, b"cab": 1}
    counts, loglik = Counter(), 0.0
    for w, c in words.items():
        segs = _segmentations(w, pieces)
        weights = [math.exp(sum(logp[p] for p in seg)) for seg in segs]
        loglik += c * math.log(sum(weights))
        for seg, wt in zip(segs, weights):
            for p in seg:
                counts[p] += c * wt / sum(weights)
    new, got_ll = bpe.unigram_em_step(words, logp, 3)
    total = sum(counts.values())
    assert set(new) == pieces and all(counts[p] > 1e-3 for p in pieces)  # no floor involved
    for p in pieces:
        assert math.isclose(new[p], math.log(counts[p] / total), rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(got_ll, loglik, rel_tol=1e-12)


def test_bpe_unigram_sampling_matches_enumeration():
    """Sampled segmentations follow P(seg)^alpha / Z (enumerated exactly); a large alpha gives Viterbi's."""
    rng = random.Random(3)
    pieces = {b"a", b"b", b"c", b"d", b"ab", b"bc", b"cd", b"abc", b"bcd"}
    logp = _toy_logp(rng, pieces)
    w, alpha, n = b"abcd", 0.5, 4000
    segs = _segmentations(w, pieces)
    weights = [math.exp(alpha * sum(logp[p] for p in seg)) for seg in segs]
    gen = np.random.default_rng(0)
    seen = Counter(tuple(bpe.unigram_segment(w, logp, 3, alpha, gen)) for _ in range(n))
    assert set(seen) <= {tuple(s) for s in segs}
    for seg, wt in zip(segs, weights):
        assert abs(seen[tuple(seg)] / n - wt / sum(weights)) < 0.03
    assert bpe.unigram_segment(w, logp, 3, 200.0, gen) == bpe.unigram_segment(w, logp, 3)


def test_bpe_unigram_prune_by_loss():
    """Pruning keeps all bytes and the piece of largest loss freq(x) (log p(x) - log p(alt(x))), worked by hand."""
    logp = {bytes([i]): math.log(1 / 1000) for i in range(256)}
    logp.update({b"ab": math.log(0.2), b"cd": math.log(0.1), b"zz": math.log(0.05)})
    pruned = bpe.unigram_prune({b"ab": 10, b"cd": 1, b"xy": 5}, logp, 2, keep=1)
    assert set(pruned) == set(logp) - {b"cd", b"zz"}  # "zz" is never used: loss 0
    assert pruned[b"ab"] == logp[b"ab"]


def test_bpe_algos_round_trip_random_unicode(algo_toks):
    """decode(encode(x)) == x on random Unicode (astral, combining, whitespace runs, specials), sampled Unigram too."""
    rng = random.Random(4)
    texts = [_random_unicode(rng, rng.randint(0, 300)) for _ in range(40)] + ["", " ", "\n\n\n", "<|user|" ">"]
    uni = algo_toks["unigram"]
    sampler = bpe.UnigramTokenizer(uni.vocab, uni.special_tokens, uni.pattern, uni.scores, alpha=0.2, seed=0)
    for tok in (algo_toks["wordpiece"], uni, sampler):
        for s in texts:
            assert tok.decode(tok.encode(s)) == s
    assert len({tuple(sampler.encode(_algo_corpus()[:3000])) for _ in range(3)}) > 1  # a fresh draw each call


def test_bpe_algos_specials_never_split(algo_toks):
    """Specials are one id each wherever they stand, as often as they occur; encode_iterable == encode."""
    text = "a<|endoftext|><|endoftext|>b <|user|>x<|assistant|>\n\nend<|endoftext|>"
    lines = [text[i:i + 7] for i in range(0, len(text), 7)]
    for name in ("wordpiece", "unigram"):
        tok = algo_toks[name]
        ids = tok.encode(text)
        for s in ALGO_SPECIALS:
            assert tok.encode(s) == [tok.special_ids[s]]
            assert ids.count(tok.special_ids[s]) == text.count(s)
        assert list(tok.encode_iterable(lines)) == ids
        big = _algo_corpus()
        assert list(tok.encode_iterable(big.splitlines(keepends=True))) == tok.encode(big)


def test_bpe_algos_save_load(algo_toks, tmp_path):
    """save -> Tokenizer.load round trip (class, vocab, scores, ids) for all three; a bad pieces.json is a ValueError."""
    text = _algo_corpus()[:5000]
    for name, tok in algo_toks.items():
        tok.save(tmp_path / name)
        back = bpe.Tokenizer.load(str(tmp_path / name))
        assert type(back) is type(tok) and back.vocab == tok.vocab and back.encode(text) == tok.encode(text)
        assert getattr(back, "scores", None) == getattr(tok, "scores", None)
    assert len(algo_toks["unigram"]) == len(algo_toks["wordpiece"]) == 420
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pieces.json").write_text('{"algorithm": "unigram"}')
    with pytest.raises(ValueError, match="pieces.json"):
        bpe.Tokenizer.load(str(tmp_path / "bad"))


def test_bpe_unigram_compresses(algo_toks):
    """Unigram compresses within 25% of BPE (same vocab, same text), keeps " the" whole, sorts pieces by p."""
    tok, ref, text = algo_toks["unigram"], algo_toks["bpe"], _algo_corpus()
    n = len(text.encode())
    assert n / len(tok.encode(text)) > 0.75 * n / len(ref.encode(text))
    assert [tok.vocab[i] for i in tok.encode(" the")] == [b" the"]
    learned = [tok.scores[i] for i in range(256 + len(ALGO_SPECIALS), len(tok))]
    assert learned == sorted(learned, reverse=True)


def test_bpe_digit_groups_tokenizers(tmp_path):
    """--digit-groups 3: no token of any algorithm spans 4 digits, and round trips hold (naive check)."""
    (tmp_path / "c.txt").write_text("x 1234567 y 89 2024-05-17\n" * 200, encoding="utf-8")
    p3 = bpe.digit_groups_pattern(bpe.GPT2_PATTERN, 3)
    for algo in ("bpe", "wordpiece", "unigram"):
        tok = bpe.train_tokenizer(algo, str(tmp_path / "c.txt"), 300, [], p3, workers=1)
        ids = tok.encode("1234567 and 20240517")
        assert tok.decode(ids) == "1234567 and 20240517"
        assert not any(regex.search(r"\d{4}", tok.vocab[i].decode("utf-8", "replace")) for i in ids)
        assert bpe.ascii_twin(p3).findall("a 20240517 b") == regex.findall(p3, "a 20240517 b")


@pytest.mark.slow  # whole CLIs (in-process)
@pytest.mark.parametrize("algo", ["bpe", "wordpiece", "unigram"])
def test_bpe_algos_cli_round_trip(tmp_path, capsys, algo):
    """`bpe.py train --algorithm A` -> Tokenizer.load gives class A; the encode CLI's .bin == encode; round trip."""
    p = tmp_path / "c.txt"
    p.write_text(_algo_corpus()[:12000], encoding="utf-8")
    bpe.main(["train", "--algorithm", algo, "--input", str(p), "--vocab-size", "330", "--out", str(tmp_path / "tok"),
              "--special-tokens", *ALGO_SPECIALS, "--workers", "1", "--digit-groups", "3"])
    assert f"{algo}: vocab 330" in capsys.readouterr().out
    tok = bpe.Tokenizer.load(str(tmp_path / "tok"))
    assert getattr(tok, "algorithm", "bpe") == algo and tok.pattern == bpe.digit_groups_pattern(bpe.GPT2_PATTERN, 3)
    bpe.main(["encode", "--tokenizer", str(tmp_path / "tok"), "--input", str(p), "--out", str(tmp_path / "c.bin"),
              "--workers", "1"])
    text = p.read_text(encoding="utf-8")
    ids = np.fromfile(tmp_path / "c.bin", dtype=np.uint16).tolist()
    assert ids == tok.encode(text) and tok.decode(ids) == text


def test_bpe_save_over_other_algorithm(algo_toks, tmp_path, capsys):
    """A BPE saved over a Unigram dir loads as BPE (the stale pieces.json is removed); --split-digits and
    --digit-groups together are a usage error."""
    algo_toks["unigram"].save(tmp_path / "t")
    algo_toks["bpe"].save(tmp_path / "t")
    assert type(bpe.Tokenizer.load(str(tmp_path / "t"))) is bpe.Tokenizer
    with pytest.raises(SystemExit):  # argparse's usage error, before any file is touched
        bpe.main(["train", "--input", str(tmp_path / "x.txt"), "--vocab-size", "300", "--out", str(tmp_path / "u"),
                  "--split-digits", "--digit-groups", "3"])
    assert "not allowed with" in capsys.readouterr().err and not (tmp_path / "u").exists()


@pytest.mark.slow
def test_bpe_encode_alpha_samples_reproducibly_and_decode_exactly(algo_toks, tmp_path):
    """`bpe.py encode --alpha`: every sampled id stream decodes to the input, a seed gives the same ids for any
    worker count, samples differ from Viterbi and across seeds; a non-Unigram tokenizer is a one-line error."""
    tok = algo_toks["unigram"]
    tok.save(str(tmp_path / "uni"))
    algo_toks["bpe"].save(str(tmp_path / "bpe"))
    inp = tmp_path / "in.txt"
    inp.write_text(_algo_corpus(), encoding="utf-8")

    def enc(name, **kw):
        bpe.encode_file(str(tmp_path / "uni"), str(inp), str(tmp_path / name), chunk_bytes=16 << 10, verbose=False, **kw)
        return np.fromfile(tmp_path / name, dtype=bpe.token_dtype(tok.vocab_size))

    viterbi, a1 = enc("v.bin", workers=1), enc("a1.bin", workers=1, alpha=0.3, seed=1)
    a2, b = enc("a2.bin", workers=2, alpha=0.3, seed=1), enc("b.bin", workers=1, alpha=0.3, seed=2)
    assert np.array_equal(a1, a2)
    assert tok.decode(a1.tolist()) == tok.decode(b.tolist()) == tok.decode(viterbi.tolist()) == _algo_corpus()
    assert not np.array_equal(a1, viterbi) and not np.array_equal(a1, b)
    with pytest.raises(SystemExit, match="^error: --alpha samples Unigram"):
        bpe.main(["encode", "--tokenizer", str(tmp_path / "bpe"), "--input", str(inp), "--out", str(tmp_path / "x.bin"), "--alpha", "0.5"])


# ---------------------------------------------------------------
# bpe.py, HF tokenizer.json: a Hugging Face byte-level BPE loads as our Tokenizer and encodes id for id as HF does.
# Trusted reference: the `tokenizers` library's own encode of the file it saved.

HF_TRICKY = ("Hello  world!\n\n\tdef f(x):\n        return x+1234567   # it's we'll they'RE\r\n"
             "Größe l'élève Привет 日本語 🙂🎉 👩‍💻  \u00a0 \u3000 x<|endoftext|>y <|user|>hi<|assistant|> 007 3.14159   \n")
CL100K_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def _hf_bpe_json(tmp_path, split_regex=None):
    """Train a tiny byte-level BPE with HF `tokenizers` (GPT-2's ByteLevel regex, or a Split regex before ByteLevel) -> its tokenizer.json."""
    tk = pytest.importorskip("tokenizers")
    t = tk.Tokenizer(tk.models.BPE())
    byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_regex is None)
    t.pre_tokenizer = byte_level if split_regex is None else tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.Split(tk.Regex(split_regex), behavior="isolated"), byte_level])
    t.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=600, special_tokens=ALGO_SPECIALS, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator([_algo_corpus(), HF_TRICKY * 3], trainer)
    d = tmp_path / ("hf_split" if split_regex else "hf")
    d.mkdir()
    t.save(str(d / "tokenizer.json"))
    return t, d


@pytest.mark.parametrize("split", [None, CL100K_PATTERN], ids=["gpt2-bytelevel", "cl100k-split"])
def test_bpe_loads_hf_tokenizer_json_with_identical_ids(tmp_path, split):
    """Tokenizer.load of an HF byte-level BPE tokenizer.json: the same ids as HF's encode on tricky text (whitespace runs,
    contractions, digits, non-ASCII, emoji, specials), and decode(encode(x)) == x."""
    hf, d = _hf_bpe_json(tmp_path, split)
    ours = bpe.Tokenizer.load(str(d))
    for text in (HF_TRICKY, _algo_corpus()[:20000], "", "   ", "<|endoftext|>"):
        assert ours.encode(text) == hf.encode(text).ids
        assert ours.decode(ours.encode(text)) == text
    assert ours.special_ids == {s: hf.token_to_id(s) for s in ALGO_SPECIALS}


def test_bpe_hf_tokenizer_json_refusals(tmp_path):
    """A tokenizer.json that is not byte-level BPE (here: WordPiece) is a one-line error; a foreign regex refuses chunked encode_file."""
    hf, d = _hf_bpe_json(tmp_path, CL100K_PATTERN)
    (tmp_path / "in.txt").write_text(HF_TRICKY, encoding="utf-8")
    with pytest.raises(ValueError, match="no known safe cuts"):
        bpe.encode_file(str(d), str(tmp_path / "in.txt"), str(tmp_path / "o.bin"), verbose=False)
    j = json.loads((d / "tokenizer.json").read_text())
    j["model"]["type"] = "WordPiece"
    (d / "tokenizer.json").write_text(json.dumps(j))
    with pytest.raises(ValueError, match="only byte-level BPE"):
        bpe.Tokenizer.load(str(d))



# ===============================================================
# model.py (-k model): the Transformer's blocks against torch's own ops, the mask as worldview,
# the masked-LM objective, FLOPs, sampling (KV cache, truncations, speculative decoding), device
# and peak-FLOPs lookup, and the export to Hugging Face Llama (identical logits).
# ===============================================================


# ---------------------------------------------------------------
# Primitives vs torch
# ---------------------------------------------------------------


def test_model_state_dict_names_shapes_and_init():
    """State-dict names/shapes follow the CS336 convention, num_params == count_params, and the inits have the stated std (vs F.linear/F.embedding)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(num_kv_heads=2)
    m = M.TransformerLM(cfg)
    sd = m.state_dict()
    want = {"token_embeddings.weight": (61, 32), "ln_final.weight": (32,), "lm_head.weight": (61, 32)}
    for i in range(2):
        want.update({f"layers.{i}.attn.q_proj.weight": (32, 32), f"layers.{i}.attn.k_proj.weight": (16, 32),
                     f"layers.{i}.attn.v_proj.weight": (16, 32), f"layers.{i}.attn.output_proj.weight": (32, 32),
                     f"layers.{i}.ln1.weight": (32,), f"layers.{i}.ln2.weight": (32,),
                     f"layers.{i}.ffn.w1.weight": (48, 32), f"layers.{i}.ffn.w2.weight": (32, 48),
                     f"layers.{i}.ffn.w3.weight": (48, 32)})  # fmt: skip
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert m.num_params() == M.count_params(cfg) == sum(v.numel() for v in sd.values())
    tied = M.TransformerLM(tiny_cfg(tie_embeddings=True))
    assert tied.num_params() == M.count_params(tied.cfg) == M.count_params(cfg) - 61 * 32 + 2 * 2 * 16 * 32
    # Linear: truncated normal, sigma^2 = 2/(d_in + d_out), clipped at 3 sigma
    lin = M.Linear(300, 500)
    std = math.sqrt(2 / 800)
    assert abs(lin.weight.std().item() - std * 0.9866) < 0.02 * std  # std of N(0,1) truncated at +-3 is 0.9866
    assert lin.weight.abs().max().item() <= 3 * std + 1e-6
    x = torch.randn(3, 7, 300)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight))
    emb = M.Embedding(1000, 64)
    ids = torch.randint(0, 1000, (4, 5))
    torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight))
    assert emb.weight.abs().max() <= 3.0 and abs(emb.weight.std().item() - 0.9866) < 0.02


def test_model_embedding_backward_is_deterministic_on_two_threads():
    """The embedding's gradient is index_add_ of the upstream rows (one fixed summation order), bit for bit, run after run on 2 threads."""
    torch.manual_seed(0)
    emb, ids, dy = M.Embedding(64, 32), torch.randint(0, 64, (16, 128)), torch.randn(16, 128, 32)
    ref = torch.zeros(64, 32).index_add_(0, ids.flatten(), dy.view(-1, 32))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the old `weight[ids]` summed a repeated token's rows in thread-dependent order
    try:
        for _ in range(5):
            emb.weight.grad = None
            emb(ids).backward(dy)
            assert torch.equal(emb.weight.grad, ref)
    finally:
        torch.set_num_threads(threads)


def test_model_softmax_silu_cross_entropy_vs_torch():
    """Our softmax, SiLU and cross-entropy equal torch's, including at logits of 1e3 and with ignored (-100) labels."""
    x = torch.randn(5, 11, dtype=torch.float64)
    for scale in (1.0, 1000.0):
        torch.testing.assert_close(M.softmax(x * scale, dim=-1), torch.softmax(x * scale, dim=-1))
        torch.testing.assert_close(M.softmax(x * scale, dim=0), torch.softmax(x * scale, dim=0))
        logits, y = torch.randn(2, 6, 13) * scale, torch.randint(0, 13, (2, 6))
        torch.testing.assert_close(TR.cross_entropy(logits, y), F.cross_entropy(logits.view(-1, 13), y.view(-1)))
        y[0, :4] = -100  # ignored positions (MLM: unmasked tokens)
        torch.testing.assert_close(TR.cross_entropy(logits, y), F.cross_entropy(logits.view(-1, 13), y.view(-1), ignore_index=-100))
    assert torch.isfinite(M.softmax(torch.tensor([1e4, 0.0, -1e4]), -1)).all()
    torch.testing.assert_close(M.silu(x * 30), F.silu(x * 30))


def test_model_rmsnorm_and_swiglu_vs_reference():
    """RMSNorm equals F.rms_norm (fp32 and bf16 in/out) and SwiGLU equals its F.linear/F.silu formula."""
    torch.manual_seed(0)
    norm = M.RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16) * 7
    torch.testing.assert_close(norm(x), F.rms_norm(x, (16,), norm.weight, eps=1e-5))
    xb = x.bfloat16()
    out = norm(xb)
    assert out.dtype == torch.bfloat16  # computed in fp32, cast back
    torch.testing.assert_close(out, F.rms_norm(xb.float(), (16,), norm.weight, eps=1e-5).bfloat16())
    ffn = M.SwiGLU(16, 40)
    ref = F.linear(F.silu(F.linear(x, ffn.w1.weight)) * F.linear(x, ffn.w3.weight), ffn.w2.weight)
    torch.testing.assert_close(ffn(x), ref)


def test_model_sdpa_with_and_without_mask_vs_torch():
    """From-scratch attention equals F.scaled_dot_product_attention, with and without a boolean mask."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 5)
    torch.testing.assert_close(M.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    mask = torch.rand(7, 9) > 0.4
    mask[:, 0] = True  # every query sees at least one key
    torch.testing.assert_close(M.scaled_dot_product_attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_model_rope_matches_complex_rotation_and_is_relative(monkeypatch):
    """RoPE equals the 2-D rotation of each pair by pos·θ_k written out in reals, eager (complex multiply) and under
    torch.compile (its real form), and q·k depends only on the offset."""
    torch.manual_seed(0)
    d, theta = 8, 10000.0
    rope = M.RotaryEmbedding(theta, d, 64)
    x = torch.randn(2, 10, d)
    pos = torch.arange(10)
    # reference: the 2-D rotation of each pair (x[2k], x[2k+1]) by pos * theta^(-2k/d), written out in reals
    ang = pos[:, None].float() * theta ** (-torch.arange(0, d, 2).float() / d)  # (T, d/2)
    for xin in (x, x.bfloat16()):  # bf16 in, bf16 out (computed in fp32)
        x1, x2 = xin.float()[..., 0::2], xin.float()[..., 1::2]
        want = torch.stack((x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()), -1).flatten(-2)
        torch.testing.assert_close(rope(xin, pos), want.to(xin.dtype))
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: True)
            torch.testing.assert_close(rope(xin, pos), want.to(xin.dtype))
    # relative property: <R_i q, R_j k> depends only on i - j
    q, k = torch.randn(d), torch.randn(d)

    def score(i, j):
        return (rope(q[None], torch.tensor([i])) * rope(k[None], torch.tensor([j]))).sum().item()

    for off in (0, 3, -5):
        s = [score(i, i - off) for i in (7, 20, 40)]
        assert max(s) - min(s) < 1e-4
    assert abs(score(10, 7) - score(10, 2)) > 1e-3  # ... and it does depend on the offset


# ---------------------------------------------------------------
# Attention backends, the mask as worldview, the whole LM
# ---------------------------------------------------------------


@pytest.mark.parametrize("causal,kv", [(True, None), (False, None), (True, 2)])
def test_model_attention_backends_agree(causal, kv):
    """The scratch and sdpa attention backends give the same logits (causal, encoder, GQA)."""
    torch.manual_seed(0)
    m = M.TransformerLM(tiny_cfg(causal=causal, num_kv_heads=kv, attn_backend="scratch"))
    idx = torch.randint(0, 61, (2, 17))
    ref = m(idx)
    m.cfg.attn_backend = "sdpa"
    torch.testing.assert_close(m(idx), ref, atol=1e-5, rtol=1e-5)


def test_model_triton_backend_in_interpreter_agrees():
    """The Triton FlashAttention backend (CPU interpreter) gives the same logits as sdpa."""
    torch.manual_seed(0)
    cfg = M.ModelConfig(vocab_size=17, context_length=16, d_model=32, num_layers=1, num_heads=2, d_ff=32, attn_backend="sdpa")
    m = M.TransformerLM(cfg)
    idx = torch.randint(0, 17, (1, 16))
    ref = m(idx)
    m.cfg.attn_backend = "triton"  # on CPU kernels.py runs the kernel in Triton's interpreter
    torch.testing.assert_close(m(idx), ref, atol=1e-4, rtol=1e-4)


def test_model_causal_sees_no_future_encoder_sees_all():
    """Changing token 8 leaves a causal model's earlier logits unchanged and changes a bidirectional encoder's."""
    torch.manual_seed(0)
    idx = torch.randint(0, 61, (1, 12))
    idx2 = idx.clone()
    idx2[0, 8] = (idx[0, 8] + 1) % 61
    dec = M.TransformerLM(tiny_cfg())
    a, b = dec(idx), dec(idx2)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4
    enc = M.TransformerLM(tiny_cfg(causal=False))
    assert (enc(idx)[:, :8] - enc(idx2)[:, :8]).abs().max() > 1e-4  # bidirectional: the past sees the change


def test_model_mlm_corruption_proportions():
    """mlm_corrupt selects 15% of positions and splits them 80/10/10 into [MASK]/random/unchanged (BERT)."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 100, (200, 500), generator=g)
    inp, labels = M.mlm_corrupt(idx, mask_token_id=100, vocab_size=100, generator=g)
    sel = labels != -100
    assert abs(sel.float().mean().item() - 0.15) < 0.005
    assert torch.equal(labels[sel], idx[sel]) and torch.equal(inp[~sel], idx[~sel])
    n = sel.sum().item()
    masked = (inp == 100) & sel
    same = (inp == idx) & sel
    rand = sel & ~masked & ~same  # random replacement; a random token equal to the original counts as "same"
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(rand.sum().item() / n - 0.1 * 0.99) < 0.01
    assert abs(same.sum().item() / n - (0.1 + 0.1 * 0.01)) < 0.01
    assert (inp[~sel] != 100).all()


def test_model_flops_and_mfu_closed_form():
    """flops_per_token == 6N + 12·L·d·T (PaLM) on the 124M config, and MFU is FLOP/s over the peak (None on CPU)."""
    cfg = M.ModelConfig(vocab_size=50304, context_length=1024, d_model=768, num_layers=12, num_heads=12)
    n = M.count_params(cfg, non_embedding=True)
    assert M.flops_per_token(cfg) == 6 * n + 12 * 12 * 768 * 1024
    assert 80e6 < n < 130e6  # a GPT-2-small-class model
    assert M.estimate_mfu(cfg, 1000.0, peak_flops=1e12) == pytest.approx(M.flops_per_token(cfg) * 1000 / 1e12)
    assert M.estimate_mfu(cfg, 1000.0, device="cpu") is None


@pytest.mark.parametrize("vocab_size", [8192, 50304])
def test_model_gpt2_small_config_on_meta_device(vocab_size, capsys):
    """The 124M-class / --preset gpu config (d768 L12 H12 T1024) built on the meta device has count_params parameters, and `info` prints them with FLOPs and bf16 memory."""
    cfg = M.ModelConfig(vocab_size=vocab_size, context_length=1024, d_model=768, num_layers=12, num_heads=12)
    m = M.TransformerLM(cfg, device="meta")  # no memory, no init cost: shapes only
    assert next(m.parameters()).is_meta
    assert sum(p.numel() for p in m.parameters()) == m.num_params() == M.count_params(cfg)
    assert m.num_params(non_embedding=True) == M.count_params(cfg, non_embedding=True)
    assert M.count_params(cfg, non_embedding=True) == 12 * (4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768) + 768 + vocab_size * 768
    M.main(["info", "--vocab-size", str(vocab_size), "--context-length", "1024", "--d-model", "768", "--num-layers", "12",
            "--num-heads", "12", "--batch-size", "8"])
    out = capsys.readouterr().out
    assert f"params {M.count_params(cfg):,}" in out and f"train FLOPs/token {M.flops_per_token(cfg):.3e}" in out
    mem = M.memory_bytes(cfg, 8)
    assert mem["weights"] == mem["grads"] == 2 * M.count_params(cfg) and mem["optimizer"] == 12 * M.count_params(cfg)
    assert "training memory at bf16, batch 8 x 1024" in out and f"activations {mem['activations'] / 2**30:.2f} GiB" in out


def _saved_tensor_bytes(m, idx):
    """Bytes of the distinct non-parameter storages autograd saves for the backward of forward + loss."""
    params, seen = {p.untyped_storage().data_ptr() for p in m.parameters()}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(m(idx).float().flatten(0, 1), idx.flatten())
    return sum(seen.values())


@pytest.mark.parametrize("kw", [dict(), dict(num_kv_heads=2, d_ff=96), dict(d_model=128, num_layers=3, vocab_size=1024)])
def test_model_activation_memory_matches_saved_tensors(kw):
    """memory_bytes' activation count is within 5% of the bytes autograd really saves in a bf16 forward + loss."""
    base = dict(vocab_size=256, context_length=32, d_model=64, num_layers=2, num_heads=4)
    cfg = M.ModelConfig(**{**base, **kw})
    m = M.TransformerLM(cfg, dtype=torch.bfloat16)
    measured = _saved_tensor_bytes(m, torch.randint(0, cfg.vocab_size, (2, 32)))
    assert M.memory_bytes(cfg, 2)["activations"] == pytest.approx(measured, rel=0.05)


# ---------------------------------------------------------------
# Architecture variants (the ablations): norms, positions, FFNs, dropout, windows, checkpointing
# ---------------------------------------------------------------

VARIANTS = [dict(norm="layernorm"), dict(norm="none"), dict(norm_position="post"), dict(pos_emb="sinusoidal"),
            dict(pos_emb="learned"), dict(pos_emb="none"), dict(ffn="silu"), dict(ffn="gelu"), dict(ffn="relu2"),
            dict(norm="layernorm", pos_emb="learned", ffn="gelu", tie_embeddings=True), dict(window=5), dict(dropout=0.1)]


def test_model_learned_positions_start_small_as_gpt2():
    """--pos-emb learned: the position table starts at GPT-2's σ 0.02, the token table at N(0, 1)."""
    m = M.TransformerLM(M.ModelConfig(pos_emb="learned"))
    assert abs(m.position_embeddings.weight.std().item() - 0.02) < 0.002
    assert abs(m.token_embeddings.weight.std().item() - 1.0) < 0.05


def test_model_layernorm_vs_torch_and_post_norm_block_by_hand():
    """LayerNorm == F.layer_norm (weight and bias); a post-norm block == ln2(h + ffn(h)), h = ln1(x + attn(x)), by hand; norm none is the identity."""
    torch.manual_seed(0)
    ln = M.LayerNorm(32)
    with torch.no_grad():
        ln.weight.normal_(), ln.bias.normal_()
    x = torch.randn(3, 5, 32) * 4 + 2
    torch.testing.assert_close(ln(x), F.layer_norm(x, (32,), ln.weight, ln.bias, eps=1e-5))
    block = M.TransformerBlock(tiny_cfg(norm="layernorm", norm_position="post"))
    h = F.layer_norm(x + block.attn(x), (32,), block.ln1.weight, block.ln1.bias, eps=1e-5)
    want = F.layer_norm(h + block.ffn.w2(F.silu(block.ffn.w1(h)) * block.ffn.w3(h)), (32,), block.ln2.weight, block.ln2.bias, eps=1e-5)
    torch.testing.assert_close(block(x), want)
    pre = M.TransformerBlock(tiny_cfg(norm="none"))
    torch.testing.assert_close(pre(x), x + pre.attn(x) + pre.ffn(x + pre.attn(x)))
    assert not [k for k in M.TransformerLM(tiny_cfg(norm="none")).state_dict() if "ln" in k]


def test_model_sinusoidal_table_vs_formula():
    """sinusoidal_table == Vaswani et al.'s PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same), entry by entry (odd d too)."""
    for d in (8, 7):
        pe = M.sinusoidal_table(12, d)
        want = [[(math.sin if c % 2 == 0 else math.cos)(p / 10000 ** ((c - c % 2) / d)) for c in range(d)] for p in range(12)]
        torch.testing.assert_close(pe, torch.tensor(want), atol=1e-6, rtol=0)
    m = M.TransformerLM(tiny_cfg(pos_emb="sinusoidal"))
    assert "sinusoids" not in m.state_dict() and m.layers[0].attn.rope is None  # a function of the config, not a weight


@pytest.mark.parametrize("act", ["silu", "gelu", "relu2"])
def test_model_two_matrix_mlp_vs_torch(act):
    """MLP(x) == W2 act(W1 x) with torch's F.silu, F.gelu(approximate="tanh") (GPT-2's gelu_new) and relu(x)²; d_ff defaults to 4·d."""
    torch.manual_seed(0)
    mlp = M.TransformerBlock(tiny_cfg(ffn=act, d_ff=None)).ffn
    assert mlp.w1.weight.shape == (128, 32) and not hasattr(mlp, "w3")
    x = torch.randn(2, 5, 32)
    ref = {"silu": F.silu, "gelu": lambda h: F.gelu(h, approximate="tanh"), "relu2": lambda h: F.relu(h) ** 2}[act]
    torch.testing.assert_close(mlp(x), ref(x @ mlp.w1.weight.t()) @ mlp.w2.weight.t())


@pytest.mark.parametrize("kw", VARIANTS + [dict(num_kv_heads=2, d_ff=None, ffn="relu2")], ids=str)
def test_model_count_params_and_flops_exact_for_every_variant(kw):
    """count_params == the parameters the variant really has (total and non-embedding), and flops_per_token == torch's FlopCounterMode of fwd+bwd (scratch backend: full T x T)."""
    cfg = tiny_cfg(**{"attn_backend": "scratch", **kw})
    m = M.TransformerLM(cfg)
    assert sum(p.numel() for p in m.parameters()) == m.num_params() == M.count_params(cfg)
    lookups = (0 if cfg.tie_embeddings else 61 * 32) + (32 * 32 if cfg.pos_emb == "learned" else 0)
    assert m.num_params(non_embedding=True) == M.count_params(cfg, non_embedding=True) == m.num_params() - lookups
    counter = FlopCounterMode(display=False)
    with counter:
        m(torch.randint(0, 61, (2, 32))).sum().backward()
    norm_gains = {"rmsnorm": 1, "layernorm": 2, "none": 0}[cfg.norm] * 32 * (2 * 2 + 1)  # elementwise: no matmul FLOPs
    assert counter.get_total_flops() == (M.flops_per_token(cfg) - 6 * norm_gains) * 2 * 32


def test_model_dropout_off_in_eval_and_sampling():
    """Dropout: eval and no_grad forwards (and sampling) are deterministic and equal dropout=0's; training forwards differ; inverted dropout keeps the mean."""
    torch.manual_seed(0)
    for backend in ("sdpa", "scratch"):
        m, m0 = M.TransformerLM(tiny_cfg(dropout=0.3, attn_backend=backend)), M.TransformerLM(tiny_cfg(attn_backend=backend))
        m0.load_state_dict(m.state_dict())
        idx = torch.randint(0, 61, (2, 20))
        assert not torch.equal(m(idx), m(idx))  # train mode with a graph: dropout on
        with torch.no_grad():
            assert torch.equal(m(idx), m0(idx))  # train mode, no graph (how train.py samples mid-run)
        m.eval(), m0.eval()
        assert torch.equal(m(idx), m(idx)) and torch.equal(m(idx), m0(idx))
        sampled = [M.generate(x.train(), idx[:, :4], 10, temperature=1.0, generator=torch.Generator().manual_seed(1)) for x in (m, m0)]
        assert torch.equal(*sampled)  # generate is no_grad: train mode samples without dropout
    kept = M.dropout(torch.ones(200_000), 0.3)
    assert abs((kept == 0).float().mean().item() - 0.3) < 0.01 and abs(kept.mean().item() - 1) < 0.01


def test_model_sliding_window_vs_banded_sdpa_and_kv_cache():
    """window W: attention == SDPA with the banded mask (i - W < j <= i), both backends; only positions >= W change; KV-cached generation == the no-cache reference."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 12, 8) for _ in range(3))
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - 5))
    for backend in ("scratch", "sdpa"):
        torch.testing.assert_close(M.MultiHeadSelfAttention(tiny_cfg(window=5, attn_backend=backend))._attend(q, k, v), want)
    m, full = M.TransformerLM(tiny_cfg(window=5, num_kv_heads=2)).eval(), M.TransformerLM(tiny_cfg(num_kv_heads=2)).eval()
    full.load_state_dict(m.state_dict())
    idx = torch.randint(0, 61, (2, 20))
    a, b = m(idx), full(idx)
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:])
    prompt = torch.randint(0, 61, (2, 3))
    out, ref = M.generate(m, prompt, 26, temperature=0), prompt  # 29 > window: the decode steps must mask too
    for _ in range(26):
        ref = torch.cat([ref, m(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kw", [dict(), dict(dropout=0.2, norm="layernorm", pos_emb="learned")])
def test_model_activation_checkpointing_bit_identical_grads(kw):
    """activation_checkpointing recomputes each block in backward: the same loss and bit-identical gradients (dropout's RNG replayed)."""
    torch.manual_seed(0)
    plain, ckpt = M.TransformerLM(tiny_cfg(**kw)), M.TransformerLM(tiny_cfg(activation_checkpointing=True, **kw))
    ckpt.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 61, (2, 32))
    losses = []
    for m in (plain, ckpt):
        torch.manual_seed(1)
        loss = F.cross_entropy(m(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        losses.append(loss)
    assert torch.equal(*losses)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("kw", VARIANTS, ids=str)
def test_model_every_variant_survives_save_load_sample(tmp_path, kw):
    """Each variant's config goes into the checkpoint: load_model rebuilds the same model (same logits) and generate samples from it."""
    torch.manual_seed(0)
    m = M.TransformerLM(tiny_cfg(**kw)).eval()
    TR.save_checkpoint(m, TR.AdamW(m.parameters()), 0, str(tmp_path / "ckpt.pt"))
    back, ckpt = M.load_model(str(tmp_path / "ckpt.pt"))
    assert ckpt["config"] == M.asdict(m.cfg) and back.cfg == m.cfg and not back.training
    idx = torch.randint(0, 61, (2, 10))
    assert torch.equal(back(idx), m(idx))
    assert M.generate(back, idx, 5, temperature=0.8, generator=torch.Generator().manual_seed(0)).shape == (2, 15)


@pytest.mark.parametrize("kw", [dict(norm="batchnorm"), dict(ffn="relu"), dict(pos_emb="alibi"), dict(window=0), dict(dropout=1.0),
                                dict(window=4, causal=False), dict(num_heads=8, d_model=24)], ids=str)
def test_model_bad_variant_config_is_an_error(kw):
    """An unknown norm / ffn / pos_emb, window < 1 or on an encoder, dropout outside [0, 1), odd RoPE heads: ValueError naming the field (odd heads are fine without RoPE)."""
    with pytest.raises(ValueError, match="|".join(kw) + "|RoPE"):
        tiny_cfg(**kw)
    assert tiny_cfg(num_heads=8, d_model=24, pos_emb="none").num_heads == 8


def test_model_variant_flags_reach_the_checkpoint(tmp_path):
    """train.py's variant flags build that ModelConfig (each field a flag of its name), train, and the checkpoint's config rebuilds it."""
    np.random.default_rng(0).integers(0, 61, 3000).astype(np.uint16).tofile(tmp_path / "train.bin")
    np.random.default_rng(1).integers(0, 61, 500).astype(np.uint16).tofile(tmp_path / "val.bin")
    flags = ["--norm", "layernorm", "--norm-position", "post", "--pos-emb", "sinusoidal", "--ffn", "relu2", "--dropout", "0.1",
             "--window", "8", "--activation-checkpointing"]
    TR.main(["--data", str(tmp_path), "--out-dir", str(tmp_path / "out"), "--vocab-size", "61", "--d-model", "32", "--num-layers", "1",
             "--context-length", "16", "--batch-size", "2", "--max-steps", "2", "--eval-steps", "1", "--sample-every", "0", *flags])
    m, _ = M.load_model(str(tmp_path / "out" / "ckpt.pt"))
    assert (m.cfg.norm, m.cfg.norm_position, m.cfg.pos_emb, m.cfg.ffn, m.cfg.dropout, m.cfg.window, m.cfg.activation_checkpointing) == (
        "layernorm", "post", "sinusoidal", "relu2", 0.1, 8, True)
    with pytest.raises(SystemExit, match="^error: need 0 <= dropout < 1"):
        TR.main(["--data", str(tmp_path), "--out-dir", str(tmp_path / "bad"), "--vocab-size", "61", "--context-length", "16", "--dropout", "1.5"])


def _to_hf_gpt2(m):
    """Our GPT-2-shaped TransformerLM's weights under GPT2LMHeadModel's names (its Conv1D stores (in, out): transposed)."""
    sd = m.state_dict()
    hf = {"transformer.wte.weight": sd["token_embeddings.weight"], "transformer.wpe.weight": sd["position_embeddings.weight"],
          "transformer.ln_f.weight": sd["ln_final.weight"], "transformer.ln_f.bias": sd["ln_final.bias"]}
    for i in range(m.cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        hf[theirs + "attn.c_attn.weight"] = torch.cat([sd[ours + f"attn.{n}_proj.weight"] for n in "qkv"]).t()
        hf[theirs + "attn.c_proj.weight"] = sd[ours + "attn.output_proj.weight"].t()
        hf[theirs + "mlp.c_fc.weight"], hf[theirs + "mlp.c_proj.weight"] = sd[ours + "ffn.w1.weight"].t(), sd[ours + "ffn.w2.weight"].t()
        for a, b in (("ln1", "ln_1"), ("ln2", "ln_2")):
            hf[theirs + b + ".weight"], hf[theirs + b + ".bias"] = sd[ours + a + ".weight"], sd[ours + a + ".bias"]
    return hf


def test_model_gpt2_flags_equal_hf_gpt2_logits():
    """--norm layernorm --pos-emb learned --ffn gelu --tie-embeddings is GPT-2: the same logits as HF GPT2LMHeadModel (gelu_new) with our weights, its linear biases left at their zero init."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = M.TransformerLM(tiny_cfg(norm="layernorm", pos_emb="learned", ffn="gelu", tie_embeddings=True, d_ff=None)).eval()
    with torch.no_grad():  # random norm gains and biases, so a mis-mapped norm cannot pass
        for name, p in m.named_parameters():
            if ".ln" in name or "ln_final" in name:
                p.normal_()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=128, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)).eval()
    linear_biases = [k for k in hf.state_dict() if k.endswith(("c_attn.bias", "c_proj.bias", "c_fc.bias"))]
    assert len(linear_biases) == 2 * 4 and all((hf.state_dict()[k] == 0).all() for k in linear_biases)
    missing, unexpected = hf.load_state_dict(_to_hf_gpt2(m), strict=False)
    assert not unexpected and set(missing) <= set(linear_biases) | {"lm_head.weight"}
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, like ours
    idx = torch.randint(0, 61, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, m(idx), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(norm="layernorm"), dict(pos_emb="learned"), dict(ffn="gelu"), dict(window=8), dict(norm_position="post")], ids=str)
def test_model_export_hf_refuses_what_llama_cannot_express(tmp_path, kw):
    """export-hf of a config HF Llama cannot express is a one-line error naming the field, and writes nothing."""
    pytest.importorskip("transformers")
    m = M.TransformerLM(tiny_cfg(**kw))
    TR.save_checkpoint(m, TR.AdamW(m.parameters()), 0, str(tmp_path / "ckpt.pt"))
    with pytest.raises(SystemExit, match=f"^error: HF Llama cannot express {next(iter(kw))}=") as e:
        M.main(["export-hf", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()


# ---------------------------------------------------------------
# Sampling: KV cache, truncations, speculative decoding
# ---------------------------------------------------------------


def test_model_generate_kv_cache_equals_no_cache():
    """KV-cached generate draws the same tokens as re-running the sequence without a cache (greedy, sampled, past the window), and stop tokens end rows."""
    torch.manual_seed(0)
    m = M.TransformerLM(tiny_cfg(num_kv_heads=2)).eval()
    prompt = torch.randint(0, 61, (2, 5))
    out = M.generate(m, prompt, 20, temperature=0)
    ref = prompt
    for _ in range(20):  # no cache: re-run the whole sequence every step
        ref = torch.cat([ref, m(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)
    # sampling with the same generator draws the same tokens with and without the cache
    out = M.generate(m, prompt, 12, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(3))
    g, ref = torch.Generator().manual_seed(3), prompt
    for _ in range(12):
        probs = M.logits_to_probs(m(ref)[:, -1], 0.9, top_k=20)
        ref = torch.cat([ref, torch.multinomial(probs, 1, generator=g)], 1)
    assert torch.equal(out, ref)
    # past the window (context 32) generate slides it: the reference re-runs the last 32 tokens every step
    long = M.generate(m, prompt, 40, temperature=1.0, generator=torch.Generator().manual_seed(0))
    g, ref = torch.Generator().manual_seed(0), prompt
    for _ in range(40):
        ref = torch.cat([ref, torch.multinomial(M.logits_to_probs(m(ref[:, -32:])[:, -1]), 1, generator=g)], 1)
    assert long.shape == (2, 45) and torch.equal(long, ref)
    greedy, ref = M.generate(m, prompt, 40, temperature=0), prompt
    for _ in range(40):
        ref = torch.cat([ref, m(ref[:, -32:])[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, ref)
    # stop token ends (and pads) rows
    stop = int(out[0, 5])
    s = M.generate(m, prompt[:1], 10, temperature=0.9, top_k=20, stop_token=stop, generator=torch.Generator().manual_seed(3))
    assert s.shape == (1, 6) and s[0, -1] == stop


def test_model_logits_to_probs_truncations_vs_reference():
    """top-k, top-p, min-p, greedy and temperature give the hand-computed distributions."""
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    torch.testing.assert_close(M.logits_to_probs(logits, top_k=2), torch.tensor([[4 / 7, 3 / 7, 0, 0, 0]]))
    torch.testing.assert_close(M.logits_to_probs(logits, top_p=0.7), torch.tensor([[4 / 7, 3 / 7, 0, 0, 0]]))
    torch.testing.assert_close(M.logits_to_probs(logits, top_p=0.71), torch.tensor([[0.4, 0.3, 0.15, 0, 0]]) / 0.85)
    torch.testing.assert_close(M.logits_to_probs(logits, min_p=0.3), torch.tensor([[0.4, 0.3, 0.15, 0, 0]]) / 0.85)
    torch.testing.assert_close(M.logits_to_probs(logits, temperature=0), torch.tensor([[1.0, 0, 0, 0, 0]]))
    t = M.logits_to_probs(logits, temperature=2.0)
    torch.testing.assert_close(t, torch.softmax(logits / 2, -1))


@pytest.mark.parametrize("kw", [dict(top_p=0.0), dict(top_p=-0.5), dict(top_p=1.5), dict(temperature=-1.0),
                                dict(min_p=1.5), dict(top_k=-1)])
def test_model_sampling_knobs_out_of_range_are_errors(kw):
    """top_p outside (0, 1], a negative temperature, min_p outside [0, 1] or top_k < 0 is a ValueError, never NaN or a reversed distribution."""
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    with pytest.raises(ValueError, match="sampling needs"):
        M.logits_to_probs(logits, **kw)
    m = M.TransformerLM(tiny_cfg()).eval()
    with pytest.raises(ValueError):
        M.generate(m, torch.zeros(1, 3, dtype=torch.long), 2, **kw)
    # the edges of the valid ranges still sample: top_p = 1 keeps everything, a tiny top_p the top token
    torch.testing.assert_close(M.logits_to_probs(logits, top_p=1.0), torch.softmax(logits, -1))
    torch.testing.assert_close(M.logits_to_probs(logits, top_p=1e-9), torch.tensor([[1.0, 0, 0, 0, 0]]))


def test_model_speculative_accept_rule_is_exact():
    """The accept/reject rule emits tokens distributed as p whatever q is (Leviathan et al. Thm 1)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    counts = torch.zeros(4)
    N = 6000
    for _ in range(N):
        x = torch.multinomial(q[0], 1, generator=g)
        counts[M.speculative_accept(p, q, x, g)[0]] += 1
    assert (counts / N - p[0]).abs().max() < 0.02


def test_model_speculative_greedy_and_self_draft():
    """Draft == target accepts every proposal; greedy speculative decoding reproduces the target's greedy generate."""
    torch.manual_seed(0)
    m = M.TransformerLM(tiny_cfg()).eval()
    prompt = torch.randint(0, 61, (1, 4))
    stats = {}
    out = M.speculative_generate(m, m, prompt, 20, k=4, temperature=0, stats=stats)
    assert torch.equal(out, M.generate(m, prompt, 20, temperature=0))
    assert stats["accepted"] == stats["proposed"] > 0
    stats = {}
    out = M.speculative_generate(m, m, prompt, 20, k=3, temperature=1.0, generator=torch.Generator().manual_seed(1), stats=stats)
    assert out.shape == (1, 24) and stats["accepted"] == stats["proposed"]
    # a different draft: greedy speculative decoding still reproduces the target's greedy output
    draft = M.TransformerLM(tiny_cfg(num_layers=1)).eval()
    stats = {}
    out = M.speculative_generate(m, draft, prompt, 20, k=3, temperature=0, stats=stats)
    assert torch.equal(out, M.generate(m, prompt, 20, temperature=0)) and stats["accepted"] < stats["proposed"]


def _exact_joint(m, prompt, n_new, V):
    """P(x_1..x_n | prompt) for every one of the V^n continuations, from one batched forward pass."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n_new)))  # (V^n, n), base-V order
    full = torch.cat([prompt.expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        logp = torch.log_softmax(m(full).double(), -1)[:, prompt.shape[1] - 1 : -1]  # (V^n, n, V): predicts x_1..x_n
    return logp.gather(-1, seqs[..., None])[..., 0].sum(-1).exp()


def _chi_square(counts, p):
    """Pearson's statistic, cells with an expected count < 5 pooled into one -> (statistic, degrees of freedom)."""
    expected = counts.sum() * p
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    return (((obs - exp) ** 2)[keep] / exp[keep]).sum().item(), int(keep.sum()) - 1


def test_model_speculative_k3_distinct_draft_matches_target_joint():
    """With k=3 and a distinct draft, the 3-token outputs follow the target's exact joint (chi-square over all 27 sequences), not the draft's."""
    torch.manual_seed(0)
    V, n_new, N = 3, 3, 800
    target = M.TransformerLM(M.ModelConfig(vocab_size=V, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)).eval()
    draft = copy.deepcopy(target)
    with torch.no_grad():  # a softer target (every sequence has mass) and a draft that disagrees with it
        target.lm_head.weight.mul_(0.5)
        draft.lm_head.weight.copy_(target.lm_head.weight + 0.25 * torch.randn_like(target.lm_head.weight))
    prompt = torch.tensor([[0, 2]])
    g, counts, stats = torch.Generator().manual_seed(0), torch.zeros(V ** n_new, dtype=torch.float64), {}
    proposed = accepted = 0
    for _ in range(N):
        out = M.speculative_generate(target, draft, prompt, n_new, k=3, temperature=1.0, generator=g, stats=stats)
        counts[sum(int(x) * V ** (n_new - 1 - j) for j, x in enumerate(out[0, 2:]))] += 1
        proposed, accepted = proposed + stats["proposed"], accepted + stats["accepted"]
    assert 0.2 < accepted / proposed < 0.9  # both paths exercised: accepted drafts and residual resamples
    p_target, p_draft = _exact_joint(target, prompt, n_new, V), _exact_joint(draft, prompt, n_new, V)
    stat, df = _chi_square(counts, p_target)
    assert stat < df + 4 * math.sqrt(2 * df), (stat, df)  # ~4 sigma of a chi-square with df degrees of freedom
    stat_draft, df_draft = _chi_square(counts, p_draft)
    assert stat_draft > 3 * (df_draft + 4 * math.sqrt(2 * df_draft)), stat_draft  # and it tells the two joints apart


# ---------------------------------------------------------------
# Devices and peak FLOPs
# ---------------------------------------------------------------


def test_model_peak_flops_matched_by_exact_name(monkeypatch):
    """device_peak_flops looks a GPU up by its exact name: "NVIDIA L40" is unknown (None), not the L4's peak."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, want in (("NVIDIA L4", 121e12), ("NVIDIA L40", None), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA H100 80GB HBM3", 989e12), ("nvidia h100 80gb hbm3", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert M.device_peak_flops("cuda") == want, name
    assert M.device_peak_flops("cpu") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_model_pick_device_missing_cuda_is_one_line_error():
    """Asking for cuda on a CPU-only machine is a one-line SystemExit, not torch's traceback; cpu is always there."""
    with pytest.raises(SystemExit) as e:
        M.pick_device("cuda")
    assert str(e.value).startswith("error:") and "\n" not in str(e.value)
    with pytest.raises(SystemExit):
        M.pick_device("gpu0")
    assert M.pick_device("cpu") == "cpu" and M.pick_device(None) in ("cpu", "mps")


# ---------------------------------------------------------------
# Hugging Face export
# ---------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(num_kv_heads=2), dict(tie_embeddings=True),
                                dict(num_kv_heads=2, tie_embeddings=True, rope_theta=5e5)])
def test_model_export_hf_llama_identical_logits(tmp_path, kw):
    """An exported checkpoint loads in HF LlamaForCausalLM with our logits (GQA, tied, theta 5e5); config.json carries theta in 4.x and 5.x form."""
    transformers = pytest.importorskip("transformers")  # test-only dependency (requirements-dev.txt)
    torch.manual_seed(0)
    m = M.TransformerLM(tiny_cfg(**kw)).eval()
    opt = TR.AdamW(m.parameters())
    TR.save_checkpoint(m, opt, 0, str(tmp_path / "ckpt.pt"))
    M.main(["export-hf", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, m(idx), atol=1e-5, rtol=1e-4)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    theta = kw.get("rope_theta", 10000.0)
    assert config["rope_theta"] == theta and config["rope_parameters"]["rope_theta"] == theta  # 4.x reads the first


def test_model_export_hf_failed_swap_keeps_previous_export(tmp_path, monkeypatch):
    """When the final rename fails, export-hf is a one-line error, the previous export is intact and no temp dir is left."""
    pytest.importorskip("transformers")
    m = M.TransformerLM(tiny_cfg())
    TR.save_checkpoint(m, TR.AdamW(m.parameters()), 0, str(tmp_path / "ckpt.pt"))
    out = tmp_path / "hf"
    M.export_hf(str(tmp_path / "ckpt.pt"), str(out))
    (out / "MARK").write_text("the previous export")
    real_replace = os.replace

    def disk_full_on_swap(src, dst):  # the new export (no MARK) cannot be renamed onto out
        if os.path.abspath(dst) == str(out) and not os.path.exists(os.path.join(src, "MARK")):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full_on_swap)
    with pytest.raises(SystemExit, match="^error: cannot write"):
        M.export_hf(str(tmp_path / "ckpt.pt"), str(out))
    assert (out / "MARK").read_text() == "the previous export" and (out / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "hf"]


# ---------------------------------------------------------------
# model.py, mixture of experts: routing, gates and the load-balancing loss.
# Trusted references: the dense gate-weighted mixture and a per-token loop written here; Switch's closed form.


def _moe(E=4, k=2, ffn="swiglu", seed=0):
    torch.manual_seed(seed)
    return M.MoE(tiny_cfg(num_experts=E, experts_top_k=k, ffn=ffn))


def test_model_moe_top_k_equal_E_is_the_dense_softmax_mixture():
    """With k = E every expert runs on every token: the output is Σ_e softmax(router)_e · expert_e(x), computed densely."""
    moe, x = _moe(E=3, k=3), torch.randn(2, 5, 32)
    p = torch.softmax(moe.router(x), -1)  # (B, T, E)
    want = sum(p[..., e:e + 1] * moe.experts[e](x) for e in range(3))
    torch.testing.assert_close(moe(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ffn", ["swiglu", "gelu"])
def test_model_moe_top_k_routing_equals_a_per_token_loop(ffn):
    """Top-1 and top-2 dispatch equal a loop over tokens: each token's chosen experts, weighted by the softmax over their logits."""
    for k in (1, 2):
        moe, x = _moe(E=4, k=k, ffn=ffn), torch.randn(3, 4, 32)
        rows = []
        for t in x.reshape(-1, 32):
            logits = moe.router(t)
            top = logits.topk(k).indices
            g = torch.softmax(logits[top], -1)
            rows.append(sum(g[j] * moe.experts[int(e)](t[None])[0] for j, e in enumerate(top)))
        torch.testing.assert_close(moe(x), torch.stack(rows).reshape(x.shape), atol=1e-5, rtol=1e-5)


def test_model_moe_aux_loss_equals_switch_closed_form():
    """A hand-built router (token t prefers expert t mod E) gives fractions f and mean probs P we know: aux = E·Σ f_i·P_i."""
    moe = _moe(E=4, k=1)
    x = torch.zeros(1, 8, 32)
    x[0, torch.arange(8), torch.arange(8) % 3] = 1.0  # tokens choose experts 0,1,2,0,1,2,0,1: never 3
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:3, :3] = 2.0 * torch.eye(3)
    moe(x)
    p = torch.softmax(moe.router(x[0]), -1)
    f = torch.tensor([3, 3, 2, 0]) / 8
    assert moe.fractions.tolist() == f.tolist()
    torch.testing.assert_close(moe.aux_loss, 4 * (f * p.mean(0)).sum())
    # a uniform router is the minimum, 1
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(1, 64, 32))
    assert abs(moe.aux_loss.item() - 1.0) < 1e-6


def test_model_moe_parameter_counts_total_and_active():
    """num_params == count_params by hand: E experts + router in total, k experts + router active; FLOPs use the active count."""
    cfg = tiny_cfg(num_experts=4, experts_top_k=1)
    m = M.TransformerLM(cfg)
    dense = M.TransformerLM(tiny_cfg())
    expert = 3 * 32 * cfg.d_ff
    assert m.num_params() == dense.num_params() + cfg.num_layers * (3 * expert + 32 * 4) == M.count_params(cfg)
    assert m.num_params(non_embedding=True, active=True) == dense.num_params(non_embedding=True) + cfg.num_layers * 32 * 4
    assert M.count_params(cfg, non_embedding=True, active=True) == m.num_params(non_embedding=True, active=True)
    assert M.flops_per_token(cfg) == 6 * M.count_params(cfg, True, True) + 12 * cfg.num_layers * 32 * cfg.context_length


def test_model_moe_checkpoint_saves_loads_and_samples(tmp_path):
    """An MoE model survives save -> load_model (same logits), and KV-cached greedy generation equals the no-cache reference."""
    torch.manual_seed(0)
    m = M.TransformerLM(tiny_cfg(num_experts=4, experts_top_k=2)).eval()
    TR.save_checkpoint(m, TR.AdamW(m.parameters()), 0, str(tmp_path / "ckpt.pt"))
    back, _ = M.load_model(str(tmp_path / "ckpt.pt"))
    idx = torch.randint(0, 61, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(back(idx), m(idx))
        out = M.generate(back, idx, 8, temperature=0.0)
        ref = idx
        for _ in range(8):
            ref = torch.cat([ref, back(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="experts_top_k"):
        tiny_cfg(num_experts=2, experts_top_k=3)


def test_train_moe_run_logs_aux_loss_and_expert_fractions(tmp_path):
    """train.py --num-experts 4 --experts-top-k 1 trains (finite losses), logs moe_aux and per-layer expert fractions summing to 1."""
    np.random.default_rng(0).integers(0, 61, 3000).astype(np.uint16).tofile(tmp_path / "train.bin")
    np.random.default_rng(1).integers(0, 61, 500).astype(np.uint16).tofile(tmp_path / "val.bin")
    TR.main(["--data", str(tmp_path), "--out-dir", str(tmp_path / "out"), "--vocab-size", "61", "--d-model", "32", "--num-layers", "2",
             "--context-length", "16", "--batch-size", "2", "--max-steps", "3", "--log-every", "1", "--eval-steps", "1", "--sample-every", "0",
             "--num-experts", "4", "--experts-top-k", "1"])
    recs = [json.loads(l) for l in open(tmp_path / "out" / "metrics.jsonl") if '"moe_aux"' in l]
    assert len(recs) == 3 and all(math.isfinite(r["loss"]) and r["moe_aux"] >= 1.0 - 1e-6 for r in recs)
    assert all(len(r["expert_fractions"]) == 2 and all(abs(sum(f) - 1) < 1e-6 for f in r["expert_fractions"]) for r in recs)
    m, _ = M.load_model(str(tmp_path / "out" / "ckpt.pt"))
    assert (m.cfg.num_experts, m.cfg.experts_top_k) == (4, 1)


# ---------------------------------------------------------------
# model.py, import-hf: Hugging Face Llama and GPT-2 checkpoints in, identical logits out.
# Trusted reference: transformers' own LlamaForCausalLM / GPT2LMHeadModel, saved with save_pretrained.


def _hf_llama(tie):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-6, rope_theta=5e5,
                                   tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None)
    cfg.rope_theta = 5e5
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm gains: a mis-mapped norm cannot pass
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_()
    return m


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_model_import_hf_llama_has_identical_logits(tmp_path, tie):
    """import-hf of a saved LlamaForCausalLM (GQA, rope_theta 5e5, eps 1e-6) gives HF's logits to 1e-5, and load_model reads it."""
    hf = _hf_llama(tie)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    M.main(["import-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")])
    m, ckpt = M.load_model(str(tmp_path / "ours" / "ckpt.pt"))
    assert (m.cfg.num_kv_heads, m.cfg.rope_theta, m.cfg.norm_eps, m.cfg.tie_embeddings) == (2, 5e5, 1e-6, tie)
    idx = torch.randint(0, 61, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(m(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_model_import_hf_gpt2_has_identical_logits(tmp_path):
    """import-hf of a saved GPT2LMHeadModel (Conv1D transposes, biases, learned positions, layernorm, gelu_new, tied) gives HF's logits to 1e-5."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    with torch.no_grad():  # random biases and norm gains, so an unmapped bias cannot pass
        for n, p in hf.named_parameters():
            if n.endswith("bias") or ".ln" in n:
                p.normal_(0, 0.5)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    M.main(["import-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")])
    m, _ = M.load_model(str(tmp_path / "ours" / "ckpt.pt"))
    assert m.num_params() == sum(p.numel() for p in hf.parameters()) == M.count_params(m.cfg)
    idx = torch.randint(0, 61, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(m(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_model_export_then_import_is_the_identity(tmp_path):
    """export-hf then import-hf gives back every tensor of our state dict exactly (the RoPE permutation undone)."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = M.TransformerLM(tiny_cfg(num_kv_heads=2))
    TR.save_checkpoint(m, TR.AdamW(m.parameters()), 0, str(tmp_path / "ckpt.pt"))
    M.main(["export-hf", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    M.main(["import-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    back = M.read_checkpoint(str(tmp_path / "back" / "ckpt.pt"))["model"]
    assert back.keys() == m.state_dict().keys() and all(torch.equal(back[k], v) for k, v in m.state_dict().items())


def test_model_import_hf_bad_input_is_one_line_error(tmp_path):
    """import-hf of a missing dir, an unknown model_type or a Llama with rope_scaling is a one-line error, writing nothing."""
    with pytest.raises(SystemExit, match="^error: .*need config.json"):
        M.main(["import-hf", "--hf-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    hf = _hf_llama(False)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    for bad, match in (({"model_type": "mistral"}, "model_type llama or gpt2"), ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling")):
        (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg | bad))
        with pytest.raises(SystemExit, match=f"^error: .*{match}") as e:
            M.main(["import-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "o")])
        assert "\n" not in str(e.value) and not (tmp_path / "o" / "ckpt.pt").exists()


# ---------------------------------------------------------------
# model.py, weight-only quantization: group-wise int8 / int4, dequantized on the fly.
# Trusted reference: the float weights and the float model, with error bounds derived from the quantization step.


def _quant_lm(bias=False):
    torch.manual_seed(0)
    return M.TransformerLM(M.ModelConfig(vocab_size=61, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=64, bias=bias)).eval()


@pytest.mark.parametrize("bits", [8, 4])
def test_model_quant_dequant_error_is_at_most_half_a_step(bits):
    """|q·scale - w| <= scale/2 in every element (round to nearest), and the largest |w| of a group is exact."""
    torch.manual_seed(0)
    lin = M.Linear(96, 24)
    lin.weight.data[3, 5] = 40.0  # an outlier coarsens only its own group
    ql = M.QuantLinear(lin, bits, 32)
    step = ql.scale.repeat_interleave(32, dim=1)  # (d_out, d_in): each element's own scale
    err = (ql.dequantized() - lin.weight).abs()
    assert (err <= step / 2 + 1e-6 * step).all()
    assert ql.scale.shape == (24, 3) and ql.scale[3, 0] > 100 * ql.scale[3, 1]
    assert err[3, 5] < 1e-5


def test_model_quant_int4_pack_unpack_round_trip_exact():
    """unpack_int4(pack_int4(q)) == q for every int4 value at every column parity; two values per byte."""
    q = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    q[0, :16] = torch.arange(-8, 8)
    p = M.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (5, 32)
    assert torch.equal(M.unpack_int4(p), q)


@pytest.mark.parametrize("bits", [8, 4])
def test_model_quant_linear_output_within_weight_error_bound(bits):
    """|QuantLinear(x) - Linear(x)|_i <= Σ_j |ΔW_ij| |x_j| (ΔW = dequantized - float weight); the bias is kept exactly."""
    torch.manual_seed(0)
    lin = M.Linear(64, 16, bias=True)
    lin.bias.data.normal_()
    ql = M.QuantLinear(lin, bits, 16)
    x = torch.randn(7, 64)
    with torch.no_grad():
        dy = (ql(x) - lin(x)).abs()
        bound = x.abs() @ (ql.dequantized() - lin.weight).abs().t()  # (7, 16)
    assert (dy <= bound + 1e-5).all() and dy.max() > 0
    assert ql.bias is lin.bias


@pytest.mark.slow
def test_model_quant_cli_checkpoint_loads_generates_and_stays_close(tmp_path):
    """quantize CLI -> load_model (weights_only) -> generate works; the file is smaller; logits near the float model's."""
    m = _quant_lm(bias=True)  # biases (GPT-2-style) must survive quantization
    src = tmp_path / "ckpt.pt"
    torch.save({"model": m.state_dict(), "config": dataclasses.asdict(m.cfg), "optimizer": {}, "iteration": 7}, src)
    idx = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        ref = m(idx)
    for bits, tol in ((8, 0.03), (4, 0.4)):  # relative to max |logit|; measured 0.010 and 0.19 (int4's step is 127/7 = 18x int8's)
        out = tmp_path / f"q{bits}.pt"
        M.main(["quantize", "--ckpt", str(src), "--bits", str(bits), "--group-size", "16", "--out", str(out)])
        q, ckpt = M.load_model(str(out))
        assert ckpt["iteration"] == 7 and "optimizer" not in ckpt and q.cfg.quant_bits == bits
        assert all(not isinstance(mod, M.Linear) for mod in q.modules())
        assert os.path.getsize(out) < os.path.getsize(src) and not os.path.exists(str(out) + ".tmp")
        with torch.no_grad():
            assert (q(idx) - ref).abs().max() < tol * ref.abs().max()
        assert M.generate(q, idx[:1, :4], 8, temperature=1.0, generator=torch.Generator().manual_seed(0)).shape == (1, 12)


@pytest.mark.parametrize("argv", [["--bits", "3", "--group-size", "16"], ["--bits", "8", "--group-size", "5"], ["--bits", "4", "--group-size", "1"]])
def test_model_quant_cli_bad_bits_or_group_is_one_line_error(tmp_path, argv):
    """--bits other than 8/4, a group size not dividing d_in (or odd for int4): a one-line SystemExit, no file written."""
    m = _quant_lm()
    src = tmp_path / "ckpt.pt"
    torch.save({"model": m.state_dict(), "config": dataclasses.asdict(m.cfg)}, src)
    with pytest.raises(SystemExit) as e:
        M.main(["quantize", "--ckpt", str(src), *argv, "--out", str(tmp_path / "q.pt")])
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "q.pt")


# ---------------------------------------------------------------
# model.py, inference: the KV cache's size (what GQA and MQA shrink). Reference: the closed form.


@pytest.mark.parametrize("kv", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_model_kv_cache_bytes_per_token_is_2_L_Hkv_dhead_bytes(kv):
    """KVCache holds exactly 2·L·H_kv·d_head·bytes per cached token per sequence (fp32 and bf16): MHA, GQA, MQA."""
    cfg = tiny_cfg(num_kv_heads=kv)
    for dtype, nbytes in ((torch.float32, 4), (torch.bfloat16, 2)):
        cache = M.KVCache(cfg, 3, 20, dtype=dtype)
        got = sum(k.nbytes + v.nbytes for k, v in cache.layers)
        assert got == 3 * 20 * 2 * cfg.num_layers * kv * (cfg.d_model // cfg.num_heads) * nbytes


# ---------------------------------------------------------------
# Training pieces: AdamW, schedule, clipping, batches
# ---------------------------------------------------------------


def test_train_adamw_matches_torch_over_10_steps():
    """Our AdamW must agree with torch.optim.AdamW (decoupled decay, bias correction) over 10 steps."""
    torch.manual_seed(0)
    a = torch.nn.Linear(7, 5)
    b = torch.nn.Linear(7, 5)
    b.load_state_dict(a.state_dict())
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    oa, ob = TR.AdamW(a.parameters(), **kw), torch.optim.AdamW(b.parameters(), **kw)
    for _ in range(10):
        x = torch.randn(4, 7)
        for net, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert (pa - pb).abs().max() <= 1e-6


def test_train_lr_cosine_schedule_values():
    """Warmup is linear, the cosine hits (max + min) / 2 halfway and min_lr at the end: closed-form values."""
    f = lambda it: TR.lr_cosine_schedule(it, 1.0, 0.1, 7, 21)  # noqa: E731
    assert f(0) == 0 and f(3) == pytest.approx(3 / 7) and f(7) == pytest.approx(1.0)
    assert f(14) == pytest.approx(0.55)  # halfway down the cosine: (max + min) / 2
    assert f(10) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 3 / 14)))
    assert f(21) == pytest.approx(0.1) and f(30) == 0.1
    assert all(f(i) >= f(i + 1) for i in range(7, 25))


def test_train_clip_grad_norm_matches_torch():
    """Our clip_grad_norm returns the same norm and clipped grads as torch.nn.utils.clip_grad_norm_."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ps[:2], qs[:2]):  # the third has no grad: skipped
        g = torch.randn_like(p) * 5
        p.grad, q.grad = g.clone(), g.clone()
    n1 = TR.clip_grad_norm(ps, 1.0)
    n2 = torch.nn.utils.clip_grad_norm_(qs, 1.0)
    torch.testing.assert_close(n1, n2)
    for p, q in zip(ps[:2], qs[:2]):
        torch.testing.assert_close(p.grad, q.grad)
    assert ps[2].grad is None
    small = [torch.nn.Parameter(torch.zeros(3))]
    small[0].grad = torch.full((3,), 0.1)
    TR.clip_grad_norm(small, 1.0)
    torch.testing.assert_close(small[0].grad, torch.full((3,), 0.1))  # under the limit: untouched


def test_train_get_batch_statistics(tmp_path):
    """get_batch windows are shifted by one and their starts uniform over every valid offset (mean and sd)."""
    data = np.arange(1000, dtype=np.uint16)
    data.tofile(tmp_path / "t.bin")
    mm = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r")
    g = torch.Generator().manual_seed(0)
    starts = []
    for _ in range(200):
        x, y = TR.get_batch(mm, 32, 16, "cpu", generator=g)
        assert x.shape == y.shape == (32, 16) and x.dtype == y.dtype == torch.long
        assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)  # windows, shifted by one
        starts.append(x[:, 0])
    s = torch.cat(starts).float()
    assert s.min() == 0 and s.max() == 1000 - 16 - 1  # every valid start is reachable, none past the end
    assert abs(s.mean().item() - (1000 - 17) / 2) < 10  # uniform: mean (n-T-1)/2, sd of the mean ~2.2
    assert abs(s.std().item() - (1000 - 16) / math.sqrt(12)) < 10


def test_train_overfit_one_batch():
    """The model plus our loss and AdamW memorize one batch: loss from ln 61 to < 0.05."""
    torch.manual_seed(0)
    m = M.TransformerLM(tiny_cfg())
    opt = TR.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    x = torch.randint(0, 61, (4, 17))
    for _ in range(80):
        loss = TR.cross_entropy(m(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05  # from ln(61) = 4.1 to memorized


# ---------------------------------------------------------------
# Checkpoints and the training loop (subprocesses)
# ---------------------------------------------------------------


def test_train_checkpoint_file_object_roundtrip_and_errors(tmp_path):
    """save/load_checkpoint round-trips weights and moments exactly; wrong shapes and bad files are one-line errors."""
    torch.manual_seed(0)
    m = M.TransformerLM(tiny_cfg())
    opt = TR.AdamW(m.parameters(), lr=1e-3)
    x = torch.randint(0, 61, (2, 9))
    TR.cross_entropy(m(x[:, :-1]), x[:, 1:]).backward()
    opt.step()
    buf = io.BytesIO()
    TR.save_checkpoint(m, opt, 7, buf)
    buf.seek(0)
    m2 = M.TransformerLM(tiny_cfg())
    opt2 = TR.AdamW(m2.parameters(), lr=1e-3)
    assert TR.load_checkpoint(buf, m2, opt2) == 7
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(opt2.state[next(m2.parameters())]["exp_avg"], opt.state[next(m.parameters())]["exp_avg"])
    path = str(tmp_path / "c.pt")
    TR.save_checkpoint(m, opt, 7, path)
    with pytest.raises(SystemExit, match="d_model=32 but --d-model 64"):
        TR.load_checkpoint(path, M.TransformerLM(tiny_cfg(d_model=64)))
    with pytest.raises(SystemExit, match="trained with --objective clm, not mlm"):
        TR.load_checkpoint(path, M.TransformerLM(tiny_cfg(causal=False, vocab_size=62)))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(SystemExit, match="corrupt"):
        TR.load_checkpoint(path, m2)
    with pytest.raises(SystemExit, match="not found"):
        TR.load_checkpoint(str(tmp_path / "nope.pt"), m2)
    # model.py's exporter reads checkpoints on its own (it imports nothing from train.py): same one-line error
    with pytest.raises(SystemExit, match=r"^error: cannot read checkpoint .*corrupt") as e:
        M.export_hf(path, str(tmp_path / "hf"))
    assert "\n" not in str(e.value)


def test_train_rejects_non_positive_sizes(capsys):
    """A size or count of 0 is an argparse error (exit 2) naming the rule, not a traceback."""
    for flag in ("--batch-size", "--context-length", "--grad-accum", "--max-steps"):
        with pytest.raises(SystemExit) as e:
            TR.build_parser().parse_args(["--data", "x", flag, "0"])
        assert e.value.code == 2 and "must be a positive integer, got 0" in capsys.readouterr().err, flag


def test_train_cli_defaults_are_the_config_defaults():
    """`python train.py` trains ModelConfig(): every model-shape flag takes its default from it."""
    a, d = TR.build_parser().parse_args([]), ModelConfig()
    assert (a.d_model, a.num_layers, a.num_heads, a.context_length, a.rope_theta, a.attn_backend, a.tie_embeddings) == \
        (d.d_model, d.num_layers, d.num_heads, d.context_length, d.rope_theta, d.attn_backend, d.tie_embeddings)
    assert a.command == "train" and TR.build_parser().parse_args(["sample", "--ckpt", "c.pt"]).command == "sample"


def _write_data(d, n=6000, V=61):
    rng = np.random.default_rng(0)
    # a learnable stream: a noisy cycle of period 5, so loss falls well below log V
    base = np.arange(n) % 5 * 11 + rng.integers(0, 3, n)
    os.makedirs(d, exist_ok=True)
    base[: n * 9 // 10].astype(np.uint16).tofile(os.path.join(d, "train.bin"))
    base[n * 9 // 10 :].astype(np.uint16).tofile(os.path.join(d, "val.bin"))


TRAIN_ARGS = ["--vocab-size", "61", "--d-model", "32", "--num-layers", "2", "--num-heads", "2", "--context-length", "16",
              "--batch-size", "4", "--max-steps", "40", "--warmup-steps", "4", "--lr", "1e-2", "--eval-every", "10", "--eval-steps", "2",
              "--ckpt-every", "10", "--log-every", "1", "--sample-every", "0", "--device", "cpu"]  # fmt: skip


def _train_cmd(data, out, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--data", data, "--out-dir", out, *TRAIN_ARGS, *extra]


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _curve(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.slow
def test_train_sigkill_then_resume_is_bitwise_identical(tmp_path):
    """A run SIGKILLed after a checkpoint and resumed logs the uninterrupted run's metrics bit for bit."""
    data = str(tmp_path / "data")
    _write_data(data)
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    steps = ["--max-steps", "80"]  # the kill comes at step 23: 57 steps of margin against a slow parent
    TR.main(_train_cmd(data, full, *steps)[2:])  # uninterrupted, in this process (single-threaded like the child)
    # Kill the second run for real (SIGKILL: no cleanup, no atexit) after its step-20 checkpoint.
    # It may log a few more steps before dying; those must be discarded on resume.
    p = subprocess.Popen(_train_cmd(data, killed, *steps), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    for line in p.stdout:
        if line.startswith("step 23/"):
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL, "run finished before we could kill it"
    assert max(r["step"] for r in _curve(killed)) > 20  # it logged past its last checkpoint
    TR.main(_train_cmd(data, killed, *steps, "--resume")[2:])
    a, b = _curve(full), _curve(killed)
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("ms", "tok_per_s", "wall_s")} for r in recs]  # noqa: E731
    assert strip(a) == strip(b)  # every loss, val loss and lr, bit for bit (JSON floats round-trip exactly)
    final = a[-1]
    assert final["final"] and final["val_loss"] < final["unigram_entropy"] - 0.5  # it learned something
    # config mismatch on resume, missing data: a one-line error naming the problem (SystemExit)
    with pytest.raises(SystemExit, match=r"^error: checkpoint d_model=32 but --d-model 64$"):
        TR.main(_train_cmd(data, killed, "--resume", "--d-model", "64")[2:])
    with pytest.raises(SystemExit, match=r"^error: .*not found[^\n]*$"):
        TR.main(_train_cmd(str(tmp_path / "missing"), killed)[2:])


@pytest.mark.parametrize("steps,extra", [(100, ["--objective", "mlm", "--batch-size", "8"]), (40, ["--optimizer", "muon", "--grad-accum", "2"])])
@pytest.mark.slow
def test_train_loop_variants_learn(tmp_path, steps, extra):
    """MLM and Muon + grad-accum runs learn: loss falls by > 1 nat and val loss beats the unigram entropy."""
    # MLM scores only ~15% of the positions per batch, so it gets more steps and a bigger batch.
    data = str(tmp_path / "data")
    _write_data(data)
    out = str(tmp_path / "out")
    TR.main(["--data", data, "--out-dir", out, *TRAIN_ARGS, "--max-steps", str(steps), *extra])
    recs = _curve(out)
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == steps and np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    final = recs[-1]
    assert final["final"] and final["val_loss"] < final["unigram_entropy"] - 0.3  # uses context, not just frequencies
    m, ck = M.load_model(os.path.join(out, "ckpt.pt"))
    assert m.cfg.causal == ("mlm" not in extra) and ck["iteration"] == steps
    evals = [r for r in recs if "val_loss" in r]
    if "mlm" in extra:  # mask-fill accuracy in every eval record and the final one, above the unigram guess (15 ids)
        assert all(0 <= r["mlm_top1"] <= r["mlm_top5"] <= 1 for r in evals) and final["mlm_top1"] == evals[-2]["mlm_top1"]
        assert final["mlm_top1"] > 1 / 15 and final["mlm_top5"] > 5 / 15
    else:
        assert not any("mlm_top1" in r for r in evals)


def test_train_mask_fill_counts_equal_a_naive_count():
    """mask_fill_counts' top-1 / top-5 hits over masked positions equal a per-position loop over sorted logits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[torch.rand(3, 7, generator=g) < 0.6] = -100  # unmasked positions carry no label
    labels[0, 0], logits[0, 0, 4] = 4, 9.0  # one sure top-1 hit
    top1 = top5 = n = 0
    for b in range(3):
        for t in range(7):
            if labels[b, t] != -100:
                order = sorted(range(11), key=lambda v: -logits[b, t, v].item())
                n, top1, top5 = n + 1, top1 + (order[0] == labels[b, t]), top5 + (labels[b, t] in order[:5])
    assert TR.mask_fill_counts(logits, labels).tolist() == [top1, top5, n] and 0 < top1 < top5 < n


@pytest.mark.slow
def test_train_sample_cli_from_checkpoint(tmp_path, capsys):
    """`train.py sample` (and its old spelling --sample) continues the one sentence the model was trained on."""
    data, out = tmp_path / "data", tmp_path / "out"
    tok = bpe.Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])  # plain bytes
    tok.save(str(data / "tokenizer"))
    ids = np.array(tok.encode("hello world. " * 400), dtype=np.uint16)
    ids[:4000].tofile(data / "train.bin")
    ids[4000:].tofile(data / "val.bin")
    args = [a for a in TRAIN_ARGS if a not in ("--vocab-size", "61")]  # vocab from data/tokenizer
    TR.main(["--data", str(data), "--out-dir", str(out), *args, "--max-steps", "60", "--sample-every", "30"])
    capsys.readouterr()
    TR.main(["--sample", "--ckpt", str(out / "ckpt.pt"), "--prompt", "hello", "--max-new-tokens", "20", "--temperature", "0"])
    text = capsys.readouterr().out
    assert text.startswith("hello") and "world. hello" in text  # it learned the one sentence it saw
    TR.main(["sample", "--ckpt", str(out / "ckpt.pt"), "--prompt", "hello", "--max-new-tokens", "20", "--temperature", "0"])
    assert capsys.readouterr().out == text  # the subcommand and the old flag are one code path
    for bad in (["--top-p", "0"], ["--temperature", "-1"]):  # every token dropped / a reversed distribution
        with pytest.raises(SystemExit, match="^error: sampling needs"):
            TR.main(["sample", "--ckpt", str(out / "ckpt.pt"), "--prompt", "hello", *bad])




# ---------------------------------------------------------------
# Numbers you can trust: divergence, resume, bookkeeping, gradient scale
# ---------------------------------------------------------------

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def test_train_step_grad_accum_gives_the_big_batch_gradient():
    """train_step on 2 micro-batches returns the pre-clip grad norm and loss of the one big batch (plain autograd)."""
    torch.manual_seed(0)
    m = M.TransformerLM(tiny_cfg())
    ref = copy.deepcopy(m)
    x = torch.randint(0, 61, (8, 17))
    ref_loss = TR.cross_entropy(ref(x[:, :-1]), x[:, 1:])
    ref_loss.backward()
    ref_norm = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
    for clip in ("0", "0.5"):  # no clipping (the norm is still measured), and clipping: the norm is the pre-clip one
        halves = iter([(x[:4, :-1], x[:4, 1:]), (x[4:, :-1], x[4:, 1:])])
        args = TR.build_parser().parse_args(["--grad-accum", "2", "--grad-clip", clip])
        opt = TR.AdamW(m.parameters(), lr=0.0)
        loss, norm, ok = TR.train_step(m, [opt], lambda data, gen: next(halves), None, None, args, NO_AUTOCAST)
        assert ok and norm.item() == pytest.approx(ref_norm.item(), rel=1e-5), clip  # `/ grad_accum` gone: 2x
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)


def test_train_val_loss_is_world_size_independent():
    """evaluate's val loss is the same on 1 rank and on 2 (each rank's share, summed as all_reduce would)."""
    torch.manual_seed(0)
    m = M.TransformerLM(tiny_cfg())
    data = np.random.default_rng(0).integers(0, 61, 3000).astype(np.uint16)
    args = TR.build_parser().parse_args(["--batch-size", "3", "--context-length", "8", "--eval-steps", "5"])
    draw = lambda d, g: TR.next_batch(d, g, args, 0, 1, "cpu")  # noqa: E731
    one = TR.evaluate(m, draw, data, args, NO_AUTOCAST, 0, 1)["val_loss"]
    two = sum(TR.evaluate(m, draw, data, args, NO_AUTOCAST, r, 2)["val_loss"] for r in range(2))  # 3 rounds, one padding batch
    assert two == pytest.approx(one, rel=1e-6) and one != TR.evaluate(m, draw, data[::-1].copy(), args, NO_AUTOCAST, 0, 1)["val_loss"]


def test_train_evaluate_mask_fill_scores_the_mask_inputs():
    """evaluate's mlm_top1/top5 = rank-0 / rank-<5 rates of the true token at [MASK] inputs only (a per-position loop)."""
    torch.manual_seed(0)
    m = M.TransformerLM(tiny_cfg(causal=False, vocab_size=62))  # [MASK] = 61
    data = np.random.default_rng(0).integers(0, 61, 3000).astype(np.uint16)
    args = TR.build_parser().parse_args(["--objective", "mlm", "--batch-size", "8", "--context-length", "16", "--eval-steps", "5"])
    draw = lambda d, g: TR.next_batch(d, g, args, 0, 1, "cpu", mask_id=61)  # noqa: E731
    ev = TR.evaluate(m, draw, data, args, NO_AUTOCAST, 0, 1)
    gen, ranks = torch.Generator().manual_seed(10_000), []  # evaluate's val batches
    with torch.no_grad():
        for _ in range(5):
            x, y = draw(data, gen)
            logits = m.eval()(x)
            ranks += [(logits[b, t] > logits[b, t, y[b, t]]).sum().item() for b, t in zip(*torch.nonzero(x == 61, as_tuple=True))]
    assert ev["mlm_top1"] == pytest.approx(np.mean([r == 0 for r in ranks])) and ev["mlm_top5"] == pytest.approx(np.mean([r < 5 for r in ranks]))
    assert ev["mlm_top5"] > 0 and len(ranks) > 50


def test_train_nonfinite_loss_stops_and_keeps_the_checkpoint(tmp_path):
    """--lr 1e4 diverges: a one-line error (step, last finite loss, lower --lr), and ckpt.pt keeps finite weights."""
    data = str(tmp_path / "data")
    _write_data(data)
    runs = {}
    for skip in (0, 3):
        out = str(tmp_path / f"skip{skip}")
        cmd = _train_cmd(data, out, "--lr", "1e4", "--max-steps", "30", "--warmup-steps", "2", "--ckpt-every", "2")[2:]
        with pytest.raises(SystemExit, match=r"^error: step \d+: loss \S+, grad norm \S+ \(last finite loss \d+\.\d+\); "
                                             r"stopped before saving, .*ckpt.pt is the last good state; lower --lr \(now 10000\)$") as e:
            TR.main(cmd + ["--skip-nonfinite", str(skip)])
        runs[skip] = stop = int(re.search(r"step (\d+)", str(e.value)).group(1))
        ck = M.read_checkpoint(os.path.join(out, "ckpt.pt"))
        assert all(torch.isfinite(v).all() for v in ck["model"].values()) and 2 <= ck["iteration"] < stop
        assert all(math.isfinite(r["loss"]) for r in _curve(out) if "loss" in r)
    assert runs[3] == runs[0] + 3  # three bad batches skipped, then the same stop


def test_train_resume_applies_new_hyperparameters(tmp_path):
    """Resuming with another --lr / --weight-decay trains with them (the optimizer's groups), not the checkpoint's."""
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    _write_data(data)
    TR.main(_train_cmd(data, out, "--max-steps", "10")[2:])
    TR.main(_train_cmd(data, out, "--max-steps", "20", "--lr", "1e-3", "--weight-decay", "0", "--resume")[2:])
    groups = M.read_checkpoint(os.path.join(out, "ckpt.pt"))["optimizer"]["param_groups"]
    factor = TR.lr_cosine_schedule(20, 1.0, 2e-4 / 1e-3, 4, 20)
    assert groups[0]["lr"] == pytest.approx(1e-3 * factor) and groups[0]["weight_decay"] == 0.0
    logged = {r["step"]: r["lr"] for r in _curve(out) if "loss" in r}
    assert logged[20] == groups[0]["lr"] and logged[5] == pytest.approx(1e-2 * TR.lr_cosine_schedule(5, 1.0, 0.02, 4, 10))


def test_train_warmup_longer_than_the_run_is_clamped(tmp_path, capsys):
    """--warmup-steps >= --max-steps warns and clamps, so the lr still decays to --min-lr at the last step."""
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    _write_data(data)
    TR.main(_train_cmd(data, out, "--max-steps", "10", "--warmup-steps", "30")[2:])
    assert "warning: --warmup-steps 30 >= --max-steps 10; using 1" in capsys.readouterr().out
    assert [r["lr"] for r in _curve(out) if "loss" in r][-1] == pytest.approx(2e-4)


def test_train_unigram_entropy_counts_in_chunks(tmp_path):
    """unigram_entropy of 20M tokens equals ln 50 (closed form) without an int64 copy of the whole file."""
    np.tile(np.arange(50, dtype=np.uint16), 400_000).tofile(tmp_path / "t.bin")  # 40 MB; an int64 copy is 160 MB
    mm = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r")
    tracemalloc.start()
    H = TR.unigram_entropy(mm, 50)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert H == pytest.approx(math.log(50), rel=1e-12) and peak < 64e6, peak
    with pytest.raises(SystemExit, match=r"^error: data has token id 49 >= vocab size 40$"):
        TR.unigram_entropy(mm[:1000], 40)


def test_train_bits_per_byte_counts_specials_as_zero_bytes():
    """<|endoftext|> is 0 bytes of text: "hello" EOT "abc" is 8 bytes over 9 tokens, not 21."""
    tok = bpe.Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])
    ids = np.array(tok.encode("hello") + [tok.special_ids["<|endoftext|>"]] + tok.encode("abc"), dtype=np.uint16)
    assert TR.bytes_per_token(tok, ids) == 8 / 9


# ---------------------------------------------------------------
# Schedules, precision and compilation: flags checked against the plain run
# ---------------------------------------------------------------


def test_train_lr_wsd_schedule_values():
    """WSD by hand: linear warmup to 4, flat max to the decay start 15, then 1 - 0.9 sqrt(progress) to min 0.1 at 20."""
    f = lambda it: TR.lr_wsd_schedule(it, 1.0, 0.1, 4, 15, 20)  # noqa: E731
    assert f(0) == 0 and f(2) == 0.5 and f(4) == f(10) == f(15) == 1.0
    assert f(16) == pytest.approx(1 - 0.9 * math.sqrt(1 / 5)) and f(19) == pytest.approx(1 - 0.9 * math.sqrt(4 / 5))
    assert f(20) == pytest.approx(0.1) and f(25) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(4, 25))
    args = TR.build_parser().parse_args(["--lr-schedule", "wsd", "--max-steps", "20", "--decay-frac", "0.25"])
    assert TR.wsd_decay_start(args) == 15
    with pytest.raises(SystemExit, match=r"^error: --decay-frac 1.0 must be in \[0, 1\] and start the decay after --warmup-steps 30$"):
        TR.main(["--lr-schedule", "wsd", "--decay-frac", "1"])


def test_train_wsd_branch_from_a_stable_checkpoint_is_the_short_run(tmp_path):
    """A 24-step WSD run's stable-phase checkpoint at step 16, resumed with --max-steps 20, logs the 20-step WSD run bit for bit."""
    data = str(tmp_path / "data")
    _write_data(data)
    wsd = ["--lr-schedule", "wsd", "--decay-frac", "0.2", "--ckpt-every", "8", "--keep-ckpts"]
    TR.main(_train_cmd(data, str(tmp_path / "short"), "--max-steps", "20", *wsd)[2:])
    TR.main(_train_cmd(data, str(tmp_path / "long"), "--max-steps", "24", *wsd)[2:])  # decays from step 19: 16 is stable
    branch = str(tmp_path / "branch")
    TR.main(_train_cmd(data, branch, "--max-steps", "20", *wsd, "--resume", str(tmp_path / "long" / "ckpt-16.pt"))[2:])
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("ms", "tok_per_s", "wall_s")} for r in recs]  # noqa: E731
    short = strip(_curve(str(tmp_path / "short")))
    assert strip(_curve(branch)) == [r for r in short if r["step"] > 16]  # every loss, lr and val loss of steps 17..20
    assert [r["lr"] for r in short if "lr" in r][15:] == pytest.approx([TR.lr_wsd_schedule(s, 1e-2, 2e-4, 4, 16, 20) for s in range(16, 21)])
    ck = M.read_checkpoint(os.path.join(branch, "ckpt.pt"))
    assert (ck["args"]["lr_schedule"], ck["args"]["decay_frac"], ck["iteration"]) == ("wsd", 0.2, 20)


def _short_run(tmp_path, name, *extra):
    """A tiny 4-step run on the noisy cycle; its per-step train losses."""
    data, out = str(tmp_path / "data"), str(tmp_path / name)
    if not os.path.exists(data):
        _write_data(data)
    TR.main(_train_cmd(data, out, "--num-layers", "1", "--max-steps", "4", "--warmup-steps", "1", "--eval-steps", "1", *extra)[2:])
    return [r["loss"] for r in _curve(out) if "loss" in r]


def test_train_bf16_autocast_runs_on_cpu_close_to_fp32(tmp_path):
    """--dtype bf16 trains on CPU: finite losses within 2% of fp32's, and not equal to them (autocast really ran)."""
    fp32, bf16 = _short_run(tmp_path, "fp32", "--dtype", "fp32"), _short_run(tmp_path, "bf16", "--dtype", "bf16")
    assert fp32 == _short_run(tmp_path, "auto")  # auto is fp32 on a CPU
    assert all(math.isfinite(b) for b in bf16) and bf16 != fp32
    assert bf16 == pytest.approx(fp32, rel=0.02)


@pytest.mark.slow
def test_train_torch_compile_matches_eager(tmp_path):
    """--compile (inductor, C++ on CPU) trains the same 4 steps as eager: losses equal to 1e-5, no eager fallback warned."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        eager, compiled = _short_run(tmp_path, "eager"), _short_run(tmp_path, "compiled", "--compile")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # dynamo really captured the model
    assert not [w for w in seen if "complex" in str(w.message)]  # RoPE's real form: Inductor generates all the code
    assert compiled == pytest.approx(eager, abs=1e-5, rel=0) and len(eager) == 4


# ---------------------------------------------------------------
# train.py --init-from: fine-tune an imported (or any) checkpoint with a fresh optimizer.


def test_train_init_from_starts_at_the_imported_weights(tmp_path):
    """--init-from an imported HF Llama trains that architecture from its exact weights at step 0 (lr 1e-30: the saved weights
    are the imported ones, bit for bit: w - 1e-30·u rounds to w); with --resume it is a one-line error."""
    hf = _hf_llama(False)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    M.main(["import-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "imp")])
    for name, seed in (("train", 0), ("val", 1)):
        np.random.default_rng(seed).integers(0, 61, 3000).astype(np.uint16).tofile(tmp_path / f"{name}.bin")
    base = ["--data", str(tmp_path), "--vocab-size", "61", "--init-from", str(tmp_path / "imp" / "ckpt.pt"), "--d-model", "64"]
    TR.main([*base, "--out-dir", str(tmp_path / "ft"), "--batch-size", "2", "--max-steps", "1", "--eval-steps", "1",
             "--sample-every", "0", "--lr", "1e-30", "--min-lr", "1e-30", "--warmup-steps", "0"])
    ft, imp = (M.read_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in ("ft", "imp"))
    assert ft["config"] == imp["config"] and ft["iteration"] == 1
    assert all(torch.equal(ft["model"][k], v) for k, v in imp["model"].items())
    with pytest.raises(SystemExit, match="^error: --init-from needs no --resume"):
        TR.main([*base, "--out-dir", str(tmp_path / "ft"), "--resume"])


# ---------------------------------------------------------------
# kernels.py: fused RMSNorm, FlashAttention-2 (PyTorch tiles and Triton), SwiGLU, chunked CE.
# Without a GPU every Triton kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set
# above before kernels/triton decorate anything) on CPU tensors; with a GPU the same tests run
# the compiled kernels on CUDA, plus the larger skipif(not cuda) checks at the end.
# References are torch's own ops (F.rms_norm, F.scaled_dot_product_attention, F.silu,
# F.cross_entropy) evaluated in fp32 on the same (rounded) inputs.


_KN_DEV = "cuda" if torch.cuda.is_available() else "cpu"
_KN_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _kn_run(f, *xs, seed=0):
    """Forward, then backward with a fixed random upstream gradient; returns [y, *grads]."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    y = f(*xs)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    y.backward(g)
    return [y] + [x.grad for x in xs]


def _kn_close(outs, refs, dtype):
    """Compare in fp32; tolerances scale with the tensor's magnitude (bf16 has 8 mantissa bits)."""
    tol = _KN_TOL[dtype]
    for i, (a, b) in enumerate(zip(outs, refs)):
        assert a is not None and a.dtype == dtype and a.shape == b.shape, i
        scale = 1.0 + b.float().abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"#{i}: {m}")


def _kn_rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(_KN_DEV, dtype)


def test_kernels_triton_runs_in_interpreter_without_gpu():
    """Without CUDA the header's TRITON_INTERPRET=1 must turn every kernel into an interpreted function (no autotuner)."""
    if torch.cuda.is_available():  # compiled, unless someone asked for the interpreter on purpose
        assert type(kernels._rmsnorm_fwd_kernel).__name__ == ("InterpretedFunction" if kernels.INTERPRET
                                                              else "JITFunction")
        return
    # the two lines at the top of this file must have switched triton to its interpreter
    assert os.environ["TRITON_INTERPRET"] == "1" and kernels.INTERPRET
    assert type(kernels._rmsnorm_fwd_kernel).__name__ == "InterpretedFunction"
    assert type(kernels._fa_fwd).__name__ == "InterpretedFunction"  # no autotuner wrapped around it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# BLOCK_D = next_power_of_2(D): 16, 64, 128, then the model's widths: 1024 (D = 768, masked lanes)
# and 4096 (exact); (2, 5, 768) also gives each backward program 3 rows, the last one 1.
@pytest.mark.parametrize("shape", [(1, 16), (2, 17, 48), (2, 3, 5, 100), (2, 5, 768), (2, 4096)])
def test_kernels_rmsnorm_triton_matches_torch(shape, dtype):
    """RMSNormTriton forward, dx and dweight equal F.rms_norm's (fp32 reference on the same rounded inputs)."""
    x = _kn_rand(*shape, dtype=dtype, seed=1) * 3.0
    w = _kn_rand(shape[-1], dtype=dtype, seed=2)
    ours = _kn_run(lambda x, w: kernels.RMSNormTriton.apply(x, w, 1e-5), x, w)
    ref = _kn_run(lambda x, w: F.rms_norm(x, (x.shape[-1],), w, eps=1e-5), x.float(), w.float())
    _kn_close(ours, [r.to(dtype) for r in ref], dtype)


def _kn_sdpa(q, k, v, causal):
    """fp32 SDPA (math backend on CPU); causal is top-left aligned, as in kernels.py."""
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)


def _kn_lse(q, k, causal):
    s = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., Tq, Tk)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.logsumexp(s, dim=-1)  # (..., Tq)


# (lead dims, Tq, Tk, d): 3-D (batch, seq, d) and 4-D (batch, heads, seq, d); T = 1, ragged
# lengths that are not multiples of the 16-wide tiles, and Tq != Tk.
_KN_ATTN_SHAPES = [((2,), 1, 1, 16), ((2,), 17, 17, 16), ((1, 3), 40, 40, 32), ((2, 2), 17, 40, 32)]


def _kn_attn_case(lead, Tq, Tk, d, dtype, seed=0):
    return (_kn_rand(*lead, Tq, d, dtype=dtype, seed=seed), _kn_rand(*lead, Tk, d, dtype=dtype, seed=seed + 1),
            _kn_rand(*lead, Tk, d, dtype=dtype, seed=seed + 2))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lead,Tq,Tk,d", _KN_ATTN_SHAPES)
def test_kernels_flash_attention_torch_matches_sdpa(lead, Tq, Tk, d, causal):
    """FlashAttentionTorch (the tiled algorithm) gives SDPA's output and gradients, ragged and Tq != Tk included."""
    q, k, v = _kn_attn_case(lead, Tq, Tk, d, torch.float32)
    ours = _kn_run(lambda q, k, v: kernels.FlashAttentionTorch.apply(q, k, v, causal), q, k, v)
    _kn_close(ours, _kn_run(lambda q, k, v: _kn_sdpa(q, k, v, causal), q, k, v), torch.float32)


@pytest.mark.parametrize("fa", [kernels.FlashAttentionTorch, kernels.FlashAttentionTriton])
def test_kernels_flash_attention_saves_only_logsumexp(fa):
    """CS336 contract: besides q, k, v, o the only saved tensor is L (batch, n_queries), equal to the logsumexp of the scores."""
    B, Tq, d = 2, 33, 16
    q, k, v = (_kn_rand(B, Tq, d, dtype=torch.float32, seed=s).requires_grad_() for s in (0, 1, 2))
    o = fa.apply(q, k, v, True)
    saved = o.grad_fn.saved_tensors
    Ls = [t for t in saved if t.shape == (B, Tq)]
    assert len(Ls) == 1 and all(t.shape in {(B, Tq), (B, Tq, d)} for t in saved), [t.shape for t in saved]
    torch.testing.assert_close(Ls[0], _kn_lse(q, k, True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lead,Tq,Tk,d", _KN_ATTN_SHAPES)
def test_kernels_flash_attention_triton_matches_sdpa(lead, Tq, Tk, d, causal, dtype):
    """FlashAttentionTriton forward and backward equal fp32 SDPA, in fp32 and bf16, 3-D and 4-D, ragged lengths."""
    q, k, v = _kn_attn_case(lead, Tq, Tk, d, dtype, seed=3)
    ours = _kn_run(lambda q, k, v: kernels.FlashAttentionTriton.apply(q, k, v, causal), q, k, v)
    ref = _kn_run(lambda q, k, v: _kn_sdpa(q, k, v, causal), q.float(), k.float(), v.float())
    _kn_close(ours, [r.to(dtype) for r in ref], dtype)


@pytest.mark.parametrize("d,dtype", [(24, torch.float32), (128, torch.float32), (64, torch.float16)])
def test_kernels_flash_attention_triton_head_dims(d, dtype):
    """Head dims that are not a power of two (masked d lanes), the largest (128), and fp16 all match SDPA."""
    q, k, v = _kn_attn_case((1, 2), 20, 20, d, dtype, seed=5)
    ours = _kn_run(lambda q, k, v: kernels.FlashAttentionTriton.apply(q, k, v, True), q, k, v)
    ref = _kn_run(lambda q, k, v: _kn_sdpa(q, k, v, True), q.float(), k.float(), v.float())
    _kn_close(ours, [r.to(dtype) for r in ref], dtype)


def test_kernels_flash_attention_triton_on_lm_layout():
    """Non-contiguous (B, H, T, d) views, as model.py passes them, give SDPA's output and gradients."""
    # model.py hands over (B, H, T, d) views made by .transpose(1, 2): not contiguous
    B, T, H, d = 2, 17, 2, 16
    xs = [_kn_rand(B, T, H * d, dtype=torch.float32, seed=s) for s in (0, 1, 2)]

    def attend(fa):
        return lambda q, k, v: fa(*(t.view(B, T, H, d).transpose(1, 2) for t in (q, k, v)))
    ours = _kn_run(attend(lambda q, k, v: kernels.FlashAttentionTriton.apply(q, k, v, True)), *xs)
    ref = _kn_run(attend(lambda q, k, v: _kn_sdpa(q, k, v, True)), *xs)
    _kn_close(ours, ref, torch.float32)


# Tile shapes (BLOCK_M query rows, BLOCK_N keys).  A GPU autotunes over square and non-square
# tiles from 32 to 128 wide (kernels.py section 6); the interpreter runs one fixed tile,
# kernels._INTERP_TILE, and FlashAttentionTorch has BLOCK_Q x BLOCK_K.  With square tiles the
# causal bounds (where a Q tile stops, where the masked stage starts) cannot tell BLOCK_M from
# BLOCK_N, so we also run taller-than-wide and wider-than-tall ones.
_KN_TILES = [(16, 16), (32, 16), (16, 64), (64, 32), (128, 64)]


def _kn_set_tile(monkeypatch, fa, bm, bn):
    """Make fa run with (bm, bn) tiles; False where the tile is not ours to choose (autotuned GPU)."""
    if fa is kernels.FlashAttentionTorch:
        monkeypatch.setattr(fa, "BLOCK_Q", bm)
        monkeypatch.setattr(fa, "BLOCK_K", bn)
        return True
    monkeypatch.setattr(kernels, "_INTERP_TILE", {"BLOCK_M": bm, "BLOCK_N": bn})
    return kernels.INTERPRET


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bm,bn", _KN_TILES[1:])
@pytest.mark.parametrize("fa", [kernels.FlashAttentionTorch, kernels.FlashAttentionTriton])
def test_kernels_flash_attention_tile_shapes(fa, bm, bn, causal, monkeypatch):
    """Non-square and larger tiles (the GPU's autotuned shapes) give SDPA's output and gradients."""
    if not _kn_set_tile(monkeypatch, fa, bm, bn):
        pytest.skip("compiled kernels pick their tiles by autotuning (the gpu_large tests cover them)")
    q, k, v = _kn_attn_case((1, 2), 45, 70, 32, torch.float32, seed=9)  # ragged, Tq != Tk, < and > a tile
    ours = _kn_run(lambda q, k, v: fa.apply(q, k, v, causal), q, k, v)
    _kn_close(ours, _kn_run(lambda q, k, v: _kn_sdpa(q, k, v, causal), q, k, v), torch.float32)


@pytest.mark.parametrize("bm,bn", _KN_TILES[:3])
@pytest.mark.parametrize("fa", [kernels.FlashAttentionTorch, kernels.FlashAttentionTriton])
def test_kernels_causal_skips_fully_masked_tiles(fa, bm, bn, monkeypatch):
    """Causal tiles above the diagonal are never loaded: NaN keys there leave O, dQ, dK, dV equal to SDPA's."""
    # Keys after the last query are never visible.  If their tiles were loaded at all, NaNs put
    # there would leak into O through 0 * NaN in P V and into dQ/dK/dV; skipped tiles cannot.
    # Tq is a multiple of every tile size (the tile set here, <= 128 compiled).
    if not _kn_set_tile(monkeypatch, fa, bm, bn) and (bm, bn) != (16, 16):
        pytest.skip("compiled kernels pick their tiles by autotuning")
    Tq = max(bm, bn) if (kernels.INTERPRET or fa is kernels.FlashAttentionTorch) else 128
    q, k, v = _kn_attn_case((1, 2), Tq, 3 * Tq, 32, torch.float32, seed=7)
    k[..., Tq:, :] = float("nan")
    v[..., Tq:, :] = float("nan")
    o, dq, dk, dv = _kn_run(lambda q, k, v: fa.apply(q, k, v, True), q, k, v)
    ro, rdq, rdk, rdv = _kn_run(lambda q, k, v: _kn_sdpa(q, k, v, True), q, k[..., :Tq, :], v[..., :Tq, :])
    _kn_close([o, dq, dk[..., :Tq, :], dv[..., :Tq, :]], [ro, rdq, rdk, rdv], torch.float32)
    assert (dk[..., Tq:, :] == 0).all() and (dv[..., Tq:, :] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 70), (3, 1000)])  # one masked block; 3 blocks of 1024, the last ragged
def test_kernels_swiglu_triton_matches_torch(shape, dtype):
    """SwiGLUTriton forward and both gradients equal F.silu(a) * b's, within one block and across several."""
    a, b = _kn_rand(*shape, dtype=dtype, seed=1), _kn_rand(*shape, dtype=dtype, seed=2)
    ours = _kn_run(kernels.SwiGLUTriton.apply, a, b)
    ref = _kn_run(lambda a, b: F.silu(a) * b, a.float(), b.float())
    _kn_close(ours, [r.to(dtype) for r in ref], dtype)


def test_kernels_chunked_cross_entropy_matches_full_logits():
    """ChunkedCrossEntropy (ragged last chunk, grad_output != 1) equals F.cross_entropy on the full logits."""
    N, C, V = 40, 16, 50  # 40 tokens in chunks of 16: the last chunk is ragged
    h, W = _kn_rand(N, C, dtype=torch.float32, seed=1), _kn_rand(V, C, dtype=torch.float32, seed=2)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3)).to(_KN_DEV)
    ours = _kn_run(lambda h, W: kernels.ChunkedCrossEntropy.apply(h, W, t, 16) * 2.0, h, W)
    ref = _kn_run(lambda h, W: F.cross_entropy(h @ W.t(), t) * 2.0, h, W)  # * 2: grad_output != 1
    _kn_close(ours, ref, torch.float32)


# ---- compiled kernels at realistic sizes (GPU only) ----

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled Triton kernels")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_kernels_flash_attention_triton_gpu_large(d, causal):
    """Compiled, autotuned FA2 at T = 1000 (no tile divides it), bf16, matches fp32 SDPA."""
    # T = 1000: not a multiple of any autotuned tile; bf16 against fp32 SDPA
    q, k, v = _kn_attn_case((2, 4), 1000, 1000, d, torch.bfloat16, seed=11)
    ours = _kn_run(lambda q, k, v: kernels.FlashAttentionTriton.apply(q, k, v, causal), q, k, v)
    ref = _kn_run(lambda q, k, v: _kn_sdpa(q, k, v, causal), q.float(), k.float(), v.float())
    _kn_close(ours, [r.to(torch.bfloat16) for r in ref], torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled Triton kernels")
def test_kernels_rmsnorm_triton_gpu_large():
    """Compiled RMSNorm at D = 4096 over 4000 rows, bf16, matches fp32 F.rms_norm."""
    x, w = _kn_rand(4, 1000, 4096, dtype=torch.bfloat16, seed=1), _kn_rand(4096, dtype=torch.bfloat16, seed=2)
    ours = _kn_run(lambda x, w: kernels.RMSNormTriton.apply(x, w, 1e-5), x, w)
    ref = _kn_run(lambda x, w: F.rms_norm(x, (4096,), w, eps=1e-5), x.float(), w.float())
    _kn_close(ours, [r.to(torch.bfloat16) for r in ref], torch.bfloat16)


# ---- the compiled (GPU) path, checked without a GPU ----
# The interpreter accepts things the compiler rejects (and vice versa), so we also compile every
# kernel ahead of time, for an H100/H200 (sm_90) and an A100 (sm_80), with the ptxas that ships in
# the triton wheel.  It runs in a subprocess because here TRITON_INTERPRET=1 has already turned
# every kernel into an interpreted function.  Passing means "valid Triton for that GPU, with the
# attention matmuls on its tensor cores": wgmma on Hopper, mma.sync on Ampere.
_KN_AOT = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
import triton, kernels
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
ARCH, MMA = int(sys.argv[1]), sys.argv[2]

def comp(fn, sig, consts, num_warps, num_stages):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items() if v.startswith("*")}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", ARCH, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    assert f".target sm_{ARCH}" in k.asm["ptx"], fn
    return k.asm["ptx"]

P, tile = "*bf16", {"d": 64, "PREC": "tf32", "IS_CAUSAL": True, "BLOCK_D": 64}
io = {"Q": P, "K": P, "V": P}
bwd = {**io, "DO": P, "L": "*fp32", "Dr": "*fp32", "Tq": "i32", "Tk": "i32", "T_BUCKET": "i32", "sm_scale": "fp32"}
ptx = comp(kernels._fa_fwd.fn, {**io, "O": P, "L": "*fp32", "Tq": "i32", "Tk": "i32", "T_BUCKET": "i32", "qk_scale": "fp32"},
           {**tile, "BLOCK_M": 64, "BLOCK_N": 64}, 4, 2)
assert MMA in ptx, f"forward does not use the sm_{ARCH} tensor cores ({MMA})"
ptx = comp(kernels._fa_dkdv.fn, {**bwd, "DK": P, "DV": P}, {**tile, "BLOCK_M": 64, "BLOCK_N": 64}, 4, 2)
assert MMA in ptx, f"dK/dV kernel does not use the sm_{ARCH} tensor cores ({MMA})"
comp(kernels._fa_dq.fn, {**bwd, "DQ": P}, {**tile, "BLOCK_M": 64, "BLOCK_N": 64}, 4, 2)
comp(kernels._fa_bwd_preprocess, {"O": P, "DO": P, "Dr": "*fp32", "Tq": "i32"},
     {"d": 64, "BLOCK_M": 64, "BLOCK_D": 64}, 4, 1)
comp(kernels._rmsnorm_fwd_kernel, {"X": P, "W": P, "Y": P, "RSTD": "*fp32", "D": "i32", "eps": "fp32"},
     {"BLOCK_D": 4096}, 16, 1)
comp(kernels._rmsnorm_bwd_kernel, {"X": P, "W": P, "DY": P, "RSTD": "*fp32", "DX": P, "DW_PART": "*fp32",
     "N": "i32", "D": "i32", "rows_per_prog": "i32"}, {"BLOCK_D": 4096}, 16, 1)
comp(kernels._swiglu_fwd_kernel, {"A": P, "B": P, "OUT": P, "n": "i32"}, {"BLOCK": 1024}, 4, 1)
comp(kernels._swiglu_bwd_kernel, {"A": P, "B": P, "DOUT": P, "DA": P, "DB": P, "n": "i32"}, {"BLOCK": 1024}, 4, 1)
print("compiled ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above already run compiled kernels")
@pytest.mark.slow
@pytest.mark.parametrize("arch,mma", [(90, "wgmma"), (80, "mma.sync")])
def test_kernels_compile_ahead_of_time_without_gpu(arch, mma):
    """Every Triton kernel compiles for sm_90 and sm_80 (attention on wgmma / mma.sync tensor cores), no GPU needed."""
    ptxas = os.path.join(os.path.dirname(kernels.triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton build ships no ptxas")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _KN_AOT, str(arch), mma], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(kernels.__file__)), timeout=300)
    assert r.returncode == 0 and "compiled ok" in r.stdout, r.stderr[-3000:]



# ===============================================================
# parallel.py (-k parallel): DDP, bucketed DDP, ZeRO-1, FSDP, tensor and pipeline parallelism, each
# against one process; then torchrun train.py on 2 CPU ranks against 1 rank.
# ===============================================================
# Process start-up dominates the cost, so one 2-rank gloo job runs every check below (each a
# small function registered with @_rank_check) and the test right under each check asserts on
# that check's numbers.


V, D, B, T, STEPS = 64, 16, 4, 8, 3      # vocab, width, sequences per rank, tokens, optimizer steps


# ---------------------------------------------------------------
# A toy LM with every awkward case for a wrapper: a tied embedding/head, a frozen layer,
# replicated RMSNorm gains (model.py's RMSNorm).

class ToyBlock(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = M.RMSNorm(d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d, bias=False), torch.nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


class ToyLM(torch.nn.Module):
    def __init__(self, vocab_size=64, d_model=32, num_layers=2, tie=True, freeze=True):
        super().__init__()
        self.token_embeddings = torch.nn.Embedding(vocab_size, d_model)
        self.frozen = torch.nn.Linear(d_model, d_model, bias=False)
        self.frozen.weight.requires_grad_(not freeze)
        self.layers = torch.nn.ModuleList(ToyBlock(d_model) for _ in range(num_layers))
        self.ln_final = M.RMSNorm(d_model)
        self.lm_head = torch.nn.Linear(d_model, vocab_size, bias=False)
        if tie:
            self.lm_head.weight = self.token_embeddings.weight   # one Parameter, two users

    def as_layers(self):
        return [self.token_embeddings, self.frozen, *self.layers, self.ln_final, self.lm_head]

    def forward(self, idx):                                   # (B, T) -> (B, T, V)
        x = idx
        for layer in self.as_layers():
            x = layer(x)
        return x


def _toy(tie=True, freeze=True):
    torch.manual_seed(0)
    return ToyLM(V, D, num_layers=2, tie=tie, freeze=freeze)


def _cast_forward(model, dtype, idx):
    """Naive mixed-precision reference for the toy LM: every Linear/Embedding weight cast to
    `dtype` at use (autograd's cast backward returns fp32 grads to the fp32 master), activations
    in `dtype`, RMSNorm statistics in fp32."""
    x = F.embedding(idx, model.token_embeddings.weight.to(dtype))
    x = F.linear(x, model.frozen.weight.to(dtype))
    for blk in model.layers:
        h = F.gelu(F.linear(_rms(blk.ln, x), blk.fc1.weight.to(dtype)))
        x = x + F.linear(h, blk.fc2.weight.to(dtype))
    return F.linear(_rms(model.ln_final, x), model.lm_head.weight.to(dtype))


def _rms(norm, x):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight).to(x.dtype)


# ---------------------------------------------------------------
# The trusted single-process step, and the distributed one it must reproduce

def _global_batch(step, n=2 * B):
    idx = torch.randint(0, V, (n, T + 1), generator=torch.Generator().manual_seed(100 + step))
    return idx[:, :-1], idx[:, 1:]


def _loss(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1).float(), y.reshape(-1))


def _ref_step(model, opt, step, halves=True, forward=None):
    """The trusted single-process step. halves=True runs rank 0's and rank 1's sequences one after
    the other and averages, i.e. the same arithmetic as 2 ranks (so results can be bit-equal);
    halves=False is one forward over the full batch (equal up to float reassociation)."""
    forward = forward or model
    x, y = _global_batch(step)
    opt.zero_grad(set_to_none=True)
    if halves:
        for r in range(2):
            _loss(forward, x[r * B:(r + 1) * B], y[r * B:(r + 1) * B]).backward()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(2)
    else:
        _loss(forward, x, y).backward()
    opt.step()


def _dist_step(wrapped, opt, step, rank):
    x, y = _global_batch(step)
    opt.zero_grad(set_to_none=step % 2 == 0)     # both ways: fresh grads, and grads zeroed in place
    _loss(wrapped, x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]).backward()
    wrapped.finish_gradient_synchronization()
    opt.step()


def _max_diff(a, b):
    """max |a - b| over same-named parameters; inf if the names differ."""
    a, b = dict(a), dict(b)
    if a.keys() != b.keys():
        return float("inf")
    return max((a[k].detach().float() - b[k].detach().float()).abs().max().item() for k in a)


def _bit_equal(a, b):
    a, b = dict(a), dict(b)
    return a.keys() == b.keys() and all(torch.equal(a[k].detach(), b[k].detach()) for k in a)


def _opt(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _bucketed(model):
    return parallel.BucketedDDP(model, bucket_size_mb=0.004)       # tiny buckets: several of them


# ---------------------------------------------------------------
# The 2-rank job: every registered check runs on both ranks, in order, in one process group

_RANK_CHECKS = []


def _rank_check(fn):
    """Register fn(rank, world) -> {key: number or bool}; its results land in parallel_results[name]."""
    _RANK_CHECKS.append(fn)
    return fn


def _worst_over_ranks(res):
    # Every rank's numbers matter (TP/PP grads live on both): a bool is the AND over ranks, a
    # *diff the max; anything else is rank 0's.
    for k, v in res.items():
        if isinstance(v, bool) or k.endswith("diff"):
            t = torch.tensor(float(v))
            dist.all_reduce(t, op=dist.ReduceOp.MIN if isinstance(v, bool) else dist.ReduceOp.MAX)
            res[k] = bool(t.item()) if isinstance(v, bool) else t.item()
    return res


def _worker(rank, world, port, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    res = {fn.__name__.removeprefix("_check_"): _worst_over_ranks(fn(rank, world)) for fn in _RANK_CHECKS}
    dist.all_reduce(torch.zeros(1))                  # every rank is past its last collective
    with open(f"{out_path}.rank{rank}", "w") as f:   # each rank reports, so a failure says who got how far
        json.dump(res, f)
    dist.barrier()                                   # nobody closes sockets the other still reads
    dist.destroy_process_group()
    # Skip interpreter teardown: the checks are done and written, and a CI run once saw a rank
    # SIGABRT ("terminate called without an active exception") in C++ static destructors at exit.
    os._exit(0)


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    os.environ["OMP_NUM_THREADS"] = "1"
    for attempt in (1, 2):
        out = tmp_path_factory.mktemp("parallel") / "results.json"
        ctx = mp.start_processes(_worker, args=(2, parallel.free_port(), str(out)), nprocs=2, join=False,
                                 start_method="spawn")
        try:
            for _ in range(240):                   # join with a deadline: a desync must not hang CI
                if ctx.join(timeout=1):
                    with open(f"{out}.rank0") as f:
                        return json.load(f)
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-rank parallel checks timed out")
        except mp.ProcessExitedException as e:
            done = [r for r in range(2) if os.path.exists(f"{out}.rank{r}")]
            # A rank killed by a signal inside gloo (CI once saw a SIGABRT, never reproduced in 30+ runs
            # here) gets one fresh try on a new port; a Python error or a second crash fails the test.
            if attempt == 1 and e.exit_code is not None and e.exit_code < 0:
                warnings.warn(f"2-rank parallel checks: {e}; ranks that finished: {done}; retrying once")
                continue
            pytest.fail(f"2-rank parallel checks: {e}; ranks that finished their checks: {done}")


# ---------------------------------------------------------------
# DDP and BucketedDDP

@_rank_check
def _check_ddp(rank, world):
    """DDP and BucketedDDP vs one process, SGD and AdamW, tied + frozen params."""
    res = {}
    for name, wrap in (("ddp", parallel.DDP), ("bucketed", _bucketed)):
        for kind in ("sgd", "adamw"):
            model = _toy()
            if rank == 1:                        # a different init on rank 1: the wrap must broadcast
                torch.nn.init.normal_(model.lm_head.weight)
            ref_h, ref_f = copy.deepcopy(_toy()), _toy()
            w = wrap(model)
            opt, opt_h, opt_f = _opt(kind, w.parameters()), _opt(kind, ref_h.parameters()), _opt(kind, ref_f.parameters())
            frozen0 = model.frozen.weight.detach().clone()
            bits, diff = True, 0.0
            for s in range(STEPS):
                _dist_step(w, opt, s, rank)
                _ref_step(ref_h, opt_h, s, halves=True)
                _ref_step(ref_f, opt_f, s, halves=False)
                bits &= _bit_equal(w.module.named_parameters(), ref_h.named_parameters())
                diff = max(diff, _max_diff(w.module.named_parameters(), ref_f.named_parameters()))
            res[f"{name}_{kind}_bits"], res[f"{name}_{kind}_diff"] = bits, diff
            res[f"{name}_{kind}_frozen"] = torch.equal(model.frozen.weight, frozen0) and model.frozen.weight.grad is None
            res[f"{name}_{kind}_tied"] = model.lm_head.weight is model.token_embeddings.weight
            if name == "bucketed":
                res["bucketed_num_buckets"] = len(w.buckets)
    return res


@pytest.mark.slow
def test_parallel_ddp_equals_single_process(parallel_results):
    """DDP and BucketedDDP (SGD, AdamW; tied, frozen, rank-1 misinit) == one process on the global batch."""
    r = parallel_results["ddp"]
    for name in ("ddp", "bucketed"):
        for kind in ("sgd", "adamw"):
            # same per-rank arithmetic as running the two halves in one process: bit-equal
            assert r[f"{name}_{kind}_bits"], (name, kind)
            # vs one forward over the full batch: equal up to float reassociation; a sum instead of
            # a mean of the two ranks' grads would be off by ~lr here, far above 1e-5
            assert r[f"{name}_{kind}_diff"] < 1e-5, (name, kind, r[f"{name}_{kind}_diff"])
            assert r[f"{name}_{kind}_frozen"] and r[f"{name}_{kind}_tied"], (name, kind)
    assert r["bucketed_num_buckets"] > 2            # the tiny bucket size really made several buckets


@_rank_check
def _check_no_sync(rank, world):
    """Gradient accumulation: no communication inside no_sync, one sync on the last micro-step."""
    res = {}
    for name, wrap in (("ddp", parallel.DDP), ("bucketed", _bucketed)):
        w, ref = wrap(_toy()), _toy()
        x, y = _global_batch(0)
        half = B // 2
        with w.no_sync():
            (_loss(w, x[rank * B:rank * B + half], y[rank * B:rank * B + half]) / 2).backward()
        res[f"{name}_nosync_bytes"] = w.comm_bytes
        (_loss(w, x[rank * B + half:(rank + 1) * B], y[rank * B + half:(rank + 1) * B]) / 2).backward()
        w.finish_gradient_synchronization()
        res[f"{name}_sync_bytes"] = w.comm_bytes
        for q in range(4):
            (_loss(ref, x[q * half:(q + 1) * half], y[q * half:(q + 1) * half]) / 4).backward()
        g = {n: p.grad for n, p in w.module.named_parameters() if p.grad is not None}
        res[f"{name}_accum_grad_diff"] = _max_diff(g, {n: p.grad for n, p in ref.named_parameters() if p.grad is not None})
    return res


@pytest.mark.slow
def test_parallel_ddp_no_sync_accumulation(parallel_results):
    """no_sync micro-steps send nothing; the synced sum == one process's 4-micro-batch gradient."""
    r = parallel_results["no_sync"]
    for name in ("ddp", "bucketed"):
        assert r[f"{name}_nosync_bytes"] == 0, name                 # no all-reduce on non-final micro-steps
        assert r[f"{name}_sync_bytes"] > 0, name                    # ...and a sync on the last one
        assert r[f"{name}_accum_grad_diff"] < 1e-6, (name, r[f"{name}_accum_grad_diff"])


# ---------------------------------------------------------------
# ZeRO-1

@_rank_check
def _check_zero1(rank, world):
    """Sharded AdamW == plain AdamW, with 1/N of the optimizer state."""
    w, ref = parallel.BucketedDDP(_toy()), _toy()
    opt, opt_ref = parallel.ShardedOptimizer(w.parameters(), torch.optim.AdamW, lr=1e-2, weight_decay=0.1), _opt("adamw", ref.parameters())
    ok = True
    for s in range(STEPS):
        _dist_step(w, opt, s, rank)
        _ref_step(ref, opt_ref, s)
        for (_, p), (_, q) in zip(w.module.named_parameters(), ref.named_parameters()):
            ok &= torch.allclose(p, q, rtol=1e-7, atol=0)
    full_state = sum(t.numel() * 4 for s in opt_ref.state.values() for t in s.values() if t.dim() > 0)
    shard_state = torch.tensor(float(opt.state_bytes()))
    dist.all_reduce(shard_state)
    return {"equal": ok, "state_share": opt.state_bytes() / full_state, "state_total": shard_state.item() / full_state}


@pytest.mark.slow
def test_parallel_zero1_equals_adamw(parallel_results):
    """ZeRO-1's sharded AdamW == torch AdamW in one process; the ranks' state shards partition the state."""
    r = parallel_results["zero1"]
    assert r["equal"]                                                # rtol 1e-7 after every step
    assert r["state_share"] < 0.75                                   # this rank holds only part of it
    assert abs(r["state_total"] - 1.0) < 1e-9                        # shards partition the state


# ---------------------------------------------------------------
# FSDP

@_rank_check
def _check_fsdp_fp32(rank, world):
    """FSDP fp32: bit-equal to one process; gather_full_params keyed like the original model."""
    res = {}
    for kind in ("sgd", "adamw"):
        f, ref = parallel.FSDP(_toy()), _toy()
        opt, opt_ref = _opt(kind, f.parameters()), _opt(kind, ref.parameters())
        bits = True
        for s in range(STEPS):
            _dist_step(f, opt, s, rank)
            _ref_step(ref, opt_ref, s)
            bits &= _bit_equal(f.gather_full_params(), ref.named_parameters())
        res[f"{kind}_bits"] = bits
    full = f.gather_full_params()
    res["keys"] = sorted(full) == sorted(n for n, _ in ref.named_parameters())
    res["shapes"] = all(full[n].shape == p.shape for n, p in ref.named_parameters())
    res["shard_numel"] = max(p.numel() for p in f.parameters() if p.dim() == 1 and p.numel() > D)
    return res


@pytest.mark.slow
def test_parallel_fsdp_fp32_bit_equal_and_keys(parallel_results):
    """FSDP in fp32 == one process bit for bit; full params keep the original names/shapes; shards are 1/N."""
    r = parallel_results["fsdp_fp32"]
    assert r["sgd_bits"] and r["adamw_bits"]
    assert r["keys"] and r["shapes"]
    assert r["shard_numel"] == (V * D) // 2                          # the (64, 16) table: half per rank


@_rank_check
def _check_fsdp_mixed(rank, world):
    """FSDP bf16 / fp16 compute with fp32 master weights vs the cast-emulating reference."""
    res = {}
    for dt in (torch.bfloat16, torch.float16):
        f, ref = parallel.FSDP(_toy(), compute_dtype=dt), _toy()
        opt, opt_ref = _opt("adamw", f.parameters()), _opt("adamw", ref.parameters())
        diff = 0.0
        for s in range(STEPS):
            _dist_step(f, opt, s, rank)
            _ref_step(ref, opt_ref, s, forward=lambda idx: _cast_forward(ref, dt, idx))
            diff = max(diff, _max_diff(f.gather_full_params(), ref.named_parameters()))
        res[f"{str(dt)[6:]}_diff"] = diff
        res[f"{str(dt)[6:]}_master_fp32"] = all(p.dtype == torch.float32 for p in f.parameters())
    return res


@pytest.mark.slow
def test_parallel_fsdp_mixed_precision(parallel_results):
    """FSDP with bf16/fp16 compute == a naive cast-at-use reference in one process; master weights stay fp32."""
    r = parallel_results["fsdp_mixed"]
    for dt in ("bfloat16", "float16"):
        assert r[f"{dt}_master_fp32"], dt
        assert r[f"{dt}_diff"] < 1e-4, (dt, r[f"{dt}_diff"])


# ---------------------------------------------------------------
# Tensor and pipeline parallelism

@_rank_check
def _check_tp(rank, world):
    """A model.py block (GQA + RoPE) split over 2 ranks == the unsplit block: output and all grads."""
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=V, context_length=T, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2)
    block = M.TransformerBlock(cfg)
    x = torch.randn(2, T, 32, requires_grad=True)
    up = torch.randn(2, T, 32)                       # a fixed upstream gradient
    out = block(x)
    (out * up).sum().backward()
    tp = parallel.TPBlock(block, rank, world)
    x2 = x.detach().clone().requires_grad_(True)
    out2 = tp(x2)
    (out2 * up).sum().backward()
    a, fn = block.attn, block.ffn
    pairs = [(tp.attn.wq, a.q_proj.weight.grad.chunk(world, 0)[rank]), (tp.attn.wk, a.k_proj.weight.grad.chunk(world, 0)[rank]),
             (tp.attn.wv, a.v_proj.weight.grad.chunk(world, 0)[rank]), (tp.attn.wo, a.output_proj.weight.grad.chunk(world, 1)[rank]),
             (tp.ffn.w1, fn.w1.weight.grad.chunk(world, 0)[rank]), (tp.ffn.w3, fn.w3.weight.grad.chunk(world, 0)[rank]),
             (tp.ffn.w2, fn.w2.weight.grad.chunk(world, 1)[rank]), (tp.ln1.weight, block.ln1.weight.grad),
             (tp.ln2.weight, block.ln2.weight.grad)]
    return {"out_diff": (out2 - out).abs().max().item(), "xgrad_diff": (x2.grad - x.grad).abs().max().item(),
            "wgrad_diff": max((p.grad - g).abs().max().item() for p, g in pairs)}


@pytest.mark.slow
def test_parallel_tensor_block(parallel_results):
    """Megatron TPBlock on 2 ranks == the unsplit model.py block (output, input grad, weight-grad shards)."""
    r = parallel_results["tp"]
    assert r["out_diff"] < 1e-5 and r["xgrad_diff"] < 1e-5 and r["wgrad_diff"] < 1e-5, r


@_rank_check
def _check_pp(rank, world):
    """GPipe, 2 stages x 4 micro-batches == the unsplit model: loss and every stage's grads."""
    model = _toy(tie=False)
    ref = copy.deepcopy(model)
    layers, ref_layers = model.as_layers(), ref.as_layers()
    stage = parallel.split_stages(layers, world)[rank]
    x, y = _global_batch(0)
    loss = parallel.gpipe_step(stage, x, y, 4, (2 * B // 4, T, D))
    ref_loss = _loss(ref, x, y)
    ref_loss.backward()
    mine = [i for i, l in enumerate(layers) if any(l is m for m in stage)]
    return {"loss_diff": abs(loss - ref_loss.item()) if rank == world - 1 else 0.0,
            "grad_diff": max((p.grad - q.grad).abs().max().item() for i in mine
                             for p, q in zip(layers[i].parameters(), ref_layers[i].parameters()) if p.requires_grad),
            "layers": len(mine)}


@pytest.mark.slow
def test_parallel_gpipe(parallel_results):
    """GPipe over 2 stages x 4 micro-batches == one process on the full batch (loss and grads)."""
    r = parallel_results["pp"]
    assert r["layers"] == 3                                          # 6 layers over 2 stages
    assert r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5, r


@_rank_check
def _check_gpipe_float64(rank, world):
    """GPipe on a float64 TransformerLM (model.py, lm_as_layers): the stages' receive buffers must take
    the stage's dtype (and device: NCCL receives only into GPU memory), so a float64 run == one process."""
    torch.manual_seed(0)
    lm = TransformerLM(ModelConfig(vocab_size=V, context_length=T, d_model=D, num_layers=2, num_heads=2)).double()
    ref = copy.deepcopy(lm)
    layers, ref_layers = parallel.lm_as_layers(lm), parallel.lm_as_layers(ref)
    stage = parallel.split_stages(layers, world)[rank]
    x, y = _global_batch(0)
    loss = parallel.gpipe_step(stage, x, y, 4, (2 * B // 4, T, D))
    # the same schedule in one process: 4 micro-batch forwards, their backwards last first
    losses = [F.cross_entropy(ref(xm).flatten(0, 1), ym.reshape(-1)) / 4 for xm, ym in zip(x.chunk(4), y.chunk(4))]
    for l in reversed(losses):
        l.backward()
    mine = [i for i, l in enumerate(layers) if any(l is m for m in stage)]
    return {"loss_diff": abs(loss - sum(l.item() for l in losses)) if rank == world - 1 else 0.0,
            "grad_diff": max((p.grad - q.grad).abs().max().item() for i in mine
                             for p, q in zip(layers[i].parameters(), ref_layers[i].parameters())),
            "float64": all(p.dtype == torch.float64 and p.grad.dtype == torch.float64 for p in stage.parameters())}


@pytest.mark.slow
def test_parallel_gpipe_buffers_follow_stage_dtype(parallel_results):
    """GPipe on a float64 TransformerLM == the same micro-batch schedule in one process, bit for bit."""
    r = parallel_results["gpipe_float64"]
    assert r["float64"]
    assert r["loss_diff"] == 0 and r["grad_diff"] == 0, r


# ---------------------------------------------------------------
# Robustness and gradient scale

@_rank_check
def _check_fsdp_stray_forward(rank, world):
    """FSDP after a grad-mode forward whose backward never comes (an eval without no_grad), then normal steps."""
    f, ref = parallel.FSDP(_toy()), _toy()
    opt, opt_ref = _opt("sgd", f.parameters()), _opt("sgd", ref.parameters())
    x, y = _global_batch(0)
    _loss(f, x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B])      # no backward, no finish
    bits, every_shard_grad = True, True
    for s in range(STEPS):
        _dist_step(f, opt, s, rank)
        _ref_step(ref, opt_ref, s)
        bits &= _bit_equal(f.gather_full_params(), ref.named_parameters())
        every_shard_grad &= all(e["shard"].grad is not None for e in f.sharded.values() if e["shard"].requires_grad)
    return {"bits": bits, "every_shard_grad": every_shard_grad}


@pytest.mark.slow
def test_parallel_fsdp_forward_without_backward(parallel_results):
    """A forward without backward must not hold back a later step's shard gradients: still == one process."""
    r = parallel_results["fsdp_stray_forward"]
    assert r["every_shard_grad"] and r["bits"], r


def _grad_norm(grads):
    return torch.stack([g.float().norm() for g in grads]).norm().item()


@_rank_check
def _check_grad_scale(rank, world):
    """Raw synchronized gradients and the pre-clip grad norm vs one process's full-batch mean gradient.
    The parameter checks above run AdamW too, which is blind to a constant gradient scale; these are not."""
    x, y = _global_batch(0)
    xs, ys = x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]
    ref = _toy()
    _loss(ref, x, y).backward()                          # one forward over the global batch: its mean
    ref_g = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    ref_norm, res = _grad_norm(ref_g.values()), {}
    for name, wrap in (("ddp", parallel.DDP), ("bucketed", _bucketed)):
        w = wrap(_toy())
        _loss(w, xs, ys).backward()
        w.finish_gradient_synchronization()
        g = {n: p.grad for n, p in w.module.named_parameters() if p.grad is not None}
        res[f"{name}_grad_diff"] = _max_diff(g, ref_g)
        res[f"{name}_norm_rel_diff"] = abs(_grad_norm(g.values()) / ref_norm - 1)
    f = parallel.FSDP(_toy())
    _loss(f, xs, ys).backward()
    f.finish_gradient_synchronization()
    res["fsdp_grad_diff"], norm = _fsdp_grad_diff(f, ref_g, rank, world)
    res["fsdp_norm_rel_diff"] = abs(norm / ref_norm - 1)
    # two forwards, then one backward of their sum (FSDP.forward restarts its use count each time)
    f = parallel.FSDP(_toy())
    half = B // 2
    (_loss(f, xs[:half], ys[:half]) / 2 + _loss(f, xs[half:], ys[half:]) / 2).backward()
    f.finish_gradient_synchronization()
    res["fsdp_two_forwards_grad_diff"] = _fsdp_grad_diff(f, ref_g, rank, world)[0]
    return res


def _fsdp_grad_diff(f, ref_g, rank, world):
    """(max |FSDP grad - my slice of the reference grad|, global grad norm) of an FSDP-wrapped toy."""
    diff, sq = 0.0, torch.zeros(())
    for e in (e for e in f.sharded.values() if e["shard"].requires_grad):   # my slice of each sharded grad
        k, full = e["shard"].numel(), ref_g[e["name"]].reshape(-1)
        diff = max(diff, (e["shard"].grad - F.pad(full, (0, k * world - full.numel()))[rank * k:(rank + 1) * k]).abs().max().item())
        sq += e["shard"].grad.pow(2).sum()
    dist.all_reduce(sq)                                  # ||g||^2 = sum over ranks of the shards' squares
    for p in f.replicated:                               # the norm gains: whole on every rank, counted once
        diff = max(diff, (p.grad - ref_g[f.names[id(p)]]).abs().max().item())
        sq += p.grad.pow(2).sum()
    return diff, sq.sqrt().item()


@pytest.mark.slow
def test_parallel_gradients_are_the_global_mean(parallel_results):
    """DDP, BucketedDDP and FSDP gradients (and the pre-clip norm) == one process's full-batch mean, not N x it."""
    r = parallel_results["grad_scale"]
    for name in ("ddp", "bucketed", "fsdp"):
        assert r[f"{name}_grad_diff"] < 1e-6, (name, r)                  # a sum over ranks is off by ~|g|
        assert r[f"{name}_norm_rel_diff"] < 1e-5, (name, r)              # ... and its norm by 100%
    assert r["fsdp_two_forwards_grad_diff"] < 1e-6, r                # no shard gradient lost or doubled


# ---------------------------------------------------------------
# The real path: torchrun train.py on 2 CPU ranks == 1 rank with doubled gradient accumulation

def _launch_train(tmp_path, name, nproc, accum, extra=()):
    cmd = ["train.py", "--data", str(tmp_path / "data"), "--out-dir", str(tmp_path / name), "--vocab-size", "64",
           "--d-model", "32", "--num-layers", "1", "--num-heads", "2", "--context-length", "16",
           "--batch-size", "2", "--grad-accum", str(accum), "--max-steps", "3", "--warmup-steps", "1",
           "--log-every", "1", "--eval-every", "3", "--eval-steps", "1", "--sample-every", "0",
           "--ckpt-every", "3", "--tie-embeddings", *extra]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(parallel.free_port())] + cmd
    return subprocess.Popen([sys.executable, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            cwd=os.path.dirname(os.path.abspath(parallel.__file__)))


def _train_losses(proc, out):
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    pick = lambda key: [r[key] for r in recs if key in r and not r.get("final")]
    return {"loss": pick("loss"), "grad_norm": pick("grad_norm"), "val_loss": pick("val_loss")}, stdout


@pytest.mark.slow
def test_parallel_torchrun_matches_single_process(tmp_path):
    """torchrun train.py on 2 ranks (BucketedDDP, and FSDP2) == 1 rank with doubled grad accumulation."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 4000), ("val", 1000)):
        rng.integers(0, 64, n).astype(np.uint16).tofile(data / f"{split}.bin")
    # all three at once: start-up (imports) dominates, and it overlaps
    runs = {"one": _launch_train(tmp_path, "one", 1, accum=4),
            "ddp": _launch_train(tmp_path, "ddp", 2, accum=2),               # 2 ranks x accum 2: exercises no_sync
            "fsdp": _launch_train(tmp_path, "fsdp", 2, accum=2, extra=["--fsdp"])}  # torch's fully_shard
    (one, _), (ddp, log), (fsdp, _) = (_train_losses(p, tmp_path / k) for k, p in runs.items())
    assert len(one["loss"]) == len(ddp["loss"]) == len(fsdp["loss"]) == 3
    # losses; pre-clip grad norms (scale-sensitive: a missing 1/accum or 1/world shows here, not in AdamW's
    # scale-invariant update); and val loss, which must not depend on the number of ranks
    for key in ("loss", "grad_norm", "val_loss"):
        assert len(one[key]) == len(ddp[key]) == len(fsdp[key]) > 0, key
        for other in (ddp, fsdp):
            assert max(abs(a - b) / abs(a) for a, b in zip(one[key], other[key])) < 1e-4, (key, one[key], other[key])
    assert one["loss"][0] != one["loss"][-1]                         # it really trained
    assert log.count("step 1/3") == 1                                # only rank 0 prints
    assert (tmp_path / "ddp" / "ckpt.pt").exists() and (tmp_path / "fsdp" / "ckpt.pt").exists()


# ---------------------------------------------------------------
# Scaling laws (scaling.py): FLOP accounting, Chinchilla approaches 2 and 3, the sweep
#
# Trusted references: torch's FlopCounterMode and model.py's own parameter count for the FLOP
# accounting; data drawn from a *known* law L = E + A/N^alpha + B/D^beta (Chinchilla's published
# constants) with small noise for the fits; a brute-force grid search for the closed-form allocation.


TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)   # Hoffmann et al. 2022, eq. 10
NOISE = 1e-3                                                     # std of log-loss noise


def synthetic_isoflop(seed=0, budgets=np.logspace(18, 22, 5), noise=NOISE):
    """7 sizes per budget spanning 10x either side of the true optimum, D = C / 6N."""
    rng = np.random.default_rng(seed)
    N = np.concatenate([scaling.compute_optimal(TRUE, C)[0] * np.logspace(-1, 1, 7) for C in budgets])
    C = np.repeat(budgets, 7)
    D = C / (6 * N)
    loss = scaling.predict_loss(TRUE, N, D) * np.exp(rng.normal(0, noise, len(N)))
    return {"N": N, "D": D, "C": C, "loss": loss, "budget": C}


@pytest.fixture(scope="module")
def fit3():
    """One approach-3 fit shared by the tests below (L-BFGS from the grid costs a few seconds).
    The largest-budget run with N nearest its optimum is held out for the prediction test."""
    runs = synthetic_isoflop()
    held = len(runs["N"]) - 4
    keep = np.arange(len(runs["N"])) != held
    fit = scaling.fit_parametric(runs["N"][keep], runs["D"][keep], runs["loss"][keep], top_k=4)
    return fit, runs, held


def test_scaling_sweep_sizes_count_like_transformer_lm():
    """The sweep's N columns (model.count_params of size_config's config) equal the parameters of the TransformerLM train.py builds."""
    for d, L, head_dim in [(32, 2, 8), (48, 3, 8), (12, 1, 8), (64, 2, 16)]:
        args = argparse.Namespace(num_layers=L, head_dim=head_dim, context_length=16, flops="exact")
        cfg, per_tok = scaling.size_config(d, args, 100)
        m = M.TransformerLM(M.ModelConfig(vocab_size=100, context_length=16, d_model=d, num_layers=L,
                                          num_heads=cfg.num_heads, d_ff=cfg.d_ff))
        assert M.count_params(cfg) == m.num_params()
        assert M.count_params(cfg, non_embedding=True) == m.num_params(non_embedding=True)
        assert per_tok == scaling.train_flops_per_token(cfg) and cfg.d_ff == max(8, 8 * round(d / 3))


def test_scaling_flops_match_torch_flop_counter():
    """Our fwd+bwd matmul count (full T x T square) == torch's FlopCounterMode on the real model, == model.flops_per_token minus the RMSNorm gains."""
    # the from-scratch attention computes the full T x T square, so we compare with causal=False
    V, d, L, H, T, B = 64, 32, 2, 4, 16, 2
    cfg = M.ModelConfig(vocab_size=V, context_length=T, d_model=d, num_layers=L, num_heads=H,
                        num_kv_heads=2, attn_backend="scratch")
    m = M.TransformerLM(cfg)
    counter = FlopCounterMode(display=False)
    with counter:
        m(torch.randint(0, V, (B, T))).sum().backward()
    ours = scaling.train_flops_per_token(cfg, causal=False)
    assert counter.get_total_flops() == ours * B * T
    gains = 6 * (2 * d * L + d)
    assert M.flops_per_token(cfg) == ours + gains
    # a causal kernel skips the masked half: QK^T and AV drop from T to (T+1)/2 keys per query
    causal = scaling.train_flops_per_token(cfg)
    assert ours - causal == pytest.approx(3 * L * 4 * d * (T - (T + 1) / 2))


def test_scaling_flops_table_6nd_is_off_when_small():
    """exact/6N is > 1.2 at d_model 16, within 1% at 4096, and falls monotonically with size."""
    rows = scaling.flops_table(vocab_size=256, context_length=256)
    ratio = [r["exact/6N"] for r in rows]
    assert ratio[0] > 1.2 and abs(ratio[-1] - 1) < 0.01        # attention matters only when small
    assert all(a >= b for a, b in zip(ratio, ratio[1:]))        # and fades monotonically with size


def test_scaling_load_runs_csv_with_C_column(tmp_path):
    """A CSV with N, C, loss gets D = C / 6N and one budget per distinct C; a budget column is taken as given."""
    p = tmp_path / "pub.csv"
    p.write_text("N,C,loss\n1e6,6e12,3.1\n2e6,6e12,3.0\n")
    r = scaling.load_runs(str(p))
    np.testing.assert_allclose(r["D"], [1e6, 5e5])             # D = C / 6N
    np.testing.assert_allclose(r["budget"], [6e12, 6e12])
    p.write_text("N,C,loss,budget\n1e6,6.1e12,3.1,6e12\n2e6,5.9e12,3.0,6e12\n")   # a budget column is used as given
    np.testing.assert_array_equal(scaling.load_runs(str(p))["budget"], [6e12, 6e12])


def test_scaling_jittered_flops_group_into_their_budgets(tmp_path):
    """Runs whose C is jittered by ~2% still fall into their 5 IsoFLOP budgets (rounding C to 2 digits split them) and approach 2 recovers a."""
    runs = synthetic_isoflop(seed=3)
    C = runs["C"] * np.exp(np.random.default_rng(0).normal(0, 0.02, len(runs["C"])))
    p = tmp_path / "jittered.csv"
    p.write_text("N,C,loss\n" + "".join(f"{n},{c},{l}\n" for n, c, l in zip(runs["N"], C, runs["loss"])))
    r = scaling.load_runs(str(p))
    assert len(np.unique(r["budget"])) == 5
    for c in np.unique(r["budget"]):
        assert len(np.unique(r["N"][r["budget"] == c])) == 7
    assert abs(scaling.approach2(r, n_boot=5)["a"] - TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])) < 0.03


def test_scaling_too_few_sizes_per_budget_warns(capsys):
    """When most budgets have < 3 model sizes approach 2 says so (and why) before giving up."""
    runs = synthetic_isoflop(seed=4)
    keep = np.arange(len(runs["N"])) % 7 < 2   # 2 sizes per budget
    with pytest.raises(SystemExit, match="approach 2 needs"):
        scaling.approach2({k: v[keep] for k, v in runs.items()}, n_boot=2)
    assert "warning: 5 of 5 budgets have fewer than 3 model sizes" in capsys.readouterr().out


def test_scaling_non_numeric_cell_is_one_line_error(tmp_path):
    """A CSV cell that is not a number is a one-line error naming the row and column, not a ValueError traceback."""
    p = tmp_path / "bad.csv"
    p.write_text("N,C,loss\n1e6,6e12,3.1\n2e6,6e12,n/a\n")
    with pytest.raises(SystemExit, match=r"^error: .*bad.csv row 2: loss = 'n/a' is not a number$"):
        scaling.load_runs(str(p))


def _fake_train(cmd, cwd=None, stdout=None, stderr=None, env=None):
    """Stands in for the train.py subprocess: a finished metrics.jsonl whose val_loss is the --lr it was given."""
    run_dir = cmd[cmd.index("--out-dir") + 1]
    os.makedirs(run_dir, exist_ok=True)
    rec = {"final": True, "step": int(cmd[cmd.index("--max-steps") + 1]), "val_loss": float(cmd[cmd.index("--lr") + 1])}
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps(rec) + "\n")
    return 0


def test_scaling_sweep_rerun_with_other_lr_makes_new_runs(tmp_path, monkeypatch, capsys):
    """A rerun with another --lr into the same --out-dir trains new runs (names hash the training flags), never reuses the old ones, and never mixes both in one results file."""
    monkeypatch.setattr(scaling.subprocess, "call", _fake_train)
    base = ["sweep", "--data", str(tmp_path), "--vocab-size", "256", "--out-dir", str(tmp_path / "runs"), "--budgets", "1e8",
            "--sizes", "8", "--num-layers", "1", "--context-length", "16", "--batch-size", "4", "--min-steps", "1"]
    first = [json.loads(l) for l in open(scaling.sweep(scaling.build_parser().parse_args(base + ["--lr", "0.01"])))]
    again = base + ["--lr", "0.02", "--results", str(tmp_path / "lr2.jsonl")]
    second = [json.loads(l) for l in open(scaling.sweep(scaling.build_parser().parse_args(again)))]
    assert "reusing" not in capsys.readouterr().out
    assert first[0]["loss"] == 0.01 and second[0]["loss"] == 0.02 and first[0]["run"] != second[0]["run"]
    with pytest.raises(SystemExit, match="other training flags"):  # lr 0.02 into lr 0.01's results.jsonl
        scaling.sweep(scaling.build_parser().parse_args(base + ["--lr", "0.02"]))


def test_scaling_approach3_recovers_known_law(fit3):
    """The parametric fit recovers Chinchilla's published E, A, B, alpha, beta within 5% from noisy synthetic runs."""
    fit, _, _ = fit3
    for k, v in TRUE.items():
        assert abs(fit[k] / v - 1) < 0.05, (k, fit[k], v)


def test_scaling_approach3_predicts_held_out_point(fit3):
    """The fit predicts a held-out run's loss within 4 noise std."""
    fit, runs, i = fit3
    pred = scaling.predict_loss(fit, runs["N"][i], runs["D"][i])
    assert abs(np.log(pred / runs["loss"][i])) < 4 * NOISE


def test_scaling_allocation_closed_form_matches_brute_force(fit3):
    """compute_optimal's closed form equals a brute-force search over N at fixed C = 6ND."""
    fit, _, _ = fit3
    for C in (1e19, 1e23):
        N_opt, D_opt = scaling.compute_optimal(fit, C)
        assert 6 * N_opt * D_opt == pytest.approx(C)
        Ns = np.logspace(np.log10(N_opt) - 2, np.log10(N_opt) + 2, 200001)
        N_bf = Ns[np.argmin(scaling.predict_loss(fit, Ns, C / (6 * Ns)))]
        assert N_opt == pytest.approx(N_bf, rel=1e-3)


def test_scaling_approach2_recovers_exponent():
    """IsoFLOP parabolas recover the true exponents a, b within 0.01, with the truth inside the bootstrap CIs."""
    a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])    # N_opt ~ C^(beta/(alpha+beta))
    a2 = scaling.approach2(synthetic_isoflop(seed=1), n_boot=50, targets=[1e24])
    assert abs(a2["a"] - a_true) < 0.01 and abs(a2["b"] - (1 - a_true)) < 0.01
    assert a2["a_ci"][0] < a_true < a2["a_ci"][1]
    N_true = scaling.compute_optimal(TRUE, 1e24)[0]
    assert a2["predict"][1e24]["N_ci"][0] < N_true < a2["predict"][1e24]["N_ci"][1]


@pytest.mark.slow
def test_scaling_sweep_end_to_end_and_resumable(tmp_path, capsys):
    """3 tiny train.py runs (2 budgets x 2 sizes, one too small to run) give exact N and C columns; a rerun skips all and touches nothing."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 20000), ("val", 4000)):   # repetitive bytes: something to learn
        text = "".join(rng.choice(["the cat ", "sat on ", "a mat. "], size=n // 7))
        (data / f"{split}.txt").write_text(text)
    scaling.write_byte_dataset(str(data), str(data))
    out = tmp_path / "runs"
    # scaling.sweep runs in-process (train.py is still a subprocess, as in real use): one torch
    # import fewer per invocation, which is most of this test's time on a busy machine.
    args = scaling.build_parser().parse_args(
        ["sweep", "--data", str(data), "--vocab-size", "256", "--out-dir", str(out),
         "--budgets", "2e7", "4e7", "--sizes", "8", "16", "--num-layers", "1", "--context-length", "16",
         "--batch-size", "4", "--min-steps", "8", "--eval-steps", "2", "--lr", "1e-2"])
    path = scaling.sweep(args)
    first = capsys.readouterr().out
    rows = [json.loads(l) for l in open(path)]
    assert len(rows) == 3 and re.search(r"C2\.0e\+07_d16_L1_[0-9a-f]{8}: only 7 steps", first)   # < --min-steps
    for r in rows:
        cfg = M.ModelConfig(vocab_size=256, d_model=r["d_model"], num_layers=1, num_heads=r["d_model"] // 8,
                            d_ff=max(8, 8 * round(r["d_model"] / 3)))
        assert r["N"] == M.count_params(cfg, non_embedding=True) and np.isfinite(r["loss"]) and r["loss"] < np.log(256)
        assert r["C"] == pytest.approx(r["budget"], rel=0.1)      # steps rounded to whole numbers
    mtimes = {r["run"]: os.path.getmtime(out / r["run"] / "metrics.jsonl") for r in rows}
    scaling.sweep(args)
    assert capsys.readouterr().out.count("done, skipping") == 3
    assert [json.loads(l) for l in open(path)] == rows
    assert mtimes == {r: os.path.getmtime(out / r / "metrics.jsonl") for r in mtimes}


def test_scaling_fit_report_on_published_csv(tmp_path, capsys):
    """`fit` on a published-style table (N, C, loss) recovers the known law by both approaches and writes fit.json and a PNG (text table without matplotlib)."""
    runs = synthetic_isoflop(seed=2, budgets=np.logspace(18, 21, 4))
    p = tmp_path / "published.csv"
    p.write_text("N,C,loss\n" + "".join(f"{n},{c},{l}\n" for n, c, l in zip(runs["N"], runs["C"], runs["loss"])))
    scaling.fit_report(str(p), [1e23], n_boot=3)
    rep = json.loads((tmp_path / "fit.json").read_text())
    assert abs(rep["approach2"]["a"] - TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])) < 0.02
    assert abs(rep["approach3"]["alpha"] / TRUE["alpha"] - 1) < 0.05
    N_true = scaling.compute_optimal(TRUE, 1e23)[0]
    assert abs(rep["approach3"]["predict"]["1e+23"]["N_opt"] / N_true - 1) < 0.05
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "scaling.png").stat().st_size > 10_000
    else:
        assert "IsoFLOP table" in capsys.readouterr().out


# ---------------------------------------------------------------
# Chinchilla's approach 1 (scaling.approach1, scaling.py approach1): the lower envelope of loss curves
#
# Trusted references: a known law L = E + A/N^alpha + B/D^beta, whose compute-optimal exponents have a
# closed form (a = beta/(alpha+beta), b = alpha/(alpha+beta)); an envelope read off by hand; resume ==
# nothing re-run.

A1_LAW = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)   # Hoffmann et al. 2022, eq. 10


def test_scaling_approach1_recovers_closed_form_exponents():
    """On loss curves sampled from L = E + A/N^alpha + B/D^beta (25 sizes, 12 token counts each), the envelope's slopes are a = beta/(alpha+beta), b = alpha/(alpha+beta) within 0.02."""
    N = np.repeat(np.logspace(7, 10, 25), 12)
    D = 20 * N * np.tile(np.logspace(-1.5, 1.5, 12), 25)          # each size from 0.6 to 600 tokens/param
    al, be = A1_LAW["alpha"], A1_LAW["beta"]
    a1 = scaling.approach1({"N": N, "D": D, "loss": scaling.predict_loss(A1_LAW, N, D)})
    assert abs(a1["a"] - be / (al + be)) < 0.02 and abs(a1["b"] - al / (al + be)) < 0.02, (a1["a"], a1["b"])
    assert a1["a"] + a1["b"] == pytest.approx(1) and len({p["N_opt"] for p in a1["points"]}) >= 8   # D_opt = C / 6N_opt


def test_scaling_approach1_envelope_by_hand():
    """Three straight loss curves in log C: at each grid C the lowest interpolated loss wins, and only a winner flanked by sizes on both sides counts."""
    # log C samples and losses per size: N=1: 5.2 - lc on [0, 4]; N=2: 4 - lc/2 on [0, 4]; N=3: 6.5 - 1.5 lc on [1, 4]
    lc = np.array([0, 4, 0, 4, 1, 4.0])
    N = np.array([1, 1, 2, 2, 3, 3.0])
    loss = np.array([5.2, 1.2, 4.0, 2.0, 5.0, 0.5])
    a1 = scaling.approach1({"N": N, "C": np.exp(lc), "D": np.exp(lc) / (6 * N), "loss": loss}, n_grid=5)
    # lc 0: N=3 absent, N=2 wins at the edge: dropped. lc 1: 4.2, 3.5, 5.0 -> N=2. lc 2: 3.2, 3.0, 3.5 -> N=2.
    # lc 3 and 4: N=3 wins (2.0, 0.5), the largest size: dropped.
    pts = a1["points"]
    assert [round(math.log(p["C"]), 9) for p in pts] == [1, 2] and [p["N_opt"] for p in pts] == [2, 2]
    assert [p["loss"] for p in pts] == pytest.approx([3.5, 3.0])
    assert [p["D_opt"] for p in pts] == pytest.approx([math.e / 12, math.e ** 2 / 12])   # C / (6 N_opt)
    with pytest.raises(SystemExit, match="approach 1 needs"):
        scaling.approach1({"N": N[:4], "C": np.exp(lc[:4]), "D": np.exp(lc[:4]), "loss": loss[:4]})


@pytest.mark.slow
def test_scaling_approach1_command_writes_jsonl_and_resumes(tmp_path, capsys):
    """2 sizes x 2 WSD branches: one stable run per size, one JSONL row per branch with its exact D; a rerun after dropping one row re-runs that branch alone (same loss) and no stable run."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 20000), ("val", 4000)):   # repetitive bytes: something to learn
        (data / f"{split}.txt").write_text("".join(rng.choice(["the cat ", "sat on ", "a mat. "], size=n // 7)))
    scaling.write_byte_dataset(str(data), str(data))
    out = tmp_path / "a1"
    args = scaling.build_parser().parse_args(
        ["approach1", "--data", str(data), "--out-dir", str(out), "--sizes", "8", "16", "--decay-starts", "8", "16",
         "--num-layers", "1", "--context-length", "16", "--batch-size", "4", "--warmup-steps", "2", "--eval-steps", "2"])
    path = scaling.approach1_sweep(args)
    assert capsys.readouterr().out.count("stable run of 20 steps") == 2      # k=16 decays over 4 of 20 steps
    rows = [json.loads(l) for l in open(path)]
    assert [(r["d_model"], r["decay_start"], r["steps"], r["D"]) for r in rows] == [
        (d, k, m, m * 4 * 16) for d in (8, 16) for k, m in ((8, 10), (16, 20))]
    assert all(np.isfinite(r["loss"]) and r["loss"] < np.log(256) for r in rows)
    metrics = sorted(out.glob("*/*/metrics.jsonl"))
    mtimes = {p: os.path.getmtime(p) for p in metrics}
    dropped = [r for r in rows if r["d_model"] == 16 and r["decay_start"] == 8][0]
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows if r is not dropped))
    scaling.approach1_sweep(args)
    assert "stable run" not in capsys.readouterr().out
    again = [json.loads(l) for l in open(path)]
    same = lambda rs: sorted(json.dumps({k: v for k, v in r.items() if k != "wall_s"}, sort_keys=True) for r in rs)  # noqa: E731
    assert same(again) == same(rows)                                          # the re-run branch: the same loss
    changed = [p for p in metrics if os.path.getmtime(p) != mtimes[p]]
    assert [p.parent.name for p in changed] == ["branch8"] and changed[0].parent.parent.name.startswith("d16_")


# ---------------------------------------------------------------
# Alignment (align.py): the task, the verifier, SFT / DPO / GRPO primitives, a tiny GRPO run.
# References: hand computations, closed forms (log 2, ratio 1), invariants (grad accumulation ==
# one big batch, split disjointness), and a learning check (reward rises on a toy task).



def _byte_tokenizer():
    # 256 single bytes + the chat specials: a real bpe.Tokenizer with no merges, so every
    # character is one token and token counts can be checked by hand.
    return bpe.Tokenizer({i: bytes([i]) for i in range(256)}, [], align.CHAT_SPECIALS)


def _tiny_lm(vocab_size, seed=0, context_length=64):
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig(vocab_size=vocab_size, context_length=context_length, d_model=32,
                                     num_layers=1, num_heads=2))


def test_align_response_mask_covers_exactly_the_response():
    """The response mask is True on exactly the output's labels, checked against a byte tokenizer by hand."""
    tok = _byte_tokenizer()
    prompts, outputs = [align.chat_prompt("1+2?"), align.chat_prompt("a")], ["3" + align.EOT, "bcde"]
    b = align.tokenize_prompt_and_output(prompts, outputs, tok)
    P = [len(tok.encode(p)) for p in prompts]  # 6 and 3 tokens
    O = [len(tok.encode(o)) for o in outputs]  # 2 and 4 tokens
    L = max(p + o for p, o in zip(P, O))
    assert b["input_ids"].shape == b["labels"].shape == b["response_mask"].shape == (2, L - 1)
    for i in range(2):
        full = tok.encode(prompts[i]) + tok.encode(outputs[i])
        # labels are the inputs shifted by one; the mask is on exactly the labels that are output tokens
        assert b["input_ids"][i, :len(full) - 1].tolist() == full[:-1]
        assert b["labels"][i, :len(full) - 1].tolist() == full[1:]
        want = [P[i] - 1 <= j < P[i] + O[i] - 1 for j in range(L - 1)]
        assert b["response_mask"][i].tolist() == want
        assert tok.decode(b["labels"][i][b["response_mask"][i]].tolist()) == outputs[i]


def test_align_masked_mean_and_normalize_by_hand():
    """masked_mean / masked_normalize equal hand sums, and an all-zero mask row gives 0, not NaN."""
    t = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]])  # the middle row is all-zero
    assert align.masked_mean(t, m).item() == pytest.approx((1 + 2 + 7 + 9) / 4)
    assert align.masked_mean(t, m, dim=1).tolist() == pytest.approx([1.5, 0.0, 8.0])  # empty row -> 0, not NaN
    assert align.masked_mean(t, m, dim=0).tolist() == pytest.approx([4.0, 2.0, 9.0])
    assert align.masked_normalize(t, m, normalize_constant=2.0).item() == pytest.approx(19 / 2)
    assert align.masked_normalize(t, m, dim=1, normalize_constant=4.0).tolist() == pytest.approx([0.75, 0.0, 4.0])
    assert align.masked_normalize(t, m, dim=0).tolist() == pytest.approx([8.0, 2.0, 9.0])


def test_align_compute_entropy_matches_torch_distribution():
    """compute_entropy equals torch.distributions.Categorical.entropy, even at large logits."""
    logits = torch.randn(3, 5, 11) * 30  # large logits: a naive softmax would overflow in exp
    want = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(align.compute_entropy(logits), want)


def test_align_group_normalized_rewards_hand_example():
    """GRPO advantages (with and without std) equal a hand computation on two groups."""
    rf = lambda r, g: {"reward": float(r == g), "answer_reward": float(r == g)}  # noqa: E731
    resp, gts = ["1", "2", "1", "1", "5", "5", "5", "5"], ["1"] * 4 + ["5"] * 4
    adv, raw, meta = align.compute_group_normalized_rewards(rf, resp, gts, 4, 1e-6, True)
    assert raw.tolist() == [1, 0, 1, 1, 1, 1, 1, 1]
    # group 1: mean 0.75, unbiased std sqrt(((.25^2)*3 + .75^2)/3) = 0.5; group 2: all equal -> 0
    assert adv.tolist() == pytest.approx([0.25 / 0.5, -0.75 / 0.5, 0.5, 0.5, 0, 0, 0, 0], abs=1e-5)
    adv2, _, _ = align.compute_group_normalized_rewards(rf, resp, gts, 4, 1e-6, False)  # Dr. GRPO
    assert adv2.tolist() == pytest.approx([0.25, -0.75, 0.25, 0.25, 0, 0, 0, 0])
    assert meta["reward"] == pytest.approx(7 / 8)


def test_align_grpo_clip_equals_naive_on_policy():
    """On policy (ratio 1) the clipped loss has REINFORCE's gradient; off policy the clip zeroes it."""
    torch.manual_seed(0)
    logits = torch.randn(4, 6, requires_grad=True)
    adv = torch.randn(4, 1)
    lp = torch.log_softmax(logits, -1)
    clip, meta = align.compute_grpo_clip_loss(adv, lp, lp.detach(), 0.2)
    naive = align.compute_naive_policy_gradient_loss(adv, lp)
    assert torch.allclose(meta["ratio"], torch.ones_like(lp))
    assert not meta["clipped"].any()
    torch.testing.assert_close(clip, -adv.expand_as(lp))  # rho = 1: loss value is -A
    g1, = torch.autograd.grad(clip.sum(), logits, retain_graph=True)
    g2, = torch.autograd.grad(naive.sum(), logits)
    torch.testing.assert_close(g1, g2)  # same gradient: d rho = rho * d log pi
    # off policy the clip bites: a ratio far above 1 + eps with A > 0 gets no gradient
    lp2 = torch.zeros(1, 1, requires_grad=True)
    loss, m = align.compute_grpo_clip_loss(torch.ones(1, 1), lp2, torch.full((1, 1), -1.0), 0.2)
    assert m["clipped"].all() and loss.item() == pytest.approx(-1.2)
    loss.sum().backward()
    assert lp2.grad.item() == 0


def test_align_dpo_loss_is_log2_when_policy_equals_reference():
    """DPO loss is log 2 when policy == reference (closed form) and falls when the policy prefers chosen."""
    tok = _byte_tokenizer()
    model = _tiny_lm(tok.vocab_size)
    ref = _tiny_lm(tok.vocab_size)  # same seed: identical weights
    prompts, chosen, rejected = ["2+2?", "3*3?"], ["2+2 = 4. #### 4", "9"], ["5", "3*3 = 6. #### 6"]
    pc = align.sequence_log_probs(model, tok, prompts, chosen, "cpu")
    pr = align.sequence_log_probs(model, tok, prompts, rejected, "cpu")
    with torch.no_grad():
        rc = align.sequence_log_probs(ref, tok, prompts, chosen, "cpu")
        rr = align.sequence_log_probs(ref, tok, prompts, rejected, "cpu")
    loss, c, r = align.dpo_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(loss, torch.full((2,), math.log(2)))
    assert c.abs().max() < 1e-5 and r.abs().max() < 1e-5
    # and the loss falls when the policy prefers the chosen side more than the reference does
    loss2, _, _ = align.dpo_loss(pc.detach() + 1, pr.detach(), rc, rr, beta=0.1)
    assert (loss2 < math.log(2)).all()


def test_align_dpo_nll_term_by_hand():
    """RPO loss and gradient equal the formula written out with math; alpha = 0 is plain DPO."""
    # RPO: loss = -log sigmoid(beta * [(pc - rc) - (pr - rr)]) - alpha * pc / |y_w|, written out with math.
    pc = torch.tensor([-3.0, -1.5], requires_grad=True)
    pr, rc, rr, n = torch.tensor([-2.0, -4.0]), torch.tensor([-2.5, -1.0]), torch.tensor([-2.2, -3.0]), torch.tensor([3.0, 2.0])
    beta, alpha = 0.5, 0.7
    z = [beta * ((pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())) for i in range(2)]
    want = [math.log(1 + math.exp(-z[i])) - alpha * pc[i].item() / n[i].item() for i in range(2)]
    loss, c, r = align.dpo_loss(pc, pr, rc, rr, beta, alpha=alpha, chosen_lengths=n)
    assert loss.tolist() == pytest.approx(want)
    # the anchor pulls the chosen log-prob up: d loss / d pc = -beta * sigmoid(-z) - alpha / |y_w| < 0
    g, = torch.autograd.grad(loss.sum(), pc)
    assert g.tolist() == pytest.approx([-beta / (1 + math.exp(z[i])) - alpha / n[i].item() for i in range(2)])
    # alpha = 0 is plain DPO, whatever the lengths, and the implicit rewards never see the NLL
    plain, c0, r0 = align.dpo_loss(pc, pr, rc, rr, beta)
    torch.testing.assert_close(align.dpo_loss(pc, pr, rc, rr, beta, alpha=0.0, chosen_lengths=n)[0], plain)
    torch.testing.assert_close(c, c0)
    torch.testing.assert_close(r, r0)
    # |y_w| as run_dpo counts it (the response tokenized alone, plus <|endoftext|>) is exactly the
    # number of response-mask tokens sequence_log_probs sums over
    tok = _byte_tokenizer()
    chosen = ["2+2 = 4. #### 4", "9"]
    b = align.tokenize_prompt_and_output([align.chat_prompt("2+2?"), align.chat_prompt("3*3?")],
                                         [c + align.EOT for c in chosen], tok)
    assert b["response_mask"].sum(-1).tolist() == [len(tok.encode(c + align.EOT)) for c in chosen]


def test_align_sft_grad_accumulation_equals_one_big_batch():
    """Four accumulated SFT microbatches give the gradient of one big batch (invariant)."""
    tok = _byte_tokenizer()
    prompts = [align.chat_prompt(f"{a}+{a}?") for a in range(4)]
    outputs = [f"{a}+{a} = {2 * a}" + "!" * a + align.EOT for a in range(4)]  # ragged lengths
    b = align.tokenize_prompt_and_output(prompts, outputs, tok)

    def grads(k):
        model = _tiny_lm(tok.vocab_size)
        n = len(prompts) // k
        for i in range(k):
            s = slice(i * n, (i + 1) * n)
            lp = align.get_response_log_probs(model, b["input_ids"][s], b["labels"][s])["log_probs"]
            align.sft_microbatch_train_step(lp, b["response_mask"][s], k, normalize_constant=3.0)
        return [p.grad.clone() for p in model.parameters()]

    for g1, g4 in zip(grads(1), grads(4)):
        torch.testing.assert_close(g1, g4, rtol=1e-4, atol=1e-6)


def test_align_sft_step_grad_accum_is_one_big_batch():
    """The real SFT step: 2 accumulated microbatches of unequal token counts == 1 batch == the hand per-token mean."""
    tok = _byte_tokenizer()
    rows = [{"prompt": f"{a} + {a}?", "response": str(2 * a) + "!" * (3 * a)} for a in range(4)]  # 1..10 tokens

    def grads(batches):
        model = _tiny_lm(tok.vocab_size)
        align.sft_step(model, tok, batches, "cpu")
        return model, [p.grad.clone() for p in model.parameters()]

    model, g1 = grads([rows])
    _, g2 = grads([rows[:3], rows[3:]])  # the second microbatch holds most of the response tokens
    b = align.tokenize_prompt_and_output([align.chat_prompt(r["prompt"]) for r in rows], [r["response"] + align.EOT for r in rows], tok)
    model.zero_grad()
    lp = align.get_response_log_probs(model, b["input_ids"], b["labels"])["log_probs"]
    (-(lp * b["response_mask"]).sum() / b["response_mask"].sum()).backward()  # one batch, per-token mean
    for a, c, ref in zip(g1, g2, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(c, ref, rtol=1e-4, atol=1e-6)


class _RecordGrads:
    # An optimizer stand-in for grpo_step: step() keeps the gradients instead of applying them.
    def __init__(self, params):
        self.params, self.grads = list(params), None

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def _grpo_rollout():
    # 2 prompts x G = 2 completions of 1..4 tokens over an 8-token vocabulary; reward: the text contains "3"
    P = [[1, 2, 5]] * 2 + [[4, 4, 6]] * 2
    C = [[3], [5, 6, 7, 1], [2, 2], [3, 0, 0]]
    texts = ["".join(map(str, c)) for c in C]
    rf = lambda r, g: {"reward": float("3" in r), "answer_reward": float("3" in r)}  # noqa: E731
    return P, C, texts, [None] * 4, rf


def test_align_grpo_step_dr_grpo_constant_normalizer_and_temperature():
    """grpo_step's gradient equals -A grad log softmax(logits / T) summed per response over a constant
    (Dr. GRPO, --no-std-norm) or averaged per response (GRPO): a hand-built reference at T = 0.5."""
    P, C, texts, gts, rf = _grpo_rollout()
    b = align.pack_prompt_and_output_ids(P, C, pad_id=0)
    for no_std_norm in (False, True):
        args = argparse.Namespace(group_size=2, no_std_norm=no_std_norm, micro_batch_size=16, epochs_per_rollout=1,
                                  loss_type="grpo_clip", cliprange=0.2, kl_coef=0.0, temperature=0.5)
        model = _tiny_lm(8, seed=0, context_length=16)
        opt = _RecordGrads(model.parameters())
        meta = align.grpo_step(model, opt, P, C, texts, gts, rf, args, max_new_tokens=6)
        adv, _, _ = align.compute_group_normalized_rewards(rf, texts, gts, 2, 1e-6, not no_std_norm)
        model.zero_grad()
        logp = torch.log_softmax(model(b["input_ids"]).float() / 0.5, -1).gather(-1, b["labels"][..., None])[..., 0]
        m = b["response_mask"].float()
        per_token = -adv[:, None] * logp * m  # on policy: ratio 1, the clip is inactive
        per_seq = per_token.sum(-1) / 6 if no_std_norm else per_token.sum(-1) / m.sum(-1)
        per_seq.mean().backward()
        for g, ref in zip(opt.grads, [p.grad for p in model.parameters()]):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
        # the clipped loss's value on policy is -A per token: a per-response mean over a group is 0, a constant-normalized sum is not
        want = (-adv * m.sum(-1) / 6).mean().item() if no_std_norm else 0.0
        assert meta["loss"] == pytest.approx(want, abs=1e-6) and (want != 0) == no_std_norm


def test_align_get_response_log_probs_matches_cross_entropy():
    """get_response_log_probs equals -F.cross_entropy per token."""
    tok = _byte_tokenizer()
    model = _tiny_lm(tok.vocab_size)
    b = align.tokenize_prompt_and_output(["ab", "c"], ["xyz", "w"], tok)
    out = align.get_response_log_probs(model, b["input_ids"], b["labels"], return_token_entropy=True)
    logits = model(b["input_ids"])
    want = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), b["labels"], reduction="none")
    torch.testing.assert_close(out["log_probs"], want, rtol=1e-5, atol=1e-5)
    assert out["token_entropy"].shape == b["labels"].shape


@pytest.mark.parametrize("text,want", [
    ("3 + 4 = 7. #### 7", 7),
    ("#### 12 and later #### 13", 13),                       # the last marker wins
    ("The answer is 42, not 41.", 42),                        # a marked answer beats the last number
    ("I think 5, or maybe 6, or 7", 7),                       # several numbers: the last one
    ("x3 = 9", 9),                                            # the 3 inside x3 is not a number
    ("it is -15", -15),
    ("1,234,567 apples", 1234567),
    ("price 3.50", Fraction(7, 2)),
    ("__import__('os').system('rm -rf /') or 2+2", 2),        # code is text, never executed
    ("#### 2**100000000", 2),                                  # no eval: 2 ** 1e8 would hang
    ("9" * 5000, None),                                       # an absurdly long digit run is garbage
    ("#### " + "1" * 80, int("1" * 80)),                      # but big exact integers are fine
    ("no digits here", None),
    ("", None),
    ("####", None),
])
def test_align_parse_answer_adversarial(text, want):
    """The verifier parses the final number by hand-checked rules and never executes the text."""
    assert align.parse_answer(text) == want


def test_align_reward_fn():
    """reward = answer + 0.1 * format on hand-scored responses."""
    r = lambda text, gold: align.reward_fn(text, gold, format_weight=0.1)["reward"]  # noqa: E731
    assert r("2 + 2 = 4", 4) == pytest.approx(1.1)             # right, and ends in its answer
    assert r("so... #### 4", 4) == pytest.approx(1.1)
    assert r("4", 4) == pytest.approx(1.1)                     # a bare number is well formed too
    assert r("it is 4", 4) == pytest.approx(1.0)               # right, but no '= N' / '#### N' ending
    assert r("2 + 2 = 5", 4) == pytest.approx(0.1)             # wrong, well formed
    assert r("2 + 2 = 4 and 4 = 4 + 0 + 9", 4) == pytest.approx(0.0)  # rambles on, last number wrong
    assert align.reward_fn("#### 5", None)["answer_reward"] == 0.0


def test_align_split_is_disjoint_and_stable():
    """Train and test problems never share a fact, gold answers parse, split_of is a pinned sha256 value."""
    for level in align.LEVELS:
        train = align.sample_problems("train", 400, [level], seed=1)
        test = align.sample_problems("test", 100, [level], seed=2, unique=True)
        assert train and test
        assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
        assert all(align.split_of(p["fact"]) == "train" for p in train)
        for p in train[:50] + test[:50]:  # every gold response is right and parses
            assert align.parse_answer(p["response"]) == p["answer"]
    # pinned (computed once by hand with hashlib.sha256): a salted or changed hash would move them
    assert [align.split_of(k) for k in ("3 + 4", "2 * 4", "7 - 2", "1 + 3", "12 + 34")] == ["train", "test", "train", "test", "train"]
    # the eval set is deterministic (same problems across stages and runs)
    a = align.sample_problems("test", 60, [1, 2], seed=1234, unique=True)
    assert a == align.sample_problems("test", 60, [1, 2], seed=1234, unique=True)
    assert len({p["prompt"] for p in a}) == len(a)


def _fact_from_text(q):
    # The arithmetic fact read back from a problem's wording alone (not from align's own fields):
    # a + b and b + a are one fact, so are a * b and b * a; a - b is its own.
    a, b = (int(x) for x in re.findall(r"\d+", q))
    op = ("+" if " + " in q or "more" in q else "-" if " - " in q or "gives away" in q else "*")
    return (a, op, b) if op == "-" else (min(a, b), op, max(a, b))


def test_align_no_fact_crosses_the_split():
    """No held-out arithmetic fact is trained on in any wording or level (facts read back from the text)."""
    levels = list(align.LEVELS)
    train = align.sample_problems("train", 4000, levels, seed=3)
    test = align.sample_problems("test", 1000, levels, seed=4)
    train_facts, test_facts = {_fact_from_text(p["prompt"]) for p in train}, {_fact_from_text(p["prompt"]) for p in test}
    assert len(test_facts) > 100 and not train_facts & test_facts
    # word problems and plain ones share facts: 3 * 4 as "Ann buys 3 bags with 4 ..." is the same held-out fact
    one_digit = {f for f in test_facts if f[2] < 10}
    assert {_fact_from_text(p["prompt"]) for p in test if p["level"] == 3} <= one_digit


def test_align_wilson_interval_closed_form():
    """Wilson interval equals the textbook value at 50/100 and stays sane at 0/10."""
    lo, hi = align.wilson_interval(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # textbook value
    assert align.wilson_interval(0, 10)[0] == 0.0 and 0.25 < align.wilson_interval(0, 10)[1] < 0.35


def test_align_load_jsonl_formats(tmp_path):
    """load_jsonl reads the SFT, DPO and GSM8K formats and rejects a line without a prompt."""
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "q1", "response": "r1"}\n\n'
                 '{"prompt": "q2", "chosen": "a", "rejected": "b"}\n'
                 '{"prompt": "q3", "answer": "2 + 3 = 5\\n#### 5"}\n')
    rows = align.load_jsonl(str(p))
    assert [r["prompt"] for r in rows] == ["q1", "q2", "q3"]
    assert rows[2]["answer"] == 5 and rows[2]["response"].endswith("#### 5")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"response": "no prompt"}\n')
    with pytest.raises(SystemExit):
        align.load_jsonl(str(bad))


def test_align_user_jsonl_eval_rows_disjoint_from_fit_rows(tmp_path):
    """--data-jsonl: the eval set and the training rows are disjoint (split by prompt hash) and cover the file."""
    p = tmp_path / "gsm.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"What is {a} + 7?", "answer": f"#### {a + 7}"}) + "\n" for a in range(60)))
    args = argparse.Namespace(data_jsonl=str(p), test_percent=20, n_eval=600, levels=[5])
    train, test = align.user_rows(args, "train"), align.eval_problems(args)
    assert train and test and not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert len(train) + len(test) == 60 and all(align.split_of(r["prompt"]) == "test" for r in test)
    assert [r["prompt"] for r in align.user_rows(args, "test")] == [r["prompt"] for r in test]


def test_align_bad_grpo_group_size_and_empty_paired_difference_are_clear_errors(tmp_path, capsys):
    """--group-size 1 (std of one sample: NaN) is a one-line error before any work; no-problem pairing is too."""
    with pytest.raises(SystemExit) as e:
        align.main(["grpo", "--ckpt", str(tmp_path / "missing.pt"), "--group-size", "1", "--device", "cpu"])
    assert "--group-size" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="group_size"):
        align.compute_group_normalized_rewards(align.reward_fn, ["1", "2"], [1, 2], 1)
    with pytest.raises(ValueError, match="no problems"):
        align.paired_difference([], [])
    with pytest.raises(ValueError, match="same problems"):
        align.paired_difference([1, 0], [1])


def test_align_grpo_raises_reward_on_toy_task():
    """20 real grpo_step calls raise a toy reward from chance (1/8) to > 0.6: the learning works."""
    # A toy policy over 8 tokens; reward = fraction of the 4 sampled tokens equal to token 3
    # (chance: 1/8). Only learning can raise it. 20 on-policy GRPO steps with the real grpo_step.
    torch.manual_seed(0)
    V, G, n_prompts, T = 8, 8, 4, 4
    model = _tiny_lm(V, seed=0, context_length=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    args = argparse.Namespace(group_size=G, no_std_norm=False, micro_batch_size=16, epochs_per_rollout=1,
                              loss_type="grpo_clip", cliprange=0.2, kl_coef=0.0, temperature=1.0)
    rf = lambda r, g: {"reward": r.count("3") / T, "answer_reward": float(r.count("3") == T)}  # noqa: E731
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    rewards = []
    for step in range(20):
        prompts = [[rng.randrange(V) for _ in range(3)] for _ in range(n_prompts)]
        idx = torch.tensor([p for p in prompts for _ in range(G)])  # (n_prompts * G, 3)
        out = M.generate(model, idx, T, temperature=1.0, generator=gen)[:, 3:].tolist()
        P = [p for p in prompts for _ in range(G)]
        texts = ["".join(map(str, c)) for c in out]
        m = align.grpo_step(model, opt, P, out, texts, [None] * len(out), rf, args)
        rewards.append(m["reward"])
        assert m["clip_frac"] == 0.0  # one epoch on fresh samples: policy == old, nothing clips
    assert sum(rewards[:3]) / 3 < 0.3 and sum(rewards[-3:]) / 3 > 0.6, rewards


def _tiny_align_ckpt(tmp_path):
    # A tiny base checkpoint and a byte tokenizer on disk: what align.py's CLI stages load.
    tok = _byte_tokenizer()
    tok.save(str(tmp_path / "tok"))
    model = _tiny_lm(tok.vocab_size)
    TR.save_checkpoint(model, torch.optim.AdamW(model.parameters()), 0, str(tmp_path / "base.pt"))
    return model, str(tmp_path / "base.pt"), str(tmp_path / "tok")


def test_align_lora_starts_equal_updates_adapters_only_and_merges():
    """LoRA starts equal to the base model bit for bit, trains only A and B, and merges to the same function."""
    tok = _byte_tokenizer()
    base = _tiny_lm(tok.vocab_size)
    model = align.add_lora(copy.deepcopy(base), rank=4, alpha=8.0)
    idx = torch.randint(0, tok.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))  # B = 0: exactly the base model, bit for bit
    loras = [m for m in model.modules() if isinstance(m, align.LoRALinear)]
    assert len(loras) == 7 and all(torch.equal(m.B, torch.zeros_like(m.B)) for m in loras)  # q k v o w1 w2 w3
    assert all(n.endswith((".A", ".B")) for n, p in model.named_parameters() if p.requires_grad)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(3):  # B moves at step 1; A (zero gradient while B = 0) from step 2
        F.cross_entropy(model(idx[:, :-1]).transpose(1, 2), idx[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    for k, v in model.state_dict().items():  # the adapters moved, every base weight is bit-identical
        assert torch.equal(v, before[k]) != k.endswith((".A", ".B")), k
    with torch.no_grad():
        adapted = model(idx)
        merged = align.merge_lora(model)
        torch.testing.assert_close(merged(idx), adapted, rtol=1e-5, atol=1e-5)  # W + (alpha/r) B A: same function
        assert not torch.allclose(adapted, base(idx), atol=1e-3)
        assert merged.state_dict().keys() == base.state_dict().keys()  # an ordinary TransformerLM again
        plain = _tiny_lm(tok.vocab_size, seed=1)
        plain.load_state_dict(merged.state_dict())  # strict
        torch.testing.assert_close(plain(idx), adapted, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in merged.parameters())


@pytest.mark.slow
def test_align_lora_sft_cli_saves_a_plain_merged_checkpoint(tmp_path):
    """`align.py sft --lora-rank` saves a plain checkpoint where only the adapted matrices changed."""
    base, ckpt, tdir = _tiny_align_ckpt(tmp_path)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1?", "response": str(a + 1)}) + "\n" for a in range(20)))
    align.main(["sft", "--ckpt", ckpt, "--tokenizer", tdir, "--out-dir", str(tmp_path / "out"), "--data-jsonl", str(data),
                "--lora-rank", "2", "--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--no-eval", "--device", "cpu"])
    model, _ = M.load_model(str(tmp_path / "out" / "sft.pt"))  # loads as a plain TransformerLM
    cfg, sd, sd0 = model.cfg, model.state_dict(), base.state_dict()
    for k in sd:  # only the adapted matrices changed; embeddings, norms and lm_head did not
        assert torch.equal(sd[k], sd0[k]) != (k.split(".")[-2] in align.LORA_TARGETS), k
    rec = json.loads((tmp_path / "out" / "sft_metrics.jsonl").read_text().splitlines()[0])
    per_layer = 4 * 2 * (cfg.d_model + cfg.d_model) + 3 * 2 * (cfg.d_model + cfg.d_ff)  # r (in + out) per matrix
    assert rec["trainable_params"] == cfg.num_layers * per_layer


def test_align_bradley_terry_loss_log2_and_gradient_sign():
    """Bradley-Terry loss is log 2 at equal rewards with gradient -+1/2; r is h . w at the last token."""
    rc, rr = torch.tensor([0.3, -1.0, 2.0], requires_grad=True), torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    loss = align.bradley_terry_loss(rc, rr)
    torch.testing.assert_close(loss, torch.full((3,), math.log(2)))  # equal rewards: p = 1/2
    loss.sum().backward()
    # d loss / d r_w = -sigmoid(r_l - r_w) = -1/2: gradient descent raises r(chosen), lowers r(rejected)
    assert rc.grad.tolist() == pytest.approx([-0.5] * 3) and rr.grad.tolist() == pytest.approx([0.5] * 3)
    # the reward is h . w at the response's last token, whatever else is in the batch (padding)
    tok = _byte_tokenizer()
    rm = align.RewardModel(_tiny_lm(tok.vocab_size))
    assert rm(tok, ["a", "bc"], ["1", "22"]).tolist() == [0.0, 0.0]  # zero head: loss log 2 at init
    with torch.no_grad():
        rm.head.normal_()
        ids = torch.tensor([tok.encode(align.chat_prompt("a") + "1")])
        want = rm.body.hidden(ids)[0, -1] @ rm.head
        torch.testing.assert_close(rm(tok, ["a", "bc"], ["1", "22222"])[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_align_rm_learns_an_obvious_preference(tmp_path):
    """The real `rm` stage ranks > 90% of held-out pairs right when the preference is obvious."""
    # chosen and rejected differ only in the last token (":)" vs ":("); 30 steps of the real `rm`
    # stage must rank held-out pairs (a hash split of the prompts) almost always right.
    _, ckpt, tdir = _tiny_align_ckpt(tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "chosen": f"{a + b} :)",
                                        "rejected": f"{a + b} :("}) + "\n" for a in range(15) for b in range(15)))
    out = tmp_path / "rm"
    align.main(["rm", "--ckpt", ckpt, "--tokenizer", tdir, "--out-dir", str(out), "--data-jsonl", str(data),
                "--steps", "30", "--lr", "1e-3", "--device", "cpu"])
    last = json.loads((out / "rm_metrics.jsonl").read_text().splitlines()[-1])
    assert last["n"] > 20 and last["heldout_pair_acc"] > 0.9, last
    body, ck = M.load_model(str(out / "rm.pt"))  # the body is a plain TransformerLM checkpoint
    assert ck["stage"] == "rm" and ck["reward_head"].shape == (body.cfg.d_model,)


def test_align_vote_majority_ties_to_the_first_and_best_of_n_takes_the_top_score():
    """Majority: most frequent parsed answer, ties to the earliest, unparseable never wins; rm: argmax, first on ties."""
    assert align.vote_answer(["7", "3", "3", "7"], "majority", None) == 7          # 2-2 tie: 7 was sampled first
    assert align.vote_answer(["1", "3", "3", "7"], "majority", None) == 3
    assert align.vote_answer(["no", "none", "9"], "majority", None) == 9           # two None do not outvote a 9
    assert align.vote_answer(["no", "none"], "majority", None) is None
    assert align.vote_answer(["1", "2", "3"], "rm", [0.1, 0.9, 0.9]) == 2


def _constant_lm(tok, probs: dict, seed=0):
    # Every step samples from the same distribution: LayerNorm weight 0 and bias e_0 make the final hidden
    # state the constant e_0, so the logits are lm_head.weight[:, 0], set to log p (the rest ~ -inf).
    torch.manual_seed(seed)
    m = TransformerLM(ModelConfig(vocab_size=tok.vocab_size, context_length=64, d_model=32, num_layers=1,
                                  num_heads=2, norm="layernorm"))
    with torch.no_grad():
        m.ln_final.weight.zero_()
        m.ln_final.bias.zero_()[0] = 1.0
        m.lm_head.weight[:, 0] = -30.0
        for t, p in probs.items():
            m.lm_head.weight[t, 0] = math.log(p)
    return m


def test_align_eval_samples_vote_matches_a_hand_count_and_an_oracle_rm_equals_pass_at_n():
    """Majority-of-n accuracy and pass@n at n = 1, 2, 4, 8 from one N = 8 run equal a hand count on the same
    samples; best-of-N with an oracle reward model equals pass@N, and a greedy eval is the samples=1 case."""
    tok = _byte_tokenizer()
    eot = tok.special_ids[align.EOT]
    m = _constant_lm(tok, {**{ord(str(d)): 0.05 for d in range(10)}, eot: 0.5})  # "d<|endoftext|>": p = 0.025
    probs = align.sample_problems("test", 30, [1], seed=1234, unique=True)
    N = 8
    res = align.evaluate_accuracy(m, tok, probs, 4, N, "majority", None, 1.0, torch.Generator().manual_seed(5))
    _, _, texts = align.sample_responses(m, tok, [p["prompt"] for p in probs], N, 1.0, 4, torch.Generator().manual_seed(5))
    for n in (1, 2, 4, 8):
        k = any_ok = 0
        for i, p in enumerate(probs):
            answers = [align.parse_answer(t) for t in texts[i * N:i * N + n]]
            counts = Counter(a for a in answers if a is not None)
            top = [a for a in answers if a is not None and counts[a] == max(counts.values())]
            k += bool(top) and top[0] == p["answer"]
            any_ok += p["answer"] in answers
        assert res["by_samples"][n]["acc"] == k / len(probs) and res["by_samples"][n]["pass_at_n"] == any_ok / len(probs)
    assert res["by_samples"][8]["pass_at_n"] > res["by_samples"][8]["acc"] > 0  # not trivial: votes win and lose
    assert res["acc"] == res["by_samples"][8]["acc"]

    class OracleRM:  # r = 1 for a right answer: best-of-N must then find one whenever any sample has it
        def __call__(self, tok_, prompts, responses):
            gold = {p["prompt"]: p["answer"] for p in probs}
            return torch.tensor([float(align.parse_answer(r) == gold[q]) for q, r in zip(prompts, responses)])
    best = align.evaluate_accuracy(m, tok, probs, 4, N, "rm", OracleRM(), 1.0, torch.Generator().manual_seed(5))
    assert [b["acc"] for b in best["by_samples"].values()] == [b["pass_at_n"] for b in res["by_samples"].values()]
    greedy = align.evaluate_accuracy(m, tok, probs, 4)
    assert align.evaluate_accuracy(m, tok, probs, 4, 1, "rm", None)["correct"] == greedy["correct"]  # one sample: no RM needed
    assert "by_samples" not in greedy and greedy["correct"] == [int(align.parse_answer(t) == p["answer"]) for t, p in
                                                                zip(align.sample_responses(m, tok, [p["prompt"] for p in probs], 1, 0.0, 4)[2], probs)]


def test_align_chat_streams_exact_bytes_probs_and_keeps_history_until_reset(monkeypatch):
    """The streamed text is the reply's bytes decoded whole (a 2-byte character split over two tokens comes
    out once), --show-probs prints the sampling probability, turns accumulate and /reset clears them."""
    tok = _byte_tokenizer()
    eot = tok.special_ids[align.EOT]
    m = _constant_lm(tok, {0xC3: 0.3, 0xA9: 0.3, ord("a"): 0.3, eot: 0.1})  # "é" = C3 A9; a lone C3 is invalid
    args = argparse.Namespace(device="cpu", seed=0, max_new_tokens=12, temperature=1.0, top_k=None, top_p=None, show_probs=False)
    for seed in range(50):  # the first seed whose reply has the character whole: C3 then A9
        out = io.StringIO()
        reply = align.stream_reply(m, tok, tok.encode(align.chat_prompt("hi")), args, torch.Generator().manual_seed(seed), out)
        if "é" in tok.decode(reply[:-1]):
            break
    assert reply[-1] == eot and "é" in out.getvalue()
    assert out.getvalue() == "bot> " + tok.decode([t for t in reply if t != eot]) + "\n"
    args.show_probs, out = True, io.StringIO()
    align.stream_reply(m, tok, tok.encode(align.chat_prompt("hi")), args, torch.Generator().manual_seed(0), out)
    assert re.findall(r"\[([0-9.]+)\]", out.getvalue())[:2] == ["0.30", "0.30"]  # p of each sampled byte
    seen = []
    real_stream = align.stream
    monkeypatch.setattr(align, "stream", lambda model, idx, *a, **k: (seen.append(idx[0].tolist()), real_stream(model, idx, *a, **k))[1])
    args.show_probs, out = False, io.StringIO()
    align.chat(m, tok, args, io.StringIO("one\ntwo\n/reset\nthree\n"), out)
    first = tok.encode(align.chat_prompt("one"))
    assert seen[0] == first and seen[1][:len(first)] == first and len(seen[1]) > len(first + tok.encode(align.chat_prompt("two")))
    assert seen[1][-len(tok.encode(align.chat_prompt("two"))):] == tok.encode(align.chat_prompt("two"))
    assert seen[2] == tok.encode(align.chat_prompt("three")) and "(history cleared)" in out.getvalue()


def test_align_chat_cli_reads_a_pipe_and_exits_cleanly_on_eof(tmp_path):
    """`align.py chat` as a subprocess: stdin from a pipe, a reply per line, the same greedy reply after /reset, exit 0 at EOF."""
    _, ckpt, tdir = _tiny_align_ckpt(tmp_path)
    cmd = [sys.executable, os.path.join(ROOT, "align.py"), "chat", "--ckpt", ckpt, "--tokenizer", tdir, "--temperature", "0",
           "--max-new-tokens", "6", "--device", "cpu"]
    r = subprocess.run(cmd, input="What is 2 + 3?\n/reset\nWhat is 2 + 3?\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    replies = [line for line in r.stdout.split("bot> ")[1:]]
    assert len(replies) == 2 and "(history cleared)" in replies[0] and replies[0].split("(history")[0] == replies[1], r.stdout
    bad = subprocess.run(cmd[:-4] + ["--max-new-tokens", "0"], input="", capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error: --max-new-tokens"), bad.stderr


# ---------------------------------------------------------------
# pipeline.py: the whole chain at a tiny size, every artifact checked



def test_pipeline_gpu_preset_is_sized_to_the_corpus(tmp_path):
    """The gpu preset stops at 4 epochs of the data (closed form), and real-data flags reach only data.py."""
    b = tmp_path / "train.bin"
    np.zeros(1_000_000, dtype=np.uint16).tofile(b)                     # 1M tokens
    assert pipeline.capped_steps(str(b), 32, 1024, 5000, 4) == 4 * 1_000_000 // (32 * 1024) == 122
    np.zeros(200_000_000, dtype=np.uint8).tofile(b)                    # 100M tokens: the step cap wins
    assert pipeline.capped_steps(str(b), 32, 1024, 5000, 4) == 5000
    # real-data flags reach data.py, and only data.py
    plan = pipeline.stage_plan(str(tmp_path), "gpu", ["--url", "http://example.com/x.txt"])
    assert [c[-2:] for n, c, _, _ in plan if n == "data"] == [["--url", "http://example.com/x.txt"]]
    assert all("--url" not in c for n, c, _, _ in plan if n != "data")
    # every artifact a later stage reads is listed, so a missing one reruns its stage
    arts = {n: a for n, _, _, a in pipeline.stage_plan(str(tmp_path), "cpu", scaling=True)}
    assert any(a.endswith("special_tokens.json") for a in arts["bpe"]), arts["bpe"]
    assert any(a.endswith("val.bin") for a in arts["scaling-bytes"]), arts["scaling-bytes"]


# A fake three-stage plan (data -> pretrain -> align), each stage a tiny script that logs its argv, copies
# its input to its output, and dies after writing its output when FAIL names it: the real run_stages drives it.
FAKE_STAGE = """import os, sys
name, src, dst = sys.argv[1:4]
open(os.path.join(os.path.dirname(dst), 'log'), 'a').write(' '.join(sys.argv[1:2] + sys.argv[4:]) + '\\n')
open(dst, 'w').write(open(src).read() + name) if src != '-' else open(dst, 'w').write(name)
sys.exit(1 if os.environ.get('FAIL') == name else 0)
"""


def _fake_pipeline(tmp_path, monkeypatch, data_flag="--embedded"):
    script = tmp_path / "stage.py"
    script.write_text(FAKE_STAGE)
    f = {n: str(tmp_path / f"{n}.out") for n in ("data", "pretrain", "align")}
    plan = [("data", [sys.executable, str(script), "data", "-", f["data"], data_flag], [], [f["data"]]),
            ("pretrain", [sys.executable, str(script), "pretrain", f["data"], f["pretrain"]], [f["data"]], [f["pretrain"]]),
            ("align", [sys.executable, str(script), "align", f["pretrain"], f["align"]], [f["pretrain"]], [f["align"]])]
    monkeypatch.setattr(pipeline, "stage_plan", lambda out, preset, sources=(), scaling=False: plan)
    log = tmp_path / "log"
    log.write_text("")
    return log


def _ran(log, call):
    """Run `call`, return the stage lines it logged."""
    before = log.read_text().splitlines()
    try:
        call()
    except SystemExit:
        pass
    return log.read_text().splitlines()[len(before):]


def test_pipeline_reruns_exactly_what_did_not_finish(tmp_path, monkeypatch):
    """A stage is done only when its marker matches its command and inputs; a rerun upstream reruns everything after."""
    log = _fake_pipeline(tmp_path, monkeypatch)
    run = lambda **kw: _ran(log, lambda: pipeline.run_stages(str(tmp_path), "cpu", False, False, **kw))
    assert run() == ["data --embedded", "pretrain", "align"]
    assert run() == []                                             # all done: nothing runs
    # (b) align writes its output, then crashes (as align.py wrote eval.json after the base eval): not done
    monkeypatch.setenv("FAIL", "align")
    assert run() == [] and (tmp_path / "align.out").exists()       # the old marker still matches: nothing to do
    os.remove(tmp_path / ".done" / "align.json")
    assert run() == ["align"]                                      # crashed again: the marker stays missing
    monkeypatch.delenv("FAIL")
    assert run() == ["align"] and run() == []
    # (c) another data command (e.g. --url into the same dir): data and every stage after it rerun
    _fake_pipeline(tmp_path, monkeypatch, data_flag="--url=x")
    assert run() == ["data --url=x", "pretrain", "align"]
    # an upstream output rewritten by hand changes the fingerprint downstream stages recorded
    (tmp_path / "pretrain.out").write_text("edited by hand, a different size")
    assert run() == ["align"]


def test_pipeline_killed_stage_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """(a) pretraining killed after a periodic ckpt.pt is neither skipped nor restarted: it reruns with --resume."""
    log = _fake_pipeline(tmp_path, monkeypatch)
    monkeypatch.setenv("FAIL", "pretrain")                         # writes its checkpoint, then dies
    assert _ran(log, lambda: pipeline.run_stages(str(tmp_path), "cpu", False, False)) == ["data --embedded", "pretrain"]
    monkeypatch.delenv("FAIL")
    assert _ran(log, lambda: pipeline.run_stages(str(tmp_path), "cpu", False, False)) == ["pretrain --resume", "align"]


@pytest.mark.slow
def test_pipeline_tiny_end_to_end(tmp_path):
    """data -> bpe -> encode -> pretrain -> SFT/DPO/GRPO -> eval -> report.md, then a rerun that skips every stage."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "pipeline.py", "--preset", "tiny", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = out / "data"
    # Corpus: every input document is accounted for as kept or dropped.
    stats = json.loads((d / "stats.json").read_text())
    assert stats["docs_in"] == stats["kept"] + sum(stats["dropped_by_reason"].values()) > 0, stats
    assert (d / "train.txt").stat().st_size > 10_000 and (d / "val.txt").stat().st_size > 0
    # Token files: readable with np.memmap, ids inside the tokenizer's vocab, and they decode to the text.
    tok = bpe.Tokenizer.load(str(d / "tokenizer"))
    ids = np.memmap(d / "train.bin", dtype=np.uint16, mode="r")
    assert len(ids) > 1000 and int(ids.max()) < len(tok)
    head = (d / "train.txt").read_text(encoding="utf-8")[:2000]
    assert tok.decode(ids[:400].tolist()) == tok.decode(tok.encode(head)[:400])
    # Checkpoint: loads without unpickling arbitrary objects, and its weights match its config.
    ck = torch.load(out / "base" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert "model" in ck and "config" in ck
    # Alignment: one accuracy per stage, each a valid probability with its interval around it.
    ev = json.loads((out / "align" / "eval.json").read_text())
    for stage in ("base", "sft", "dpo", "grpo"):
        assert 0.0 <= ev[stage]["ci_lo"] <= ev[stage]["acc"] <= ev[stage]["ci_hi"] <= 1.0, (stage, ev[stage])
    # Report: every section present, none replaced by an error note.
    rep = (out / "report.md").read_text()
    for section in ("## Corpus", "## Tokenizer", "## Model and pretraining", "## Alignment",
                    "## Wall time per stage", "## Versions and hardware"):
        assert section in rep, section
    assert "could not build" not in rep and "did not run" not in rep, rep
    # A rerun finds every artifact and skips every stage.
    r2 = subprocess.run([sys.executable, "pipeline.py", "--preset", "tiny", "--out", str(out)],
                        capture_output=True, text=True, env=env, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert r2.stdout.count("skipping") == 6, r2.stdout
    # The scaling section (pipeline --scaling is a 15-run sweep, too slow here): fit the committed
    # sweep into the run's scaling/ dir, regenerate the report, and check the section is filled in.
    r3 = subprocess.run([sys.executable, "scaling.py", "fit", "--runs", "results/scaling_runs.jsonl", "--bootstrap", "10",
                         "--out-dir", str(out / "scaling")], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r3.returncode == 0, r3.stderr[-2000:]
    r4 = subprocess.run([sys.executable, "pipeline.py", "--report-only", "--out", str(out)],
                        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r4.returncode == 0, r4.stderr[-2000:]
    rep = (out / "report.md").read_text()
    assert "## Scaling-law fit" in rep and "25 runs" in rep and "a = 0." in rep, rep[-1500:]
