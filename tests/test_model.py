"""model.py against transformers' LlavaForConditionalGeneration on tiny random checkpoints that
transformers itself writes, in every layout DESIGN.md lists; LLaVA.generate against transformers'
generate and our own full-recompute decoding: KV cache, follow-up turns, left-padded batches, sampling."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import clip
from llama import Tokenizer
from model import LLaVA, ContextLengthError, GenerationState, next_token_loss, sample_next, supervised_positions
from model import top_p_filter
from weights import WeightsError
from helpers import make_sp_tokenizer, make_tiny_llava, photo, prompt_ids

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


# ---- LLaVA.generate ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny_llava(tmp_path_factory.mktemp("llava"))
    model = LLaVA.from_pretrained(d).eval()
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(d).eval()
    tok = Tokenizer(d)
    pv = [clip.preprocess(photo(s), model.config.vision.image_size, model.config.pad_to_square)[None]
          for s in range(3)]
    return model, hf, tok, pv


def full_recompute_greedy(model, ids, pixel_values, n, eos_id=None):
    """The slow reference: a full forward over the whole sequence for every new token."""
    ids, out = torch.tensor(ids)[None], []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(ids, pixel_values)
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def hf_greedy(hf, ids, pixel_values, n, eos_id=None):
    x = torch.tensor(ids)[None]
    kwargs = {} if pixel_values is None else {"pixel_values": pixel_values}
    with torch.no_grad():
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                          min_new_tokens=0, eos_token_id=eos_id, pad_token_id=513, **kwargs)
    return out[0, x.shape[1]:].tolist()


def test_greedy_matches_transformers_and_full_recompute(tiny):
    model, hf, tok, pv = tiny
    ids = prompt_ids(tok, model, "What is in the picture?")
    ours = list(model.generate(torch.tensor(ids), pv[0], max_new_tokens=24, eos_id=None))
    assert len(ours) == 24 and all(isinstance(t, int) for t in ours)
    assert ours == hf_greedy(hf, ids, pv[0], 24)
    assert ours == full_recompute_greedy(model, ids, pv[0], 24)
    assert len(set(ours)) > 3  # a real test: the random model does not just repeat one id


def test_text_only_greedy_matches_transformers(tiny):
    model, hf, tok, _ = tiny
    ids = prompt_ids(tok, model, "How many people are there?", image=False)
    assert list(model.generate(torch.tensor(ids), max_new_tokens=16, eos_id=None)) == hf_greedy(hf, ids, None, 16)


def test_stops_after_eos(tiny):
    model, hf, tok, pv = tiny
    ids = prompt_ids(tok, model, "Describe the image in detail.")
    free = list(model.generate(torch.tensor(ids), pv[1], max_new_tokens=16, eos_id=None))
    eos = free[5]  # pretend the 6th token is EOS: generation must stop right after yielding it
    stop = free.index(eos) + 1
    ours = list(model.generate(torch.tensor(ids), pv[1], max_new_tokens=16, eos_id=eos))
    assert ours == free[:stop]
    assert ours == hf_greedy(hf, ids, pv[1], 16, eos_id=eos)


def test_follow_up_reuses_the_cache(tiny, monkeypatch):
    model, _, tok, pv = tiny
    first = prompt_ids(tok, model, "What is in the picture?")
    state = GenerationState()
    reply1 = list(model.generate(torch.tensor(first), pv[0], max_new_tokens=7, eos_id=None, state=state))
    assert state.tokens == first + reply1
    assert state.cache.pos == len(first) + 6  # the last reply token is not fed yet

    # the follow-up text comes after "</s>": EOS, then no leading "▁"
    follow = tok.encode("</s>USER: How many people are there? ASSISTANT:", bos=False)

    def no_vision(*a, **k):
        raise AssertionError("a follow-up turn must not run the vision tower again")
    monkeypatch.setattr(model, "encode_images", no_vision)
    reply2 = list(model.generate(torch.tensor(follow), max_new_tokens=9, eos_id=None, state=state))
    monkeypatch.undo()
    assert state.tokens == first + reply1 + follow + reply2

    whole = first + reply1 + follow
    assert reply2 == list(model.generate(torch.tensor(whole), pv[0], max_new_tokens=9, eos_id=None))
    assert reply2 == full_recompute_greedy(model, whole, pv[0], 9)

    # a third turn grows the cache past its first allocation and still agrees with a fresh run
    third = tok.encode("</s>USER: " + "Explain why the scene is unusual. " * 12 + "ASSISTANT:", bos=False)
    size = state.cache.max_len
    reply3 = list(model.generate(torch.tensor(third), max_new_tokens=5, eos_id=None, state=state))
    assert state.cache.max_len > size
    whole = whole + reply2 + third
    assert reply3 == list(model.generate(torch.tensor(whole), pv[0], max_new_tokens=5, eos_id=None))


def test_follow_up_rules(tiny):
    model, _, tok, pv = tiny
    state = GenerationState()
    list(model.generate(torch.tensor(prompt_ids(tok, model, "Hi")), pv[0], max_new_tokens=2, state=state))
    with pytest.raises(ValueError, match="already holds its image"):
        list(model.generate(torch.tensor([5, 6]), pv[1], max_new_tokens=2, state=state))
    with pytest.raises(ValueError, match="batch 1"):
        list(model.generate(torch.tensor([[5, 6], [7, 8]]), max_new_tokens=2, state=state))


def test_left_padded_batch_equals_single_prompts(tiny):
    model, _, tok, pv = tiny
    prompts = [prompt_ids(tok, model, "What is in the picture?"),
               prompt_ids(tok, model, "Hi", image=False),
               prompt_ids(tok, model, "Describe the image in detail. Explain why the scene is unusual.")]
    images = torch.cat([pv[0], pv[2]])  # rows 0 and 2 have an image, row 1 is text-only
    singles = [list(model.generate(torch.tensor(p), x, max_new_tokens=12, eos_id=None))
               for p, x in zip(prompts, [pv[0], None, pv[2]])]
    assert model.generate_batch(prompts, images, max_new_tokens=12, eos_id=None) == singles

    # with an EOS that row 0 hits early: that row is cut there, the others run on
    eos = singles[0][3]
    cut = [s[:s.index(eos)] if eos in s else s for s in singles]
    assert model.generate_batch(prompts, images, max_new_tokens=12, eos_id=eos) == cut
    assert len(cut[0]) <= 3 and max(len(c) for c in cut) > 3
    # the tensor interface: a [B] tensor per step, finished rows repeat EOS
    steps = list(model.generate(torch.tensor([prompts[1], prompts[1]]), max_new_tokens=3, eos_id=None))
    assert [s.shape for s in steps] == [torch.Size([2])] * 3


def test_static_decode_step_equals_eager(tiny):
    """The static-shape step that --compile compiles, run uncompiled on the CPU."""
    model, _, tok, pv = tiny
    ids = prompt_ids(tok, model, "What is in the picture?")
    prompts = [ids, prompt_ids(tok, model, "Hi", image=False)]
    eager = list(model.generate(torch.tensor(ids), pv[0], max_new_tokens=20, eos_id=None))
    eager_batch = model.generate_batch(prompts, pv[0], max_new_tokens=10, eos_id=None)
    state, follow = GenerationState(), tok.encode("</s>USER: Why? ASSISTANT:", bos=False)
    list(model.generate(torch.tensor(ids), pv[0], max_new_tokens=4, eos_id=None, state=state))
    eager_follow = list(model.generate(torch.tensor(follow), max_new_tokens=6, eos_id=None, state=state))
    try:
        model.compile_decode(compile=False)
        assert list(model.generate(torch.tensor(ids), pv[0], max_new_tokens=20, eos_id=None)) == eager
        assert model.generate_batch(prompts, pv[0], max_new_tokens=10, eos_id=None) == eager_batch
        state = GenerationState()
        list(model.generate(torch.tensor(ids), pv[0], max_new_tokens=4, eos_id=None, state=state))
        assert list(model.generate(torch.tensor(follow), max_new_tokens=6, eos_id=None, state=state)) == eager_follow
    finally:
        del model._static_step


def test_sampling_is_reproducible(tiny):
    model, _, tok, pv = tiny
    x = torch.tensor(prompt_ids(tok, model, "What is in the picture?"))

    def run(**kw):
        return list(model.generate(x, pv[0], max_new_tokens=20, eos_id=None, temperature=1.0, **kw))
    seed = lambda n: torch.Generator().manual_seed(n)  # noqa: E731
    a = run(generator=seed(1))
    assert a == run(generator=seed(1))
    assert a != run(generator=seed(2))
    assert run(generator=seed(1), top_p=0.9) == run(generator=seed(1), top_p=0.9)
    # a nucleus smaller than the top token's mass leaves only the top token: greedy
    assert run(generator=seed(3), top_p=1e-6) == list(model.generate(x, pv[0], max_new_tokens=20, eos_id=None))


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15]])
    logits = probs.log()
    kept = lambda p: set(torch.nonzero(top_p_filter(logits, p)[0] > float("-inf"))[:, 0].tolist())  # noqa: E731
    assert kept(0.30) == {1}            # 0.40 alone reaches 0.30
    assert kept(0.60) == {1, 3}         # 0.40 + 0.30 = 0.70 >= 0.60; 0.40 alone does not
    assert kept(0.80) == {1, 3, 4}      # 0.70 < 0.80, + 0.15 = 0.85
    assert kept(0.90) == {1, 3, 4, 2}   # 0.85 < 0.90, + 0.10 = 0.95
    assert kept(1.00) == {0, 1, 2, 3, 4}
    assert kept(1e-9) == {1}            # the most likely token always stays
    out = top_p_filter(logits, 0.8)
    assert torch.equal(out[0, [1, 3, 4]], logits[0, [1, 3, 4]])  # kept logits are untouched

    # the same mask as transformers' TopPLogitsWarper on random distributions
    from transformers.generation.logits_process import TopPLogitsWarper
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 300, generator=g) * 3
    for p in (0.1, 0.5, 0.9, 0.99):
        assert torch.equal(top_p_filter(scores, p), TopPLogitsWarper(p)(None, scores.clone()))


def test_sample_next_draws_from_the_nucleus():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15]]).log().expand(4000, 5)
    draws = sample_next(logits, temperature=1.0, top_p=0.8, generator=g)
    counts = torch.bincount(draws, minlength=5).float() / 4000
    assert counts[0] == 0 and counts[2] == 0                  # outside the nucleus: never
    assert torch.allclose(counts[[1, 3, 4]], torch.tensor([0.40, 0.30, 0.15]) / 0.85, atol=0.03)
    assert torch.equal(sample_next(logits[:2], 0.0), torch.tensor([1, 1]))  # temperature 0: argmax


def test_context_limits(tmp_path):
    d = make_tiny_llava(tmp_path, max_positions=40)
    model = LLaVA.from_pretrained(d).eval()
    ids = torch.arange(3, 3 + 41) % 500 + 3
    with pytest.raises(ContextLengthError, match="the prompt is 41 tokens, longer than the model's context of 40"):
        list(model.generate(ids, max_new_tokens=5))
    # a prompt of 37 leaves room for 4 new tokens (the last one is never fed), then it stops
    assert len(list(model.generate(ids[:37], max_new_tokens=10, eos_id=None))) == 4
    state = GenerationState()
    list(model.generate(ids[:30], max_new_tokens=3, eos_id=None, state=state))
    with pytest.raises(ContextLengthError, match="the conversation with this message is 44 tokens"):
        list(model.generate(ids[:11], max_new_tokens=3, state=state))
    assert len(state.tokens) == 33 and state.cache.pos == 32  # the failed turn changed nothing
