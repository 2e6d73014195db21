"""llama.Tokenizer against transformers' LlamaTokenizer and LlamaTokenizerFast, with legacy=True
(the rule the released LLaVA-1.5 was trained with: "▁" after `</s>`) and legacy=False (today's),
on a tiny sentencepiece BPE model with byte fallback, called the way the official LLaVA pipeline
calls it. transformers 5 reproduces the legacy rule for every text LLaVA's templates make, so it
is the oracle for both modes. (Where it differs from transformers 4.31's slow tokenizer, a piece
right after `</s>` that starts with a space, 4.31 wrote "▁▁"; no template puts a space there.)"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import transformers  # noqa: E402
from transformers import LlamaTokenizer, LlamaTokenizerFast  # noqa: E402

from helpers import make_sp_tokenizer  # noqa: E402
from llama import StreamDecoder, Tokenizer  # noqa: E402

transformers.logging.set_verbosity_error()

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
