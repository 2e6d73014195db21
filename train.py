"""
Visual instruction tuning in two stages, as in the paper, on one CPU or many GPUs.

    stage 1  feature alignment   CLIP frozen, LLM frozen, projector trained  (image-caption pairs)
    stage 2  instruction tuning  CLIP frozen, projector + LLM trained         (conversations)

The loop is written out in `train()`: sample the global batch, split it over ranks and
micro-batches, forward, backward, clip, step, log, checkpoint. Scale lives in fsdp.py: the loop
does not know whether it runs on 1 CPU or 64 GPUs. The loss is the summed token cross-entropy
over the supervised tokens of the whole global batch (all ranks, all micro-batches), so 1
process and W ranks compute the same gradient, and accumulation changes nothing but memory.
"""

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, asdict, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import data
import llama
from clip import CLIPVisionConfig, ImageError
from fsdp import clip_grad_norm, init_distributed, shard_model
from llama import Tokenizer
from lora import add_lora, merged_state, save_adapter
from model import DTYPES, LLaVA, LLaVAConfig, dtype_for, supervised_positions, token_loss, write_tokenizer_files
from model import COUNT, FRACTION, NONNEG, POSITIVE, RATE, boolean, checked, device_name
from weights import WeightsError, fetch, read_json, write_atomic, write_json_atomic


# ------------------------------------------------------------------------------------------------
# Configuration: the paper's recipes as defaults, every value settable on the command line

RECIPES = {  # (stage 1, stage 2) overrides; the paper's v1 is the default
    "v1": {"projector": "linear", "image_size": 224, "pad_to_square": False,
           1: {"lr": 2e-3, "global_batch": 128, "epochs": 1},
           2: {"lr": 2e-5, "global_batch": 32, "epochs": 3}},
    "v1.5": {"projector": "mlp2x_gelu", "image_size": 336, "pad_to_square": True,
             1: {"lr": 1e-3, "global_batch": 256, "epochs": 1},
             2: {"lr": 2e-5, "global_batch": 128, "epochs": 1}},
}
RECIPES["v1.5-lora"] = {**RECIPES["v1.5"], 2: {  # the official finetune_lora.sh
    "lr": 2e-4, "projector_lr": 2e-5, "global_batch": 128, "epochs": 1, "lora_r": 128, "lora_alpha": 256}}
PRESETS = ("tiny", "tiny-short", "tiny-long")  # the synthetic world end to end (tiny.TINY_PRESETS)
TEMPLATE_NAMES = tuple(data.TEMPLATES)  # the class body below has a field named data


def option(default, help, type=None, choices=None):
    """A TrainConfig field and its flag: one line of help, the value check, the choices."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices})


@dataclass
class TrainConfig:
    stage: int = option(None, "1: feature alignment (projector); 2: instruction tuning (+ LLM) "
                              "(default: 2 with --init, else 1)", int, (1, 2))
    recipe: str = option("v1", "v1: the paper (linear, 224 px); v1.5 (MLP, 336 px, padded); v1.5-lora (its "
                               "stage 2 with LoRA)", choices=tuple(RECIPES))
    preset: str = option("", "the synthetic world end to end on a CPU: tiny (~5 min), tiny-short (~1 min), "
                             "tiny-long (~11 min)", choices=("",) + PRESETS)
    # where things come from
    clip: str = option("openai/clip-vit-large-patch14", "vision tower: a CLIP directory or Hub name")
    llm: str = option("lmsys/vicuna-7b-v1.5", "language model: a LLaMA/Vicuna directory or Hub name")
    init: str = option("", "stage 2: a stage-1 output or llava-hf directory (none: a fresh projector)")
    data: str = option("", "a LLaVA JSON list or JSONL file, or 'scienceqa' (with --scienceqa-root)")
    image_folder: str = option("", "the folder the records' 'image' paths are relative to")
    scienceqa_root: str = option("", "--data scienceqa: the release's folder (problems.json, images/, ...)")
    answer_first: bool = option(False, "--data scienceqa: answer first (QCM-ALE), else reasoning first")
    out: str = option("", "output directory (default: runs/stage1 or runs/stage2; a preset: runs/PRESET)")
    overwrite: bool = option(False, "start over in an --out that holds another run (its checkpoints and log go)")
    check_data: bool = option(False, "read every record as the run would, train nothing: bad records, lengths")
    # model choices (None = the recipe's)
    projector: str = option(None, "linear (v1) or mlp2x_gelu (v1.5)", choices=(None, "linear", "mlp2x_gelu"))
    image_size: int = option(None, "input resolution: a fresh model's --clip must be of this size", POSITIVE)
    pad_to_square: bool = option(None, "pad pictures to a square before resizing (LLaVA-1.5)")
    vision_layer: int = option(-2, "CLIP layer whose features the projector reads (-2: the penultimate)", int)
    template: str = option(None, "conversation (stage 1: plain, 2: vicuna_v1)", choices=(None,) + TEMPLATE_NAMES)
    lora_r: int = option(None, "stage 2: train LoRA factors of this rank, not the LLM (0: off)", COUNT)
    lora_alpha: float = option(None, "LoRA's scale is alpha / r (default: the recipe's, else 2 r)", RATE)
    lora_dropout: float = option(0.05, "dropout on the input of the LoRA path", FRACTION)
    lora_targets: str = option("", "the LLM's linear layers LoRA adapts, e.g. q_proj,v_proj (none: all)")
    max_length: int = option(2048, "tokens per sample, image included; longer samples are cut", POSITIVE)
    # optimisation (None = the recipe's)
    lr: float = option(None, "peak learning rate (warmup, then cosine to 0)", NONNEG)
    projector_lr: float = option(None, "the projector's lr (official mm_projector_lr; none: --lr)", NONNEG)
    global_batch: int = option(None, "samples per optimizer step, over all ranks", POSITIVE)
    micro_batch: int = option(4, "samples per forward on one rank (accumulation makes up the rest)", POSITIVE)
    epochs: float = option(None, "passes over the data", RATE)
    warmup_ratio: float = option(0.03, "share of the steps spent warming up the learning rate", FRACTION)
    weight_decay: float = option(0.0, "AdamW weight decay", NONNEG)
    adam_beta2: float = option(0.999, "AdamW beta2 (HF Trainer's default, as the official scripts)", FRACTION)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: no clipping)", NONNEG)
    optimizer: str = option("adamw", "adamw (the paper) or muon (blocks' matrices)", choices=("adamw", "muon"))
    compile_elementwise: str = option("auto", "torch.compile RMSNorm, RoPE, SwiGLU (auto: CUDA with Triton)",
                                      choices=("auto", "on", "off"))
    max_steps: int = option(0, "stop after this many steps (0: the epochs decide)", COUNT)
    seed: int = option(0, "seed of the data order and the projector's init", int)
    # systems
    device: str = option("", "cpu, cuda, ... (default: cuda if there is one)", device_name)
    dtype: str = option("", "compute dtype (default: bf16 on CUDA, fp32 on CPU)", choices=("",) + tuple(DTYPES))
    threads: int = option(0, "CPU threads torch uses (0: torch's default, one per core)", COUNT)
    fsdp: str = option("ours", "ours (fsdp.py's hand-written ZeRO-3) or torch (FSDP2)", choices=("ours", "torch"))
    grad_ckpt: bool = option(False, "activation checkpointing: recompute each block in backward")
    num_workers: int = option(2, "DataLoader worker processes per rank", COUNT)
    dist_timeout: int = option(600, "seconds a rank waits for a dead peer before giving up", POSITIVE)
    save_every: int = option(0, "checkpoint every N steps (0: only at the end)", COUNT)
    stop_at: int = option(0, "save a checkpoint and stop after this step (job time limits)", COUNT)
    max_bad_share: float = option(0.05, "stop when more than this share of the samples seen are bad", FRACTION)
    keep: int = option(2, "checkpoints to keep", COUNT)
    resume: str = option("", "a checkpoint directory, or auto: the newest under --out")
    log_every: int = option(1, "print one line every N steps", POSITIVE)


EPILOG = """examples:
  python train.py --preset tiny                    # the synthetic world, end to end on a CPU
  python train.py --stage 1 --clip DIR --llm DIR --data pretrain.json --image-folder IMGS
  torchrun --nproc-per-node 8 train.py --stage 2 --recipe v1.5 --init runs/stage1 \\
      --data llava_v1_5_mix665k.json --image-folder data --grad-ckpt --save-every 500
  torchrun ... train.py ... --resume auto          # continue after a crash or a job time limit"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), epilog=EPILOG,
                                usage="%(prog)s (--preset NAME | --stage {1,2} --data FILE ...) [options]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        meta, shown = f.metadata, {None: "the recipe's", "": "none"}.get(f.default, f.default)
        help = meta["help"] if "(default" in meta["help"] else f"{meta['help']} (default: {shown})"
        kw = dict(default=f.default, help=help, type=meta["type"] or str)
        if f.type is bool:
            kw.update(type=boolean, nargs="?", const=True, metavar="true|false")
        if meta["choices"]:
            named = [str(c) for c in meta["choices"] if c]
            kw.update(type=checked(kw["type"], lambda v, c=meta["choices"]: v in c, "one of " + ", ".join(named)),
                      metavar="{" + ",".join(named) + "}")
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    return fill_recipe(TrainConfig(**vars(p.parse_args(argv))))


