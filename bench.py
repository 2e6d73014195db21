"""How fast nanollava is, against Hugging Face transformers doing the same work, measured in one run.

    python bench.py preprocess|vision|train|prefill|decode|all [--config tiny|20m|1b|7b] [--threads N]
    python bench.py gpu [--profile] [--out summary.json]   # train.py's step and decoding on one H100 / H200

Both sides load one random LLaVA and get the same inputs, threads, dtype and device; their outputs are
compared before timing. Each repeat times ours, then theirs, so other work on the machine slows both
alike; a row gives the ratio of the medians, ours / theirs (> 1: we are faster). On a shared machine use
--threads 1: OpenMP threads beyond the free cores wait on each other at every barrier.
"""

import argparse
import base64
import contextlib
import functools
import gc
import io
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import fsdp
import llama
import lora
import tiny
import train
import weights
from clip import CLIPVisionConfig, preprocess, preprocess_batch
from llama import KVCache, LlamaConfig
from model import LLaVA, LLaVAConfig, supervised_positions, token_loss

# Each model with its workload: `batch` x `seq` tokens a training step, `prompt` tokens in, `new_tokens` out
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14)
LLAMA = dict(vocab_size=32064, rms_norm_eps=1e-5, max_position_embeddings=4096)
CONFIGS = {
    # the tiny preset's towers (tiny.py), its 512 pieces + <image>, <pad> rounded up to 576
    "tiny": dict(vision=tiny.TINY_CLIP, text=dict(tiny.TINY_LLM, vocab_size=576), batch=4, seq=48, prompt=24,
                 new_tokens=12),
    # 62M parameters: small blocks, but the real vocabulary (its embedding and head are half of it)
    "20m": dict(vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                            image_size=64, patch_size=8), batch=8, seq=256, prompt=96, new_tokens=64,
                text=dict(LLAMA, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8)),
    # the gpu run's two models; 16 is LLaVA-1.5's stage-2 batch per GPU
    "1b": dict(vision=CLIP_L_336, text=dict(LLAMA, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
                                            num_attention_heads=32), batch=16, seq=1024, prompt=608, new_tokens=128),
    "7b": dict(vision=CLIP_L_336, text=dict(LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                            num_attention_heads=32), batch=8, seq=640, prompt=608, new_tokens=128),
}
TABLE = []  # the summary table's rows: printed as they are measured, and again in one piece at the end


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def race(fns, device, warmup, repeats, min_sample=0.05):
    """{name: median seconds per call} of fns run round-robin, `warmup` rounds (the first sizes the samples)
    then `repeats`; a fast fn runs for `min_sample` s a sample, so that one hiccup is not a sample (0: once)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # CUDA runs asynchronously

    def timed(fn, k=1):
        sync()
        t = time.perf_counter()
        for _ in range(k):
            fn()
        sync()
        return (time.perf_counter() - t) / k

    calls = {name: max(1, min(100, int(min_sample / max(timed(fn), 1e-6)))) for name, fn in fns.items()}
    times, skip = {name: [] for name in fns}, max(warmup - 1, 0)  # the round above was the first warm-up
    for _ in range(skip + max(1, repeats)):
        for name, fn in fns.items():
            times[name].append(timed(fn, calls[name]))
    return {name: statistics.median(ts[skip:]) for name, ts in times.items()}


def decode_rates(generators, batch, n, device, warmup, repeats, min_sample=0.05):
    """{name: tokens/s} of each generators[name](k), which decodes k new tokens for `batch` prompts,
    from the medians of k = n and k = 1: batch (n - 1) / (t(n) - t(1)), so the prefill cancels."""
    t = race({(name, k): functools.partial(fn, k) for name, fn in generators.items() for k in (n, 1)},
             device, warmup, repeats, min_sample)
    return {name: batch * (n - 1) / max(t[name, n] - t[name, 1], 1e-9) for name in generators}


def table_row(*cells):
    TABLE.append("| " + " | ".join(map(str, cells)) + " |")
    print(TABLE[-1])


def run(args, device, dtype, about, columns, parts):
    """Each of {name: fn} in turn, the JSON written to --out after every part (so that a run cut short
    keeps what it measured), the table again at the end; exit 1 naming the parts that failed."""
    header = (f"nanollava bench {args.measurement} | {about} | torch {torch.__version__} | device "
              f"{device_name(device)} | {torch.get_num_threads()} threads | dtype {str(dtype)[6:]}")
    print(header)
    TABLE.clear()  # this run's rows only
    res, t0 = {"header": header, "device": device_name(device), "torch": torch.__version__}, time.time()
    for name, fn in parts.items():
        print(f"[{time.time() - t0:6.1f}s] {name}")
        try:
            res[name] = fn()
        except Exception as e:  # one failure must not lose the rest
            traceback.print_exc()
            res[name] = {"error": f"{type(e).__name__}: {e}"}
            table_row(name, "", f"error: {res[name]['error'][:120]}")
        llama.compile_elementwise(False)  # each part starts eager (training may have compiled it)
        gc.collect()  # the part's models (FSDP's hooks make cycles)
        if args.out:
            weights.write_json_atomic(args.out, res, indent=1)
    print("\n".join(["", header, *columns, *TABLE]))
    if failed := [name for name in parts if "error" in res[name]]:  # a row list holds no "error"
        raise SystemExit(f"bench.py {args.measurement}: {', '.join(failed)} failed (the tracebacks above say why)")
    return res


# ---- The models, their inputs and their training steps -----------------------------------------
@torch.no_grad()
def build(shapes, device, dtype):
    """A CONFIGS entry's random LLaVA built on meta, then given storage on `device` (a 7B model never sees
    the CPU): N(0, 0.02) weights, unit norms, zero biases; <image>, <pad> just above the vocabulary."""
    V = shapes["text"]["vocab_size"]
    with torch.device("meta"):
        model = LLaVA(LLaVAConfig(vision=CLIPVisionConfig(**shapes["vision"]), text=LlamaConfig(**shapes["text"]),
                                  image_token_id=V - 64, pad_token_id=V - 63))
    model = model.to(dtype).to_empty(device=device)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if p.dim() == 1 and name.endswith(("weight", "bias")):  # the norms' scales and every bias
            p.fill_(float(name.endswith("weight")))
        else:
            p.normal_(0.0, 0.02)
    return model


class Pair:
    """One random LLaVA in a temporary llava-hf directory; load(): ours and transformers', fresh, eval mode."""

    def __init__(self, shapes):
        self.shapes, self.tmp = shapes, tempfile.TemporaryDirectory()
        build(shapes, torch.device("cpu"), torch.float32).save_pretrained(self.tmp.name)

    def load(self, dtype, device):
        import transformers
        theirs = transformers.LlavaForConditionalGeneration.from_pretrained(
            self.tmp.name, dtype=dtype, attn_implementation="sdpa")
        return LLaVA.from_pretrained(self.tmp.name, dtype=dtype, device=device).eval(), theirs.to(device).eval()


