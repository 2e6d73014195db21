"""train.py as a user runs it, in a subprocess: freezing, the loss against transformers, Muon,
resume on another rank count, signals to the process group, bad data, the command line."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import fsdp
import train
from llama import Tokenizer
from model import LLaVA

from helpers import ROOT, TRAIN, assert_same_run, base_args, losses, make_world, run, start_and_signal


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


# ---- one process: freezing and the loss ------------------------------------------------------

def test_stage1_changes_only_the_projector_and_stage2_never_the_vision_tower(world, tmp_path):
    run(base_args(world, tmp_path / "s1", stage=1, **{"max-steps": 2}))
    before = LLaVA.from_components(world["clip"], world["llm"], projector="mlp2x_gelu", pad_to_square=False)
    after = LLaVA.from_pretrained(tmp_path / "s1")
    for name, p in before.state_dict().items():
        same = torch.equal(p, after.state_dict()[name])
        assert same != name.startswith("projector."), name
    run(base_args(world, tmp_path / "s2", stage=2, init=tmp_path / "s1", **{"max-steps": 2}))
    s2 = LLaVA.from_pretrained(tmp_path / "s2")
    for name, p in after.state_dict().items():
        same = torch.equal(p, s2.state_dict()[name])
        assert same == name.startswith("vision_tower."), name


def test_loss_at_step_0_equals_transformers(world, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = LLaVA.from_components(world["clip"], world["llm"], projector="mlp2x_gelu", pad_to_square=False).eval()
    model.save_pretrained(tmp_path / "m")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    ds = data.LazySupervisedDataset(world["stage2"], world["image_folder"], Tokenizer(tmp_path / "m"),
                                    "vicuna_v1", 32, model.config.num_patches, False, 256)
    batch = data.Collator(model.config.pad_token_id)([ds[i] for i in range(4)])
    with torch.no_grad():
        _, loss = model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"])
        ref = hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
    assert abs(float(loss) - float(ref)) < 1e-5
    # the training loop's first logged loss is this same number for the same global batch
    run(base_args(world, tmp_path / "t", **{"max-steps": 1, "global-batch": 4, "micro-batch": 2, "lr": 0}))
    cfg = train.TrainConfig(global_batch=4, micro_batch=2)
    idx = train.MicroBatches(len(ds), cfg, 0, 1, 0, 1).global_batch(0)
    batch = data.Collator(model.config.pad_token_id)([ds[i] for i in idx])
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
    assert math.isclose(losses(tmp_path / "t")[0], float(ref), rel_tol=1e-5)


def test_step_flops_count_llava_15_7b_by_hand():
    """flop_params on LLaVA-1.5-7B's shapes (built on the meta device) against counts by hand,
    and step_flops for one stage-2 sequence written out."""
    from clip import CLIPVisionConfig
    from llama import LlamaConfig
    from model import LLaVAConfig
    cfg = LLaVAConfig(vision=CLIPVisionConfig(image_size=336), text=LlamaConfig(rms_norm_eps=1e-5))
    with torch.device("meta"):
        model = LLaVA(cfg)
    D, I, d, F, V = 1024, 4096, 4096, 11008, 32000
    clip_block = 4 * (D * D + D) + (D * I + I) + (I * D + D) + 2 * 2 * D     # q k v o, fc1, fc2, 2 LayerNorms
    counts = train.flop_params(model)
    assert counts["vision"] == 3 * 14 * 14 * D + 23 * clip_block == 290_315_264  # layer -2: 23 of 24 blocks
    assert counts["projector"] == (D * d + d) + (d * d + d)
    assert counts["llm"] == 32 * (4 * d * d + 3 * d * F + 2 * d) + d          # no embedding, no head
    assert counts["llm"] + 2 * V * d == 6_738_415_616                      # Vicuna-7B's 6.74B
    assert counts["lm_head"] == V * d
    # one stage-2 sequence: 1024 tokens, 576 of them image patches, 300 supervised
    flops = train.step_flops(cfg, counts, 2, 1024, 300, 1, 1024)
    want = (2 * 290_315_264 * 577 + 6 * counts["projector"] * 576 + 6 * counts["llm"] * 1024
            + 6 * V * d * 300 + 12 * 32 * d * 1024 * 1024 / 2)
    assert flops == want
    assert train.step_flops(cfg, counts, 1, 1024, 300, 1, 1024) == want - 2 * (counts["llm"] * 1024 + V * d * 300)


def test_lr_schedule_is_warmup_then_cosine():
    lrs = [train.lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == 0 and lrs[5] == 0.5 and lrs[10] == 1.0
    assert math.isclose(lrs[55], 0.5, abs_tol=1e-12) and lrs[99] < 1e-3
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_recipes_fill_the_papers_defaults():
    c1 = train.parse_args(["--stage", "1"])
    assert (c1.projector, c1.image_size, c1.lr, c1.global_batch, c1.epochs, c1.template) == \
        ("linear", 224, 2e-3, 128, 1, "plain")
    c2 = train.parse_args(["--stage", "2", "--recipe", "v1.5", "--lr", "1e-4"])
    assert (c2.projector, c2.image_size, c2.pad_to_square, c2.lr, c2.global_batch, c2.epochs) == \
        ("mlp2x_gelu", 336, True, 1e-4, 128, 1)
    assert train.parse_args(["--stage", "1", "--template", "vicuna_v1"]).template == "vicuna_v1"  # as asked


def test_fused_adamw_on_our_shards_matches_the_per_tensor_loop(world):
    """train() steps the fp32 master shards with the fused AdamW (CPU and CUDA): the shards are
    what that kernel accepts, and its steps (projector lr scale and weight decay included) match
    torch's per-tensor AdamW loop on the same groups."""
    cfg = train.fill_recipe(train.TrainConfig(stage=2, clip=str(world["clip"]), llm=str(world["llm"]),
                                              projector="mlp2x_gelu", image_size=32, pad_to_square=False,
                                              lr=1e-3, projector_lr=1e-2, weight_decay=0.1, adam_beta2=0.95))
    device, _, _ = fsdp.init_distributed(cfg)
    try:
        runs = []
        for fused in (False, True):
            model = LLaVA.from_components(world["clip"], world["llm"], projector="mlp2x_gelu", pad_to_square=False)
            params, full_state, sharded = fsdp.shard_model(model, cfg, device, torch.float32)
            opt = train.make_optimizer(params, sharded, model, cfg)
            if not fused:
                groups = [{"params": g["params"], "lr_scale": g["lr_scale"]} for g in opt.param_groups]
                opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1,
                                        foreach=False, fused=False)
            assert opt.defaults["fused"] is fused
            gen = torch.Generator().manual_seed(0)
            for _ in range(3):
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * g["lr_scale"]
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
            runs.append(full_state())
    finally:
        torch.distributed.destroy_process_group()
    loop, fused = runs
    start = LLaVA.from_components(world["clip"], world["llm"], projector="mlp2x_gelu", pad_to_square=False).state_dict()
    assert loop.keys() == fused.keys() == start.keys()
    for k in loop:
        torch.testing.assert_close(fused[k], loop[k], rtol=0, atol=1e-6, msg=k)
    moved = [k for k in loop if not torch.equal(loop[k], start[k].float())]
    assert any("projector" in k for k in moved) and any("layers" in k for k in moved)


