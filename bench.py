"""
How fast nanollava is, measured against Hugging Face transformers on the same work.

    python bench.py preprocess                  # images/s: clip.preprocess vs CLIPImageProcessor (and padded)
    python bench.py vision  [--config tiny|20m] # CLIP tower forward, images/s
    python bench.py train   [--config ...]      # one training step (fwd + bwd + clip + AdamW), tokens/s
    python bench.py prefill [--config ...]      # a prompt (image included) into a fresh KV cache, tokens/s
    python bench.py decode  [--config ...]      # greedy decoding at batch 1 and 8, tokens/s
    python bench.py all     [--config ...]      # all of the above, then one table
    python bench.py gpu [--out summary.json]    # the prepared GPU run: training MFU, memory, decode

    common options: --device cpu|cuda --dtype fp32|bf16 --threads N --repeats N --warmup N --out FILE
                    --clock wall|cpu (cpu: this process's CPU time, for a machine others share)

The rules of the race (the numbers mean nothing without them):
- Same weights. transformers builds a random LlavaForConditionalGeneration of the config and saves
  it; our LLaVA loads that directory with `LLaVA.from_pretrained`. Same inputs, same thread count
  (torch.set_num_threads), same dtype, same device.
- Same work. Training is forward + backward + gradient clipping + AdamW on both sides (stage 2:
  CLIP frozen, projector + LLM trained) with the loss on the same supervised tokens, ours
  exactly as train.py runs it: the LM head only on those tokens' positions (transformers runs
  it on all of them), `fsdp.shard_model` with our FSDP at world size 1, so the gather/free
  machinery is inside the number (on CUDA
  with the compiled elementwise pieces train.py uses there; transformers runs eager, as it
  comes). Decoding is greedy with EOS switched off on both sides (`min_new_tokens` for
  transformers), so both produce exactly N tokens; decode tokens/s = B (N - 1) / (t(N) - t(1)),
  which cancels the prefill.
- Each repeat runs ours and then theirs, so a machine that other work slows down slows both
  alike; after warm-up we report the median of the repeats. The ratio is ours / theirs of two
  numbers measured in this run (> 1: we are faster).
- On a small machine that others share, use --threads 1: with more threads than free cores,
  OpenMP's barriers wait on threads the OS has parked, and small ops get many times slower
  (seen here on 2 busy cores: a tiny model decoding at 70 tokens/s with 2 threads, 500 with 1).

`gpu` is one prepared run for a single H100/H200 (random weights, no download, ~4 minutes on an H100):
a stage-2 step of a ~1B LLaVA and a stage-1 step with a 7B-shaped LLM through train.py's own
path (bf16, FSDP at world size 1, gradient checkpointing off and on; stage 2 also as LLaVA-1.5
runs it on one GPU, 8 micro-batches per optimizer step) with tokens/s, MFU and peak memory;
decode tokens/s of the 7B-shaped model, eager and compiled, against the memory-bandwidth bound;
and a smoke run of `train.train()` for both stages (stage 2 with Muon too). `--device cpu --tiny`
runs the same code with tiny shapes (the test suite does, so it is ready the day a GPU is).
"""

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import fsdp
import llama
import tiny
import train
from clip import CLIPVisionConfig, preprocess, preprocess_batch
from llama import KVCache, LlamaConfig
from model import LLaVA, LLaVAConfig, Projector, supervised_positions, token_loss

# -----------------------------------------------------------------------------------------------
# Configurations


@dataclass
class Shapes:
    """A LLaVA to benchmark plus the workload: `batch` x `seq` tokens per training step (the image's
    patches included), prompts of `prompt` tokens, `new_tokens` decoded."""
    vision: dict
    text: dict
    batch: int
    seq: int
    prompt: int
    new_tokens: int
    projector: str = "mlp2x_gelu"

    def config(self):
        return LLaVAConfig(vision=CLIPVisionConfig(**self.vision), text=LlamaConfig(**self.text),
                           projector=self.projector, image_token_id=self.text["vocab_size"] - 64,
                           pad_token_id=self.text["vocab_size"] - 63)


CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14)
VICUNA_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096)

CONFIGS = {
    # the tiny preset's towers (tiny.py) with its vocabulary (512 pieces + <image>, <pad>, to 576)
    "tiny": Shapes(vision=tiny.TINY_CLIP, text={**tiny.TINY_LLM, "vocab_size": 576},
                   batch=32, seq=64, prompt=40, new_tokens=32),
    # ~20M-class: 25M parameters in the LLaMA blocks (LLaMA's MLP ratio) + 3M in CLIP, and the real
    # 32064-token vocabulary (33M more in the embedding and head): 62M in all
    "20m": Shapes(vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                              num_attention_heads=4, image_size=64, patch_size=8),
                  text=dict(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                            num_attention_heads=8, rms_norm_eps=1e-5, max_position_embeddings=2048),
                  batch=8, seq=256, prompt=96, new_tokens=64),
    # the GPU run's two models (bench.py gpu)
    "1b": Shapes(vision=CLIP_L_336, text=dict(vocab_size=32064, hidden_size=2048, intermediate_size=5504,
                                              num_hidden_layers=16, num_attention_heads=32,
                                              rms_norm_eps=1e-5, max_position_embeddings=4096),
                 batch=16, seq=1024, prompt=608, new_tokens=128),  # 16: LLaVA-1.5's stage-2 batch per GPU
    "7b": Shapes(vision=CLIP_L_336, text=VICUNA_7B, batch=8, seq=640, prompt=608, new_tokens=128),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def count(module):
    return sum(p.numel() for p in module.parameters())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def log(*args):
    print(*args, flush=True)


