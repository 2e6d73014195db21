"""llama.py against transformers: the model against LlamaForCausalLM on tiny random checkpoints saved by
transformers; below it, the Tokenizer against transformers' LlamaTokenizer and LlamaTokenizerFast, with legacy=True
(the rule the released LLaVA-1.5 was trained with: "▁" after `</s>`) and legacy=False (today's),
on a tiny sentencepiece BPE model with byte fallback, called the way the official LLaVA pipeline
calls it. transformers 5 reproduces the legacy rule for every text LLaVA's templates make, so it
is the oracle for both modes. (Where it differs from transformers 4.31's slow tokenizer, a piece
right after `</s>` that starts with a space, 4.31 wrote "▁▁"; no template puts a space there.)"""

import functools
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import transformers  # noqa: E402
from transformers import LlamaForCausalLM, LlamaTokenizer, LlamaTokenizerFast  # noqa: E402

import llama  # noqa: E402
from helpers import make_sp_tokenizer  # noqa: E402
from llama import KVCache, Llama, LlamaConfig, StreamDecoder, Tokenizer  # noqa: E402
from weights import WeightsError, read_weights  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB = 300
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, initializer_range=0.1,
            eos_token_id=None, pad_token_id=None)  # no EOS: greedy runs never stop early


def save_hf(directory, dtype=torch.float32, seed=0, max_shard_size=None, **overrides):
    """A random LlamaForCausalLM saved by transformers (config.json + safetensors)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    model = LlamaForCausalLM(config).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return Path(directory)


def hf_model(directory, dtype=torch.float32):
    return LlamaForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def rewrite_config(directory, keep=None, **changes):
    """Rewrite config.json: keep only `keep` keys (a sparse config) and apply `changes`."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    if keep is not None:
        config = {k: v for k, v in config.items() if k in keep}
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    out = {}
    # fp16, GQA (4 query heads over 2 kv heads), sharded through an index
    out["gqa_fp16_sharded"] = save_hf(root / "gqa", torch.float16, seed=1, num_key_value_heads=2,
                                      max_shard_size="40KB")
    # fp32, one file, plain multi-head attention
    out["mha_fp32"] = save_hf(root / "mha", torch.float32, seed=2)
    # a sparse config: only the shape; everything else from the HF defaults (eps 1e-6, theta 1e4)
    out["sparse"] = save_hf(root / "sparse", seed=3, rms_norm_eps=1e-6)
    rewrite_config(out["sparse"], keep={"vocab_size", "hidden_size", "intermediate_size",
                                        "num_hidden_layers", "num_attention_heads"})
    # transformers-4 style: top-level rope_theta (5e5), no rope_parameters, eps 1e-5, GQA 4:1
    out["tf4"] = save_hf(root / "tf4", seed=4, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                         rms_norm_eps=1e-5, num_key_value_heads=1)
    path = out["tf4"] / "config.json"
    config = json.loads(path.read_text())
    config.pop("rope_parameters")
    config["rope_theta"] = 5e5
    config["rope_scaling"] = None
    path.write_text(json.dumps(config))
    # tied embeddings: transformers saves no lm_head.weight
    out["tied"] = save_hf(root / "tied", seed=5, tie_word_embeddings=True)
    return out


def ids(B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (B, T), generator=g)


@pytest.mark.parametrize("name", ["gqa_fp16_sharded", "mha_fp32", "sparse", "tf4", "tied"])
def test_logits_match_transformers(ckpts, name):
    ref = hf_model(ckpts[name])
    ours = Llama.from_pretrained(ckpts[name])
    assert ours.config.num_key_value_heads == ref.config.num_key_value_heads
    assert ours.config.rope_theta == ref.config.rope_parameters["rope_theta"]
    assert ours.config.rms_norm_eps == ref.config.rms_norm_eps
    x = ids()
    with torch.no_grad():
        expected = ref(x).logits
        got = ours(x)
    assert got.dtype == torch.float32
    assert expected.abs().max() > 0.5  # logits of a useful size, so 1e-4 means something
    assert (got - expected).abs().max() < 1e-4


