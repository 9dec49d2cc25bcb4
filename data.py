"""data.py: from raw web pages (or the Python docs already on your disk) to a clean training corpus.

A language model is mostly its data, and raw crawled text is mostly not what you want to train on: navigation menus,
cookie banners, other languages, e-mail addresses, spam, a thousand copies of one page, binary garbage. Every large
pretraining set comes out of a filtering pipeline like this one: the classic stages, one function each, in order:

    source -> HTML to text -> language ID -> PII masking -> MinHash near-dedup
           -> exact-line (boilerplate) dedup -> Gopher rules -> quality / toxic / NSFW classifiers
           -> train.txt / val.txt (+ train.bin / val.bin with a bpe.py tokenizer)

Every input document ends up kept or dropped *with a reason* ("stage:why"), and stats.json accounts for all of
them: a filter that silently eats half the corpus is easy to write and hard to notice.

The default corpus needs no network: `python data.py` renders the installed stdlib's documentation with pydoc (plus
the `pydoc_data` topics) and sends the pages down exactly a Common Crawl page's path: real English with real problems
(author e-mails, IPs in examples, "Methods defined here:" on every page, near-duplicates such as `encodings.*`).

Papers:
- Gopher rules: Rae et al. 2021, arXiv:2112.11446, App. A. C4's bad-word rule: Raffel et al. 2020, arXiv:1910.10683.
  fastText classifiers: Joulin et al. 2016, arXiv:1607.01759. MinHash: Broder 1997; LSH banding: Leskovec,
  Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3. Why dedup: Lee et al. 2021, arXiv:2107.06499.
- Whole pipelines of this shape: CCNet (Wenzek et al. 2019, arXiv:1911.00359), RefinedWeb (Penedo et al. 2023,
  arXiv:2306.01116), Dolma (Soldaini et al. 2024, arXiv:2402.00159), FineWeb (Penedo et al. 2024, arXiv:2406.17557),
  and Stanford CS336 assignment 4, whose stage function names we borrow.

How to run (CPU only: no stage needs a GPU):
    python data.py                                   # default corpus -> data/pydocs/{train,val}.txt
    python data.py --modules json,textwrap,csv --out runs/tiny/data    # a few modules, chosen dir
    python data.py --input CC-MAIN-*.warc.gz pages/ docs.jsonl notes.txt --name mine   # WARC/WET, HTML, jsonl, txt
    python data.py --url https://example.org/shard.jsonl --name web    # remote file (cached)
    python data.py --tokenizer data/pydocs/tokenizer                   # also write train/val.bin
    python data.py train-classifier --input labeled.jsonl --out quality.pt   # {"text", "label"}
    python data.py eval-classifiers                  # precision / recall of the toxic and NSFW filters
Each stage has an off switch (`--no-lang`, `--no-pii`, `--no-dedup`, ...). Output: train.txt / val.txt (each
document followed by <|endoftext|>; split by a hash of the document id, so stable) and stats.json (what each stage
dropped and why, PII counts, languages, MinHash clusters, sizes, timings).

Known limits: the corpus-level stages hold the surviving texts in memory; a bare 10-digit number that starts with
2-9 is masked as a phone number; the default classifiers are small (a few hundred labeled lines; see Stage 5).
"""
import argparse
import codecs
import functools
import gzip
import hashlib
import html.parser
import itertools
import json
import multiprocessing as mp
import os
import re
import sys
import time
import types
import unicodedata
import zlib
from collections import Counter

import numpy as np
import regex

import bpe  # writes the token files; also the home of atomic writes and the MB/s + ETA progress line

EOT = "<|endoftext|>"
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")  # data files data.py reads


def _fixture(name):
    """A table from fixtures/NAME.json (the long word lists live there, out of the lesson's way)."""
    try:
        with open(os.path.join(FIXTURES, name + ".json"), encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise SystemExit(f"error: cannot read {e.filename} ({e.strerror}); data.py needs its fixtures/ directory")


atomic_write = bpe._atomic_open  # path.tmpPID, fsync, rename: a killed run leaves the old file or the new, never half


# ---------------------------------------------------------------
# Stage 1: HTML -> text. We walk the tag tree with the stdlib HTMLParser, dropping subtrees that are never content
# (script, style, nav, ...), turning block tags into paragraph breaks and keeping <pre> verbatim: a tiny cousin of
# resiliparse/trafilatura (surviving menus are line dedup's job). A skipped element whose end tag never comes (broken
# pages: an omitted </head>, an open <nav>) would hide the rest, so it is shown after all. <form> is not skipped:
# ASP.NET wraps the whole body in one.
_SKIP_TAGS = {"script", "style", "head", "title", "nav", "noscript", "template", "svg", "iframe", "footer", "aside",
              "select"}
_BLOCK_TAGS = {"p", "div", "section", "article", "main", "header", "h1", "h2", "h3", "h4", "h5", "h6",
               "table", "ul", "ol", "dl", "pre", "blockquote", "hr", "figure", "body", "html"}
# What an opening tag leaves: blocks a paragraph break (closing one, again), li and tr a line break, cells a space.
_OPEN_BREAK = {**dict.fromkeys(_BLOCK_TAGS, "\n\n"), **dict.fromkeys(["br", "li", "tr", "dt", "dd", "caption"], "\n"),
               "td": " ", "th": " "}
# WHATWG Encoding Standard: a label -> the decoder browsers really use. Pages labelled latin-1 or ASCII are
# written in windows-1252 (curly quotes, the euro sign); GB2312 pages are GBK (fixtures/whatwg_charsets.json).
_WHATWG = _fixture("whatwg_charsets")


class _TextExtractor(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)  # "&eacute;" arrives in handle_data as "é"
        # parts: (text, numbers of the skipped elements open around it); open_skips: (tag, number) of each open one
        self.parts, self.pre_depth, self.open_skips, self.n_skips = [], 0, [], 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP_TAGS:  # (none of them is a void tag like <br>)
            self.n_skips += 1
            self.open_skips.append((tag, self.n_skips))
        if tag == "pre":
            self.pre_depth += 1
        self.parts.append((_OPEN_BREAK.get(tag, ""), ()))

    def handle_endtag(self, tag):  # closes the innermost open element of that name; a stray one, nothing
        for k in range(len(self.open_skips) - 1, -1, -1) if tag in _SKIP_TAGS else ():
            if self.open_skips[k][0] == tag:
                del self.open_skips[k]
                break
        if tag in _BLOCK_TAGS:
            self.parts.append(("\n\n", ()))
        if tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)

    def handle_data(self, data):
        # Outside <pre>, HTML whitespace is insignificant: collapse it, but not U+00A0 (&nbsp;, pydoc's code
        # indentation). Inside <pre> spaces become U+00A0 too; every U+00A0 turns back into a space at the end.
        text = data.replace(" ", "\xa0") if self.pre_depth else re.sub(r"[ \t\r\n\f]+", " ", data)
        self.parts.append((text, tuple(n for _, n in self.open_skips) if self.open_skips else ()))


def _decode_html(html_bytes, http_charset=None):
    """Bytes -> str, in HTML5's sniffing order: a byte-order mark (it is the encoding itself), the HTTP
    Content-Type charset (WARC responses), a <meta charset> in the first 4096 bytes (the spec scans 1024), else
    UTF-8 (>98% of the web), with replacement characters: a bad byte costs one character, not the page."""
    for bom, codec in ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if html_bytes.startswith(bom):
            return html_bytes[len(bom):].decode(codec, errors="replace")
    m = re.search(rb"""<meta[^>]*charset\s*=\s*["']?([A-Za-z0-9_\-:.]+)""", html_bytes[:4096], re.I)
    for label, from_meta in ((http_charset, False), (m and m.group(1).decode("ascii"), True)):
        label = (label or "").strip().lower()
        if from_meta and label.startswith("utf-16"):  # a <meta> we could read as ASCII cannot be in UTF-16
            label = "utf-8"
        try:
            codec = codecs.lookup(_WHATWG.get(label, label)).name
        except LookupError:  # no label, or <meta charset="no-such-codec">: the next source decides
            continue
        return html_bytes.decode(codec, errors="replace")
    return html_bytes.decode("utf-8", errors="replace")


