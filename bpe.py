"""
Byte-level BPE: the tokenizer that turns text into the integer ids a language model reads.

What it is. A language model predicts one symbol at a time, so we must pick the symbols. Raw
bytes (256 symbols) make sequences ~4x longer than needed and waste context and compute; whole
words leave an open vocabulary with no way to spell a word never seen. Byte-Pair Encoding
(Sennrich et al. 2015, arXiv:1508.07909; originally a compression scheme, Gage 1994) sits in
between: start from the 256 bytes, then repeatedly glue the most frequent adjacent pair into a
new symbol until the vocabulary has the size we want. Every string stays encodable (bytes are
always there), and frequent strings become single tokens. Working on UTF-8 bytes rather than
Unicode characters is GPT-2's choice (Radford et al. 2019): no unknown token, ever.

Two details make it work in practice, both from GPT-2:
  1. Pre-tokenization. A regex first cuts text into word-like pieces (" the", "123", "\\n\\n"),
     and merges never cross a piece. Without it BPE learns tokens like "dog." and "dog!".
  2. Special tokens ("<|endoftext|>") are cut out of the text *before* anything else, so they
     are never split or merged with their neighbours, and no learned token contains one.

The file reads in that order: the pattern, counting pre-tokens, the merge loop (`train_bpe`),
the `Tokenizer` (encode, decode, GPT-2's file format), the token file. Then "Making it fast":
the ASCII regex twin, parallel reading of big files in safe chunks, the pre-token cache and
long-word merging, each tested equal to the plain version. Departures from the papers:
  1. Ties between equally frequent pairs go to the lexicographically greatest (CS336's rule).
  2. `merge_score="pmi"` picks pairs by count(ab)/(count(a)count(b)), the WordPiece criterion
     (Schuster & Nakajima 2012; Wu et al. 2016, arXiv:1609.08144).
  3. `split_digits=True` makes every digit its own pre-token (as LLaMA does, Touvron et al.
     2023, arXiv:2302.13971; Llama 3 uses groups of up to three digits), so numbers tokenize uniformly.

Run it:
    python bpe.py train --input data/pydocs/train.txt --vocab-size 4096 \\
        --special-tokens '<|endoftext|>' '<|user|>' '<|assistant|>' --out data/pydocs/tokenizer
    python bpe.py encode --tokenizer data/pydocs/tokenizer --input data/pydocs/train.txt --out data/pydocs/train.bin
    python bpe.py stats --tokenizer data/pydocs/tokenizer --input data/pydocs/val.txt
    python bench.py --only bpe              # train vs HF tokenizers, encode vs tiktoken
CPU only; there is nothing here for a GPU to do.
"""

import argparse
import contextlib
import functools
import gc
import heapq
import json
import multiprocessing as mp
import os
import re
import sys
import threading
import time
from collections import Counter, defaultdict
from itertools import repeat

import numpy as np
import regex

# ---------------------------------------------------------------
# Pre-tokenization: the regex that cuts text into pieces no merge may cross. GPT-2's branches,
# in order: contractions ('s 'll 're ...), optional space + letters, optional space + digits,
# optional space + punctuation, a whitespace run not followed by a non-space (so it leaves one
# space for " word" to take), and any remaining whitespace.

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Same, but every digit stands alone: "2024" -> "2","0","2","4" (LLaMA-style).
SPLIT_DIGITS_PATTERN = GPT2_PATTERN.replace(r" ?\p{N}+", r"\p{N}")


def _special_splitter(special_tokens):
    """Regex matching any special token, longest first so "<|a|><|a|>" beats "<|a|>"."""
    if not special_tokens:
        return None
    alts = sorted(special_tokens, key=len, reverse=True)
    return regex.compile("(" + "|".join(regex.escape(s) for s in alts) + ")")  # (group): split() keeps them


# ---------------------------------------------------------------
# Training, step 1: count pre-tokens ("words"). Merges never cross a pre-token, so the corpus is
# nothing but a Counter of distinct words: " the" seen 40,000 times is merged once, weighted by 40,000.

def count_words(text, special_tokens=(), pattern=GPT2_PATTERN, findall=None):
    """Counter {pre-token bytes: count} of a text. `findall` swaps in a faster, equal pre-tokenizer."""
    splitter, findall = _special_splitter(special_tokens), findall or regex.compile(pattern).findall
    pieces = splitter.split(text)[::2] if splitter else [text]  # even slots = text, odd = specials
    counts = Counter()
    for piece in pieces:
        counts.update(findall(piece))  # Counter.update on an iterable runs in C
    return Counter({w.encode("utf-8"): c for w, c in counts.items()})  # encode once per distinct word