def make_batch(config, batch, seq, device, dtype=torch.float32):
    """[BOS, 3 text ids, the image's P ids, text...] of `seq` tokens per row, labels on the text
    after the image (as stage 2 supervises the reply only), random pixels in `dtype`."""
    g = torch.Generator().manual_seed(0)
    P = config.num_patches  # CONFIGS leave room for the image and a few supervised tokens
    ids = torch.randint(3, config.image_token_id, (batch, seq), generator=g)
    ids[:, 0] = 1
    ids[:, 4:4 + P] = config.image_token_id
    labels = ids.masked_fill(torch.arange(seq) < 4 + P + 2, -100)
    px = torch.randn(batch, 3, config.vision.image_size, config.vision.image_size, generator=g)
    return ids.to(device), labels.to(device), px.to(device, dtype)


def optimizer_step(loss_and_count, params, optimizer, clip, device, dtype, backward=contextlib.nullcontext):
    """step(ids, labels, px, micro_steps=k): k forward + backward passes under autocast (train.py's
    accumulation: each pass's summed loss over all k passes' token count), clipping, the optimizer."""
    def step(ids, labels, px, micro_steps=1):
        for _ in range(micro_steps):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss, n = loss_and_count(ids, labels, px)
            with backward():
                (loss / (n * micro_steps)).backward()
        clip()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach() / n

    return step


