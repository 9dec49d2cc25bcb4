"""
model.py -- a decoder-only Transformer language model, built from scratch.

What this file teaches
    Every block of a modern (Llama-style) LM written out by hand: Linear, Embedding, RMSNorm, SwiGLU, a numerically
    stable softmax, scaled dot-product attention, rotary position embeddings (RoPE), multi-head / grouped-query
    self-attention, the pre-norm residual block, and the full LM; each design choice the README ablates is one config
    field away (LayerNorm or no norm, post-norm, sinusoidal / learned / no positions, SiLU / GELU / ReLU² MLPs, dropout,
    sliding-window attention, activation checkpointing). Then what you do with it: KV-cached sampling (temperature,
    top-k, top-p, min-p), speculative decoding with the exact accept/reject rule, FLOPs and MFU accounting, and an
    export to Hugging Face's LlamaForCausalLM with identical logits.

    "The mask is the worldview": the very same blocks become a bidirectional encoder when we drop the causal mask
    (`causal=False`); trained with BERT's masked-LM objective (`mlm_corrupt`) they learn to fill in blanks instead.

Why
    torch.nn only supplies Parameter and Module here; everything that computes is written out, so the shapes and the
    math are on the page. A flag switches attention between the from-scratch path ("scratch"), PyTorch's fused kernel
    ("sdpa", the default) and our own Triton FlashAttention ("triton", in kernels.py); all three compute one function.

Papers
    Vaswani et al. 2017, Attention Is All You Need, arXiv:1706.03762; Touvron et al. 2023, LLaMA, arXiv:2302.13971
    Zhang & Sennrich 2019, RMSNorm, arXiv:1910.07467; Shazeer 2020, GLU Variants (SwiGLU), arXiv:2002.05202
    Su et al. 2021, RoFormer (RoPE), arXiv:2104.09864; Ainslie et al. 2023, GQA, arXiv:2305.13245
    Devlin et al. 2018, BERT (masked-LM objective), arXiv:1810.04805; Ba et al. 2016, LayerNorm, arXiv:1607.06450
    So et al. 2021, Primer (ReLU²), arXiv:2109.08668; Beltagy et al. 2020, Longformer (sliding window), arXiv:2004.05150
    Kazemnejad et al. 2023, NoPE, arXiv:2305.19466; Chen et al. 2016, activation checkpointing, arXiv:1604.06174
    Holtzman et al. 2019, nucleus (top-p) sampling, arXiv:1904.09751; Nguyen et al. 2024, min-p, arXiv:2407.01082
    Leviathan et al. 2022, speculative decoding, arXiv:2211.17192; Chen et al. 2023, speculative sampling, arXiv:2302.01318
    Kaplan et al. 2020 (6N FLOPs/token), arXiv:2001.08361; Chowdhery et al. 2022 (PaLM, MFU), arXiv:2204.02311
    Rajbhandari et al. 2019, ZeRO (16 bytes per parameter of mixed-precision Adam), arXiv:1910.02054

Run it
    python model.py info --d-model 768 --num-layers 12 --num-heads 12 --vocab-size 50304 --context-length 1024
    python model.py export-hf --ckpt out/ckpt.pt --out out/hf     # then LlamaForCausalLM.from_pretrained("out/hf")
    python -m pytest -q test_all.py -k model     # its tests (CPU)
"""

import argparse
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F  # only for the fused attention backend and one_hot
import torch.utils.checkpoint

# ---------------------------------------------------------------
# Configuration

def default_d_ff(d_model: int, ffn: str = "swiglu") -> int:
    """SwiGLU has three matrices, not two, so Shazeer shrinks the hidden size to 8/3·d to keep a 4·d ReLU MLP's
    parameter count (3·(8/3)d·d ≈ 2·4d·d: two-matrix MLPs keep 4·d); we round to a multiple of 64 for fast matmuls."""
    return max(64, 64 * round(8 * d_model / 3 / 64)) if ffn == "swiglu" else 4 * d_model


CHOICES = {"attn_backend": ("sdpa", "scratch", "triton"), "norm": ("rmsnorm", "layernorm", "none"), "norm_position": ("pre", "post"),
           "pos_emb": ("rope", "sinusoidal", "learned", "none"), "ffn": ("swiglu", "silu", "gelu", "relu2")}


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    context_length: int = 128
    d_model: int = 192
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None = num_heads (plain multi-head attention)
    d_ff: int | None = None  # None = default_d_ff(d_model)
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    causal: bool = True  # False = bidirectional encoder (masked-LM)
    attn_backend: str = "sdpa"  # F.scaled_dot_product_attention | "scratch" (from-scratch math) | "triton" (kernels.py)
    norm: str = "rmsnorm"  # | "layernorm" (GPT-2) | "none"
    norm_position: str = "pre"  # | "post" (Vaswani et al.'s original placement)
    pos_emb: str = "rope"  # | "sinusoidal" (Vaswani et al.) | "learned" (GPT-2) | "none" (NoPE: only the causal mask tells position)
    ffn: str = "swiglu"  # | "silu" | "gelu" | "relu2" (So et al. 2021): the two-matrix MLPs, d_ff = 4·d
    dropout: float = 0.0  # on each residual branch and the attention weights, in training only
    window: int | None = None  # sliding-window attention: a query sees its last `window` positions
    activation_checkpointing: bool = False  # recompute each block in backward (memory for time)
    num_experts: int = 0  # > 1: a mixture-of-experts FFN with this many experts (0 or 1: dense)
    experts_top_k: int = 1  # experts each token is routed to
    bias: bool = False  # biases on the attention and MLP Linears (GPT-2 has them; import-hf sets it)
    norm_eps: float = 1e-5  # the eps of every RMSNorm / LayerNorm
    quant_bits: int | None = None  # 8 or 4: every Linear stored as int8 / int4 + group scales (model.py quantize)
    quant_group_size: int = 64  # consecutive input columns that share one scale

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.d_ff is None:
            self.d_ff = default_d_ff(self.d_model, self.ffn)
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.pos_emb == "rope" and (self.d_model // self.num_heads) % 2:
            raise ValueError("head dimension must be even for RoPE")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r} (choose from {', '.join(choices)})")
        if self.num_experts > 1 and not 1 <= self.experts_top_k <= self.num_experts:
            raise ValueError(f"need 1 <= experts_top_k <= num_experts (got {self.experts_top_k} of {self.num_experts})")
        if not 0 <= self.dropout < 1 or (self.window is not None and (self.window < 1 or not self.causal)):
            raise ValueError(f"need 0 <= dropout < 1 and window >= 1 on a causal model (got dropout={self.dropout}, window={self.window})")


# ---------------------------------------------------------------
# Primitives: Linear, Embedding, RMSNorm, SiLU, SwiGLU, softmax (and the ablations' LayerNorm, MLP, dropout)

class Linear(nn.Module):
    """y = x W^T (+ b, only for imported GPT-2s). W is stored (out, in) like torch so state dicts
    interchange. Init: truncated normal with σ² = 2/(d_in + d_out) (Glorot), clipped at ±3σ."""

    def __init__(self, d_in: int, d_out: int, device=None, dtype=None, bias=False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(d_out, device=device, dtype=dtype)) if bias else None
        std = math.sqrt(2.0 / (d_in + d_out))
        nn.init.trunc_normal_(self.weight, 0.0, std, -3 * std, 3 * std)

    def forward(self, x):
        y = x @ self.weight.t()  # (..., d_in) @ (d_in, d_out) -> (..., d_out)
        return y if self.bias is None else y + self.bias


