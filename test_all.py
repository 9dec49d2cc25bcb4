"""test_all.py -- every test of the repo, one file, grouped by concept in pipeline order.

    python -m pytest -q test_all.py                 # the whole suite, CPU, ~5 min on 2 cores
    python -m pytest -q test_all.py -k kernels      # tests whose name matches (e.g. kernels, parallel, bpe, pipeline)

Every test compares against something trusted: torch's own op, tiktoken, a naive reference written inline, a closed
form, or an invariant (round trip, DDP == one process, resume == uninterrupted, DPO loss == log 2 at init). No network,
no GPU needed: Triton kernels run in Triton's CPU interpreter, distributed tests in 2-process gloo groups. Tests
marked skipif(not cuda) are the compiled-GPU variants and run on a GPU machine.
"""
# Triton reads TRITON_INTERPRET when a @triton.jit decorator runs, so it must be set before kernels.py is imported.
import os
import torch
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import argparse
import copy
import datetime
import gzip
import importlib.util
import io
import itertools
import json
import math
import random
import re
import signal
import socket
import subprocess
import sys
import unicodedata
import warnings
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import regex
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import align
import bpe
import data
import kernels
import model as M
import parallel
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

def test_extract_text_structure_and_skipped_tags():
    page = b"""<html><head><title>T</title><style>p {color: red}</style></head><body>
    <nav><a href="/">Home</a> | <a href="/about">About</a></nav>
    <h1>Heading</h1><p>First   paragraph
    spans lines.</p><script>var x = "<p>not text</p>";</script>
    <ul><li>one</li><li>two</li></ul><p>Caf&eacute; &amp; more</p>
    <pre>def f():
    return 1</pre></body></html>"""
    assert data.extract_text_from_html_bytes(page) == (
        "Heading\n\nFirst paragraph spans lines.\n\none\ntwo\n\nCafé & more\n\ndef f():\n    return 1")


def test_extract_text_charsets_and_garbage():
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
def test_identify_language(lang):
    got, conf = data.identify_language(LANG_SAMPLES[lang])
    assert got == lang and 0.5 <= conf <= 1.0, (got, conf)


def test_identify_language_nothing_to_go_on():
    assert data.identify_language("1234 5678 !!! ---") == ("unk", 0.0)


# --- PII masking ---

@pytest.mark.parametrize("number", ["2831823829", "(283)-182-3829", "(283) 182 3829", "283-182-3829"])
def test_mask_phone_numbers_four_us_formats(number):
    text, n = data.mask_phone_numbers(f"Call {number} today.")
    assert (text, n) == ("Call |||PHONE_NUMBER||| today.", 1)


def test_mask_phone_numbers_negatives():
    # Digits glued to more digits, a decimal, the digit string, a date: not phone numbers.
    for s in ["id 123456789012345", "pi 3.1415926535", "0123456789", "2024-01-15", "version 1.2.3"]:
        assert data.mask_phone_numbers(s) == (s, 0), s


def test_mask_emails_and_already_masked_not_recounted():
    text, n = data.mask_emails("Write to guido@python.org or a.b-c+tag@mail.example.co.uk, please.")
    assert (text, n) == ("Write to |||EMAIL_ADDRESS||| or |||EMAIL_ADDRESS|||, please.", 2)
    again, n2 = data.mask_emails(text)  # masking is idempotent: placeholders are not addresses
    assert (again, n2) == (text, 0)
    mixed, n3 = data.mask_emails("old |||EMAIL_ADDRESS||| and new bob@example.org")
    assert (mixed, n3) == ("old |||EMAIL_ADDRESS||| and new |||EMAIL_ADDRESS|||", 1)
    assert data.mask_emails("no @ here, nor user@localhost") == ("no @ here, nor user@localhost", 0)


def test_mask_ips():
    text, n = data.mask_ips("hosts 192.168.0.1, 8.8.8.8 and 255.255.255.255.")
    assert (text, n) == ("hosts |||IP_ADDRESS|||, |||IP_ADDRESS||| and |||IP_ADDRESS|||.", 3)
    for s in ["256.1.1.1", "1.2.3", "1.2.3.4.5", "version 10.0.0.1a"]:  # out of range / not four octets
        assert data.mask_ips(s) == (s, 0), s
    assert data.mask_ips(text) == (text, 0)


# --- Gopher rules: each threshold exactly at the edge passes, one step past it fails ---

def _words(n, length=5):
    return " ".join(["abcdefghijk"[:length]] * n)


def test_gopher_word_count_edges():
    assert data.gopher_failure(_words(49)) == "too_few_words"
    assert data.gopher_quality_filter(_words(50))
    assert data.gopher_quality_filter(_words(100_000))
    assert data.gopher_failure(_words(100_001)) == "too_many_words"


def test_gopher_mean_word_length_edges():
    assert data.gopher_quality_filter(_words(60, 3))  # mean exactly 3
    assert data.gopher_failure(" ".join(["ab"] * 30 + ["abc"] * 30)) == "mean_word_length"  # 2.5
    assert data.gopher_quality_filter(_words(60, 10))  # mean exactly 10
    assert data.gopher_failure(" ".join(["a" * 10] * 59 + ["a" * 11])) == "mean_word_length"  # 10.017


def test_gopher_ellipsis_lines_edges():
    def doc(n_ellipsis, n_lines=10):
        return "\n".join(_words(6) + (" ..." if i < n_ellipsis else " end") for i in range(n_lines))
    assert data.gopher_quality_filter(doc(3))  # exactly 30% of lines end in "..."
    assert data.gopher_failure(doc(4)) == "ellipsis_lines"
    assert data.gopher_failure(doc(4).replace("...", "\u2026")) == "ellipsis_lines"  # the one-char ellipsis


def test_gopher_alpha_words_edges():
    assert data.gopher_quality_filter(" ".join(["word"] * 80 + ["1234"] * 20))  # exactly 80% with a letter
    assert data.gopher_failure(" ".join(["word"] * 79 + ["1234"] * 21)) == "non_alpha_words"
    assert data.gopher_quality_filter(" ".join(["word"] * 79 + ["12a4"] * 21))  # one letter is enough


# --- fastText-style classifiers ---

def test_default_classifiers_on_obvious_cases():
    nav = "Home | About us | Contact | Privacy policy | Login Register | Cart (0) | Share on Facebook"
    prose = "The function returns a new list with the items sorted, and raises an error for bad input."
    assert data.classify_quality(nav)[0] == "low" and data.classify_quality(prose)[0] == "high"
    assert data.classify_toxic_speech("you stupid worthless idiot, everyone hates you")[0] == "toxic"
    assert data.classify_toxic_speech(prose)[0] == "clean"
    assert data.classify_nsfw("explicit nude sex videos for adults, xxx porn")[0] == "nsfw"
    assert data.classify_nsfw(prose)[0] == "clean"
    label, score = data.classify_quality(prose)
    assert 0.5 <= score <= 1.0


def test_train_classifier_cli_roundtrip(tmp_path):
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(["apple", "pear", "plum"]) for _ in range(8)), "label": "fruit"}
            for _ in range(20)] + [{"text": " ".join(rng.choice(["bolt", "nut", "gear"]) for _ in range(8)),
                                    "label": "metal"} for _ in range(20)]
    src, out = tmp_path / "lab.jsonl", tmp_path / "m.pt"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    data.main(["train-classifier", "--input", str(src), "--out", str(out), "--epochs", "40", "--num-buckets", "4096"])
    import torch
    blob = torch.load(out, weights_only=True)  # plain tensors + lists: loads without unpickling code
    assert blob["labels"] == ["fruit", "metal"]
    data.set_classifier("quality", str(out))  # any kind can use any trained model
    try:
        assert data.classify_batch("quality", ["plum apple pear", "gear bolt"]) and \
            [lbl for lbl, _ in data.classify_batch("quality", ["plum apple pear", "gear bolt nut"])] == ["fruit", "metal"]
    finally:
        data._CLASSIFIERS.pop("quality", None)  # back to the default model for other tests