def _looks_binary(text, window=20000):
    """Binary garbage decodes to a soup of U+FFFD and control characters: > 10% of them is not text."""
    head = text[:window]
    bad = head.count("\ufffd") + sum(1 for ch in head if ord(ch) < 32 and ch not in "\t\n\r\f")
    return bool(head) and bad / len(head) > 0.1


def extract_text_from_html_bytes(html_bytes, http_charset=None):
    """HTML bytes -> plain text with blank-line-separated paragraphs, or None for garbage."""
    text = _decode_html(html_bytes, http_charset)
    if _looks_binary(text):
        return None
    parser = _TextExtractor()
    try:
        parser.feed(text)
        parser.close()
    except Exception:  # HTMLParser is forgiving, but one pathological page must not end a crawl
        return None
    unclosed = {n for tag, n in parser.open_skips if tag not in ("script", "style")}  # (code, closed or not)
    text = "".join(t for t, hidden_by in parser.parts if unclosed.issuperset(hidden_by))  # unclosed: shown
    # Leading plain spaces come from collapsed source newlines; leading U+00A0 are real indentation.
    lines = [line.lstrip(" ").rstrip().replace("\xa0", " ") for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


# ---------------------------------------------------------------
# Stage 2: language identification without a downloaded model. We keep one language: a model trained on a mix spends
# capacity on all of them. CCNet keeps pages fastText's lid.176.bin gives > 0.5 confidence; we copy the threshold, not
# the model: the Unicode *script* (Han, Kana, Cyrillic, ...) settles most non-Latin languages outright, and among Latin
# ones ~25 stopwords per language plus letters and suffixes (almost) only one language uses (a hit counts half a
# stopword) go far (fixtures/langid.json). (fastText is better on short or mixed text: plug it into identify_language.)
_LID = _fixture("langid")
_SCRIPTS, _MARKERS = _LID["scripts"], _LID["markers"]
_STOPWORDS = {lang: set(words.split()) for lang, words in _LID["stopwords"].items()}


def identify_language(text):
    """-> (lang_code, confidence in [0, 1]). 'unk' when there is nothing to go on."""
    sample = text[:20000]
    latin = len(re.findall(r"[A-Za-z\u00c0-\u024f]", sample))
    counts = {lang: len(re.findall(pat, sample)) for lang, pat in _SCRIPTS}
    if counts["ja"] and counts["ja"] >= 0.1 * counts["zh"]:  # Japanese mixes kanji with kana
        counts["ja"] += counts.pop("zh")
    lang, n = max(counts.items(), key=lambda kv: kv[1])
    letters = latin + sum(counts.values())
    if letters == 0:
        return "unk", 0.0
    if n > latin:  # a non-Latin script dominates: the script *is* the answer
        if lang == "ru" and re.search(r"[іїєґ]", sample):  # letters Ukrainian has and Russian lacks
            lang = "uk"
        return lang, n / letters
    low = sample.lower()
    words = re.findall(r"[^\W\d_]+'?", low)  # letters only, plus a trailing apostrophe (qu', l')
    scores = {lg: sum(w in sw for w in words) + 0.5 * len(re.findall(_MARKERS[lg], low))
              for lg, sw in _STOPWORDS.items()}
    best, second = sorted(scores, key=scores.get, reverse=True)[:2]
    if scores[best] == 0:
        return "unk", 0.0
    # Confidence = margin over the runner-up (languages share stopwords) x evidence (prose: ~40% stopwords; 10%: full)
    coverage = min(1.0, scores[best] / (0.10 * len(words) + 1))
    return best, round(scores[best] / (scores[best] + scores[second]) * coverage, 4)


# ---------------------------------------------------------------
# Stage 3: PII masking. A model memorizes rare strings it sees verbatim (an e-mail address, a phone number); Dolma masks
# them rather than drop the page. Each mask is re.subn: text -> (masked text, count); no placeholder holds a character
# the patterns need, so masking twice never counts twice.
# An address needs a dotted domain ending in 2+ letters ("user@localhost" stays). The lookbehind starts a match only
# where a run of address characters starts: else a long run with no '@' is rescanned n times, O(n²).
_EMAIL_RE = re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
# US numbers: optional +1, area code in optional parentheses, 3 + 4 digits, split by nothing, '-', '.' or a space (not
# a newline: a column of numbers is no phone). No digits glued on (a long integer); area codes never start with 0 or
# 1, which keeps string.digits ('0123456789') and 1234567890 out.
_PHONE_RE = re.compile(r"(?<![\w.])(?:\+?1[ .\-]?)?(?:\([2-9]\d\d\)|[2-9]\d\d)[ .\-]?\d{3}[ .\-]?\d{4}(?![\w])")
# An octet is 0-255, spelled out (a regex cannot compare numbers); the lookarounds refuse "1.2.3.4.5", "10.0.0.1a".
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IP_RE = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)(?!\w)")
mask_emails = functools.partial(_EMAIL_RE.subn, "|||EMAIL_ADDRESS|||")
mask_phone_numbers = functools.partial(_PHONE_RE.subn, "|||PHONE_NUMBER|||")
mask_ips = functools.partial(_IP_RE.subn, "|||IP_ADDRESS|||")


# ---------------------------------------------------------------
# Stage 4: Gopher quality rules (Rae et al. 2021, App. A): cheap tests that drop non-prose before any model call: too
# short or too long, word salad (mean word length outside 3-10: minified code, URL lists), "read more..." link lists
# (> 30% of lines ending in an ellipsis), tables of numbers or symbols (< 80% of words with a letter). The paper's
# symbol-to-word, bullet-line and stopword rules are left out; each would be one more `if`.
def gopher_failure(text):
    """The name of the first Gopher rule `text` breaks, or None if it passes (CS336's gopher_quality_filter)."""
    words = text.split()
    n = len(words)
    if n < 50:
        return "too_few_words"
    if n > 100_000:
        return "too_many_words"
    if not 3 <= sum(len(w) for w in words) / n <= 10:
        return "mean_word_length"
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and sum(line.rstrip().endswith(("...", "\u2026")) for line in lines) / len(lines) > 0.3:
        return "ellipsis_lines"
    if sum(1 for w in words if re.search(r"[^\W\d_]", w)) / n < 0.8:  # [^\W\d_] = one letter
        return "non_alpha_words"
    return None


# ---------------------------------------------------------------
# Stage 5: fastText-style classifiers (Joulin et al. 2016). "Does this read like a reference page / an insult / porn
# spam" is easier to show by example than to write as a rule. fastText hashes every word and word bigram into one of
# `num_buckets` rows of an embedding table (no vocabulary, fixed memory; bigrams give a little word order), averages the
# rows (EmbeddingBag) and puts one linear layer on top: it trains in seconds and is hard to beat (Dolma and DCLM filter
# with it). The defaults train at build time on a few hundred lines of fixtures/classifier_train.tsv (held-out scores:
# README, `eval-classifiers`) and see only words, no context: for real filtering, `train-classifier` on your own data.
# Toxic and NSFW also get C4's rule (Raffel et al. 2020): drop a page holding a listed bad word. Our lists
# (fixtures/bad_words.json) hold only words hardly ever neutral ("idiot" and "nude" are the model's call: "the idiot
# light", "a nude statue"). Rule and model first undo spellings that dodge a list: f*ck, sh1t, b!tch.
_TOKEN = re.compile(r"[\w*@$!#.\-]+")
_LEET = str.maketrans("013457@$!", "oieastasi")  # digits and symbols that stand in for letters