def test_muon_on_our_shards_matches_torch_muon_and_adamw(world):
    """--optimizer muon: the blocks' matrices step as torch.optim.Muon (lr matched to AdamW's
    RMS, weight decay included) and every other tensor (norms in the same shards, embeddings,
    head, projector at its own lr) as torch.optim.AdamW, here on plain per-tensor parameters."""
    cfg = train.fill_recipe(train.TrainConfig(stage=2, clip=str(world["clip"]), llm=str(world["llm"]),
                                              projector="mlp2x_gelu", image_size=32, pad_to_square=False,
                                              lr=1e-3, projector_lr=1e-2, weight_decay=0.1, adam_beta2=0.95,
                                              optimizer="muon"))
    device, _, _ = fsdp.init_distributed(cfg)
    build = lambda: LLaVA.from_components(world["clip"], world["llm"], projector="mlp2x_gelu", pad_to_square=False)
    try:
        model = build()
        params, full_state, sharded = fsdp.shard_model(model, cfg, device, torch.float32)
        opt = train.make_optimizer(params, sharded, model, cfg)
        # bf16 where the CPU multiplies bf16 natively (else emulated, far slower); here bf16 throughout,
        # as torch.optim.Muon always takes it
        assert opt.ns_dtype == (torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32)
        opt.ns_dtype = torch.bfloat16
        gen = torch.Generator().manual_seed(0)
        grads = []  # per step: {qualified name: gradient}, for the reference below
        for _ in range(3):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * g["lr_scale"]
            step_grads = {}
            for u in sharded:
                u.shard.grad = torch.randn(u.shard.shape, generator=gen)
                for _, _, offset, shape, name in u.slots:
                    step_grads[name] = u.shard.grad[offset:offset + shape.numel()].view(shape).clone()
            grads.append(step_grads)
            opt.step()
        ours = full_state()
    finally:
        torch.distributed.destroy_process_group()

    ref = build()
    named = dict(ref.named_parameters())
    trained = [n for n in named if n.startswith(("projector.", "llm."))]
    matrices = [n for n in trained if ".layers." in n and named[n].ndim == 2]
    projector = [n for n in trained if n.startswith("projector.")]
    rest = [n for n in trained if n not in matrices and n not in projector]
    assert len(matrices) == 4 * 7 and len(rest) == 4 * 2 + 3
    muon = torch.optim.Muon([named[n] for n in matrices], lr=cfg.lr, weight_decay=0.1, momentum=0.95,
                            nesterov=True, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": [named[n] for n in projector], "lr": 1e-2},
                               {"params": [named[n] for n in rest], "lr": 1e-3}],
                              betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for step_grads in grads:  # shard slots carry the model's own parameter names
        for n in trained:
            named[n].grad = step_grads[n]
        muon.step()
        adamw.step()
    start = build().state_dict()
    reference = ref.state_dict()
    for k in reference:
        torch.testing.assert_close(ours[k], reference[k].float(), rtol=0, atol=2e-6, msg=k)
    assert all(not torch.equal(reference[k], start[k]) for k in trained)