# --- exact line dedup ---

def test_exact_line_dedup_semantics(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("unique a1\nshared\nrepeat in a\nrepeat in a\nunique a2\n")
    b.write_text("shared\nunique b1\nunique b2")  # no trailing newline on the last line
    out = tmp_path / "out"
    data.exact_line_dedup([str(a), str(b)], str(out))
    # every copy of a line seen twice anywhere goes (across files *and* within one file)
    assert (out / "a.txt").read_text() == "unique a1\nunique a2\n"
    assert (out / "b.txt").read_text() == "unique b1\nunique b2"


def test_exact_line_dedup_docs_min_docs():
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


def test_normalization_in_c_matches_reference():
    for t in ["Héllo, WÖRLD!  it's_a  test\n\tof   naïve façade — ok?", "plain ascii, with CAPS & 42 numbers",
              "  leading and trailing  ", "日本語 テキスト、です。", ""]:
        assert data.normalize_for_dedup(t) == _naive_normalize(t)
        assert data._normalized_bytes(t).decode() == _naive_normalize(t)
        assert len(data.shingle_hashes(t, 3)) == len(_naive_shingles(t, 3))  # no hash collisions here


def test_shingle_batch_matches_one_document_at_a_time():
    # The batch path lays documents end to end; no shingle may cross a boundary, short and empty
    # documents included. Each document's shingle count must match the inline reference.
    texts = ["", "!!! ---", "one", "a b", "Ünïcödé wörds, ça va?", "x " * 9, "w" * 45 + " " + "v" * 50,
             PROSE, "", PROSE.upper(), "日本語 テキスト です"]
    for n in (1, 3, 5):
        batch = data.shingle_hashes_batch(texts, n, batch_docs=4)
        for t, hashes in zip(texts, batch):
            assert np.array_equal(np.unique(hashes), data.shingle_hashes(t, n))
            assert len(np.unique(hashes)) == len(_naive_shingles(t, n)), (t[:20], n)
    assert np.array_equal(batch[7], batch[9])  # case is normalized away


def _doc(rng, vocab, n=200):
    return [rng.choice(vocab) for _ in range(n)]


def test_jaccard_matches_python_sets():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x, y = (np.unique(rng.integers(0, 50, rng.integers(0, 30)).astype(np.uint64)) for _ in range(2))
        ref = len(set(x) & set(y)) / len(set(x) | set(y)) if len(x) or len(y) else 1.0
        assert data.jaccard(x, y) == pytest.approx(ref)


def test_minhash_merges_090_not_050(tmp_path):
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
    for i, t in enumerate(texts):
        (tmp_path / f"d{i}.txt").write_text(t)
    out = tmp_path / "out"
    data.minhash_dedup([str(tmp_path / f"d{i}.txt") for i in range(4)], num_hashes=128, num_bands=16,
                       ngrams=5, jaccard_threshold=0.8, output_dir=str(out))
    assert sorted(os.listdir(out)) == ["d0.txt", "d2.txt", "d3.txt"]  # the first of the near pair stays
    assert (out / "d0.txt").read_text() == texts[0]


def test_minhash_signature_estimates_jaccard():
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(5000)]
    base = _doc(rng, vocab, 400)
    for edits in (4, 20, 60):
        other = list(base)
        for i in rng.sample(range(400), edits):
            other[i] = "x"
        x, y = " ".join(base), " ".join(other)
        a, b = data.minhash_params(512, seed=3)
        s = data.minhash_signatures([data.shingle_hashes(x, 5), data.shingle_hashes(y, 5)], a, b)
        est, true = float((s[0] == s[1]).mean()), _naive_jaccard(x, y)
        assert abs(est - true) < 0.08, (edits, est, true)  # std of the estimate ~ 0.02


def test_minhash_clusters_equal_brute_force():
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


def test_minhash_chains_merge_through_the_middle_document():
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


def test_iter_warc_records_and_broken_files(tmp_path):
    path = tmp_path / "crawl.warc.gz"
    _write_warc(path, _good_records())
    got = [(kind, payload if kind == "bad" else None) for _, kind, payload in data.iter_source(str(path))]
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


def test_build_from_mixed_sources_accounts_for_every_document(tmp_path):
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


def test_download_file_url_is_cached(tmp_path):
    src = tmp_path / "remote.jsonl"
    src.write_text('{"text": "hello"}\n')
    cache = tmp_path / "cache"
    (cache).mkdir()
    url = "file://" + str(src)
    # A stale partial download: the file:// handler ignores Range, so it must be rewritten whole.
    import hashlib
    part = cache / (hashlib.sha1(url.encode()).hexdigest()[:12] + "_remote.jsonl.part")
    part.write_text('{"te')
    path = data.download(url, str(cache))
    assert open(path).read() == '{"text": "hello"}\n' and not part.exists()
    src.unlink()  # second call must not touch the source
    assert data.download(url, str(cache)) == path


def test_download_resumes_with_http_range(tmp_path):
    import hashlib
    import http.server
    import threading
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

def test_default_corpus_small_subset_deterministic(tmp_path):
    outs = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        data.main(["--modules", "textwrap,json,this,no_such_module_xyz", "--out", str(out), "--workers", "2"])
        outs.append(out)
    s = json.loads((outs[0] / "stats.json").read_text())
    assert s["docs_in"] == 4 + len(__import__("pydoc_data.topics").topics.topics)  # modules + topics
    assert s["dropped_by_reason"]["source:import_error"] == 1  # the missing module is counted, not fatal
    assert s["kept"] + sum(s["dropped_by_reason"].values()) == s["docs_in"] and s["kept"] > 50
    assert s["minhash_clusters"] >= 1  # the docs have real near-duplicates (e.g. the if/else topics)
    train = (outs[0] / "train.txt").read_text()
    assert train.endswith("<|endoftext|>") and "textwrap" in train and len(train) > 100_000
    assert os.getcwd() not in train and "0x7f" not in train  # no machine paths, no memory addresses
    for name in ("train.txt", "val.txt"):  # identical on every run
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_token_files_with_byte_level_tokenizer(tmp_path):
    import bpe
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
    import pydoc_data.topics as t
    docs = [t.topics[k] for k in sorted(t.topics)[:40]]
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
def test_train_bpe_matches_naive_reference(tmp_path, seed):
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


def test_train_bpe_matches_naive_on_real_text(tmp_path):
    text = _corpus()[:20000]
    p = tmp_path / "c.txt"
    p.write_text(text, encoding="utf-8")
    _, merges = bpe.train_bpe(str(p), 256 + 3 + 150, SPECIALS)
    assert merges == naive_train(text, 256 + 3 + 150, SPECIALS)