def ours_train_step(model, stage, device, dtype, grad_ckpt=False):
    """Our model set up as train.train() sets it up (fsdp.shard_model: frozen parts in the compute
    dtype, trained units as fp32 shards of our FSDP at world size 1), and its optimizer step."""
    cfg = train.TrainConfig(stage=stage, device=str(device), fsdp="ours", grad_ckpt=grad_ckpt, lr=2e-5,
                            weight_decay=0.0, adam_beta2=0.999)
    fsdp.init_distributed(cfg)
    model.train()
    params, _, sharded = fsdp.shard_model(model, cfg, device, dtype)
    optimizer = train.make_optimizer(params, sharded, model, cfg)
    llama.compile_elementwise(train.wants_compiled_elementwise(cfg, device))  # as train() decides: on with CUDA

    def loss_and_count(ids, labels, px):
        # train.py's collator finds the supervised positions on the CPU, in the loader
        at, targets = (t.to(device) for t in supervised_positions(labels.cpu()))
        return token_loss(model(ids, px, logits_at=at)[0], targets), max(len(targets), 1)

    clip = functools.partial(fsdp.clip_grad_norm, params, cfg.grad_clip, cfg.fsdp)
    # each backward pass in FSDP's schedule: its backward-order prefetch and gradient hand-off
    return optimizer_step(loss_and_count, params, optimizer, clip, device, dtype, sharded[0].schedule.backward)


# ---- The measurements against transformers (each returns rows) ---------------------------------
# scikit-image's bundled colour photos (tests/test_clip.py checks the other modes bit for bit)
RGB_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
              "retina", "cat", "colorwheel")


def row(measurement, batch, seq, unit, ours, theirs, note=""):
    table_row(measurement, batch, seq, unit, f"{ours:.1f}", f"{theirs:.1f}", f"{ours / theirs:.2f}x", note)
    return dict(measurement=measurement, batch=batch, seq=seq, unit=unit, ours=ours, transformers=theirs,
                ratio=ours / theirs, note=note)


def bench_preprocess(args, pair, device, dtype, size=336):
    """clip.preprocess picture by picture (as the data loader calls it), preprocess_batch with a thread a
    core, vs transformers' on the whole list (its fastest use), bit for bit: the photos as is and padded."""
    import skimage.data
    import transformers
    from PIL import Image
    sizes = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    clip = transformers.CLIPImageProcessor(**sizes)
    llava = getattr(transformers, "LlavaImageProcessorPil", transformers.LlavaImageProcessor)(do_pad=True, **sizes)
    rows, cores = [], os.cpu_count() or 1
    images = [Image.fromarray(getattr(skimage.data, n)()) for n in RGB_PHOTOS]
    for label, pad, hf in (("preprocess rgb", False, clip), ("preprocess pad", True, llava)):
        fns = {"ours": lambda: torch.stack([preprocess(img, size, pad_to_square=pad) for img in images]),
               "threads": lambda: preprocess_batch(images, size, pad_to_square=pad, threads=cores),
               "theirs": lambda: hf(images, return_tensors="pt")["pixel_values"]}
        if not (torch.equal(fns["ours"](), fns["theirs"]()) and torch.equal(fns["threads"](), fns["theirs"]())):
            raise AssertionError(f"clip.preprocess differs from {type(hf).__name__}")
        # at least 5 warm-up rounds: the first ones page in the heap that the pictures then reuse
        t = race(fns, torch.device("cpu"), max(args.warmup, 5), args.repeats)
        n, name = len(images), type(hf).__name__ + ("(do_pad=True)" if pad else "")
        rows.append(row(label, n, size, "images/s", n / t["ours"], n / t["theirs"],
                        f"{name}, {n} pictures, identical output, one thread each"))
        rows.append(row(f"{label}, {cores} threads", n, size, "images/s", n / t["threads"], n / t["theirs"],
                        f"clip.preprocess_batch (Pillow releases the GIL) vs the same {name} call"))
    return rows


