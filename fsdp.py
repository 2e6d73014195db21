"""
Hand-written FSDP (ZeRO-3), and the process group it runs in. train.py calls `init_distributed`,
`shard_model` and `clip_grad_norm` and never sees a collective itself.

A *unit* is a group of modules whose trainable parameters are flattened into one fp32 vector,
padded to a multiple of the world size W and cut into W equal shards. Rank r owns shard r:
the master weights, their gradient and the AdamW moments exist only for that 1/W slice.

          flat fp32 [N + pad]            forward / backward of one unit on rank r
    ┌─────────┬─────────┬─────────┐
    │ shard 0 │ shard 1 │ shard 2 │   all-gather (bf16)   ──►  full params, views into one buffer
    └─────────┴─────────┴─────────┘   run the unit              (freed after the unit runs)
        rank 0    rank 1    rank 2    backward: re-gather, grad of the full buffer
                                      reduce-scatter (fp32) ──►  grad of shard r, summed over ranks

Units: the projector, the token embeddings, each transformer block, the final norm + LM head.
The gather is an autograd Function (`GatherParams`) whose backward *is* the reduce-scatter, so
autograd issues it the moment the unit's gradient is complete. Tensors autograd saved from the
freed buffer are kept as (offset, shape, stride) by a saved-tensor hook and rebuilt from a
re-gather when backward reaches the unit; with --grad-ckpt the unit's gather + forward is
checkpointed, so its recompute re-gathers by itself. Frozen parts (CLIP, and the LLM in stage 1)
are not units: replicated in the compute dtype, never gathered. One rank in fp32 (a CPU run) has
nothing to gather: the modules use views of the shard itself. `--fsdp torch` hands the same
units to PyTorch's FSDP2 (`fully_shard`) instead.
"""

import contextlib
import datetime
import functools
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


# ------------------------------------------------------------------------------------------------
# The process group: torchrun starts the ranks; a plain `python train.py` is a world of one

def init_distributed(cfg):
    if dist.is_initialized():  # the tiny preset runs several trainings in one process
        return current_device(cfg), dist.get_rank(), dist.get_world_size()
    device = current_device(cfg)
    backend = process_group_backend(device)
    timeout = datetime.timedelta(seconds=cfg.dist_timeout)
    # torch._dynamo (which nn.init imports when the model is built) imported after the group exists
    # keeps it alive past destroy_process_group: gloo's threads outlive the interpreter and a finished
    # rank can die at exit (pytorch/pytorch#190489). Imported before the group, it holds none.
    import torch._dynamo  # noqa: F401
    if "RANK" in os.environ:  # torchrun (one node or many, through its rendezvous)
        dist.init_process_group(backend, timeout=timeout)
    else:  # one process: the same code path with a group of one
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    return device, dist.get_rank(), dist.get_world_size()