class Embedding(nn.Module):
    """A lookup table: row i is the vector of token i. Init N(0, 1) clipped at ±3."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.weight, 0.0, 1.0, -3.0, 3.0)

    def forward(self, token_ids):
        # = self.weight[token_ids], but that indexing's backward (index_put_ with accumulate) sums the rows of a
        # token seen twice in thread-dependent order: runs on 2+ threads then differ in the last bit, and drift.
        return self.weight.index_select(0, token_ids.reshape(-1)).view(*token_ids.shape, -1)  # (B, T) -> (B, T, C)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight. Unlike LayerNorm, no mean subtraction and no bias: rescaling alone keeps
    activations tame, and is cheaper. We square and average in fp32 (bf16 sums of squares lose too many bits)."""

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def forward(self, x):
        in_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # (B, T, C) / rms
        return (x * self.weight.float()).to(in_dtype)


class LayerNorm(nn.Module):
    """(x - mean(x)) / sqrt(var(x) + eps) * weight + bias (Ba et al. 2016; GPT-2's): RMSNorm plus centring and bias."""

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(d_model, device=device, dtype=dtype))

    def forward(self, x):
        in_dtype, x = x.dtype, x.float()
        x = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + self.eps)
        return (x * self.weight.float() + self.bias.float()).to(in_dtype)


def make_norm(cfg, device=None, dtype=None):
    """The config's norm; "none" is the identity (the ablation that shows what the norms are for)."""
    if cfg.norm == "none":
        return nn.Identity()
    return (RMSNorm if cfg.norm == "rmsnorm" else LayerNorm)(cfg.d_model, cfg.norm_eps, device=device, dtype=dtype)


def silu(x):
    """SiLU (a.k.a. swish): x·σ(x). torch.sigmoid is stable for |x| large (no exp overflow)."""
    return x * torch.sigmoid(x)


class SwiGLU(nn.Module):
    """FFN(x) = W2( silu(W1 x) ⊙ W3 x ): a gated MLP; the gate W3 x lets the network switch
    features on and off multiplicatively, which trains better than a plain ReLU MLP."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device, dtype)  # weight (d_ff, d_model)
        self.w2 = Linear(d_ff, d_model, device, dtype)  # weight (d_model, d_ff)
        self.w3 = Linear(d_model, d_ff, device, dtype)  # weight (d_ff, d_model)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # F.silu: silu() above as one op each way, not three (faster)


class MLP(nn.Module):
    """FFN(x) = W2 act(W1 x): the ungated two-matrix MLP of Vaswani et al. (ReLU) and GPT-2 (GELU)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, device=None, dtype=None, bias=False):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device, dtype, bias)
        self.w2 = Linear(d_ff, d_model, device, dtype, bias)
        self.activation = activation

    def forward(self, x):
        h = self.w1(x)  # (..., d_ff)
        if self.activation == "gelu":  # x·Φ(x) in GPT-2's tanh approximation (HF "gelu_new"; Hendrycks & Gimpel 2016)
            h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        elif self.activation == "relu2":  # max(0, x)² (So et al. 2021, Primer)
            h = torch.relu(h).square()
        else:
            h = silu(h)
        return self.w2(h)


def make_ffn(cfg, device=None, dtype=None):
    """The config's dense FFN: SwiGLU, or a two-matrix MLP with the chosen activation."""
    if cfg.ffn == "swiglu":
        return SwiGLU(cfg.d_model, cfg.d_ff, device, dtype)
    return MLP(cfg.d_model, cfg.d_ff, cfg.ffn, device, dtype, cfg.bias)


class MoE(nn.Module):
    """Mixture of experts (Shazeer et al. 2017; GShard; Switch, Fedus et al. 2021): E FFNs, a router
    sends each token to its top-k, and their outputs are mixed by the router's softmax renormalized
    over the chosen k. Capacity grows with E, FLOPs per token only with k ("active" parameters)."""

    def __init__(self, cfg, device=None, dtype=None):
        super().__init__()
        self.k = cfg.experts_top_k
        self.router = Linear(cfg.d_model, cfg.num_experts, device, dtype)
        self.experts = nn.ModuleList([make_ffn(cfg, device, dtype) for _ in range(cfg.num_experts)])
        self.aux_loss = self.fractions = None  # set by each forward

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, x.shape[-1])  # (N, C): every token is routed on its own
        probs = softmax(self.router(x).float())  # (N, E) router probabilities
        top_p, top_i = probs.topk(self.k, dim=-1)  # (N, k)
        gates = (top_p / top_p.sum(-1, keepdim=True)).to(x.dtype)  # = softmax over the k chosen logits
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):  # the plain dispatch: gather e's tokens, run e, scatter back
            tok, slot = (top_i == e).nonzero(as_tuple=True)  # tokens that chose e, and in which of their k slots
            if len(tok):
                out.index_add_(0, tok, gates[tok, slot, None] * expert(x[tok]))
        # Switch's load-balancing loss E·Σ_i f_i·P_i: f_i = share of the routed slots (no gradient), P_i =
        # mean router probability (the gradient). Its minimum, 1, is a uniform load: no expert starves.
        f = torch.bincount(top_i.flatten(), minlength=len(self.experts)).float() / top_i.numel()
        self.aux_loss, self.fractions = len(self.experts) * (f * probs.mean(0)).sum(), f
        return out.reshape(shape)


def dropout(x, p: float):
    """Inverted dropout (Srivastava et al. 2014): zero each entry with probability p and scale the
    survivors by 1/(1-p), so the expectation is unchanged and eval (p = 0) is the identity."""
    if p == 0:
        return x
    return x * (torch.rand_like(x) >= p).to(x.dtype) / (1 - p)


def softmax(x, dim: int = -1):
    """softmax(x)_i = exp(x_i - max x) / Σ_j exp(x_j - max x). Subtracting the max changes
    nothing mathematically but keeps exp() ≤ 1, so logits of 1e4 do not overflow to inf."""
    x = x - x.amax(dim=dim, keepdim=True)
    e = torch.exp(x)
    return e / e.sum(dim=dim, keepdim=True)


# ---------------------------------------------------------------
# Attention: scaled dot product, RoPE, multi-head / grouped-query

