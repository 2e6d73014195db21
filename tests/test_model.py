"""model.py against transformers' LlavaForConditionalGeneration on tiny random checkpoints that
transformers itself writes, in every layout DESIGN.md lists."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model import LLaVA, next_token_loss, supervised_positions
from weights import WeightsError
from helpers import make_sp_tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = 576  # a 512-piece tokenizer + <image> 512 + <pad> 513, padded to a multiple of 64
IMAGE_ID = 512


def hf_config(projector_act="gelu", layer=-2, select="default"):
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=28, patch_size=7)
    tc = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                  rms_norm_eps=1e-5, max_position_embeddings=256)
    return transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_ID,
                                    projector_hidden_act=projector_act, vision_feature_layer=layer,
                                    vision_feature_select_strategy=select)


def make_hf(tmp_path, name="hf", **kw):
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(hf_config(**kw)).eval()
    d = tmp_path / name
    hf.save_pretrained(d)
    make_sp_tokenizer(d)
    return hf, d


def to_hub_layout(d):
    """Rewrite a transformers-5 save into the Hub's llava-hf layout: vision keys under
    `vision_tower.vision_model.`, fp16 shards with an index, and a sparse text_config."""
    state = load_file(str(d / "model.safetensors"))
    hub = {}
    for k, v in state.items():
        if k.startswith("vision_tower."):
            k = "vision_tower.vision_model." + k[len("vision_tower."):]
        hub[k] = v
    (d / "model.safetensors").unlink()
    keys = sorted(hub)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: hub[k].contiguous() for k in ks}, str(d / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in ks})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((d / "config.json").read_text())
    t = cfg["text_config"]
    cfg["text_config"] = {k: t[k] for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                             "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                             "rms_norm_eps", "max_position_embeddings")}
    (d / "config.json").write_text(json.dumps(cfg))


def prompt(P=16, T_text=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randint(3, 500, (4,), generator=g)
    post = torch.randint(3, 500, (T_text,), generator=g)
    ids = torch.cat([torch.tensor([1]), pre, torch.full((P,), IMAGE_ID), post])[None]
    px = torch.randn(1, 3, 28, 28, generator=g)
    return ids, px


def hf_logits(hf, ids, px):
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=px).logits


@pytest.mark.parametrize("layout", ["transformers5", "hub"])
def test_logits_match_transformers(tmp_path, layout):
    hf, d = make_hf(tmp_path)
    if layout == "hub":
        to_hub_layout(d)
    ours = LLaVA.from_pretrained(d).eval()
    ids, px = prompt()
    with torch.no_grad():
        logits, _ = ours(ids, px)
    ref = hf_logits(hf, ids, px)
    assert (logits - ref).abs().max() < 1e-4


@pytest.mark.parametrize("layer,select", [(-1, "default"), (-2, "full")])
def test_feature_layer_and_cls_choice(tmp_path, layer, select):
    hf, d = make_hf(tmp_path, layer=layer, select=select)
    ours = LLaVA.from_pretrained(d).eval()
    P = 16 + (select == "full")
    ids, px = prompt(P=P)
    with torch.no_grad():
        logits, _ = ours(ids, px)
    assert (logits - hf_logits(hf, ids, px)).abs().max() < 1e-4


def test_loss_matches_transformers(tmp_path):
    hf, d = make_hf(tmp_path)
    ours = LLaVA.from_pretrained(d).eval()
    ids, px = prompt()
    labels = ids.clone()
    labels[:, :21] = -100  # supervise only the text after the image
    with torch.no_grad():
        _, loss = ours(ids, px, labels=labels)
        ref = hf(input_ids=ids, pixel_values=px, labels=labels).loss
    assert abs(float(loss) - float(ref)) < 1e-5


def test_supervised_positions_by_hand():
    # position t predicts label t+1; rows are 5 long, so row r's position t is 5r + t
    labels = torch.tensor([[-100, 5, 6, 7, 8], [-100, 5, -100, -100, -100], [-100, 5, 6, -100, -100]])
    positions, targets = supervised_positions(labels)
    assert positions.tolist() == [0, 1, 2, 3, 5, 10, 11] and targets.tolist() == [5, 6, 7, 8, 5, 5, 6]


def test_head_at_supervised_positions_only(tmp_path):
    """Training's path (the LM head on the K supervised positions, supervised_positions):
    the loss equals transformers' on the whole batch, and every gradient equals the one through
    all B*T logits with F.cross_entropy."""
    from model import token_loss
    hf, d = make_hf(tmp_path)
    ours = LLaVA.from_pretrained(d).train()
    (a, px_a), (b, px_b) = prompt(seed=1), prompt(T_text=6, seed=2)
    ids = torch.cat([a, F.pad(b, (0, a.shape[1] - b.shape[1]), value=0)])  # [2,31]; row 1 right-padded
    labels = ids.clone()
    labels[:, :21] = -100
    labels[1, b.shape[1]:] = -100
    px = torch.cat([px_a, px_b])
    positions, targets = supervised_positions(labels)
    assert len(positions) == int((labels[:, 1:] != -100).sum()) < ids.numel() // 2
    logits, _ = ours(ids, px, logits_at=positions)
    assert logits.shape == (len(positions), VOCAB)
    loss = token_loss(logits, targets)
    params = list(ours.projector.parameters()) + list(ours.llm.parameters())  # what stage 2 trains
    grads = torch.autograd.grad(loss, params)
    full, _ = ours(ids, px)
    ref = F.cross_entropy(full[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="sum")
    ref_grads = torch.autograd.grad(ref, params)
    with torch.no_grad():
        hf_loss = hf(input_ids=ids, pixel_values=px, labels=labels).loss
    loss, ref = float(loss.detach()), float(ref.detach())
    assert abs(loss / len(targets) - float(hf_loss)) < 1e-5 and abs(loss - ref) < 1e-4
    for p, g, r in zip(params, grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-4)


def test_greedy_continuation_identical(tmp_path):
    hf, d = make_hf(tmp_path)
    ours = LLaVA.from_pretrained(d).eval()
    ids, px = prompt()
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=px, max_new_tokens=8, do_sample=False,
                          min_new_tokens=8)[0, ids.shape[1]:].tolist()
        seq = ids
        for _ in range(8):  # full recompute: an independent second path to the same answer
            logits, _ = ours(seq, px)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert seq[0, ids.shape[1]:].tolist() == ref


@pytest.mark.parametrize("act", ["gelu", "linear"])
def test_save_pretrained_loads_in_transformers(tmp_path, act):
    hf, d = make_hf(tmp_path, projector_act=act)
    if act == "linear":  # a real v1 projector: linear_2 is the identity we write
        with torch.no_grad():
            hf.model.multi_modal_projector.linear_2.weight.copy_(torch.eye(48))
            hf.model.multi_modal_projector.linear_2.bias.zero_()
        hf.save_pretrained(d)
    ours = LLaVA.from_pretrained(d).eval()
    assert ours.config.projector == ("linear" if act == "linear" else "mlp2x_gelu")
    out = tmp_path / "ours"
    ours.save_pretrained(out)
    assert (out / "tokenizer.model").exists() and (out / "added_tokens.json").exists()
    back = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids, px = prompt()
    with torch.no_grad():
        logits, _ = ours(ids, px)
    assert (logits - hf_logits(back, ids, px)).abs().max() < 1e-4
    again = LLaVA.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(again(ids, px)[0], logits)


def make_components(tmp_path):
    torch.manual_seed(1)
    cfg = hf_config()
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=cfg.vision_config.to_dict(),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=99)))
    clip.save_pretrained(tmp_path / "clip")
    tc = cfg.text_config.to_dict()
    tc["vocab_size"] = 512
    llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        k: v for k, v in tc.items() if k not in ("model_type", "transformers_version")}))
    llm.save_pretrained(tmp_path / "llm")
    make_sp_tokenizer(tmp_path / "llm")
    for f in ("added_tokens.json", "tokenizer_config.json"):  # a plain Vicuna dir has no <image>
        (tmp_path / "llm" / f).unlink()
    return clip, llm


def test_from_components_extends_vocab_the_llava_hf_way(tmp_path):
    clip, llm = make_components(tmp_path)
    model = LLaVA.from_components(tmp_path / "clip", tmp_path / "llm", projector="mlp2x_gelu").eval()
    c = model.config
    assert (c.image_token_id, c.pad_token_id, c.text.vocab_size) == (512, 513, 576)
    assert torch.equal(model.llm.embed_tokens.weight[:512], llm.model.embed_tokens.weight.detach())
    assert torch.allclose(model.llm.embed_tokens.weight[600 - 88],
                          llm.model.embed_tokens.weight.detach().mean(0), atol=1e-6)
    # the extended model saves as llava-hf and transformers reads it to the same logits
    model.save_pretrained(tmp_path / "out")
    back = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids, px = prompt()
    with torch.no_grad():
        assert (model(ids, px)[0] - hf_logits(back, ids, px)).abs().max() < 1e-4


def test_saved_tokenizer_says_how_the_model_tokenizes(tmp_path):
    """Every directory we save records `legacy`, the one the model was trained with (here from a
    Vicuna directory whose tokenizer has no config, so legacy), and transformers' tokenizer read
    from it gives our ids for a two-turn Vicuna prompt, "</s>▁USER" included."""
    from transformers import AutoTokenizer
    from llama import Tokenizer
    make_components(tmp_path)
    prompt = "SYS USER: <image>\nWhat? ASSISTANT: A boat.</s>USER: Where? ASSISTANT: On a lake.</s>"
    for legacy in (True, False):
        if not legacy:  # a base that says legacy=False is saved as such
            (tmp_path / "llm" / "tokenizer_config.json").write_text(json.dumps({"legacy": False}))
        model = LLaVA.from_components(tmp_path / "clip", tmp_path / "llm")
        out = tmp_path / f"out-{legacy}"
        model.save_pretrained(out)
        assert json.loads((out / "tokenizer_config.json").read_text())["legacy"] is legacy
        ours = Tokenizer(out)
        assert ours.legacy is legacy
        hf = AutoTokenizer.from_pretrained(str(out))
        chunks = [hf(c).input_ids for c in prompt.split("<image>")]
        assert ours.encode(prompt) == chunks[0] + [IMAGE_ID] + chunks[1][1:]
        after_eos = ours.encode(prompt).index(ours.eos_id) + 1
        assert ours.sp.id_to_piece(ours.encode(prompt)[after_eos]).startswith("\u2581") is legacy


@pytest.mark.parametrize("pad", [None, 32001])  # absent, or a row this vocabulary does not have
def test_a_checkpoint_without_a_pad_row_pads_with_one_it_has(tmp_path, pad):
    """Pads are never attended to nor supervised, so any id the embedding has will do: <unk>,
    as the official LLaVA code pads Vicuna; transformers' tokenizer of the saved model agrees."""
    from transformers import AutoTokenizer
    hf, d = make_hf(tmp_path)
    raw = json.loads((d / "config.json").read_text())
    raw.pop("pad_token_id", None) if pad is None else raw.update(pad_token_id=pad)
    (d / "config.json").write_text(json.dumps(raw))
    model = LLaVA.from_pretrained(d)
    assert model.config.pad_token_id == 0 < VOCAB
    model.save_pretrained(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert (tok.pad_token, tok.pad_token_id, tok.convert_tokens_to_ids("<image>")) == ("<unk>", 0, IMAGE_ID)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pad_token_id"] == 0


def test_stage1_projector_only_output(tmp_path):
    make_components(tmp_path)
    model = LLaVA.from_components(tmp_path / "clip", tmp_path / "llm", projector="linear").eval()
    out = tmp_path / "stage1"
    model.save_pretrained(out, bases={"vision": tmp_path / "clip", "llm": tmp_path / "llm"})
    keys = load_file(str(out / "model.safetensors")).keys()
    assert all(k.startswith("multi_modal_projector.") for k in keys)
    again = LLaVA.from_pretrained(out).eval()
    ids, px = prompt()
    with torch.no_grad():
        assert torch.equal(again(ids, px)[0], model(ids, px)[0])


def test_text_only_forward_and_loss_ignore_index():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 1, 2, -100, 3], [-100, -100, -100, -100, -100]])
    # by hand: positions (0,0)->1, (0,1)->2, (0,3)->3
    lp = torch.log_softmax(logits, -1)
    want = -(lp[0, 0, 1] + lp[0, 1, 2] + lp[0, 3, 3]) / 3
    assert torch.allclose(next_token_loss(logits, labels), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_its_gradient_equal_torch_cross_entropy(dtype):
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 6, 50)).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (3, 6))
    labels[0, :3] = -100
    labels[2] = -100
    got = next_token_loss(logits, labels)
    (g_got,) = torch.autograd.grad(3.0 * got, logits)
    ref = F.cross_entropy(logits.float()[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    (g_ref,) = torch.autograd.grad(3.0 * ref, logits)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-6)
    assert g_got.dtype == dtype and torch.allclose(g_got.float(), g_ref.float(), atol=1e-6)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # p became the gradient
        loss = next_token_loss(logits, labels)
        loss.backward(retain_graph=True)
        loss.backward()


def test_errors_name_the_problem(tmp_path):
    hf, d = make_hf(tmp_path)
    with pytest.raises(WeightsError, match="no such directory"):
        LLaVA.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="config.json"):
        LLaVA.from_pretrained(tmp_path / "empty")
    state = load_file(str(d / "model.safetensors"))
    state["extra.weight"] = torch.zeros(1)
    state["language_model.model.norm.weight"] = torch.zeros(7)
    del state["multi_modal_projector.linear_1.bias"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(WeightsError) as e:  # an unknown, a missing and a misshaped key: one error names all
        LLaVA.from_pretrained(d)
    msg = str(e.value)
    assert "unexpected keys: extra.weight" in msg and "missing keys: projector.linear_1.bias" in msg, msg
    assert "wrong shapes: llm.norm.weight (expected [48], found [7])" in msg and "\n" not in msg, msg
    (d / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="config.json"):
        LLaVA.from_pretrained(d)


def test_image_token_count_mismatch_is_explained(tmp_path):
    hf, d = make_hf(tmp_path)
    ours = LLaVA.from_pretrained(d).eval()
    ids, px = prompt(P=15)
    with pytest.raises(ValueError, match="one <image> id"):
        ours(ids, px)
