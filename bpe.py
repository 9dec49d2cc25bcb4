"""Byte-level BPE: the tokenizer that turns text into the integer ids a language model reads.

A language model predicts one symbol at a time, so we must pick the symbols. Raw bytes (256 symbols) make sequences
~4x longer than needed, wasting context and compute; whole words leave an open vocabulary with no way to spell an
unseen word. Byte-Pair Encoding (Sennrich et al. 2015, arXiv:1508.07909; first a compression scheme, Gage 1994) sits
in between: start from the 256 bytes, then repeatedly glue the most frequent adjacent pair into a new symbol until
the vocabulary has the size we want. Every string stays encodable (bytes are always there), and frequent strings
become single tokens. UTF-8 bytes rather than characters is GPT-2's choice (Radford et al. 2019): no unknown token,
ever. Also GPT-2's: a regex first cuts text into word-like pre-tokens (" the", "123", "\\n\\n") that merges never
cross (else BPE learns "dog." and "dog!"), and special tokens ("<|endoftext|>") are cut out before anything else, so
they are never split or merged with their neighbours.

The file reads in that order: the pattern, counting pre-tokens, the merge loop (`train_bpe`), the `Tokenizer`
(encode, decode, GPT-2's files); WordPiece and the Unigram LM (Kudo 2018, arXiv:1804.10959) on the same plumbing;
the token file. Then "Making it fast": the ASCII regex twin, safe cuts and parallel chunks, the cache and long words,
each tested equal to the plain code; `stats` last. Departures:
(1) ties between equally frequent pairs go to the greatest bytes (CS336's rule);
(2) `merge_score="pmi"` ranks pairs by count(ab)/(count(a)count(b)), the WordPiece criterion (Schuster & Nakajima
    2012; Wu et al. 2016, arXiv:1609.08144);
(3) `split_digits=True` makes each digit a pre-token (LLaMA, Touvron et al. 2023, arXiv:2302.13971), and
    `--digit-groups 3` cuts numbers into runs of <= 3 digits (Llama 3);
(4) WordPiece marks no "##": our pre-tokens keep their space.

Run it:
    python bpe.py train --input data/pydocs/train.txt --vocab-size 4096 \\
        --special-tokens '<|endoftext|>' '<|user|>' '<|assistant|>' --out data/pydocs/tokenizer
    python bpe.py train --algorithm unigram ...    # or wordpiece; --digit-groups 3; all load the same way
    python bpe.py encode --tokenizer data/pydocs/tokenizer --input data/pydocs/train.txt --out data/pydocs/train.bin
    python bpe.py stats --tokenizer data/pydocs/tokenizer --input data/pydocs/val.txt
    python bench.py --only bpe              # train vs HF tokenizers, encode vs tiktoken (CPU only)
"""

import argparse
import contextlib
import functools
import gc
import heapq
import json
import math
import multiprocessing as mp
import os
import re
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from itertools import repeat

import numpy as np
import regex

# ---------------------------------------------------------------
# Pre-tokenization: the regex that cuts text into pieces no merge may cross. GPT-2's branches, in order: contractions
# ('s 'll 're ...), optional space + letters, optional space + digits, optional space + punctuation, a whitespace run
# not followed by a non-space (it leaves one space for " word" to take), and any remaining whitespace.

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SPLIT_DIGITS_PATTERN = GPT2_PATTERN.replace(r" ?\p{N}+", r"\p{N}")  # each digit alone: "24" -> "2","4" (LLaMA)


def digit_groups_pattern(base=GPT2_PATTERN, n=3):
    r"""`base` with numbers cut into runs of at most n digits, left to right: "1234567" -> "123",
    "456", "7" (Llama 3, n=3). As in SPLIT_DIGITS_PATTERN a number no longer takes the space before it."""
    if r" ?\p{N}+" not in base or n < 1:
        raise ValueError(f"digit groups need a GPT-2 style pattern and n >= 1, got n={n}")
    return base.replace(r" ?\p{N}+", r"\p{N}{1,%d}" % n)


# The patterns whose safe cuts ("Making it fast", 2) and ASCII twin we have checked.
KNOWN_PATTERNS = {GPT2_PATTERN, SPLIT_DIGITS_PATTERN} | {digit_groups_pattern(GPT2_PATTERN, n) for n in range(1, 10)}


def _special_splitter(special_tokens):
    """Regex matching any special token, longest first so "<|a|><|a|>" beats "<|a|>" (None: no specials)."""
    alts = sorted(special_tokens or [], key=len, reverse=True)
    return regex.compile("(" + "|".join(map(regex.escape, alts)) + ")") if alts else None  # split() keeps (groups)


# ---------------------------------------------------------------
# Training, step 1: count pre-tokens ("words"). Merges never cross a pre-token, so the corpus is nothing but a
# Counter of distinct words: " the" seen 40,000 times is merged once, weighted by 40,000.

def count_words(text, special_tokens=(), pattern=GPT2_PATTERN, findall=None):
    """Counter {pre-token bytes: count} of a text. `findall` swaps in a faster, equal pre-tokenizer."""
    splitter, findall = _special_splitter(special_tokens), findall or regex.compile(pattern).findall
    pieces = splitter.split(text)[::2] if splitter else [text]  # even slots = text, odd = specials
    counts = Counter()
    for piece in pieces:
        counts.update(findall(piece))  # Counter.update on an iterable runs in C
    return Counter({w.encode("utf-8"): c for w, c in counts.items()})  # encode once per distinct word


# ---------------------------------------------------------------
# Training, step 2: merges with incremental pair counts. The naive loop recounts every pair in the corpus after each
# merge: O(corpus), ten thousand times. But merging (a, b) into `new` only changes pairs that overlap an occurrence of
# (a, b): in "x a b y", (x, a), (a, b), (b, y) become (x, new), (new, y); every other count stays put. So pair_count
# lives across merges, an index pair -> words says where the pair occurs, and a merge costs O(occurrences of the pair
# among distinct words). The most frequent pair comes off a lazy heap (`_pop_best`).
# Ties (CS336): among pairs with the highest count, take the lexicographically greatest (bytes_a, bytes_b). heapq is
# a min-heap, so the key must *reverse* byte-string order: inv(s) = chr(255 - s[0]) + ... + chr(255 - s[-1]) +
# chr(256). Complementing reverses the order of differing bytes, and the trailing chr(256) makes a prefix sort *after*
# its extensions ("b" < "ba" reversed too); tuples (inv(a), inv(b)) then compare in reverse, in C.

_INV = {i: chr(255 - i) for i in range(256)}


def _inv(b: bytes) -> str:
    return b.decode("latin-1").translate(_INV) + "\u0100"


def _pair_index(words, counts, pmi):
    """pair -> corpus count, pair -> {word indices}, and (PMI only) symbol -> corpus count."""
    pair_count = defaultdict(int)      # (a, b) -> occurrences in the corpus (overlaps counted)
    pair_words = defaultdict(set)      # (a, b) -> indices of words that (may) contain it
    sym_count = Counter()              # symbol -> occurrences, only needed for PMI
    for wi, (w, c) in enumerate(zip(words, counts)):
        for p in zip(w, w[1:]):
            pair_count[p] += c
            pair_words[p].add(wi)
        if pmi:
            for x in w:
                sym_count[x] += c
    return pair_count, pair_words, sym_count


def _pop_best(heap, pair_count, inv):
    """The most frequent pair (greatest bytes on ties), or None. heapq cannot update an entry, so a risen count gets a
    fresh entry and a fallen one keeps its old, too-high one: every live pair has an entry >= its count. So a top
    entry whose count is current beats every pair; a stale top is re-filed at its current count (O(log n) a push)."""
    while heap:
        negc, _, _, a, b = heap[0]
        cur = pair_count.get((a, b), 0)
        if cur == -negc:
            return a, b
        heapq.heappop(heap)
        if cur > 0:
            heapq.heappush(heap, (-cur, inv[a], inv[b], a, b))
    return None