def test_train_stops_when_no_pairs_left(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("ab ab", encoding="utf-8")
    vocab, merges = bpe.train_bpe(str(p), 1000, [])
    assert merges == naive_train("ab ab", 1000, []) and len(vocab) == 256 + len(merges)


def test_parallel_chunked_counts_equal_single_process(tmp_path):
    # Chunks cut at special tokens or "x\n" line ends must not change a single pre-token.
    text = (_corpus()[:30000] + "\n\n\n   \n" + MIXED) * 2 + "no newline at the end"
    p = tmp_path / "c.txt"
    p.write_text(text, encoding="utf-8")
    ref = Counter(w.encode() for piece in regex.split(r"<\|endoftext\|>|<\|user\|>|<\|assistant\|>", text)
                  for w in regex.findall(bpe.GPT2_PATTERN, piece))
    bounds = bpe._chunk_boundaries(str(p), 12, SPECIALS, scan=512)
    assert len(bounds) > 8 and bounds == sorted(set(bounds))
    assert bpe.count_words(str(p), SPECIALS, workers=2, chunk_bytes=4096) == ref
    # without specials, cuts fall on line ends only
    assert bpe.count_words(str(p), [], workers=1, chunk_bytes=4096) == \
        Counter(w.encode() for w in regex.findall(bpe.GPT2_PATTERN, text))


def test_ascii_twin_regex_agrees_with_unicode_regex():
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


def test_pmi_matches_naive_reference(tmp_path):
    text = _tie_corpus(3) + " " + _corpus()[:3000]
    p = tmp_path / "c.txt"
    p.write_text(text, encoding="utf-8")
    _, merges = bpe.train_bpe(str(p), 256 + 1 + 60, ["<|endoftext|>"], merge_score="pmi")
    assert merges == naive_train(text, 256 + 1 + 60, ["<|endoftext|>"], score="pmi")
    _, by_count = bpe.train_bpe(str(p), 256 + 1 + 60, ["<|endoftext|>"])
    assert merges != by_count  # the option does change what is learned


def test_split_digits(tmp_path):
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


def test_merge_score_and_vocab_size_validation(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match="merge_score"):
        bpe.train_bpe(str(p), 300, [], merge_score="nope")
    with pytest.raises(ValueError, match="vocab_size"):
        bpe.train_bpe(str(p), 257, ["<|a|>", "<|b|>"])


# --- Tokenizer ---

def test_round_trips(trained):
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


def test_decode_invalid_utf8_gives_replacement_not_error(trained):
    tok = trained[3]
    ids = tok.encode("é")                       # 2 bytes; decode a lone first byte
    assert tok.decode([tok.byte_to_id[b"\xc3"]]) == "\ufffd"
    assert tok.decode([tok.byte_to_id[b"\xff"], *ids]) == "\ufffdé"
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "é"
    for bad in ([len(tok)], [-1], [0, 10 ** 9]):
        with pytest.raises(ValueError, match="out of range"):
            tok.decode(bad)


def test_matches_tiktoken(trained):
    tiktoken = pytest.importorskip("tiktoken")
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


def test_special_tokens_longest_match_and_appended(trained):
    _, vocab, merges, _ = trained
    eot = "<|endoftext|>"
    tok = bpe.Tokenizer(vocab, merges, [eot, eot + eot, "<|new|>"])
    ids = tok.encode(f"a{eot}{eot}b{eot}c<|new|>")
    assert ids[1] == tok.special_ids[eot + eot] and ids.count(tok.special_ids[eot]) == 1
    # specials missing from the vocab are appended, in order
    assert [tok.special_ids[eot + eot], tok.special_ids["<|new|>"]] == [len(vocab), len(vocab) + 1]
    assert tok.decode(ids) == f"a{eot}{eot}b{eot}c<|new|>"


def test_encode_iterable_equals_encode(trained, tmp_path):
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


def test_save_from_files_identical(trained, tmp_path):
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


def test_bytes_to_unicode_is_gpt2_table():
    t = bpe.bytes_to_unicode()
    assert len(set(t.values())) == 256
    assert t[ord(" ")] == "Ġ" and t[ord("\n")] == "Ċ" and t[ord("A")] == "A" and t[0] == "Ā"
    assert all(ch.isprintable() and not ch.isspace() for ch in t.values())


def test_encode_file_memmap(trained, tmp_path):
    path, _, _, tok = trained
    tok.save(tmp_path / "tok")
    n = bpe.encode_file(str(tmp_path / "tok"), path, str(tmp_path / "a.bin"), workers=2, chunk_bytes=8192,
                        verbose=False)
    arr = np.memmap(tmp_path / "a.bin", dtype=np.uint16, mode="r")
    assert n == len(arr) and arr.tolist() == tok.encode(open(path, encoding="utf-8", newline="").read())
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_encode_file_uint32_for_big_vocab(tmp_path):
    vocab = {i: bytes([i]) for i in range(256)}
    vocab[70000] = b"<|big|>"                       # ids above 65535 need uint32
    tok = bpe.Tokenizer(vocab, [], ["<|big|>"])
    tok.save(tmp_path / "tok")
    (tmp_path / "t.txt").write_text("hi<|big|>", encoding="utf-8")
    bpe.encode_file(str(tmp_path / "tok"), str(tmp_path / "t.txt"), str(tmp_path / "t.bin"), verbose=False)
    assert np.fromfile(tmp_path / "t.bin", dtype=np.uint32).tolist() == [104, 105, 70000]
    assert bpe.token_dtype(65536) == np.uint16 and bpe.token_dtype(65537) == np.uint32


# --- CLI ---

def test_cli_train_encode_stats(tmp_path, capsys):
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
    assert "tokens/word" in out and "numbers" in out and "non-English" in out


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "bpe.py", *args], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.abspath(bpe.__file__)))


def test_cli_bad_input(tmp_path):
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



# ===============================================================
# model.py + train.py: the Transformer's blocks against torch's own ops, sampling (KV cache,
# speculative decoding), the masked-LM objective, the optimizer/schedule/clip/batch pieces of the
# training loop, checkpoints (file objects, errors, SIGKILL + resume == uninterrupted, bitwise)
# and the export to Hugging Face Llama (identical logits).
# ===============================================================


# ---------------------------------------------------------------
# Primitives vs torch
# ---------------------------------------------------------------


def test_state_dict_names_shapes_and_init():
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


def test_softmax_silu_cross_entropy_vs_torch():
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


def test_rmsnorm_and_swiglu_vs_reference():
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


