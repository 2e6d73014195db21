"""LLaVA.generate against transformers' LlavaForConditionalGeneration.generate and against our own
full-recompute decoding, on tiny random llava-hf checkpoints written by transformers (CLIP + a GQA
Llama + a sentencepiece tokenizer): KV cache, follow-up turns, left-padded batches, sampling."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import LlavaForConditionalGeneration  # noqa: E402

import clip  # noqa: E402
from helpers import make_sp_tokenizer  # noqa: E402
from llama import Tokenizer  # noqa: E402
from model import LLaVA, ContextLengthError, GenerationState, sample_next, top_p_filter  # noqa: E402

transformers.logging.set_verbosity_error()


def make_tiny_llava(directory, seed=0, image_size=56, max_positions=1024, **text_overrides):
    """A random LlavaForConditionalGeneration (tiny CLIP 56px/14 -> 16 patches, Llama with 4 query
    heads over 2 kv heads) saved by transformers, with a LLaMA-style sentencepiece tokenizer
    (<image> = 512, <pad> = 513, vocabulary padded to 576 as llava-hf pads to 32064)."""
    directory = Path(directory)
    make_sp_tokenizer(directory)  # 512 pieces
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=image_size, patch_size=14)
    text = transformers.LlamaConfig(**{
        "vocab_size": 576, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": max_positions,
        "initializer_range": 0.1, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 513,
        **text_overrides})
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=512,
                                      pad_token_id=513, projector_hidden_act="gelu",
                                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                                      image_seq_length=(image_size // 14) ** 2)
    LlavaForConditionalGeneration(config).eval().save_pretrained(directory)
    return directory


def photo(seed=0, size=(64, 48)):
    """A small deterministic RGB picture (not square, so pad-to-square matters)."""
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


def prompt_ids(tok, model, question, image=True):
    """Token ids of a vicuna_v1 first turn with the <image> id expanded to one id per patch."""
    text = ("A chat between a curious user and an artificial intelligence assistant. "
            f"USER: {'<image>' + chr(10) if image else ''}{question} ASSISTANT:")
    ids = []
    for i in tok.encode(text):
        ids += [i] * model.config.num_patches if i == tok.image_token_id else [i]
    return ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny_llava(tmp_path_factory.mktemp("llava"))
    model = LLaVA.from_pretrained(d).eval()
    hf = LlavaForConditionalGeneration.from_pretrained(d).eval()
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