def fill_recipe(cfg):
    """The recipe's values where cfg has None; the paper's templates (stage 1 the plain captions)."""
    cfg.stage, recipe = cfg.stage or (2 if cfg.init else 1), RECIPES[cfg.recipe]
    for key, value in {**recipe, **recipe[cfg.stage]}.items():
        if isinstance(key, str) and getattr(cfg, key) is None:
            setattr(cfg, key, value)
    cfg.template = cfg.template or ("plain" if cfg.stage == 1 else "vicuna_v1")
    cfg.lora_r, cfg.lora_alpha = cfg.lora_r or 0, cfg.lora_alpha or 2.0 * (cfg.lora_r or 0)
    cfg.out = cfg.out or (f"runs/{cfg.preset}" if cfg.preset else f"runs/stage{cfg.stage}")
    return cfg


def log0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


# ------------------------------------------------------------------------------------------------
# The optimizer: fused AdamW over the trainable shards, or Muon for the blocks' matrices

def make_optimizer(params, sharded, model, cfg):
    """AdamW (fused over our FSDP's fp32 master shards), or `Muon` for the LLM blocks' matrices.
    The projector's --projector-lr is kept as its group's scale of the scheduled lr."""
    scale = (cfg.projector_lr or cfg.lr) / cfg.lr if cfg.lr else 1.0
    proj = {id(p) for p in ([u.shard for u in sharded if u.name == "projector"] if sharded is not None
                            else model.projector.parameters())}
    groups = [{"params": [p for p in params if id(p) in proj], "lr_scale": scale},
              {"params": [p for p in params if id(p) not in proj], "lr_scale": 1.0}]
    groups = [g for g in groups if g["params"]]
    adamw = dict(lr=cfg.lr, betas=(0.9, cfg.adam_beta2), eps=1e-8, weight_decay=cfg.weight_decay,
                 foreach=False, fused=sharded is not None)  # FSDP2's DTensors take the loop
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **adamw)
    if sharded is None:
        raise SystemExit("--optimizer muon works on our FSDP's shards; use it with --fsdp ours")
    # Newton-Schulz in bf16 as torch.optim.Muon, on a GPU or a CPU with bf16 matrix units (elsewhere
    # bf16 products are emulated, many times slower); with --dtype fp32 in fp32, where W ranks then
    # reproduce one process to fp32 rounding.
    fast_bf16 = sharded[0].shard.device.type == "cuda" or torch.cpu._is_avx512_bf16_supported()
    ns_dtype = torch.bfloat16 if fast_bf16 and cfg.dtype != "fp32" else torch.float32
    return Muon(groups, [u for u in sharded if u.name.startswith("layers.")], ns_dtype=ns_dtype, **adamw)