def test_sdpa_with_and_without_mask_vs_torch():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 5)
    torch.testing.assert_close(M.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    mask = torch.rand(7, 9) > 0.4
    mask[:, 0] = True  # every query sees at least one key
    torch.testing.assert_close(M.scaled_dot_product_attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_rope_matches_complex_rotation_and_is_relative():
    torch.manual_seed(0)
    d, theta = 8, 10000.0
    rope = M.RotaryEmbedding(theta, d, 64)
    x = torch.randn(2, 10, d)
    pos = torch.arange(10)
    # reference: pairs (x[2k], x[2k+1]) as complex numbers times exp(i * pos * theta^(-2k/d))
    ang = pos[:, None].float() * theta ** (-torch.arange(0, d, 2).float() / d)  # (T, d/2)
    z = torch.view_as_complex(x.view(2, 10, d // 2, 2).contiguous()) * torch.polar(torch.ones_like(ang), ang)
    torch.testing.assert_close(rope(x, pos), torch.view_as_real(z).flatten(-2))
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
def test_attention_backends_agree(causal, kv):
    torch.manual_seed(0)
    m = M.TransformerLM(tiny_cfg(causal=causal, num_kv_heads=kv, attn_backend="scratch"))
    idx = torch.randint(0, 61, (2, 17))
    ref = m(idx)
    m.cfg.attn_backend = "sdpa"
    torch.testing.assert_close(m(idx), ref, atol=1e-5, rtol=1e-5)


def test_triton_backend_in_interpreter_agrees():
    pytest.importorskip("kernels")  # not "triton": kernels.py must set TRITON_INTERPRET before triton loads
    torch.manual_seed(0)
    cfg = M.ModelConfig(vocab_size=17, context_length=16, d_model=32, num_layers=1, num_heads=2, d_ff=32, attn_backend="sdpa")
    m = M.TransformerLM(cfg)
    idx = torch.randint(0, 17, (1, 16))
    ref = m(idx)
    m.cfg.attn_backend = "triton"  # on CPU kernels.py runs the kernel in Triton's interpreter
    torch.testing.assert_close(m(idx), ref, atol=1e-4, rtol=1e-4)


def test_causal_sees_no_future_encoder_sees_all():
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


def test_mlm_corruption_proportions():
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


def test_flops_and_mfu_closed_form():
    cfg = M.ModelConfig(vocab_size=50304, context_length=1024, d_model=768, num_layers=12, num_heads=12)
    n = M.count_params(cfg, non_embedding=True)
    assert M.flops_per_token(cfg) == 6 * n + 12 * 12 * 768 * 1024
    assert 80e6 < n < 130e6  # a GPT-2-small-class model
    assert M.estimate_mfu(cfg, 1000.0, peak_flops=1e12) == pytest.approx(M.flops_per_token(cfg) * 1000 / 1e12)
    assert M.estimate_mfu(cfg, 1000.0, device="cpu") is None


# ---------------------------------------------------------------
# Sampling: KV cache, truncations, speculative decoding
# ---------------------------------------------------------------


def test_kv_cache_generation_equals_no_cache():
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
    # past the window we slide it; stop token ends (and pads) rows
    long = M.generate(m, prompt, 40, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert long.shape == (2, 45)
    stop = int(out[0, 5])
    s = M.generate(m, prompt[:1], 10, temperature=0.9, top_k=20, stop_token=stop, generator=torch.Generator().manual_seed(3))
    assert s.shape == (1, 6) and s[0, -1] == stop


def test_logits_to_probs_truncations_vs_reference():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    torch.testing.assert_close(M.logits_to_probs(logits, top_k=2), torch.tensor([[4 / 7, 3 / 7, 0, 0, 0]]))
    torch.testing.assert_close(M.logits_to_probs(logits, top_p=0.7), torch.tensor([[4 / 7, 3 / 7, 0, 0, 0]]))
    torch.testing.assert_close(M.logits_to_probs(logits, top_p=0.71), torch.tensor([[0.4, 0.3, 0.15, 0, 0]]) / 0.85)
    torch.testing.assert_close(M.logits_to_probs(logits, min_p=0.3), torch.tensor([[0.4, 0.3, 0.15, 0, 0]]) / 0.85)
    torch.testing.assert_close(M.logits_to_probs(logits, temperature=0), torch.tensor([[1.0, 0, 0, 0, 0]]))
    t = M.logits_to_probs(logits, temperature=2.0)
    torch.testing.assert_close(t, torch.softmax(logits / 2, -1))


def test_speculative_accept_rule_is_exact():
    # Emitted first token must follow p exactly, whatever q is (Leviathan et al. Thm 1).
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    counts = torch.zeros(4)
    N = 6000
    for _ in range(N):
        x = torch.multinomial(q[0], 1, generator=g)
        counts[M.speculative_accept(p, q, x, g)[0]] += 1
    assert (counts / N - p[0]).abs().max() < 0.02


def test_speculative_with_draft_equal_target_accepts_all_and_matches():
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


# ---------------------------------------------------------------
# Hugging Face export
# ---------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(num_kv_heads=2), dict(tie_embeddings=True)])
def test_export_hf_llama_identical_logits(tmp_path, kw):
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


# ---------------------------------------------------------------
# Training pieces: AdamW, schedule, clipping, batches
# ---------------------------------------------------------------


def test_adamw_matches_torch_over_10_steps():
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


def test_lr_cosine_schedule_values():
    f = lambda it: TR.lr_cosine_schedule(it, 1.0, 0.1, 7, 21)  # noqa: E731
    assert f(0) == 0 and f(3) == pytest.approx(3 / 7) and f(7) == pytest.approx(1.0)
    assert f(14) == pytest.approx(0.55)  # halfway down the cosine: (max + min) / 2
    assert f(10) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 3 / 14)))
    assert f(21) == pytest.approx(0.1) and f(30) == 0.1
    assert all(f(i) >= f(i + 1) for i in range(7, 25))


def test_clip_grad_norm_matches_torch():
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


def test_get_batch_statistics(tmp_path):
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


def test_overfit_one_batch():
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


def test_checkpoint_file_object_roundtrip_and_errors(tmp_path):
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
    for flag in ("--batch-size", "--context-length", "--grad-accum", "--max-steps"):
        with pytest.raises(SystemExit) as e:
            TR.build_parser().parse_args(["--data", "x", flag, "0"])
        assert e.value.code == 2 and "must be a positive integer, got 0" in capsys.readouterr().err, flag


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


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
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
def test_train_loop_variants_learn(tmp_path, steps, extra):
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


def test_sample_cli_from_checkpoint(tmp_path, capsys):
    bpe = pytest.importorskip("bpe")
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
    if torch.cuda.is_available():  # compiled, unless someone asked for the interpreter on purpose
        assert type(kernels._rmsnorm_fwd_kernel).__name__ == ("InterpretedFunction" if kernels.INTERPRET
                                                              else "JITFunction")
        return
    # the two lines at the top of this file must have switched triton to its interpreter
    assert os.environ["TRITON_INTERPRET"] == "1" and kernels.INTERPRET
    assert type(kernels._rmsnorm_fwd_kernel).__name__ == "InterpretedFunction"
    assert type(kernels._fa_fwd).__name__ == "InterpretedFunction"  # no autotuner wrapped around it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 16), (2, 17, 48), (2, 3, 5, 100)])
def test_kernels_rmsnorm_triton_matches_torch(shape, dtype):
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
    q, k, v = _kn_attn_case(lead, Tq, Tk, d, torch.float32)
    ours = _kn_run(lambda q, k, v: kernels.FlashAttentionTorch.apply(q, k, v, causal), q, k, v)
    _kn_close(ours, _kn_run(lambda q, k, v: _kn_sdpa(q, k, v, causal), q, k, v), torch.float32)


@pytest.mark.parametrize("fa", [kernels.FlashAttentionTorch, kernels.FlashAttentionTriton])
def test_kernels_flash_attention_saves_only_logsumexp(fa):
    # CS336 contract: besides inputs/outputs, exactly one saved tensor of shape (batch, n_queries): L
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
    q, k, v = _kn_attn_case(lead, Tq, Tk, d, dtype, seed=3)
    ours = _kn_run(lambda q, k, v: kernels.FlashAttentionTriton.apply(q, k, v, causal), q, k, v)
    ref = _kn_run(lambda q, k, v: _kn_sdpa(q, k, v, causal), q.float(), k.float(), v.float())
    _kn_close(ours, [r.to(dtype) for r in ref], dtype)


@pytest.mark.parametrize("d,dtype", [(24, torch.float32), (128, torch.float32), (64, torch.float16)])
def test_kernels_flash_attention_triton_head_dims(d, dtype):
    # head dims that are not a power of two (masked d lanes), the largest one, and fp16
    q, k, v = _kn_attn_case((1, 2), 20, 20, d, dtype, seed=5)
    ours = _kn_run(lambda q, k, v: kernels.FlashAttentionTriton.apply(q, k, v, True), q, k, v)
    ref = _kn_run(lambda q, k, v: _kn_sdpa(q, k, v, True), q.float(), k.float(), v.float())
    _kn_close(ours, [r.to(dtype) for r in ref], dtype)


def test_kernels_flash_attention_triton_on_model_layout():
    # model.py hands over (B, H, T, d) views made by .transpose(1, 2): not contiguous
    B, T, H, d = 2, 17, 2, 16
    xs = [_kn_rand(B, T, H * d, dtype=torch.float32, seed=s) for s in (0, 1, 2)]

    def attend(fa):
        return lambda q, k, v: fa(*(t.view(B, T, H, d).transpose(1, 2) for t in (q, k, v)))
    ours = _kn_run(attend(lambda q, k, v: kernels.FlashAttentionTriton.apply(q, k, v, True)), *xs)
    ref = _kn_run(attend(lambda q, k, v: _kn_sdpa(q, k, v, True)), *xs)
    _kn_close(ours, ref, torch.float32)


@pytest.mark.parametrize("fa", [kernels.FlashAttentionTorch, kernels.FlashAttentionTriton])
def test_kernels_causal_skips_fully_masked_tiles(fa):
    # Keys after the last query are never visible.  If their tiles were loaded at all, NaNs put
    # there would leak into O through 0 * NaN in P V and into dQ/dK/dV; skipped tiles cannot.
    # Tq is a multiple of every tile size (16 interpreted, <= 128 compiled).
    Tq = 16 if (kernels.INTERPRET or fa is kernels.FlashAttentionTorch) else 128
    q, k, v = _kn_attn_case((1, 2), Tq, 3 * Tq, 32, torch.float32, seed=7)
    k[..., Tq:, :] = float("nan")
    v[..., Tq:, :] = float("nan")
    o, dq, dk, dv = _kn_run(lambda q, k, v: fa.apply(q, k, v, True), q, k, v)
    ro, rdq, rdk, rdv = _kn_run(lambda q, k, v: _kn_sdpa(q, k, v, True), q, k[..., :Tq, :], v[..., :Tq, :])
    _kn_close([o, dq, dk[..., :Tq, :], dv[..., :Tq, :]], [ro, rdq, rdk, rdv], torch.float32)
    assert (dk[..., Tq:, :] == 0).all() and (dv[..., Tq:, :] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_swiglu_triton_matches_torch(dtype):
    a, b = _kn_rand(3, 70, dtype=dtype, seed=1), _kn_rand(3, 70, dtype=dtype, seed=2)
    ours = _kn_run(kernels.SwiGLUTriton.apply, a, b)
    ref = _kn_run(lambda a, b: F.silu(a) * b, a.float(), b.float())
    _kn_close(ours, [r.to(dtype) for r in ref], dtype)


def test_kernels_chunked_cross_entropy_matches_full_logits():
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
    # T = 1000: not a multiple of any autotuned tile; bf16 against fp32 SDPA
    q, k, v = _kn_attn_case((2, 4), 1000, 1000, d, torch.bfloat16, seed=11)
    ours = _kn_run(lambda q, k, v: kernels.FlashAttentionTriton.apply(q, k, v, causal), q, k, v)
    ref = _kn_run(lambda q, k, v: _kn_sdpa(q, k, v, causal), q.float(), k.float(), v.float())
    _kn_close(ours, [r.to(torch.bfloat16) for r in ref], torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled Triton kernels")
def test_kernels_rmsnorm_triton_gpu_large():
    x, w = _kn_rand(4, 1000, 4096, dtype=torch.bfloat16, seed=1), _kn_rand(4096, dtype=torch.bfloat16, seed=2)
    ours = _kn_run(lambda x, w: kernels.RMSNormTriton.apply(x, w, 1e-5), x, w)
    ref = _kn_run(lambda x, w: F.rms_norm(x, (4096,), w, eps=1e-5), x.float(), w.float())
    _kn_close(ours, [r.to(torch.bfloat16) for r in ref], torch.bfloat16)


# ---- the compiled (GPU) path, checked without a GPU ----
# The interpreter accepts things the compiler rejects (and vice versa), so we also compile the
# kernels ahead of time for an H100 (sm_90) with the ptxas that ships in the triton wheel.  It
# runs in a subprocess because here TRITON_INTERPRET=1 has already turned every kernel into an
# interpreted function.  Passing means "valid Triton for Hopper, using wgmma tensor-core MMAs".
_KN_AOT = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
import triton, kernels
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget

def comp(fn, sig, consts, num_warps, num_stages):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items() if v.startswith("*")}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    return k.asm["ptx"]

P, tile = "*bf16", {"d": 64, "PREC": "tf32", "IS_CAUSAL": True, "BLOCK_D": 64}
io = {"Q": P, "K": P, "V": P}
bwd = {**io, "DO": P, "L": "*fp32", "Dr": "*fp32", "Tq": "i32", "Tk": "i32", "T_BUCKET": "i32", "sm_scale": "fp32"}
ptx = comp(kernels._fa_fwd.fn, {**io, "O": P, "L": "*fp32", "Tq": "i32", "Tk": "i32", "T_BUCKET": "i32", "qk_scale": "fp32"},
           {**tile, "BLOCK_M": 64, "BLOCK_N": 64}, 4, 2)
assert "wgmma" in ptx, "forward does not use Hopper tensor cores"
comp(kernels._fa_dkdv.fn, {**bwd, "DK": P, "DV": P}, {**tile, "BLOCK_M": 64, "BLOCK_N": 64}, 4, 2)
comp(kernels._fa_dq.fn, {**bwd, "DQ": P}, {**tile, "BLOCK_M": 64, "BLOCK_N": 64}, 4, 2)
comp(kernels._fa_bwd_preprocess, {"O": P, "DO": P, "Dr": "*fp32", "Tq": "i32"},
     {"d": 64, "BLOCK_M": 64, "BLOCK_D": 64}, 4, 1)
comp(kernels._rmsnorm_fwd_kernel, {"X": P, "W": P, "Y": P, "RSTD": "*fp32", "D": "i32", "eps": "fp32"},
     {"BLOCK_D": 4096}, 16, 1)
comp(kernels._rmsnorm_bwd_kernel, {"X": P, "W": P, "DY": P, "RSTD": "*fp32", "DX": P, "DW_PART": "*fp32",
     "N": "i32", "D": "i32", "rows_per_prog": "i32"}, {"BLOCK_D": 4096}, 16, 1)
print("compiled ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above already run compiled kernels")
def test_kernels_compile_for_hopper_without_gpu():
    import pathlib
    import subprocess
    import sys

    import triton
    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton build ships no ptxas")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _KN_AOT], cwd=os.path.dirname(os.path.abspath(kernels.__file__)),
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "compiled ok" in r.stdout, r.stderr[-3000:]


# ---------------------------------------------------------------
# parallel.py: DDP, bucketed DDP, ZeRO-1, FSDP, tensor and pipeline parallelism (2 gloo ranks)
# ---------------------------------------------------------------
# Every distributed variant must reproduce one process. Process start-up dominates the cost, so
# one 2-rank job runs all from-scratch checks and writes numbers to a file; the tests below then
# assert on them one concept at a time. A second group launches train.py under torchrun.


V, D, B, T, STEPS = 64, 16, 4, 8, 3      # vocab, width, sequences per rank, tokens, optimizer steps


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _toy(tie=True, freeze=True):
    torch.manual_seed(0)
    return parallel.ToyLM(V, D, num_layers=2, tie=tie, freeze=freeze)


def _cast_forward(model, dtype):
    """Naive mixed-precision reference for the toy LM: every Linear/Embedding weight cast to
    `dtype` at use (autograd's cast backward returns fp32 grads to the fp32 master), activations
    in `dtype`, RMSNorm statistics in fp32."""
    def rms(norm, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight).to(x.dtype)

    def fwd(idx):
        x = F.embedding(idx, model.token_embeddings.weight.to(dtype))
        x = F.linear(x, model.frozen.weight.to(dtype))
        for blk in model.layers:
            h = F.gelu(F.linear(rms(blk.ln, x), blk.fc1.weight.to(dtype)))
            x = x + F.linear(h, blk.fc2.weight.to(dtype))
        return F.linear(rms(model.ln_final, x), model.lm_head.weight.to(dtype))
    return fwd


def _checks(rank, world):
    """All from-scratch checks on one rank; returns {name: number or bool} (rank 0's are kept)."""
    res = {}
    # --- DDP and BucketedDDP vs one process, SGD and AdamW, tied + frozen params
    for name, wrap in (("ddp", parallel.DDP), ("bucketed", lambda m: parallel.BucketedDDP(m, bucket_size_mb=0.004))):
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

    # --- gradient accumulation: no communication inside no_sync, one sync on the last micro-step
    for name, wrap in (("ddp", parallel.DDP), ("bucketed", lambda m: parallel.BucketedDDP(m, bucket_size_mb=0.004))):
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

    # --- ZeRO-1: sharded AdamW == plain AdamW, with 1/N of the optimizer state
    w, ref = parallel.BucketedDDP(_toy()), _toy()
    opt, opt_ref = parallel.ShardedOptimizer(w.parameters(), torch.optim.AdamW, lr=1e-2, weight_decay=0.1), _opt("adamw", ref.parameters())
    ok = True
    for s in range(STEPS):
        _dist_step(w, opt, s, rank)
        _ref_step(ref, opt_ref, s)
        for (_, p), (_, q) in zip(w.module.named_parameters(), ref.named_parameters()):
            ok &= torch.allclose(p, q, rtol=1e-7, atol=0)
    res["zero1_equal"] = ok
    full_state = sum(t.numel() * 4 for s in opt_ref.state.values() for t in s.values() if t.dim() > 0)
    shard_state = torch.tensor(float(opt.state_bytes()))
    res["zero1_state_share"] = opt.state_bytes() / full_state
    dist.all_reduce(shard_state)
    res["zero1_state_total"] = shard_state.item() / full_state

    # --- FSDP fp32: bit-equal to one process; gather_full_params keyed like the original model
    for kind in ("sgd", "adamw"):
        f, ref = parallel.FSDP(_toy()), _toy()
        opt, opt_ref = _opt(kind, f.parameters()), _opt(kind, ref.parameters())
        bits = True
        for s in range(STEPS):
            _dist_step(f, opt, s, rank)
            _ref_step(ref, opt_ref, s)
            bits &= _bit_equal(f.gather_full_params(), ref.named_parameters())
        res[f"fsdp_{kind}_bits"] = bits
    full = f.gather_full_params()
    res["fsdp_keys"] = sorted(full) == sorted(n for n, _ in ref.named_parameters())
    res["fsdp_shapes"] = all(full[n].shape == p.shape for n, p in ref.named_parameters())
    res["fsdp_shard_numel"] = max(p.numel() for p in f.parameters() if p.dim() == 1 and p.numel() > D)
    # --- FSDP bf16 / fp16 compute with fp32 master weights vs the cast-emulating reference
    for dt in (torch.bfloat16, torch.float16):
        f, ref = parallel.FSDP(_toy(), compute_dtype=dt), _toy()
        opt, opt_ref = _opt("adamw", f.parameters()), _opt("adamw", ref.parameters())
        diff = 0.0
        for s in range(STEPS):
            _dist_step(f, opt, s, rank)
            _ref_step(ref, opt_ref, s, forward=_cast_forward(ref, dt))
            diff = max(diff, _max_diff(f.gather_full_params(), ref.named_parameters()))
        res[f"fsdp_{str(dt)[6:]}_diff"] = diff
        res[f"fsdp_{str(dt)[6:]}_master_fp32"] = all(p.dtype == torch.float32 for p in f.parameters())

    # --- tensor parallel: a model.py block (GQA + RoPE) split over 2 ranks == the unsplit block
    from model import ModelConfig, TransformerBlock
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=V, context_length=T, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2)
    block = TransformerBlock(cfg)
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
    res["tp_out_diff"] = (out2 - out).abs().max().item()
    res["tp_xgrad_diff"] = (x2.grad - x.grad).abs().max().item()
    res["tp_wgrad_diff"] = max((p.grad - g).abs().max().item() for p, g in pairs)

    # --- pipeline parallel: GPipe, 2 stages x 4 micro-batches == the unsplit model
    model = _toy(tie=False)
    ref = copy.deepcopy(model)
    layers, ref_layers = parallel.lm_as_layers(model), parallel.lm_as_layers(ref)
    stage = parallel.split_stages(layers, world)[rank]
    x, y = _global_batch(0)
    loss = parallel.gpipe_step(stage, x, y, 4, (2 * B // 4, T, D))
    ref_loss = _loss(ref, x, y)
    ref_loss.backward()
    mine = [i for i, l in enumerate(layers) if any(l is m for m in stage)]
    res["pp_loss_diff"] = abs(loss - ref_loss.item()) if rank == world - 1 else 0.0
    res["pp_grad_diff"] = max((p.grad - q.grad).abs().max().item() for i in mine
                              for p, q in zip(layers[i].parameters(), ref_layers[i].parameters()) if p.requires_grad)
    res["pp_layers"] = len(mine)
    # every rank's numbers matter (TP/PP grads live on both): keep the worst of each
    for k, v in res.items():
        if isinstance(v, bool):
            t = torch.tensor(float(v))
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            res[k] = bool(t.item())
        elif k.endswith("_diff"):
            t = torch.tensor(float(v))
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            res[k] = t.item()
    return res


def _worker(rank, world, port, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    res = _checks(rank, world)
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
        ctx = mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=False, start_method="spawn")
        try:
            for _ in range(180):                   # join with a deadline: a desync must not hang CI
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


def test_parallel_ddp_equals_single_process(parallel_results):
    r = parallel_results
    for name in ("ddp", "bucketed"):
        for kind in ("sgd", "adamw"):
            # same per-rank arithmetic as running the two halves in one process: bit-equal
            assert r[f"{name}_{kind}_bits"], (name, kind)
            # vs one forward over the full batch: equal up to float reassociation; a sum instead of
            # a mean of the two ranks' grads would be off by ~lr here, far above 1e-5
            assert r[f"{name}_{kind}_diff"] < 1e-5, (name, kind, r[f"{name}_{kind}_diff"])
            assert r[f"{name}_{kind}_frozen"] and r[f"{name}_{kind}_tied"], (name, kind)
    assert r["bucketed_num_buckets"] > 2            # the tiny bucket size really made several buckets


def test_parallel_ddp_no_sync_accumulation(parallel_results):
    r = parallel_results
    for name in ("ddp", "bucketed"):
        assert r[f"{name}_nosync_bytes"] == 0, name                 # no all-reduce on non-final micro-steps
        assert r[f"{name}_sync_bytes"] > 0, name                    # ...and a sync on the last one
        assert r[f"{name}_accum_grad_diff"] < 1e-6, (name, r[f"{name}_accum_grad_diff"])


def test_parallel_zero1_equals_adamw(parallel_results):
    r = parallel_results
    assert r["zero1_equal"]                                          # rtol 1e-7 after every step
    assert r["zero1_state_share"] < 0.75                             # this rank holds only part of it
    assert abs(r["zero1_state_total"] - 1.0) < 1e-9                  # shards partition the state


def test_parallel_fsdp_fp32_bit_equal_and_keys(parallel_results):
    r = parallel_results
    assert r["fsdp_sgd_bits"] and r["fsdp_adamw_bits"]
    assert r["fsdp_keys"] and r["fsdp_shapes"]
    assert r["fsdp_shard_numel"] == (V * D) // 2                     # the (64, 16) table: half per rank


def test_parallel_fsdp_mixed_precision(parallel_results):
    r = parallel_results
    for dt in ("bfloat16", "float16"):
        assert r[f"fsdp_{dt}_master_fp32"], dt
        assert r[f"fsdp_{dt}_diff"] < 1e-4, (dt, r[f"fsdp_{dt}_diff"])


def test_parallel_tensor_block(parallel_results):
    r = parallel_results
    assert r["tp_out_diff"] < 1e-5 and r["tp_xgrad_diff"] < 1e-5 and r["tp_wgrad_diff"] < 1e-5, r


def test_parallel_pipeline_gpipe(parallel_results):
    r = parallel_results
    assert r["pp_layers"] == 3                                       # 6 layers over 2 stages
    assert r["pp_loss_diff"] < 1e-5 and r["pp_grad_diff"] < 1e-5, r


# ---------------------------------------------------------------
# The real path: torchrun train.py on 2 CPU ranks == 1 rank with doubled gradient accumulation
# ---------------------------------------------------------------

def _launch_train(tmp_path, name, nproc, accum, extra=()):
    cmd = ["train.py", "--data", str(tmp_path / "data"), "--out-dir", str(tmp_path / name), "--vocab-size", "64",
           "--d-model", "32", "--num-layers", "1", "--num-heads", "2", "--context-length", "16",
           "--batch-size", "2", "--grad-accum", str(accum), "--max-steps", "3", "--warmup-steps", "1",
           "--log-every", "1", "--eval-every", "3", "--eval-steps", "1", "--sample-every", "0",
           "--ckpt-every", "3", "--tie-embeddings", *extra]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port())] + cmd
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
    return [r["loss"] for r in recs if "loss" in r], stdout


def test_parallel_torchrun_train_matches_single_process(tmp_path):
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
    assert len(one) == len(ddp) == len(fsdp) == 3
    assert max(abs(a - b) for a, b in zip(one, ddp)) < 1e-4, (one, ddp)
    assert max(abs(a - b) for a, b in zip(one, fsdp)) < 1e-4, (one, fsdp)
    assert one[0] != one[-1]                                         # it really trained
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


def test_param_count_matches_model():
    import model
    for kw in [dict(d_model=32, num_layers=2, num_heads=4),
               dict(d_model=48, num_layers=3, num_heads=6, num_kv_heads=2, d_ff=72),
               dict(d_model=32, num_layers=1, num_heads=2, tie_embeddings=True)]:
        m = model.TransformerLM(model.ModelConfig(vocab_size=100, context_length=16, **kw))
        n = scaling.param_counts(100, **kw)
        assert n["total"] == m.num_params()
        assert n["non_embedding"] == m.num_params(non_embedding=True)


def test_flops_match_torch_flop_counter():
    """Our fwd+bwd matmul count == what torch's FlopCounterMode sees in the real model (the
    (the from-scratch attention computes the full T x T square, so compare with causal=False); and it agrees with
    model.flops_per_token up to the RMSNorm gains that model.py counts as 6N."""
    from torch.utils.flop_counter import FlopCounterMode
    import model
    V, d, L, H, T, B = 64, 32, 2, 4, 16, 2
    cfg = model.ModelConfig(vocab_size=V, context_length=T, d_model=d, num_layers=L, num_heads=H,
                            num_kv_heads=2, attn_backend="scratch")
    m = model.TransformerLM(cfg)
    counter = FlopCounterMode(display=False)
    with counter:
        m(torch.randint(0, V, (B, T))).sum().backward()
    ours = scaling.train_flops_per_token(V, d, L, H, T, num_kv_heads=2, causal=False)
    assert counter.get_total_flops() == ours * B * T
    gains = 6 * (2 * d * L + d)
    assert model.flops_per_token(cfg) == ours + gains
    # a causal kernel skips the masked half: QK^T and AV drop from T to (T+1)/2 keys per query
    causal = scaling.train_flops_per_token(V, d, L, H, T, num_kv_heads=2)
    assert ours - causal == pytest.approx(3 * L * 4 * d * (T - (T + 1) / 2))


def test_flops_table_6nd_is_off_for_small_models():
    rows = scaling.flops_table(vocab_size=256, context_length=256)
    ratio = [r["exact/6N"] for r in rows]
    assert ratio[0] > 1.2 and abs(ratio[-1] - 1) < 0.01        # attention matters only when small
    assert all(a >= b for a, b in zip(ratio, ratio[1:]))        # and fades monotonically with size


def test_load_runs_csv_with_C_column(tmp_path):
    p = tmp_path / "pub.csv"
    p.write_text("N,C,loss\n1e6,6e12,3.1\n2e6,6e12,3.0\n")
    r = scaling.load_runs(str(p))
    np.testing.assert_allclose(r["D"], [1e6, 5e5])             # D = C / 6N
    np.testing.assert_allclose(r["budget"], [6e12, 6e12])


def test_approach3_recovers_known_law(fit3):
    fit, _, _ = fit3
    for k, v in TRUE.items():
        assert abs(fit[k] / v - 1) < 0.05, (k, fit[k], v)


def test_approach3_predicts_held_out_point(fit3):
    fit, runs, i = fit3
    pred = scaling.predict_loss(fit, runs["N"][i], runs["D"][i])
    assert abs(np.log(pred / runs["loss"][i])) < 4 * NOISE


def test_allocation_closed_form_matches_brute_force(fit3):
    fit, _, _ = fit3
    for C in (1e19, 1e23):
        N_opt, D_opt = scaling.compute_optimal(fit, C)
        assert 6 * N_opt * D_opt == pytest.approx(C)
        Ns = np.logspace(np.log10(N_opt) - 2, np.log10(N_opt) + 2, 200001)
        N_bf = Ns[np.argmin(scaling.predict_loss(fit, Ns, C / (6 * Ns)))]
        assert N_opt == pytest.approx(N_bf, rel=1e-3)


def test_approach2_recovers_exponent():
    a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])    # N_opt ~ C^(beta/(alpha+beta))
    a2 = scaling.approach2(synthetic_isoflop(seed=1), n_boot=50, targets=[1e24])
    assert abs(a2["a"] - a_true) < 0.01 and abs(a2["b"] - (1 - a_true)) < 0.01
    assert a2["a_ci"][0] < a_true < a2["a_ci"][1]
    N_true = scaling.compute_optimal(TRUE, 1e24)[0]
    assert a2["predict"][1e24]["N_ci"][0] < N_true < a2["predict"][1e24]["N_ci"][1]