def test_muon_on_two_ranks_and_resumed_matches_one_process(world, tmp_path, four_steps):
    # two ranks cut the blocks' matrices across shards (the update is gathered whole); the
    # momentum is checkpointed and re-cut like AdamW's moments when the rank count changes.
    # (--dtype fp32: Newton-Schulz in fp32 on a GPU too, where bf16 would round a 1e-7 difference
    # in the summed gradient to a 1e-4 one in the weights.)
    full = tmp_path / "full"
    muon = {"max-steps": 4, "optimizer": "muon", "dtype": "fp32"}
    run(base_args(world, full, **muon))
    part = tmp_path / "part"
    run(base_args(world, part, **{**muon, "stop-at": 2, "micro-batch": 2}), nproc=2)
    run(base_args(world, part, **{**muon, "resume": "auto"}))
    assert_same_run(full, part, 2)
    assert losses(four_steps)[0] == losses(full)[0] and losses(four_steps)[-1] != losses(full)[-1]  # AdamW's
    # the optimizer's state does not carry over to the other one: resuming with it is refused
    p = run(base_args(world, part, **{"max-steps": 6, "resume": "auto"}), check=False)
    assert p.returncode == 1 and "belongs to a run with --optimizer 'muon' (now 'adamw')" in p.stderr, p.stderr


# ---- resume ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def four_steps(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("four") / "run"
    run(base_args(world, out, **{"max-steps": 4}))
    return out