class Muon(torch.optim.AdamW):
    """Muon (Jordan et al. 2024) for the weight matrices of the LLM's blocks; AdamW, unchanged,
    for the rest (embeddings, head, norms, projector), as Muon's authors prescribe. A matrix's
    gradient is nearly low-rank; Muon replaces the momentum G = U S V^T by about U V^T, so rare
    directions learn as fast as common ones. Per matrix W (rows x cols), as torch.optim.Muon,
    after the decoupled weight decay W *= 1 - lr * wd:
        m = 0.95 m + 0.05 g;  u = 0.05 g + 0.95 m                 (Nesterov momentum)
        W -= lr * 0.2 * sqrt(max(rows, cols)) * newton_schulz(u)  (an AdamW step's RMS: one --lr)

    On our shards (a block's matrices and norm gains in one flat vector per rank; a matrix may
    straddle two ranks) the matrices are masked out of the gradient, so AdamW's step only decays
    them; the momentum lives in the shard like AdamW's moments (checkpointed, re-cut); each rank
    all-gathers the block's update, orthogonalises every matrix and steps its own slice.
    """

    def __init__(self, groups, matrix_units, momentum=0.95, ns_steps=5, ns_dtype=torch.bfloat16, **adamw):
        super().__init__(groups, **adamw)
        self.units, self.momentum, self.ns_steps, self.ns_dtype = matrix_units, momentum, ns_steps, ns_dtype
        self.masks, self.same_shape = {}, {}  # shard -> True where a matrix lives; shape -> [(unit, offset)]
        for u in matrix_units:
            mask = torch.zeros(u.shard_size * u.world, dtype=torch.bool)
            for _, _, offset, shape, _ in u.slots:
                if len(shape) == 2:
                    mask[offset:offset + shape.numel()] = True
                    self.same_shape.setdefault(tuple(shape), []).append((u, offset))
            self.masks[u.shard] = mask[u.rank * u.shard_size:(u.rank + 1) * u.shard_size].to(u.shard.device)

    @torch.no_grad()
    def step(self):  # every block ran, so every matrix unit has its gradient
        lr = {id(p): g["lr"] for g in self.param_groups for p in g["params"]}
        matrix_grads = [(u, u.shard.grad * self.masks[u.shard]) for u in self.units]
        for u in self.units:
            u.shard.grad.masked_fill_(self.masks[u.shard], 0.0)
        super().step()
        updates = {}  # unit -> its whole Nesterov update
        for u, g in matrix_grads:
            m = self.state[u.shard].setdefault("momentum_buffer", torch.zeros_like(u.shard))
            m.lerp_(g, 1 - self.momentum)
            updates[u] = u.gather_flat(g.lerp_(m, self.momentum))
        out = {u: torch.zeros_like(update) for u, update in updates.items()}
        # one batched Newton-Schulz per shape (every block's q, ...): a few large matmuls, not many small
        for shape, where in self.same_shape.items():
            n, scale = math.prod(shape), 0.2 * math.sqrt(max(shape))
            stack = torch.stack([updates[u][offset:offset + n].view(shape) for u, offset in where])
            ortho = newton_schulz(stack, self.ns_steps, self.ns_dtype)  # [matrices, rows, cols]
            for (u, offset), o in zip(where, ortho):
                out[u][offset:offset + n] = o.flatten().float() * scale
        for u, o in out.items():
            u.shard.add_(o[u.rank * u.shard_size:(u.rank + 1) * u.shard_size], alpha=-lr[id(u.shard)])