def test_sweep_end_to_end_and_resumable(tmp_path, capsys):
    """3 tiny train.py runs (2 budgets x 2 sizes, one too small to run), then a rerun skips all."""
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
    assert len(rows) == 3 and "C2.0e+07_d16_L1: only 7 steps" in first   # < --min-steps
    for r in rows:
        n = scaling.param_counts(256, r["d_model"], 1, r["d_model"] // 8, d_ff=max(8, 8 * round(r["d_model"] / 3)))
        assert r["N"] == n["non_embedding"] and np.isfinite(r["loss"]) and r["loss"] < np.log(256)
        assert r["C"] == pytest.approx(r["budget"], rel=0.1)      # steps rounded to whole numbers
    mtimes = {r["run"]: os.path.getmtime(out / r["run"] / "metrics.jsonl") for r in rows}
    scaling.sweep(args)
    assert capsys.readouterr().out.count("done, skipping") == 3
    assert [json.loads(l) for l in open(path)] == rows
    assert mtimes == {r: os.path.getmtime(out / r / "metrics.jsonl") for r in mtimes}


def test_fit_report_on_published_csv(tmp_path, capsys):
    """The `fit` command on a published-style table (N, C, loss): both approaches, fit.json, and
    a PNG when matplotlib is installed (a text table otherwise)."""
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


def test_response_mask_covers_exactly_the_response():
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


def test_masked_mean_and_normalize_by_hand():
    t = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]])  # the middle row is all-zero
    assert align.masked_mean(t, m).item() == pytest.approx((1 + 2 + 7 + 9) / 4)
    assert align.masked_mean(t, m, dim=1).tolist() == pytest.approx([1.5, 0.0, 8.0])  # empty row -> 0, not NaN
    assert align.masked_mean(t, m, dim=0).tolist() == pytest.approx([4.0, 2.0, 9.0])
    assert align.masked_normalize(t, m, normalize_constant=2.0).item() == pytest.approx(19 / 2)
    assert align.masked_normalize(t, m, dim=1, normalize_constant=4.0).tolist() == pytest.approx([0.75, 0.0, 4.0])
    assert align.masked_normalize(t, m, dim=0).tolist() == pytest.approx([8.0, 2.0, 9.0])


