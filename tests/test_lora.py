"""lora.py against PEFT (`peft`, the library the official LLaVA trains its LoRA with) on a tiny random
llava-hf checkpoint written by transformers: forward, gradients, merge and the adapter format, both ways;
then train.py --lora-r on the tiny world: what is sharded and trained, resume, ranks, outputs PEFT reads."""

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

peft = pytest.importorskip("peft")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlavaForConditionalGeneration  # noqa: E402

import clip  # noqa: E402
import data  # noqa: E402
from llama import Tokenizer  # noqa: E402
from lora import LoRALinear, add_lora, load_adapter, merge_lora, save_adapter  # noqa: E402
from model import LLaVA  # noqa: E402
from helpers import make_tiny_llava, photo, prompt_ids  # noqa: E402
from weights import WeightsError  # noqa: E402

LLM_LINEAR = "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj".split()
R, ALPHA = 4, 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny_llava(tmp_path_factory.mktemp("llava"))
    model = LLaVA.from_pretrained(d)
    ids = torch.tensor([prompt_ids(Tokenizer(d), model, "What is in the picture? Tell me.")])
    labels = ids.clone()
    labels[:, :30] = -100
    px = clip.preprocess(photo(), model.config.vision.image_size, model.config.pad_to_square)[None]
    return d, ids, px, labels


def peft_model(d, targets=LLM_LINEAR, seed=1, **kw):
    """transformers' model under PEFT's LoRA on the LLM's blocks, random non-zero B (and A) from seed."""
    hf = LlavaForConditionalGeneration.from_pretrained(d)
    regex = rf".*language_model.*\.({'|'.join(targets)})"  # a list would reach the vision tower's q/k/v_proj
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=regex, task_type="CAUSAL_LM", **kw)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for m in peft_layers(pm).values():
            m.lora_B["default"].weight.normal_(0, 0.2)
            m.lora_A["default"].weight.normal_(0, 0.2)
    return pm


def peft_layers(pm):
    """PEFT's LoRA layers by our LLM-relative names (layers.N.self_attn.q_proj)."""
    lora = peft.tuners.lora.Linear
    return {n.split("language_model.")[1]: m for n, m in pm.named_modules() if isinstance(m, lora)}


def ours_like(d, pm):
    """Our LLaVA with LoRA on the same modules and PEFT's very factors."""
    model = LLaVA.from_pretrained(d)
    add_lora(model.llm, R, ALPHA)
    with torch.no_grad():
        for name, m in peft_layers(pm).items():
            ours = model.llm.get_submodule(name)
            ours.lora_A.weight.copy_(m.lora_A["default"].weight)
            ours.lora_B.weight.copy_(m.lora_B["default"].weight)
    return model


def test_forward_and_gradients_match_peft(tiny):
    d, ids, px, _ = tiny
    pm = peft_model(d)
    ours = ours_like(d, pm)
    ref = pm(input_ids=ids, pixel_values=px).logits
    logits, _ = ours(ids, px)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    weight = torch.randn_like(ref)  # any fixed function of the logits
    (ref * weight).sum().backward()
    (logits * weight).sum().backward()
    layers = peft_layers(pm)
    assert len(layers) == 2 * len(LLM_LINEAR)
    for name, m in layers.items():
        mine = ours.llm.get_submodule(name)
        for f in "AB":
            theirs = getattr(m, f"lora_{f}")["default"].weight.grad
            torch.testing.assert_close(getattr(mine, f"lora_{f}").weight.grad, theirs, atol=1e-5, rtol=1e-5)
            assert theirs.abs().max() > 1e-3  # a real gradient
    trained = {n for n, p in ours.llm.named_parameters() if p.grad is not None}  # add_lora freezes the LLM
    assert trained == {n for n, _ in ours.llm.named_parameters() if re.search(r"\.lora_[AB]\.weight$", n)}