def scaled_dot_product_attention(Q, K, V, mask=None, dropout_p: float = 0.0):
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V. Q (..., T_q, d_k), K (..., T_k, d_k), V (..., T_k, d_v);
    mask (T_q, T_k) bool, True = may attend. Dividing by sqrt(d_k) keeps the dot products at unit variance so
    softmax does not saturate. Masked scores become -inf, i.e. exactly zero weight after the softmax."""
    scores = Q @ K.transpose(-2, -1) / math.sqrt(Q.shape[-1])  # (..., T_q, T_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return dropout(softmax(scores, dim=-1), dropout_p) @ V  # (..., T_q, d_v)


def sinusoidal_table(max_len: int, d_model: int):
    """Vaswani et al.'s fixed positions, added to the embeddings: PE[p, 2i] = sin(p / 10000^(2i/d)),
    PE[p, 2i+1] = cos(p / 10000^(2i/d)). Each pair is a clock at its own frequency."""
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)  # (ceil(d/2),)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, ceil(d/2))
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)[:, :d_model]  # (max_len, d): sin, cos, sin, ...


class RotaryEmbedding(nn.Module):
    """RoPE: rotate each pair (x[2k], x[2k+1]) of a query/key by the angle pos·θ^(-2k/d).
    A rotation by angle a·i on q and a·j on k leaves q·k depending only on a·(i - j): the
    attention score sees *relative* position, with no learned position table at all."""

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device=None):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, d_k, 2, device=device, dtype=torch.float32) / d_k)  # (d_k/2,)
        angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)  # (max_seq_len, d_k/2)
        # Not persistent: a pure function of the config, so it stays out of the state dict.
        self.register_buffer("rot", torch.stack([angles.cos(), angles.sin()], -1), persistent=False)  # (max_seq_len, d_k/2, 2)

    def forward(self, x, token_positions):
        # x (..., T, d_k); token_positions (..., T) broadcastable against x's leading dims. Each pair (x1, x2) turns by a:
        # (x1 cos a - x2 sin a, x2 cos a + x1 sin a), in fp32 (there is no complex bf16). Eager reads the pair as z = x1 +
        # i·x2: z·e^{ia} is that rotation in one complex multiply (Llama's way; faster on CPU, and backward keeps no copy).
        pairs, rot = x.float().unflatten(-1, (-1, 2)), self.rot[token_positions]  # (..., T, d_k/2, 2): pairs, (cos, sin)
        if not torch.compiler.is_compiling():  # Inductor generates no code for complex ops: it gets the real form below
            return torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rot)).flatten(-2).to(x.dtype)
        (x1, x2), (cos, sin) = pairs.unbind(-1), rot.unbind(-1)
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2).to(x.dtype)  # (..., T, d_k)


class MultiHeadSelfAttention(nn.Module):
    """Causal multi-head self-attention with RoPE and optional grouped-query attention (GQA): num_kv_heads <
    num_heads lets groups of query heads share one key/value head, shrinking the KV cache by num_heads/num_kv_heads
    at a small quality cost. Heads are laid out head-major: rows [h·d_k, (h+1)·d_k) of q_proj belong to head h."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.d_k = cfg.d_model // cfg.num_heads
        self.q_proj = Linear(cfg.d_model, self.num_heads * self.d_k, device, dtype, cfg.bias)
        self.k_proj = Linear(cfg.d_model, self.num_kv_heads * self.d_k, device, dtype, cfg.bias)
        self.v_proj = Linear(cfg.d_model, self.num_kv_heads * self.d_k, device, dtype, cfg.bias)
        self.output_proj = Linear(self.num_heads * self.d_k, cfg.d_model, device, dtype, cfg.bias)
        self.rope = RotaryEmbedding(cfg.rope_theta, self.d_k, cfg.context_length, device) if cfg.pos_emb == "rope" else None

    def forward(self, x, start_pos: int = 0, kv_cache=None):
        B, T, _ = x.shape
        # Rotate while q, k are still contiguous (B, T, heads, d_k), then move heads forward for attention
        # (elementwise work on the transposed layout is measurably slower on CPU); (T, 1) positions broadcast.
        pos = torch.arange(start_pos, start_pos + T, device=x.device)[:, None]  # (T, 1)
        q = self.q_proj(x).view(B, T, self.num_heads, self.d_k)  # (B, T, H, d_k)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.d_k)  # (B, T, Hkv, d_k)
        if self.rope is not None:  # other pos_emb variants add their positions to the embeddings instead
            q, k = self.rope(q, pos), self.rope(k, pos)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, d_k), (B, Hkv, T, d_k)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.d_k).transpose(1, 2)  # (B, Hkv, T, d_k)
        if kv_cache is not None:
            # Write this step's keys/values into the preallocated cache, then attend to all of it.
            k_buf, v_buf = kv_cache
            k_buf[:, :, start_pos : start_pos + T] = k
            v_buf[:, :, start_pos : start_pos + T] = v
            k, v = k_buf[:, :, : start_pos + T], v_buf[:, :, : start_pos + T]  # (B, Hkv, T_k, d_k)
            k, v = k.to(q.dtype), v.to(q.dtype)  # under autocast q is bf16 while the buffers may be fp32
        if self.num_kv_heads != self.num_heads:
            # GQA: query head h reads kv head h // group (each kv head repeated `group` times).
            group = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(group, dim=1)  # (B, H, T_k, d_k)
            v = v.repeat_interleave(group, dim=1)
        y = self._attend(q, k, v)  # (B, H, T, d_k)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.d_k)  # heads side by side
        return self.output_proj(y)

    def _attend(self, q, k, v):
        """Three interchangeable implementations of softmax(q k^T / sqrt(d_k) + mask) v."""
        T_q, T_k = q.shape[-2], k.shape[-2]
        causal, backend, window = self.cfg.causal, self.cfg.attn_backend, self.cfg.window
        p = self.cfg.dropout if self.training and torch.is_grad_enabled() else 0.0  # attention dropout, as in the block
        if backend == "triton" and T_q == T_k and not window and not p:  # decode steps, windows, dropout: sdpa below
            return _triton_attention(q, k, v, causal)
        # With a KV cache the T_q new queries are the *last* T_q of the T_k positions: query i sits at position
        # (T_k - T_q) + i and may see keys j ≤ (T_k - T_q) + i. One decoding query (T_q = 1) sees it all: no mask.
        mask = None
        if causal and (T_q > 1 or window):
            i = torch.arange(T_q, device=q.device)[:, None] + (T_k - T_q)
            j = torch.arange(T_k, device=q.device)[None, :]
            mask = j <= i  # (T_q, T_k)
            if window:  # sliding window (Child et al. 2019; Mistral): only the last `window` keys, i - window < j
                mask = mask & (j > i - window)
        if backend == "scratch":
            return scaled_dot_product_attention(q, k, v, mask, p)
        # PyTorch's fused kernel picks flash / memory-efficient / math by device and dtype; with
        # is_causal it never materializes the mask (and skips the masked half on GPU).
        if mask is not None and T_q == T_k and not window:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


def _triton_attention(q, k, v, causal):
    """Our FlashAttention-2 kernel from kernels.py, imported only when asked for, so model.py runs anywhere torch does.
    Without CUDA, kernels.py runs Triton's interpreter (TRITON_INTERPRET=1: correct, ~1000x slower, fine for tests)."""
    try:
        import kernels
    except ImportError as e:  # triton missing, or kernels.py not next to model.py
        raise RuntimeError(f"attn_backend='triton' needs triton and kernels.py ({e}); use attn_backend='sdpa'") from e
    if q.device.type != "cuda" and not getattr(kernels, "INTERPRET", False):
        raise RuntimeError("attn_backend='triton' needs a CUDA device (or TRITON_INTERPRET=1); use attn_backend='sdpa'")
    return kernels.FlashAttentionTriton.apply(q, k, v, causal)  # (B, H, T, d_k)


# ---------------------------------------------------------------
# The Transformer block and the language model

class TransformerBlock(nn.Module):
    """Pre-norm residual block: x = x + attn(ln1(x)); x = x + ffn(ln2(x)). Normalizing each sublayer's *input* leaves
    the residual stream an untouched identity path, which is why deep pre-norm stacks need no warmup tricks."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.ln1 = make_norm(cfg, device, dtype)
        self.attn = MultiHeadSelfAttention(cfg, device, dtype)
        self.ln2 = make_norm(cfg, device, dtype)
        self.ffn = MoE(cfg, device, dtype) if cfg.num_experts > 1 else make_ffn(cfg, device, dtype)

    def forward(self, x, start_pos: int = 0, kv_cache=None):
        # residual dropout on each branch's output; off in eval and under no_grad (sampling): no gradient to regularize
        p = self.cfg.dropout if self.training and torch.is_grad_enabled() else 0.0
        if self.cfg.norm_position == "post":  # Vaswani et al.: normalize the stream after each addition
            x = self.ln1(x + dropout(self.attn(x, start_pos, kv_cache), p))
            return self.ln2(x + dropout(self.ffn(x), p))
        x = x + dropout(self.attn(self.ln1(x), start_pos, kv_cache), p)
        return x + dropout(self.ffn(self.ln2(x)), p)


class KVCache:
    """Per-layer key/value buffers preallocated to max_len; `pos` = positions filled (lower it to roll back drafts)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        # Why cache: at step t the keys/values of tokens < t equal those at step t-1 (causal attention never sees
        # the future), so recomputing them is waste. It holds 2·L·Hkv·d_k·T numbers per sequence: what GQA shrinks.
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.d_model // cfg.num_heads)
        self.layers = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                       for _ in range(cfg.num_layers)]  # (k_buf, v_buf) per layer, each (B, Hkv, max_len, d_k)
        self.max_len = max_len
        self.pos = 0