def test_compute_entropy_matches_torch_distribution():
    logits = torch.randn(3, 5, 11) * 30  # large logits: a naive softmax would overflow in exp
    want = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(align.compute_entropy(logits), want)


def test_group_normalized_rewards_hand_example():
    rf = lambda r, g: {"reward": float(r == g), "answer_reward": float(r == g)}  # noqa: E731
    resp, gts = ["1", "2", "1", "1", "5", "5", "5", "5"], ["1"] * 4 + ["5"] * 4
    adv, raw, meta = align.compute_group_normalized_rewards(rf, resp, gts, 4, 1e-6, True)
    assert raw.tolist() == [1, 0, 1, 1, 1, 1, 1, 1]
    # group 1: mean 0.75, unbiased std sqrt(((.25^2)*3 + .75^2)/3) = 0.5; group 2: all equal -> 0
    assert adv.tolist() == pytest.approx([0.25 / 0.5, -0.75 / 0.5, 0.5, 0.5, 0, 0, 0, 0], abs=1e-5)
    adv2, _, _ = align.compute_group_normalized_rewards(rf, resp, gts, 4, 1e-6, False)  # Dr. GRPO
    assert adv2.tolist() == pytest.approx([0.25, -0.75, 0.25, 0.25, 0, 0, 0, 0])
    assert meta["reward"] == pytest.approx(7 / 8)