# ---------------------------------------------------------------
# Training, step 2: merges with incremental pair counts. The naive loop recounts every pair in
# the corpus after each merge: O(corpus), ten thousand times. But merging (a, b) into `new` only
# changes pairs that overlap an occurrence of (a, b): in "x a b y", (x, a), (a, b), (b, y) become
# (x, new), (new, y), and every other count stays put. So pair_count lives across merges, an
# index pair -> words says where the pair occurs, and each merge costs O(occurrences of the
# merged pair among distinct words): large for the first, frequent pairs, tiny for later ones.
# The most frequent pair comes off a heap. heapq cannot update an entry in place, so the heap is
# lazy: a count that rises gets a fresh entry, one that falls keeps its old, too-high entry,
# caught when it reaches the top.
#
# Tie-breaking rule (CS336): among pairs with the highest count, take the lexicographically
# greatest (bytes_a, bytes_b). heapq is a min-heap, so the heap key must *reverse* byte-string
# order. For one byte string s we use  inv(s) = chr(255 - s[0]) + ... + chr(255 - s[-1]) + chr(256):
# complementing reverses the order of differing bytes, and the trailing chr(256) (larger than any
# complemented byte) makes a prefix sort *after* its extensions, reversing "b" < "ba" too.
# Comparing the tuples (inv(a), inv(b)) then reverses tuple order, all in C string compares.

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
    """The most frequent pair (greatest bytes on ties) from the lazy heap, or None if none is left.

    Invariant: every live pair has an entry with count >= its current count. So a top entry
    whose count is current beats every other pair (their counts <= their entries <= the top).
    A stale top is popped and re-filed at its current count if the pair still exists; each push
    is popped at most once, so staleness costs O(log n) a push."""
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
    """PMI, log p(ab) / (p(a) p(b)), ranks pairs like count(ab) / (count(a) count(b)) (up to a
    factor all pairs share). A merge moves count(a) and count(b), and with them the score of
    every pair holding a or b, so no heap keeps up: we scan all pairs."""
    return max(pair_count, default=None, key=lambda p: (
        pair_count[p] / (sym_count[p[0]] * sym_count[p[1]]), vocab[p[0]], vocab[p[1]]))