class TransformerLM(nn.Module):
    """token ids -> embeddings -> num_layers blocks -> final RMSNorm -> lm_head -> logits."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.token_embeddings = Embedding(cfg.vocab_size, cfg.d_model, device, dtype)
        if cfg.pos_emb == "learned":  # GPT-2: one trained vector per position, added to the token's
            self.position_embeddings = Embedding(cfg.context_length, cfg.d_model, device, dtype)
            # σ 0.02 as GPT-2/nanoGPT, not the token table's N(0, 1): a position starts as a small nudge to its token
            # (at N(0, 1) it drowned the tied GPT-2 token embedding, which is Glorot-small; README: ablations)
            nn.init.normal_(self.position_embeddings.weight, std=0.02)
        if cfg.pos_emb == "sinusoidal":  # a fixed function of the config: not in the state dict
            self.register_buffer("sinusoids", sinusoidal_table(cfg.context_length, cfg.d_model).to(device), persistent=False)
        self.layers = nn.ModuleList([TransformerBlock(cfg, device, dtype) for _ in range(cfg.num_layers)])
        self.ln_final = make_norm(cfg, device, dtype)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, device, dtype)
        if cfg.tie_embeddings:
            # One matrix both reads tokens in and scores them out (Press & Wolf 2016). It keeps the
            # lm_head's small Glorot init: N(0,1) rows would make the initial logits ~sqrt(d) large.
            self.token_embeddings.weight = self.lm_head.weight

    def forward(self, idx, kv_cache: KVCache | None = None):
        return self.lm_head(self.hidden(idx, kv_cache))  # (B, T, V)

    def moe_stats(self):
        """(sum of the MoE layers' load-balancing losses, per-layer expert token fractions) of the last forward."""
        moe = [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)]
        return float(sum(m.aux_loss.detach() for m in moe)), [m.fractions.tolist() for m in moe]

    def hidden(self, idx, kv_cache: KVCache | None = None):
        """The last layer's normalized features (B, T, C): all but the lm_head (a reward model puts its head here)."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.cfg.context_length:
            raise ValueError(f"sequence length {start + T} exceeds context_length {self.cfg.context_length}")
        x = self.token_embeddings(idx)  # (B, T, C)
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        if self.cfg.pos_emb == "learned":
            x = x + self.position_embeddings(pos)
        elif self.cfg.pos_emb == "sinusoidal":
            x = x + self.sinusoids[pos].to(x.dtype)
        recompute = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            cache = kv_cache.layers[i] if kv_cache is not None else None
            if recompute:  # keep only each block's input; backward re-runs its forward (RNG state replayed)
                x = torch.utils.checkpoint.checkpoint(layer, x, start, cache, use_reentrant=False)
            else:
                x = layer(x, start, cache)
        if kv_cache is not None:
            kv_cache.pos = start + T
        return self.ln_final(x)  # (B, T, C)

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Parameter count (a tied matrix counts once). non_embedding=True drops the input embedding table, a lookup
        that costs no FLOPs (Kaplan et al.'s N); a tied table stays: as lm_head it does a full matmul. active=True:
        of a mixture of experts, only the k experts a token runs through (see MoE)."""
        n = sum(p.numel() for p in self.parameters())
        if active and self.cfg.num_experts > 1:
            idle = self.cfg.num_experts - self.cfg.experts_top_k
            n -= sum(idle * sum(p.numel() for p in layer.ffn.experts[0].parameters()) for layer in self.layers)
        if non_embedding and not self.cfg.tie_embeddings:
            n -= self.token_embeddings.weight.numel()
        return n - (self.position_embeddings.weight.numel() if non_embedding and self.cfg.pos_emb == "learned" else 0)


# ---------------------------------------------------------------
# Masked-LM corruption (BERT): the encoder's training objective

def mlm_corrupt(idx, mask_token_id: int, vocab_size: int, generator=None, mask_prob: float = 0.15):
    """Select mask_prob of the positions; of those 80% become [MASK], 10% a random token, 10% stay unchanged (so the
    model cannot learn "only [MASK] positions matter"). -> (inputs, labels); labels are -100 (ignored) elsewhere."""
    u = torch.rand(idx.shape, generator=generator, device=idx.device)
    selected = u < mask_prob
    labels = torch.where(selected, idx, torch.full_like(idx, -100))
    r = torch.rand(idx.shape, generator=generator, device=idx.device)
    random_tokens = torch.randint(0, vocab_size, idx.shape, generator=generator, device=idx.device)
    inputs = torch.where(selected & (r < 0.8), torch.full_like(idx, mask_token_id), idx)
    inputs = torch.where(selected & (r >= 0.8) & (r < 0.9), random_tokens, inputs)
    return inputs, labels


# ---------------------------------------------------------------
# Counting: parameters, FLOPs, MFU