def test_grpo_clip_equals_naive_on_policy():
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


def test_dpo_loss_is_log2_when_policy_equals_reference():
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


def test_dpo_nll_term_by_hand():
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


def test_sft_grad_accumulation_equals_one_big_batch():
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


def test_get_response_log_probs_matches_cross_entropy():
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
def test_parse_answer_adversarial(text, want):
    assert align.parse_answer(text) == want


def test_reward_fn():
    r = lambda text, gold: align.reward_fn(text, gold, format_weight=0.1)["reward"]  # noqa: E731
    assert r("2 + 2 = 4", 4) == pytest.approx(1.1)             # right, and ends in its answer
    assert r("so... #### 4", 4) == pytest.approx(1.1)
    assert r("4", 4) == pytest.approx(1.1)                     # a bare number is well formed too
    assert r("it is 4", 4) == pytest.approx(1.0)               # right, but no '= N' / '#### N' ending
    assert r("2 + 2 = 5", 4) == pytest.approx(0.1)             # wrong, well formed
    assert r("2 + 2 = 4 and 4 = 4 + 0 + 9", 4) == pytest.approx(0.0)  # rambles on, last number wrong
    assert align.reward_fn("#### 5", None)["answer_reward"] == 0.0


def test_split_is_disjoint_and_stable():
    for level in align.LEVELS:
        train = align.sample_problems("train", 400, [level], seed=1)
        test = align.sample_problems("test", 100, [level], seed=2, unique=True)
        assert train and test
        assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
        assert all(align.split_of(p["prompt"]) == "train" for p in train)
        for p in train[:50] + test[:50]:  # every gold response is right and parses
            assert align.parse_answer(p["response"]) == p["answer"]
    assert align.split_of("What is 3 + 4?") == align.split_of("What is 3 + 4?")  # sha256: no salt
    # the eval set is deterministic (same problems across stages and runs)
    a = align.sample_problems("test", 60, [1, 2], seed=1234, unique=True)
    assert a == align.sample_problems("test", 60, [1, 2], seed=1234, unique=True)
    assert len({p["prompt"] for p in a}) == len(a)