def _merge_word(w, a, b, new, c, wi, pair_count, pair_words, grown):
    """Replace every (a, b) in word w (left to right) by `new`; returns the new word or None.

    Only pairs touching a merge site change. For a site at old index i:
        (w[i-1], a) -> (prev, new)     unless the previous site ended at i-1 (then (b, a) was
                                       already removed as that site's right neighbour)
        (b, w[i+2]) -> (new, w[i+2])   unless w[i+2:i+4] is itself a site (its left side adds (new, new))
    Each pair is weighted by c, the word's corpus count. The merged pair (a, b) itself is dropped
    by the caller; pairs whose count went up are added to `grown` (they need a heap entry).
    """
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
    return out if last >= 0 else None  # None: no site, a stale index entry


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
              workers=None, verbose=False, **kwargs):
    """Learn a byte-level BPE from a text file. Returns (vocab {id: bytes}, merges [(bytes, bytes), ...]).

    Ids: 0..255 are the single bytes, then the special tokens in the order given, then one id
    per merge in the order learned. Stops early if no pair is left to merge.
    """
    special_tokens = list(dict.fromkeys(special_tokens or []))  # dedupe, keep order
    if merge_score not in ("count", "pmi"):
        raise ValueError(f"merge_score must be 'count' or 'pmi', got {merge_score!r}")
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + {len(special_tokens)} special tokens")
    pattern, pmi, t0 = SPLIT_DIGITS_PATTERN if split_digits else GPT2_PATTERN, merge_score == "pmi", time.time()
    word_counts = count_file_words(input_path, special_tokens, pattern, workers, verbose=verbose, **kwargs)
    vocab = {i: bytes([i]) for i in range(256)}
    for s in special_tokens:
        vocab[len(vocab)] = s.encode("utf-8")
    num_merges = vocab_size - len(vocab)  # vocab = 256 bytes + specials + one token per merge
    # Each distinct word becomes a list of symbol ids (a byte's id is its value), so training
    # cost depends on the number of *distinct* pre-tokens, not on the corpus size.
    words, counts = [list(w) for w in word_counts], list(word_counts.values())
    pair_count, pair_words, sym_count = _pair_index(words, counts, pmi)
    # Heap entries: (-count, inv(bytes_a), inv(bytes_b), a, b). The smallest entry is the pair
    # with the highest count and, among equal counts, the greatest bytes: the CS336 choice.
    inv = {i: _inv(b) for i, b in vocab.items()}
    heap = [(-c, inv[a], inv[b], a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    merges, t1 = [], time.time()
    for m in range(num_merges):
        best = _best_pmi(pair_count, sym_count, vocab) if pmi else _pop_best(heap, pair_count, inv)
        if best is None:                                  # every word is a single token
            if verbose:
                print(f"no pairs left after {m} merges; vocab is {len(vocab)}", file=sys.stderr)
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
        if verbose and ((m + 1) % 500 == 0 or m + 1 == num_merges):
            dt = time.time() - t1
            print(f"\rmerges: {m + 1}/{num_merges} | {(m + 1) / dt:.0f} merges/s | "
                  f"ETA {dt / (m + 1) * (num_merges - m - 1):.0f}s",
                  end="\n" if m + 1 == num_merges else "", file=sys.stderr, flush=True)
    if verbose:
        print(f"trained {len(merges)} merges in {time.time() - t0:.2f}s", file=sys.stderr)
    return vocab, merges


# ---------------------------------------------------------------
# GPT-2's file format: vocab.json maps token *strings* to ids, merges.txt lists "a b" per line.
# Tokens are bytes, often not valid UTF-8 alone (half of "é" is b"\xc3"), and full of spaces,
# newlines and control bytes: none of that survives as a JSON string key or in a space-separated
# file. So GPT-2 spells each byte as one printable, non-space character: the 188 bytes that print
# as themselves in Latin-1 ("!".."~", "¡".."¬", "®".."ÿ") keep their character, and the other 68
# (controls, space, DEL, NBSP, soft hyphen) take chr(256), chr(257), ... in byte order. So " "
# (byte 32) becomes chr(256 + 32) = "Ġ" and "\n" becomes "Ċ": hence "Ġthe" in GPT-2 vocabularies.

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
    """open(path, mode) for writing that never leaves a half-written file: we write path.tmpPID,
    fsync it (so the data is on disk before the name points at it), then rename over path.
    On an error the temp file is removed and the old file, if any, stays."""
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


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# ---------------------------------------------------------------
# The tokenizer: encode with the learned merges, decode by concatenating bytes.

class Tokenizer:
    """Apply a trained BPE: text -> ids (`encode`) and ids -> text (`decode`).

    encode: cut out special tokens (longest match first) -> pre-tokenize with the same regex as
    training -> for each pre-token, start from its UTF-8 bytes and apply merges in rank order.
    That reproduces what training did to every training word (see `_bpe`), and what tiktoken
    does with the same ranks, which the tests check id for id. (tiktoken looks pairs up by the
    bytes they spell, so on rare vocabularies where two merges spell the same bytes it can
    differ; we follow the merge list.) With no special tokens, "<|endoftext|>" is plain text.
    `fast=False` runs the plain loop of `encode`; the default runs `_encode_fast`, the same ids.
    """

    def __init__(self, vocab: dict, merges: list, special_tokens=None, pattern=GPT2_PATTERN, fast=True):
        if pattern not in (GPT2_PATTERN, SPLIT_DIGITS_PATTERN):  # chunked encoding relies on their safe cuts
            raise ValueError("pattern must be GPT2_PATTERN or SPLIT_DIGITS_PATTERN")
        self.vocab = dict(vocab)                       # id -> bytes
        self.merges = list(merges)
        self.pattern, self.fast = pattern, fast
        self.special_tokens = list(dict.fromkeys(special_tokens or []))
        self.byte_to_id = {b: i for i, b in self.vocab.items()}
        for s in self.special_tokens:                   # specials missing from the vocab are appended
            if (sb := s.encode("utf-8")) not in self.byte_to_id:
                self.byte_to_id[sb] = i = max(self.vocab, default=-1) + 1
                self.vocab[i] = sb
        self.special_ids = {s: self.byte_to_id[s.encode("utf-8")] for s in self.special_tokens}
        missing = [x for x in range(256) if bytes([x]) not in self.byte_to_id]
        if missing:
            raise ValueError(f"vocab lacks {len(missing)} of the 256 single bytes (e.g. byte {missing[0]})")
        self._byte_ids = [self.byte_to_id[bytes([x])] for x in range(256)]  # GPT-2's own ids are not byte values
        # (id_a, id_b) -> rank, and rank -> id of a+b. Encoding applies the lowest rank first,
        # i.e. replays the merges in the order training learned them.
        self._rank_of, self._merged_id = {}, []
        for r, (a, b) in enumerate(self.merges):
            try:
                self._rank_of[(self.byte_to_id[a], self.byte_to_id[b])] = r
                self._merged_id.append(self.byte_to_id[a + b])
            except KeyError:
                raise ValueError(f"merge {r} ({a!r}, {b!r}) refers to a token missing from the vocab") from None
        self._pat, self._pat_ascii = regex.compile(pattern), ascii_twin(pattern)
        self._splitter = _special_splitter(self.special_tokens)
        self._cache = _Cache(functools.partial(_merge_piece, self))  # pre-token -> ids (fast path)
        self._id_bytes = [self.vocab.get(i, b"") for i in range(max(self.vocab) + 1)]  # ids may have gaps

    @property
    def vocab_size(self) -> int:
        return len(self._id_bytes)

    def __len__(self) -> int:
        return self.vocab_size

    # --- encoding ---
    def _bpe(self, piece: str) -> list:
        """Merge one pre-token: repeatedly merge the adjacent pair with the lowest rank, leftmost first.

        That equals training: whenever the lowest rank present is r, the ids are what training
        held for this word after merges 0..r-1 (a pair holding the token made by merge r ranks
        after r, so no merge brings a lower rank back), and taking the leftmost r each time
        replaces every (a, b) left to right, as training did ("a a a" -> "aa a" both ways).

        rs[i] is the rank of the pair (ids[i], ids[i+1]) (or `inf`: never merged). Merging at i
        only changes the ranks of the two pairs around it, so we patch those rather than
        recompute; min/index/del run in C. Each merge is O(len): see `_bpe_long` for long words.
        """
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
        out = []
        parts = [text] if self._splitter is None else self._splitter.split(text)
        with _gc_paused(self.fast):                # the fast path: see "Making it fast"
            for k, part in enumerate(parts):
                if k % 2:                          # odd slots are the captured special tokens
                    out.append(self.special_ids[part])
                elif self.fast:
                    _encode_fast(self, part, out)  # the loop below, with the ASCII twin and a cache
                else:
                    for piece in self._pat.findall(part):
                        ids = self._bpe(piece)     # the whole algorithm: merges, lowest rank first
                        out.extend(ids)
        return out

    def encode_iterable(self, iterable):
        """Lazily encode a stream of strings (e.g. a file read line by line).

        We buffer text and only encode up to the last safe cut (see "Making it fast"), so the ids
        equal `encode` of the whole text while memory stays bounded by one paragraph. A special
        token holding "x " could span such a cut, so in that (odd) case we buffer everything.
        """
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

    # --- decoding ---
    def decode(self, ids) -> str:
        table = self._id_bytes
        ids = ids if isinstance(ids, list) else list(ids)  # also accepts arrays and iterators
        try:
            data = b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            bad = next(i for i in ids if not isinstance(i, (int, np.integer)) or not 0 <= i < len(table))
            raise ValueError(f"token id {bad!r} out of range [0, {len(table)})") from None
        if any(i < 0 for i in ids):  # negative indexes are valid Python but not valid ids
            raise ValueError(f"token id {min(ids)} out of range [0, {len(table)})")
        return data.decode("utf-8", errors="replace")  # a cut mid-character becomes U+FFFD

    # --- files ---
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

    @classmethod
    def from_files(cls, vocab_path, merges_path, special_tokens=None, pattern=GPT2_PATTERN):
        for p in (vocab_path, merges_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"tokenizer file not found: {p}")
        raw = _read_json(vocab_path)
        if not isinstance(raw, dict) or not all(isinstance(i, int) for i in raw.values()):
            raise ValueError(f"{vocab_path}: expected a JSON object mapping token strings to integer ids")
        vocab = {i: _to_bytes(s, vocab_path) for s, i in raw.items()}
        try:
            with open(merges_path, encoding="utf-8") as f:
                lines = f.read().split("\n")  # token strings never hold whitespace (see _B2U)
        except UnicodeDecodeError as e:
            raise ValueError(f"{merges_path}: not valid UTF-8 ({e})") from None
        merges = []
        for n, line in enumerate(lines, 1):
            if not line or (n == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{merges_path}:{n}: expected two tokens separated by one space")
            merges.append((_to_bytes(parts[0], merges_path), _to_bytes(parts[1], merges_path)))
        return cls(vocab, merges, special_tokens, pattern)

    @classmethod
    def load(cls, tokenizer_dir):
        """Read a directory written by `save`."""
        if not os.path.isdir(tokenizer_dir):
            raise FileNotFoundError(f"tokenizer directory not found: {tokenizer_dir}")
        sp = os.path.join(tokenizer_dir, "special_tokens.json")
        specials = _read_json(sp) if os.path.isfile(sp) else []
        if not isinstance(specials, list) or not all(isinstance(x, str) for x in specials):
            raise ValueError(f"{sp}: expected a JSON list of strings")
        pattern, pp = GPT2_PATTERN, os.path.join(tokenizer_dir, "pattern.txt")
        if os.path.isfile(pp):
            with open(pp, encoding="utf-8") as f:
                pattern = f.read()
        return cls.from_files(os.path.join(tokenizer_dir, "vocab.json"),
                              os.path.join(tokenizer_dir, "merges.txt"), specials, pattern)


# ---------------------------------------------------------------
# A whole corpus to a flat token file. The file is nothing but the ids, back to back: np.memmap
# reads it with no parsing, and a training batch is a slice. Its dtype follows from the vocab
# size (`token_dtype`), so it needs no header.

def token_dtype(vocab_size):
    """Reader rule shared by the repo: uint16 fits ids < 65536, else uint32.

    Two bytes a token instead of four halves the file, the page cache it needs and the bytes a
    data loader moves. GPT-2's 50,257 ids fit; Llama 3's 128,256 would need the uint32 fallback."""
    return np.uint16 if vocab_size <= 65536 else np.uint32


def encode_file(tokenizer_dir, input_path, out_path, workers=None, chunk_bytes=4 << 20, verbose=True) -> int:
    """Encode a text file into a flat array of token ids readable by np.memmap. Returns the count.

    Chunks cut at safe places (see "Making it fast") are encoded by a process pool and appended
    in order to a temp file that replaces out_path at the end.
    """
    _check_input(input_path)
    tok = Tokenizer.load(tokenizer_dir)  # fail early, in this process, on a bad dir
    dtype, size, n_tokens = token_dtype(tok.vocab_size), os.path.getsize(input_path), 0
    with _atomic_open(out_path, "wb") as f:
        for arr in _map_chunks(_encode_chunk, input_path, tok.special_tokens, (dtype,), workers, chunk_bytes,
                               "encode", verbose, initializer=_init_encoder, initargs=(tokenizer_dir,)):
            arr.tofile(f)
            n_tokens += len(arr)
    if verbose:
        print(f"wrote {n_tokens:,} tokens ({np.dtype(dtype).name}) to {out_path}: "
              f"{size / max(n_tokens, 1):.2f} bytes/token", file=sys.stderr)
    return n_tokens


# ---------------------------------------------------------------
# Making it fast, 1: the stdlib `re` engine on the ASCII parts of the text. Pre-tokenization is
# the bottleneck of both training and encoding, and on ASCII text `re` runs our patterns about
# twice as fast as `regex` (README, benchmarks). `re` knows no \p{L}, so we translate the pattern
# for ASCII input and send `regex` only the spans that hold non-ASCII characters.

_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def ascii_twin(pattern):
    r"""The same pattern restricted to ASCII input, for the stdlib `re` engine.

    In ASCII, \p{L} is [A-Za-z], \p{N} is [0-9], and `regex`'s \s is [\t\n\v\f\r ] (it excludes
    \x1c-\x1f, which `re`'s \s would include, so we spell the class out). Only our two
    patterns are translated (a test checks them on random ASCII); for any other we return None.
    """
    if pattern not in (GPT2_PATTERN, SPLIT_DIGITS_PATTERN):
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
    # Mixed text is still mostly ASCII, so `regex` gets only each run of non-ASCII characters,
    # widened to the nearest safe cut (below) on either side, and `re` the rest. findall(text,
    # pos, endpos) reads a span in place (no slice is copied), and no pre-token crosses a safe
    # cut, so the pieces equal one pass over the whole text.
    out, pos = [], 0
    for m in _NON_ASCII.finditer(text):
        if m.start() < pos:                # inside the span we just gave to `regex`
            continue
        # A short ASCII stretch costs `regex` less than switching engines, so the span reaches
        # back to the last cut only across a long one, and forward to a cut that starts one.
        lo = _cut_before(text, pos, m.start()) if m.start() - pos > _ASCII_RUN else pos
        cut = _CUT_ASCII_NEXT.search(text, m.end())
        hi = cut.start() if cut else len(text)
        out += pat_ascii.findall(text, pos, lo) + pat.findall(text, lo, hi)
        pos = hi
    return out + pat_ascii.findall(text, pos)


# ---------------------------------------------------------------
# Making it fast, 2: safe cuts, where text can be split without changing a single pre-token. The
# ASCII twin above, `encode_iterable` and the parallel file reader below pre-tokenize pieces of a
# text separately, and need exactly the pre-tokens of one pass over the whole. Two cuts qualify:
#   - just before a special token that no other special occurrence straddles: the text is split
#     there anyway (see `_special_cut`);
#   - between a non-whitespace character x and whitespace: every branch of the pattern that can
#     hold x holds no whitespace after x (only an optional space before it), so x's pre-token ends
#     at x, in the whole text and in the piece before the cut, and the next one starts right after
#     x in both (no branch looks behind). We take only those whose whitespace reaches a line end:
#     "x\n", "x\r\n", "x   \n" (CJK, CRLF and trailing-space files too), so pieces are whole lines.
# Cutting *after* "\n" is not safe: "\n\n\nx" is "\n\n","\n","x" but "\n" | "\n\nx" gives
# "\n","\n","\n","x". On raw file bytes we decode first (see `_next_cut`), so x may be any character.

_CUT = regex.compile(r"(?<=\S)[\t\x0b\x0c ]*[\r\n]")  # m.start() is a safe cut; \S is the pattern's own
_CUT_LAST = regex.compile(_CUT.pattern, regex.REVERSE)   # the same, searching backwards
_ASCII_RUN = 256
_CUT_ASCII_NEXT = regex.compile(_CUT.pattern + r"(?=[\x00-\x7f]{%d})" % _ASCII_RUN)  # a cut, then ASCII


def _cut_before(text, lo, hi):
    """The last safe line cut k in text[lo:hi] with lo < k (its line end before hi), else lo."""
    m = _CUT_LAST.search(text, lo, hi)
    return m.start() if m and m.start() > lo else lo


# Reading big files in safe chunks, in parallel processes. Training (count words) and encoding
# (ids) both map a function over safe chunks of the input in a process pool. Each worker opens
# the file and reads its own byte range, so only offsets and results cross process boundaries,
# and memory holds one chunk per worker, never the whole file.

def _chunk_boundaries(path, n_chunks, special_tokens, scan=1 << 20):
    """Byte offsets [0, ..., size] cutting the file into ~n_chunks safe pieces, one cut after
    each of n_chunks - 1 evenly spaced guesses."""
    size, bounds = os.path.getsize(path), [0]
    with open(path, "rb") as f:
        for i in range(1, n_chunks):
            cut = _next_cut(f, max(size * i // n_chunks, bounds[-1] + 1), special_tokens, scan, size)
            if cut >= size:  # no cut after this guess, so none after the later ones either
                break
            bounds.append(cut)
    return bounds + [size]


def _next_cut(f, start, special_tokens, scan, size):
    """File offset of the first safe cut at or after byte `start`, else `size`. We read windows of
    `scan` bytes and take the first special token (a document boundary) in one, else its first
    line cut. The bytes are decoded with surrogateescape: any byte sequence decodes, and encoding
    a prefix back gives its exact length in bytes, so a cut found in the text maps to a file offset."""
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
    """The first i in [lo, hi) where a special token starts and no occurrence of any special
    straddles i (starts before it, ends after it), else None. Then one pass over the whole text
    reaches i with no match open and matches a special there, as it does at the start of text[i:].
    A cut just before "<|a|>" inside "<|a|><|a|>" (both special) would instead split a token in two."""
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
        # Invalid UTF-8 in a corpus becomes U+FFFD rather than aborting a long job.
        return f.read(end - start).decode("utf-8", errors="replace")


def _check_input(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"input file is empty: {path}")


def _pool(workers, **kwargs):
    """A process pool. fork starts fastest, but forking a process that already runs threads
    (torch's thread pools, a DDP test) can deadlock a child, so then we pay for spawn."""
    threaded = "torch" in sys.modules or threading.active_count() > 1
    method = "fork" if sys.platform == "linux" and not threaded else "spawn"
    return mp.get_context(method).Pool(workers, **kwargs)


def _progress(what, done, total, t0):
    """One stderr status line for `done` of `total` bytes, redrawn in place: MB, MB/s, ETA."""
    rate = done / max(time.time() - t0, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    print(f"\r{what}: {done / 1e6:.1f}/{total / 1e6:.1f} MB | {rate / 1e6:.1f} MB/s | ETA {eta:.0f}s",
          end="\n" if done >= total else "", file=sys.stderr, flush=True)


def _map_chunks(fn, path, special_tokens, args, workers, chunk_bytes, what, verbose,
                initializer=None, initargs=()):
    """Yield fn((path, start, end, *args)) for each safe chunk of the file, in file order."""
    size = os.path.getsize(path)
    bounds = _chunk_boundaries(path, max(1, -(-size // chunk_bytes)), special_tokens,
                               scan=min(1 << 20, chunk_bytes))
    jobs = [(path, a, b, *args) for a, b in zip(bounds, bounds[1:])]
    workers = workers or min(os.cpu_count() or 1, 8)
    pool, t0 = None, time.time()
    if workers == 1 or len(jobs) == 1:  # small input: a pool costs more than it saves
        if initializer:
            initializer(*initargs)
        results = map(fn, jobs)
    else:
        pool = _pool(workers, initializer=initializer, initargs=initargs)
        results = pool.imap(fn, jobs)  # imap, not imap_unordered: results come in file order
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


# Each encoding worker loads the tokenizer once (pool initializer) and keeps it, with its
# pre-token cache, for every chunk.
_worker_tok = None


def _init_encoder(tokenizer_dir):
    global _worker_tok
    _worker_tok = Tokenizer.load(tokenizer_dir)


def _encode_chunk(job):
    path, start, end, dtype = job
    return np.asarray(_worker_tok.encode(_read_text(path, start, end)), dtype=dtype)


# ---------------------------------------------------------------
# Making it fast, 3: the pre-token cache and a collector pause. Natural text repeats the same few
# thousand words, so most pre-tokens are a dict lookup instead of a merge loop (README: benchmarks).

class _Cache(dict):
    """dict that computes missing entries: cache[piece] runs fn(piece) once, then remembers it.

    A hit is a single C-level dict lookup, with no Python `if piece in cache` around it: only
    misses run Python code (dict calls __missing__ itself). That is what lets the hot loop in
    `_encode_fast` be a pair of C-level maps."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def __missing__(self, key):
        value = self[key] = self.fn(key)
        return value


def _encode_fast(tok, text, out):
    """Append the ids of `text` (no special tokens in it) to `out`: Tokenizer.encode's plain loop,
    with the ASCII twin's pre-tokens and the cache's merges."""
    cache = tok._cache
    if len(cache) > 1 << 20:  # bound memory on huge, diverse corpora
        cache.clear()
    # The hot loop, written as two C-level maps: look each pre-token up (a miss calls _bpe via
    # _Cache.__missing__) and append its ids.
    for _ in map(out.extend, map(cache.__getitem__, _findall(tok._pat, tok._pat_ascii, text))):
        pass


def _merge_piece(tok, piece):
    """The cache's merge function: the plain loop, or the heap for long pieces (same ids). The
    heap wins from ~100 characters on (README: benchmarks); natural words are far shorter."""
    return tok._bpe(piece) if len(piece) < 100 else _bpe_long(tok, piece)


def _bpe_long(tok, piece):
    """Tokenizer._bpe in O(n log n) rather than O(n^2): a 40k-character word takes seconds there.

    The symbols form a linked list (nxt/prv), and a heap holds (rank, position) of every pair,
    so its top is the lowest rank, leftmost first, exactly the pair `_bpe` picks. A merge kills
    the right symbol of its pair and pushes the two new pairs around it; entries whose pair has
    changed since are stale and skipped when they come off the heap."""
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


@contextlib.contextmanager
def _gc_paused(pause=True):
    """Pause Python's cycle collector for a block. A cold cache allocates one small list per new
    pre-token and no reference cycles, so the collector only burns time in encode, rescanning the
    growing cache and the output list. We restore it however we leave."""
    was_on = gc.isenabled()
    if pause:
        gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


# ---------------------------------------------------------------
# Diagnostics: how well does the tokenizer compress, and where does it do badly? Bytes/token is
# what matters downstream: both the text a context window holds and the compute per byte scale
# with it. The probes are the known weak spots of a byte-level BPE trained on English: numbers
# cut at arbitrary places, indentation, other scripts, emoji.

STATS_PROBES = {
    "numbers": ["2024", "3.14159", "1,000,000", "123456789", "0x7fff"],
    "code indentation": ["    return x", "        if a:\n            b()", "\tpass"],
    "non-English": ["Größenordnung", "l'élève français", "Привет, мир", "日本語のテキスト", "مرحبا بالعالم"],
    "emoji": ["🙂🎉", "👩‍💻"],
}


def tokenizer_stats(tok, text):
    ids, n_bytes, n_words = tok.encode(text), len(text.encode("utf-8")), len(text.split())
    return {"bytes": n_bytes, "tokens": len(ids), "words": n_words,
            "bytes_per_token": n_bytes / max(len(ids), 1), "tokens_per_word": len(ids) / max(n_words, 1)}


def _show(b: bytes) -> str:
    """A token for display: its text if it is whole UTF-8, else its raw bytes (b"\\xc3")."""
    try:
        return repr(b.decode("utf-8"))[1:-1]
    except UnicodeDecodeError:
        return str(b)[2:-1]


def print_stats(tok, text):
    """Print compression on `text` and how the tokenizer cuts each probe of STATS_PROBES."""
    s = tokenizer_stats(tok, text)
    print(f"{s['bytes']:,} bytes -> {s['tokens']:,} tokens | {s['bytes_per_token']:.2f} bytes/token | "
          f"{s['tokens_per_word']:.2f} tokens/word | vocab {len(tok)}")
    for group, probes in STATS_PROBES.items():
        print(f"\n{group}:")
        for p in probes:
            pieces = [_show(tok.vocab[i]) for i in tok.encode(p)]
            print(f"  {p!r:34} {len(pieces):3d} tokens  {' | '.join(pieces)}")


# ---------------------------------------------------------------
# CLI

def _parser():
    ap = argparse.ArgumentParser(description="Byte-level BPE tokenizer: train, encode, stats.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="learn merges from a text file")
    t.add_argument("--input", required=True, help="UTF-8 text file")
    t.add_argument("--vocab-size", type=int, required=True, help="256 bytes + specials + merges")
    t.add_argument("--special-tokens", nargs="*", default=["<|endoftext|>"], help="never split or merged")
    t.add_argument("--out", required=True, help="directory for vocab.json, merges.txt, special_tokens.json")
    t.add_argument("--merge-score", choices=["count", "pmi"], default="count", help="pair selection rule")
    t.add_argument("--split-digits", action="store_true", help="each digit is its own pre-token")
    t.add_argument("--workers", type=int, default=None, help="pre-tokenization processes (default: CPUs)")
    e = sub.add_parser("encode", help="encode a text file to a flat uint16/uint32 .bin")
    e.add_argument("--tokenizer", required=True, help="directory written by train")
    e.add_argument("--input", required=True, help="UTF-8 text file")
    e.add_argument("--out", required=True, help="output .bin path")
    e.add_argument("--workers", type=int, default=None, help="encoding processes (default: CPUs)")
    s = sub.add_parser("stats", help="compression and pathologies of a tokenizer on a text")
    s.add_argument("--tokenizer", required=True, help="directory written by train")
    s.add_argument("--input", required=True, help="UTF-8 text file (first 4 MB are used)")
    return ap


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "train":
            t0 = time.time()
            vocab, merges = train_bpe(args.input, args.vocab_size, args.special_tokens, merge_score=args.merge_score,
                                      split_digits=args.split_digits, workers=args.workers, verbose=True)
            pattern = SPLIT_DIGITS_PATTERN if args.split_digits else GPT2_PATTERN
            tok = Tokenizer(vocab, merges, args.special_tokens, pattern)
            tok.save(args.out)
            st = tokenizer_stats(tok, _read_text(args.input, 0, min(os.path.getsize(args.input), 1 << 20)))
            print(f"vocab {len(tok)} ({len(merges)} merges) -> {args.out} | {time.time() - t0:.1f}s | "
                  f"{st['bytes_per_token']:.2f} bytes/token on the first MB of input")
        elif args.cmd == "encode":
            encode_file(args.tokenizer, args.input, args.out, workers=args.workers)
        else:
            _check_input(args.input)
            print_stats(Tokenizer.load(args.tokenizer),
                        _read_text(args.input, 0, min(os.path.getsize(args.input), 4 << 20)))
    except (ValueError, FileNotFoundError, OSError) as e:  # a user error: one line, no traceback
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
