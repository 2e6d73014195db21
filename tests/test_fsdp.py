"""fsdp.py: the hand-written ZeRO-3 with 2 gloo ranks on the CPU, against one process and
against PyTorch's FSDP2; each rank's 1/W share; the process group's backends and threads."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import data
import fsdp
import train
from helpers import ROOT, assert_same_run, base_args, make_world, run
from llama import Tokenizer
from model import LLaVA, supervised_positions, token_loss


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.mark.parametrize("stage", [1, 2])
def test_two_ranks_equal_one_process_and_fsdp2(world, tmp_path, stage):
    ref = tmp_path / "one"
    run(base_args(world, ref, stage=stage))                                       # 1 process, accum 2
    ours = tmp_path / "ours"
    run(base_args(world, ours, stage=stage, **{"micro-batch": 2, "grad-ckpt": "true"}), nproc=2)  # accum 2
    assert_same_run(ref, ours, stage)
    fsdp2 = tmp_path / "fsdp2"  # accum 1; in stage 2 stopped after step 2 and resumed (its DTensors' shards)
    run(base_args(world, fsdp2, stage=stage, fsdp="torch", **{"stop-at": 2 if stage == 2 else 0}), nproc=2)
    if stage == 2:
        run(base_args(world, fsdp2, stage=stage, fsdp="torch", resume="auto"), nproc=2)
    assert_same_run(ref, fsdp2, stage)


def _shard_sizes(rank, world_size, port, tmp, clip_dir, llm_dir, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    cfg = train.fill_recipe(train.TrainConfig(stage=2, clip=clip_dir, llm=llm_dir, projector="mlp2x_gelu",
                                              image_size=32, pad_to_square=False))
    device, r, w = fsdp.init_distributed(cfg)
    model = LLaVA.from_components(clip_dir, llm_dir, projector="mlp2x_gelu", pad_to_square=False)
    n_trainable = sum(p.numel() for p in list(model.projector.parameters()) + list(model.llm.parameters()))
    params, _, units = fsdp.shard_model(model, cfg, device, torch.float32)
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    held = sum(p.numel() for p in params)
    state = sum(t.numel() for s in opt.state.values() for k, t in s.items() if k != "step")
    q.put((r, n_trainable, held, state, len(units)))
    torch.distributed.destroy_process_group()


def test_each_rank_holds_one_half_of_params_and_optimizer_state(world):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_shard_sizes, args=(r, 2, port, None, str(world["clip"]), str(world["llm"]), q))
             for r in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    for r, n, held, state, n_units in results:
        assert n_units == 1 + 1 + 4 + 1  # projector, embeddings, 4 blocks, norm + head
        assert n / 2 <= held <= n / 2 + n_units  # 1/world, plus at most one pad per unit
        assert state == 2 * held                 # AdamW's two moments, for the shard only


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_destroying_the_process_group_stops_its_threads_after_a_model_is_built(world):
    """Building a model (nn.init imports torch._dynamo on first use) after init_process_group
    once kept the group alive past destroy_process_group: gloo's threads outlived the
    interpreter and a finished rank could die at exit ("terminate called without an active
    exception"). In a fresh process, as a rank runs it: no gloo thread is left."""
    script = f"""
import json, os, torch.distributed as dist, fsdp, train
from model import LLaVA
fsdp.init_distributed(train.TrainConfig(stage=2))
LLaVA.from_components({str(world["clip"])!r}, {str(world["llm"])!r}, projector="mlp2x_gelu", pad_to_square=False)
dist.destroy_process_group()
print(json.dumps([open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")]))
"""
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    names = json.loads(p.stdout.strip().splitlines()[-1])
    assert not [n for n in names if "gloo" in n], names


def test_bf16_micro_batch_gradients_add_into_fp32_exactly(world):
    """One rank in bf16 (where a gather is a cast of the fp32 shard): a second micro-batch's
    bf16 gradient adds into the fp32 one exactly as an fp32 sum of the two, with and without
    --grad-ckpt, and every gathered buffer is freed when backward ends."""
    base = train.fill_recipe(train.TrainConfig(stage=2, clip=str(world["clip"]), llm=str(world["llm"]),
                                               projector="mlp2x_gelu", image_size=32, pad_to_square=False))
    device, _, _ = fsdp.init_distributed(base)
    try:
        tok = Tokenizer(world["llm"])
        ds = data.LazySupervisedDataset(world["stage2"], world["image_folder"], tok, template="vicuna_v1",
                                        image_size=32, num_patches=16, pad_to_square=False, max_length=256)
        collate = data.Collator(pad_id=0)
        micro = [collate([ds[j]]) for j in (0, 1)]  # bf16 matmuls are slow on CPUs without bf16 units
        for mb in micro:
            mb["positions"], mb["targets"] = supervised_positions(mb["labels"])

        def grads(cfg, batches):
            torch.manual_seed(0)  # the same fresh projector every time
            model = LLaVA.from_components(world["clip"], world["llm"], projector="mlp2x_gelu", pad_to_square=False)
            params, _, sharded = fsdp.shard_model(model, cfg, device, torch.bfloat16)
            for mb in batches:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits, _ = model(mb["input_ids"], mb["pixel_values"], logits_at=mb["positions"])
                with sharded[0].schedule.backward():
                    token_loss(logits, mb["targets"]).backward()
            assert all(u.full_for_backward is None and u._prefetched is None for u in sharded)  # all freed
            return [p.grad for p in params]

        for ckpt in (False, True):
            cfg = replace(base, grad_ckpt=ckpt)
            first, second, both = grads(cfg, micro[:1]), grads(cfg, micro[1:]), grads(cfg, micro)
            assert all(g.dtype == torch.float32 for g in both)
            assert all(torch.equal(ab, a + b) for ab, a, b in zip(both, first, second))
    finally:
        torch.distributed.destroy_process_group()


def test_process_group_on_gpus_carries_cpu_tensors_too():
    # a step all-reduces its token count, loss sum and stop flag as CPU tensors; NCCL alone would
    # refuse them on more than one GPU, so on CUDA the group maps CPU tensors to gloo
    from torch.distributed.distributed_c10d import BackendConfig  # how init_process_group reads it
    spec = fsdp.process_group_backend(torch.device("cuda", 0))
    assert BackendConfig(spec).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
    assert fsdp.process_group_backend(torch.device("cpu")) == "gloo"


def test_grad_clip_scales_alike_in_both_engines_and_zero_only_measures():
    fsdp.init_distributed(train.TrainConfig(stage=2))
    try:
        for max_norm, want in ((3.0, 1.5), (0.0, 3.0)):  # norm 6: halved by max_norm 3, kept by 0
            for engine in ("ours", "torch"):  # clip_grad_norm_(max_norm=0) alone would zero the grads
                p = torch.nn.Parameter(torch.zeros(4))
                p.grad = torch.full((4,), 3.0)
                assert fsdp.clip_grad_norm([p], max_norm, engine) == 6.0
                assert torch.allclose(p.grad, torch.full((4,), want)), (engine, max_norm, p.grad)
    finally:
        torch.distributed.destroy_process_group()