def newton_schulz(g, steps, dtype=torch.bfloat16, coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7):
    """~U V^T of each matrix g[i] = U S V^T ([matrices, rows, cols]): Muon's quintic iteration."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    x = x.mT if tall else x  # iterate on the wide side: x x^T is the smaller Gram matrix
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return x.mT if tall else x


def wants_compiled_elementwise(cfg, device):
    """--compile-elementwise auto: on with CUDA if Triton (torch.compile's GPU kernels) is there."""
    import importlib.util
    auto = device.type == "cuda" and importlib.util.find_spec("triton") is not None
    return {"on": True, "off": False}.get(cfg.compile_elementwise, auto)


# ------------------------------------------------------------------------------------------------
# Data: which samples each rank sees at each step (a pure function of seed, step and world)

class MicroBatches(torch.utils.data.Sampler):
    """This rank's micro-batches (index lists) from `start_step` on. A step's global batch is the
    same whatever the world size: a run resumed on other ranks continues with the same samples."""

    def __init__(self, n, cfg, rank, world, start_step, total_steps):
        self.n, self.cfg, self.rank, self.start, self.total = n, cfg, rank, start_step, total_steps
        self.per_rank = cfg.global_batch // world
        self.accum = math.ceil(self.per_rank / cfg.micro_batch)
        self._epoch = (None, None)

    def global_batch(self, step):
        epoch, i = divmod(step, self.n // self.cfg.global_batch)  # a partial last batch is dropped
        if self._epoch[0] != epoch:  # each epoch a seeded permutation
            g = torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)
            self._epoch = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._epoch[1][i * self.cfg.global_batch:(i + 1) * self.cfg.global_batch]

    def __iter__(self):
        for step in range(self.start, self.total):
            mine = self.global_batch(step)[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
            for j in range(self.accum):
                yield mine[j * self.cfg.micro_batch:(j + 1) * self.cfg.micro_batch]


# ------------------------------------------------------------------------------------------------
# Checkpoints: a llava-hf directory + per-rank optimizer shards + train_state.json

OPTIM_STATE = ("exp_avg", "exp_avg_sq", "momentum_buffer")  # AdamW's moments, Muon's momentum


def save_checkpoint(path, model, cfg, full_state, optimizer, sharded, step):
    """Written to `path.tmp/`, renamed when every rank is done: a crash mid-write leaves the last one."""
    rank, world = dist.get_rank(), dist.get_world_size()
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = full_state()  # collective: every rank takes part
    if rank == 0:
        save_model(model, cfg, tmp, state)
    tensors = {"rng/torch": torch.get_rng_state()}
    for name, p in stepped(model, sharded):  # the master weights and the optimizer's state of each
        st = optimizer.state.get(p, {})
        for k, t in [("master", p.detach())] + [(k, st[k]) for k in OPTIM_STATE if k in st]:
            tensors[f"{name}/{k}"] = local(t).float().cpu().contiguous()
    save_file(tensors, str(tmp / f"optim-rank{rank:05d}.safetensors"))
    dist.barrier()
    if rank == 0:
        write_json_atomic(tmp / "train_state.json", {"step": step, "world_size": world, "config": asdict(cfg)})
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def save_model(model, cfg, path, state):
    """A llava-hf directory; stage 1's holds the projector and names its vision tower and LLM; LoRA's is merged."""
    bases = {"vision": cfg.clip, "llm": cfg.llm} if cfg.stage == 1 else None
    if cfg.lora_r:  # and beside it the adapter, factors and projector in PEFT's format
        save_adapter(model, Path(path) / "adapter", cfg.init or cfg.llm, state, projector=True)
        state = merged_state(model, state)
    model.save_pretrained(path, bases=bases, state=state)


def stepped(model, sharded):
    """(name, tensor) this rank's optimizer steps: our FSDP's flat shards, or FSDP2's DTensors."""
    return ([(u.name, u.shard) for u in sharded] if sharded is not None
            else [(n, p) for n, p in model.named_parameters() if p.requires_grad])


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def checkpoints(out):
    """The checkpoint-N directories under out, oldest first."""
    return sorted(Path(out).glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))


def checkpoint_problem(path):
    """None for a complete, readable checkpoint; else what is wrong with it, naming the file."""
    path = Path(path)
    if not (path / "train_state.json").is_file():
        return f"{path} is not a checkpoint (no train_state.json)"
    try:
        state = read_json(path / "train_state.json", "checkpoint state")
        world, _, _ = int(state["world_size"]), int(state["step"]), dict(state["config"])
    except WeightsError as e:
        return str(e)
    except (KeyError, TypeError, ValueError):
        return f"{path / 'train_state.json'} lacks its step, world_size or config"
    needed = ["config.json", "tokenizer.model"] + [f"optim-rank{r:05d}.safetensors" for r in range(world)]
    missing = [f for f in needed if not (path / f).is_file()]  # (the resumed run copies its tokenizer)
    if missing or not list(path.glob("model*.safetensors")):
        return f"{path} is incomplete: no {', '.join(missing) or 'model.safetensors'}"
    for f in sorted(path.glob("*.safetensors")):
        try:
            safe_open(str(f), "pt")  # reads the header and checks the file holds all it promises
        except Exception as e:  # safetensors' error type differs between its versions
            return f"{f} is unreadable ({str(e).splitlines()[0][:120]})"


# What a resumed run may change: where and how often it writes and logs, how it computes the same
# steps. Anything else (data, schedule, batches, learning rates, model) would be another run.
RESUME_MAY_CHANGE = {"out", "resume", "overwrite", "save_every", "keep", "log_every", "stop_at", "num_workers",
                     "threads", "dist_timeout", "device", "micro_batch", "grad_ckpt",
                     "compile_elementwise", "max_bad_share"}


def find_resume(cfg):
    """The checkpoint --resume names (auto: the newest readable one under --out, None if there is
    none), refused when it cannot be read or belongs to a differently configured run."""
    path, problem = Path(cfg.resume), None
    if cfg.resume == "auto":
        ckpts = checkpoints(cfg.out)
        for path in reversed(ckpts):
            if (problem := checkpoint_problem(path)) is None:
                break
            log0(f"--resume auto: skipping {path.name}: {problem}")
        if not ckpts:
            log0(f"--resume auto: no checkpoint under {cfg.out}, starting fresh")
            return None
        if problem:  # starting over here would erase the run's log: the user decides
            raise SystemExit(f"--resume auto: no checkpoint under {cfg.out} can be read (above); "
                             "start over with --overwrite instead of --resume, or use another --out")
    elif problem := checkpoint_problem(path):
        raise SystemExit(f"--resume {cfg.resume}: {problem}; resume from another one, or with --resume auto")
    saved = read_json(path / "train_state.json", "checkpoint state")["config"]
    now = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as they were saved
    changed = [k for k in now if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    if changed:
        diff = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} (now {now[k]!r})" for k in changed)
        raise SystemExit(f"{path} belongs to a run with {diff}: resume with those values or use another --out")
    return path


def load_resume_state(path, optimizer, sharded, model):
    """Restore the master weights and the optimizer's state; our FSDP's shards re-cut for this world."""
    meta = read_json(path / "train_state.json", "checkpoint state")  # checked by find_resume
    old_world, rank = meta["world_size"], dist.get_rank()
    if sharded is None and old_world != dist.get_world_size():
        raise SystemExit("--fsdp torch resumes on the same number of ranks only; use --fsdp ours to change it")
    handles = [safe_open(str(path / f"optim-rank{r:05d}.safetensors"), "pt") for r in range(old_world)]
    # as torch's own load_state_dict: fused/capturable AdamW count steps on the device, one tensor a parameter
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    units = {u.name: u for u in sharded or []}
    for name, p in stepped(model, sharded):
        for k in ("master",) + OPTIM_STATE:
            key = f"{name}/{k}"
            if key not in handles[0].keys():
                continue
            if name in units:  # our flat vector, re-cut for this world: the layout is the same, the padding moves
                u = units[name]
                flat = torch.zeros(u.shard_size * u.world)
                flat[:u.numel] = torch.cat([h.get_tensor(key) for h in handles])[:u.numel]
                mine = flat[rank * u.shard_size:(rank + 1) * u.shard_size]
            else:
                mine = handles[rank].get_tensor(key)
            if k != "master":
                optimizer.state[p][k] = torch.zeros_like(p.data)
                optimizer.state[p]["step"] = torch.tensor(float(meta["step"]), device=p.device if on_device else None)
            local(p.data if k == "master" else optimizer.state[p][k]).copy_(mine)
    torch.set_rng_state(handles[rank if rank < old_world else 0].get_tensor("rng/torch"))
    return meta["step"]


# ------------------------------------------------------------------------------------------------
# What a step costs (MFU) and the loss curve

def device_peak_flops(device):
    """A GPU's dense bf16 peak FLOP/s, for MFU (None where unknown: a CPU)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peaks = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}
    return next((flops for key, flops in peaks.items() if key in name), None)


def flop_params(model):
    """The weights of matrix products step_flops multiplies (taken before shard_model): CLIP's patch
    embedding and the blocks that run, the LLM's blocks, its LM head apart (it runs on supervised
    positions only). Embedding tables are lookups, no FLOPs; the norms' few weights are counted."""
    vt, llm, count_params = model.vision_tower, model.llm, lambda m: sum(p.numel() for p in m.parameters())
    blocks = vt.num_blocks_for(model.config.vision_feature_layer)
    head = llm.lm_head.weight.numel()
    embed = 0 if llm.config.tie_word_embeddings else llm.embed_tokens.weight.numel()  # tied: one table
    vision = count_params(vt.embeddings.patch_embedding) + sum(count_params(b) for b in vt.encoder.layers[:blocks])
    return {"vision": vision, "projector": count_params(model.projector),
            "llm": count_params(llm) - head - embed, "lm_head": head}


