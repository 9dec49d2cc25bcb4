"""Parallel training from scratch: DDP, bucketed DDP, ZeRO-1, FSDP (ZeRO-3), tensor and pipeline parallelism.

The problem. One device has fixed compute and memory. To train faster we split the *batch* (data parallelism); to
train a model that does not fit we split the *model state* (ZeRO / FSDP), the *matrices* (tensor parallelism) or the
*layers* (pipeline parallelism). Each variant is ~50 lines on four `torch.distributed` collectives:

    all_reduce      every rank ends with the sum of everyone's tensor      (gradients in DDP)
    broadcast       every rank ends with rank r's tensor                   (ZeRO-1 parameters)
    all_gather      every rank ends with the concatenation of all shards   (FSDP forward)
    reduce_scatter  rank r ends with shard r of the sum                    (FSDP backward)

A ring all-reduce is a reduce-scatter followed by an all-gather (each rank sends ~2·(N-1)/N × the payload), which is
why FSDP (all-gather + reduce-scatter) costs about DDP's bytes (all-reduce) while storing 1/N of the weights.

Memory per rank, Ψ params on N ranks, AdamW in fp32 (4 B weight + 4 B grad + 8 B moments; ZeRO's mixed precision,
2+2+12, also makes 16): DDP 16Ψ, ZeRO-1 8Ψ + 8Ψ/N, ZeRO-3 16Ψ/N. Tensor parallelism (Megatron) splits each matrix,
paying an activation all-reduce per block; pipeline parallelism (GPipe) splits the layers and idles (p-1)/(m+p-1).

Papers:
    Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training" (arXiv:2006.15704)
    Rajbhandari et al. 2019, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models" (arXiv:1910.02054)
    Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel" (arXiv:2304.11277)
    Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model Parallelism" (arXiv:1909.08053)
    Huang et al. 2018, "GPipe: Efficient Training of Giant Neural Networks using Pipeline Parallelism" (arXiv:1811.06965)

Run it (gloo on CPU, NCCL on CUDA, chosen by `setup_distributed`; nothing here assumes a GPU):
    python parallel.py demo --world-size 2                    # every variant on model.py's TransformerLM, gloo, ~1 min on 2 CPU cores
    python -m pytest -q test_all.py -k parallel               # each variant == one process (2 gloo ranks)
    # the real path: train.py wraps the model in our BucketedDDP (or torch's FSDP2 with --fsdp)
    torchrun --standalone --nproc_per_node=2 train.py --data data/pydocs      # 2 CPU processes or 2 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --data data/pydocs --fsdp
    # multi-node: the same command on every node, meeting at one rendezvous endpoint
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-id=run1 --rdzv-backend=c10d --rdzv-endpoint=HOST0:29500 train.py ...
"""
import argparse
import contextlib
import copy
import functools
import math
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import model as M


# ---------------------------------------------------------------
# Process-group setup. torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
# init_process_group("env://") reads them and meets the other ranks at MASTER_ADDR:MASTER_PORT.