# -----------------------------------------------------------------------------------------------
# Timing: warm up, then interleave ours and theirs, then the median


CLOCK = {"clock": time.perf_counter}  # --clock cpu: time.process_time


def timed(fn, device):
    clock = CLOCK["clock"] if device.type == "cpu" else time.perf_counter
    sync(device)
    t = clock()
    fn()
    sync(device)
    return clock() - t


def race(fns, device, warmup, repeats, min_sample=0.05):
    """{name: median seconds per call} of each fn in `fns` (a dict), run round-robin `repeats`
    times after `warmup` untimed rounds. A fast fn is called several times per sample, so that
    each sample lasts at least `min_sample` seconds and one scheduler hiccup is not a sample."""
    calls = {}
    for name, fn in fns.items():
        t = max(timed(fn, device), 1e-6)  # also the first warm-up call
        calls[name] = max(1, min(100, int(min_sample / t)))
    for _ in range(warmup - 1):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            k = calls[name]
            times[name].append(timed(lambda: [fn() for _ in range(k)], device) / k)
    return {name: statistics.median(ts) for name, ts in times.items()}


@dataclass
class Row:
    measurement: str
    batch: int
    seq: int
    unit: str
    ours: float
    transformers: float
    note: str = ""

    @property
    def ratio(self):
        return self.ours / self.transformers


# -----------------------------------------------------------------------------------------------
# The two models with the same weights


def hf_config(shapes):
    import transformers
    c = shapes.config()
    return transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**shapes.vision),
        text_config=transformers.LlamaConfig(**shapes.text, tie_word_embeddings=False),
        image_token_index=c.image_token_id, pad_token_id=c.pad_token_id,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default")


class Pair:
    """A random transformers LLaVA saved to a temporary llava-hf directory, from which both sides
    load: `ours()` / `theirs()` give fresh models (training mutates them) with identical weights."""

    def __init__(self, shapes, seed=0):
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.shapes, self.tmp = shapes, tempfile.TemporaryDirectory(prefix="nanollava-bench-")
        torch.manual_seed(seed)
        hf = transformers.LlavaForConditionalGeneration(hf_config(shapes))
        hf.save_pretrained(self.tmp.name)
        self.config = LLaVA.from_pretrained(self.tmp.name).config

    def ours(self, dtype, device):
        return LLaVA.from_pretrained(self.tmp.name, dtype=dtype, device=device)

    def theirs(self, dtype, device):
        import transformers
        return transformers.LlavaForConditionalGeneration.from_pretrained(
            self.tmp.name, dtype=dtype, attn_implementation="sdpa").to(device)


def make_batch(config, batch, seq, device, seed=0, prompt=None):
    """A training batch: [BOS, 3 text ids, P image ids, text...] of `seq` tokens per row, labels on the
    text after the image (as stage 2), random pixels. `prompt` shortens it to a generation prompt."""
    g = torch.Generator().manual_seed(seed)
    P, V = config.num_patches, config.image_token_id  # the image id sits just above the real vocabulary
    seq = prompt or seq
    if seq < P + 6:
        raise ValueError(f"sequence of {seq} tokens cannot hold the image's {P} patches")
    ids = torch.randint(3, V, (batch, seq), generator=g)
    ids[:, 0] = 1
    ids[:, 4:4 + P] = config.image_token_id
    labels = ids.clone()
    labels[:, :4 + P + 2] = -100  # supervise the reply only
    S = config.vision.image_size
    px = torch.randn(batch, 3, S, S, generator=g)
    return ids.to(device), labels.to(device), px.to(device)


# -----------------------------------------------------------------------------------------------
# The measurements (each returns Rows)

# scikit-image's bundled pictures: colour photos, then grayscale ones and a logo with alpha
RGB_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
              "retina", "cat", "colorwheel")
OTHER_PICTURES = ("camera", "coins", "moon", "page", "text", "horse", "logo")  # L, L, L, L, L, 1, RGBA


def photos(names):
    import skimage.data as sk
    from PIL import Image
    return [Image.fromarray(getattr(sk, n)()) for n in names]