def count_params(cfg: ModelConfig, non_embedding: bool = False, active: bool = False) -> int:
    """The same count as TransformerLM.num_params, from the config alone (no model built). active=True
    counts, of a mixture of experts, the router and the k experts a token uses: what its FLOPs scale with."""
    d, d_k = cfg.d_model, cfg.d_model // cfg.num_heads
    attn = d * d_k * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)  # q, output: H·d_k; k, v: Hkv·d_k
    norm = {"rmsnorm": d, "layernorm": 2 * d, "none": 0}[cfg.norm]  # gain (+ bias)
    ffn = (3 if cfg.ffn == "swiglu" else 2) * d * cfg.d_ff + cfg.bias * (cfg.ffn != "swiglu") * (cfg.d_ff + d)
    if cfg.num_experts > 1:  # E experts (k of them active) + the router
        ffn = (cfg.experts_top_k if active else cfg.num_experts) * ffn + d * cfg.num_experts
    block = attn + ffn + 2 * norm + cfg.bias * (d_k * (cfg.num_heads + 2 * cfg.num_kv_heads) + d)  # + two norms, attn biases
    emb = cfg.vocab_size * d
    n = cfg.num_layers * block + norm + emb  # + ln_final + lm_head
    if not cfg.tie_embeddings and not non_embedding:
        n += emb  # separate input embedding table
    if cfg.pos_emb == "learned" and not non_embedding:
        n += cfg.context_length * d
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward) = 6N + 12·L·d·T (PaLM appendix B). 6N: each weight does one
    multiply-add (2 FLOPs) per token forward and twice that backward. 12·L·d·T: the attention matmuls QK^T and AV,
    with no weights but 2·2·T·d FLOPs per layer per token forward (x3 for fwd+bwd). We count the full T×T square,
    like PaLM and nanoGPT, though a causal kernel skips half of it (and a `window` all but a band)."""
    T = seq_len or cfg.context_length
    return 6 * count_params(cfg, non_embedding=True, active=True) + 12 * cfg.num_layers * cfg.d_model * T  # MoE: active N


def memory_bytes(cfg: ModelConfig, batch_size: int) -> dict:
    """Training memory (bytes) in bf16 mixed precision for one batch_size x context_length batch: weights and grads
    2 bytes per parameter, AdamW 12 (fp32 master copy + two moments: ZeRO's 16 bytes/parameter), and the activations
    autograd keeps for a bf16 forward's backward, counted from our code (a test checks it against the tensors
    autograd really saves). Per token and layer: each RMSNorm keeps fp32 input and output, each projection its bf16
    input, attention q, k, v, its output (no T x T matrix: fused kernel), SwiGLU four d_ff-wide tensors; per position
    and layer, RoPE's two complex rotation rows (q's and k's; the rotated inputs are not needed: the rotation's
    gradient is the inverse rotation). After the last layer: the final norm and the fp32 logits of the loss."""
    n, d, f, d_k = count_params(cfg), cfg.d_model, cfg.d_ff, cfg.d_model // cfg.num_heads
    norms, inputs, attn = 2 * (4 * d + 4 * d + 4), 2 * 2 * d, 2 * 4 * d + 4 * cfg.num_heads
    per_layer = norms + inputs + attn + 2 * 4 * f  # bytes per token
    rope = 2 * 4 * d_k * cfg.context_length if cfg.pos_emb == "rope" else 0  # bytes per layer: 2 x (T, d_k/2, 2) fp32
    last = 8 + (8 * d + 4) + 2 * d + 4 * cfg.vocab_size  # token ids, ln_final, fp32 logits
    tokens = batch_size * cfg.context_length
    acts = tokens * (cfg.num_layers * per_layer + last) + cfg.num_layers * rope
    return {"weights": 2 * n, "grads": 2 * n, "optimizer": 12 * n, "activations": acts}


# Dense bf16 tensor-core peaks (FLOP/s) from the vendor datasheets, keyed by the exact torch.cuda.get_device_name().
# PCIe, SXM and NVL parts of one chip differ (clock, power): match exactly, not by substring ("l40" is not "l4").
PEAK_FLOPS = {
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200 480GB": 989e12,
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,  # SXM | PCIe | NVL
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L40S": 362e12, "NVIDIA GeForce RTX 4090": 165e12, "NVIDIA A10": 125e12, "NVIDIA L4": 121e12,
}


def device_peak_flops(device=None) -> float | None:
    """The bf16 peak of a CUDA device, looked up by its exact name; None on CPU or an unknown GPU."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    return PEAK_FLOPS.get(torch.cuda.get_device_name(device))


def estimate_mfu(cfg: ModelConfig, tokens_per_s: float, peak_flops: float | None = None, seq_len: int | None = None, device=None) -> float | None:
    """Model FLOPs utilization = achieved model FLOP/s / peak FLOP/s (0.5 = 50%); None if no peak is known (CPU)."""
    peak = peak_flops or device_peak_flops(device)
    if not peak:
        return None
    return flops_per_token(cfg, seq_len) * tokens_per_s / peak


# ---------------------------------------------------------------
# Sampling with a KV cache

def logits_to_probs(logits, temperature: float = 1.0, top_k=None, top_p=None, min_p=None):
    """Turn last-position logits (B, V) into a sampling distribution (B, V). temperature 0 = greedy (a one-hot on
    the argmax); top-k keeps the k most likely tokens; min-p drops tokens with p < min_p·p_max; top-p keeps the
    smallest set with mass ≥ top_p. Out-of-range knobs are a ValueError (one line in the CLIs), not a silent
    surprise: T < 0 would reverse the distribution, top_p = 0 would drop every token."""
    if (temperature < 0 or (top_k is not None and top_k < 0) or (top_p is not None and not 0 < top_p <= 1)
            or (min_p is not None and not 0 <= min_p <= 1)):
        raise ValueError(f"sampling needs temperature >= 0, top_k >= 0, 0 < top_p <= 1, 0 <= min_p <= 1 "
                         f"(got temperature={temperature}, top_k={top_k}, top_p={top_p}, min_p={min_p})")
    logits = logits.float()
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:  # None or 0 = off
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = softmax(logits, dim=-1)
    if min_p is not None:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    if top_p is not None:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token if the mass strictly before it already reaches top_p (the top one always stays).
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    return probs / probs.sum(-1, keepdim=True)


@torch.no_grad()
def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None, top_p=None, min_p=None, stop_token=None, generator=None):
    """Sample max_new_tokens tokens after the prompt idx (B, T); returns (B, T + n) (fewer if every
    row hit stop_token; finished rows are padded with stop_token)."""
    steps = stream(model, idx, max_new_tokens, temperature, top_k, top_p, min_p, stop_token, generator)
    return torch.cat([idx] + [nxt for nxt, _ in steps], dim=1)


@torch.no_grad()
def stream(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None, top_p=None, min_p=None, stop_token=None, generator=None):
    """generate() one step at a time: yields (next ids (B, 1), the logits they were sampled from (B, V)), so a chat
    can print each token as it is sampled. The prompt is run once (prefill) to fill the KV cache; after that each
    step feeds only the newest token, so a step costs O(T) attention instead of re-running the whole sequence. Once
    the window is full we slide it like nanoGPT (re-run the last context_length tokens, no cache)."""
    # Temperature divides the logits before the softmax: < 1 sharpens toward the argmax, > 1 flattens toward uniform.
    # Truncation (top-k, top-p, min-p) cuts the unreliable tail that, summed over many tokens, derails long samples.
    cfg = model.cfg
    ctx = cfg.context_length
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, idx.shape[0], ctx, idx.device, dtype)
    logits = model(idx[:, -ctx:], kv_cache=cache)[:, -1]  # prefill: (B, V)
    out = idx
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        probs = logits_to_probs(logits, temperature, top_k, top_p, min_p)
        nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        if stop_token is not None:
            nxt = nxt.masked_fill(done[:, None], stop_token)
            done = done | (nxt[:, 0] == stop_token)
        yield nxt, logits
        if step == max_new_tokens - 1 or done.all():
            break
        out = torch.cat([out, nxt], dim=1)
        if cache.pos < ctx:
            logits = model(nxt, kv_cache=cache)[:, -1]  # decode: one token, O(T) work
        else:
            logits = model(out[:, -ctx:])[:, -1]  # window full: slide it


# ---------------------------------------------------------------
# Speculative decoding

def speculative_accept(p, q, draft_tokens, generator=None):
    """The accept/reject rule that makes speculative sampling exact. p (k+1, V): target distributions at the k
    drafted positions plus one more; q (k, V): draft distributions; draft_tokens (k,) were sampled from q. Accept
    x_i with probability min(1, p_i(x_i)/q_i(x_i)); at the first rejection sample from normalize(max(0, p_i - q_i))
    and stop; if all k are accepted, sample a bonus token from p_{k+1}. Then every emitted token is distributed
    exactly as the target would have sampled it (Leviathan et al. 2022, Thm 1):
        P(emit x) = P(draft x and accept) + P(reject) · residual(x)
                  = q(x)·min(1, p(x)/q(x)) + (1 - Σ_y min(p(y), q(y))) · max(0, p(x)-q(x)) / Σ_y max(0, p(y)-q(y))
                  = min(p(x), q(x)) + max(0, p(x) - q(x)) = p(x),
    because Σ max(0, p-q) = 1 - Σ min(p, q) (both distributions sum to one). -> the emitted token ids (1..k+1)."""
    out = []
    for i, x in enumerate(draft_tokens.tolist()):
        r = torch.rand((), generator=generator, device=p.device)
        if r < torch.clamp(p[i, x] / q[i, x], max=1.0):
            out.append(x)
            continue
        residual = torch.clamp(p[i] - q[i], min=0.0)
        if residual.sum() <= 0:  # p == q up to rounding: rejection was a rounding artifact
            residual = p[i]
        out.append(torch.multinomial(residual / residual.sum(), 1, generator=generator).item())
        return out
    out.append(torch.multinomial(p[-1], 1, generator=generator).item())
    return out