@torch.inference_mode()
def same_work(label, batch, seq, unit, work, fns, args, device):
    """A row of `work` units per call of fns["ours"] and fns["theirs"], and the max |diff| of their outputs."""
    err = float((fns["ours"]().float() - fns["theirs"]().float()).abs().max())
    t = race(fns, device, args.warmup, args.repeats)
    return [row(label, batch, seq, unit, work / t["ours"], work / t["theirs"], f"max |diff| {err:.1e}")]


def bench_vision(args, pair, device, dtype):
    """The whole CLIP tower (every block, last hidden state) on `batch` images."""
    ours, theirs = pair.load(dtype, device)
    B = pair.shapes["batch"]
    px = make_batch(ours.config, B, pair.shapes["seq"], device, dtype=dtype)[2]
    return same_work("vision", B, ours.config.vision.num_patches + 1, "images/s", B, {
        "ours": lambda: ours.vision_tower(px, layer=-1),
        "theirs": lambda: theirs.model.vision_tower(pixel_values=px).last_hidden_state}, args, device)


def bench_prefill(args, pair, device, dtype):
    """A prompt with its image into a fresh KV cache, next-token logits only (generation's start)."""
    ours, theirs = pair.load(dtype, device)
    T = pair.shapes["seq"]
    ids, _, px = make_batch(ours.config, 1, T, device, dtype=dtype)
    return same_work("prefill", 1, T, "tokens/s", T, {
        "ours": lambda: ours.llm(inputs_embeds=ours.embed(ids, px), last_only=True,
                                 cache=KVCache(ours.config.text, 1, T, dtype, device))[:, -1],
        "theirs": lambda: theirs(input_ids=ids, pixel_values=px, use_cache=True, logits_to_keep=1).logits[:, -1]},
        args, device)


def bench_train(args, pair, device, dtype):
    """Ours as train.py steps; transformers' model the same way: CLIP frozen in the compute dtype,
    projector + LLM in fp32 under autocast, its own loss, clipping, AdamW."""
    B, T = pair.shapes["batch"], pair.shapes["seq"]
    model, hf = pair.load(torch.float32, device)
    batch = make_batch(model.config, B, T, device)
    ours = ours_train_step(model, 2, device, dtype)
    hf.train().model.vision_tower.requires_grad_(False).to(dtype)
    params = [p for p in hf.parameters() if p.requires_grad]
    theirs = optimizer_step(lambda ids, labels, px: (hf(input_ids=ids, pixel_values=px, labels=labels).loss, 1),
                            params, torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0),
                            functools.partial(torch.nn.utils.clip_grad_norm_, params, 1.0), device, dtype)
    first = float(ours(*batch)), float(theirs(*batch))  # same weights: the same first loss
    t = race({"ours": lambda: ours(*batch), "theirs": lambda: theirs(*batch)}, device, args.warmup, args.repeats)
    return [row("train", B, T, "tokens/s", B * T / t["ours"], B * T / t["theirs"],
                f"first loss {first[0]:.5f} vs {first[1]:.5f}")]


def bench_decode(args, pair, device, dtype):
    ours, theirs = pair.load(dtype, device)
    N, T = pair.shapes["new_tokens"], pair.shapes["prompt"]
    rows = []
    for B in (1, 8):
        ids, _, px = make_batch(ours.config, B, T, device, dtype=dtype)
        fns = {"ours": lambda n: torch.stack(list(ours.generate(ids, px, max_new_tokens=n, eos_id=None)), 1),
               "theirs": lambda n: theirs.generate(  # min_new_tokens: EOS off, as ours
                   input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                   min_new_tokens=n, do_sample=False, pad_token_id=ours.config.pad_token_id, eos_token_id=2)[:, T:]}
        mine, hers = fns["ours"](N).cpu(), fns["theirs"](N).cpu()
        if mine.shape != hers.shape:
            raise AssertionError(f"decode made {tuple(mine.shape)} tokens, transformers {tuple(hers.shape)}")
        rates = decode_rates(fns, B, N, device, args.warmup, args.repeats)
        rows.append(row(f"decode b{B}", B, T, "tokens/s", rates["ours"], rates["theirs"],
                        f"{N} new tokens, {float((mine == hers).float().mean()):.0%} of them identical"))
    return rows


MEASUREMENTS = {"preprocess": bench_preprocess, "vision": bench_vision, "train": bench_train,
                "prefill": bench_prefill, "decode": bench_decode}