def bench_preprocess(args, size=336):
    """clip.preprocess on each picture (as the data loader calls it) and a stack, and
    clip.preprocess_batch with a thread per core, vs transformers' processor on the whole list at
    once (its fastest use), at LLaVA-1.5's 336 px. The outputs must be identical bit for bit.
    Three sets: the colour photos (what LLaVA's data is made of) with CLIPImageProcessor, all the
    pictures (grayscale, bilevel and RGBA too), and the colour photos padded to a square of the
    mean colour, LLaVA-1.5's "pad" mode, with LlavaImageProcessor(do_pad=True)."""
    import transformers
    transformers.logging.set_verbosity_error()
    crop = {"height": size, "width": size}
    llava = getattr(transformers, "LlavaImageProcessorPil", transformers.LlavaImageProcessor)
    procs = {False: transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size=crop),
             True: llava(do_pad=True, size={"shortest_edge": size}, crop_size=crop)}
    rows, cores = [], os.cpu_count() or 1
    sets = (("preprocess rgb", RGB_PHOTOS, False), ("preprocess all", RGB_PHOTOS + OTHER_PICTURES, False),
            ("preprocess pad", RGB_PHOTOS, True))
    for label, names, pad in sets:
        images, hf = photos(names), procs[pad]

        def ours():
            return torch.stack([preprocess(img, size, pad_to_square=pad) for img in images])

        def theirs():
            return hf(images, return_tensors="pt")["pixel_values"]

        def ours_threads():
            return preprocess_batch(images, size, pad_to_square=pad, threads=cores)

        if not (torch.equal(ours(), theirs()) and torch.equal(ours_threads(), theirs())):
            raise AssertionError(f"clip.preprocess differs from {type(hf).__name__}")
        # Steady state, as a data loader runs: the first rounds page in the heap that the
        # pictures' buffers then reuse (tens of thousands of page faults, nearly all on our side).
        t = race({"ours": ours, "threads": ours_threads, "theirs": theirs}, torch.device("cpu"),
                 max(args.warmup, 5), args.repeats)
        n = len(images)
        name = type(hf).__name__ + ("(do_pad=True)" if pad else "")
        rows.append(Row(label, n, size, "images/s", n / t["ours"], n / t["theirs"],
                        f"{name}, {n} pictures, identical output, one thread each"))
        if cores > 1:
            rows.append(Row(f"{label}, {cores} threads", n, size, "images/s", n / t["threads"], n / t["theirs"],
                            f"clip.preprocess_batch (Pillow releases the GIL) vs the same {type(hf).__name__} call"))
    return rows


def bench_vision(args, pair, device, dtype):
    """The whole CLIP tower (every block, last hidden state) on `batch` images."""
    ours, theirs = pair.ours(dtype, device).eval(), pair.theirs(dtype, device).eval()
    B = pair.shapes.batch
    _, _, px = make_batch(pair.config, B, pair.shapes.seq, device)
    px = px.to(dtype)
    tower = theirs.model.vision_tower
    with torch.inference_mode():
        a, b = ours.vision_tower(px, layer=-1), tower(pixel_values=px).last_hidden_state
        err = float((a.float() - b.float()).abs().max())
        t = race({"ours": lambda: ours.vision_tower(px, layer=-1),
                  "theirs": lambda: tower(pixel_values=px).last_hidden_state}, device, args.warmup, args.repeats)
    S = pair.config.vision
    return [Row("vision", B, S.num_patches + 1, "images/s", B / t["ours"], B / t["theirs"],
                f"max |diff| {err:.1e}")]


def ours_train_step(model, stage, device, dtype, grad_ckpt=False, lr=2e-5, reshard_after_forward=True):
    """Our model set up exactly as train.train() sets it up (fsdp.shard_model: frozen parts in the
    compute dtype, trained units as fp32 shards of our FSDP at world size 1), and a function
    running one step of train.train()'s loop on a batch: autocast forward, summed token loss over
    the batch's supervised tokens, backward, fsdp.clip_grad_norm, AdamW, zero_grad. With
    micro_steps=k the batch goes through forward and backward k times before the optimizer steps
    (gradient accumulation, as train.py does when --global-batch is k x --micro-batch)."""
    cfg = train.TrainConfig(stage=stage, device=str(device), fsdp="ours", grad_ckpt=grad_ckpt, lr=lr,
                            weight_decay=0.0, adam_beta2=0.999, reshard_after_forward=reshard_after_forward)
    fsdp.init_distributed(cfg)
    model.train()
    params, _, sharded = fsdp.shard_model(model, cfg, device, dtype)
    optimizer = train.make_optimizer(params, sharded, model, cfg)
    compiled = train.wants_compiled_elementwise(cfg, device)  # as train() does: on with CUDA

    def step(ids, labels, px, micro_steps=1):
        was = llama.compile_elementwise(compiled)
        try:
            # train.py's collator finds the supervised positions on the CPU, in the loader
            at, targets = (t.to(device) for t in supervised_positions(labels.cpu()))
            denom = max(len(targets), 1) * micro_steps
            for _ in range(micro_steps):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    logits, _ = model(ids, px, logits_at=at)
                loss = token_loss(logits, targets)
                with sharded[0].schedule.backward():  # FSDP's backward-order prefetch and grad hand-off
                    (loss / denom).backward()
            fsdp.clip_grad_norm(params, cfg.grad_clip, cfg.fsdp)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach() * micro_steps / denom
        finally:
            llama.compile_elementwise(was)

    return step, params