def test_zero_B_starts_from_the_base_loss(tiny):
    d, ids, px, labels = tiny
    model = LLaVA.from_pretrained(d).train()
    _, base = model(ids, px, labels)
    n = add_lora(model.llm, 8, 16, dropout=0.1)
    _, loss = model(ids, px, labels)
    assert loss == base  # exactly: B = 0 adds zeros, dropout or not
    c = model.config.text
    D, F, KV = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
    per_layer = 8 * (D + D) * 2 + 8 * (D + KV) * 2 + 8 * (D + F) * 2 + 8 * (F + D)  # q,o; k,v; gate,up; down
    assert n == per_layer * c.num_hidden_layers
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 7 * c.num_hidden_layers
    assert not isinstance(model.llm.lm_head, LoRALinear)
    assert all(not p.requires_grad for n, p in model.llm.named_parameters() if "lora_" not in n)
    torch.manual_seed(0)
    targeted = LLaVA.from_pretrained(d)
    add_lora(targeted.llm, 2, 4, targets=["q_proj", "layers.1.mlp.down_proj"])
    wrapped = [n for n, m in targeted.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == [f"llm.layers.{i}.{n}" for i, n in
                       [(0, "self_attn.q_proj"), (1, "self_attn.q_proj"), (1, "mlp.down_proj")]]


def test_merge_matches_peft_merge_and_unload(tiny):
    d, ids, px, _ = tiny
    pm = peft_model(d)
    ours = ours_like(d, pm)
    with torch.no_grad():
        unmerged, _ = ours(ids, px)
        merge_lora(ours)
        merged, _ = ours(ids, px)
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())
    torch.testing.assert_close(merged, unmerged, atol=5e-5, rtol=0)  # W x + B A x, reassociated in fp32
    hf = pm.merge_and_unload().state_dict()
    for name, w in ours.state_dict().items():
        if name.startswith("llm.layers."):
            assert torch.equal(w, hf["model.language_model." + name[len("llm."):]]), name


def test_our_adapter_loads_in_peft(tiny, tmp_path):
    d, ids, px, _ = tiny
    ours = ours_like(d, peft_model(d, seed=2))
    save_adapter(ours, tmp_path, base_name=d)
    pm = peft.PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(d), tmp_path)
    assert len(peft_layers(pm)) == 2 * len(LLM_LINEAR)  # and none in the vision tower
    with torch.no_grad():
        ref = pm(input_ids=ids, pixel_values=px).logits
        torch.testing.assert_close(ref, ours(ids, px)[0], atol=1e-5, rtol=0)
        again = load_adapter(LLaVA.from_pretrained(d), tmp_path)
        torch.testing.assert_close(again(ids, px)[0], ours(ids, px)[0], atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["transformers5", "transformers4"])
def test_peft_adapter_loads_in_ours(tiny, tmp_path, layout):
    """An adapter PEFT saved (a subset of targets, the projector as a module to save), in the layout PEFT
    writes with transformers 5 and the one it wrote with transformers 4 (language_model.model.*)."""
    d, ids, px, _ = tiny
    pm = peft_model(d, targets=["q_proj", "v_proj", "down_proj"], modules_to_save=["multi_modal_projector"])
    with torch.no_grad():
        for p in pm.base_model.model.model.multi_modal_projector.parameters():
            p.add_(0.1)
        ref = pm(input_ids=ids, pixel_values=px).logits
    pm.save_pretrained(tmp_path)
    if layout == "transformers4":
        file = tmp_path / "adapter_model.safetensors"
        save_file({k.replace("model.model.language_model.", "model.language_model.model.")
                   .replace("model.model.multi_modal_projector.", "model.multi_modal_projector."): t
                   for k, t in load_file(file).items()}, file)
    ours = load_adapter(LLaVA.from_pretrained(d), tmp_path)
    assert len([m for m in ours.modules() if isinstance(m, LoRALinear)]) == 3 * 2
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, px)[0], ref, atol=1e-5, rtol=0)