def _best_pmi(pair_count, sym_count, vocab):
    """PMI, log p(ab) / (p(a) p(b)), ranks pairs as count(ab) / (count(a) count(b)) does. A merge moves the score of
    every pair holding a or b, so no heap keeps up: we scan all pairs."""
    return max(pair_count, default=None, key=lambda p: (
        pair_count[p] / (sym_count[p[0]] * sym_count[p[1]]), vocab[p[0]], vocab[p[1]]))


def _merge_word(w, a, b, new, c, wi, pair_count, pair_words, grown):
    """Replace every (a, b) in word w (left to right) by `new`; returns the new word or None (no site: a stale index
    entry). Only pairs touching a site change; for a site at old index i:
        (w[i-1], a) -> (prev, new)     unless the previous site ended at i-1 (it removed (b, a))
        (b, w[i+2]) -> (new, w[i+2])   unless w[i+2:i+4] is a site too (its left side adds (new, new))
    each weighted by c, the word's count. The caller drops (a, b); grown pairs go into `grown`."""
    out, i, n, last = [], 0, len(w), -2
    while i < n:
        if w[i] == a and i + 1 < n and w[i + 1] == b:
            if out:
                if i != last + 2:  # else the previous site removed (b, a)
                    p = (w[i - 1], a)
                    pair_count[p] -= c
                    if not pair_count[p]:
                        del pair_count[p]
                p = (out[-1], new)
                pair_count[p] += c
                pair_words[p].add(wi)
                grown.add(p)
            if i + 2 < n:
                p = (b, w[i + 2])
                pair_count[p] -= c
                if not pair_count[p]:
                    del pair_count[p]
                if not (w[i + 2] == a and i + 3 < n and w[i + 3] == b):
                    p = (new, w[i + 2])
                    pair_count[p] += c
                    pair_words[p].add(wi)
                    grown.add(p)
            out.append(new)
            last = i
            i += 2
        else:
            out.append(w[i])
            i += 1
    return out if last >= 0 else None


def _apply_merge(best, new, words, counts, pair_count, pair_words, sym_count, pmi):
    """Merge `best` into `new` in every word that holds it; returns the pairs whose count grew."""
    a, b = best
    grown = set()
    for wi in pair_words.pop(best):  # the index never drops a word, so some no longer hold the pair
        w = words[wi]
        out = _merge_word(w, a, b, new, counts[wi], wi, pair_count, pair_words, grown)
        if out is None:
            continue
        if pmi:  # each merge turns one a and one b into one `new`
            k = (len(w) - len(out)) * counts[wi]  # merges done in this word x its count
            sym_count[a] -= k
            sym_count[b] -= k
            sym_count[new] += k
        words[wi] = out
    pair_count.pop(best, None)  # every occurrence is merged by now
    return grown