def process_group_backend(device):
    """NCCL for the CUDA tensors (gathers, reduce-scatters, the grad norm), gloo for the CPU ones: each
    step all-reduces its token count, loss sum and stop flag on the CPU, which NCCL alone refuses."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def current_device(cfg):
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return device


# ------------------------------------------------------------------------------------------------
# Units, shards and the gather

class GatherParams(torch.autograd.Function):
    """shard [S] fp32 -> full [W*S] in the compute dtype. Backward: reduce-scatter (sum, fp32),
    issued asynchronously; `Schedule.finish_backward` adds the results into shard.grad."""

    @staticmethod
    def forward(ctx, shard, unit):
        ctx.unit = unit
        return unit.all_gather()

    @staticmethod
    def backward(ctx, grad_full):
        unit = ctx.unit
        unit.full_for_backward = None  # the unit's backward is complete: free its params
        unit.schedule.reduce_scatter(unit, grad_full)
        return None, None


class Schedule:
    """Overlap of communication with compute, shared by all units of a model.

    Forward: when unit i starts, the all-gather of unit i+1 is issued (async_op: NCCL runs it
    on its own stream, gloo on its worker threads) and waited for only when unit i+1 starts.
    Backward: when unit i re-gathers, unit i-1's gather is issued. Gradients: each unit's
    reduce-scatter is issued as its backward ends and waited for two units later, so at most
    two full-size gradients are alive. The order is the order units began in the first
    forward; all ranks run the same program, so they issue collectives in the same order."""

    def __init__(self, world):
        self.world, self.order, self.recording, self.in_backward = world, [], True, False
        self.pending = []  # (unit, reduce-scatter output, work handle, input kept alive)

    def started(self, unit):
        if self.recording and unit not in self.order:
            self.order.append(unit)
        if self.world == 1 or unit not in self.order:
            return
        i = self.order.index(unit) + (-1 if self.in_backward else 1)
        if 0 <= i < len(self.order):
            self.order[i].prefetch()

    def reduce_scatter(self, unit, grad_full):
        if self.world == 1:  # nothing to sum: the bf16 grad goes into the fp32 one as it is
            self._accumulate(unit, grad_full)
            return
        grad_full = grad_full.float().contiguous()
        out = torch.empty(unit.shard_size, dtype=torch.float32, device=grad_full.device)
        work = dist.reduce_scatter_tensor(out, grad_full, op=dist.ReduceOp.SUM, async_op=True)
        self.pending.append((unit, out, work, grad_full))
        self._complete(keep=2)

    def _complete(self, keep=0):
        while len(self.pending) > keep:
            unit, out, work, _ = self.pending.pop(0)
            work.wait()
            self._accumulate(unit, out)

    @staticmethod
    def _accumulate(unit, grad):
        if unit.shard.grad is None:
            unit.shard.grad = grad.float()
        else:  # fp32 += bf16 upcasts inside the add: no fp32 copy of the gradient in between
            unit.shard.grad.add_(grad)

    @contextlib.contextmanager
    def backward(self):
        """Wrap loss.backward(): flips prefetching to reverse order and, at the end, waits
        for the outstanding reduce-scatters and drops any gather nobody consumed."""
        self.recording, self.in_backward = False, True
        try:
            yield
        finally:
            self._complete()
            for unit in self.order:
                unit.drop_prefetch()
            self.in_backward = False


class ShardedUnit:
    """Trainable params of `modules` flattened into one fp32 shard per rank (see docstring)."""

    def __init__(self, name, modules, names, compute_dtype, device, schedule, grad_ckpt=False):
        self.name, self.modules, self.compute_dtype, self.schedule = name, modules, compute_dtype, schedule
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.slots = []  # (owner module, attribute, offset, shape, qualified name)
        flat_parts, offset = [], 0
        for mod in modules:
            for sub in mod.modules():
                for attr, p in list(sub._parameters.items()):
                    if p is None or not p.requires_grad:
                        continue
                    self.slots.append((sub, attr, offset, p.shape, names[id(p)]))
                    flat_parts.append(p.detach().reshape(-1).float().cpu())
                    offset += p.numel()
                    del sub._parameters[attr]          # from now on a plain attribute,
                    setattr(sub, attr, None)           # present only while the unit runs
        self.numel = offset
        self.shard_size = math.ceil(offset / self.world)
        flat = torch.zeros(self.shard_size * self.world)
        flat[:offset] = torch.cat(flat_parts)
        self.shard = nn.Parameter(flat[self.rank * self.shard_size:(self.rank + 1) * self.shard_size]
                                  .clone().to(device))
        # One rank computing in fp32: the shard is the whole unit in the compute dtype, so the
        # modules use views of it directly; nothing to gather, copy, free or re-gather.
        self.local = self.world == 1 and compute_dtype == torch.float32
        self.full_for_backward = None
        self._saving = None
        self._prefetched = None  # (buffer, work handle, source kept alive)
        self._patch(grad_ckpt)

    # -- collectives ------------------------------------------------------------------------------
    def all_gather(self):
        """The full params in the compute dtype (a new buffer): the prefetched one, or gathered now."""
        if self._prefetched is None:
            return self.gather_flat(self.shard.detach().to(self.compute_dtype))
        full, work, _ = self._prefetched
        self._prefetched = None
        work.wait()
        return full

    def gather_flat(self, local):
        """A shard-shaped tensor (the params, or Muon's update) -> the unit's whole flat vector."""
        if self.world == 1:
            return local
        full = local.new_empty(self.shard_size * self.world)
        dist.all_gather_into_tensor(full, local)
        return full

    def prefetch(self):
        if self._prefetched is None:
            local = self.shard.detach().to(self.compute_dtype)
            full = local.new_empty(self.shard_size * self.world)
            self._prefetched = (full, dist.all_gather_into_tensor(full, local, async_op=True), local)

    def drop_prefetch(self):
        if self._prefetched is not None:
            self._prefetched[1].wait()
            self._prefetched = None

    # -- installing the gathered params into the modules ----------------------------------------
    def _install(self, full):
        # one split, not a slice per parameter: each slice's backward would zero-fill a
        # gradient the size of the whole unit
        sizes = [math.prod(shape) for *_, shape, _ in self.slots]
        parts = torch.split_with_sizes(full, sizes + [full.numel() - sum(sizes)])
        for (sub, attr, _, shape, _), p in zip(self.slots, parts):
            setattr(sub, attr, p.view(shape))

    def begin(self, save_hooks):
        if self.local:  # autograd accumulates straight into shard.grad
            self._install(self.shard)
            return
        full = GatherParams.apply(self.shard, self)
        self.schedule.started(self)
        self._install(full)
        if save_hooks and torch.is_grad_enabled():
            # Tensors autograd saves that live in `full` are kept as (shape, stride, offset)
            # and rebuilt from a re-gather in backward, so `full` itself can be freed now.
            storage = full.untyped_storage().data_ptr()

            def pack(t):
                if t.untyped_storage().data_ptr() == storage and t.dtype == full.dtype:
                    return (self, t.shape, t.stride(), t.storage_offset())
                return t

            self._saving = torch.autograd.graph.saved_tensors_hooks(pack, ShardedUnit._unpack)
            self._saving.__enter__()

    def end(self):
        if self._saving is not None:
            self._saving.__exit__(None, None, None)
            self._saving = None
        for sub, attr, *_ in self.slots:
            setattr(sub, attr, None)

    @staticmethod
    def _unpack(x):
        if not (isinstance(x, tuple) and len(x) == 4 and isinstance(x[0], ShardedUnit)):
            return x
        unit, shape, stride, offset = x
        if unit.full_for_backward is None:
            unit.full_for_backward = unit.all_gather()
            unit.schedule.started(unit)
        return unit.full_for_backward.as_strided(shape, stride, offset)

    def _patch(self, grad_ckpt):
        """Gather on the way into the unit's first module, free on the way out of its last. A unit of
        one module with --grad-ckpt runs inside a checkpoint, whose recompute gathers again (so it
        needs no saved-tensor hooks)."""
        first, last = self.modules[0], self.modules[-1]
        ckpt = grad_ckpt and first is last
        f_first = first.forward

        def begin_first(*args, **kwargs):
            self.begin(save_hooks=not ckpt)
            return f_first(*args, **kwargs)

        first.forward = begin_first
        f_last = last.forward  # begin_first itself when the unit is one module

        def end_last(*args, **kwargs):
            try:
                return f_last(*args, **kwargs)
            finally:
                self.end()

        last.forward = functools.partial(checkpoint_call, end_last) if ckpt else end_last

    def full_state(self):
        """{qualified name: full fp32 tensor on CPU} gathered from all ranks."""
        flat = self.gather_flat(self.shard.detach()).cpu()
        return {qual: flat[off:off + math.prod(shape)].view(shape).clone()
                for _, _, off, shape, qual in self.slots}


def training_units(model, stage):
    """The FSDP units, in forward order: (name, [modules]). Stage 1 trains the projector alone."""
    units = [("projector", [model.projector])]
    if stage == 2:
        llm = model.llm
        units.append(("embed_tokens", [llm.embed_tokens]))
        units += [(f"layers.{i}", [block]) for i, block in enumerate(llm.layers)]
        units.append(("norm+lm_head", [llm.norm, llm.lm_head]))
    return units


def shard_model(model, cfg, device, compute_dtype):
    """Freeze, move and shard `model` for training -> (the trainable parameters: our shards or FSDP2's
    DTensors, () -> the full state dict for saving (a collective), our units or None)."""
    if cfg.stage == 2 and model.config.text.tie_word_embeddings:
        raise SystemExit("tied word embeddings cannot be split into the embedding and head units; "
                         "untie them (Vicuna/LLaMA-2 are untied)")
    lora = [p for n, p in model.llm.named_parameters() if ".lora_" in n]  # lora.py's factors train alone
    model.requires_grad_(False)
    for mod in [model.projector] + ([model.llm] if cfg.stage == 2 and not lora else []) + lora:
        mod.requires_grad_(True)
    names = {id(p): n for n, p in model.named_parameters()}
    model.vision_tower.to(device=device, dtype=compute_dtype)  # frozen: replicated, never gathered
    if cfg.stage == 1:
        model.llm.to(device=device, dtype=compute_dtype)
        if cfg.grad_ckpt:  # activations of the frozen LLM are still needed for the projector's grad
            for block in model.llm.layers:
                block.forward = functools.partial(checkpoint_call, block.forward)
    units = [(n, mods) for n, mods in training_units(model, cfg.stage)  # LoRA: no embedding or head unit
             if any(p.requires_grad for m in mods for p in m.parameters())]
    sharded = None
    if cfg.fsdp == "torch":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        frozen = {p for p in model.parameters() if not p.requires_grad}  # CLIP, LoRA's base: never sharded
        for name, mods in units:
            for p in frozenset(p for m in mods for p in m.parameters()) - frozen:
                p.data = p.data.to(device=device, dtype=torch.float32)
            if cfg.grad_ckpt and name.startswith("layers."):
                mods[0].forward = functools.partial(checkpoint_call, mods[0].forward)
            if name != "norm+lm_head":
                fully_shard(mods[0], mp_policy=policy, ignored_params=frozen)
        if cfg.stage == 2:
            # FSDP2 wants the root's forward to run first: the whole model is the root and owns
            # what its sharded children do not (norm + head); the frozen CLIP (LoRA's base) stays out
            fully_shard(model, mp_policy=policy, ignored_params=frozen)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        schedule = Schedule(dist.get_world_size())
        sharded = [ShardedUnit(name, mods, names, compute_dtype, device, schedule, grad_ckpt=cfg.grad_ckpt)
                   for name, mods in units]
        params = [u.shard for u in sharded]
    for mod in model.modules():  # buffers (none trainable) follow the device
        mod._buffers.update({key: buf.to(device) for key, buf in mod._buffers.items() if buf is not None})

    def full_state():  # the frozen parts (all of FSDP2's params, gathered), then our units
        state = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).float().cpu()
                 for n, t in model.state_dict().items()}
        for u in sharded or ():
            state.update(u.full_state())
        return state

    return params, full_state, sharded


def checkpoint_call(fn, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def clip_grad_norm(params, max_norm, fsdp):
    """The global grad norm, then scale as clip_grad_norm_ does (max_norm 0: measure only). Ours
    all-reduces the squared shard norms; FSDP2's DTensor grads do it inside clip_grad_norm_."""
    if fsdp == "torch":
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf))
    grads = [p.grad for p in params if p.grad is not None]
    sq = torch.stack([torch.linalg.vector_norm(g.float()) ** 2 for g in grads]).sum() if grads else torch.zeros(())
    if dist.get_world_size() > 1:
        dist.all_reduce(sq)
    norm = sq.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device))
    return float(norm)