def deobfuscate(text):
    """Lowercase words with their disguises undone: digits/symbols read as letters, inner dots and dashes dropped,
    repeated letters collapsed (so 'stuuupid' == 'stupid', and 'asshole' is 'ashole')."""
    out = []
    for tok in _TOKEN.findall(text.lower()):
        if not tok.isalpha():  # (most words are: they only need the repeats collapsed, below)
            tok = tok.strip(".-!*#")  # punctuation, *emphasis*, #tags; inside a word each is a disguise
            if any(c.isalpha() for c in tok):  # (a plain number stays a number)
                tok = re.sub(r"(\w)\1+", r"\1", re.sub(r"[.\-](?=\w)", "", tok.translate(_LEET)))
                # '*' and '#' stand for letters: f*ck -> fuck if that spelling matches a listed word ("s*t" is code)
                if ("*" in tok or "#" in tok) and len(tok) >= 4 and sum(c.isalpha() for c in tok) >= 2:
                    pattern = re.compile("".join("[a-z]*" if c in "*#" else re.escape(c) for c in tok))
                    tok = next((w for w in sorted(_LISTED) if pattern.fullmatch(w)), tok)
        if tok:
            out.append(tok)
    return re.sub(r"(\w)\1+", r"\1", " ".join(out))


_BAD_WORDS = {kind: {deobfuscate(w) for w in words.split()} for kind, words in _fixture("bad_words").items()}
_LISTED = set().union(*_BAD_WORDS.values())  # what a wildcard spelling may stand for
_CLASSIFIERS = {}  # kind -> (model, labels, num_buckets); trained/loaded once per process
TRAIN_SET, HELDOUT_SET = (os.path.join(FIXTURES, f"classifier_{s}.tsv") for s in ("train", "heldout"))


def _hashed_features(text, num_buckets, max_words=2000):
    """Word unigrams + bigrams -> bucket ids (crc32 is stable across runs, unlike hash())."""
    words = re.findall(r"\w+", text.lower())[:max_words]
    grams = words + [a + " " + b for a, b in zip(words, words[1:])]
    return [zlib.crc32(g.encode()) % num_buckets for g in grams] or [0]  # never empty: torch.tensor([]) is float


def _fasttext_model(num_buckets, dim, num_labels):
    import torch
    model = torch.nn.Sequential(torch.nn.EmbeddingBag(num_buckets, dim, mode="mean"), torch.nn.Linear(dim, num_labels))
    torch.nn.init.zeros_(model[0].weight)  # an unseen bucket adds nothing, not noise (still trained via the linear)
    return model


def _logits(model, feats):
    """(B, num_labels) logits of B feature lists (EmbeddingBag takes the ragged batch flat, plus row offsets)."""
    import torch
    offsets = torch.tensor([0] + [len(x) for x in feats[:-1]]).cumsum(0)
    return model[1](model[0](torch.tensor([i for x in feats for i in x]), offsets))


