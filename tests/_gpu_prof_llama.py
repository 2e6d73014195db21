import sys, time, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch, transformers
from transformers import LlamaForCausalLM
from torch.profiler import profile, ProfilerActivity
from llama import Llama, KVCache
transformers.logging.set_verbosity_error()
dev = "cuda"
x = torch.ones(10000, device=dev); torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(2000): x.add_(1)
torch.cuda.synchronize(); print("launch us", (time.perf_counter() - t) / 2000 * 1e6)
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
      num_attention_heads=16, num_key_value_heads=16, eos_token_id=None, pad_token_id=None)
d = Path(tempfile.mkdtemp()); LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
ours = Llama.from_pretrained(d, dtype=torch.bfloat16, device=dev)
ref = LlamaForCausalLM.from_pretrained(d, dtype=torch.bfloat16).to(dev).eval()
p = torch.randint(3, 32000, (1, 64), device=dev)
def ours_decode(n):
    cache = KVCache(ours.config, 1, 800, torch.bfloat16, dev); tok = ours(p, cache=cache)[:, -1].argmax(-1, keepdim=True)
    for _ in range(n): tok = ours(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
    return tok
with torch.no_grad():
    for n in (64,):
        for name, fn in (("ours", lambda: ours_decode(n)),
                         ("hf", lambda: ref.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n + 1, min_new_tokens=n + 1, do_sample=False))):
            fn(); torch.cuda.synchronize(); t = time.perf_counter(); fn(); torch.cuda.synchronize()
            print(name, "ms/token", (time.perf_counter() - t) / n * 1e3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ours_decode(8); torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    t = time.perf_counter(); ours_decode(64); print("no-sync cpu time ms/token", (time.perf_counter() - t) / 64 * 1e3)