@torch.no_grad()
def speculative_generate(target, draft, idx, max_new_tokens: int, k: int = 4, temperature: float = 1.0, generator=None, stats=None):
    """A small draft model proposes k tokens, ONE target forward pass verifies them all, and we keep the accepted
    prefix (+1 token from the target): the target's own output distribution, at up to k+1 tokens per target pass.
    Batch size 1; prompt + new tokens must fit both context windows. `stats` (a dict) gets proposed/accepted counts."""
    if idx.shape[0] != 1:
        raise ValueError("speculative_generate supports batch size 1")
    T0 = idx.shape[1]
    if T0 + max_new_tokens > min(target.cfg.context_length, draft.cfg.context_length):
        raise ValueError("prompt + max_new_tokens exceeds a model's context_length")
    tc, dc = (KVCache(m.cfg, 1, m.cfg.context_length, idx.device, next(m.parameters()).dtype) for m in (target, draft))
    out = idx
    proposed = accepted = 0
    # Invariant: each cache holds positions < pos ≤ n-1; the tokens out[pos:] are still to be fed.
    while out.shape[1] < T0 + max_new_tokens:
        n = out.shape[1]
        kk = min(k, T0 + max_new_tokens - n)
        # 1) draft proposes kk tokens autoregressively, remembering its distributions q.
        feed, qs, drafted = out[:, dc.pos :], [], []
        for _ in range(kk):
            q = logits_to_probs(draft(feed, kv_cache=dc)[:, -1], temperature)[0]  # (V,)
            x = torch.multinomial(q, 1, generator=generator)  # (1,)
            qs.append(q)
            drafted.append(x)
            feed = x[None]  # (1, 1)
        drafted = torch.cat(drafted)  # (kk,)
        # 2) target scores all proposals at once: kk+1 distributions from one forward pass.
        feed = torch.cat([out[:, tc.pos :], drafted[None]], dim=1)
        p = logits_to_probs(target(feed, kv_cache=tc)[0, -(kk + 1) :], temperature)  # (kk+1, V)
        # 3) accept/reject, then roll both caches back to what is now known to be the prefix.
        new = speculative_accept(p, torch.stack(qs), drafted, generator)
        proposed, accepted = proposed + kk, accepted + len(new) - 1
        out = torch.cat([out, torch.tensor([new], device=out.device, dtype=out.dtype)], dim=1)
        n_known = out.shape[1] - 1  # every token but the newest is confirmed and may be cached
        tc.pos, dc.pos = min(tc.pos, n_known), min(dc.pos, n_known)
    if stats is not None:
        stats.update(proposed=proposed, accepted=accepted)
    return out[:, : T0 + max_new_tokens]


# ---------------------------------------------------------------
# Weight-only quantization: int8 / int4 weights with one scale per group, dequantized on the fly