def test_resume_continues_to_the_same_losses(world, tmp_path, four_steps):
    # on 1 process and on 2 ranks (the shards re-cut); fused AdamW (on by default with our FSDP)
    # keeps its step count on the parameters' device: a resumed state must too
    part = tmp_path / "part"
    run(base_args(world, part, **{"max-steps": 4, "stop-at": 2}))
    assert (part / "checkpoint-2" / "train_state.json").exists() and not (part / "model.safetensors").exists()
    shutil.copytree(part, tmp_path / "part2")
    argv = base_args(world, part, **{"max-steps": 4, "stop-at": 2}) + ["--resume", "auto"]
    with pytest.raises(SystemExit, match=r"belongs to a run with --lr 0.001 \(now 0.002\), --global-batch 8 \(now 4\)"):
        train.find_resume(train.parse_args(argv + ["--lr", "2e-3", "--global-batch", "4"]))  # another schedule
    safe = ["--save-every", "3", "--keep", "1", "--log-every", "2", "--num-workers", "1", "--micro-batch", "2"]
    assert train.find_resume(train.parse_args(argv + safe)) == part / "checkpoint-2"  # how it writes and computes
    broken = shutil.copytree(part / "checkpoint-2", tmp_path / "broken")  # what --resume says of a bad one
    (broken / "tokenizer.model").unlink()
    assert train.checkpoint_problem(broken) == f"{broken} is incomplete: no tokenizer.model"
    (broken / "train_state.json").write_text('{"step": ')
    assert f"{broken / 'train_state.json'} is not valid JSON" in train.checkpoint_problem(broken)
    shutil.copytree(broken, tmp_path / "all_bad" / "checkpoint-2")  # none readable: no silent fresh start
    with pytest.raises(SystemExit, match="no checkpoint under .* can be read"):
        train.find_resume(train.TrainConfig(out=str(tmp_path / "all_bad"), resume="auto"))
    for out, nproc, micro in ((part, 1, 4), (tmp_path / "part2", 2, 2)):
        run(base_args(world, out, **{"max-steps": 4, "resume": "auto", "micro-batch": micro}), nproc=nproc)
        assert_same_run(four_steps, out, 2)


def test_compile_elementwise_auto_means_cuda_with_triton(monkeypatch):
    import importlib.util
    want = lambda mode, dev: train.wants_compiled_elementwise(train.TrainConfig(compile_elementwise=mode), torch.device(dev))
    assert want("on", "cpu") and not want("off", "cuda") and not want("auto", "cpu")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "triton" else None)
    assert want("auto", "cuda")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # torch.compile has no GPU backend
    assert not want("auto", "cuda") and want("on", "cuda")