def hf_train_step(hf, device, dtype, lr=2e-5):
    """transformers' model trained the same way: CLIP frozen (in the compute dtype, as ours),
    projector + LLM in fp32 with bf16 autocast when dtype is bf16, its own loss, clip, AdamW."""
    hf.train()
    hf.model.vision_tower.requires_grad_(False).to(dtype)
    params = [p for p in hf.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def step(ids, labels, px):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = hf(input_ids=ids, pixel_values=px, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def bench_train(args, pair, device, dtype):
    B, T = pair.shapes.batch, pair.shapes.seq
    ids, labels, px = make_batch(pair.config, B, T, device)
    ours, _ = ours_train_step(pair.ours(torch.float32, device), 2, device, dtype)
    theirs = hf_train_step(pair.theirs(torch.float32, device), device, dtype)
    first = float(ours(ids, labels, px)), float(theirs(ids, labels, px))  # same weights: same first loss
    t = race({"ours": lambda: ours(ids, labels, px), "theirs": lambda: theirs(ids, labels, px)},
             device, args.warmup, args.repeats)
    return [Row("train", B, T, "tokens/s", B * T / t["ours"], B * T / t["theirs"],
                f"first loss {first[0]:.5f} vs {first[1]:.5f}")]


def bench_prefill(args, pair, device, dtype, batch=1):
    """A prompt with its image into a fresh KV cache, next-token logits only (what generation does
    first)."""
    ours, theirs = pair.ours(dtype, device).eval(), pair.theirs(dtype, device).eval()
    T = pair.shapes.seq
    ids, _, px = make_batch(pair.config, batch, T, device)
    px = px.to(dtype)

    def run_ours():
        cache = KVCache(ours.config.text, batch, T, dtype, device)
        return ours.llm(inputs_embeds=ours.embed(ids, px), cache=cache, last_only=True)[:, -1]

    def run_theirs():
        return theirs(input_ids=ids, pixel_values=px, use_cache=True, logits_to_keep=1).logits[:, -1]

    with torch.inference_mode():
        err = float((run_ours().float() - run_theirs().float()).abs().max())
        t = race({"ours": run_ours, "theirs": run_theirs}, device, args.warmup, args.repeats)
    return [Row("prefill", batch, T, "tokens/s", batch * T / t["ours"], batch * T / t["theirs"],
                f"max |diff| of logits {err:.1e}")]


def bench_decode(args, pair, device, dtype, batches=(1, 8)):
    ours, theirs = pair.ours(dtype, device).eval(), pair.theirs(dtype, device).eval()
    N, T = pair.shapes.new_tokens, pair.shapes.prompt
    rows = []
    for B in batches:
        ids, _, px = make_batch(pair.config, B, T, device, seed=B)
        px = px.to(dtype)

        def run_ours(n):
            out = list(ours.generate(ids, px, max_new_tokens=n, eos_id=None))
            return torch.stack(out, 1)  # [B, n]

        def run_theirs(n):
            out = theirs.generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=pair.config.pad_token_id, eos_token_id=2)
            return out[:, ids.shape[1]:]

        a, b = run_ours(N), run_theirs(N)
        if a.shape != b.shape:
            raise AssertionError(f"decode produced {tuple(a.shape)} tokens (ours) vs {tuple(b.shape)} (transformers)")
        same = float((a.cpu() == b.cpu()).float().mean())
        t = race({"ours N": lambda: run_ours(N), "ours 1": lambda: run_ours(1),
                  "theirs N": lambda: run_theirs(N), "theirs 1": lambda: run_theirs(1)},
                 device, args.warmup, args.repeats)
        rate = lambda n1, nN: B * (N - 1) / max(nN - n1, 1e-9)  # noqa: E731
        rows.append(Row(f"decode b{B}", B, T, "tokens/s", rate(t["ours 1"], t["ours N"]),
                        rate(t["theirs 1"], t["theirs N"]),
                        f"{N} new tokens, {same:.0%} of them identical"))
    return rows


MEASUREMENTS = ["preprocess", "vision", "train", "prefill", "decode"]


def run_measurements(args, names):
    device = torch.device(args.device or "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK["clock"] = time.process_time if args.clock == "cpu" else time.perf_counter
    shapes = CONFIGS[args.config]
    import transformers
    pair = Pair(shapes) if set(names) - {"preprocess"} else None
    header = (f"nanollava vs transformers {transformers.__version__} | torch {torch.__version__} | "
              f"device {device_name(device)} | {torch.get_num_threads()} threads | {args.clock} clock | dtype {str(dtype)[6:]} | "
              f"config {args.config}")
    if pair is not None:
        c = pair.config
        header += (f" (CLIP {c.vision.hidden_size}x{c.vision.num_hidden_layers} at {c.vision.image_size} px, "
                   f"LLaMA {c.text.hidden_size}x{c.text.num_hidden_layers}, vocab {c.text.vocab_size}: "
                   f"{param_count(c) / 1e6:.1f}M params)")
    log(header)
    rows = []
    for name in names:
        log(f"... {name}")
        if name == "preprocess":
            got = bench_preprocess(args)
        else:
            got = globals()[f"bench_{name}"](args, pair, device, dtype)
        for r in got:
            log(format_row(r))
        rows += got
        gc.collect()
    log("\n" + header)
    log(table(rows))
    result = {"header": header, "config": args.config, "device": device_name(device), "dtype": str(dtype),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "threads": torch.get_num_threads(), "clock": args.clock,
              "rows": [{**r.__dict__, "ratio": r.ratio} for r in rows]}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def param_count(c):
    """Parameters of a LLaVA of config c, from a meta-device build (no memory)."""
    with torch.device("meta"):
        return count(LLaVA(c))


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def format_row(r):
    return (f"{r.measurement:<11} batch {r.batch:<3} seq {r.seq:<5} {r.unit:<9} ours {r.ours:>10.1f}  "
            f"transformers {r.transformers:>10.1f}  ratio {r.ratio:5.2f}x  {r.note}")


def table(rows):
    lines = ["| measurement | batch | seq | unit | ours | transformers | ours / transformers |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.measurement} | {r.batch} | {r.seq} | {r.unit} | {r.ours:.1f} | "
                     f"{r.transformers:.1f} | {r.ratio:.2f}x |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------
# bench.py gpu: one prepared run on one H100 / H200
#
# MFU = step FLOPs / step time / the chip's bf16 dense peak (train.PEAK_BF16_FLOPS: 989 TFLOP/s on
# an H100 or H200), with the step FLOPs from train.step_flops:
#     6 N T   for trained parameters (forward 2NT + backward 4NT)
#     4 N T   for the frozen LLM of stage 1 (forward + the input-gradient half of backward)
#     the LM head's N only on the T's supervised tokens (the only ones it runs on)
#     2 N T   for the frozen CLIP, per image token (forward only)
#     12 L d T^2 / 2 per sequence for attention scores and values, forward + backward, causal half
# N counts the weights of matrix products (train.flop_params): no embedding tables, which are
# lookups, as torchtitan counts; CLIP's blocks that run (layer -2 skips the last one).
# Decode bound: every new token reads every weight once (the embedding table excepted: one row),
# so tokens/s <= HBM bandwidth / (bytes of weights + bytes of the KV cache read).

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


def build_on_device(config, device, dtype, seed=0):
    """A random LLaVA made directly on `device` in `dtype`: a meta build (no memory), storage
    allocated on the device, then N(0, 0.02) weights, unit norms and zero biases drawn there
    (no 7B-parameter init on the CPU)."""
    with torch.device("meta"):
        model = LLaVA(config)
    model = model.to(dtype).to_empty(device=device)
    init_random(model, seed)
    return model


@torch.no_grad()
def init_random(module, seed=0, std=0.02):
    torch.manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() == 1 and name.endswith("weight") and ("norm" in name or "layrnorm" in name):
            p.fill_(1.0)
        elif p.dim() == 1 and name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, std)


def unpatch(model):
    """Undo what shard_model did to a model whose LLM stayed frozen (stage 1): drop the checkpoint
    wrappers on the blocks and give it a fresh, plain projector."""
    for block in model.llm.layers:
        block.__dict__.pop("forward", None)
    w = model.llm.embed_tokens.weight
    model.projector = Projector(model.config.projector, model.config.vision.hidden_size,
                                model.config.text.hidden_size).to(device=w.device, dtype=w.dtype)
    init_random(model.projector)


def peak_memory(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def gpu_train(model, shapes, stage, device, dtype, grad_ckpt, warmup, repeats, profile=False, micro_steps=1,
              reshard_after_forward=True):
    """tokens/s, MFU and peak memory of train.py's step on `model` (which shard_model mutates);
    `profile`: then two more steps under torch.profiler, its table of the costliest operators;
    `micro_steps`: that many micro-batches per optimizer step (the numbers are per optimizer step)."""
    reset_memory(device)
    c = model.config
    counts = train.flop_params(model)
    step, params = ours_train_step(model, stage, device, dtype, grad_ckpt=grad_ckpt,
                                   reshard_after_forward=reshard_after_forward)
    B, T = shapes.batch, shapes.seq
    ids, labels, px = make_batch(c, B, T, device)
    losses = [float(step(ids, labels, px, micro_steps)) for _ in range(warmup)]
    times = []
    for _ in range(repeats):
        times.append(timed(lambda: losses.append(float(step(ids, labels, px, micro_steps))), device))
    dt = statistics.median(times)
    supervised = len(supervised_positions(labels.cpu())[0])
    flops = train.step_flops(c, counts, stage, B * T, supervised, B, T) * micro_steps
    peak = train.device_peak_flops(device)
    out = {"stage": stage, "grad_ckpt": grad_ckpt, "micro_steps": micro_steps, "batch": B, "seq": T, "step_s": dt,
           "reshard_after_forward": reshard_after_forward,
           "tokens_per_s": B * T * micro_steps / dt, "step_tflop": flops / 1e12, "achieved_tflops": flops / dt / 1e12,
           "mfu": flops / dt / peak if peak else None, "peak_mem_gb": peak_memory(device),
           "flop_params": counts, "supervised_tokens": supervised,
           "losses": losses, "finite": all(math.isfinite(x) for x in losses)}
    if profile:
        out["profile"] = profile_table(lambda: step(ids, labels, px), device)
    del step, params
    return out


def gpu_stage2(shapes, device, dtype, args):
    """A ~1B LLaVA, stage 2 (projector + LLM trained), gradient checkpointing off and on; then, as
    LLaVA-1.5's stage 2 runs on one GPU (global batch 128 = 8 micro-batches of 16), 8 micro-batches
    per optimizer step, so the optimizer's fixed cost is spread over 8x the tokens; and both with
    the params kept from forward to backward (--reshard-after-forward false: no second cast).
    --profile: afterwards, where a step's time goes (torch.profiler, the top operators)."""
    out = {}
    for key, ckpt, micro, reshard in (("ckpt_off", False, 1, True), ("ckpt_on", True, 1, True),
                                      ("kept_ckpt_off", False, 1, False), ("accum8_ckpt_off", False, 8, True),
                                      ("accum8_kept_ckpt_off", False, 8, False)):
        log(f"  stage 2, {shapes.text['hidden_size']}x{shapes.text['num_hidden_layers']} LLM, grad ckpt {ckpt}, "
            f"{micro} micro-batch(es) per step, reshard after forward {reshard}")
        model = build_on_device(shapes.config(), device, dtype)
        out[key] = r = gpu_train(model, shapes, 2, device, dtype, ckpt, args.warmup, args.repeats,
                                 args.profile and key == "ckpt_off", micro_steps=micro, reshard_after_forward=reshard)
        log(f"    {fmt_train(r)}")
        if "profile" in r:
            log(r["profile"])
        del model
        reset_memory(device)
    return out


def profile_table(fn, device, steps=2, rows=15):
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return f"torch.profiler, {steps} steps:\n" + prof.key_averages().table(
        sort_by=key, row_limit=rows, max_name_column_width=50)


def gpu_stage1(model, shapes, device, dtype, args):
    """The 7B-shaped LLM frozen in bf16, projector trained: stage 1, gradient checkpointing off and on."""
    out = {}
    for ckpt in (False, True):
        log(f"  stage 1, {shapes.text['hidden_size']}x{shapes.text['num_hidden_layers']} LLM frozen, grad ckpt {ckpt}")
        unpatch(model)
        out[f"ckpt_{'on' if ckpt else 'off'}"] = r = gpu_train(model, shapes, 1, device, dtype, ckpt,
                                                                args.warmup, args.repeats)
        log(f"    {fmt_train(r)}")
        reset_memory(device)
    unpatch(model)
    return out


def fmt_train(r):
    mfu = f"MFU {r['mfu']:.1%}" if r["mfu"] is not None else "MFU n/a"
    mem = f"peak {r['peak_mem_gb']:.1f} GiB" if r["peak_mem_gb"] is not None else ""
    return (f"{r['tokens_per_s']:.0f} tokens/s ({r['step_s'] * 1e3:.0f} ms/step, {r['step_tflop']:.1f} TFLOP/step, "
            f"{r['achieved_tflops']:.0f} TFLOP/s) {mfu} {mem} losses {[round(x, 3) for x in r['losses']]}")


def decode_rate(model, ids, px, n, skip=3):
    """Decode tokens/s of one generate call (batch 1, greedy, EOS off), timed on the host clock
    from the `skip`-th new token to the last (each yield has synced already): the prefill, and a
    compiled step's first calls (compilation, CUDA-graph capture), stay outside the clock.
    -> (tokens/s, seconds of the whole call)."""
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in model.generate(ids, px, max_new_tokens=n, eos_id=None)]
    return (len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip]), stamps[-1] - t0


def gpu_decode(model, shapes, device, dtype, args, deadline):
    unpatch(model)  # in case the training part stopped half-way
    llama.compile_elementwise(False)  # generation as chat.py runs it (the training steps restore it too)
    model.eval()
    c = model.config
    ids, _, px = make_batch(c, 1, shapes.prompt, device, prompt=shapes.prompt)
    ids, px = ids[0], px.to(dtype)
    n = shapes.new_tokens
    # bytes each new token must read: all weights but the embedding table (one row of it), and
    # the KV cache at the mean context length of the decode
    weight_bytes = sum(p.numel() * p.element_size() for name, p in model.llm.named_parameters()
                       if not name.startswith("embed_tokens"))
    t = c.text
    kv_bytes = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * (shapes.prompt + n / 2) * dtype.itemsize
    name = device_name(device)
    bw = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)
    out = {"batch": 1, "prompt": shapes.prompt, "new_tokens": n, "weight_gb": weight_bytes / 1e9,
           "kv_gb": kv_bytes / 1e9, "hbm_tb_s": bw / 1e12 if bw else None,
           "bound_tokens_per_s": bw / (weight_bytes + kv_bytes) if bw else None}
    log("  decode, eager")
    decode_rate(model, ids, px, 8)  # warm-up
    out["eager_tokens_per_s"] = statistics.median(decode_rate(model, ids, px, n)[0] for _ in range(args.repeats))
    log(f"    eager {out['eager_tokens_per_s']:.1f} tokens/s")
    # compiled: torch.compile of the static-shape decode step, CUDA graphs on a GPU. On a CPU the
    # static step runs uncompiled (inductor would spend minutes compiling C++ for a smoke test).
    # The first call compiles; further calls run while the time budget allows.
    log("  decode, compile_decode()")
    model.compile_decode(compile=device.type == "cuda")
    out["compiled"] = device.type == "cuda"
    try:
        rate, first_call = decode_rate(model, ids, px, n)
        rates = [rate]
        out["first_call_s"] = first_call  # compilation + capture + the call itself
        log(f"    first call {first_call:.1f} s (compiles), then {rate:.1f} tokens/s")
        while len(rates) < args.repeats and time.perf_counter() + 2 * first_call < deadline:
            rate, call = decode_rate(model, ids, px, n)
            rates.append(rate)
            log(f"    call {len(rates)}: {call:.1f} s, {rate:.1f} tokens/s")
        out["compiled_tokens_per_s"] = statistics.median(rates)
        out["compiled_calls"] = len(rates)
        log(f"    compiled {out['compiled_tokens_per_s']:.1f} tokens/s")
    except Exception as e:  # keep the eager numbers
        traceback.print_exc()
        out["compiled_error"] = f"{type(e).__name__}: {e}"
    finally:
        model._static_step = None
    for mode in ("eager", "compiled"):
        if out["bound_tokens_per_s"] and f"{mode}_tokens_per_s" in out:
            out[f"{mode}_of_bound"] = out[f"{mode}_tokens_per_s"] / out["bound_tokens_per_s"]
    return out