def test_config_parsing(ckpts):
    sparse = LlamaConfig.from_hf(json.loads((ckpts["sparse"] / "config.json").read_text()))
    assert (sparse.rms_norm_eps, sparse.rope_theta, sparse.num_key_value_heads, sparse.head_dim) == (1e-6, 1e4, 4, 16)
    assert sparse.max_position_embeddings == 2048  # transformers' default
    tf4 = LlamaConfig.from_hf(json.loads((ckpts["tf4"] / "config.json").read_text()))
    assert (tf4.rope_theta, tf4.rms_norm_eps, tf4.num_key_value_heads) == (5e5, 1e-5, 1)
    tf5 = LlamaConfig.from_hf({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})
    assert tf5.rope_theta == 5e5 and tf5.hidden_size == 4096 and tf5.num_hidden_layers == 32
    for bad in ({"rope_scaling": {"type": "linear", "factor": 2.0}}, {"hidden_act": "gelu"},
                {"model_type": "mistral"}, {"num_attention_heads": 6, "num_key_value_heads": 4}):
        with pytest.raises(ValueError):
            LlamaConfig.from_hf(bad)


def test_to_hf_is_read_by_transformers(ckpts):
    """model.py saves configs with to_hf(): transformers must build the same model from it."""
    ours = Llama.from_pretrained(ckpts["tf4"])
    d = ours.config.to_hf()
    assert LlamaConfig.from_hf(d) == ours.config
    ref = LlamaForCausalLM(transformers.LlamaConfig(**d)).eval()
    ref.load_state_dict({("lm_head.weight" if k == "lm_head.weight" else "model." + k): v
                         for k, v in ours.state_dict().items()})
    x = ids()
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max() < 1e-4