def step_flops(model_cfg, counts, stage, text_tokens, supervised_tokens, images, seq_len):
    """FLOPs of one optimizer step, with `counts` from flop_params, written out:
         trained params:   6 N T   (forward 2NT, backward 4NT)
         frozen LLM (st.1): 4 N T  (forward 2NT + the input-gradient half of backward 2NT)
         LM head:          the same per token, on the supervised tokens only
         frozen CLIP:       2 N T  per image token (forward only, no backward)
         attention:        12 L d T^2 / 2 per sequence (QK^T and AV, fwd+bwd, causal half)
    """
    L, d = model_cfg.text.num_hidden_layers, model_cfg.text.hidden_size
    patches = model_cfg.vision.num_patches + 1
    k = 6 if stage == 2 else 4
    flops = 2 * counts["vision"] * patches * images + 6 * counts["projector"] * model_cfg.num_patches * images
    flops += k * counts["llm"] * text_tokens + k * counts["lm_head"] * supervised_tokens
    return flops + 12 * L * d * seq_len * text_tokens / 2


def logged_losses(log_path):
    return [json.loads(line)["loss"] for line in open(log_path)]


def nice_ticks(lo, hi, log):
    """Round tick values within [lo, hi]: 1-2-5 steps per decade on a log axis, else ~6 steps."""
    if log:
        ticks = [m * 10 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in (1, 2, 5)]
    else:
        step = 10 ** math.floor(math.log10(max(hi - lo, 1) / 5))
        step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= 6)
        ticks = [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
    return [t for t in ticks if lo <= t <= hi]


def draw_loss_curve(stages, path):
    """stages: [(name, per-step losses)] -> a PNG (pillow alone): the stages one after another, the
    raw loss light under its centred running average (~5% of the stage's steps), on a log axis."""
    from PIL import Image, ImageDraw
    W, H, left, right, top, bottom = 800, 420, 60, 20, 30, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    losses = [v for _, curve in stages for v in curve if v > 0 and math.isfinite(v)]
    n = sum(len(curve) for _, curve in stages)
    if len(losses) < 2:
        return img.save(path)
    lo, hi = min(losses), max(losses) if max(losses) > min(losses) else min(losses) * 2
    x = lambda i: left + i * (W - left - right) / (n - 1)
    y = lambda v: top + (math.log(hi) - math.log(max(v, lo))) * (H - top - bottom) / (math.log(hi) - math.log(lo))
    for t in nice_ticks(lo, hi, log=True):
        d.line([(left, y(t)), (W - right, y(t))], fill=(235, 235, 235))
        d.text((5, y(t) - 6), f"{t:g}", fill="black")
    for t in nice_ticks(0, n - 1, log=False):
        d.line([(x(t), H - bottom), (x(t), H - bottom + 4)], fill="black")
        d.text((x(t) - 10, H - bottom + 8), f"{int(t)}", fill="black")
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    start, legend = 0, left
    for k, (name, curve) in enumerate(stages):
        colour, w = colours[k % 4], max(1, len(curve) // 40)
        logs = [math.log(max(v, lo)) for v in curve]  # the average of log losses sits mid-band
        smooth = [math.exp(sum(part) / len(part)) for part in
                  (logs[max(0, i - w):i + w + 1] for i in range(len(curve)))]
        points = lambda vs: [(x(start + i), y(v)) for i, v in enumerate(vs)]
        if len(curve) > 1:
            d.line(points(curve), fill=tuple(c + (255 - c) * 2 // 3 for c in colour), width=1)
            d.line(points(smooth), fill=colour, width=2)
        if start:
            d.line([(x(start), top), (x(start), H - bottom)], fill="gray")
        d.text((legend, 8), name, fill=colour)
        legend += d.textlength(name) + 16
        start += len(curve)
    d.rectangle([left, top, W - right, H - bottom], outline="gray")
    d.text((W // 2 - 40, H - 14), "step   (loss, log scale)", fill="black")
    img.save(path)


# ------------------------------------------------------------------------------------------------
# Before the first step: the inputs checked, the model built, the output directory claimed

def training_data(cfg):
    """What --data names -> (records, image folder), checked before any model is built or
    downloaded; "scienceqa" converts the release under --scienceqa-root on the fly."""
    if not cfg.data:
        raise SystemExit(f"stage {cfg.stage} needs --data: a LLaVA JSON/JSONL file or scienceqa (or a --preset)")
    if cfg.data == "scienceqa":
        root = Path(cfg.scienceqa_root)
        if not (root / "problems.json").is_file() or not (root / "pid_splits.json").is_file():
            raise SystemExit(f"--scienceqa-root {str(root)!r} holds no problems.json and pid_splits.json")
        return data.scienceqa_to_llava(root / "problems.json", root / "pid_splits.json", "train",
                                       image_root=root / "images", answer_first=cfg.answer_first), root / "images"
    records = data.read_records(cfg.data)
    if not records:
        raise SystemExit(f"--data {cfg.data} holds no records")
    folder = Path(cfg.image_folder or ".")
    if cfg.image_folder and not folder.is_dir():
        raise SystemExit(f"--image-folder {cfg.image_folder}: no such directory")
    with_image = [r["image"] for r in records[:2000] if isinstance(r, dict) and isinstance(r.get("image"), str)][:20]
    if with_image and not any((folder / i).is_file() for i in with_image):
        flag = f"--image-folder {cfg.image_folder}" if cfg.image_folder else "no --image-folder (the current directory)"
        raise SystemExit(f"{cfg.data}: none of the first {len(with_image)} images is under {flag}, e.g. "
                         f"{folder / with_image[0]}; give the folder the records' 'image' paths start from")
    return records, folder


def check_data(cfg):
    """--check-data: every record read as the run would read it (the tokenizer and image size of --init's
    model, or of --llm and --clip, from their configs: no weights fetched) -> exit status 1 if any is bad."""
    records, folder = training_data(cfg)
    if cfg.init:
        path = fetch_for("--init", cfg.init, weights=False)
        config = read_json(path / "config.json", "LLaVA config", LLaVAConfig.from_hf)
    else:
        path = fetch_for("--llm", cfg.llm, weights=False)
        clip = fetch_for("--clip", cfg.clip, files=["config.json"], weights=False)
        config = LLaVAConfig(vision=read_json(clip / "config.json", "CLIP config", CLIPVisionConfig.from_hf))
    ds = data.LazySupervisedDataset(records, folder, Tokenizer(path), cfg.template, config.vision.image_size,
                                    config.num_patches, cfg.pad_to_square, cfg.max_length)
    ds.skips.print_first = 0  # every bad record is printed below, not the first few of each kind
    samples = [ds[i] for i in tqdm(range(len(ds)), desc=f"reading {cfg.data}", leave=False)]
    good, bad = [s for s in samples if s], [s for s in samples if not s]
    for s in bad:
        print(s)
        ds.skips.add(s)
    n, pictures = sorted(s["length"] for s in good) or [0], sum(s["pixel_values"] is not None for s in good)
    print(f"{cfg.data}: {len(samples)} records, {len(good)} trainable ({pictures} with an image, "
          f"{len(good) - pictures} text only), {len(bad)} bad")
    print(f"tokens a sample (an image is {config.num_patches}): max {n[-1]}, p50 {n[len(n) // 2]}, p95 "
          f"{n[int(0.95 * (len(n) - 1))]}; {sum(k > cfg.max_length for k in n)} over --max-length {cfg.max_length}")
    print(ds.skips.summary(len(samples)))
    return 1 if bad else 0


def fetch_for(flag, name, **kw):
    """weights.fetch, its errors naming the flag."""
    try:
        return fetch(name, **kw)
    except WeightsError as e:
        raise WeightsError(f"{flag} {name}: {e}") from None


def build_model(cfg, resume=None):
    """A checkpoint's model when resuming; else --init's (stage 2), or CLIP + LLM + a fresh
    projector (stage 1, and stage 2 without stage 1: the paper's ablation)."""
    if cfg.init and cfg.stage == 1:
        raise SystemExit("--init is for stage 2 (stage 1 starts from --clip and --llm)")
    if cfg.lora_r and cfg.stage == 1:
        raise SystemExit("--lora-r is for stage 2 (stage 1 trains the projector alone)")
    if resume is not None and not cfg.lora_r:  # LoRA restarts from its base; factors, projector: the masters
        model = LLaVA.from_pretrained(resume)
    elif not cfg.init:
        clip = fetch_for("--clip", cfg.clip, files=["config.json"])
        size = read_json(clip / "config.json", "CLIP config", CLIPVisionConfig.from_hf).image_size
        if size != cfg.image_size:  # the tower decides the resolution; a recipe names the one it was trained at
            raise SystemExit(f"--clip {cfg.clip} takes {size}-px pictures, not --image-size {cfg.image_size} (--recipe "
                             f"{cfg.recipe}'s default): give a CLIP of that size (v1.5: ...-patch14-336) "
                             f"or --image-size {size}")
        llm = fetch_for("--llm", cfg.llm)
        model = LLaVA.from_components(clip, llm, projector=cfg.projector, vision_feature_layer=cfg.vision_layer,
                                      pad_to_square=cfg.pad_to_square, seed=cfg.seed)
    else:
        init = fetch_for("--init", cfg.init)
        if not (init / "config.json").is_file() or read_json(init / "config.json").get("model_type") != "llava":
            raise SystemExit(f"--init {cfg.init}: not a stage-1 output or llava-hf directory (no llava config.json)")
        model = LLaVA.from_pretrained(init)
    model.config.template = cfg.template if cfg.stage == 2 else "vicuna_v1"
    model.config.pad_to_square = bool(cfg.pad_to_square)
    return model


def claim_out(cfg, rank):
    """Refuse an --out that holds another run, unless this run continues it (--resume) or starts
    over (--overwrite: its checkpoints and log are removed; the rest is overwritten)."""
    out, files = Path(cfg.out), ("train_config.json", "train_log.jsonl", "config.json", "train_state.json")
    previous = sorted(p.name for p in out.glob("*") if p.name in files or p.name.startswith("checkpoint-"))
    if not previous or cfg.resume:
        return
    if not cfg.overwrite:
        raise SystemExit(f"--out {out} holds another run ({', '.join(previous[:3])}): continue it with "
                         "--resume auto, start over with --overwrite, or choose another --out")
    if rank == 0:
        for path in out.glob("checkpoint-*"):
            shutil.rmtree(path, ignore_errors=True)
        (out / "train_log.jsonl").unlink(missing_ok=True)
    dist.barrier()


def truncate_log(path, step):
    """Keep the log's lines up to `step`: a run resumed from an older checkpoint redoes the rest."""
    kept = []
    for line in path.read_text().splitlines(keepends=True) if path.exists() else []:
        with contextlib.suppress(ValueError, KeyError, TypeError):  # a line torn by a kill goes
            if json.loads(line)["step"] <= step:
                kept.append(line)
    write_atomic(path.parent, {path.name: lambda tmp: tmp.write_text("".join(kept))})


class Run:
    """What one run holds, set up before its first step: the output claimed, the model built (or
    restored), its tokenizer beside the run, the dataset, shards, optimizer, the step to start at."""

    def __init__(self, cfg):
        records, image_folder = training_data(cfg)
        self.cfg, (self.device, self.rank, self.world) = cfg, init_distributed(cfg)
        claim_out(cfg, self.rank)
        random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
        log0("config in effect:\n" + json.dumps(asdict(cfg), indent=1))
        if cfg.global_batch % self.world:
            raise SystemExit(f"--global-batch {cfg.global_batch} must be a multiple of the {self.world} ranks")
        resume = find_resume(cfg) if cfg.resume else None
        self.model = model = build_model(cfg, resume)
        self.out, self.log_path = Path(cfg.out), Path(cfg.out) / "train_log.jsonl"
        # Only now, so a run that could not start leaves nothing behind. What the run writes reads
        # its tokenizer from out, never from a checkpoint that rotation may delete.
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / "train_config.json", asdict(cfg))
            write_tokenizer_files(model.tokenizer_dir, self.out, model.config)
        dist.barrier()
        model.tokenizer_dir = self.out
        tokenizer = Tokenizer(self.out)
        rule = '"</s>▁USER", as LLaVA-1.5 was trained' if tokenizer.legacy else '"</s>USER", today\'s rule'
        log0(f"tokenizer {self.out}: legacy={tokenizer.legacy} ({rule})")
        self.dataset = data.LazySupervisedDataset(
            records, image_folder, tokenizer, template=cfg.template, image_size=model.config.vision.image_size,
            num_patches=model.config.num_patches, pad_to_square=model.config.pad_to_square, max_length=cfg.max_length)
        n = len(self.dataset)
        if n < cfg.global_batch:
            raise SystemExit(f"{cfg.data} has {n} samples, fewer than --global-batch {cfg.global_batch}")
        self.total = cfg.max_steps or max(1, int(round(n // cfg.global_batch * cfg.epochs)))
        self.warmup, self.flop_params = math.ceil(cfg.warmup_ratio * self.total), flop_params(model)
        model.train()
        self.dtype = dtype_for(self.device, cfg.dtype)
        if cfg.lora_r:  # the base frozen in the compute dtype and never sharded; only the fp32 factors train
            model.llm.to(device=self.device, dtype=self.dtype)
            targets = cfg.lora_targets.split(",") if cfg.lora_targets else None
            if not add_lora(model.llm, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets):
                raise SystemExit(f"--lora-targets {cfg.lora_targets}: no linear layer of the LLM is named so")
        self.params, self.full_state, self.sharded = shard_model(model, cfg, self.device, self.dtype)
        self.optimizer = make_optimizer(self.params, self.sharded, model, cfg)
        self.start = load_resume_state(resume, self.optimizer, self.sharded, model) if resume else 0
        if self.rank == 0:
            truncate_log(self.log_path, self.start)
        self.sampler = MicroBatches(n, cfg, self.rank, self.world, self.start, self.total)
        log0(f"{n} samples, {self.total} steps of {cfg.global_batch} ({self.world} ranks x {self.sampler.accum} "
             f"micro-batches of {cfg.micro_batch}), {sum(local(p).numel() for p in self.params) / 1e6:.2f}M "
             f"trainable params on rank 0, starting at step {self.start}")
        self.bad = self.seen = 0  # samples, all ranks, since this process started
        self.stop = None  # the signal that asked the run to stop


# ------------------------------------------------------------------------------------------------
# The loop

class Stop(KeyboardInterrupt):
    """A run stopped by a signal or --stop-at, its checkpoint saved: main() says how to go on.
    A KeyboardInterrupt to callers that know no better (eval.py's ablations)."""

    def __init__(self, why, step, out):
        super().__init__(f"{why}: stopped after step {step}, {Path(out) / f'checkpoint-{step}'} saved; "
                         "continue with the same command and --resume auto")
        self.why = why


def bad_data_problem(cfg, skips, bad, seen, n):
    """None while the data trains; else why the run stops: no sample seen so far was trainable,
    or more than --max-bad-share of them were bad (judged from min(200, n) samples on)."""
    if bad < seen and (seen < min(200, n) or bad <= cfg.max_bad_share * seen):
        return None
    counts = skips.counts()
    hint = {"missing_image": f"are the records' 'image' paths relative to --image-folder "
                             f"{cfg.image_folder or '(none: the current directory)'}?",
            "unreadable_record": "are the records LLaVA's {'image', 'conversations': [{'from', 'value'}, ...]}?",
            }.get(max(counts, key=counts.get, default=None), "the first skipped records are printed above")
    what = ("no sample of the first batch can be trained on" if bad == seen else
            f"{bad} of the {seen} samples seen are bad, more than --max-bad-share {cfg.max_bad_share}")
    return f"{cfg.data}: {what} ({skips.summary(n)}); {hint}"


def save(run, step):
    """checkpoint-{step}, then only the newest --keep of them stay."""
    save_checkpoint(run.out / f"checkpoint-{step}", run.model, run.cfg, run.full_state, run.optimizer,
                    run.sharded, step)
    for old in checkpoints(run.out)[:-run.cfg.keep] if run.rank == 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def next_micro_batches(run, batches, step):
    """This rank's micro-batches of the step and the supervised tokens of the whole global batch
    (the loss's normaliser). Bad samples are counted here; a micro-batch of bad samples only
    becomes one pad token with nothing to learn, so the collectives run on every rank."""
    micro = [next(batches) for _ in range(run.sampler.accum)]
    counts = torch.tensor([0.0, 0.0, 0.0])  # supervised tokens, bad and all samples
    for mb in micro:
        skipped = mb.pop("skipped")
        for s in skipped:
            run.dataset.record_skip(s)
        run.dataset.skips.truncated.update(mb.pop("truncated"))
        if len(mb["ids"]) == 0:
            mb.update(input_ids=torch.full((1, 1), run.model.config.pad_token_id), labels=torch.full((1, 1), -100))
        mb["positions"], mb["targets"] = supervised_positions(mb["labels"])  # where the LM head runs
        counts += torch.tensor([len(mb["targets"]), len(skipped), len(skipped) + len(mb["ids"])])
    dist.all_reduce(counts)  # every run has a process group (of one without torchrun)
    run.bad, run.seen = run.bad + int(counts[1]), run.seen + int(counts[2])
    if problem := bad_data_problem(run.cfg, run.dataset.skips, run.bad, run.seen, len(run.dataset)):
        if step > run.start:
            save(run, step)
            problem += f"; checkpoint-{step} saved, for --resume auto once the data is fixed"
        raise SystemExit(problem)
    return micro, float(counts[0])


def forward_backward(run, micro, n_tok, step):
    """Gradients of the step's loss (summed over the global batch's supervised tokens, divided by
    their number) -> (the loss, [loss sum, text tokens, images] of all ranks)."""
    denom = max(n_tok, 1.0)
    scale = run.world if run.cfg.fsdp == "torch" else 1  # FSDP2 averages its reduce-scatter
    mb_losses, text_tokens, images = [], 0, 0
    for mb in micro:
        ids, at, targets = (mb[k].to(run.device, non_blocking=True) for k in ("input_ids", "positions", "targets"))
        px = None if mb["pixel_values"] is None else mb["pixel_values"].to(run.device, non_blocking=True)
        with torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype != torch.float32):
            logits, _ = run.model(ids, px, logits_at=at)  # [K,V]: the LM head on supervised positions only
        loss = token_loss(logits, targets)
        with run.sharded[0].schedule.backward() if run.sharded else contextlib.nullcontext():
            (loss * scale / denom).backward()
        mb_losses.append(loss.detach())  # no float() here: that would wait for the GPU every micro-batch
        text_tokens += ids.numel()
        images += 0 if px is None else px.shape[0]
    stats = torch.tensor([float(torch.stack(mb_losses).double().sum()), float(text_tokens), float(images)],
                         dtype=torch.float64)
    dist.all_reduce(stats)
    step_loss = float(stats[0]) / denom
    if not math.isfinite(step_loss):
        raise SystemExit(f"step {step}: loss is {step_loss}; samples of this rank's batch: "
                         f"{[i for mb in micro for i in mb['ids']]}")
    return step_loss, stats


def step_record(run, step, loss, lr, gnorm, seconds, stats, n_tok, peak):
    """One line of train_log.jsonl: loss, lr, gradient norm, speed, memory (and MFU on CUDA)."""
    tokens = float(stats[1])
    record = {"step": step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(gnorm, 4),
              "tokens_per_s": round(tokens / seconds, 1)}
    if run.device.type == "cuda":
        record["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2)
        if peak:
            stage = 1 if run.cfg.lora_r else run.cfg.stage  # LoRA: a frozen LLM, as stage 1's
            flops = step_flops(run.model.config, run.flop_params, stage, tokens, n_tok, float(stats[2]),
                               tokens / max(1, run.cfg.global_batch))
            record["mfu"] = round(flops / seconds / (peak * run.world), 4)
    else:
        import resource
        record["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return record


def save_or_stop(run, step):
    """The periodic checkpoint, and a stop all ranks agree on (a signal may reach one only), saved."""
    cfg = run.cfg
    saved = cfg.save_every and step % cfg.save_every == 0 and step < run.total
    if saved:
        save(run, step)
    if step == cfg.stop_at and step < run.total:
        run.stop = "--stop-at"
    flag = torch.tensor([1.0 if run.stop else 0.0])
    dist.all_reduce(flag)
    if float(flag) > 0 and step < run.total:
        log0(f"{run.stop or 'a signal to another rank'}: saving checkpoint-{step} and stopping")
        if not saved:
            save(run, step)
        raise Stop(run.stop or "SIGTERM", step, run.out)


def ignore_stop_signals(worker_id):
    """DataLoader workers ignore Ctrl-C (sent to the process group) and SIGTERM: the run saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train(cfg):
    """One stage, start to end: -> the per-step losses of this process's steps."""
    run = Run(cfg)
    loader = torch.utils.data.DataLoader(
        run.dataset, batch_sampler=run.sampler, collate_fn=data.Collator(pad_id=run.model.config.pad_token_id),
        num_workers=cfg.num_workers, worker_init_fn=ignore_stop_signals, pin_memory=run.device.type == "cuda",
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        generator=torch.Generator())  # not torch's stream, so that a resumed run draws the same dropout
    peak, losses, step = device_peak_flops(run.device), [], run.start
    was_compiled = llama.compile_elementwise(wants_compiled_elementwise(cfg, run.device))

    def on_signal(sig, frame):  # Ctrl-C and SIGTERM only set a flag: the loop ends its step, saves and stops
        run.stop = signal.Signals(sig).name
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    log = open(run.log_path if run.rank == 0 else os.devnull, "a")  # the log is rank 0's
    bar = tqdm(total=run.total, initial=step, disable=run.rank != 0, desc=f"stage {cfg.stage}", leave=False)
    try:
        batches = iter(loader)  # after the handlers: a signal before a worker ignores it is ours
        while step < run.total:
            t0 = time.perf_counter()
            micro, n_tok = next_micro_batches(run, batches, step)
            lr = lr_at(step, run.total, run.warmup, cfg.lr)
            for g in run.optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            loss, stats = forward_backward(run, micro, n_tok, step)
            gnorm = clip_grad_norm(run.params, cfg.grad_clip, cfg.fsdp)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            step += 1
            record = step_record(run, step, loss, lr, gnorm, time.perf_counter() - t0, stats, n_tok, peak)
            losses.append(loss)
            print(json.dumps(record), file=log, flush=True)
            bar.update(1)
            if run.rank == 0 and (step % cfg.log_every == 0 or step == run.total):
                tqdm.write(" ".join(f"{k} {v}" for k, v in record.items()))
            save_or_stop(run, step)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        llama.compile_elementwise(was_compiled)
        bar.close()
        log.close()
    save(run, step)  # the last checkpoint, then the model itself, the loss curve, the bad-data tally
    state = run.full_state()
    if run.rank == 0:
        save_model(run.model, cfg, run.out, state)
        draw_loss_curve([(f"stage {cfg.stage}", logged_losses(run.log_path))], run.out / "loss.png")
        log0(run.dataset.skips.summary(len(run.dataset)))
        log0(f"saved {run.out} (loss curve {run.out / 'loss.png'}, log {run.log_path})")
    dist.barrier()
    return losses


def lr_at(step, total, warmup, peak):
    """Linear warmup, then cosine to 0 (transformers' get_cosine_schedule_with_warmup, as LLaVA)."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def main(argv=None):
    """Known errors end the run with one line on rank 0 and exit status 1, no traceback; a signal
    with the shell's status for it (130 for Ctrl-C, 143 for SIGTERM); --stop-at with 0."""
    cfg = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        if cfg.check_data:
            raise SystemExit(check_data(cfg))
        if cfg.preset:
            import tiny  # the preset's chapter: it runs train() below, stage after stage
            tiny.run_tiny(cfg)
        else:
            train(cfg)
        return
    except Stop as e:
        code, said = 0 if e.why == "--stop-at" else 128 + signal.Signals[e.why], str(e)
    except KeyboardInterrupt:  # outside a training loop: what is saved stays saved
        code, said = 130, "interrupted: no step was running, nothing more to save; --resume auto continues a run"
    except (WeightsError, data.DataError, ImageError, SystemExit) as e:
        if isinstance(e, SystemExit) and not isinstance(e.code, str):
            raise
        code, said = 1, f"error: {e}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print(said, file=sys.stderr, flush=True)
    raise SystemExit(code)


if __name__ == "__main__":
    sys.modules["train"] = sys.modules[__name__]  # tiny.py's `import train` is this module, not a copy
    main()