def train_classifier(texts, labels, label_names, num_buckets=2**14, dim=16, epochs=60, lr=0.2, seed=0, batch_size=1024):
    """Train a fastText-style classifier; returns a plain dict that torch.save can store."""
    import torch
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: on a busy 2-core box extra threads cost 10x more than they save
    model = _fasttext_model(num_buckets, dim, len(label_names))
    y = torch.tensor(labels)
    feats = [_hashed_features(t, num_buckets) for t in texts]  # hash once, not once per epoch
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    try:
        for _ in range(epochs):  # minibatches (the embedded sets are a single full batch)
            for idx in torch.randperm(len(texts)).split(batch_size):
                loss = torch.nn.functional.cross_entropy(_logits(model, [feats[i] for i in idx.tolist()]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return {"state_dict": model.state_dict(), "labels": list(label_names), "num_buckets": num_buckets, "dim": dim}


def read_labeled(path):
    """A "label<TAB>text" file -> {label: [texts]} (lines starting with # are comments)."""
    by = {}
    try:
        with open(path, encoding="utf-8") as f:
            for label, text in (line.rstrip("\n").split("\t", 1) for line in f if line.strip() and line[0] != "#"):
                by.setdefault(label, []).append(text)
    except OSError as e:
        raise SystemExit(f"error: cannot read labeled set {path} ({e}); pass --*-model or --no-* to do without it")
    return by


def set_classifier(kind, path=None):
    """Load `path` (a train-classifier output) for `kind`, or train the default on TRAIN_SET: quality is low vs.
    high, toxic (nsfw) is that label vs. every other text, which counts as clean."""
    import torch
    if path:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
        except (OSError, RuntimeError) as e:
            raise SystemExit(f"error: cannot load classifier {path}: {e}")
    else:
        by = read_labeled(TRAIN_SET)
        names = ["low", "high"] if kind == "quality" else ["clean", kind]
        sets = [by["low"], by["high"]] if kind == "quality" else \
            [[t for label in ("high", "clean", "toxic", "nsfw") if label != kind for t in by[label]], by[kind]]
        texts = [deobfuscate(t) if kind in _BAD_WORDS else t for s in sets for t in s]  # as classify_batch sees them
        blob = train_classifier(texts, [i for i, s in enumerate(sets) for _ in s], names)
    model = _fasttext_model(blob["num_buckets"], blob["dim"], len(blob["labels"]))
    model.load_state_dict(blob["state_dict"])
    _CLASSIFIERS[kind] = (model.eval(), blob["labels"], blob["num_buckets"])


def classify_batch(kind, texts):
    """-> (label, probability) per text (CS336's classify_nsfw(t) is classify_batch("nsfw", [t])[0]); see Stage 5."""
    import torch
    if kind not in _CLASSIFIERS:
        set_classifier(kind)
    model, names, nb = _CLASSIFIERS[kind]
    texts = [deobfuscate(t) for t in texts] if kind in _BAD_WORDS else texts
    with torch.no_grad():
        probs = torch.softmax(_logits(model, [_hashed_features(t, nb) for t in texts]), dim=-1)  # (N, num_labels)
    p, i = probs.max(dim=-1)
    out = [(names[j], round(float(q), 4)) for j, q in zip(i.tolist(), p.tolist())]
    if kind in _BAD_WORDS:
        out = [(kind, 1.0) if _BAD_WORDS[kind].intersection(t.split()) else o for t, o in zip(texts, out)]
    return out


def evaluate_classifiers(path=HELDOUT_SET, threshold=0.9):
    """Precision and recall of the toxic and NSFW filters (as the pipeline applies them) on a labeled set."""
    by = read_labeled(path)
    texts = [t for rows in by.values() for t in rows]
    gold = [label for label, rows in by.items() for _ in rows]
    report = {}
    for kind in ("toxic", "nsfw"):
        flagged = [lbl == kind and p >= threshold for lbl, p in classify_batch(kind, texts)]
        tp = sum(f and g == kind for f, g in zip(flagged, gold))
        report[kind] = {"precision": round(tp / max(1, sum(flagged)), 3), "recall": round(tp / gold.count(kind), 3),
                        "positives": gold.count(kind), "negatives": len(gold) - gold.count(kind)}
    return report


# ---------------------------------------------------------------
# Stage 6: exact line dedup. A line found in many documents is boilerplate (menus, footers, pydoc's "Methods defined
# here:"): removing the line, not the page, keeps the prose around it (CCNet does this with paragraphs). Memory grows
# with the *distinct* lines (at scale, an 8-byte digest per line: n lines collide with probability ~ n²/2^65).
def exact_line_dedup_docs(texts, min_docs=2):
    """Drop every line found in >= min_docs documents; -> (texts, lines removed). Documents, not copies: boilerplate
    repeats *across* pages (the CLI default is 10: with 2, every short code line goes). Blank lines stay."""
    df = Counter(h for t in texts for h in {hash(line) for line in t.split("\n") if line.strip()})  # (one process)
    out, removed = [], 0
    for t in texts:
        lines = [line for line in t.split("\n") if not line.strip() or df[hash(line)] < min_docs]
        removed += t.count("\n") + 1 - len(lines)
        out.append(re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n"))
    return out, removed


# ---------------------------------------------------------------
# Stage 7: MinHash + LSH near-duplicate detection (Broder 1997; MMDS ch. 3). Crawls are full of pages that are the same
# text with a different header, date or ad; models trained on repeats memorize them and generalize worse (Lee
# et al. 2021). Exact hashing misses a one-word edit, so we measure overlap: Jaccard(A, B) = |A ∩ B| / |A ∪ B| over the
# sets of word 5-grams ("shingles"). For a random hash h, P[min h(A) == min h(B)] = Jaccard(A, B) (the minimum of A ∪ B
# is equally likely to be any element; both minima agree exactly when it lies in A ∩ B), so the agreement rate of K
# hashes' minima estimates Jaccard.
# All pairs cost O(N²). LSH cuts the signature into b bands of r rows and compares only documents that agree on a whole
# band: a pair at similarity s is a candidate with P = 1 - (1 - s^r)^b, an S-curve with its knee at s ≈ (1/b)^(1/r). Our
# b = 16, r = 8 (K = 128) puts it at 0.71, below the 0.8 threshold on purpose: P = 0.947 at s = 0.8, 0.9999 at 0.9,
# 0.06 at 0.5 (FineWeb: 14 bands of 8). The estimate's std is sqrt(J(1-J)/K) = 0.035 at J = 0.8, so each candidate pair
# is verified by the exact Jaccard of its shingle sets. Near-duplication is not transitive (A ~ M ~ B, A !~ B), but we
# want one survivor per group: connected components, by union-find rooted at the earliest document, the one we keep.
_P = np.uint64(0x100000001B3)  # odd multiplier of the polynomial n-gram hash (the FNV-1 prime)
_COMBINING = regex.compile(r"\p{Mn}")  # every nonspacing mark: accents, but also e.g. the kana dakuten


def _fold(text):
    """Lowercase, then NFD splits "é" into "e" + U+0301 and we drop the mark: café == cafe."""
    return text.lower() if text.isascii() else _COMBINING.sub("", unicodedata.normalize("NFD", text.lower()))


def normalize_for_dedup(text):
    """Lowercase, drop accents, punctuation -> space, collapse whitespace (the pipeline: on bytes, _TABLE)."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", _fold(text)).split())


def shingles(text, ngrams=5):
    """Word n-grams of normalize_for_dedup(text); under n words, one shingle (short copies still match); empty, none."""
    w = normalize_for_dedup(text).split()
    return {" ".join(w[i:i + ngrams]) for i in range(max(1, len(w) - ngrams + 1))} if w else set()


def minhash_params(num_hashes, seed=0):
    """(a, b) for num_hashes bijections h(x) = (a·x + b) mod 2^32 (a odd: invertible, so no two shingles collide)."""
    a, b = np.random.default_rng(seed).integers(0, 2**32, size=(2, num_hashes), dtype=np.uint32)
    return a | np.uint32(1), b


def minhash_signatures(shingle_list, a, b, chunk=4096):
    """list of (S_i,) uint64 shingle hashes -> (N, K) uint32 signatures, min_x h_k(x). A cheap hash family is enough:
    the inputs are well-mixed 64-bit hashes, so any bijection h_k relabels them at random and keeps P[argmin over A ∪ B
    lies in A ∩ B] = Jaccard(A, B). 32-bit math on x's top 32 bits halves the memory traffic (the textbook (a·x + b) mod
    (2^61 - 1) needs 128-bit products). Shingles laid end to end are cut into (K, chunk) tiles that stay in cache;
    np.minimum.reduceat takes per-document minima in a tile (a document split across tiles: the min of both)."""
    K, N = len(a), len(shingle_list)
    sigs = np.full((N, K), 2**32 - 1, dtype=np.uint32)  # empty document: all max
    lens = np.array([len(s) for s in shingle_list], dtype=np.int64)
    if lens.sum() == 0:
        return sigs
    xs = (np.concatenate(shingle_list) >> np.uint64(32)).astype(np.uint32)  # (S_total,)
    doc = np.repeat(np.arange(N), lens)  # (S_total,) which document each shingle belongs to
    buf = np.empty((K, chunk), dtype=np.uint32)
    for start in range(0, len(xs), chunk):
        x, d = xs[start:start + chunk], doc[start:start + chunk]
        h = buf[:, :len(x)]
        np.multiply(a[:, None], x[None, :], out=h)  # (K, chunk), wraps mod 2^32
        h += b[:, None]
        seg = np.flatnonzero(np.concatenate([[True], d[1:] != d[:-1]]))  # first shingle of each doc
        ids = d[seg]  # distinct within a tile, so plain fancy indexing is safe
        sigs[ids] = np.minimum(sigs[ids], np.minimum.reduceat(h, seg, axis=1).T)
    return sigs


def jaccard(x, y):
    """Exact Jaccard of two sorted unique hash arrays."""
    if len(x) == 0 and len(y) == 0:
        return 1.0
    if len(x) < len(y):
        x, y = y, x
    at = np.minimum(np.searchsorted(x, y), len(x) - 1)  # binary-search the smaller set in the larger
    inter = int(np.count_nonzero(x[at] == y))
    return inter / (len(x) + len(y) - inter)  # |A ∩ B| / (|A| + |B| - |A ∩ B|)


def _find(parent, i):
    """Union-find root of i, with path halving: every lookup shortens the path it walks."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def minhash_dedup_docs(texts, num_hashes=128, num_bands=16, ngrams=5, jaccard_threshold=0.8, seed=0):
    """-> (keep: list[bool], clusters: list[list[int]] with >1 member). First document of a cluster is kept."""
    if num_hashes % num_bands:
        raise SystemExit(f"error: num_hashes {num_hashes} is not divisible by num_bands {num_bands}")
    a, b = minhash_params(num_hashes, seed)
    hashes = shingle_hashes_batch(texts, ngrams)
    sigs = minhash_signatures(hashes, a, b).astype(np.uint64)  # (N, K)
    r, parent, cache = num_hashes // num_bands, list(range(len(texts))), {}
    checked = set()  # a pair that shares several bands is verified once
    for band in range(num_bands):
        key = np.zeros(len(texts), dtype=np.uint64)
        for c in range(band * r, (band + 1) * r):  # the band's r values -> one 64-bit bucket key
            key = key * _P + sigs[:, c]  # (a key collision only adds a candidate; the exact check decides)
        order = np.argsort(key, kind="stable")  # equal keys become neighbours, in document order
        ks = key[order]
        first = np.flatnonzero(np.concatenate([[True], ks[1:] != ks[:-1]]))  # where each bucket starts
        size = np.diff(np.concatenate([first, [len(ks)]]))
        for s, m in zip(first[size > 1], size[size > 1]):  # singleton buckets never reach Python
            groups = {}  # cluster root -> members of this bucket in that cluster
            for j in map(int, order[s:s + m]):
                rj = _find(parent, j)
                for g in list(groups):  # compare j with the other clusters present in the bucket
                    if g == rj or g not in groups:  # (a merge below may have folded g into rj)
                        continue
                    for i in groups[g]:
                        if (i, j) in checked:
                            continue
                        checked.add((i, j))
                        for k in {i, j} - cache.keys():  # sorted unique shingles: only candidates pay
                            cache[k] = np.unique(hashes[k])
                        if jaccard(cache[i], cache[j]) >= jaccard_threshold:
                            root, other = min(g, rj), max(g, rj)
                            parent[other] = root  # the root is always the earliest document
                            groups[root] = groups.pop(g, []) + groups.pop(rj, [])
                            rj = root
                            break  # one verified edge joins the clusters: the rest of g is moot
                # m copies of one page cost O(m) per band, not O(m²): one cluster, nothing to compare
                groups.setdefault(rj, []).append(j)
    groups = {}
    for i in range(len(texts)):
        groups.setdefault(_find(parent, i), []).append(i)
    return [_find(parent, i) == i for i in range(len(texts))], [g for g in groups.values() if len(g) > 1]


# ---------------------------------------------------------------
# The pipeline: per-document stages in a process pool over the stream, then whole-corpus stages and classifiers here.
STAGES = ["source", "extract", "lang", "pii", "minhash", "line_dedup", "gopher", "quality", "toxic", "nsfw"]
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a JSON "\ud800" escape decodes to one; UTF-8 cannot encode it
_SPECIAL_TOKEN = re.compile(r"<\|([\w\-]+)\|>")  # <|endoftext|>, <|user|>, <|assistant|>, <|im_start|>, ...
# <|user|> -> <user>, text -> (text, count): a quoted special token must not become one (a fake end or turn).
neutralize_special_tokens = functools.partial(_SPECIAL_TOKEN.subn, r"<\1>")


def process_document(cfg, item):
    """(doc_id, kind, payload) -> (doc_id, text | None, drop_reason | None, counts, lang, n_bytes) under cfg; counts:
    PII masked and repairs made. Language ID runs on the extracted text (tags are English), before masking (no work on
    pages we drop); masking runs before dedup: copies differing only in an address become duplicates."""
    doc_id, kind, payload, http_charset = (*item, None)[:4]  # (WARC responses add their HTTP charset)
    if kind == "bad":
        return doc_id, None, f"source:{payload}", {}, None, 0
    counts = {}
    if kind == "text":
        payload, counts["lone_surrogate"] = _LONE_SURROGATE.subn("\ufffd", payload)
    n_bytes = len(payload) if kind == "html" else len(payload.encode("utf-8"))
    text = extract_text_from_html_bytes(payload, http_charset) if kind == "html" else \
        (None if _looks_binary(payload) else payload)
    if text is None:
        return doc_id, None, "extract:undecodable", {}, None, n_bytes
    text, counts["special_token"] = neutralize_special_tokens(text.strip())
    if not text:
        return doc_id, None, "extract:empty", {}, None, n_bytes
    lang = None
    if cfg.get("lang"):
        lang, conf = identify_language(text)
        if lang != cfg["lang"]:
            return doc_id, None, "lang:unknown" if lang == "unk" else "lang:other_language", {}, lang, n_bytes
        if conf < cfg["min_lang_confidence"]:
            return doc_id, None, "lang:low_confidence", {}, lang, n_bytes
    if cfg.get("pii"):
        for key, fn in (("email", mask_emails), ("phone", mask_phone_numbers), ("ip", mask_ips)):
            text, counts[key] = fn(text)
    return doc_id, text, None, counts, lang, n_bytes


def _keep_only(stats, ids, texts, reasons, k=5):
    """One drop reason (or None = keep) per document -> survivors (ids, texts); counts drops, keeps k example ids."""
    for d, r in zip(ids, reasons):
        if r:
            stats["dropped_by_reason"][r] += 1
            if stats["dropped_by_reason"][r] <= k:  # (the first k examples of each reason)
                stats["dropped_examples"].setdefault(r, []).append(d)
    return [d for d, r in zip(ids, reasons) if not r], [t for t, r in zip(texts, reasons) if not r]


def document_stages(items, args, workers, stats):
    """Stages 1-3 (extract, language, PII) over the stream, in a pool of `workers` processes if > 1."""
    cfg = {"lang": None if args.no_lang else args.lang, "min_lang_confidence": args.min_lang_confidence,
           "pii": not args.no_pii}
    process = functools.partial(process_document, cfg)  # (the settings travel with each task: a few bytes)
    # spawn, not fork: a forked child inherits the parent's threads' locks (torch, if loaded)
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    rows, items, t0 = [], iter(items), time.time()  # (doc_id, text, drop reason) per document
    try:
        # Windows of raw documents in input order: memory stays bounded (pool.imap would read all input at once).
        while chunk := list(itertools.islice(items, 512)):
            for doc_id, text, reason, counts, lang, n_bytes in (pool.map(process, chunk, chunksize=8) if pool else
                                                               map(process, chunk)):
                stats["docs_in"] += 1
                stats["bytes_in"] += n_bytes
                for key, n in counts.items():
                    stats["pii" if key in ("email", "phone", "ip") else "repairs"][key] += n
                if lang:
                    stats["langs"][lang] += 1
                rows.append((doc_id, text, reason))
            if args.input or args.url:  # (the default corpus shows its own render progress)
                print(f"\r  extract+lang+pii: {stats['docs_in']} docs | {stats['docs_in'] / (time.time() - t0):.0f}/s",
                      end="", file=sys.stderr, flush=True)
    finally:
        if pool:
            pool.close()
            pool.join()
    stats["seconds_extract"] = round(time.time() - t0, 2)
    return _keep_only(stats, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def corpus_stages(ids, texts, args, stats):
    """Stages that need every document at once, then the classifiers: -> the survivors (ids, texts)."""
    # Near-duplicates first: line dedup would strip the shared lines of near-identical pages and leave husks.
    if not args.no_dedup and texts:
        t1 = time.time()
        keep, clusters = minhash_dedup_docs(texts, args.num_hashes, args.num_bands, args.ngrams, args.jaccard_threshold)
        stats["minhash_clusters"] = len(clusters)
        stats["minhash_example_clusters"] = [[ids[i] for i in c[:4]] for c in clusters[:5]]
        stats["seconds_minhash"] = round(time.time() - t1, 2)
        ids, texts = _keep_only(stats, ids, texts, [None if k else "minhash:near_duplicate" for k in keep])
    if not args.no_line_dedup:
        texts, stats["lines_removed_by_line_dedup"] = exact_line_dedup_docs(texts, args.line_dedup_min_docs)
        ids, texts = _keep_only(stats, ids, texts, [None if t.strip() else "line_dedup:empty" for t in texts])
    if not args.no_gopher:
        ids, texts = _keep_only(stats, ids, texts, [f and f"gopher:{f}" for f in map(gopher_failure, texts)])
    # The models go last: they only score what the cheap rules kept. (kind, label that drops, flags)
    for kind, bad, off, path, thr in (("quality", "low", args.no_quality, args.quality_model, args.quality_threshold),
                                      ("toxic", "toxic", args.no_toxic, args.toxic_model, args.toxic_threshold),
                                      ("nsfw", "nsfw", args.no_nsfw, args.nsfw_model, args.nsfw_threshold)):
        if not off and texts:
            set_classifier(kind, path)
            ids, texts = _keep_only(stats, ids, texts, [f"{kind}:{lbl}" if lbl == bad and p >= thr else None
                                                        for lbl, p in classify_batch(kind, texts)])
    return ids, texts


def write_splits(out_dir, ids, texts, val_fraction, tokenizer, workers, stats):
    """train.txt / val.txt (+ .bin with a tokenizer), split by id hash (stable as docs are added; val never empty)."""
    in_val = [int(hashlib.sha1(d.encode()).hexdigest()[:8], 16) % 10000 < val_fraction * 10000 for d in ids]
    if ids and not any(in_val):
        in_val[min(range(len(ids)), key=lambda i: hashlib.sha1(ids[i].encode()).hexdigest())] = True
    os.makedirs(out_dir, exist_ok=True)
    for split, want in (("train", False), ("val", True)):
        docs = [t for t, v in zip(texts, in_val) if v == want]
        path = os.path.join(out_dir, f"{split}.txt")
        with atomic_write(path) as f:
            f.write("".join(t + "\n" + EOT for t in docs))
        stats[f"{split}_docs"], stats[f"{split}_bytes"] = len(docs), os.path.getsize(path)
        if tokenizer and not docs:  # bpe.encode_file refuses an empty input: write an empty file
            open(os.path.join(out_dir, f"{split}.bin"), "wb").close()
            stats[f"{split}_tokens"] = 0
        elif tokenizer:
            stats[f"{split}_tokens"] = int(bpe.encode_file(tokenizer, path, path[:-4] + ".bin", workers=workers))


def build_corpus(items, args, doc_workers=None):
    """Run the whole pipeline on a stream of (doc_id, kind, payload); write files; print the funnel; return stats."""
    t_start = time.time()
    stats = {"docs_in": 0, "kept": 0, "dropped_by_reason": Counter(), "bytes_in": 0, "pii": Counter(),
             "repairs": Counter(), "langs": Counter(), "dropped_examples": {}}
    ids, texts = document_stages(items, args, doc_workers or args.workers, stats)  # extract, language, PII
    ids, texts = corpus_stages(ids, texts, args, stats)  # MinHash, line dedup, Gopher, classifiers
    stats["kept"] = len(texts)
    drop = stats["dropped_by_reason"]
    assert stats["kept"] + sum(drop.values()) == stats["docs_in"], "a document went missing"
    out_dir = args.out or os.path.join("data", args.name)
    write_splits(out_dir, ids, texts, args.val_fraction, args.tokenizer, args.workers, stats)
    # The funnel, as a table: documents left after each stage, and why the rest were dropped.
    print(f"\n{'stage':<14}{'docs left':>10}   dropped (reason: docs)\n{'input':<14}{stats['docs_in']:>10}")
    alive, stats["docs_after_stage"] = stats["docs_in"], {}
    for i, stage in enumerate(STAGES):
        why = {r.split(":", 1)[1]: n for r, n in sorted(drop.items()) if r.split(":")[0] == stage}
        alive -= sum(why.values())
        stats["docs_after_stage"][f"{i}_{stage}"] = alive
        print(f"{stage:<14}{alive:>10}   " + ", ".join(f"{r}: {n}" for r, n in why.items()))
    stats["seconds_total"] = round(time.time() - t_start, 2)
    with atomic_write(os.path.join(out_dir, "stats.json")) as f:
        f.write(json.dumps(stats, indent=1, sort_keys=True))
    print(f"PII masked: {dict(stats['pii'])}; lines removed by line dedup: "
          f"{stats.get('lines_removed_by_line_dedup', 0)}")
    print(f"train: {stats['train_docs']} docs, {stats['train_bytes'] / 1e6:.2f} MB | val: {stats['val_docs']} docs, "
          f"{stats['val_bytes'] / 1e6:.2f} MB | {stats['bytes_in'] / 1e6:.1f} MB in | {stats['seconds_total']:.1f} s"
          f" -> {out_dir}")
    return stats


# ---------------------------------------------------------------
# Making it fast: the shingle hashes. Hashing strings one by one makes naive dedup slow. Here nothing loops in Python
# per document, word, shingle or hash: a batch is normalized by one bytes.translate and one regex, and word and n-gram
# hashes are whole-batch numpy operations (uint64 wraps mod 2^64). README: vs datasketch (`python bench.py data`).
def _mix64(h):
    """splitmix64's finalizer (Steele, Lea & Flood 2014; Stafford's "Mix13"): each input bit flips each output bit
    with probability ~1/2. The hashes below are linear, so without it similar inputs give related minima."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


# normalize_for_dedup on bytes, in C: a 256-byte table lowercases ASCII letters, keeps digits and non-ASCII bytes,
# and maps the rest to a space. Non-ASCII text first loses accents and non-word symbols (a regex).
_TABLE = bytes([c | 0x20 if chr(c).isalpha() else c if chr(c).isdigit() else 32 for c in range(128)]
               + list(range(128, 256)))
_NON_ASCII_SYMBOL = re.compile(r"[^\x00-\x7f\w]")
_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)  # low k bytes of a word


def _ascii_or_stripped(text):  # (ASCII goes straight to the table, which also lowercases)
    return text.encode() if text.isascii() else _NON_ASCII_SYMBOL.sub(" ", _fold(text)).encode()


def shingle_hashes_batch(texts, ngrams, batch_docs=2000):
    """64-bit hashes of every document's word n-grams, repeats included (a repeat cannot change a minimum; only
    candidate pairs pay for np.unique). A constant number of numpy calls per batch of documents."""
    if not 0 < len(texts) <= batch_docs:  # one batch at a time (and no batch at all for no texts)
        return [x for i in range(0, len(texts), batch_docs)
                for x in shingle_hashes_batch(texts[i:i + batch_docs], ngrams, batch_docs)]
    # Normalize the whole batch in one pass, documents joined by "\xff" words (a byte UTF-8 never uses).
    b = np.frombuffer(b" \xff ".join(map(_ascii_or_stripped, texts)).translate(_TABLE), dtype=np.uint8)
    keep = b != 32
    keep[1:] |= b[:-1] != 32  # a space survives only right after a non-space: runs collapse to one
    b = b[keep]
    n = len(b) - int(len(b) > 0 and b[-1] == 32)  # (and not at the very end)
    b = np.concatenate([b[:n], np.zeros(40, dtype=np.uint8)])  # padding: 8-byte loads may run past the end
    starts = np.concatenate([[0], np.flatnonzero(b[:n] == 32) + 1])  # (W,) first byte of each word
    lengths = np.diff(np.concatenate([starts, [n + 1]])) - 1  # (W,)
    # Word hash: little-endian 8-byte loads mixed in turn: length + 1st piece, the 2nd-4th pieces of words that long,
    # the last 8 bytes of longer ones (told apart by length, head and tail only: a deliberate shortcut).
    u64 = np.ndarray((len(b) - 7,), dtype="<u8", buffer=b, strides=(1,))  # unaligned: bytes i..i+7
    wh = _mix64(lengths.astype(np.uint64) ^ (u64[starts] & _MASKS[np.minimum(lengths, 8)]))  # (W,)
    for k in (1, 2, 3):
        w = np.flatnonzero(lengths > 8 * k)  # English: ~15% of words are longer than 8 bytes
        wh[w] = _mix64(wh[w] ^ (u64[starts[w] + 8 * k] & _MASKS[np.minimum(lengths[w] - 8 * k, 8)]))
    w = np.flatnonzero(lengths > 32)
    wh[w] = _mix64(wh[w] ^ u64[starts[w] + lengths[w] - 8])
    # Cut the word stream at the separators: document d owns words ws[d] .. ws[d] + nw[d] - 1.
    is_sep = (lengths == 1) & (b[starts] == 0xFF)
    nw = np.diff(np.concatenate([[-1], np.flatnonzero(is_sep), [len(starts) if n else 0]])) - 1
    wh = wh[~is_sep] if n else np.zeros(0, dtype=np.uint64)
    W, ws = len(wh), np.cumsum(nw) - nw
    # n-gram hash = w_0·P^(n-1) + w_1·P^(n-2) + ... + w_(n-1) (mod 2^64), grown one word at a time at every position at
    # once (Horner); windows that run into the next document are masked out. A document shorter than n words is one
    # shingle: we save its value while the polynomial has exactly as many words.
    h, inside = wh.copy(), np.arange(W) + ngrams - 1 < np.repeat(ws + nw, nw)  # (W,) window fits
    short = []
    for j in range(1, ngrams):
        where = ws[nw == j]
        short.append((where, h[where]))  # h holds j-word polynomials here
        h[:max(W - j, 0)] = h[:max(W - j, 0)] * _P + wh[j:]
    for where, val in short:
        h[where], inside[where] = val, True
    counts = np.where(nw >= ngrams, nw - ngrams + 1, np.minimum(nw, 1))  # shingles per document
    return np.split(_mix64(h[inside]), np.cumsum(counts)[:-1])


# ---------------------------------------------------------------
# CLI
def classifier_main(cmd, argv):
    """train-classifier: a fastText-style model from labeled .jsonl; eval-classifiers: the default filters, held out."""
    p = argparse.ArgumentParser(prog=f"data.py {cmd}", description=classifier_main.__doc__)
    if cmd == "eval-classifiers":
        p.add_argument("--heldout", default=HELDOUT_SET, help="label<TAB>text file (labels clean, toxic, nsfw)")
        p.add_argument("--threshold", type=float, default=0.9, help="drop when P(bad) >= this, as --toxic-threshold")
        a = p.parse_args(argv)
        return print(json.dumps(evaluate_classifiers(a.heldout, a.threshold), indent=1))
    p.add_argument("--input", required=True, help="jsonl with one {\"text\": ..., \"label\": ...} per line")
    p.add_argument("--out", required=True, help="output .pt file (plain tensors; load with weights_only=True)")
    p.add_argument("--epochs", type=int, default=60, help="training epochs (minibatches of 1024 examples)")
    p.add_argument("--dim", type=int, default=16, help="embedding dimension")
    p.add_argument("--num-buckets", type=int, default=2**18, help="hash buckets for word + bigram features")
    a = p.parse_args(argv)
    try:
        rows = [json.loads(line) for line in open(a.input, encoding="utf-8") if line.strip()]
        texts, raw = [str(r["text"]) for r in rows], [str(r["label"]) for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: cannot read labeled examples from {a.input}: {e}")
    names = sorted(set(raw))
    if len(names) < 2:
        raise SystemExit("error: need at least two distinct labels")
    blob = train_classifier(texts, [names.index(r) for r in raw], names, num_buckets=a.num_buckets, dim=a.dim,
                            epochs=a.epochs)
    import torch
    with atomic_write(a.out, "wb") as f:
        torch.save(blob, f)
    set_classifier("_", a.out)  # reload what we wrote: the accuracy is that of the saved file
    acc = sum(lbl == raw[i] for i, (lbl, _) in enumerate(classify_batch("_", texts))) / len(texts)
    print(f"trained on {len(texts)} examples, labels {names}, train accuracy {acc:.3f} -> {a.out}")


def build_parser():
    p = argparse.ArgumentParser(description="Build a filtered, deduplicated text corpus (default: the stdlib docs).")
    # sources
    p.add_argument("--input", nargs="+", default=[], help="WARC/WET, .jsonl ('text'), .html, .txt files or dirs")
    p.add_argument("--url", action="append", default=[], help="remote txt/jsonl/warc file (downloaded once, resumable)")
    p.add_argument("--modules", default=None, help="comma-separated stdlib modules for the default corpus (all)")
    p.add_argument("--max-submodules", type=int, default=300, help="submodules rendered per stdlib package")
    p.add_argument("--no-topics", action="store_true", help="default corpus: skip the pydoc_data topics")
    p.add_argument("--render-timeout", type=int, default=20, help="seconds allowed to import+render one module")
    # output
    p.add_argument("--name", default="pydocs", help="corpus name: writes data/NAME/{train,val}.txt, stats.json")
    p.add_argument("--out", default=None, help="output directory (default: data/NAME)")
    p.add_argument("--cache-dir", default=os.path.join("data", "cache"), help="where --url downloads are kept")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents (by id hash) in val.txt")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--tokenizer", default=None, help="bpe.py tokenizer dir: also write train.bin / val.bin")
    # stages 2-4: language, PII, line dedup, Gopher
    p.add_argument("--no-lang", action="store_true", help="skip language identification")
    p.add_argument("--lang", default="en", help="language to keep")
    p.add_argument("--min-lang-confidence", type=float, default=0.5, help="drop documents below this LID confidence")
    p.add_argument("--no-pii", action="store_true", help="skip e-mail / phone / IP masking")
    p.add_argument("--no-line-dedup", action="store_true", help="skip exact line dedup")
    p.add_argument("--line-dedup-min-docs", type=int, default=10, help="a line in >= this many docs is boilerplate")
    p.add_argument("--no-gopher", action="store_true", help="skip the Gopher quality rules")
    # stage 5: classifiers
    p.add_argument("--no-quality", action="store_true", help="skip the quality classifier")
    p.add_argument("--quality-model", default=None, help="quality classifier .pt (default: train on fixtures/)")
    p.add_argument("--quality-threshold", type=float, default=0.9, help="drop when P(low) >= this")
    p.add_argument("--no-toxic", action="store_true", help="skip the toxic classifier")
    p.add_argument("--toxic-model", default=None, help="toxic classifier .pt (default: train on fixtures/)")
    p.add_argument("--toxic-threshold", type=float, default=0.9, help="drop when P(toxic) >= this")
    p.add_argument("--no-nsfw", action="store_true", help="skip the NSFW classifier")
    p.add_argument("--nsfw-model", default=None, help="NSFW classifier .pt (default: train on fixtures/)")
    p.add_argument("--nsfw-threshold", type=float, default=0.9, help="drop when P(nsfw) >= this")
    # stage 7: MinHash
    p.add_argument("--no-dedup", action="store_true", help="skip MinHash near-duplicate removal")
    p.add_argument("--num-hashes", type=int, default=128, help="MinHash signature length")
    p.add_argument("--num-bands", type=int, default=16, help="LSH bands (num_hashes must be divisible)")
    p.add_argument("--ngrams", type=int, default=5, help="word n-gram size of the shingles")
    p.add_argument("--jaccard-threshold", type=float, default=0.8, help="near-duplicate if Jaccard >= this")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["train-classifier"], ["eval-classifiers"]):
        return classifier_main(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    args.workers = max(1, args.workers)
    if missing := [path for path in args.input if not os.path.exists(path)]:
        raise SystemExit(f"error: input {missing[0]} does not exist")
    paths = list(args.input) + [download(u, args.cache_dir) for u in args.url]
    if paths:
        return build_corpus((item for path in paths for item in iter_source(path)), args)
    modules = args.modules.split(",") if args.modules else stdlib_modules(args.max_submodules)
    docs = iter_stdlib_docs(modules, args.workers, args.render_timeout)
    items = docs if not args.no_topics else (d for d in docs if not d[0].startswith("topic:"))
    # Rendering is the costly part and has the workers: processing pages here beats a second pool on the same cores.
    return build_corpus(items, args, doc_workers=1)


# ---------------------------------------------------------------
# Appendix A: sources -> a stream of (doc_id, kind, payload), kind "html" (bytes; WARC responses add their HTTP
# charset), "text" or "bad" (payload = the reason): a billion-page crawl has truncated files; each costs a record.
def iter_warc(path):
    """Records of a WARC (raw HTTP responses) or WET (extracted text) file, .gz or plain. A record (ISO 28500) is a
    "WARC/1.0" line, "Key: value" headers, a blank line, Content-Length bytes of body. Common Crawl gzips each record
    separately, so everything before a cut still decompresses."""
    n, resync = 0, False
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            for line in iter(f.readline, b""):
                if not line.startswith(b"WARC/"):  # the blank lines between records, or garbage
                    if line.strip() and not resync:  # report garbage once, then skip to the next "WARC/"
                        yield f"{path}#{n}", "bad", "malformed_warc"
                        resync = True
                    continue
                resync = False
                lines = itertools.takewhile(bytes.strip, iter(f.readline, b""))  # the headers end at a blank line
                headers = {k.strip().lower(): v.strip() for k, _, v in (x.decode("utf-8", "replace").partition(":")
                                                                         for x in lines)}
                n += 1
                doc_id = headers.get("warc-record-id") or f"{path}#{n}"
                try:
                    length = int(headers["content-length"])
                except (KeyError, ValueError):
                    yield doc_id, "bad", "malformed_warc"
                    continue
                body = f.read(length)
                if len(body) < length:
                    yield doc_id, "bad", "truncated"
                    return
                if headers.get("warc-type") == "response":  # status line, HTTP headers, blank line, payload
                    http_head, _, payload = body.partition(b"\r\n\r\n")
                    head, status = http_head.lower(), http_head.split(b"\r\n", 1)[0].split()[1:2]
                    charset = re.search(rb"content-type:[^\r\n]*charset=[\"']?([\w.:\-]+)", head)
                    if status and status != [b"200"]:  # a redirect or an error page is not the document
                        yield doc_id, "bad", f"http_{status[0].decode('ascii', 'replace')}"
                    elif b"text/html" in head or b"<html" in payload[:1000].lower():
                        yield doc_id, "html", payload, charset and charset.group(1).decode("ascii")
                    else:
                        yield doc_id, "bad", "not_html"
                elif headers.get("warc-type") == "conversion":  # WET: already plain text
                    yield doc_id, "text", body.decode("utf-8", "replace")
                else:  # warcinfo, request, metadata, ...: records, but not documents (still counted)
                    yield doc_id, "bad", "not_a_document"
    except (EOFError, OSError, zlib.error) as e:  # truncated gzip stream, bad CRC, not gzip...
        truncated = isinstance(e, EOFError) or "end" in str(e).lower()
        yield f"{path}#{n + 1}", "bad", "truncated" if truncated else "corrupt_file"


def iter_source(path):
    """Dispatch on the file name: WARC/WET, .jsonl(.gz), HTML file or directory, plain text."""
    name = path.lower()
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for fn in sorted(files):
                if fn.lower().endswith((".html", ".htm", ".txt", ".jsonl", ".warc", ".warc.gz", ".wet", ".wet.gz")):
                    yield from iter_source(os.path.join(root, fn))
    elif re.search(r"\.(warc|wet)(\.gz)?$", name):
        yield from iter_warc(path)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        with (gzip.open if name.endswith(".gz") else open)(path, "rt", encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f):
                try:
                    yield f"{path}:{i}", "text", str(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError):
                    yield f"{path}:{i}", "bad", "bad_json"
    elif name.endswith((".html", ".htm")):
        with open(path, "rb") as f:
            yield path, "html", f.read()
    else:  # plain text: documents separated by <|endoftext|> (or the whole file is one document)
        with open(path, encoding="utf-8", errors="replace") as f:
            for i, doc in enumerate(f.read().split(EOT)):
                yield f"{path}:{i}", "text", doc


def download(url, cache_dir):
    """Fetch `url` into cache_dir (once). A partial download resumes with an HTTP Range header."""
    import urllib.request
    base = os.path.basename(url.split("?")[0]) or "download"
    path = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()[:12] + "_" + base)
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    part = path + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        # Append only on 206 Partial Content; a 200 (Range ignored, as file:// does) resends the whole file.
        with urllib.request.urlopen(req, timeout=60) as r, open(part, "ab" if have and r.status == 206 else "wb") as f:
            total, done, t0 = int(r.headers.get("Content-Length") or 0), 0, time.time()
            while chunk := r.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if total:
                    bpe._progress(f"download {base}", done, total, t0)
            f.flush()
            os.fsync(f.fileno())  # as in atomic_write (which cannot keep a .part to resume from)
    except OSError as e:
        raise SystemExit(f"error: download of {url} failed ({e}); rerun to resume")
    os.replace(part, path)
    return path


# ---------------------------------------------------------------
# Appendix B: the default corpus, the standard library's own documentation: byte-identical on every run, so tests and
# benchmarks can compare outputs. Importing a module can have side effects, so rendering runs in time-boxed workers
# (SIGALRM, plus a timeout from the parent), output silenced, environment scrubbed (pydoc prints module data such as
# os.environ!). The rest of this section removes, one by one, every way the machine or the run leaks into a page.
# Opens windows, prints on import, or exists only on Windows.
_SKIP_MODULES = {"antigravity", "this", "tkinter", "turtle", "turtledemo", "idlelib", "pydoc_data",
                 "msilib", "msvcrt", "nt", "winreg", "winsound", "_winapi"}
_VOLATILE_SYS = {"modules", "path", "path_importer_cache", "meta_path", "path_hooks", "argv", "orig_argv",
                 "last_type", "last_value", "last_traceback", "ps1", "ps2", "stdin", "stdout", "stderr",
                 "__stdin__", "__stdout__", "__stderr__"}
_MACHINE_PATHS = {}  # this machine's path -> a neutral stand-in, filled in each worker


def stdlib_modules(max_submodules=300):
    """Sorted public stdlib modules plus (bounded) submodules of packages, found without importing them."""
    import importlib.util
    import pkgutil
    names = []
    for top in sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in _SKIP_MODULES):
        names.append(top)
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        subs, stack = [], [(list(spec.submodule_search_locations), top)]
        # Breadth-first, capped: shallow modules first, and no package (encodings: ~120 codecs) swamps the corpus.
        while stack and len(subs) < max_submodules:
            paths, prefix = stack.pop(0)
            for info in sorted(pkgutil.iter_modules(paths), key=lambda m: m.name):
                if info.name.startswith("_") or "test" in info.name or len(subs) >= max_submodules:
                    continue
                subs.append(f"{prefix}.{info.name}")
                if info.ispkg:
                    stack.append(([os.path.join(p, info.name) for p in paths], f"{prefix}.{info.name}"))
        names += subs
    return names


def _render_init():
    """Worker setup: note the paths to neutralize, then scrub environment, argv and output."""
    _MACHINE_PATHS.update({p: "/usr" for p in {sys.prefix, sys.base_prefix, sys.exec_prefix} if len(p) > 1})
    for p in (os.getcwd(), os.path.dirname(os.path.abspath(__file__))):
        if len(p) > 1 and not sys.prefix.startswith(p):  # (cwd "/" must not turn every "/" into ".")
            _MACHINE_PATHS[p] = "."
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"})
    sys.argv = ["pydoc"]  # the sys module's page shows argv: keep the command line out of the corpus
    sys.stdout = sys.stderr = open(os.devnull, "w")
    import warnings
    warnings.simplefilter("ignore")


def _on_alarm(signum, frame):
    raise TimeoutError


def render_module_html(name, timeout=20):
    """-> (name, html_str | None, failure_reason | None). Runs inside a worker process."""
    import importlib
    import pydoc
    import signal
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(timeout)
    try:
        module = importlib.import_module(name)
        if name == "sys":  # live interpreter state, not documentation: it depends on what ran before
            module = types.ModuleType("sys", sys.__doc__)
            module.__dict__.update({k: v for k, v in vars(sys).items() if k not in _VOLATILE_SYS})
        module.__dict__.pop("__warningregistry__", None)  # what warned so far in this worker: volatile
        page = pydoc.html.page(pydoc.describe(module), pydoc.html.document(module, name))
    except TimeoutError:
        return name, None, "render_timeout"
    except BaseException:  # ImportError, SystemExit from a module's import-time code, ...
        return name, None, "import_error"
    finally:
        signal.alarm(0)
    # Reprs carry memory addresses that change every run ("<object object at 0x7f..>", "handle 7f.."): drop them.
    page = re.sub(r"(?:\s|&nbsp;)(?:at(?:\s|&nbsp;)0x[0-9a-fA-F]+|handle(?:\s|&nbsp;)[0-9a-fA-F]{8,})", "", page)
    # Machine facts: install prefixes become /usr, the cwd "."; longest first: no path is half-rewritten via a prefix.
    for path, neutral in sorted(_MACHINE_PATHS.items(), key=lambda kv: -len(kv[0])):
        page = page.replace(path, neutral)
    return name, page, None


def render_shard(names, timeout):
    """Render modules one after another in this (fresh) worker: [(name, html | None, reason)]."""
    return [render_module_html(name, timeout) for name in names]


def iter_stdlib_docs(modules, workers, timeout=20, shard_size=40):
    """Yield (doc_id, "html", bytes) for each module, in order, then the pydoc_data topics."""
    import pydoc
    from pydoc_data.topics import topics
    # A page can depend on what its process imported before (pydoc finds where a class "lives" in sys.modules), so each
    # fixed shard of modules gets a fresh process: the output depends only on the module list. Workers get a fixed
    # PYTHONHASHSEED (set reprs), TZ=UTC (the time module's page), no HOME (site's ~/.local); the pool respawns them
    # from the parent's environment, so it stays set until the pool closes.
    saved = dict(os.environ)
    os.environ.update({"PYTHONHASHSEED": "0", "TZ": "UTC", "HOME": "/nonexistent"})
    os.environ.pop("PYTHONUSERBASE", None)
    pool = mp.get_context("spawn").Pool(workers, initializer=_render_init, maxtasksperchild=1)
    shards = [modules[i:i + shard_size] for i in range(0, len(modules), shard_size)]
    pending = [pool.apply_async(render_shard, (shard, timeout)) for shard in shards]
    t0, hung, done = time.time(), False, 0
    try:
        for shard, res in zip(shards, pending):
            try:  # backstop for code that SIGALRM cannot interrupt (a blocking C call)
                pages = res.get(timeout=timeout * len(shard) + 60)
            except mp.TimeoutError:
                pages, hung = [(m, None, "render_timeout") for m in shard], True
            done += len(shard)
            print(f"\r  render modules: {done}/{len(modules)} | {time.time() - t0:.0f} s",
                  end="\n" if done == len(modules) else "", file=sys.stderr, flush=True)
            for name, page, reason in pages:
                yield (f"module:{name}", "bad", reason) if page is None else (f"module:{name}", "html", page.encode())
    finally:
        (pool.terminate if hung else pool.close)()
        pool.join()
        os.environ.clear()
        os.environ.update(saved)
    for key in sorted(topics):  # the language reference topics ship as plain text: wrap as <pre>
        body = f"<h1>{html.escape(key)}</h1><pre>{html.escape(topics[key])}</pre>"
        yield f"topic:{key}", "html", pydoc.html.page(key, body).encode()


if __name__ == "__main__":
    main()