def test_compiled_elementwise_matches_transformers_and_the_eager_gradients(ckpts):
    """llama.compile_elementwise (train.py's CUDA default): logits still equal transformers', at
    two sequence lengths (the second recompiles with a dynamic shape), gradients equal the eager
    functions', also when activation checkpointing (--grad-ckpt) recomputes each block through
    the compiled functions in backward, and switching off restores the eager functions."""
    ref, m = hf_model(ckpts["tf4"]), Llama.from_pretrained(ckpts["tf4"])  # GQA 4:1, theta 5e5

    def logits_and_grads(x):
        m.zero_grad(set_to_none=True)
        logits = m(x)
        logits.pow(2).mean().backward()
        return logits.detach(), {n: p.grad for n, p in m.named_parameters()}

    xs = [ids(T=12), ids(B=3, T=20, seed=1)]
    eager = [logits_and_grads(x) for x in xs]
    assert llama.compile_elementwise(True) is False
    try:
        assert llama.rms_norm is not llama._EAGER[0] and llama.add_rms_norm is not llama._EAGER[1]
        compiled = [logits_and_grads(x) for x in xs]
        blocks = [block.forward for block in m.layers]
        for block, forward in zip(m.layers, blocks):
            block.forward = functools.partial(torch.utils.checkpoint.checkpoint, forward, use_reentrant=False)
        recomputed = logits_and_grads(xs[0])
        for block, forward in zip(m.layers, blocks):
            block.forward = forward
    finally:
        assert llama.compile_elementwise(False) is True
    assert (llama.rms_norm, llama.add_rms_norm, llama.apply_rope, llama.swiglu) == llama._EAGER
    for x, (logits, grads), (_, eager_grads) in zip(xs, compiled, eager):
        with torch.no_grad():
            assert (logits - ref(x).logits).abs().max() < 1e-4
        for name, g in grads.items():
            torch.testing.assert_close(g, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for name, g in recomputed[1].items():
        torch.testing.assert_close(g, eager[0][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_inputs_embeds_equals_input_ids(ckpts):
    m = Llama.from_pretrained(ckpts["mha_fp32"])
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(m(inputs_embeds=m.embed_tokens(x)), m(x), rtol=0, atol=0)
    with pytest.raises(ValueError):
        m(x, inputs_embeds=m.embed_tokens(x))


@pytest.mark.parametrize("name", ["gqa_fp16_sharded", "mha_fp32"])
def test_kv_cache_prefill_decode_equals_full_forward(ckpts, name):
    m = Llama.from_pretrained(ckpts[name])
    x = ids(T=16)
    with torch.no_grad():
        full = m(x)
        cache = KVCache(m.config, batch_size=2, max_len=32)
        steps = [m(x[:, :10], cache=cache)]                    # prefill
        steps += [m(x[:, t:t + 1], cache=cache) for t in range(10, 13)]  # decode one at a time
        steps.append(m(x[:, 13:16], cache=cache))              # a chunk after cached tokens
    assert cache.pos == 16
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    with pytest.raises(ValueError, match="cannot take"):
        m(ids(T=17), cache=cache)


@pytest.mark.parametrize("name", ["gqa_fp16_sharded", "tf4"])
def test_greedy_matches_transformers_generate(ckpts, name):
    ref = hf_model(ckpts[name])
    m = Llama.from_pretrained(ckpts[name])
    prompt = ids(B=1, T=9, seed=3)
    with torch.no_grad():
        expected = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                do_sample=False)[0, 9:].tolist()
        cache = KVCache(m.config, 1, 32)
        logits, out = m(prompt, cache=cache), []
        for _ in range(8):
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # [1,1]
            out.append(nxt.item())
            logits = m(nxt, cache=cache)
    assert len(expected) == 8
    assert out == expected


def test_left_padded_batch_equals_single_runs(ckpts):
    m = Llama.from_pretrained(ckpts["gqa_fp16_sharded"])
    lengths, T, new = [7, 4, 1], 7, 3
    seqs = [ids(B=1, T=n + new, seed=10 + i)[0] for i, n in enumerate(lengths)]
    with torch.no_grad():
        singles = []
        for s, n in zip(seqs, lengths):  # unpadded: full forward and prefill+decode with a cache
            full = m(s[None])[0]
            cache = KVCache(m.config, 1, 16)
            steps = [m(s[None, :n], cache=cache)[0]] + [m(s[None, t:t + 1], cache=cache)[0] for t in range(n, n + new)]
            torch.testing.assert_close(torch.cat(steps), full, rtol=0, atol=1e-5)
            singles.append(full)
        batch = torch.zeros(len(seqs), T, dtype=torch.long)  # pad id 0, on the left
        mask = torch.zeros(len(seqs), T, dtype=torch.bool)
        for b, (s, n) in enumerate(zip(seqs, lengths)):
            batch[b, T - n:], mask[b, T - n:] = s[:n], True
        cache = KVCache(m.config, len(seqs), 16)
        prefill = m(batch, cache=cache, attn_mask=mask)
        assert torch.isfinite(prefill).all()  # all-padding rows must not turn into NaN
        no_cache = m(batch, attn_mask=mask)
        for t in range(new):
            nxt = torch.stack([s[n + t] for s, n in zip(seqs, lengths)])[:, None]  # [B,1]
            mask = torch.cat([mask, torch.ones(len(seqs), 1, dtype=torch.bool)], 1)
            step = m(nxt, cache=cache, attn_mask=mask)
            for b, n in enumerate(lengths):
                assert (step[b, 0] - singles[b][n + t]).abs().max() < 1e-5
    for b, n in enumerate(lengths):
        assert (prefill[b, T - n:] - singles[b][:n]).abs().max() < 1e-5
        assert (no_cache[b, T - n:] - singles[b][:n]).abs().max() < 1e-5


def test_explicit_3d_mask(ckpts):
    m = Llama.from_pretrained(ckpts["mha_fp32"])
    x = ids(T=8)
    causal = torch.ones(8, 8, dtype=torch.bool).tril().expand(2, 8, 8)
    with torch.no_grad():
        assert (m(x, attn_mask=causal) - m(x)).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load(ckpts, dtype):
    m = Llama.from_pretrained(ckpts["gqa_fp16_sharded"], dtype=dtype)
    assert {p.dtype for p in m.parameters()} == {dtype}
    ref = hf_model(ckpts["gqa_fp16_sharded"], dtype=dtype)
    full = hf_model(ckpts["gqa_fp16_sharded"])
    x = ids()
    with torch.no_grad():
        got, expected, exact = m(x), ref(x).logits, full(x).logits
    assert got.dtype == dtype
    # same operations in the same dtype as transformers: only kernel-order noise remains
    assert (got.float() - expected.float()).abs().max() < 0.02
    assert (got.float() - exact).abs().max() < 0.1


def test_tied_embeddings_are_one_parameter(ckpts):
    m = Llama.from_pretrained(ckpts["tied"], dtype=torch.bfloat16)
    assert m.lm_head.weight is m.embed_tokens.weight
    assert m.lm_head.weight.dtype == torch.bfloat16


def test_key_map(tmp_path):
    keys = ["model.embed_tokens.weight", "model.layers.0.self_attn.rotary_emb.inv_freq", "lm_head.weight",
            "model.norm.weight", "vision.x"]
    save_file({k: torch.zeros(1) for k in keys}, str(tmp_path / "model.safetensors"))
    assert set(read_weights(tmp_path)) == {"llm.embed_tokens.weight", "llm.lm_head.weight", "llm.norm.weight", "vision.x"}


def test_meta_build_keeps_no_stray_meta_tensors(ckpts):
    m = Llama.from_pretrained(ckpts["mha_fp32"])
    assert not any(t.is_meta for t in list(m.parameters()) + list(m.buffers()))


# ---- clear errors -------------------------------------------------------------------------------

def test_missing_config(tmp_path):
    save_file({"model.norm.weight": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="config.json"):
        Llama.from_pretrained(tmp_path)


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="config.json.*not valid JSON"):
        Llama.from_pretrained(tmp_path)


def test_unsupported_config_names_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "gelu"}))
    with pytest.raises(WeightsError, match="config.json.*hidden_act"):
        Llama.from_pretrained(tmp_path)


