"""bench.py runs end to end: every CPU measurement once on the tiny config (a smoke test, not a
timing), and the prepared GPU run with tiny shapes on the CPU. Each runs as its own process, as a
user runs it (bench.py sets threads and starts a process group)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("skimage")

ROOT = Path(__file__).resolve().parents[1]


def run(args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"bench.py {' '.join(args)} failed ({p.returncode}):\n"
                             f"{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p.stdout


def test_every_cpu_measurement_once(tmp_path):
    out = tmp_path / "tiny.json"
    stdout = run(["all", "--config", "tiny", "--threads", "1", "--warmup", "0", "--repeats", "1",
                  "--out", str(out)])
    res = json.loads(out.read_text())
    header = res["header"]
    for word in ("config tiny", "dtype float32", "device cpu", f"torch {res['torch']}", "1 threads"):
        assert word in header, header
    rows = {r["measurement"]: r for name in ("preprocess", "vision", "train", "prefill", "decode") for r in res[name]}
    sets = ("preprocess rgb", "preprocess pad")  # the last against LlavaImageProcessor
    cores = os.cpu_count() or 1  # clip.preprocess_batch with a thread per core, same pictures, same reference
    expected = {*sets, *(f"{s}, {cores} threads" for s in sets), "vision", "train", "prefill", "decode b1",
                "decode b8"}
    assert set(rows) == expected
    for name, r in rows.items():
        assert r["ours"] > 0 and r["transformers"] > 0, name
        assert r["ratio"] == pytest.approx(r["ours"] / r["transformers"]), name
        assert r["batch"] > 0 and r["seq"] > 0, name
    assert rows["decode b8"]["batch"] == 8 and rows["decode b1"]["batch"] == 1
    # the summary table's rows (printed again at the end) carry the two measured numbers and their ratio
    table = stdout[stdout.rindex("| measurement |"):]
    printed = re.findall(r"^\| ([^|]+) \| \d+ \| \d+ \| [^|]+ \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|", table, re.M)
    assert {name for name, *_ in printed} == set(rows) and len(printed) == len(rows)
    for _, ours, theirs, ratio in printed:
        assert float(ratio) == pytest.approx(float(ours) / float(theirs), abs=0.01)
    # same weights on both sides: the same first training loss, the same greedy tokens
    first = re.search(r"first loss ([\d.]+) vs ([\d.]+)", rows["train"]["note"])
    assert float(first[1]) == pytest.approx(float(first[2]), abs=1e-3)
    assert "100% of them identical" in rows["decode b1"]["note"]


def test_gpu_run_with_tiny_shapes_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    stdout = run(["gpu", "--device", "cpu", "--tiny", "--profile", "--warmup", "1", "--repeats", "2",
                  "--out", str(out)])
    res = json.loads(out.read_text())
    for part in ("stage2_train", "stage1_train", "decode", "decode_compiled", "smoke", "lora_7b", "lora_budget_7b"):
        assert part in res and "error" not in res[part], (part, res.get(part))
    for part in ("stage2_train", "stage1_train"):
        for ckpt in ("ckpt_off", "ckpt_on"):
            r = res[part][ckpt]
            assert r["tokens_per_s"] > 0 and r["step_tflop"] > 0 and r["finite"], (part, ckpt, r)
            assert r["grad_ckpt"] == (ckpt == "ckpt_on")
    accum = res["stage2_train"]["accum8_ckpt_off"]  # LLaVA-1.5's 8 x 16 on one GPU (here 8 x 4)
    assert accum["micro_steps"] == 8 and accum["finite"] and accum["tokens_per_s"] > 0
    assert accum["step_tflop"] == pytest.approx(8 * res["stage2_train"]["ckpt_off"]["step_tflop"])
    profile = res["stage2_train"]["ckpt_off"]["profile"]
    assert "aten::mm" in profile and "torch.profiler, 2 steps" in stdout
    assert "profile" not in res["stage2_train"]["ckpt_on"]
    assert res["decode"]["tokens_per_s"] > 0 and res["decode_compiled"]["tokens_per_s"] > 0
    for name in ("stage1", "stage2", "stage2_muon"):
        assert res["smoke"][name]["ok"], res["smoke"]
    assert res["smoke"]["stage2_muon"]["losses"] != res["smoke"]["stage2"]["losses"]  # Muon did step
    assert res["smoke"]["cpu_all_reduce_ok"]
    assert "| part | setting |" in stdout  # the summary table
    for mb, r in res["lora_7b"].items():  # stage 2 as LoRA: the step runs, and micro-batches of 1, 2, 4 rows
        assert r["finite"] and r["tokens_per_s"] > 0 and r["grad_ckpt"] and r["batch"] == int(mb), (mb, r)
    assert "| stage 2, LoRA r 8 | ckpt_on: 1 x 4 x 48 tokens |" in stdout
    check_lora_budget(res["lora_budget_7b"], stdout)


def check_lora_budget(rows, stdout):
    """The 7B LoRA budget's arithmetic by hand: r 128 on the 7 projections of 32 blocks (Vicuna-7B: d 4096,
    MLP 11008, 32 heads = kv heads, vocabulary 32064), the frozen rest counted by transformers on the meta device."""
    import transformers
    D, F, L, V, r = 4096, 11008, 32, 32064, 128
    factors = L * r * (4 * (D + D) + 2 * (D + F) + (F + D))  # q k v o: [D, D]; gate, up: [F, D]; down: [D, F]
    projector = 1024 * D + D + D * D + D  # CLIP-L's 1024 -> 4096 -> 4096, with biases
    vision = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14)
    text = transformers.LlamaConfig(hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=32,
                                    vocab_size=V, max_position_embeddings=4096)
    with torch.device("meta"):
        hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(vision_config=vision, text_config=text))
    assert rows["1"]["factors"] == factors and rows["1"]["projector"] == projector
    assert rows["1"]["frozen"] + projector == sum(p.numel() for p in hf.parameters())
    for mb, row in rows.items():
        T = int(mb) * 2048
        acts = L * T * D * 2 + T * (2 * D + 2 * D + 3 * F) * 2 * 2 + T * V * 4 * 2
        assert row["weights"] == pytest.approx(2 * row["frozen"] / 1e9) and row["activations"] == pytest.approx(acts / 1e9)
        assert row["total"] == pytest.approx(2 * row["frozen"] / 1e9 + 16 * (factors + projector) / 1e9 + acts / 1e9)
        assert f"| LoRA r 128 budget | micro-batch {mb} x 2048, --grad-ckpt |  |  | {row['total']:.1f} GB |" in stdout
    assert rows["1"]["total"] < 24  # the goal: micro-batch 1 fits a 24 GB card, on paper


def test_serve_against_one_at_a_time(tmp_path):
    """bench.py serve: python serve.py twice (--max-batch 8, 1), the same requests streamed by 3 clients;
    the greedy replies of the two servers are the same, and the printed ratio is the two times'."""
    out = tmp_path / "serve.json"
    stdout = run(["serve", "--config", "tiny", "--threads", "1", "--clients", "3", "--requests", "2", "--out", str(out)])
    res = json.loads(out.read_text())["serve"]
    assert res["requests"] == 6 and res["same"] and "greedy replies identical in both runs" in stdout
    seconds = res["seconds"]
    assert res["speedup"] == pytest.approx(seconds["1"] / seconds["8"])
    rows = re.findall(r"^\| max-batch (\d) \| 3 x 2 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) / ([\d.]+) \|", stdout, re.M)
    assert {r[0] for r in rows} == {"8", "1"}
    for batch, rps, tps, median, p95 in rows:
        assert float(rps) == pytest.approx(6 / seconds[batch], rel=0.01) and float(tps) > 0
        assert 0 < float(median) <= float(p95)