def run_measurements(args):
    names = list(MEASUREMENTS) if args.measurement == "all" else [args.measurement]
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    device = torch.device(args.device or "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pair = Pair(CONFIGS[args.config]) if names != ["preprocess"] else None
    parts = {name: functools.partial(MEASUREMENTS[name], args, pair, device, dtype) for name in names}
    return run(args, device, dtype, f"vs transformers {transformers.__version__} | config {args.config}",
               ["| measurement | batch | seq | unit | ours | transformers | ours / transformers | note |",
                "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |"], parts)


# ---- bench.py serve: serve.py's continuous batching against the same requests one at a time -----------
def stream_chat(url, body):
    """One streamed request -> (seconds to its first text, its text, its completion tokens)."""
    import requests
    t0, first, text, used = time.perf_counter(), None, "", 0
    with requests.post(url, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                       stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in (x for x in r.iter_lines() if x.startswith(b"data: {")):
            chunk = json.loads(line[6:])
            used = chunk["usage"]["completion_tokens"] if chunk.get("usage") else used
            piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            first = time.perf_counter() - t0 if piece and first is None else first
            text += piece or ""
    return first, text, used


def bench_serve(args):
    """python serve.py on 127.0.0.1 with a random model, --max-batch 8 and then 1; --clients threads here send
    --requests each (text, or text and a picture), greedy: requests/s, tokens/s and time to first token."""
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image
    shapes, tmp = CONFIGS[args.config], tempfile.TemporaryDirectory()
    d = Path(tmp.name)
    prompts = sorted(Path(__file__).with_name("prompts").rglob("*.txt"))
    text = [line for p in prompts for line in p.open() if line.strip()]
    tiny.train_tokenizer(text, d / "tokenizer.model", min(2000, shapes["text"]["vocab_size"] - 64))  # English pieces
    model, n = build(shapes, torch.device("cpu"), torch.float32), llama.Tokenizer(d).sp.vocab_size()
    model.config.image_token_id, model.config.pad_token_id = n, n + 1  # the tokenizer's <image> and <pad>
    model.llm.lm_head.weight.data[n:] = 0.0  # greedy picks the tokenizer's pieces: replies are text to time
    model.save_pretrained(d)
    size, rng = model.config.vision.image_size, random.Random(0)
    pictures = [Image.fromarray(torch.randint(0, 256, (size, size, 3), dtype=torch.uint8).numpy()) for _ in range(4)]
    words = lambda k: " ".join(rng.choice(tiny.SHAPES + tiny.QUADRANTS) for _ in range(4 + k % 7))  # noqa: E731
    image = lambda k: [{"type": "image_url", "image_url": {"url": serve_uri(pictures[k % 4])}}] * (k % 2)  # noqa: E731
    bodies = [{"messages": [{"role": "user", "content": [{"type": "text", "text": words(k)}] + image(k)}],
               "max_tokens": shapes["new_tokens"], "temperature": 0} for k in range(args.clients * args.requests)]
    runs = {}
    for batch in (8, 1):
        command = [sys.executable, str(Path(__file__).with_name("serve.py")), "--model", str(d), "--port", "0",
                   "--max-batch", str(batch), "--max-queue", str(len(bodies))]
        proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        try:
            while "serving" not in (line := proc.stderr.readline()):
                if not line:
                    raise RuntimeError("serve.py exited before serving")
            url = line.split(" at ")[1].strip() + "/chat/completions"
            stream_chat(url, bodies[1])  # warm-up
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:  # client c sends bodies c, c + clients, ... in turn
                done = pool.map(lambda c: [stream_chat(url, b) for b in bodies[c::args.clients]], range(args.clients))
                runs[batch] = [r for rs in done for r in rs]
            runs[batch] = (time.perf_counter() - t0, runs[batch])
        finally:
            proc.terminate(), proc.wait()
    same = [a[1] for a in runs[8][1]] == [b[1] for b in runs[1][1]]
    for batch, (t, rs) in runs.items():
        ttft = sorted(r[0] for r in rs if r[0] is not None) or [float("nan")]
        p95 = ttft[int(0.95 * (len(ttft) - 1))]
        table_row(f"max-batch {batch}", f"{args.clients} x {args.requests}", f"{len(rs) / t:.2f}",
                  f"{sum(r[2] for r in rs) / t:.1f}", f"{statistics.median(ttft):.3f} / {p95:.3f}",
                  f"{runs[1][0] / t:.2f}x", "greedy replies identical in both runs" if same else "REPLIES DIFFER")
    seconds = {b: t for b, (t, _) in runs.items()}
    return {"requests": len(bodies), "seconds": seconds, "speedup": seconds[1] / seconds[8], "same": same}


def serve_uri(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ---- bench.py gpu: train.py's step and generation on one H100 / H200 (random weights) ------------
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # decode reads each weight and the KV cache once a token
# setting: (gradient checkpointing, micro-batches per optimizer step); 8 x 16 is LLaVA-1.5's
# stage-2 global batch of 128 on one GPU (stage 2 runs all three, stage 1 the first two)
GPU_RUNS = {"ckpt_off": (False, 1), "ckpt_on": (True, 1), "accum8_ckpt_off": (False, 8)}


def gpu_train(shapes, stage, setting, device, dtype, args, lora_r=0, batch=None):
    """tokens/s, MFU and peak memory of train.py's optimizer step on a fresh random model (with lora_r:
    stage 2 as LoRA, lora.py's factors on every linear layer of the LLM; batch: (rows, tokens) of a micro-batch)."""
    grad_ckpt, micro_steps = GPU_RUNS[setting]
    gc.collect()  # the last setting's model gone (FSDP's hooks make cycles), then a fresh peak
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build(shapes, device, dtype)
    counts = train.flop_params(model)  # before shard_model moves the params out of the modules
    if lora_r:
        lora.add_lora(model.llm, lora_r, 2 * lora_r)
    step = ours_train_step(model, stage, device, dtype, grad_ckpt)
    (B, T), stage = batch or (shapes["batch"], shapes["seq"]), 1 if lora_r else stage  # LoRA: FLOPs of a frozen LLM
    batch = make_batch(model.config, B, T, device)
    losses = []  # one step per call (min_sample=0), so runs of the same steps log the same losses
    dt = race({"step": lambda: losses.append(float(step(*batch, micro_steps)))}, device,
              args.warmup, args.repeats, min_sample=0)["step"]
    supervised = len(supervised_positions(batch[1].cpu())[0])
    flops = train.step_flops(model.config, counts, stage, B * T, supervised, B, T) * micro_steps
    peak = train.device_peak_flops(device)  # None where unknown (a CPU)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    out = {"grad_ckpt": grad_ckpt, "micro_steps": micro_steps, "batch": B, "seq": T, "step_s": dt,
           "tokens_per_s": B * T * micro_steps / dt, "step_tflop": flops / 1e12, "peak_mem_gb": mem,
           "mfu": flops / dt / peak if peak else None, "losses": losses, "finite": all(map(math.isfinite, losses))}
    name = f"stage 2, LoRA r {lora_r}" if lora_r else f"stage {stage}"
    table_row(name, f"{setting}: {micro_steps} x {B} x {T} tokens", f"{out['tokens_per_s']:.0f}",
              f"{out['mfu']:.1%}" if peak else "n/a", f"{mem:.1f} GiB" if mem is not None else "n/a",
              f"{flops / 1e12:.1f} TFLOP/step, {flops / dt / 1e12:.0f} TFLOP/s, losses {[round(v, 3) for v in losses]}")
    if args.profile and stage == 2 and setting == "ckpt_off" and not lora_r:  # two more steps under torch.profiler
        with torch.profiler.profile() as prof:  # the CPU, and CUDA where there is one (synced at exit)
            for _ in range(2):
                step(*batch)
        out["profile"] = "torch.profiler, 2 steps:\n" + prof.key_averages().table(
            sort_by=f"self_{device.type}_time_total", row_limit=15, max_name_column_width=50)
        print(out["profile"])
    return out


def gpu_decode(shapes, device, dtype, args, compiled=False):
    """Batch-1 greedy decode as chat.py runs it, against the memory-bandwidth bound; compiled: with
    compile_decode()'s CUDA graphs, captured in the warm-up (on a CPU uncompiled: inductor's C++ takes minutes)."""
    model = build(shapes, device, dtype).eval()
    if compiled:
        model.compile_decode(compile=device.type == "cuda")
    ids, _, px = make_batch(model.config, 1, shapes["prompt"], device, dtype=dtype)
    ids, N, c = ids[0], shapes["new_tokens"], model.config.text
    generate = {"ours": lambda n: list(model.generate(ids, px, max_new_tokens=n, eos_id=None))}
    v = decode_rates(generate, 1, N, device, args.warmup, args.repeats, min_sample=0)["ours"]
    weight_bytes = sum(p.nbytes for name, p in model.llm.named_parameters() if not name.startswith("embed_tokens"))
    # the KV cache at its mean length during the decode
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * (len(ids) + N / 2) * dtype.itemsize
    bw = next((b for gpu, b in HBM_BYTES_PER_S.items() if gpu in device_name(device)), None)
    bound = bw / (weight_bytes + kv_bytes) if bw else None
    note = f"{v / bound:.0%} of the {bound:.0f} tokens/s bound at {bw / 1e12:.2f} TB/s" if bw else "no bound known"
    table_row("decode " + ("compiled" if compiled else "eager"), f"batch 1, prompt {len(ids)}, {N} new",
              f"{v:.1f}", "", "", note)
    return {"tokens_per_s": v, "prompt": len(ids), "new_tokens": N, "bound_tokens_per_s": bound}


def gpu_smoke(device, workdir):
    """train.train() itself, both stages, 3 steps on a tiny synthetic world with --grad-ckpt;
    stage 2 once more with --optimizer muon (Newton-Schulz in the compute dtype on this device)."""
    out, root = {}, Path(workdir)
    world = tiny.make_synthetic(root / "data", n_train=32, n_test=4, seed=0, image_size=64, vocab_size=400)
    clip_dir, llm_dir = tiny.make_tiny_bases(root, world["tokenizer"], seed=0)
    common = dict(clip=str(clip_dir), llm=str(llm_dir), image_folder=str(world["image_folder"]),
                  projector="mlp2x_gelu", image_size=tiny.TINY_CLIP["image_size"], pad_to_square=False,
                  global_batch=8, micro_batch=4, max_steps=3, warmup_ratio=0.0, max_length=256, device=str(device),
                  dtype="bf16", grad_ckpt=True, num_workers=2 if device.type == "cuda" else 0, lr=1e-3)
    for name, stage, optimizer in (("stage1", 1, "adamw"), ("stage2", 2, "adamw"), ("stage2_muon", 2, "muon")):
        losses = train.train(train.fill_recipe(train.TrainConfig(
            stage=stage, data=str(world[f"stage{stage}"]), out=str(root / name), optimizer=optimizer,
            init=str(root / "stage1") if stage == 2 else "", **common)))
        out[name] = {"losses": losses, "ok": bool(losses) and all(map(math.isfinite, losses))}
        table_row("smoke train.train()", f"{name}, 3 steps, grad ckpt", "", "", "",
                  f"{'ok' if out[name]['ok'] else 'FAILED'}: losses {[round(x, 3) for x in losses]}")
    # each step all-reduces a few CPU tensors; on several GPUs that needs the group's gloo half
    # (fsdp.process_group_backend), which only this call exercises on a single GPU
    flag = torch.ones(1)
    torch.distributed.all_reduce(flag)
    out["cpu_all_reduce_ok"] = float(flag) == 1.0
    table_row("smoke all_reduce of a CPU tensor", "", "", "", "", "ok" if out["cpu_all_reduce_ok"] else "FAILED")
    return out


def lora_budget(shapes, r=128, seq=2048, micro_batches=(1, 2, 4)):
    """GB of a LoRA stage-2 step with --grad-ckpt, on paper, counted on the model built on the meta device: the
    frozen weights in bf16 (2 bytes each); the factors and the projector trained (fp32 weight, gradient, AdamW's
    two moments: 16 bytes); activations: each block's bf16 input kept for the recompute, one block recomputed
    (its 7 projections' outputs and their gradients, bf16) and the LM head's fp32 logits and their gradient
    with every token supervised. No allocator slack or CUDA context: plan a GB or two above it."""
    with torch.device("meta"):
        model = LLaVA(LLaVAConfig(vision=CLIPVisionConfig(**shapes["vision"]), text=LlamaConfig(**shapes["text"])))
    factors, projector = lora.add_lora(model.llm, r, 2 * r), sum(p.numel() for p in model.projector.parameters())
    c, rows = model.config.text, {}
    frozen = sum(p.numel() for p in model.parameters()) - factors - projector
    for mb in micro_batches:
        T, kv = mb * seq, c.num_key_value_heads * c.head_dim
        acts = (c.num_hidden_layers * T * c.hidden_size * 2 + T * (2 * c.hidden_size + 2 * kv + 3 * c.intermediate_size)
                * 2 * 2 + T * c.vocab_size * 4 * 2)
        gb = {"weights": 2 * frozen / 1e9, "trained": 16 * (factors + projector) / 1e9, "activations": acts / 1e9}
        rows[mb] = {**gb, "total": sum(gb.values()), "factors": factors, "projector": projector, "frozen": frozen}
        parts = ", ".join(f"{k} {v:.2f} GB" for k, v in gb.items())
        table_row(f"LoRA r {r} budget", f"micro-batch {mb} x {seq}, --grad-ckpt", "", "", f"{rows[mb]['total']:.1f} GB",
                  f"on paper: {parts} ({factors / 1e6:.0f}M factors)")
    return rows


def run_gpu(args):
    device = torch.device(args.device or "cuda")
    dtype = torch.bfloat16  # also with --tiny on a CPU: the tests then run the GPU's precision
    small, big = (CONFIGS["tiny"],) * 2 if args.tiny else (CONFIGS["1b"], CONFIGS["7b"])  # --tiny: for a CPU
    about = f"FSDP ours, world 1 | {'tiny config' if args.tiny else 'stage 2: a ~1B LLaVA; stage 1, decode: 7B'}"
    columns = ["| part | setting | tokens/s | MFU | peak memory | note |", "| --- | --- | ---: | ---: | ---: | --- |"]
    with tempfile.TemporaryDirectory(prefix="nanollava-smoke-") as tmp:
        return run(args, device, dtype, about, columns, {
            "stage2_train": lambda: {s: gpu_train(small, 2, s, device, dtype, args) for s in GPU_RUNS},
            "smoke": lambda: gpu_smoke(device, tmp),
            "stage1_train": lambda: {s: gpu_train(big, 1, s, device, dtype, args) for s in list(GPU_RUNS)[:2]},
            "decode": lambda: gpu_decode(big, device, dtype, args),
            "decode_compiled": lambda: gpu_decode(big, device, dtype, args, compiled=True),
            "lora_7b": lambda: {mb: gpu_train(big, 2, "ckpt_on", device, dtype, args, lora_r=8 if args.tiny else 128,
                                              batch=(mb, big["seq"] if args.tiny else 2048)) for mb in (1, 2, 4)},
            "lora_budget_7b": lambda: lora_budget(CONFIGS["7b"])})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("measurement", choices=[*MEASUREMENTS, "all", "gpu", "serve"])
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    p.add_argument("--device", default="", help="default: cpu; gpu: cuda")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both sides")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--tiny", action="store_true", help="gpu: tiny shapes (runs on a CPU)")
    p.add_argument("--profile", action="store_true", help="gpu: a torch.profiler table of a stage-2 step")
    p.add_argument("--clients", type=int, default=8, help="serve: concurrent clients")
    p.add_argument("--requests", type=int, default=4, help="serve: requests per client")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # each line as it is measured, also into a pipe or a file
    torch.set_num_threads(args.threads)
    if args.measurement == "serve":
        return run(args, torch.device("cpu"), torch.float32, f"serve.py on 127.0.0.1 | config {args.config}",
                   ["| server | clients x requests | requests/s | tokens/s | first token s (median / p95) | "
                    "speedup | note |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"],
                   {"serve": lambda: bench_serve(args)})
    return run_gpu(args) if args.measurement == "gpu" else run_measurements(args)


if __name__ == "__main__":
    main()