def test_missing_weights(ckpts, tmp_path):
    (tmp_path / "config.json").write_text((ckpts["mha_fp32"] / "config.json").read_text())
    with pytest.raises(WeightsError, match="model.safetensors"):
        Llama.from_pretrained(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(WeightsError, match="nothere"):
        Llama.from_pretrained(tmp_path / "nothere")


def _copy_with_state(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_missing_key_is_named(ckpts, tmp_path):
    d = _copy_with_state(ckpts["mha_fp32"], tmp_path / "c", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing keys: layers\.1\.mlp\.up_proj\.weight"):
        Llama.from_pretrained(d)


def test_unexpected_key_is_named(ckpts, tmp_path):
    def edit(s):
        s["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    d = _copy_with_state(ckpts["mha_fp32"], tmp_path / "c", edit)
    with pytest.raises(WeightsError, match=r"unexpected keys: layers\.0\.self_attn\.q_proj\.bias"):
        Llama.from_pretrained(d)


def test_wrong_shape_is_named(ckpts, tmp_path):
    def edit(s):
        s["model.norm.weight"] = torch.ones(65)
    d = _copy_with_state(ckpts["mha_fp32"], tmp_path / "c", edit)
    with pytest.raises(WeightsError, match=r"norm\.weight \(expected \[64\], found \[65\]\)"):
        Llama.from_pretrained(d)


def test_missing_tokenizer_model(tmp_path):
    with pytest.raises(WeightsError, match="tokenizer.model"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(WeightsError, match="not a sentencepiece model"):
        Tokenizer(tmp_path)


# ------------------------------------------------------------------------------------------------
# The sentencepiece Tokenizer

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")


def vicuna(turns, image=True):
    """The vicuna_v1 template of DESIGN.md."""
    text = SYSTEM + " "
    for i, (q, a) in enumerate(turns):
        if i == 0 and image:
            q = "<image>\n" + q
        text += "USER: " + q + " " + "ASSISTANT:"
        text += (" " + a + "</s>") if a is not None else ""  # None: the generation prompt
    return text


PROMPTS = [
    vicuna([("What is in the picture?", "A small red boat on a calm lake."),
            ("How many people are there?", "There are 3 people."),
            ("And the weather?", "Sunny, with clear skies.")]),
    vicuna([("Describe the image in detail.", "A man rides a bicycle.\n\nHe wears a helmet.")], image=False),
    vicuna([("What is this?", "It is a cat."), ("Color?", None)]),  # a generation prompt, ends "ASSISTANT:"
    "<image>\nA dog sleeps in the warm sun.\n",  # the `plain` (stage 1) template
    "Café naïve — “quotes” 😀 🎉 中文字符 한국어 Ωμέγα ✓ ½",
    "  two leading spaces",
    " one leading space",
    "\nstarts with a newline\n\nand has blank lines\n",
    "def f(x):\n    return x  # indented\n        deeper",
    "trailing spaces   ",
    "a1</s>USER: q2",
    "a1</s> USER with a space after eos",
    "</s>starts with eos",
    "ends with eos</s>",
    "</s></s>two eos",
    "<image>",
    "<image><image>\n",
    "text <image> middle <image>",
    "",
    " ",
    "\n",
    "▁literal metaspace ▁x",
    "Numbers 1234567890 and 3.14159, dates 2023-10-05.",
    "tabs\tand\rcarriage returns",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_sp_tokenizer(d, vocab_size=512)
    return d


@pytest.fixture(scope="module", params=[False, True], ids=["legacy=False", "legacy=True"])
def legacy(request):
    return request.param


@pytest.fixture(scope="module")
def ours(tok_dir, legacy):
    return Tokenizer(tok_dir, legacy=legacy)


@pytest.fixture(scope="module", params=["LlamaTokenizer", "LlamaTokenizerFast"])
def hf(request, tok_dir, legacy):
    cls = {"LlamaTokenizer": LlamaTokenizer, "LlamaTokenizerFast": LlamaTokenizerFast}[request.param]
    return cls.from_pretrained(str(tok_dir), legacy=legacy, add_bos_token=True)


def llava_reference(hf, text, image_token_id):
    """The official pipeline (tokenizer_image_token): split on <image>, tokenize each chunk as its
    own call, keep the first chunk's BOS only, one image id between chunks."""
    chunks = [hf(chunk).input_ids for chunk in text.split("<image>")]
    assert all(c[:1] == [hf.bos_token_id] for c in chunks)
    ids = [hf.bos_token_id]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(image_token_id)
        ids += chunk[1:]
    return ids


def test_special_ids(ours, tok_dir):
    assert (ours.unk_id, ours.bos_id, ours.eos_id) == (0, 1, 2)
    n = ours.sp.vocab_size()
    assert (ours.image_token_id, ours.pad_id, ours.vocab_size) == (n, n + 1, n + 2)
    assert Tokenizer(tok_dir / "tokenizer.model").image_token_id == n  # a file path works too


def test_added_tokens_from_tokenizer_config_only(tmp_path):
    make_sp_tokenizer(tmp_path)
    (tmp_path / "added_tokens.json").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    decoder["700"], decoder["701"] = decoder.pop("512"), decoder.pop("513")  # <image>, <pad>
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    t = Tokenizer(tmp_path)
    assert (t.image_token_id, t.pad_id, t.vocab_size) == (700, 701, 702)


@pytest.mark.parametrize("text", PROMPTS)
def test_ids_match_transformers_per_chunk(ours, hf, text):
    expected = llava_reference(hf, text, ours.image_token_id)
    assert ours.encode(text) == expected
    assert ours.encode(text, bos=False) == expected[1:]


def test_vicuna_turns_after_eos_start_with_a_space_only_in_legacy_mode(ours, legacy):
    ids = ours.encode(PROMPTS[0])
    eos_at = [i for i, t in enumerate(ids) if t == ours.eos_id]
    assert len(eos_at) == 3
    for k in eos_at[:2]:  # "▁USER" after </s> with legacy=True, "USER" with legacy=False
        assert ours.sp.id_to_piece(ids[k + 1]).startswith("▁") == legacy
    assert ids.count(ours.image_token_id) == 1 and ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1


def test_legacy_comes_from_tokenizer_config(tmp_path):
    """The checkpoint says how it was trained; a config that does not say is legacy (transformers
    4.31's default, the release's), where transformers 5 would assume False."""
    make_sp_tokenizer(tmp_path)
    path = tmp_path / "tokenizer_config.json"
    config = json.loads(path.read_text())
    assert config["legacy"] is False and Tokenizer(tmp_path).legacy is False
    for value, expected in ((True, True), (None, True)):
        if value is None:
            del config["legacy"]
        else:
            config["legacy"] = value
        path.write_text(json.dumps(config))
        assert Tokenizer(tmp_path).legacy is expected and Tokenizer(tmp_path / "tokenizer.model").legacy is expected
    assert Tokenizer(tmp_path, legacy=False).legacy is False  # an explicit choice wins
    path.unlink()
    assert Tokenizer(tmp_path).legacy is True


def test_byte_fallback_used(ours):
    pieces = [ours.sp.id_to_piece(i) for i in ours.encode("中😀", bos=False)]
    assert sum(ours.sp.is_byte(i) for i in ours.encode("中😀", bos=False)) == 7, pieces


@pytest.mark.parametrize("text", PROMPTS)
def test_decode_matches_transformers(ours, hf, text):
    ids = ours.encode(text)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", [p for p in PROMPTS if "<image>" not in p and "</s>" not in p
                                  and not p.startswith(" ") and "▁" not in p])
def test_decode_round_trip(ours, text):
    assert ours.decode(ours.encode(text)) == text


def test_decode_drops_special_and_out_of_range_ids(ours):
    hello = ours.encode("hello there", bos=False)
    noisy = [ours.bos_id] + hello[:2] + [ours.image_token_id, ours.pad_id, ours.eos_id, ours.unk_id,
                                         ours.vocab_size + 50] + hello[2:] + [ours.eos_id]
    assert ours.decode(noisy) == "hello there"


def test_stream_never_splits_a_character(ours):
    text = "Emoji 😀 and 中文, then 🎉🎉 done ½"
    ids = ours.encode(text, bos=False)
    stream = StreamDecoder(ours)
    pieces = []
    for i in ids:
        piece = stream.push(i)
        assert "\ufffd" not in piece
        pieces.append(piece)
    pieces.append(stream.flush())
    assert "".join(pieces) == text == ours.decode(ids)
    # the 4 bytes of 😀 arrive as 4 byte-fallback ids: nothing shows until the last one
    emoji = [i for i in ours.encode("😀", bos=False) if ours.sp.is_byte(i)]
    assert len(emoji) == 4
    s = StreamDecoder(ours)
    assert [s.push(i) for i in emoji] == ["", "", "", "😀"]
    assert list(ours.decode_stream(ids)) == [p for p in pieces if p]


def test_stream_incomplete_character_at_end(ours):
    emoji = [i for i in ours.encode("😀", bos=False) if ours.sp.is_byte(i)]
    s = StreamDecoder(ours)
    assert [s.push(i) for i in emoji[:2]] == ["", ""]
    assert s.flush() == "\ufffd"


QA90 = Path(__file__).resolve().parent / "fixtures" / "llava_bench_qa90"  # LLaVA-Bench (COCO), as published


@pytest.mark.skipif(not QA90.is_dir(), reason="tests/fixtures/llava_bench_qa90 not present")
def test_real_llava_bench_text(ours, tok_dir):
    """Every question and GPT-4 answer of LLaVA-Bench (COCO) in a vicuna prompt, with an image."""
    hf = LlamaTokenizer.from_pretrained(str(tok_dir), legacy=ours.legacy, add_bos_token=True)
    questions = [json.loads(line)["text"] for line in open(QA90 / "qa90_questions.jsonl")]
    answers = [json.loads(line)["text"] for line in open(QA90 / "qa90_gpt4_answer.jsonl")]
    for q, a in zip(questions, answers):
        text = vicuna([(q, a), (q, a)])
        ids = ours.encode(text)
        assert ids == llava_reference(hf, text, ours.image_token_id)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