def gpu_smoke(device, dtype, workdir):
    """train.train() itself, both stages, a few steps on a tiny synthetic world, --grad-ckpt;
    stage 2 once more with --optimizer muon (Newton-Schulz in the compute dtype on this device)."""
    root = Path(workdir) / "smoke"
    world = tiny.make_synthetic(root / "data", n_train=32, n_test=4, seed=0, image_size=64, vocab_size=400)
    clip_dir, llm_dir = tiny.make_tiny_bases(root, world["tokenizer"], seed=0)
    common = dict(clip=str(clip_dir), llm=str(llm_dir), image_folder=str(world["image_folder"]),
                  projector="mlp2x_gelu", image_size=tiny.TINY_CLIP["image_size"], pad_to_square=False,
                  global_batch=8, micro_batch=4, max_steps=3, warmup_ratio=0.0, max_length=256,
                  device=str(device), dtype={torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype],
                  grad_ckpt=True, num_workers=2 if device.type == "cuda" else 0, lr=1e-3)
    out = {}
    for name, stage, optimizer in (("stage1", 1, "adamw"), ("stage2", 2, "adamw"), ("stage2_muon", 2, "muon")):
        cfg = train.fill_recipe(train.TrainConfig(
            stage=stage, data=str(world[f"stage{stage}"]), out=str(root / name), optimizer=optimizer,
            init=str(root / "stage1") if stage == 2 else "", **common))
        t0 = time.perf_counter()
        losses = train.train(cfg)
        out[name] = {"losses": losses, "seconds": time.perf_counter() - t0,
                     "ok": bool(losses) and all(math.isfinite(x) for x in losses)}
        log(f"  {name}: losses {[round(x, 3) for x in losses]}")
    # each step all-reduces a few CPU tensors; on more than one GPU that needs the group's gloo
    # half (fsdp.process_group_backend), which only this call shows on a single GPU
    flag = torch.ones(1)
    torch.distributed.all_reduce(flag)
    out["cpu_all_reduce_ok"] = float(flag) == 1.0
    return out