def test_wilson_interval_closed_form():
    lo, hi = align.wilson_interval(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # textbook value
    assert align.wilson_interval(0, 10)[0] == 0.0 and 0.25 < align.wilson_interval(0, 10)[1] < 0.35


def test_load_jsonl_formats(tmp_path):
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


def test_grpo_raises_reward_on_toy_task():
    # A toy policy over 8 tokens; reward = fraction of the 4 sampled tokens equal to token 3
    # (chance: 1/8). Only learning can raise it. 20 on-policy GRPO steps with the real grpo_step.
    torch.manual_seed(0)
    V, G, n_prompts, T = 8, 8, 4, 4
    model = _tiny_lm(V, seed=0, context_length=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    args = argparse.Namespace(group_size=G, no_std_norm=False, micro_batch_size=16, epochs_per_rollout=1,
                              loss_type="grpo_clip", cliprange=0.2, kl_coef=0.0)
    rf = lambda r, g: {"reward": r.count("3") / T, "answer_reward": float(r.count("3") == T)}  # noqa: E731
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    from model import generate
    rewards = []
    for step in range(20):
        prompts = [[rng.randrange(V) for _ in range(3)] for _ in range(n_prompts)]
        idx = torch.tensor([p for p in prompts for _ in range(G)])  # (n_prompts * G, 3)
        out = generate(model, idx, T, temperature=1.0, generator=gen)[:, 3:].tolist()
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


def test_lora_starts_equal_trains_adapters_only_and_merges():
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


def test_lora_sft_cli_saves_a_plain_merged_checkpoint(tmp_path):
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


def test_bradley_terry_loss_log2_and_gradient_sign():
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


def test_reward_model_learns_an_obvious_preference(tmp_path):
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


# ---------------------------------------------------------------
# pipeline.py: the whole chain at a tiny size, every artifact checked



def test_pipeline_gpu_preset_is_sized_to_the_data(tmp_path):
    import pipeline
    b = tmp_path / "train.bin"
    np.zeros(1_000_000, dtype=np.uint16).tofile(b)                     # 1M tokens
    assert pipeline.capped_steps(str(b), 32, 1024, 5000, 4) == 4 * 1_000_000 // (32 * 1024) == 122
    np.zeros(200_000_000, dtype=np.uint8).tofile(b)                    # 100M tokens: the step cap wins
    assert pipeline.capped_steps(str(b), 32, 1024, 5000, 4) == 5000
    # real-data flags reach data.py, and only data.py
    plan = pipeline.stage_plan(str(tmp_path), "gpu", ["--url", "http://example.com/x.txt"])
    assert [c[-2:] for n, c, _ in plan if n == "data"] == [["--url", "http://example.com/x.txt"]]
    assert all("--url" not in c for n, c, _ in plan if n != "data")


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
