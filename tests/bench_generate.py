"""Generation speed: LLaVA.generate against transformers' LlavaForConditionalGeneration.generate
on the same random weights, batch 1, greedy (to move into bench.py).

    python tests/bench_generate.py              # CPU: the ~20M config and the test-sized one
    python tests/bench_generate.py --7b         # CUDA: a 7B-shaped LLaVA-1.5 in bf16, eager and compiled

Reported: time to first token (image encoding + prefill + first token), our prefill alone, decode
tokens/s over the following tokens; for CUDA also the memory-bandwidth bound (bytes of LLM
weights read per token / HBM bandwidth).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import transformers  # noqa: E402
from transformers import LlavaForConditionalGeneration  # noqa: E402

from model import LLaVA  # noqa: E402

transformers.logging.set_verbosity_error()

CONFIGS = {
    # hidden 512, 8 layers, vocab 32064: ~20M in the blocks (+33M embedding and head), tiny CLIP
    "20M": (dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=32064, max_position_embeddings=2048),
            dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 image_size=112, patch_size=14)),
    "test": (dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=576, max_position_embeddings=1024),
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=56, patch_size=14)),
    # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 patches) + Vicuna-7B
    "7b": (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
           dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14)),
}


def hf_config(name):
    text, vision = CONFIGS[name]
    text = transformers.LlamaConfig(**text, initializer_range=0.02, bos_token_id=1, eos_token_id=None,
                                    pad_token_id=None)
    vision = transformers.CLIPVisionConfig(**vision)
    image_id = min(32000, text.vocab_size - 2)
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                    pad_token_id=image_id + 1, projector_hidden_act="gelu",
                                    vision_feature_layer=-2, vision_feature_select_strategy="default",
                                    image_seq_length=(vision.image_size // vision.patch_size) ** 2)


def make_models(name, device, dtype):
    """transformers' model with random weights, and ours holding the very same tensors (split
    and renamed by model.py's checkpoint table, no copy: a 7B pair fits one GPU)."""
    from clip import CLIPVision, vision_state_from_checkpoint
    from llama import Llama, llm_state_from_checkpoint
    from model import LLaVAConfig, split_checkpoint
    from weights import assign_weights
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: no fp32 copy of a 7B model
    try:
        with torch.device(device):
            hf = LlavaForConditionalGeneration(hf_config(name)).eval()
    finally:
        torch.set_default_dtype(default)
    config = LLaVAConfig.from_hf(hf.config.to_dict())
    parts = split_checkpoint(hf.state_dict(), "transformers")
    with torch.device("meta"):
        ours = LLaVA(config)
    ours.vision_tower = CLIPVision.from_state_dict(config.vision, vision_state_from_checkpoint(parts["vision"]),
                                                   "vision", dtype, device)
    assign_weights(ours.projector, parts["projector"], "projector", dtype, device)
    ours.llm = Llama.from_state_dict(config.text, llm_state_from_checkpoint(parts["llm"]), "llm", dtype, device)
    return hf, ours.eval()


def prompt(model, text_len=40, seed=0):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, min(c.image_token_id, 30000), (text_len,), generator=g)
    ids = torch.cat([torch.tensor([1]), torch.full((c.num_patches,), c.image_token_id), text])
    pv = torch.randn(1, 3, c.vision.image_size, c.vision.image_size, generator=g)
    return ids, pv


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ours(model, ids, pv, n, device):
    """-> (time to first token, decode tokens/s over the other n-1 tokens, tokens)."""
    sync(device)
    t0 = time.perf_counter()
    out, t_first = [], None
    for t in model.generate(ids.to(device), pv.to(device), max_new_tokens=n, eos_id=None):
        out.append(t)  # an int: the step's host sync is included, as in chat
        if t_first is None:
            t_first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return t_first, (n - 1) / (total - t_first), out


def time_hf(hf, ids, pv, n, device):
    x = ids[None].to(device)
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=pv.to(device, hf.dtype),
              do_sample=False, eos_token_id=None, pad_token_id=0)
    times = []
    for k in (1, n):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(**kw, max_new_tokens=k, min_new_tokens=k)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times[0], (n - 1) / (times[1] - times[0]), out[0, x.shape[1]:].tolist()