def gpu_ceilings(device):
    """The two ceilings measured on this card: a bf16 matrix product and a device-to-device copy."""
    if device.type != "cuda":
        return {}
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t = statistics.median(timed(lambda: a @ b, device) for _ in range(10))
    x = torch.randn(2**30 // 2, device=device, dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    tc = statistics.median(timed(lambda: y.copy_(x), device) for _ in range(10))
    del a, b, x, y
    return {"matmul_tflops": 2 * n**3 / t / 1e12, "copy_tb_s": 2 * 2**30 / tc / 1e12}


def run_gpu(args):
    device = torch.device(args.device or "cuda")
    dtype = DTYPES[args.dtype or "bf16"]
    t_start = time.perf_counter()
    if args.tiny:  # the same code on tiny shapes, for a CPU (and the test suite)
        tiny = CONFIGS["tiny"]
        small, big = replace(tiny, batch=4, seq=48), replace(tiny, batch=4, seq=48, prompt=24, new_tokens=12)
    else:
        small, big = CONFIGS["1b"], CONFIGS["7b"]
    args.warmup, args.repeats = (1, 2) if args.tiny else (args.warmup or 2, max(args.repeats, 3))
    header = (f"nanollava bench gpu | {device_name(device)} | torch {torch.__version__} | dtype {str(dtype)[6:]} | "
              f"FSDP ours, world 1 | {'tiny shapes' if args.tiny else 'stage 2: ~1B LLaVA; stage 1 + decode: 7B-shaped LLM'}")
    log(header)
    results = {"header": header, "device": device_name(device), "torch": torch.__version__, "dtype": str(dtype)}
    keep = {}

    def part(name, fn):
        log(f"[{time.perf_counter() - t_start:6.1f}s] {name}")
        try:
            results[name] = fn()
        except Exception as e:  # one failure must not lose the other parts' numbers
            traceback.print_exc()
            sys.stdout.flush()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        reset_memory(device)
        if args.out:  # after every part, so that a run cut short keeps what it measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))

    deadline = t_start + args.budget
    part("ceilings", lambda: gpu_ceilings(device))
    part("stage2_train", lambda: gpu_stage2(small, device, dtype, args))
    with tempfile.TemporaryDirectory(prefix="nanollava-smoke-") as tmp:
        part("smoke", lambda: gpu_smoke(device, dtype, tmp))

    def big_model():
        if "big" not in keep:
            log(f"  building the {big.text['hidden_size']}x{big.text['num_hidden_layers']} model on {device} in {dtype}")
            keep["big"] = build_on_device(big.config(), device, dtype)
        return keep["big"]

    part("stage1_train", lambda: gpu_stage1(big_model(), big, device, dtype, args))
    part("decode", lambda: gpu_decode(big_model(), big, device, dtype, args, deadline))
    keep.clear()
    results["seconds"] = time.perf_counter() - t_start
    log("\n" + header)
    log(gpu_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
        log(f"wrote {args.out}")
    return results


def gpu_table(res):
    lines = ["| part | setting | tokens/s | MFU | peak memory | note |", "| --- | --- | ---: | ---: | ---: | --- |"]
    c = res.get("ceilings") or {}
    if "matmul_tflops" in c:
        lines.append(f"| ceilings | bf16 8192^3 matmul, 1 GiB copy | | | | {c['matmul_tflops']:.0f} TFLOP/s, "
                     f"{c['copy_tb_s']:.2f} TB/s (read + write) |")
    for part, label in (("stage2_train", "stage 2"), ("stage1_train", "stage 1")):
        r = res.get(part, {})
        if "error" in r:
            lines.append(f"| {label} | | | | | error: {r['error'][:120]} |")
        for x in r.values():
            if not isinstance(x, dict) or "tokens_per_s" not in x:
                continue
            mfu = f"{x['mfu']:.1%}" if x["mfu"] is not None else "n/a"
            mem = f"{x['peak_mem_gb']:.1f} GiB" if x["peak_mem_gb"] is not None else "n/a"
            accum = f", {x['micro_steps']} micro-batches a step" if x.get("micro_steps", 1) > 1 else ""
            ckpt = "on" if x["grad_ckpt"] else "off"
            accum += "" if x.get("reshard_after_forward", True) else ", params kept for backward"
            lines.append(f"| {label} | batch {x['batch']} x {x['seq']}{accum}, grad ckpt {ckpt} | {x['tokens_per_s']:.0f} | "
                         f"{mfu} | {mem} | {x['step_tflop']:.1f} TFLOP/step, {x['achieved_tflops']:.0f} TFLOP/s |")
    d = res.get("decode", {})
    if "error" in d:
        lines.append(f"| decode | | | | | error: {d['error'][:120]} |")
    elif d:
        bound = d.get("bound_tokens_per_s")
        if "compiled_error" in d:
            lines.append(f"| decode compiled | | | | | error: {d['compiled_error'][:120]} |")
        for mode in ("eager", "compiled"):
            v = d.get(f"{mode}_tokens_per_s")
            if v is None:
                continue
            note = (f"{v / bound:.0%} of the {bound:.0f} tokens/s bound ({d['weight_gb']:.1f} GB weights + "
                    f"{d['kv_gb']:.2f} GB KV at {d['hbm_tb_s']:.2f} TB/s)" if bound else "no bandwidth bound known")
            if mode == "compiled" and not d.get("compiled"):
                note += "; static step, not compiled (CPU)"
            if mode == "compiled" and d.get("first_call_s") is not None:
                note += f"; first call {d['first_call_s']:.0f} s (compile + capture)"
            lines.append(f"| decode {mode} | batch 1, prompt {d['prompt']}, {d['new_tokens']} new | {v:.1f} | | | {note} |")
    s = res.get("smoke", {})
    if "error" in s:
        lines.append(f"| smoke train.train() | | | | | error: {s['error'][:120]} |")
    if "cpu_all_reduce_ok" in s:
        lines.append(f"| smoke all_reduce of a CPU tensor | the step's bookkeeping | | | | "
                     f"{'ok' if s['cpu_all_reduce_ok'] else 'FAILED'} |")
    for name, setting in (("stage1", "stage 1"), ("stage2", "stage 2"), ("stage2_muon", "stage 2, Muon")):
        x = s.get(name)
        if x:
            lines.append(f"| smoke train.train() | {setting}, 3 steps, grad ckpt | | | | "
                         f"{'ok' if x['ok'] else 'FAILED'}: losses {[round(v, 3) for v in x['losses']]} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("measurement", choices=MEASUREMENTS + ["all", "gpu"])
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    p.add_argument("--device", default="", help="cpu (default) or cuda; gpu: cuda")
    p.add_argument("--dtype", default="", choices=[""] + sorted(DTYPES), help="default fp32 on cpu, bf16 on cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both sides (default: torch's)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: this process's CPU time (use with --threads 1 on a machine others share)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tiny", action="store_true", help="gpu: tiny shapes (runs on a CPU)")
    p.add_argument("--profile", action="store_true", help="gpu: print a torch.profiler table of a stage-2 step")
    p.add_argument("--budget", type=float, default=420, help="gpu: seconds after which optional repeats are skipped")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.measurement == "gpu":
        return run_gpu(args)
    names = MEASUREMENTS if args.measurement == "all" else [args.measurement]
    return run_measurements(args, names)


if __name__ == "__main__":
    main()
