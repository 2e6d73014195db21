"""One-off GPU check for llama.py (not a pytest file): ours vs transformers on CUDA."""
import sys, time, tempfile, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch, transformers
from transformers import LlamaForCausalLM
from llama import Llama, KVCache
transformers.logging.set_verbosity_error()
dev = "cuda" if torch.cuda.is_available() else "cpu"
print(torch.__version__, transformers.__version__, dev)
res = {}

def build(kv, seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                   num_attention_heads=16, num_key_value_heads=kv, max_position_embeddings=4096,
                                   rms_norm_eps=1e-5, initializer_range=0.05, eos_token_id=None, pad_token_id=None)
    d = Path(tempfile.mkdtemp())
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d, max_shard_size="100MB")
    return d

def sync(): torch.cuda.synchronize() if dev == "cuda" else None

for kv in (16, 4):
    d = build(kv, kv)
    x = torch.randint(3, 32000, (4, 700), device=dev)
    for dt in (torch.float32, torch.bfloat16):
        ref = LlamaForCausalLM.from_pretrained(d, dtype=dt, attn_implementation="sdpa").to(dev).eval()
        ours = Llama.from_pretrained(d, dtype=dt, device=dev).eval()
        with torch.no_grad():
            a, b = ref(x).logits.float(), ours(x).float()
            res[f"kv{kv} {dt} maxabs"] = (a - b).abs().max().item()
            res[f"kv{kv} {dt} scale"] = a.abs().max().item()
            # cache: prefill 600 then 100 single steps, vs full forward
            cache = KVCache(ours.config, 4, 800, dt, dev)
            steps = [ours(x[:, :600], cache=cache)] + [ours(x[:, t:t+1], cache=cache) for t in range(600, 700)]
            res[f"kv{kv} {dt} cache-vs-full"] = (torch.cat(steps, 1).float() - b).abs().max().item()
            # left-padded batch with mask vs single runs
            lens = [700, 500, 300, 100]
            batch = torch.zeros_like(x); mask = torch.zeros_like(x, dtype=torch.bool)
            for i, n in enumerate(lens):
                batch[i, 700 - n:] = x[i, :n]; mask[i, 700 - n:] = True
            cache = KVCache(ours.config, 4, 720, dt, dev)
            pb = ours(batch, cache=cache, attn_mask=mask).float()
            err = 0.0
            for i, n in enumerate(lens):
                single = ours(x[i:i+1, :n]).float()[0]
                err = max(err, (pb[i, 700 - n:] - single).abs().max().item())
            res[f"kv{kv} {dt} leftpad-vs-single"] = err
            if dt == torch.bfloat16:
                p = x[:1, :64]
                e = ref.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=32, do_sample=False)[0, 64:].tolist()
                cache = KVCache(ours.config, 1, 128, dt, dev); lg = ours(p, cache=cache); out = []
                for _ in range(32):
                    n = lg[:, -1].argmax(-1, keepdim=True); out.append(n.item()); lg = ours(n, cache=cache)
                res[f"kv{kv} greedy32 equal"] = out == e
                res[f"kv{kv} greedy32 first-diff"] = next((i for i, (u, v) in enumerate(zip(out, e)) if u != v), None)
                # timings: prefill B=4 T=700, decode 64 tokens B=1
                for name, fn in (("ours", lambda: ours(x)), ("hf", lambda: ref(x).logits)):
                    fn(); sync(); t = time.perf_counter()
                    for _ in range(5): fn()
                    sync(); res[f"kv{kv} prefill4x700 ms {name}"] = (time.perf_counter() - t) / 5 * 1e3
                cache = KVCache(ours.config, 1, 800, dt, dev); ours(p, cache=cache); tok = p[:, -1:]
                sync(); t = time.perf_counter()
                for _ in range(64): tok = ours(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
                sync(); res[f"kv{kv} decode ms/token ours"] = (time.perf_counter() - t) / 64 * 1e3
                sync(); t = time.perf_counter()
                ref.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=64, min_new_tokens=64, do_sample=False)
                sync(); res[f"kv{kv} decode ms/token hf generate"] = (time.perf_counter() - t) / 64 * 1e3
        del ref, ours
        torch.cuda.empty_cache() if dev == "cuda" else None
for k, v in res.items():
    print(f"{k}: {v}")