def test_bad_adapter_is_one_error_naming_the_file(tiny, tmp_path):
    d = tiny[0]
    model = LLaVA.from_pretrained(d)
    add_lora(model.llm, R, ALPHA)
    save_adapter(model, tmp_path, base_name=d)
    file = tmp_path / "adapter_model.safetensors"
    good = load_file(file)
    key = next(k for k in good if k.endswith("layers.1.self_attn.k_proj.lora_B.weight"))
    save_file({k: t for k, t in good.items() if k != key}, file)
    with pytest.raises(WeightsError, match=r"adapter_model\.safetensors.*missing keys: "
                                           r"llm\.layers\.1\.self_attn\.k_proj\.lora_B\.weight$"):
        load_adapter(LLaVA.from_pretrained(d), tmp_path)
    save_file({**good, key: torch.zeros(3, R)}, file)
    with pytest.raises(WeightsError, match=r"adapter_model\.safetensors.*wrong shapes: "
                                           r".*k_proj\.lora_B\.weight \(expected \[32, 4\], found \[3, 4\]\)"):
        load_adapter(LLaVA.from_pretrained(d), tmp_path)
    save_file({**good, "base_model.model.model.vision_tower.x.lora_A.weight": torch.zeros(1)}, file)
    with pytest.raises(WeightsError, match=r"unexpected keys: vision_tower\.x\.lora_A\.weight"):
        load_adapter(LLaVA.from_pretrained(d), tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(WeightsError, match=r"adapter_config\.json"):
        load_adapter(LLaVA.from_pretrained(d), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "use_dora": true}')
    with pytest.raises(WeightsError, match=r"adapter_config\.json: not a plain LoRA adapter"):
        load_adapter(LLaVA.from_pretrained(d), tmp_path)


def test_chat_and_serve_apply_an_adapter(tiny, tmp_path):
    """chat.py, serve.py and eval.py --lora: a PEFT adapter on the base answers as PEFT's model does."""
    import subprocess
    import serve
    d = tiny[0]
    pm = peft_model(d, seed=3)
    pm.save_pretrained(tmp_path / "adapter")
    tok, question = Tokenizer(d), "What is in the picture? Tell me."
    ids = torch.tensor([tok.encode(f"{data.VICUNA_SYSTEM} USER: {question} ASSISTANT:")])  # vicuna_v1, by hand
    with torch.no_grad():
        out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0, ids.shape[1]:].tolist()
    expected = tok.decode([t for t in out if t != tok.eos_id])
    p = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "chat.py"), "--model", str(d),
                        "--lora", str(tmp_path / "adapter"), "--prompt", question, "--temperature", "0",
                        "--max-new-tokens", "12"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout == expected + "\n", p.stderr
    model, tok = serve.load_model(str(d), torch.device("cpu"), torch.float32, lora=tmp_path / "adapter")
    engine = serve.Engine(model, tok, max_batch=2).start()
    req = serve.Request(ids[0].tolist(), None, 12, temperature=0)
    engine.submit(req)
    assert "".join(serve.reply_pieces(req, tok)) == expected
    import eval as ev  # eval.py scienceqa / judge --lora load the same way
    model, tok = ev.load_model(str(d), "cpu", "fp32", lora=tmp_path / "adapter")
    assert tok.decode(list(model.generate(ids[0], None, max_new_tokens=12, eos_id=tok.eos_id))) == expected


# ---- train.py --lora-r: a tiny stage 2 ------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from helpers import make_world
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.mark.parametrize("engine", ["ours", "torch"])
def test_fsdp_shards_the_factors_and_projector_and_leaves_the_base_whole(world, engine):
    import fsdp
    import train
    cfg = train.parse_args(["--stage", "2", "--lora-r", "4", "--projector", "mlp2x_gelu", "--fsdp", engine])
    model = LLaVA.from_components(world["clip"], world["llm"], projector="mlp2x_gelu", pad_to_square=False)
    model.llm.to(torch.bfloat16)  # as train.py's Run: the base in the compute dtype, then the factors
    n = add_lora(model.llm, 4, 8)
    projector = sum(p.numel() for p in model.projector.parameters())
    trained = {n for n, _ in model.named_parameters() if n.startswith("projector.") or ".lora_" in n}
    base = {n: p for n, p in model.named_parameters() if n not in trained}
    device, _, _ = fsdp.init_distributed(cfg)
    try:
        params, full_state, units = fsdp.shard_model(model, cfg, device, torch.bfloat16)
        if engine == "ours":
            layers = [f"layers.{i}" for i in range(len(model.llm.layers))]
            assert [u.name for u in units] == ["projector"] + layers  # no embedding or head unit
            assert {qual for u in units for *_, qual in u.slots} == trained
        else:  # FSDP2's DTensors
            assert {n for n, p in model.named_parameters() if hasattr(p, "full_tensor")} == trained
        assert sum(p.numel() for p in params) == n + projector  # one rank: its shards hold everything
        for name, p in base.items():  # still the model's own plain parameters, frozen, in bf16
            assert model.get_parameter(name) is p and not hasattr(p, "full_tensor"), name
            assert not p.requires_grad and p.dtype == torch.bfloat16, name
    finally:
        torch.distributed.destroy_process_group()