def time_prefill(model, ids, pv, device, reps=3):
    """(image encoding, LLM prefill of the whole prompt) in seconds, ours."""
    from llama import KVCache
    best = [float("inf")] * 2
    with torch.inference_mode():
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            emb = model.embed(ids[None].to(device), pv.to(device))
            sync(device)
            t1 = time.perf_counter()
            cache = KVCache(model.config.text, 1, ids.numel() + 8, emb.dtype, device)
            model.llm(inputs_embeds=emb, cache=cache, last_only=True)
            sync(device)
            t2 = time.perf_counter()
            best = [min(best[0], t1 - t0), min(best[1], t2 - t1)]
    return best


def bench(name, device="cpu", dtype=torch.float32, n=64, reps=3, compile_too=False, hf_too=True):
    hf, ours = make_models(name, device, dtype)
    ids, pv = prompt(ours)
    n_llm = sum(p.numel() for p in ours.llm.parameters())
    n_blocks = sum(p.numel() for p in ours.llm.layers.parameters())
    print(f"\n== {name}: LLM {n_llm / 1e6:.1f}M params ({n_blocks / 1e6:.1f}M in blocks), vision "
          f"{sum(p.numel() for p in ours.vision_tower.parameters()) / 1e6:.1f}M; prompt {ids.numel()} tokens "
          f"({ours.config.num_patches} image); {n} new tokens; {device} {dtype}; "
          f"threads {torch.get_num_threads()}", flush=True)
    enc, pre = time_prefill(ours, ids, pv, device)
    print(f"ours prefill: image encoding {enc * 1e3:.1f} ms, LLM prefill {pre * 1e3:.1f} ms", flush=True)
    results = {}
    runs = [("ours", lambda: time_ours(ours, ids, pv, n, device))]
    if hf_too:
        runs.append(("transformers", lambda: time_hf(hf, ids, pv, n, device)))
    for _ in range(reps):  # interleaved, best of reps: the machine may be shared
        for label, fn in runs:
            ttft, tps, toks = fn()
            best = results.get(label)
            results[label] = (min(ttft, best[0]) if best else ttft, max(tps, best[1]) if best else tps, toks)
    if hf_too:
        a, b = results["ours"][2], results["transformers"][2]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        print(f"greedy tokens identical to transformers for the first {same} of {len(a)}", flush=True)
    for label, (ttft, tps, _) in results.items():
        print(f"{label:>14}: time to first token {ttft * 1e3:7.1f} ms   decode {tps:7.1f} tokens/s", flush=True)
    if hf_too:
        print(f"{'ratio':>14}: decode ours/transformers {results['ours'][1] / results['transformers'][1]:.2f}x, "
              f"TTFT {results['transformers'][0] / results['ours'][0]:.2f}x faster", flush=True)
    if compile_too:
        ours.compile_decode()
        t0 = time.perf_counter()
        time_ours(ours, ids, pv, n, device)
        print(f"compiled: first run (compiling) {time.perf_counter() - t0:.1f} s", flush=True)
        best = max(time_ours(ours, ids, pv, n, device)[1] for _ in range(reps))
        print(f"{'ours compiled':>14}: decode {best:7.1f} tokens/s", flush=True)
        results["compiled"] = (None, best, None)
    if torch.device(device).type == "cuda":
        bw = {"H100": 3.35e12, "H200": 4.8e12}
        gpu = torch.cuda.get_device_name()
        peak = next((v for k, v in bw.items() if k in gpu), None)
        bytes_per_token = n_llm * torch.finfo(dtype).bits // 8  # KV cache reads are small at this length
        if peak:
            print(f"{gpu}: {bytes_per_token / 1e9:.2f} GB of weights per token / {peak / 1e12:.2f} TB/s = "
                  f"{peak / bytes_per_token:.0f} tokens/s bound", flush=True)
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--7b", dest="big", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--n", type=int, default=64)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.big:
        bench("7b", "cuda", torch.bfloat16, n=args.n, reps=2, compile_too=True)
    else:
        bench("test", n=args.n)
        bench("20M", n=args.n)
