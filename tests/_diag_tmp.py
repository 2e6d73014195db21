import sys, time; sys.path.insert(0, "tests")
import torch, bench_generate as b
hf, ours = b.make_models("7b", "cuda", torch.bfloat16); del hf
ids, pv = b.prompt(ours)
import torch._inductor.config as ic; ic.coordinate_descent_tuning = True
ours.compile_decode()
t0 = time.perf_counter(); b.time_ours(ours, ids, pv, 64, "cuda"); print("compile run", time.perf_counter() - t0, flush=True)
for _ in range(2): print("compiled tok/s", b.time_ours(ours, ids, pv, 128, "cuda")[1], flush=True)