def test_train_lora_changes_only_the_factors_and_projector_and_resumes_exactly(world, tmp_path):
    from helpers import base_args, losses, run
    lora = {"lora-r": 4, "lora-alpha": 8, "lora-dropout": 0.1, "max-steps": 3, "projector-lr": 2e-4}
    run(base_args(world, tmp_path / "a", **lora))
    base = LLaVA.from_components(world["clip"], world["llm"], projector="mlp2x_gelu", pad_to_square=False)
    merged = LLaVA.from_pretrained(tmp_path / "a")  # the llava-hf directory
    before, after = base.state_dict(), merged.state_dict()
    targeted = [f"llm.layers.{i}.{n}.weight" for i in range(base.config.text.num_hidden_layers)
                for n in ["self_attn." + p for p in LLM_LINEAR[:4]] + ["mlp." + p for p in LLM_LINEAR[4:]]]
    for name in before:
        changed = name in targeted or name.startswith("projector.")
        assert torch.equal(before[name], after[name]) != changed, name
    # the adapter on the base is the merged model, and PEFT reads it onto transformers' base
    adapted = load_adapter(LLaVA.from_components(world["clip"], world["llm"], projector="mlp2x_gelu",
                                                 pad_to_square=False), tmp_path / "a" / "adapter")
    merge_lora(adapted)
    for name, t in adapted.state_dict().items():
        torch.testing.assert_close(t, after[name], atol=1e-6, rtol=0)
    base.save_pretrained(tmp_path / "base")
    hf = peft.PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(tmp_path / "base"),
                                        tmp_path / "a" / "adapter")
    ids = torch.tensor([[1] + [merged.config.image_token_id] * merged.config.num_patches + [5, 6, 7, 8]])
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px).logits
        torch.testing.assert_close(ref, merged(ids, px)[0], atol=1e-5, rtol=0)
        theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a")  # the merged directory, in transformers
        torch.testing.assert_close(theirs(input_ids=ids, pixel_values=px).logits, ref, atol=1e-5, rtol=0)
    # stopped after step 1 and resumed: the same losses and weights as the uninterrupted run
    run(base_args(world, tmp_path / "b", **lora, **{"stop-at": 1}))
    run(base_args(world, tmp_path / "b", **lora, resume="auto"))
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    resumed = LLaVA.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(resumed[k], after[k]) for k in after)
    p = run(base_args(world, tmp_path / "c", **lora, **{"lora-targets": "qproj"}), check=False)
    assert p.returncode == 1 and "--lora-targets qproj: no linear layer of the LLM" in p.stderr, p.stderr


def test_lora_flags_and_the_v15_lora_recipe(tmp_path):
    import train
    c = train.parse_args(["--stage", "2", "--recipe", "v1.5-lora"])  # the official finetune_lora.sh
    assert (c.lora_r, c.lora_alpha, c.lr, c.projector_lr, c.projector, c.image_size, c.global_batch) == \
        (128, 256, 2e-4, 2e-5, "mlp2x_gelu", 336, 128)
    assert train.parse_args(["--stage", "1", "--recipe", "v1.5-lora"]).lr == 1e-3  # its stage 1 is v1.5's
    assert train.parse_args(["--stage", "2"]).lora_r == 0
    assert train.parse_args(["--lora-r", "8"]).lora_alpha == 16  # 2 r
    with pytest.raises(SystemExit, match="--lora-r is for stage 2"):
        train.build_model(train.parse_args(["--stage", "1", "--lora-r", "4"]))


def test_train_lora_on_two_ranks_equals_one_process(world, tmp_path):
    """Our FSDP shards the factors and the projector (the frozen base stays whole): 2 gloo ranks with
    --grad-ckpt = 1 process."""
    from helpers import assert_same_run, base_args, run
    lora = {"lora-r": 4, "lora-alpha": 8, "lora-dropout": 0.0, "max-steps": 2, "micro-batch": 2}
    run(base_args(world, tmp_path / "one", **lora))
    run(base_args(world, tmp_path / "two", **lora, **{"grad-ckpt": "true"}), nproc=2)
    assert_same_run(tmp_path / "one", tmp_path / "two", stage=2)
    run(base_args(world, tmp_path / "fsdp2", **lora, fsdp="torch"), nproc=2)  # PyTorch's FSDP2 alike
    assert_same_run(tmp_path / "one", tmp_path / "fsdp2", stage=2)