def quantize_weight(w, bits: int, group_size: int):
    """Group-wise symmetric: each `group_size` consecutive input columns of a (d_out, d_in) row share scale = max|w| / qmax
    and q = round(w / scale), so |q·scale - w| <= scale/2; an outlier coarsens only its own group, not the row."""
    (d_out, d_in), qmax = w.shape, 2 ** (bits - 1) - 1  # qmax 127 or 7
    if bits not in (8, 4) or group_size < 1 or d_in % group_size or (bits == 4 and group_size % 2):
        raise ValueError(f"need --bits 8 or 4 and a group size (even for 4 bits) dividing d_in={d_in}, got bits {bits}, group size {group_size}")
    g = w.detach().float().reshape(d_out, d_in // group_size, group_size)
    scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax  # (d_out, groups, 1); clamp: an all-zero group
    q = torch.round(g / scale).clamp(-qmax, qmax).to(torch.int8).reshape(d_out, d_in)
    return (pack_int4(q) if bits == 4 else q), scale.squeeze(-1)  # (d_out, d_in or d_in/2), (d_out, groups)


def pack_int4(q):  # two int4 in [-8, 7] per uint8, +8 to make them unsigned: column 2j low nibble, 2j+1 high
    return (q[:, 0::2] + 8).to(torch.uint8) | ((q[:, 1::2] + 8).to(torch.uint8) << 4)  # (d_out, d_in/2)


def unpack_int4(p):
    return torch.stack(((p & 15).to(torch.int8) - 8, (p >> 4).to(torch.int8) - 8), -1).flatten(-2)  # interleave: (d_out, d_in)


class QuantLinear(nn.Module):
    """A Linear stored as int8 / packed int4 + float32 group scales, rebuilt for each matmul: saves bytes, not FLOPs."""

    def __init__(self, lin: Linear, bits: int, group_size: int):
        super().__init__()
        self.bits, self.bias = bits, lin.bias
        qweight, scale = quantize_weight(lin.weight, bits, group_size)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    def dequantized(self):  # q·scale, (d_out, d_in) float32
        q = unpack_int4(self.qweight) if self.bits == 4 else self.qweight
        return (q.reshape(*self.scale.shape, -1) * self.scale[..., None]).flatten(1)

    def forward(self, x):
        return x @ self.dequantized().to(x.dtype).t() + (0 if self.bias is None else self.bias)  # (..., d_out)


def quantize_model(model, bits: int, group_size: int):
    """Every Linear (attention, FFN, router, lm_head) -> QuantLinear, in place; embeddings and norms stay float."""
    for name, m in list(model.named_modules()):
        if isinstance(m, Linear):
            model.set_submodule(name, QuantLinear(m, bits, group_size))
    model.cfg.quant_bits, model.cfg.quant_group_size = bits, group_size
    return model


def quantize_checkpoint(ckpt_path: str, bits: int, group_size: int, out: str):
    """ckpt -> quantized ckpt without the optimizer state (a quantized model is for inference), written atomically."""
    model, ckpt = load_model(ckpt_path)
    if model.cfg.quant_bits:
        raise ValueError(f"{ckpt_path} is already quantized ({model.cfg.quant_bits} bits)")
    torch.save({**{k: v for k, v in ckpt.items() if k != "optimizer"}, "model": quantize_model(model, bits, group_size).state_dict(), "config": asdict(model.cfg)}, out + ".tmp")
    os.replace(out + ".tmp", out)  # a crash leaves the old file or the new one, never half of one
    print(f"wrote {out} ({bits}-bit, group {group_size}): {os.path.getsize(out) / 2**20:.1f} MiB, was {os.path.getsize(ckpt_path) / 2**20:.1f} MiB")


# ---------------------------------------------------------------
# Devices and checkpoints: the one home of both (train.py, align.py, pipeline.py import them)

def pick_device(name=None) -> str:
    """cuda -> mps -> cpu, or `name` if this machine has it (else a one-line error, not torch's 20-line traceback)."""
    mps = torch.backends.mps.is_available()
    if name is None:
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise SystemExit(f"error: unknown device {name!r} (use cpu, cuda, cuda:N or mps)")
    if (kind == "cuda" and not torch.cuda.is_available()) or (kind == "mps" and not mps):
        raise SystemExit(f"error: --device {name}: this machine has no {kind} device (try --device cpu)")
    return name


def read_checkpoint(src) -> dict:
    """torch.load(weights_only=True) -- a checkpoint is data, never code to unpickle -- with a
    one-line error for a missing, corrupt or truncated file. `src` is a path or a file object."""
    if isinstance(src, (str, os.PathLike)) and not os.path.exists(src):
        raise SystemExit(f"error: checkpoint {src} not found")
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = (str(e).strip().splitlines() or [""])[0][:80]
        raise SystemExit(f"error: cannot read checkpoint {src} (corrupt or truncated?): {type(e).__name__}: {msg}")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise SystemExit(f"error: {src} is not a train.py checkpoint (needs 'model' and 'config')")
    return ckpt


def load_model(src, device="cpu"):
    """Checkpoint -> (TransformerLM in eval mode, checkpoint dict); torch.compile's "_orig_mod." prefix is stripped."""
    ckpt = read_checkpoint(src)
    model = TransformerLM(cfg := ModelConfig(**ckpt["config"]))
    if cfg.quant_bits:  # same modules as the saved ones; their (random) contents are overwritten below
        quantize_model(model, cfg.quant_bits, cfg.quant_group_size)
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    return model.to(device).eval(), ckpt


# ---------------------------------------------------------------
# Export to Hugging Face Llama

def _rope_rows_to_hf(w, num_heads: int):
    """Our RoPE rotates interleaved pairs (2i, 2i+1); HF's rotate_half pairs (i, i + d/2). Reorder each head's rows
    to [0, 2, 4, ..., 1, 3, 5, ...]: q·k is unchanged (q, k share the permutation); pairs land where HF expects."""
    d_out, d_in = w.shape
    d_k = d_out // num_heads
    perm = torch.cat([torch.arange(0, d_k, 2), torch.arange(1, d_k, 2)])
    return w.view(num_heads, d_k, d_in)[:, perm].reshape(d_out, d_in)


# Our per-layer module names -> LlamaForCausalLM's (q_proj, k_proj also get their rows permuted, above).
HF_LAYER_NAMES = {"attn.v_proj": "self_attn.v_proj", "attn.output_proj": "self_attn.o_proj", "ffn.w1": "mlp.gate_proj",
                  "ffn.w3": "mlp.up_proj", "ffn.w2": "mlp.down_proj", "ln1": "input_layernorm", "ln2": "post_attention_layernorm"}


def to_hf_llama(model):
    """Map a TransformerLM to (transformers.LlamaConfig, HF state_dict)."""
    from transformers import LlamaConfig

    cfg = model.cfg
    if not cfg.causal:
        raise ValueError("only causal models map onto LlamaForCausalLM")
    odd = [f"{k}={getattr(cfg, k)}" for k in ("norm", "norm_position", "pos_emb", "ffn", "window", "bias", "num_experts") if getattr(cfg, k) != getattr(ModelConfig, k)]
    if odd:
        raise ValueError(f"HF Llama cannot express {', '.join(odd)} (export-hf needs Llama's architecture)")
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.d_model // cfg.num_heads,
        max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, hidden_act="silu",
        bos_token_id=None, eos_token_id=None,
    )
    # transformers 4.x reads only a top-level rope_theta (and ignores rope_parameters); 5.x folds
    # that key into rope_parameters at init, but saves it when set afterwards: so both forms go out.
    hf_cfg.rope_theta = cfg.rope_theta
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hf = {"model.embed_tokens.weight": sd["token_embeddings.weight"], "model.norm.weight": sd["ln_final.weight"], "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_layers):
        for ours, theirs in HF_LAYER_NAMES.items():
            hf[f"model.layers.{i}.{theirs}.weight"] = sd[f"layers.{i}.{ours}.weight"]
        for name, heads in (("q_proj", cfg.num_heads), ("k_proj", cfg.num_kv_heads)):
            hf[f"model.layers.{i}.self_attn.{name}.weight"] = _rope_rows_to_hf(sd[f"layers.{i}.attn.{name}.weight"], heads)
    return hf_cfg, hf


def export_hf(ckpt_path: str, out_dir: str):
    """Read a train.py checkpoint, write a directory LlamaForCausalLM.from_pretrained loads, via a temp dir beside
    out_dir swapped in whole: a crash or a full disk leaves the previous export, never a mix of old and new."""
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        raise SystemExit("error: export-hf needs `pip install transformers`")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SystemExit(f"error: --out {out_dir} is a file, not a directory")
    model, _ = load_model(ckpt_path)
    hf_cfg, sd = to_hf_llama(model)
    hf_model = LlamaForCausalLM(hf_cfg)
    hf_model.load_state_dict(sd)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".export-")
    try:
        hf_model.save_pretrained(tmp)
        _swap_in_dir(tmp, out_dir)
    except OSError as e:
        raise SystemExit(f"error: cannot write {out_dir} ({e}); a previous export there is untouched")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out_dir} ({model.num_params():,} params)")


def _swap_in_dir(new, dst):
    """Make directory `new` become `dst`. A rename is atomic but cannot replace a non-empty dir, so:
    fsync the new files, move the old dir aside, move the new one in (or the old one back), delete the old."""
    for name in os.listdir(new):
        with open(os.path.join(new, name), "rb") as f:
            os.fsync(f.fileno())
    old = new + ".old"
    if os.path.isdir(dst):
        os.replace(dst, old)
    try:
        os.replace(new, dst)
    except OSError:
        if os.path.isdir(old):
            os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------
# Import from Hugging Face (Llama, GPT-2): export's inverse, so every script runs on a real model

def read_safetensors(path) -> dict:
    """A .safetensors file by hand: 8 bytes (little-endian u64) giving the JSON header's length, the
    header {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw little-endian tensor bytes."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    header, out = json.loads(data[8:8 + n]), {}
    for name, t in header.items():
        if name != "__metadata__":
            lo, hi = (8 + n + o for o in t["data_offsets"])
            out[name] = torch.frombuffer(bytearray(data[lo:hi]), dtype=dtypes[t["dtype"]]).reshape(t["shape"])
    return out


def _hf_config(c: dict) -> ModelConfig:
    """config.json -> our ModelConfig, refusing what the architecture flags cannot express."""
    if c.get("model_type") == "gpt2":
        return ModelConfig(vocab_size=c["vocab_size"], context_length=c["n_positions"], d_model=c["n_embd"], num_layers=c["n_layer"],
                           num_heads=c["n_head"], d_ff=c.get("n_inner") or 4 * c["n_embd"], tie_embeddings=True, norm="layernorm",
                           pos_emb="learned", ffn="gelu", bias=True, norm_eps=c.get("layer_norm_epsilon", 1e-5))
    if c.get("model_type") != "llama":
        raise ValueError(f"import-hf reads model_type llama or gpt2, not {c.get('model_type')!r}")
    if c.get("rope_scaling") or c.get("attention_bias") or c.get("mlp_bias") or c.get("hidden_act", "silu") != "silu" or \
            c.get("head_dim", c["hidden_size"] // c["num_attention_heads"]) * c["num_attention_heads"] != c["hidden_size"]:
        raise ValueError("this Llama uses rope_scaling, biases, a non-SiLU MLP or a head_dim, which ModelConfig cannot express")
    theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(vocab_size=c["vocab_size"], context_length=c["max_position_embeddings"], d_model=c["hidden_size"],
                       num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"], rope_theta=theta,
                       num_kv_heads=c.get("num_key_value_heads"), d_ff=c["intermediate_size"],
                       tie_embeddings=c.get("tie_word_embeddings", False), norm_eps=c.get("rms_norm_eps", 1e-6))


def _from_hf_llama(cfg, hf):
    """LlamaForCausalLM's state dict -> ours: the names back, and q/k rows un-permuted (see _rope_rows_to_hf)."""
    sd = {"token_embeddings.weight": hf["model.embed_tokens.weight"], "ln_final.weight": hf["model.norm.weight"],
          "lm_head.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"])}
    for i in range(cfg.num_layers):
        for ours, theirs in HF_LAYER_NAMES.items():
            sd[f"layers.{i}.{ours}.weight"] = hf[f"model.layers.{i}.{theirs}.weight"]
        for name, heads in (("q_proj", cfg.num_heads), ("k_proj", cfg.num_kv_heads)):
            w, d_k = hf[f"model.layers.{i}.self_attn.{name}.weight"], cfg.d_model // cfg.num_heads
            inverse = torch.argsort(torch.cat([torch.arange(0, d_k, 2), torch.arange(1, d_k, 2)]))
            sd[f"layers.{i}.attn.{name}.weight"] = w.view(heads, d_k, -1)[:, inverse].reshape(w.shape)
    return sd