def train_bpe(input_path, vocab_size, special_tokens=(), merge_score="count", split_digits=False,
              workers=None, verbose=False, pattern=None, **kwargs):
    """Learn a byte-level BPE from a text file: (vocab {id: bytes}, merges [(bytes, bytes), ...]). Ids:
    0..255 the bytes, then the specials in order, then one per merge; stops early when no pair is left."""
    special_tokens = list(dict.fromkeys(special_tokens or []))  # dedupe, keep order
    if merge_score not in ("count", "pmi"):
        raise ValueError(f"merge_score must be 'count' or 'pmi', got {merge_score!r}")
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + {len(special_tokens)} special tokens")
    pattern = pattern or (SPLIT_DIGITS_PATTERN if split_digits else GPT2_PATTERN)
    pmi, t0 = merge_score == "pmi", time.time()
    word_counts = count_file_words(input_path, special_tokens, pattern, workers, verbose=verbose, **kwargs)
    vocab = {i: bytes([i]) for i in range(256)} | {256 + k: s.encode("utf-8") for k, s in enumerate(special_tokens)}
    num_merges = vocab_size - len(vocab)  # vocab = 256 bytes + specials + one token per merge
    words, counts = [list(w) for w in word_counts], list(word_counts.values())  # a byte's id is its value
    pair_count, pair_words, sym_count = _pair_index(words, counts, pmi)
    inv = {i: _inv(b) for i, b in vocab.items()}  # heap entries (-count, inv(a), inv(b), a, b): smallest = CS336's
    heap = [(-c, inv[a], inv[b], a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    merges, t1 = [], time.time()
    for m in range(1, num_merges + 1):                    # m: merges done once this one is
        best = _best_pmi(pair_count, sym_count, vocab) if pmi else _pop_best(heap, pair_count, inv)
        if best is None:                                  # every word is a single token: a smaller vocab
            break
        a, b = best
        new = len(vocab)                                  # the next free id
        vocab[new] = vocab[a] + vocab[b]                  # a token spells its two halves
        inv[new] = _inv(vocab[new])
        merges.append((vocab[a], vocab[b]))
        grown = _apply_merge(best, new, words, counts, pair_count, pair_words, sym_count, pmi)
        for p in grown:                                   # only increases need a new heap entry
            if p in pair_count:
                heapq.heappush(heap, (-pair_count[p], inv[p[0]], inv[p[1]], p[0], p[1]))
        if verbose and (m % 500 == 0 or m == num_merges):
            dt = time.time() - t1
            print(f"\rmerges: {m}/{num_merges} | {m / dt:.0f} merges/s | ETA {dt / m * (num_merges - m):.0f}s",
                  end="\n" if m == num_merges else "", file=sys.stderr, flush=True)
    if verbose:
        print(f"trained {len(merges)} merges (vocab {len(vocab)}) in {time.time() - t0:.2f}s", file=sys.stderr)
    return vocab, merges


# ---------------------------------------------------------------
# GPT-2's file format: vocab.json maps token *strings* to ids, merges.txt lists "a b" per line. Tokens are bytes,
# often not valid UTF-8 alone (half of "é" is b"\xc3") and full of spaces and control bytes, which survive neither as
# JSON keys nor in a space-separated file. So GPT-2 spells each byte as one printable, non-space character: the 188
# bytes that print as themselves in Latin-1 keep their character, the other 68 take chr(256), chr(257), ... in byte
# order. So " " (byte 32) becomes chr(256 + 32) = "Ġ" and "\n" becomes "Ċ": hence "Ġthe" in GPT-2 vocabularies.

def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character table (bytes already printable map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


_B2U = bytes_to_unicode()
_U2B = {u: b for b, u in _B2U.items()}


def _to_str(b: bytes) -> str:
    return "".join(_B2U[x] for x in b)


def _to_bytes(s: str, where: str) -> bytes:
    try:
        return bytes(_U2B[ch] for ch in s)
    except KeyError:
        raise ValueError(f"{where}: token {s!r} is not in GPT-2 byte-to-unicode form") from None


@contextlib.contextmanager
def _atomic_open(path, mode="w"):
    """open() for writing that never leaves a half-written file: write path.tmpPID, fsync (the data is on disk before
    the name points at it), rename. On an error the old file stays."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_file(path, parse=None):
    """A UTF-8 file's text, or parse(text) (json.loads); a bad file is a one-line error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return parse(f.read()) if parse else f.read()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid {'JSON' if parse else 'UTF-8'} ({e})") from None


# ---------------------------------------------------------------
# The tokenizer: encode with the learned merges, decode by concatenating bytes.

class Tokenizer:
    """Apply a trained BPE: text -> ids (`encode`), ids -> text (`decode`). Merging each pre-token's UTF-8 bytes in rank
    order reproduces training (see `_bpe`) and tiktoken with the same ranks, id for id (where two merges spell the same
    bytes tiktoken can differ; we follow the merge list). With no special tokens, "<|endoftext|>" is plain text."""

    def __init__(self, vocab: dict, merges: list, special_tokens=None, pattern=GPT2_PATTERN, fast=True):
        if pattern not in KNOWN_PATTERNS and fast:  # the fast paths and chunked encoding rely on their safe cuts
            raise ValueError("pattern must be GPT2_PATTERN, SPLIT_DIGITS_PATTERN or a digit_groups_pattern (else fast=False)")
        self.vocab, self.merges, self.pattern, self.fast = dict(vocab), list(merges), pattern, fast  # id -> bytes
        self.special_tokens = list(dict.fromkeys(special_tokens or []))
        self.byte_to_id = {b: i for i, b in self.vocab.items()}
        for s in self.special_tokens:                   # specials missing from the vocab are appended
            if (sb := s.encode("utf-8")) not in self.byte_to_id:
                self.byte_to_id[sb] = i = max(self.vocab, default=-1) + 1
                self.vocab[i] = sb
        self.special_ids = {s: self.byte_to_id[s.encode("utf-8")] for s in self.special_tokens}
        if missing := [x for x in range(256) if bytes([x]) not in self.byte_to_id]:
            raise ValueError(f"vocab lacks {len(missing)} of the 256 single bytes (e.g. byte {missing[0]})")
        self._byte_ids = [self.byte_to_id[bytes([x])] for x in range(256)]  # GPT-2's own ids are not byte values
        self._rank_of, self._merged_id = {}, []  # (id_a, id_b) -> rank; rank -> id of a+b
        for r, (a, b) in enumerate(self.merges):
            try:
                self._rank_of[(self.byte_to_id[a], self.byte_to_id[b])] = r
                self._merged_id.append(self.byte_to_id[a + b])
            except KeyError:
                raise ValueError(f"merge {r} ({a!r}, {b!r}) refers to a token missing from the vocab") from None
        self._pat, self._pat_ascii = regex.compile(pattern), ascii_twin(pattern)
        self._splitter = _special_splitter(self.special_tokens)
        self._cache = _Cache(self)                     # pre-token -> ids, for the fast path
        self._id_bytes = [self.vocab.get(i, b"") for i in range(max(self.vocab) + 1)]  # ids may have gaps

    def __len__(self) -> int:
        return len(self._id_bytes)  # the largest id + 1

    vocab_size = property(__len__)

    def _bpe(self, piece: str) -> list:
        """Merge one pre-token: repeatedly merge the adjacent pair with the lowest rank, leftmost first. That equals
        training: whenever the lowest rank present is r, the ids are what training held for this word after merges
        0..r-1 (a pair holding merge r's token ranks after r, so no lower rank comes back), and the leftmost r each
        time replaces every (a, b) left to right, as training did ("a a a" -> "aa a"). rs[i] is the rank of (ids[i],
        ids[i+1]) (inf: never merged); a merge at i changes only the 2 ranks around it. O(len) a merge; `_bpe_long`."""
        ids = [self._byte_ids[x] for x in piece.encode("utf-8")]
        get, inf, merged = self._rank_of.get, len(self.merges), self._merged_id
        rs = list(map(get, zip(ids, ids[1:]), repeat(inf)))
        while rs:
            r = min(rs)
            if r == inf:  # no pair left that training ever merged
                break
            i = rs.index(r)
            ids[i] = merged[r]
            del ids[i + 1], rs[i]
            if i > 0:
                rs[i - 1] = get((ids[i - 1], ids[i]), inf)
            if i < len(rs):
                rs[i] = get((ids[i], ids[i + 1]), inf)
        return ids

    def encode(self, text: str) -> list:
        """Text -> ids: cut out the special tokens, pre-tokenize the rest, merge inside each piece."""
        parts = [text] if self._splitter is None else self._splitter.split(text)
        if self.fast:
            return _encode_fast(self, parts)   # the loop below, with the ASCII twin and a cache
        out = []
        for k, part in enumerate(parts):
            if k % 2:                          # odd slots are the captured special tokens
                out.append(self.special_ids[part])
                continue
            for piece in self._pat.findall(part):
                out.extend(self._bpe(piece))   # the whole algorithm: merges, lowest rank first
        return out

    def encode_iterable(self, iterable):
        """Lazily encode a stream of strings (a file read line by line): we encode up to the last safe cut (see
        "Making it fast"), so the ids equal `encode` of the whole text while we hold about a line. A special
        holding "x " could straddle a cut: then we buffer it all."""
        safe = _line_cuts_ok(self.special_tokens)
        buf, run = "", 0  # run: length of buf's trailing spaces and tabs, where a new cut may start
        for chunk in iterable:
            lo = max(len(buf) - run - 1, 0)  # older text held no safe cut: search the run + the new part
            buf += chunk
            tail = len(chunk) - len(chunk.rstrip(" \t\x0b\x0c"))
            run = run + tail if tail == len(chunk) else tail
            if safe and (i := _cut_before(buf, lo, len(buf))) > lo:
                yield from self.encode(buf[:i])
                buf = buf[i:]
        if buf:
            yield from self.encode(buf)

    def decode(self, ids) -> str:
        table, ids = self._id_bytes, ids if isinstance(ids, list) else list(ids)  # arrays, iterators too
        try:
            data = b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            bad = next(i for i in ids if not isinstance(i, (int, np.integer)) or not 0 <= i < len(table))
            raise ValueError(f"token id {bad!r} out of range [0, {len(table)})") from None
        if any(i < 0 for i in ids):  # negative indexes are valid Python but not valid ids
            raise ValueError(f"token id {min(ids)} out of range [0, {len(table)})")
        return data.decode("utf-8", errors="replace")  # a cut mid-character becomes U+FFFD

    def save(self, out_dir):
        """Write vocab.json + merges.txt (GPT-2 format) and special_tokens.json, atomically."""
        os.makedirs(out_dir, exist_ok=True)
        lines = ["#version: 0.2"] + [f"{_to_str(a)} {_to_str(b)}" for a, b in self.merges]
        files = {"vocab.json": json.dumps({_to_str(b): i for i, b in sorted(self.vocab.items())},
                                          ensure_ascii=False, indent=0),
                 "merges.txt": "\n".join(lines) + "\n", "special_tokens.json": json.dumps(self.special_tokens)}
        if self.pattern != GPT2_PATTERN:  # only written when not the GPT-2 default
            files["pattern.txt"] = self.pattern
        for name, text in files.items():
            with _atomic_open(os.path.join(out_dir, name)) as f:
                f.write(text)
        if os.path.exists(p := os.path.join(out_dir, "pieces.json")):  # else the dir still loads as Unigram
            os.remove(p)

    @classmethod
    def from_files(cls, vocab_path, merges_path, special_tokens=None, pattern=GPT2_PATTERN):
        if missing := [p for p in (vocab_path, merges_path) if not os.path.isfile(p)]:
            raise FileNotFoundError(f"tokenizer file not found: {missing[0]}")
        raw = _read_file(vocab_path, json.loads)
        if not isinstance(raw, dict) or not all(isinstance(i, int) for i in raw.values()):
            raise ValueError(f"{vocab_path}: expected a JSON object mapping token strings to integer ids")
        vocab = {i: _to_bytes(s, vocab_path) for s, i in raw.items()}
        lines = _read_file(merges_path).split("\n")  # token strings never hold whitespace (see _B2U)
        merges = []
        for n, line in enumerate(lines, 1):
            if line and not (n == 1 and line.startswith("#version")):
                if len(parts := line.split(" ")) != 2:
                    raise ValueError(f"{merges_path}:{n}: expected two tokens separated by one space")
                merges.append((_to_bytes(parts[0], merges_path), _to_bytes(parts[1], merges_path)))
        return cls(vocab, merges, special_tokens, pattern)

    @classmethod
    def load(cls, tokenizer_dir):
        """Read a directory written by `save`, of any algorithm (pieces.json: WordPiece or Unigram)."""
        if os.path.isfile(pieces := os.path.join(tokenizer_dir, "pieces.json")):
            return _load_pieces(pieces)
        if os.path.isfile(hf := os.path.join(tokenizer_dir, "tokenizer.json")):
            return from_hf_json(hf)
        if not os.path.isdir(tokenizer_dir):
            raise FileNotFoundError(f"tokenizer directory not found: {tokenizer_dir}")
        sp = os.path.join(tokenizer_dir, "special_tokens.json")
        specials = _read_file(sp, json.loads) if os.path.isfile(sp) else []
        if not isinstance(specials, list) or not all(isinstance(x, str) for x in specials):
            raise ValueError(f"{sp}: expected a JSON list of strings")
        pp = os.path.join(tokenizer_dir, "pattern.txt")
        pattern = _read_file(pp) if os.path.isfile(pp) else GPT2_PATTERN
        return Tokenizer.from_files(os.path.join(tokenizer_dir, "vocab.json"),
                                    os.path.join(tokenizer_dir, "merges.txt"), specials, pattern)


# ---------------------------------------------------------------
# Other tokenizers: WordPiece and the Unigram LM. BPE learns bottom-up by pair count and encodes by replaying merges;
# the other two families each change one of those choices.
# WordPiece (Schuster & Nakajima 2012; BERT's, Wu et al. 2016, arXiv:1609.08144) merges the pair with the highest
# count(ab) / (count(a) count(b)) -- train_bpe(merge_score="pmi") -- and encodes with the vocabulary alone: the longest
# piece that starts here, then again after it (MaxMatch). BERT marks word-internal pieces "##" as its pre-tokenizer
# drops spaces; our pre-tokens keep their leading space, so the mark sits on the other side: " the" (word start) and
# "the" (in " bathe") are two entries, SentencePiece's "▁" (Kudo & Richardson 2018, arXiv:1808.06226).
# The Unigram LM (Kudo 2018, arXiv:1804.10959) works top-down: a word is a sequence of pieces drawn independently,
# P(x1..xk) = prod_i p(xi). From a large seed vocabulary, fit p by EM over all segmentations, drop the pieces the
# likelihood misses least, repeat down to the target size. Encoding is the most probable segmentation (Viterbi);
# drawing one from P(seg)^alpha instead is subword regularization. Both keep the 256 bytes: decode(encode(x)) == x.

class WordPieceTokenizer(Tokenizer):
    """No merges: a vocabulary and a rule to cut each pre-token (`_bpe`, here MaxMatch); the rest is Tokenizer's."""
    algorithm = "wordpiece"

    def __init__(self, vocab, special_tokens=None, pattern=GPT2_PATTERN, scores=None, fast=True):
        super().__init__(vocab, [], special_tokens, pattern, fast)  # no merges: the vocabulary is all we use
        self._piece_id = {b: i for i, b in sorted(self.vocab.items(), reverse=True)  # lowest id wins a tie
                          if i not in self.special_ids.values()}  # specials are cut out before, never matched
        self._max_len = max(map(len, self._piece_id))  # the longest piece, in bytes, bounds every search
        self.scores = dict(scores or {})                # id -> log p (the Unigram LM's; empty otherwise)

    def _bpe(self, piece: str) -> list:  # the name Tokenizer.encode (and its cache) call per pre-token
        """MaxMatch: the longest piece starting at i, then on from its end. Greedy, so not always fewest (xa, xab, bcd
        cut "xabcd" xab|c|d, not xa|bcd); a single byte always matches: no [UNK]."""
        b, ids, i = piece.encode("utf-8"), [], 0
        while i < len(b):
            for j in range(min(len(b), i + self._max_len), i, -1):  # <= max_len lookups per token
                if (t := self._piece_id.get(b[i:j])) is not None:
                    break
            ids.append(t)
            i = j
        return ids

    def save(self, out_dir):
        """Write pieces.json: algorithm, pattern, special tokens, [token, id, score] per id (GPT-2 spelling)."""
        os.makedirs(out_dir, exist_ok=True)
        pieces = [[_to_str(b), i, self.scores.get(i)] for i, b in sorted(self.vocab.items())]
        with _atomic_open(os.path.join(out_dir, "pieces.json")) as f:
            f.write(json.dumps({"algorithm": self.algorithm, "pattern": self.pattern, "pieces": pieces,
                                "special_tokens": self.special_tokens}, ensure_ascii=False, indent=0))


# ---------------------------------------------------------------
# The Unigram LM on one word. The segmentations of a word w (bytes) are the paths of a lattice: node j is "the first
# j bytes are spelled", each piece w[i:j] an edge i -> j of weight log p(w[i:j]). Summing over paths
# (forward-backward) gives EM its counts, maximizing (Viterbi) the encoding.

def _lattice(word, logp, max_len):
    """ends[j] = [(i, log p(word[i:j])) for each vocabulary piece that ends at byte j]."""
    return [[(i, lp) for i in range(max(0, j - max_len), j) if (lp := logp.get(word[i:j])) is not None]
            for j in range(len(word) + 1)]


def _logsumexp(xs):  # log sum exp(x), shifted by the max so no exp overflows; one way in costs no exp
    m = max(xs)
    return m if len(xs) == 1 else m + math.log(sum([math.exp(x - m) for x in xs]))


def _forward(ends, alpha=1.0, plus=_logsumexp):
    """a[j] = log of the total (plus=_logsumexp) or the best (plus=max) weight of the paths 0 -> j, an edge weighing
    p^alpha: the forward sums and Viterbi are one recursion in two semirings."""
    a = [0.0] + [-math.inf] * (len(ends) - 1)
    for j in range(1, len(ends)):
        a[j] = plus([a[i] + alpha * lp for i, lp in ends[j]])  # a[j] = log sum_i a[i] p(w[i:j])^alpha
    return a


def _backtrack(word, ends, a, alpha=1.0, rng=None):
    """One path, walked back from the end: the best edge into each node (a from max), or, with rng, an edge drawn
    with probability a[i] p(w[i:j])^alpha / a[j] (forward-filtering backward-sampling)."""
    pieces, j = [], len(word)
    while j > 0:
        u = rng.random() if rng else 0.0
        for i, lp in ends[j]:
            u -= math.exp(a[i] + alpha * lp - a[j])  # P(the last edge is i -> j | a path reaches j)
            if (u <= 0) if rng else (a[i] + alpha * lp == a[j]):  # drawn, or the argmax edge
                break
        pieces.append(word[i:j])
        j = i
    return pieces[::-1]


def unigram_segment(word, logp, max_len, alpha=1.0, rng=None):
    """argmax_seg prod p(x) over the cuts of `word` (bytes), as pieces; with rng (numpy), one drawn from P(seg)^alpha
    / Z instead (Kudo 2018): alpha -> inf is Viterbi again, alpha -> 0 uniform."""
    ends = _lattice(word, logp, max_len)
    return _backtrack(word, ends, _forward(ends, alpha, _logsumexp if rng else max), alpha, rng)


# ---------------------------------------------------------------
# Training the Unigram LM (Kudo 2018, section 3.2): a seed vocabulary, then EM and pruning in turns.

def unigram_seed(word_counts, max_len, size):
    """{piece: log p ~ count}: the 256 bytes and the `size` substrings of pre-tokens (whole characters, 2..max_len
    bytes, seen twice or more) that cover most bytes, count x length (as SentencePiece)."""
    freq = Counter()
    for w, c in word_counts.items():
        cuts = [k for k in range(len(w)) if w[k] & 0xC0 != 0x80] + [len(w)]  # where characters start
        for s, lo in enumerate(cuts):
            for hi in cuts[s + 1:]:
                if hi - lo > max_len:
                    break
                freq[w[lo:hi]] += c
    counts = {x: freq[x] for x in sorted((x for x in freq if len(x) > 1 and freq[x] > 1),
                                         key=lambda x: (-freq[x] * len(x), x))[:size]}
    counts.update({bytes([x]): freq[bytes([x])] + 1 for x in range(256)})
    total = sum(counts.values())
    return {x: math.log(c / total) for x, c in counts.items()}


def unigram_em_step(word_counts, logp, max_len, floor=1e-3):
    """One EM iteration. E: expected piece counts over all segmentations, E[n_x] = sum_w c_w sum_seg P(seg | w)
    n_x(seg), by forward-backward. M: p(x) = E[n_x] / sum_y E[n_y]. An unused piece keeps `floor` count, so unseen
    bytes stay encodable. Returns (new logp, old log-likelihood)."""
    counts, loglik = defaultdict(float), 0.0
    backward = {x[::-1]: lp for x, lp in logp.items()}  # paths i -> n of w are paths 0 -> n-i of w reversed
    for w, c in word_counts.items():
        ends, n = _lattice(w, logp, max_len), len(w)
        a = _forward(ends)                                          # a[j]: log weight of all paths 0 -> j
        b = _forward(_lattice(w[::-1], backward, max_len))[::-1]    # b[i]: log weight of all paths i -> n
        for j in range(1, n + 1):  # P(edge i -> j | w) = a[i] p(w[i:j]) b[j] / P(w), P(w) = a[n]
            for i, lp in ends[j]:
                counts[w[i:j]] += c * math.exp(a[i] + lp + b[j] - a[n])
        loglik += c * a[n]
    new = {x: max(counts.get(x, 0.0), floor) for x in logp}
    total = sum(new.values())
    return {x: math.log(v / total) for x, v in new.items()}, loglik


def unigram_prune(word_counts, logp, max_len, keep):
    """Every byte, and the `keep` longer pieces whose removal costs the most likelihood: without x, each
    Viterbi use of x is spelled by x's own best cut alt(x), so loss(x) = freq(x) (log p(x) - log p(alt(x))),
    other p fixed (Kudo's loss_i, p re-estimated by the next EM step rather than inside the loss)."""
    freq = Counter()
    for w, c in word_counts.items():
        for p in unigram_segment(w, logp, max_len):
            freq[p] += c
    others, loss = dict(logp), {}
    for x, lp in logp.items():
        if len(x) > 1:
            del others[x]  # the vocabulary without x, for x's alternative
            loss[x] = freq[x] * (lp - sum(others[y] for y in unigram_segment(x, others, max_len)))
            others[x] = lp
    kept = set(sorted(loss, key=lambda x: (-loss[x], x))[:keep])
    return {x: lp for x, lp in logp.items() if len(x) == 1 or x in kept}


def train_unigram(input_path, vocab_size, special_tokens=(), pattern=GPT2_PATTERN, max_len=16,
                  seed_size=None, shrink=0.75, em_iters=2, workers=None, verbose=False):
    """(vocab {id: bytes}, scores {id: log p}): bytes, specials, then pieces, most probable first. Each round:
    `em_iters` EM steps, then prune to `shrink` of the pieces (SentencePiece's 0.75) until the target."""
    special_tokens = list(dict.fromkeys(special_tokens or []))
    n_multi = vocab_size - 256 - len(special_tokens)  # multi-byte pieces wanted
    if n_multi < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + {len(special_tokens)} special tokens")
    t0, words = time.time(), count_file_words(input_path, special_tokens, pattern, workers, verbose=verbose)
    logp = unigram_seed(words, max_len, seed_size or 8 * vocab_size)
    while True:
        for _ in range(em_iters):
            logp, loglik = unigram_em_step(words, logp, max_len)
        if verbose:
            print(f"unigram: {len(logp) - 256} pieces | log-lik {loglik:.5g} | {time.time() - t0:.0f}s", file=sys.stderr)
        if len(logp) - 256 <= n_multi:
            break
        logp = unigram_prune(words, logp, max_len, max(n_multi, int((len(logp) - 256) * shrink)))
    pieces = [bytes([x]) for x in range(256)] + sorted((x for x in logp if len(x) > 1), key=lambda x: (-logp[x], x))
    vocab = dict(enumerate(pieces[:256] + [s.encode("utf-8") for s in special_tokens] + pieces[256:]))
    return vocab, {i: logp[b] for i, b in vocab.items() if not 256 <= i < 256 + len(special_tokens)}


class UnigramTokenizer(WordPieceTokenizer):
    """WordPiece's plumbing with Viterbi for MaxMatch, cached; with alpha, sampled cuts (subword regularization)."""
    algorithm = "unigram"

    def __init__(self, vocab, special_tokens=None, pattern=GPT2_PATTERN, scores=None, alpha=None, seed=None):
        super().__init__(vocab, special_tokens, pattern, scores, fast=alpha is None)
        self._logp = {b: self.scores[i] for b, i in self._piece_id.items()}  # KeyError: a piece without a score
        self._alpha, self._rng = (1.0, None) if alpha is None else (alpha, np.random.default_rng(seed))

    def _bpe(self, piece: str) -> list:
        cut = unigram_segment(piece.encode("utf-8"), self._logp, self._max_len, self._alpha, self._rng)
        return [self._piece_id[p] for p in cut]


def _load_pieces(path):
    """Tokenizer.load of a pieces.json written by WordPieceTokenizer.save: it names the class."""
    state = _read_file(path, json.loads)
    try:
        cls = {"wordpiece": WordPieceTokenizer, "unigram": UnigramTokenizer}[state["algorithm"]]
        vocab = {int(i): _to_bytes(s, path) for s, i, _ in state["pieces"]}
        scores = {int(i): float(x) for _, i, x in state["pieces"] if x is not None}
        return cls(vocab, state["special_tokens"], state["pattern"], scores)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a tokenizer written by save ({type(e).__name__}: {e})") from None


def train_tokenizer(algorithm, input_path, vocab_size, special_tokens=(), pattern=GPT2_PATTERN,
                    merge_score=None, workers=None, verbose=False, **unigram_options):
    """`bpe.py train --algorithm`: the trained tokenizer (call .save); unigram_options go to train_unigram."""
    if algorithm == "unigram":
        vocab, scores = train_unigram(input_path, vocab_size, special_tokens, pattern, workers=workers,
                                      verbose=verbose, **unigram_options)
        return UnigramTokenizer(vocab, special_tokens, pattern, scores)
    if algorithm not in ("bpe", "wordpiece"):
        raise ValueError(f"algorithm must be bpe, wordpiece or unigram, got {algorithm!r}")
    vocab, merges = train_bpe(input_path, vocab_size, special_tokens, workers=workers, verbose=verbose,
                              merge_score=merge_score or {"bpe": "count", "wordpiece": "pmi"}[algorithm], pattern=pattern)
    return Tokenizer(vocab, merges, special_tokens, pattern) if algorithm == "bpe" else \
        WordPieceTokenizer(vocab, special_tokens, pattern)


def from_hf_json(path):
    """A Hugging Face tokenizer.json of a byte-level BPE (GPT-2, Llama 3, SmolLM...) as our Tokenizer: HF's ids, merges
    ("a b" or ["a", "b"]), added tokens (as specials) and pre-tokenizer regex (a Split's, else GPT-2's), so encode gives
    HF's ids. A regex of another family has no known safe cuts: the plain loop, whole texts only."""
    j = _read_file(path, json.loads)
    m, pre = j.get("model") or {}, j.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    if m.get("type") != "BPE" or j.get("normalizer") or not any(p.get("type") == "ByteLevel" for p in steps) \
            or any(p.get("add_prefix_space") for p in steps):
        raise ValueError(f"{path}: only byte-level BPE without normalizer or prefix space loads (model {m.get('type')})")
    split = [p["pattern"]["Regex"] for p in steps if p.get("type") == "Split" and "Regex" in p.get("pattern", {})]
    pattern = split[0] if split else GPT2_PATTERN
    added = {t["id"]: t["content"] for t in j.get("added_tokens", [])}
    vocab = {i: _to_bytes(s, path) for s, i in m["vocab"].items()} | {i: s.encode("utf-8") for i, s in added.items()}
    merges = [tuple(_to_bytes(x, path) for x in (mg.split(" ") if isinstance(mg, str) else mg)) for mg in m["merges"]]
    return Tokenizer(vocab, merges, list(added.values()), pattern, fast=pattern in KNOWN_PATTERNS)


# ---------------------------------------------------------------
# A corpus to a flat token file: the ids back to back, so np.memmap reads it unparsed and a training batch is a slice.

def token_dtype(vocab_size):
    """The repo's reader rule: uint16 if ids < 65536 (GPT-2's 50,257: half of uint32's bytes to move), else uint32."""
    return np.uint16 if vocab_size <= 65536 else np.uint32


def encode_file(tokenizer_dir, input_path, out_path, workers=None, chunk_bytes=4 << 20, verbose=True,
                alpha=None, seed=0) -> int:
    """Text file -> flat token-id file (returns the count): safe chunks through a process pool, in order, atomically."""
    _check_input(input_path)
    tok = Tokenizer.load(tokenizer_dir)  # fail early, in this process, on a bad dir
    if tok.pattern not in KNOWN_PATTERNS:
        raise ValueError(f"{tokenizer_dir}: a pre-tokenizer regex with no known safe cuts; encode whole texts with Tokenizer.encode")
    if alpha is not None and not isinstance(tok, UnigramTokenizer):
        raise ValueError(f"--alpha samples Unigram segmentations; {tokenizer_dir} is not one")
    dtype, size, n_tokens = token_dtype(tok.vocab_size), os.path.getsize(input_path), 0
    with _atomic_open(out_path, "wb") as f:
        for arr in _map_chunks(_encode_chunk, input_path, tok.special_tokens, (dtype,), workers, chunk_bytes,
                               "encode", verbose, initializer=_init_encoder, initargs=(tokenizer_dir, alpha, seed)):
            arr.tofile(f)
            n_tokens += len(arr)
    if verbose:
        print(f"wrote {n_tokens:,} tokens ({np.dtype(dtype).name}) to {out_path}: "
              f"{size / max(n_tokens, 1):.2f} bytes/token", file=sys.stderr)
    return n_tokens


# ---------------------------------------------------------------
# Making it fast, 1: the stdlib `re` engine on the ASCII parts of the text. Pre-tokenization is the bottleneck of
# training and encoding; on ASCII, `re` runs our patterns faster than `regex` (README: benchmarks) but knows no \p{L}.

_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def ascii_twin(pattern):
    r"""The same pattern for ASCII input and `re` (None if not ours; a test checks both on random ASCII). In ASCII,
    \p{L} is [A-Za-z], \p{N} is [0-9], `regex`'s \s is [\t\n\v\f\r ] (`re`'s adds \x1c-\x1f: we spell the class out)."""
    if pattern not in KNOWN_PATTERNS:
        return None
    ws = r"\t\n\x0b\x0c\r "  # regex's \s on ASCII, spelled out
    for a, b in [(r"[^\s\p{L}\p{N}]", f"[^{ws}A-Za-z0-9]"), (r"(?!\S)", f"(?![^{ws}])"),  # compound classes first
                 (r"\p{L}", "[A-Za-z]"), (r"\p{N}", "[0-9]"), (r"\s", f"[{ws}]")]:
        pattern = pattern.replace(a, b)
    return re.compile(pattern)


def _findall(pat, pat_ascii, text):
    """pat.findall(text), with the fast ASCII engine wherever the text allows it."""
    if pat_ascii is None:
        return pat.findall(text)
    if text.isascii():
        return pat_ascii.findall(text)
    # Mixed text is mostly ASCII: `regex` gets each non-ASCII run widened to safe cuts (below), `re` the rest, and no
    # pre-token crosses a safe cut. findall(text, pos, endpos) copies no slice. A short ASCII stretch costs `regex`
    # less than a switch: spans end only where a long one begins.
    out, pos = [], 0
    for m in _NON_ASCII.finditer(text):
        if m.start() < pos:                # inside the span we just gave to `regex`
            continue
        lo = _cut_before(text, pos, m.start()) if m.start() - pos > _ASCII_RUN else pos
        cut = _CUT_ASCII_NEXT.search(text, m.end())
        hi = cut.start() if cut else len(text)
        out += pat_ascii.findall(text, pos, lo) + pat.findall(text, lo, hi)
        pos = hi
    return out + pat_ascii.findall(text, pos)


# ---------------------------------------------------------------
# Making it fast, 2: safe cuts, where text can be split without changing a single pre-token: the ASCII twin,
# `encode_iterable` and the file chunks need the pre-tokens of one pass. Two qualify:
#   - just before a special token that no other special occurrence straddles: the text is split there anyway;
#   - between a non-whitespace character x and whitespace: every branch of the pattern that can hold x holds no
#     whitespace after x (only an optional space before it), so x's pre-token ends at x, in the whole text and in
#     the piece before the cut, and the next one starts right after x in both (no branch looks behind). We take
#     only those whose whitespace reaches a line end ("x\n", "x\r\n", "x   \n"; CJK, CRLF too): pieces are lines.
# Cutting *after* "\n" is not safe: "\n\n\nx" is "\n\n","\n","x" but "\n" | "\n\nx" gives "\n","\n","\n","x". On raw
# file bytes we decode first (see `_next_cut`), so x may be any character.

_CUT = regex.compile(r"(?<=\S)[\t\x0b\x0c ]*[\r\n]")  # m.start() is a safe cut; \S is the pattern's own
_CUT_LAST = regex.compile(_CUT.pattern, regex.REVERSE)   # the same, searching backwards
_ASCII_RUN = 256
_CUT_ASCII_NEXT = regex.compile(_CUT.pattern + r"(?=[\x00-\x7f]{%d})" % _ASCII_RUN)  # a cut, then ASCII


def _cut_before(text, lo, hi):
    """The last safe line cut k in text[lo:hi] with lo < k (its line end before hi), else lo."""
    m = _CUT_LAST.search(text, lo, hi)
    return m.start() if m and m.start() > lo else lo


# Big files in safe chunks: training (count words) and encoding map a function over them in a process pool. Each
# worker reads its own byte range, so only offsets and results cross processes; memory holds a chunk per worker.

def _chunk_boundaries(path, n_chunks, special_tokens, scan=1 << 20):
    """Byte offsets [0, ..., size] of ~n_chunks safe pieces: a cut after each evenly spaced guess."""
    size, bounds = os.path.getsize(path), [0]
    with open(path, "rb") as f:
        for i in range(1, n_chunks):
            cut = _next_cut(f, max(size * i // n_chunks, bounds[-1] + 1), special_tokens, scan, size)
            if cut >= size:  # no cut after this guess, so none after the later ones either
                break
            bounds.append(cut)
    return bounds + [size]


def _next_cut(f, start, special_tokens, scan, size):
    """File offset of the first safe cut at or after byte `start`, else `size`: in windows of `scan` bytes, the first
    special token (a document boundary), else the first line cut. Bytes decode with surrogateescape, which takes any
    bytes and encodes back to exactly them: text offsets map back."""
    longest = max(map(len, special_tokens), default=0)
    back, line_cuts, scan = 4 * longest + 4, _line_cuts_ok(special_tokens), max(scan, 8 * longest + 64)
    while start < size:
        base = max(start - back, 0)  # we also read some bytes before start: a special may straddle it
        f.seek(base)
        raw = f.read(start - base + scan)
        while start - base < len(raw) and 0x80 <= raw[start - base] < 0xC0:
            start += 1  # a UTF-8 continuation byte: start at the next character instead
        text, lo = raw.decode("utf-8", "surrogateescape"), len(raw[:start - base].decode("utf-8", "surrogateescape"))
        eof = base + len(raw) >= size
        hi = len(text) if eof else len(text) - longest - 1  # a special from hi on may run past the window
        i = _special_cut(text, special_tokens, lo, hi)
        if i is None and line_cuts and (m := _CUT.search(text, lo)):
            i = m.start()
        if i is not None or eof:
            return size if i is None else base + len(text[:i].encode("utf-8", "surrogateescape"))
        start = base + len(text[:hi].encode("utf-8", "surrogateescape"))
    return size


def _special_cut(text, special_tokens, lo, hi):
    """The first i in [lo, hi) where a special token starts and no special occurrence straddles i, else None: one
    pass over the whole text then reaches i with no match open, as text[i:] does. (A cut before "<|a|>" inside
    "<|a|><|a|>", both special, would split the long one in two.)"""
    while hits := [j for j in (text.find(s, lo, hi + len(s) - 1) for s in special_tokens) if j >= 0]:
        i = min(hits)
        if not any(0 <= text.find(t, max(i - len(t) + 1, 0), i + len(t) - 1) < i for t in special_tokens):
            return i
        lo = i + 1
    return None


def _line_cuts_ok(special_tokens):
    """Line cuts are safe unless a special token could straddle one: it holds x then whitespace."""
    return not any(regex.search(r"\S\s", s) for s in special_tokens)


def _read_text(path, start, end):
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start).decode("utf-8", errors="replace")  # bad UTF-8: U+FFFD, not a crash


def _check_input(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"input file is empty: {path}")


def _progress(what, done, total, t0):
    """One stderr status line for `done` of `total` bytes, redrawn in place: MB, MB/s, ETA."""
    rate = done / max(time.time() - t0, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    print(f"\r{what}: {done / 1e6:.1f}/{total / 1e6:.1f} MB | {rate / 1e6:.1f} MB/s | ETA {eta:.0f}s",
          end="\n" if done >= total else "", file=sys.stderr, flush=True)


def _map_chunks(fn, path, special_tokens, args, workers, chunk_bytes, what, verbose, initializer=None, initargs=()):
    """Yield fn((path, start, end, *args)) for each safe chunk of the file, in file order."""
    size = os.path.getsize(path)
    bounds = _chunk_boundaries(path, max(1, -(-size // chunk_bytes)), special_tokens, scan=min(1 << 20, chunk_bytes))
    jobs = [(path, a, b, *args) for a, b in zip(bounds, bounds[1:])]
    workers = workers or min(os.cpu_count() or 1, 8)
    pool, t0 = None, time.time()
    if workers != 1 and len(jobs) != 1:  # else small input: a pool costs more than it saves
        # fork is fastest, but forking a threaded process (torch's pools, a DDP test) can deadlock a child: then spawn.
        threaded = "torch" in sys.modules or threading.active_count() > 1
        method = "fork" if sys.platform == "linux" and not threaded else "spawn"
        pool = mp.get_context(method).Pool(workers, initializer=initializer, initargs=initargs)
    elif initializer:
        initializer(*initargs)
    results = pool.imap(fn, jobs) if pool else map(fn, jobs)  # imap, not imap_unordered: results come in file order
    try:
        for job, result in zip(jobs, results):
            yield result
            if verbose:  # chunks are contiguous from offset 0, so the bytes done = this end
                _progress(what, job[2], size, t0)
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def _count_words(job):
    """Worker: pre-tokenize bytes [start, end) of the file into a Counter of UTF-8 byte strings."""
    path, start, end, special_tokens, pattern = job
    fast = functools.partial(_findall, regex.compile(pattern), ascii_twin(pattern))
    return count_words(_read_text(path, start, end), special_tokens, pattern, findall=fast)


def count_file_words(path, special_tokens, pattern=GPT2_PATTERN, workers=None, chunk_bytes=4 << 20, verbose=False):
    """count_words of a whole file, streamed in safe chunks through a process pool."""
    _check_input(path)
    total = Counter()
    for counts in _map_chunks(_count_words, path, special_tokens, (special_tokens, pattern), workers,
                              chunk_bytes, "pre-tokenize", verbose):
        total.update(counts)
    return total


def _init_encoder(tokenizer_dir, alpha=None, seed=0):
    """Pool initializer: each encoding worker loads the tokenizer once, and keeps its cache, for every chunk."""
    global _worker_tok, _worker_sampling
    _worker_tok, _worker_sampling = Tokenizer.load(tokenizer_dir), (alpha, seed)


def _encode_chunk(job):
    path, start, end, dtype = job
    tok, (alpha, seed) = _worker_tok, _worker_sampling
    if alpha is not None:  # a sampler per chunk, seeded by its offset: same ids for any worker count
        tok = UnigramTokenizer(tok.vocab, tok.special_tokens, tok.pattern, tok.scores, alpha, [seed, start])
    return np.asarray(tok.encode(_read_text(path, start, end)), dtype=dtype)


# ---------------------------------------------------------------
# Making it fast, 3: the pre-token cache (text repeats a few thousand words: most are one lookup), long words, no GC.

class _Cache(dict):
    """dict that computes missing entries: cache[piece] merges the piece once, then remembers it. A hit is one C-level
    lookup (dict calls __missing__ itself), which lets the hot loop in `_encode_fast` be two C-level maps. A miss runs
    the plain loop, or the heap (same ids) for a long piece: it wins from ~100 characters on; words are far shorter."""

    def __init__(self, tok):
        self.tok, self.heap = tok, type(tok)._bpe is Tokenizer._bpe  # a subclass's own _bpe is kept

    def __missing__(self, piece):
        ids = self[piece] = _bpe_long(self.tok, piece) if self.heap and len(piece) >= 100 else self.tok._bpe(piece)
        return ids


def _bpe_long(tok, piece):
    """Tokenizer._bpe in O(n log n), not O(n^2) (seconds for a 40k-character word). Symbols form a linked list
    (nxt/prv); a heap holds (rank, position) of every pair, its top the lowest rank, leftmost first: `_bpe`'s pick. A
    merge kills the right symbol and pushes the two new pairs; stale entries (pair changed since) are skipped."""
    ids = [tok._byte_ids[x] for x in piece.encode("utf-8")]
    get, merged, n = tok._rank_of.get, tok._merged_id, len(ids)
    nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
    heap = [(r, i) for i in range(n - 1) if (r := get((ids[i], ids[i + 1]))) is not None]
    heapq.heapify(heap)
    while heap:
        r, i = heapq.heappop(heap)
        j = nxt[i]
        if ids[i] is None or j >= n or get((ids[i], ids[j])) != r:
            continue                       # stale: i was merged away, or its pair changed
        ids[i], ids[j] = merged[r], None   # i absorbs j
        nxt[i] = nxt[j]
        if nxt[i] < n:
            prv[nxt[i]] = i
        for a in (prv[i], i):              # the pairs (prev, new) and (new, next)
            if a >= 0 and nxt[a] < n and (q := get((ids[a], ids[nxt[a]]))) is not None:
                heapq.heappush(heap, (q, a))
    return [x for x in ids if x is not None]


def _encode_fast(tok, parts):
    """Tokenizer.encode's plain loop, with the ASCII twin, the cache and no cycle collector: a cold cache makes one
    small list per new pre-token and no reference cycles: the collector would only rescan the cache and output."""
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        out, cache = [], tok._cache
        if len(cache) > 1 << 20:  # bound memory on huge, diverse corpora
            cache.clear()
        for k, part in enumerate(parts):
            if k % 2:
                out.append(tok.special_ids[part])
            else:  # the hot loop as two C-level maps: look each pre-token up, append its ids (deque: drain in C)
                deque(map(out.extend, map(cache.__getitem__, _findall(tok._pat, tok._pat_ascii, part))), maxlen=0)
        return out
    finally:
        if gc_was_on:
            gc.enable()


# ---------------------------------------------------------------
# Diagnostics: bytes/token, then four pathologies, a section each. Under-trained tokens: ids training rarely
# saw stay near init and misbehave ("SolidGoldMagikarp"; Land & Bartolo 2024, arXiv:2405.05417). Multilingual
# cost (Petrov et al. 2023, arXiv:2305.15425). Digits: how numbers are cut. Code: indentation, runs of spaces.

def under_trained(tok, text, max_count=1):
    """[(count, id)] of the multi-byte, non-special entries encode(text) uses <= max_count times, rarest first."""
    n, specials = Counter(tok.encode(text)), set(tok.special_ids.values())
    return sorted((n[i], i) for i, b in tok.vocab.items() if n[i] <= max_count and len(b) > 1 and i not in specials)


def cost_by_group(tok, pairs):
    """{group: [tokens, bytes, characters, strings]} summed over (group, string) pairs, each string encoded alone."""
    cost = defaultdict(lambda: np.zeros(4, dtype=np.int64))
    for group, s in pairs:
        cost[group] += (len(tok.encode(s)), len(s.encode("utf-8")), len(s), 1)
    return dict(cost)


def print_stats(tok, text, ckpt=None, parallel=None):
    """Compression on `text`, then the pathology sections: under-trained tokens, multilingual cost, digits, code."""
    (t, b, _, _), rare = cost_by_group(tok, [(0, text)])[0], under_trained(tok, text)
    print(f"{b:,} bytes -> {t:,} tokens | {b / max(t, 1):.2f} bytes/token | vocab {len(tok)}")
    print(f"\nunder-trained tokens: {len(rare)} learned entries occur <= 1 time in the input "
          f"({sum(c == 0 for c, _ in rare)} never): " + ", ".join(f"{tok.vocab[i]} x{c}" for c, i in rare[:12]))
    if ckpt:  # model.py is imported here only: the rest of bpe.py needs nothing from the repo
        import model
        w = model.load_model(ckpt, "cpu")[0].token_embeddings.weight.detach().float().norm(dim=1)  # row norms
        print(f"  embedding norms: median {w.median():.3f}, {w[[i for _, i in rare if i < len(w)]].median():.3f} under-trained")
    with open(parallel or os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "parallel.txt"),
              encoding="utf-8") as f:  # "language<TAB>sentence" lines, the same sentences in each language
        cost = cost_by_group(tok, (line.rstrip("\n").split("\t", 1) for line in f if "\t" in line and line[0] != "#"))
    print(f"\nmultilingual cost (the same sentences in {len(cost)} languages): tokens relative to English")
    for lang, (t, b, ch, _) in sorted(cost.items(), key=lambda kv: kv[1][0]):
        print(f"  {lang:4} {t:5d} tokens  {t / b:.3f} tokens/byte  {t / ch:.3f} tokens/char  {t / cost['en'][0]:.2f}x")
    digits = cost_by_group(tok, ((min(len(r), 9), r) for r in regex.findall(r"\p{N}+", text)))  # 9: 9 or more
    print("\ndigits: the input's numbers encoded alone, by length: tokens per number (bytes/token)\n  " + " | ".join(
        f"{n}: {t / k:.2f} ({b / t:.2f})" for n, (t, b, _, k) in sorted(digits.items())))
    lines = [(ln[:len(ln) - len(ln.lstrip(' \t'))], ln) for ln in text.splitlines() if ln.lstrip(" \t") and ln[0] in " \t"]
    whole, rest = cost_by_group(tok, lines), cost_by_group(tok, ((ind, ln[len(ind):]) for ind, ln in lines))
    runs = {k: len(tok.encode(f"x{' ' * k}y")) - 2 for k in (2, 4, 8, 16, 32)}
    print(f"\ncode: tokens for a run of k spaces between words: {runs}\n  indentation (lines): tokens it adds a line: "
          + " | ".join(f"{ind.replace(' ', '·')!r} ({n}): {(t - rest[ind][0]) / n:.2f}" for ind, (t, _, _, n) in
                       sorted(whole.items(), key=lambda kv: -kv[1][3])[:6]))


# ---------------------------------------------------------------
# CLI

def _parser():
    ap = argparse.ArgumentParser(description="Tokenizers (byte-level BPE, WordPiece, Unigram LM): train, encode, stats.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="learn a vocabulary from a text file")
    t.add_argument("--input", required=True, help="UTF-8 text file")
    t.add_argument("--vocab-size", type=int, required=True, help="256 bytes + specials + learned tokens")
    t.add_argument("--special-tokens", nargs="*", default=["<|endoftext|>"], help="never split or merged")
    t.add_argument("--out", required=True, help="directory for the tokenizer's files")
    t.add_argument("--algorithm", choices=["bpe", "wordpiece", "unigram"], default="bpe",
                   help="bpe: count merges; wordpiece: PMI merges, longest-match encode; unigram: EM + pruning, Viterbi")
    t.add_argument("--merge-score", choices=["count", "pmi"], help="pair rule (default: count for bpe, pmi for wordpiece)")
    g = t.add_mutually_exclusive_group()  # two ways to cut numbers
    g.add_argument("--split-digits", action="store_true", help="each digit is its own pre-token")
    g.add_argument("--digit-groups", type=int, default=0, metavar="N",
                   help="numbers pre-tokenized in groups of at most N digits, left to right (Llama 3: 3)")
    t.add_argument("--workers", type=int, default=None, help="pre-tokenization processes (default: CPUs)")
    e = sub.add_parser("encode", help="encode a text file to a flat uint16/uint32 .bin")
    e.add_argument("--tokenizer", required=True, help="directory written by train")
    e.add_argument("--input", required=True, help="UTF-8 text file")
    e.add_argument("--out", required=True, help="output .bin path")
    e.add_argument("--workers", type=int, default=None, help="encoding processes (default: CPUs)")
    e.add_argument("--alpha", type=float, default=None, help="Unigram only: sample each segmentation from P(seg)^alpha (subword regularization)")
    e.add_argument("--seed", type=int, default=0, help="seed of the --alpha sampler")
    s = sub.add_parser("stats", help="compression and pathologies of a tokenizer on a text")
    s.add_argument("--tokenizer", required=True, help="directory written by train")
    s.add_argument("--input", required=True, help="UTF-8 text file (first 4 MB are used)")
    s.add_argument("--ckpt", default=None, help="a model checkpoint: embedding norms of the under-trained tokens")
    return ap


def main(argv=None):
    args, t0 = _parser().parse_args(argv), time.time()
    try:
        if args.cmd == "train":
            pattern = (digit_groups_pattern(GPT2_PATTERN, args.digit_groups) if args.digit_groups else
                       SPLIT_DIGITS_PATTERN if args.split_digits else GPT2_PATTERN)
            tok = train_tokenizer(args.algorithm, args.input, args.vocab_size, args.special_tokens, pattern,
                                  merge_score=args.merge_score, workers=args.workers, verbose=True)
            tok.save(args.out)
            t, b, _, _ = cost_by_group(tok, [(0, _read_text(args.input, 0, 1 << 20))])[0]  # read() stops at EOF
            print(f"{args.algorithm}: vocab {len(tok)} -> {args.out} | {time.time() - t0:.1f}s | "
                  f"{b / t:.2f} bytes/token on the first MB of input")
        elif args.cmd == "encode":
            encode_file(args.tokenizer, args.input, args.out, workers=args.workers, alpha=args.alpha, seed=args.seed)
        else:
            _check_input(args.input)
            print_stats(Tokenizer.load(args.tokenizer), _read_text(args.input, 0, 4 << 20), args.ckpt)
    except (ValueError, FileNotFoundError, OSError) as e:  # a user error: one line, no traceback
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