def test_interrupted_checkpoint_write_leaves_the_previous_one(world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(base_args(world, out, **{"max-steps": 2, "save-every": 1}))
    ckpt = out / "checkpoint-1"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    # a write that dies half-way: the temp dir is left behind, the old checkpoint untouched
    (out / "checkpoint-1.tmp").mkdir()
    (out / "checkpoint-1.tmp" / "model.safetensors").write_bytes(b"half")
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    cfg = train.parse_args(base_args(world, out, **{"max-steps": 2, "save-every": 1, "resume": "auto"}))
    assert train.find_resume(cfg).name == "checkpoint-2"
    LLaVA.from_pretrained(out / "checkpoint-2")
    # and in process: save_pretrained raising mid-save keeps checkpoint-2 loadable and whole
    cfg2 = train.fill_recipe(train.TrainConfig(stage=2, clip=str(world["clip"]), llm=str(world["llm"]),
                                               projector="mlp2x_gelu", image_size=32, pad_to_square=False))
    device, _, _ = fsdp.init_distributed(cfg2)
    model = LLaVA.from_pretrained(out / "checkpoint-2")
    params, full_state, units = fsdp.shard_model(model, cfg2, device, torch.float32)
    opt = torch.optim.AdamW(params)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(model, "save_pretrained", boom)
    good = {p.name: p.read_bytes() for p in (out / "checkpoint-2").iterdir()}
    with pytest.raises(OSError):
        train.save_checkpoint(out / "checkpoint-2", model, cfg2, full_state, opt, units, 2)
    assert {p.name: p.read_bytes() for p in (out / "checkpoint-2").iterdir()} == good


# ---- failures ----------------------------------------------------------------------------------

def test_nan_loss_stops_with_step_and_sample_ids(world, tmp_path):
    import shutil
    from safetensors.torch import save_file
    bad = tmp_path / "llm"
    shutil.copytree(world["llm"], bad)
    state = load_file(str(bad / "model.safetensors"))
    state["lm_head.weight"][0, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"))
    p = run(base_args(world, tmp_path / "o", llm=bad), check=False)
    assert p.returncode != 0
    assert "step 0: loss is nan" in p.stderr + p.stdout and "train_0000" in p.stderr + p.stdout


def test_a_dead_rank_ends_the_run_in_bounded_time(world, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", TRAIN] + \
        base_args(world, out, **{"max-steps": 1000, "global-batch": 2, "micro-batch": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                         start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "train_log.jsonl").exists()
                                               and (out / "train_log.jsonl").read_text().count("\n") >= 2):
            time.sleep(0.2)
        workers = [int(x) for x in subprocess.run(["pgrep", "-f", "-P", str(p.pid), "train.py"],
                                                   capture_output=True, text=True).stdout.split()]
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.time()
        rc = p.wait(timeout=90)
        assert rc != 0 and time.time() - t0 < 90
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_bad_samples_are_skipped_named_and_counted_while_the_rest_trains(world, tmp_path):
    good = json.loads(Path(world["stage2"]).read_text())[:14]
    img = good[0]["image"]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad = [
        {"id": "missing", "image": "nope.png", "conversations": good[0]["conversations"]},
        {"id": "corrupt", "image": str(tmp_path / "corrupt.png"), "conversations": good[0]["conversations"]},
        {"id": "noreply", "image": img, "conversations": good[0]["conversations"][:1]},
        "not a record",
        {"id": "placeholder", "conversations": good[0]["conversations"]},
        {"id": "noplaceholder", "image": img, "conversations": [
            {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "red"}]},
    ]
    records = good[:6] + bad + good[6:]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    tok = Tokenizer(world["llm"])  # a second path to the count of records cut to --max-length 200
    cut = sum(len(data.tokenize_conversation(r["conversations"], tok, "vicuna_v1", num_patches=16, has_image=True)[0])
              > 200 for r in good)
    assert 0 < cut < 14
    args = base_args(world, tmp_path / "o", data=path, **{"global-batch": 20, "micro-batch": 5, "max-steps": 1,
                                                          "max-length": 200})
    p = run(args + ["--max-bad-share", "0.5"])
    out = p.stdout + p.stderr
    for rid in ("missing", "corrupt", "noreply", "placeholder", "noplaceholder"):
        assert f"id {rid!r}" in out, rid
    assert "skipped 6 of 20 records" in out and f"; {cut} truncated to max_length" in out
    assert losses(tmp_path / "o")[0] > 0
    # by default a run whose bad share passes a few percent stops, with the tally
    p = run(args + ["--overwrite"], check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().endswith(f"error: {path}: 6 of the 20 samples seen are bad, more than --max-bad-share "
                                     f"0.05 (data: skipped 6 of 20 records (corrupt_image 1, image_without_placeholder 1, "
                                     f"missing_image 1, no_reply 1, placeholder_without_image 1, "
                                     f"unreadable_record 1); {cut} truncated to max_length); the first skipped "
                                     "records are printed above"), p.stderr[-1500:]


def test_check_data_names_every_bad_record_and_trains_nothing(world, tmp_path):
    """python train.py --check-data: one record of each bad kind among good ones, each named with its
    reason, exit status 1; token lengths as a second path (tokenize_conversation) counts them; then
    the clean records under --init (a stage-1 output: stage 2 by default), exit 0; nothing written."""
    good = json.loads(Path(world["stage2"]).read_text())[:10]
    img, turns = good[0]["image"], good[0]["conversations"]
    good.append({"id": "text_only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hi."}]})
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    words = " ".join(["shape"] * 300)
    bad = {"missing": ({"image": "nope.png", "conversations": turns}, "missing_image"),
           "corrupt": ({"image": str(tmp_path / "corrupt.png"), "conversations": turns}, "corrupt_image"),
           "noreply": ({"image": img, "conversations": turns[:1]}, "no_reply"),
           "roles": ({"image": img, "conversations": turns[:1] * 2 + turns[1:2]}, "roles_not_alternating"),
           "text": ({"conversations": [{"from": "human", "value": "Hi"}]}, "no_reply"),
           "long_question": ({"image": img, "conversations": [{"from": "human", "value": "<image>\n" + words},
                                                              {"from": "gpt", "value": "red"}]}, "nothing_to_learn")}
    path, clean = tmp_path / "mine.json", tmp_path / "clean.json"
    path.write_text(json.dumps(good[:5] + [{"id": k, **r} for k, (r, _) in bad.items()] + good[5:]))
    clean.write_text(json.dumps(good))
    p = run(base_args(world, tmp_path / "o", data=path, **{"max-length": 200}) + ["--check-data"], check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    for rid, (_, reason) in bad.items():
        assert f"(id {rid!r}): {reason}: " in p.stdout, (rid, p.stdout)
    n = sorted(len(data.tokenize_conversation(r["conversations"], Tokenizer(world["llm"]), "vicuna_v1", num_patches=16,
                                              has_image="image" in r)[0]) for r in good)
    assert f"{path}: 17 records, 11 trainable (10 with an image, 1 text only), 6 bad" in p.stdout
    assert "data: skipped 6 of 17 records (corrupt_image 1, missing_image 1, no_reply 2, nothing_to_learn 1, " \
           "roles_not_alternating 1)" in p.stdout
    assert (f"tokens a sample (an image is 16): max {n[-1]}, p50 {n[5]}, p95 {n[9]}; {sum(k > 200 for k in n)} over "
            "--max-length 200") in p.stdout
    stage1 = tmp_path / "stage1"
    run(base_args(world, stage1, stage=1, **{"max-steps": 1}))
    p = run(["--check-data", "--data", str(clean), "--image-folder", str(world["image_folder"]), "--init", str(stage1),
             "--pad-to-square", "false"])
    assert "clean.json: 11 records, 11 trainable" in p.stdout and "data: no records skipped of 11" in p.stdout
    assert not (tmp_path / "o").exists()


def test_data_that_trains_nothing_stops_at_once_and_says_why(world, tmp_path):
    records = json.loads(Path(world["stage2"]).read_text())
    path = tmp_path / "keys.json"  # a common mistake: another format's key for the turns
    path.write_text(json.dumps([{"id": r["id"], "image": r["image"], "messages": r["conversations"]} for r in records]))
    p = run(base_args(world, tmp_path / "o", data=path, **{"max-steps": 50}), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().endswith(
        f"error: {path}: no sample of the first batch can be trained on (data: skipped 8 of 48 records "
        "(unreadable_record 8)); are the records LLaVA's {'image', 'conversations': [{'from', 'value'}, ...]}?")
    assert losses(tmp_path / "o") == [] and not list((tmp_path / "o").glob("checkpoint-*"))


# ---- runs that keep their promises: stopped by a signal, resumed, to the uninterrupted run's end ---

LONG_RUN = {"num-workers": 2, "save-every": 5, "keep": 2, "max-steps": 48, "global-batch": 2, "micro-batch": 2}


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(base_args(world, out, **LONG_RUN))
    return out


@pytest.mark.parametrize("sig, resume_from", [(signal.SIGINT, "auto"), (signal.SIGTERM, "auto on 2 ranks"),
                                              (signal.SIGINT, "newest unreadable"), (signal.SIGINT, "the older checkpoint")])
def test_a_signal_to_the_process_group_saves_once_and_resume_ends_as_the_uninterrupted_run(
        world, tmp_path, uninterrupted, sig, resume_from):
    out, nproc = tmp_path / "o", 2 if resume_from == "auto on 2 ranks" else 1
    rc, text = start_and_signal(base_args(world, out, **LONG_RUN), out / "train_log.jsonl", sig, 12, nproc)
    stopped = len(losses(out))
    said = (f"{sig.name}: stopped after step {stopped}, {out / f'checkpoint-{stopped}'} saved; continue with the "
            "same command and --resume auto")
    if nproc == 1:
        assert rc == 128 + sig and "Traceback" not in text and "exited unexpectedly" not in text, text[-3000:]
        assert text.rstrip().endswith(said), text[-1000:]
    else:  # torchrun passes the signal to every rank and then reports it (its own traceback)
        assert rc != 0 and said in text and "exited unexpectedly" not in text, text[-3000:]
        assert [line for line in text.splitlines() if "Traceback" in line and "[rank" in line] == [], text[-3000:]
    assert 12 <= stopped < 48 and not list(out.glob("*.tmp")) and train.checkpoint_problem(out / f"checkpoint-{stopped}") is None
    assert len(list(out.glob("checkpoint-*"))) == 2  # --keep 2 holds for the stop's checkpoint too
    resume = "auto"
    if resume_from == "newest unreadable":  # a checkpoint cut short on disk: the one before it is used
        optim = out / f"checkpoint-{stopped}" / "optim-rank00000.safetensors"
        optim.write_bytes(optim.read_bytes()[:1000])
    elif resume_from == "the older checkpoint":  # which rotation then deletes: the log is cut back to it
        resume = str(min(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])))
    p = run(base_args(world, out, **LONG_RUN, resume=resume), nproc=nproc)
    if resume_from == "newest unreadable":
        assert f"--resume auto: skipping checkpoint-{stopped}: {optim} is unreadable" in p.stdout + p.stderr
    if nproc == 1:
        assert losses(out) == losses(uninterrupted)
    else:  # two ranks sum the same gradients in another order
        assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(losses(out), losses(uninterrupted)))
        assert len(losses(out)) == len(losses(uninterrupted))
    assert sorted(c.name for c in out.glob("checkpoint-*")) == ["checkpoint-45", "checkpoint-48"]
    if resume_from == "the older checkpoint":  # the final directory is whole: transformers and chat.py load it
        transformers = pytest.importorskip("transformers")
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
        ours = LLaVA.from_pretrained(out).eval()
        ids = torch.tensor([[1] + [ours.config.image_token_id] * ours.config.num_patches + [5, 6, 7]])
        px = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert (ours(ids, px)[0] - hf(input_ids=ids, pixel_values=px).logits).abs().max() < 1e-4
        image = Path(world["image_folder"]) / json.loads(Path(world["test"]).read_text())[0]["image"]
        chat = subprocess.run([sys.executable, str(ROOT / "chat.py"), str(image), "--model", str(out), "--prompt",
                               "What color is the circle?", "--max-new-tokens", "4"], capture_output=True, text=True)
        assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr


# ---- the front door: --help, values checked when parsed, inputs checked before any model -------

def test_help_gives_every_flag_its_help_default_and_choices():
    p = run(["--help"])
    text = " ".join(p.stdout.split())  # argparse wraps lines
    flags = [f.name.replace("_", "-") for f in train.fields(train.TrainConfig)]
    for flag in flags:
        assert f"--{flag}" in text, flag
    assert text.count("(default: ") == len(flags)
    for choices in ("{1,2}", "{v1,v1.5,v1.5-lora}", "{tiny,tiny-short,tiny-long}", "{adamw,muon}", "{ours,torch}",
                    "{bf16,fp16,fp32}", "{auto,on,off}", "--grad-ckpt [true|false]"):
        assert choices in text, choices
    assert "examples: python train.py --preset tiny" in text and "--resume auto" in text


@pytest.mark.parametrize("flag, value, says", [
    ("--stage", "3", "'3' is not one of 1, 2"), ("--dtype", "fp8", "'fp8' is not one of bf16, fp16, fp32"),
    ("--grad-ckpt", "maybe", "'maybe' is not true or false"), ("--optimizer", "sgd", "is not one of adamw, muon"),
    ("--micro-batch", "0", "'0' is not a whole number > 0"), ("--warmup-ratio", "1.5", "is not a number in [0, 1)"),
    ("--device", "cuda" if not torch.cuda.is_available() else "tpu", "'"), ("--preset", "huge", "tiny, tiny-short"),
    ("--compile-elementwise", "yes", "'yes' is not one of auto, on, off"),
])
def test_bad_values_are_refused_when_parsed(flag, value, says, capsys):
    # argparse's own exit, as on the command line (which the first case runs for real)
    with pytest.raises(SystemExit) as e:
        train.parse_args([flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: argument {flag}: " in err and says in err, err
    if flag == "--stage":
        p = run([flag, value], check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr and says in p.stderr, p.stderr


def test_booleans_take_the_usual_spellings():
    assert train.parse_args(["--grad-ckpt", "on"]).grad_ckpt is True
    assert train.parse_args(["--grad-ckpt"]).grad_ckpt is True
    assert train.parse_args(["--overwrite", "off"]).overwrite is False
    assert train.parse_args(["--stage", "2"]).out == "runs/stage2" and train.parse_args([]).out == "runs/stage1"
    assert train.parse_args(["--preset", "tiny-short"]).out == "runs/tiny-short"


def dead_hub():
    import socket
    with socket.socket() as s:  # a port nobody listens on: any download attempt fails at once
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_missing_inputs_are_named_in_one_line_before_any_model_is_built(world, tmp_path, capsys):
    """The first case runs the real command line; the rest call the same main() in this process."""
    (tmp_path / "not.json").write_text("[{")
    (tmp_path / "no_records.json").write_text("[]")
    (tmp_path / "empty").mkdir()
    (tmp_path / "noconfig").mkdir()
    good = base_args(world, tmp_path / "out")
    cases = [
        (["--stage", "2"], "error: stage 2 needs --data"),
        (good + ["--data", str(tmp_path / "none.json")], "data file not found"),
        (good + ["--data", str(tmp_path / "not.json")], "not.json is not valid JSON"),
        (good + ["--data", str(tmp_path / "no_records.json")], "no_records.json holds no records"),
        (good + ["--image-folder", str(tmp_path / "nowhere")], "--image-folder " + str(tmp_path / "nowhere") + ": no such directory"),
        (good + ["--image-folder", str(tmp_path / "empty")], "none of the first 20 images is under --image-folder"),
        (good + ["--init", str(tmp_path / "noconfig")], "not a stage-1 output or llava-hf directory"),
        (good + ["--init", "runs/no-such-run"], "--init runs/no-such-run: runs/no-such-run is no local directory"),
        (good + ["--resume", str(tmp_path / "empty")], "not a checkpoint (no train_state.json)"),
        (good + ["--clip", "no/such/dir"], "--clip no/such/dir: no such directory: no/such/dir (and it is not a Hub name"),
        (good + ["--llm", "lmsys/vicuna-7b-v1.5"], "--llm lmsys/vicuna-7b-v1.5: lmsys/vicuna-7b-v1.5 is no local directory"),
        (good + ["--stage", "1", "--init", str(tmp_path / "noconfig")], "--init is for stage 2"),
        (good + ["--recipe", "v1.5", "--image-size", "336"], "takes 32-px pictures, not --image-size 336 (--recipe v1.5's default)"),
    ]
    env_hub = os.environ.get("NANOLLAVA_HUB_URL")
    os.environ["NANOLLAVA_HUB_URL"] = dead_hub()
    try:
        for i, (args, says) in enumerate(cases):
            if i == 0:
                p = run(args, check=False)
                code, err = p.returncode, p.stderr
            else:
                with pytest.raises(SystemExit) as e:
                    train.main(args)
                code, err = e.value.code, capsys.readouterr().err
            lines = err.strip().splitlines()
            assert code == 1 and lines and lines[-1].startswith("error: ") and says in lines[-1], (args, err)
            assert "Traceback" not in err, err
    finally:
        os.environ.pop("NANOLLAVA_HUB_URL") if env_hub is None else os.environ.update(NANOLLAVA_HUB_URL=env_hub)
    assert not (tmp_path / "out").exists()  # nothing was started


def test_another_runs_output_is_kept_unless_resumed_or_overwritten(world, tmp_path):
    out = tmp_path / "run"
    run(base_args(world, out, **{"max-steps": 2}))
    p = run(base_args(world, out, **{"max-steps": 1}), check=False)
    assert p.returncode == 1 and f"error: --out {out} holds another run" in p.stderr and "--overwrite" in p.stderr
    assert len(losses(out)) == 2
    run(base_args(world, out, **{"max-steps": 1, "overwrite": "true"}))
    assert len(losses(out)) == 1 and sorted(c.name for c in out.glob("checkpoint-*")) == ["checkpoint-1"]


def test_loss_curve_ticks_and_stages(tmp_path):
    """1-2-5 ticks per decade on the log loss axis, round step ticks, and each stage drawn in its
    own colour where its loss is: a constant 1.0 between 2.0 and 0.5 sits mid-height."""
    assert train.nice_ticks(0.03, 5.2, log=True) == [0.05, 0.1, 0.2, 0.5, 1, 2, 5]
    assert train.nice_ticks(0, 2499, log=False) == [0, 500, 1000, 1500, 2000]
    assert train.nice_ticks(0, 124, log=False) == [0, 50, 100]
    train.draw_loss_curve([("a", [2.0] * 50), ("b", [1.0] * 50), ("c", [0.5] * 50)], tmp_path / "loss.png")
    from PIL import Image
    img = Image.open(tmp_path / "loss.png").convert("RGB")
    assert img.size == (800, 420)
    mid_x = 60 + 75 * (800 - 60 - 20) / 149   # step 75, the middle of stage b
    mid_y = 30 + (420 - 30 - 40) / 2           # log(1) is halfway between log(2) and log(0.5)
    assert img.getpixel((round(mid_x), round(mid_y))) == (255, 127, 14)