def _from_hf_gpt2(cfg, hf):
    """GPT2LMHeadModel's state dict -> ours. Its Conv1D stores weights (in, out): transposed; c_attn is q|k|v stacked."""
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    sd = {"token_embeddings.weight": hf["wte.weight"], "position_embeddings.weight": hf["wpe.weight"],
          "ln_final.weight": hf["ln_f.weight"], "ln_final.bias": hf["ln_f.bias"]}
    for i in range(cfg.num_layers):
        h, o = f"h.{i}.", f"layers.{i}."
        for x, (w, b) in zip("qkv", zip(hf[h + "attn.c_attn.weight"].t().chunk(3), hf[h + "attn.c_attn.bias"].chunk(3))):
            sd[o + f"attn.{x}_proj.weight"], sd[o + f"attn.{x}_proj.bias"] = w, b
        for ours, theirs in (("attn.output_proj", "attn.c_proj"), ("ffn.w1", "mlp.c_fc"), ("ffn.w2", "mlp.c_proj")):
            sd[o + ours + ".weight"], sd[o + ours + ".bias"] = hf[h + theirs + ".weight"].t(), hf[h + theirs + ".bias"]
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            sd[o + ours + ".weight"], sd[o + ours + ".bias"] = hf[h + theirs + ".weight"], hf[h + theirs + ".bias"]
    sd["lm_head.weight"] = sd["token_embeddings.weight"]  # tied
    return sd


def import_hf(hf_dir: str, out_dir: str):
    """A save_pretrained directory (config.json + safetensors) -> OUT/ckpt.pt in train.py's format (and
    OUT/tokenizer/ with its tokenizer files, which bpe.Tokenizer.load reads), written atomically."""
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors")) if os.path.isdir(hf_dir) else []
    if not files or not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ValueError(f"{hf_dir}: need config.json and *.safetensors (a save_pretrained directory)")
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = _hf_config(json.load(f))
    hf = {k: v for f in files for k, v in read_safetensors(os.path.join(hf_dir, f)).items()}
    model = TransformerLM(cfg)
    try:  # strict: a missing or an extra tensor means the mapping does not fit this checkpoint
        model.load_state_dict((_from_hf_gpt2 if cfg.norm == "layernorm" else _from_hf_llama)(cfg, hf))
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"{hf_dir}: weights do not match config.json ({str(e).splitlines()[0]})") from None
    os.makedirs(os.path.join(out_dir, "tokenizer"), exist_ok=True)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        if os.path.isfile(os.path.join(hf_dir, name)):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out_dir, "tokenizer", name))
    path = os.path.join(out_dir, "ckpt.pt")
    torch.save({"model": model.state_dict(), "config": asdict(cfg), "iteration": 0, "imported_from": os.path.abspath(hf_dir)}, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash leaves the old ckpt.pt or the new one
    print(f"wrote {path} ({model.num_params():,} params, {cfg.num_layers} layers, d_model {cfg.d_model})")


# ---------------------------------------------------------------
# CLI

def _info(args):
    cfg = ModelConfig(vocab_size=args.vocab_size, context_length=args.context_length, d_model=args.d_model, num_layers=args.num_layers,
                      num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, d_ff=args.d_ff, tie_embeddings=args.tie_embeddings)
    fpt, n6 = flops_per_token(cfg), 6 * count_params(cfg, non_embedding=True)
    print(asdict(cfg))
    print(f"params {count_params(cfg):,} | non-embedding {count_params(cfg, non_embedding=True):,}")
    print(f"train FLOPs/token {fpt:.3e} (6N = {n6:.3e}, attention = {fpt - n6:.3e})")
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"):
        print(f"tokens/s at 50% MFU on {name}: {0.5 * PEAK_FLOPS[name] / fpt:,.0f}")
    mem = memory_bytes(cfg, args.batch_size)
    print(f"training memory at bf16, batch {args.batch_size} x {cfg.context_length}: "
          + " | ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in mem.items()) + f" | total {sum(mem.values()) / 2**30:.2f} GiB")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Transformer LM building blocks: model info and export to Hugging Face.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="print parameters, training FLOPs per token and bf16 training memory for a config")
    d = ModelConfig()  # the defaults are the CPU default run's model (python train.py)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="vocabulary size")
    p.add_argument("--context-length", type=int, default=d.context_length, help="sequence length T")
    p.add_argument("--d-model", type=int, default=d.d_model, help="residual stream width")
    p.add_argument("--num-layers", type=int, default=d.num_layers, help="number of Transformer blocks")
    p.add_argument("--num-heads", type=int, default=d.num_heads, help="attention (query) heads")
    p.add_argument("--num-kv-heads", type=int, default=None, help="key/value heads for GQA (default: num-heads)")
    p.add_argument("--d-ff", type=int, default=None, help="SwiGLU hidden size (default: multiple of 64 near 8/3·d_model)")
    p.add_argument("--tie-embeddings", action="store_true", help="share the input embedding and lm_head matrix")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (train.py's default), for the activation memory")
    p = sub.add_parser("export-hf", help="convert a train.py checkpoint to a LlamaForCausalLM directory")
    p.add_argument("--ckpt", required=True, help="path to train.py's ckpt.pt")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p = sub.add_parser("import-hf", help="convert a local save_pretrained Llama / GPT-2 directory to OUT/ckpt.pt (+ OUT/tokenizer)")
    p.add_argument("--hf-dir", required=True, help="directory with config.json, *.safetensors (and tokenizer.json)")
    p.add_argument("--out", required=True, help="output directory")
    p = sub.add_parser("quantize", help="weight-only int8 / int4 quantization of a checkpoint (loads anywhere a ckpt does)")
    p.add_argument("--ckpt", required=True, help="path to train.py's / align.py's ckpt.pt")
    p.add_argument("--bits", type=int, default=8, help="8 or 4 bits per weight")
    p.add_argument("--group-size", type=int, default=64, help="input columns sharing one scale (must divide every d_in)")
    p.add_argument("--out", required=True, help="output checkpoint path (written atomically)")
    args = parser.parse_args(argv)
    try:
        if args.cmd in ("import-hf", "quantize"):
            return import_hf(args.hf_dir, args.out) if args.cmd == "import-hf" else quantize_checkpoint(args.ckpt, args.bits, args.group_size, args.out)
        _info(args) if args.cmd == "info" else export_hf(args.ckpt, args.out)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