def setup_distributed():
    """Join the process group if launched by torchrun. Returns (rank, local_rank, world_size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 0, 1, M.pick_device()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device, backend = (f"cuda:{local_rank}", "nccl") if cuda else ("cpu", "gloo")
    if cuda:  # one process per GPU; NCCL moves tensors GPU-to-GPU without touching the CPU
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return rank, local_rank, world_size, device


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()  # no rank tears down its sockets while another still talks to it
        dist.destroy_process_group()


def free_port():
    """A TCP port nobody listens on now, for a rendezvous on 127.0.0.1 (the demo, the tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_worker(rank, world_size, port):
    """Process-group init for an mp.spawn worker (torchrun does this through env vars instead)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")   # N ranks share the cores: one thread each, no oversubscription
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)


# torch 2.13 renamed the tensor-in/tensor-out collectives; fall back to the old names elsewhere.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _optimizer_state_bytes(opt):
    # 0-dim tensors such as Adam's step counter are bookkeeping, not the 8 bytes/param
    return sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)


@torch.no_grad()
def _broadcast_from_rank0(module):
    # Every rank must start from the same weights, or the averaged gradient is meaningless.
    for t in list(module.parameters()) + list(module.buffers()):   # buffers too: all a forward reads
        dist.broadcast(t, src=0)


# ---------------------------------------------------------------
# FSDP2 for train.py. `train.py --fsdp` shards with torch's own FSDP2 (`fully_shard`, the production twin of the
# FSDP class below): every parameter becomes a DTensor holding 1/N of the rows. Three places in a training loop must
# then know about shards, and they live here so train.py reads as the plain loop: wrapping, checkpoints (gather the
# full tensors to save, scatter them back to load) and the global gradient norm. Plus the one gather DDP needs too.

def fsdp_wrap(model):
    """Shard a TransformerLM in place: each block gathers its params just in time and frees them
    after (one block's full weights in memory at a time); the root holds embeddings, final norm, lm_head."""
    from torch.distributed.fsdp import fully_shard
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def is_fsdp(model):
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def fsdp_state_dicts(model, optimizers):
    """Full, unsharded (model, [optimizer]) state dicts on the CPU; collective: every rank calls it, rank 0 saves."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=o), [get_optimizer_state_dict(model, opt, options=o) for opt in optimizers]


def fsdp_load_state_dicts(model, optimizers, model_sd, opt_sds):
    """The inverse: every rank keeps its own shard of the full state dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    o = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=o)
    for opt, sd in zip(optimizers, opt_sds):
        set_optimizer_state_dict(model, opt, sd, options=o)


@torch.no_grad()
def fsdp_clip_grad_norm(params, max_norm, eps=1e-6):
    """train.clip_grad_norm on sharded grads: ||g||^2 is the sum over ranks of each shard's ||g_r||^2."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.stack([g.detach().float().norm().full_tensor() for g in grads]).norm()  # full_tensor: the all-reduce
    coef = (max_norm / (total + eps)).clamp(max=1.0).item()  # a plain float: a DTensor grad cannot be scaled by a tensor
    for g in grads:
        g.mul_(coef)
    return total


def gather_object(obj):
    """Every rank's obj in rank order, on every rank ([obj] without a process group): train.py's generator states."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------
# DDP, one all-reduce per parameter. The trick that makes DDP fast is overlap: the gradient of the last layer is
# ready long before backward reaches the first layer, so we start its all-reduce at once (async_op=True returns a
# handle) and let communication run while autograd keeps computing. `register_post_accumulate_grad_hook` fires after
# autograd has written the *final* gradient of this backward into p.grad; a tied parameter is a single leaf with a
# single AccumulateGrad node, so its hook fires once, after both uses are summed.

class DDP(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module
        self.world_size = dist.get_world_size()
        self.comm_bytes = 0          # payload bytes handed to all_reduce (a ring sends ~2x this)
        self._handles = []           # (work handle, parameter) launched during this backward
        self._sync = True            # False inside no_sync()
        _broadcast_from_rank0(module)
        for p in module.parameters():            # parameters() yields a tied weight once
            if p.requires_grad:                  # frozen parameters get no gradient, no hook
                p.register_post_accumulate_grad_hook(self._hook)

    def _hook(self, p):
        if self._sync:
            self._handles.append((dist.all_reduce(p.grad, async_op=True), p))
            self.comm_bytes += p.grad.nbytes

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Gradient accumulation: grads pile up locally; the backward after the block syncs (all-reduce is linear)."""
        prev, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = prev

    def finish_gradient_synchronization(self):
        # all_reduce sums; each rank's grad is the mean over its batch shard, so the global mean is sum / world_size.
        for work, p in self._handles:
            work.wait()
            p.grad.div_(self.world_size)
        self._handles.clear()


# ---------------------------------------------------------------
# Bucketed DDP. One all-reduce per parameter pays the fixed latency of a collective hundreds of times. Instead we pack
# gradients into ~bucket_size_mb flat buffers, in *reverse* parameter order (roughly the order backward produces
# them), and launch one all-reduce when a bucket is full. Buckets that never fill (a parameter unused this step) go
# out in finish(), in the same order on every rank, so the ranks agree on the next collective.

class BucketedDDP(DDP):
    """DDP with another hook and finish; the broadcast, forward and no_sync are DDP's."""
    def __init__(self, module, bucket_size_mb=25.0):
        super().__init__(module)            # the hooks it registers call *our* _hook
        params = [p for p in module.parameters() if p.requires_grad]
        # Like torch's DDP, cap the *first* bucket at 1 MB: its all-reduce then starts a few layers
        # into backward instead of after 25 MB of gradients, which buys overlap on small models.
        limit = min(1.0, bucket_size_mb) * 2**20
        self.buckets, size = [[]], 0
        for p in reversed(params):
            if self.buckets[-1] and size + p.nbytes > limit:   # full: open the next bucket
                limit, size = bucket_size_mb * 2**20, 0
                self.buckets.append([])
            self.buckets[-1].append(p)
            size += p.nbytes
        self.buckets = [b for b in self.buckets if b]           # no trainable parameters: no buckets
        self._bucket_of = {p: i for i, b in enumerate(self.buckets) for p in b}
        # One preallocated flat buffer per bucket, p.grad a *view* into it (torch's gradient_as_bucket_view=True):
        # each gradient is copied once, on arrival; all-reduce and averaging work in place; nothing is copied back.
        self._flat = [torch.empty(sum(p.numel() for p in b), dtype=b[0].dtype, device=b[0].device)
                      for b in self.buckets]                                  # (bucket_numel,)
        self._view = {p: v.view_as(p) for b, flat in zip(self.buckets, self._flat)
                      for p, v in zip(b, flat.split([p.numel() for p in b]))}
        self._pending = [len(b) for b in self.buckets]   # grads still to arrive per bucket
        self._work = [None] * len(self.buckets)          # async handle per bucket, None until launched

    def _hook(self, p):
        if not self._sync:
            return
        self._adopt(p)
        i = self._bucket_of[p]
        self._pending[i] -= 1
        if self._pending[i] == 0:          # last gradient of this bucket just landed
            self._launch(i)

    def _adopt(self, p):
        # zero_grad(set_to_none=True) left p.grad None, so autograd made a fresh tensor: move it
        # into p's slot of the bucket. With set_to_none=False autograd accumulated into the slot.
        v = self._view[p]
        if p.grad is None:
            v.zero_()                      # unused this step: contributes zeros, like torch's DDP
        elif p.grad.data_ptr() != v.data_ptr():
            v.copy_(p.grad)
        p.grad = v

    def _launch(self, i):
        self._work[i] = dist.all_reduce(self._flat[i], async_op=True)
        self.comm_bytes += self._flat[i].nbytes

    def finish_gradient_synchronization(self):
        if not self._sync:                 # inside DDP's no_sync the hooks did nothing: grads piled up in the views
            return
        for i, bucket in enumerate(self.buckets):
            if self._work[i] is None:      # some parameter got no gradient this step
                for p in bucket:
                    self._adopt(p)
                self._launch(i)
        for i, bucket in enumerate(self.buckets):
            self._work[i].wait()
            self._flat[i].div_(self.world_size)          # sum of per-rank means -> global mean
            self._work[i], self._pending[i] = None, len(bucket)


# ---------------------------------------------------------------
# ZeRO stage 1: shard the optimizer state. With AdamW each parameter carries two fp32 moments, 8 bytes/param, twice
# the weights themselves. Every rank has the full (all-reduced) gradient anyway, so rank r only *steps* the parameters
# it owns and then broadcasts them to everyone. AdamW is elementwise: stepping a subset is bit-identical to stepping
# everything. Memory per rank: 4Ψ weights + 4Ψ grads + 8Ψ/N moments = 8Ψ + 8Ψ/N (vs DDP's 16Ψ). We keep DDP's
# all-reduce and add a broadcast of the weights, 2x DDP's bytes; the paper reduce-scatters grads and all-gathers new
# weights, the two halves of one all-reduce, so its ZeRO-1 costs DDP's bytes.

class ShardedOptimizer(torch.optim.Optimizer):
    def __init__(self, params, optimizer_cls, **kwargs):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._cls, self._kwargs = optimizer_cls, kwargs
        self._owner = {}                        # parameter -> rank that holds its state
        self._load = [0] * self.world_size      # numel owned per rank, for greedy balancing
        self.inner = None                       # the real optimizer, over this rank's shard only
        self.comm_bytes = 0
        super().__init__(params, defaults=kwargs)   # calls add_param_group for every group

    def add_param_group(self, param_group):
        # Whole parameters go to ranks, biggest first, each to the least-loaded rank (greedy balancing; every rank
        # computes the same assignment): simple, and a parameter's state never straddles two ranks. Caveat:
        # state_dict() holds only this rank's shard, so a checkpoint needs a gather first (not implemented here).
        super().add_param_group(param_group)     # self.param_groups keeps *all* params (zero_grad, lr)
        group = self.param_groups[-1]
        mine = []
        for p in sorted(group["params"], key=lambda p: -p.numel()):      # stable: same order everywhere
            r = min(range(self.world_size), key=lambda k: self._load[k])   # least-loaded rank
            self._owner[p] = r
            self._load[r] += p.numel()
            if r == self.rank:
                mine.append(p)
        sub = {**{k: v for k, v in group.items() if k != "params"}, "params": mine}
        if self.inner is None:
            self.inner = self._cls([sub], **self._kwargs)
        else:
            self.inner.add_param_group(sub)

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():  # step() runs under no_grad; a closure needs autograd back
            loss = closure() if closure is not None else None
        # A schedule writes lr into self.param_groups; mirror hyperparameters into the shard.
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update({k: v for k, v in outer.items() if k != "params"})
        self.inner.step()
        # Owner r now has its parameters' new values, everyone else stale ones: one broadcast per parameter, all in
        # flight at once (a real ZeRO flattens them per rank); frozen ones never change, so they are never sent.
        sent = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        works = [dist.broadcast(p, src=self._owner[p], async_op=True) for p in sent]
        self.comm_bytes += sum(p.nbytes for p in sent)
        for w in works:
            w.wait()
        return loss

    def state_bytes(self):
        """Bytes of optimizer state held on this rank (the thing ZeRO-1 divides by N)."""
        return _optimizer_state_bytes(self.inner)


# ---------------------------------------------------------------
# FSDP = ZeRO stage 3: shard the weights too (16Ψ/N per rank). Each Linear/Embedding weight is flattened, padded to a
# multiple of N, and rank r keeps only slice r as an fp32 "master" Parameter: the optimizer sees shards only, so
# weights, grads and optimizer state all shrink by N. Just before a module runs we all-gather its full weight
# (optionally cast to bf16 first: half the bytes on the wire, and a low-precision matmul); our backward then
# reduce-scatters the full-size gradient. Why reduce-scatter, not all-reduce: rank r updates only slice r, so it needs
# only slice r of the sum, the first half of a ring all-reduce; the other half, the all-gather, moves to the next
# forward and gathers weights instead. So FSDP hands collectives 2x DDP's payload yet, at (N-1)/N per ring op, puts
# the same bytes on the wire. The RMSNorm gains stay replicated and all-reduced like DDP: d floats next to d×d
# matrices, not worth a gather per call. A production FSDP also frees the gathered weight after forward and
# re-gathers it in backward; here autograd keeps it until backward ends: shorter code, persistent memory still sharded.

class _GatherWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, entry, dtype, fsdp):
        ctx.entry, ctx.fsdp, ctx.numel = entry, fsdp, math.prod(entry["shape"])
        src = shard.detach().to(dtype or shard.dtype)                          # (numel/N,)
        flat = torch.empty(src.numel() * fsdp.world_size, dtype=src.dtype, device=src.device)
        _all_gather(flat, src)                                                 # (N * numel/N,)
        fsdp.comm_bytes += flat.nbytes
        return flat[:ctx.numel].view(entry["shape"])

    @staticmethod
    def backward(ctx, grad):
        fsdp, e = ctx.fsdp, ctx.entry
        # Reduce in fp32 even when computing in bf16: summing N low-precision grads loses bits. A tied weight has two
        # users, so backward lands here twice: we add the full-size grads locally and reduce-scatter once, after the
        # last user (half the traffic, and the unsharded model's summation order).
        g = grad.reshape(-1).float()
        e["acc"] = g if e["acc"] is None else e["acc"] + g
        e["pending"] -= 1
        if e["pending"] > 0:
            return None, None, None, None      # "no gradient from this use"; the last use sends it all
        shard_numel = -(-ctx.numel // fsdp.world_size)                          # ceil(numel / N)
        g, e["acc"] = F.pad(e["acc"], (0, shard_numel * fsdp.world_size - ctx.numel)), None  # (N * numel/N,)
        out = torch.empty(shard_numel, dtype=torch.float32, device=g.device)
        _reduce_scatter(out, g)                                                # my slice of the sum
        fsdp.comm_bytes += g.nbytes
        return out.div_(fsdp.world_size), None, None, None                    # sum of means -> global mean


class FSDP(nn.Module):
    def __init__(self, module, compute_dtype=None):
        super().__init__()
        self.module, self.compute_dtype = module, compute_dtype
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.comm_bytes = 0
        _broadcast_from_rank0(module)
        self.names = {id(p): n for n, p in module.named_parameters()}   # original names, tied once
        self.sharded = {}        # id(full param) -> dict(name, shape, shard, users=[module, ...])
        for mod in module.modules():  # by class name: torch's nn.Linear/Embedding and model.py's own
            if type(mod).__name__ not in ("Linear", "Embedding") or not isinstance(mod._parameters.get("weight"), nn.Parameter):
                continue
            p = mod._parameters["weight"]
            if id(p) not in self.sharded:        # first user of a (possibly tied) weight
                k = -(-p.numel() // self.world_size)                           # ceil(numel / N)
                flat = F.pad(p.detach().reshape(-1), (0, k * self.world_size - p.numel()))
                shard = nn.Parameter(flat[self.rank * k:(self.rank + 1) * k].clone().float(), requires_grad=p.requires_grad)
                mod.register_parameter("weight_shard", shard)   # so .parameters() yields shards
                self.sharded[id(p)] = dict(name=self.names[id(p)], shape=p.shape, shard=shard, users=[],
                                           pending=0, acc=None)   # backward bookkeeping, see above
            self.sharded[id(p)]["users"].append(mod)
            del mod._parameters["weight"]        # the full Parameter goes; only the shard persists
            mod.register_forward_pre_hook(functools.partial(self._pre_hook, self.sharded[id(p)]))
        shard_ids = {id(e["shard"]) for e in self.sharded.values()}
        self.replicated = [p for p in module.parameters() if id(p) not in shard_ids and p.requires_grad]

    def _pre_hook(self, entry, mod, args):
        # Runs right before the Linear/Embedding's own forward: put a *plain tensor* attribute `weight` (the gathered,
        # autograd-tracked full matrix) where the Parameter used to be, so the module's unchanged forward
        # (x @ self.weight.t(), self.weight[ids]) just works. Each user of a tied weight gathers it.
        if torch.is_grad_enabled() and entry["shard"].requires_grad:
            entry["pending"] += 1                # one more backward use to wait for
        mod.weight = _GatherWeight.apply(entry["shard"], entry, self.compute_dtype, self)
        if self.compute_dtype is not None:       # feed the low-precision matmul low-precision inputs
            return tuple(a.to(self.compute_dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def forward(self, *args, **kwargs):
        # Count uses afresh: a forward whose backward never came (an eval without no_grad) must not
        # leave uses pending, or this step's last use would wait for them and send no gradient. Two
        # forwards before one backward stay correct: the extra uses each reduce-scatter their own.
        for e in self.sharded.values():
            e["pending"], e["acc"] = 0, None
        return self.module(*args, **kwargs)

    def finish_gradient_synchronization(self):
        # Sharded grads were reduce-scattered inside backward; replicated ones need an all-reduce.
        grads = [p.grad for p in self.replicated if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            self.comm_bytes += flat.nbytes
            flat.div_(self.world_size)
            for g, f in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(f.view_as(g))
        for e in self.sharded.values():          # drop the gathered full weights
            for mod in e["users"]:
                mod.__dict__.pop("weight", None)

    @torch.no_grad()
    def gather_full_params(self):
        """Full fp32 parameters keyed by the wrapped module's original names (e.g. for a checkpoint)."""
        full = {}
        shard_ids = {id(e["shard"]): e for e in self.sharded.values()}
        for name, p in self.module.named_parameters():
            if (e := shard_ids.get(id(p))) is not None:
                flat = torch.empty(p.numel() * self.world_size, dtype=p.dtype, device=p.device)
                _all_gather(flat, p.detach())
                full[e["name"]] = flat[:math.prod(e["shape"])].view(e["shape"]).clone()
            else:
                full[name] = p.detach().clone()      # a replicated parameter: already whole
        return full


# ---------------------------------------------------------------
# Tensor parallelism (Megatron). Split a weight matrix instead of the batch. For Y = X Wᵀ:
#   column-parallel: W split by *output* rows, rank r computes Y[:, slice r]   (no comm)
#   row-parallel:    W split by *input* columns, X arrives split; rank r computes a partial sum of Y  (one all-reduce)
# Chaining column → row means the intermediate activation never leaves its rank: one all-reduce per MLP and one per
# attention block in forward (operator g), one each in backward (operator f). The order matters: after the column
# split rank r holds h_r = act(X W_rᵀ), computable without other ranks (SiLU and the SwiGLU product are elementwise,
# attention is per head), and h_r is the split input a row-parallel layer wants. Row first would need the all-reduce
# before the nonlinearity: silu(a + b) != silu(a) + silu(b). (B, T, d) all-reduces every block keep TP in a node.

class _CopyToTP(torch.autograd.Function):
    """f: identity forward; backward all-reduces, because every rank's branch used the same X."""
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()         # collectives need a dense buffer; autograd may hand us a strided view
        dist.all_reduce(grad)
        return grad


class _ReduceFromTP(torch.autograd.Function):
    """g: forward all-reduces the partial sums; backward is identity (each rank owns its partial)."""
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


class TPSwiGLU(nn.Module):
    """SwiGLU MLP w2(silu(w1 x) * w3 x) with w1, w3 column-parallel and w2 row-parallel."""
    def __init__(self, w1, w2, w3, rank, world_size):
        super().__init__()
        self.w1 = nn.Parameter(w1.chunk(world_size, 0)[rank].clone())    # (d_ff/N, d)
        self.w3 = nn.Parameter(w3.chunk(world_size, 0)[rank].clone())    # (d_ff/N, d)
        self.w2 = nn.Parameter(w2.chunk(world_size, 1)[rank].clone())    # (d, d_ff/N)

    def forward(self, x):                                   # (B, T, d), replicated
        x = _CopyToTP.apply(x)
        h = F.silu(x @ self.w1.T) * (x @ self.w3.T)         # (B, T, d_ff/N), stays local
        return _ReduceFromTP.apply(h @ self.w2.T)           # (B, T, d), partial sums added


class TPAttention(nn.Module):
    """Causal attention, heads split over ranks (q/k/v column-, output row-parallel); RoPE and GQA as in model.py."""
    def __init__(self, wq, wk, wv, wo, num_heads, rank, world_size, num_kv_heads=None, rope=None):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        assert num_heads % world_size == 0 and num_kv_heads % world_size == 0, "heads must split evenly"
        self.h, self.kvh, self.rope = num_heads // world_size, num_kv_heads // world_size, rope
        # Heads are contiguous row blocks of W_q/W_k/W_v, so chunking rows keeps whole heads together;
        # with GQA rank r's query heads r·h..(r+1)·h-1 read exactly kv heads r·kvh..(r+1)·kvh-1.
        self.wq, self.wk, self.wv = (nn.Parameter(w.chunk(world_size, 0)[rank].clone()) for w in (wq, wk, wv))
        self.wo = nn.Parameter(wo.chunk(world_size, 1)[rank].clone())    # (d, d/N)

    def forward(self, x):                                   # (B, T, d), replicated
        B, T, _ = x.shape
        x = _CopyToTP.apply(x)
        q = (x @ self.wq.T).view(B, T, self.h, -1).transpose(1, 2)              # (B, h, T, hd)
        k, v = ((x @ w.T).view(B, T, self.kvh, -1).transpose(1, 2) for w in (self.wk, self.wv))  # (B, kvh, T, hd)
        if self.rope is not None:
            pos = torch.arange(T, device=x.device)
            q, k = self.rope(q, pos), self.rope(k, pos)
        if self.kvh != self.h:
            k, v = (t.repeat_interleave(self.h // self.kvh, dim=1) for t in (k, v))  # (B, h, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)              # (B, h, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)                                  # (B, T, d/N)
        return _ReduceFromTP.apply(y @ self.wo.T)                                # (B, T, d)


class TPBlock(nn.Module):
    """A model.py TransformerBlock split Megatron-style: 2 all-reduces forward, 2 backward.
    The RMSNorm weights are replicated; _CopyToTP's backward all-reduce hands them full grads."""
    def __init__(self, block, rank, world_size):
        super().__init__()
        a, f = block.attn, block.ffn
        self.ln1, self.ln2 = copy.deepcopy(block.ln1), copy.deepcopy(block.ln2)
        self.attn = TPAttention(a.q_proj.weight.detach(), a.k_proj.weight.detach(), a.v_proj.weight.detach(),
                                a.output_proj.weight.detach(), a.num_heads, rank, world_size, a.num_kv_heads, a.rope)
        self.ffn = TPSwiGLU(f.w1.weight.detach(), f.w2.weight.detach(), f.w3.weight.detach(), rank, world_size)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


# ---------------------------------------------------------------
# Pipeline parallelism (GPipe). Give each rank a contiguous run of layers (a "stage"). A naive pipeline leaves all but
# one stage idle; GPipe cuts the batch into m micro-batches so stage s can work on micro-batch i while stage s+1 works
# on i-1. With p stages a sweep takes m + p - 1 time slots (the last micro-batch starts at slot m, then needs p - 1
# more), and each stage is busy in m of them: idle "bubble" fraction = (p-1)/(m+p-1), under 20% once m >= 4p. The
# price: each stage keeps m micro-batches' activations for backward (GPipe recomputes them; we keep them).
# Schedule: all forwards, then all backwards (in reverse); gradients accumulate over micro-batches.

def lm_as_layers(model):
    """model.py's TransformerLM as a flat list of modules applied in sequence (its forward, unrolled)."""
    return [model.token_embeddings, *model.layers, model.ln_final, model.lm_head]


def split_stages(layers, world_size):
    """Split a list of modules into world_size contiguous nn.Sequential stages."""
    bounds = [round(i * len(layers) / world_size) for i in range(world_size + 1)]
    return [nn.Sequential(*layers[bounds[i]:bounds[i + 1]]) for i in range(world_size)]


def gpipe_step(stage, inputs, targets, num_micro, act_shape, act_dtype=None):
    """One GPipe forward+backward; `inputs`/`targets` are read only on the first/last rank. act_shape: one
    micro-batch's activation at a stage boundary, received on the stage's device (NCCL receives only into GPU memory)
    in act_dtype (default: the stage's). -> last rank's mean loss (None elsewhere); grads land in the stage."""
    p = next(stage.parameters())
    buf = dict(device=p.device, dtype=act_dtype or p.dtype)
    rank, world = dist.get_rank(), dist.get_world_size()
    first, last = rank == 0, rank == world - 1
    ins, outs, losses = [], [], []
    # Blocking send/recv: easy to read, but a stage idles while it sends (real pipelines: isend/irecv, PipeDream 1F1B).
    for m in range(num_micro):                                  # ---- forward, micro-batch m
        if first:
            x = inputs.chunk(num_micro)[m]
        else:
            x = torch.empty(act_shape, **buf)
            dist.recv(x, src=rank - 1)
            x.requires_grad_(True)                              # we need dL/dx to send back
        y = stage(x)
        if last:
            logits = y.flatten(0, -2)                           # (B/m · T, V)
            # mean over equal micro-batches of their means = the full-batch mean
            losses.append(F.cross_entropy(logits, targets.chunk(num_micro)[m].reshape(-1)) / num_micro)
        else:
            dist.send(y.detach().contiguous(), dst=rank + 1)
        ins.append(x)
        outs.append(y)
    for m in reversed(range(num_micro)):                        # ---- backward, last micro first
        if last:
            losses[m].backward()
        else:                                                   # dL/d(my output) comes from downstream
            g = torch.empty(act_shape, **buf)
            dist.recv(g, src=rank + 1)
            outs[m].backward(g)                                 # vector-Jacobian product through my layers
        if not first:
            dist.send(ins[m].grad.contiguous(), dst=rank - 1)
    return sum(l.item() for l in losses) if last else None


# ---------------------------------------------------------------
# The demo: every variant on the same model.py TransformerLM, N gloo processes on one machine. Each part returns rows
# of step time, collective bytes and measured memory per rank (+ the ZeRO formula for data parallel); tables: README.

def state_bytes(model, optimizer):
    """Measured bytes per rank: weights + grads + optimizer state tensors."""
    # What lives between steps, as in the ZeRO formula: activations and gathered FSDP weights are transient.
    params = {id(p): p for p in model.parameters()}.values()
    opt = _optimizer_state_bytes(optimizer.inner if isinstance(optimizer, ShardedOptimizer) else optimizer)
    return sum(p.nbytes for p in params) + sum(p.grad.nbytes for p in params if p.grad is not None) + opt


def demo_model(args, tie=True):
    """The demo's TransformerLM; seeded, so every call (and every rank) builds the same weights."""
    torch.manual_seed(0)
    return M.TransformerLM(M.ModelConfig(vocab_size=args.vocab_size, context_length=args.context_length, d_model=args.d_model,
                                         num_layers=args.num_layers, num_heads=args.num_heads, tie_embeddings=tie))


def demo_data_parallel(args, x, y):
    """Split the batch: DDP, bucketed DDP, ZeRO-1, FSDP in fp32 and bf16, one row each: the same training step, only
    the wrapper and optimizer swapped; each rank trains on its B sequences (x, y); step 0 is an untimed warm-up."""
    params = list(demo_model(args).parameters())
    psi, repl, N = sum(p.numel() for p in params), sum(p.numel() for p in params if p.dim() == 1), dist.get_world_size()
    bucketed, adamw = functools.partial(BucketedDDP, bucket_size_mb=args.bucket_size_mb), torch.optim.AdamW
    variants = [("DDP (per-param)", DDP, adamw, 16 * psi),                  # 4 weight + 4 grad + 8 moments
                ("BucketedDDP", bucketed, adamw, 16 * psi),
                # measured is a bit above 8Ψ + 8Ψ/N: whole parameters cannot split the moments into exact Nths
                ("ZeRO-1 (sharded AdamW)", bucketed, functools.partial(ShardedOptimizer, optimizer_cls=adamw),
                 8 * psi + 8 * psi / N),
                # FSDP replicates the norm gains (the 1-D params): 16 B each, on every rank
                ("FSDP/ZeRO-3 (fp32)", FSDP, adamw, 16 * (psi - repl) / N + 16 * repl),
                ("FSDP/ZeRO-3 (bf16)", functools.partial(FSDP, compute_dtype=torch.bfloat16), adamw,
                 16 * (psi - repl) / N + 16 * repl)]
    rows = []
    for name, wrap, make_opt, formula in variants:
        wrapped = wrap(demo_model(args))
        opt = make_opt(wrapped.parameters())
        dist.barrier()                           # start every rank's clock together
        for step in range(args.steps + 1):
            if step == 1:
                t0 = time.perf_counter()
                wrapped.comm_bytes = opt.comm_bytes = 0
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(wrapped(x).flatten(0, 1).float(), y.reshape(-1)).backward()   # logits (B·T, V)
            wrapped.finish_gradient_synchronization()
            opt.step()
        ms = (time.perf_counter() - t0) / args.steps * 1e3
        rows.append((name, ms, (wrapped.comm_bytes + opt.comm_bytes) / args.steps, state_bytes(wrapped, opt), formula))
    return rows


def demo_tensor_parallel(args):
    """Split the matrices: one TransformerBlock over N ranks, checked against the unsplit block."""
    rank, N = dist.get_rank(), dist.get_world_size()
    xin = torch.randn(args.batch_size, args.context_length, args.d_model, generator=torch.Generator().manual_seed(2))  # (B, T, d)
    block = demo_model(args).layers[0]
    tp, ref = TPBlock(block, rank, N), block(xin)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        out = tp(xin)
        out.square().mean().backward()
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    err = (out - ref).abs().max().item()
    comm = 4 * xin.nbytes                      # forward: 2 all-reduces of (B, T, d); backward: 2 more
    return [(f"TP block (max err {err:.0e})", ms, comm, sum(2 * p.nbytes for p in tp.parameters()), None)]


def demo_pipeline(args, idx, num_micro=4):
    """Split the layers: the untied LM cut into N stages, GPipe over the global batch idx (B·N, T+1)."""
    rank, N = dist.get_rank(), dist.get_world_size()
    B, T, d = args.batch_size, args.context_length, args.d_model
    stage = split_stages(lm_as_layers(demo_model(args, tie=False)), N)[rank]
    t0 = time.perf_counter()
    for _ in range(args.steps):
        stage.zero_grad()
        gpipe_step(stage, idx[:, :-1], idx[:, 1:], num_micro, (B * N // num_micro, T, d))
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    comm = 2 * B * N * T * d * 4 * (1 if rank in (0, N - 1) else 2)   # activations out + grads back
    return [(f"GPipe {N} stages x {num_micro} micro", ms, comm, sum(2 * p.nbytes for p in stage.parameters()), None)]


def print_report(args, rows):
    psi = sum(p.numel() for p in demo_model(args).parameters())
    print(f"transformer LM: {psi:,} params, V={args.vocab_size} d={args.d_model} layers={args.num_layers}; "
          f"{dist.get_world_size()} ranks x batch {args.batch_size} x T {args.context_length}")
    print(f"{'variant':30s} {'ms/step':>8s} {'comm/rank/step':>15s} {'mem/rank meas.':>15s} {'ZeRO formula':>13s}")
    for name, ms, comm, mem, formula in rows:
        f = f"{formula / 1e6:10.3f} MB" if formula else f"{'-':>13s}"
        print(f"{name:30s} {ms:8.1f} {comm / 1e6:12.3f} MB {mem / 1e6:12.3f} MB {f}")
    print("comm = payload handed to collectives on rank 0 (a ring all-reduce moves ~2(N-1)/N x it); "
          "mem = weights + grads + AdamW state (TP/PP rows: weights + grads); "
          "CPUs have no fast bf16 matmul, so the bf16 row shows the halved all-gather, not a speed-up")


def demo_worker(rank, world_size, port, args):
    """One rank of the demo; it reads as the outline (CS336 lecture_08's main)."""
    init_worker(rank, world_size, port)
    B, T = args.batch_size, args.context_length
    idx = torch.randint(0, args.vocab_size, (B * world_size, T + 1), generator=torch.Generator().manual_seed(1))  # global batch
    x, y = idx[:, :-1][rank * B:(rank + 1) * B], idx[:, 1:][rank * B:(rank + 1) * B]   # my shard, (B, T) each
    rows = demo_data_parallel(args, x, y)        # DDP, bucketed DDP, ZeRO-1, FSDP: split the batch
    rows += demo_tensor_parallel(args)           # Megatron: split each block's matrices
    rows += demo_pipeline(args, idx)             # GPipe: split the layers
    if rank == 0:
        print_report(args, rows)
    cleanup_distributed()


# ---------------------------------------------------------------
# CLI

if __name__ == "__main__":
    cfg = M.ModelConfig()                        # the model-shape defaults are the CPU default run's
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="run every variant on CPU with gloo and print step time, bytes, memory")
    p.add_argument("--world-size", type=int, default=2, help="number of processes (ranks)")
    # model / data
    p.add_argument("--vocab-size", type=int, default=cfg.vocab_size, help="vocabulary size (random tokens)")
    p.add_argument("--d-model", type=int, default=cfg.d_model, help="model width")
    p.add_argument("--num-layers", type=int, default=cfg.num_layers, help="transformer blocks")
    p.add_argument("--num-heads", type=int, default=cfg.num_heads, help="attention heads (TP splits them over ranks)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank")
    p.add_argument("--context-length", type=int, default=cfg.context_length, help="tokens per sequence")
    # run
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 1 warm-up)")
    p.add_argument("--bucket-size-mb", type=float, default=1.0, help="BucketedDDP bucket size")
    args = parser.parse_args()
    if args.world_size < 2 or args.num_heads % args.world_size or args.batch_size * args.world_size % 4:
        raise SystemExit("error: need --world-size >= 2 dividing --num-heads (TP splits the heads) and "
                         "--batch-size x --world-size a multiple of 4 (GPipe's micro-batches)")
    mp.spawn(demo_worker, args=(args.world_size, free_port(), args), nprocs=args.world_size, join=True)
