"""data.py: templates, one-tokenization labels, truncation, bad samples, collation, the synthetic
world and the ScienceQA conversion. transformers' LlamaTokenizer is the oracle for ids; labels
are checked by spelling out the supervised tokens with transformers' own pieces."""

import io
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
import llama
from tests.helpers import batches, make_sp_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
BENCH = FIXTURES / "generate_data" / "coco2014_val_gpt4_qa_30x3.jsonl"  # LLaVA-Bench (COCO): see its README
SQA = FIXTURES / "scienceqa"


# ---- fixtures -----------------------------------------------------------------------------------

def bench_records():
    """The 90 real GPT-4 samples as 30 three-turn LLaVA records (conv, detail, complex). The image
    placeholder goes first, last, or nowhere (a text-only record), as in the published data."""
    rows = [json.loads(line) for line in BENCH.read_text().splitlines() if line.strip()]
    by_image = {}
    for r in rows:
        by_image.setdefault(r["id"], []).append(r)
    records = []
    for k, (rid, qa) in enumerate(by_image.items()):
        turns = []
        for r in qa:
            turns += [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["output"]}]
        record = {"id": rid, "conversations": turns}
        if k % 3 == 0:
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
        elif k % 3 == 1:
            turns[0]["value"] = turns[0]["value"] + "\n<image>"
        if k % 3 != 2:
            record["image"] = qa[0]["image"]
        records.append(record)
    return records


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    rows = [json.loads(line) for line in BENCH.read_text().splitlines() if line.strip()]
    corpus = "\n".join([data.VICUNA_SYSTEM, data.LLAMA_2_SYSTEM, "USER: ASSISTANT: [INST] [/INST] <<SYS>>"]
                       + [r["instruction"] for r in rows] + [r["output"] for r in rows])
    d = tmp_path_factory.mktemp("tok")
    make_sp_tokenizer(d, vocab_size=1000, text=corpus)
    return d


@pytest.fixture(scope="module")
def tok(tokdir):
    return llama.Tokenizer(tokdir)


@pytest.fixture(scope="module")
def hf(tokdir):
    from transformers import LlamaTokenizer
    return LlamaTokenizer.from_pretrained(str(tokdir), legacy=False, add_bos_token=True)


def hf_ids(hf, text, image_id):
    """The official pipeline's ids (tokenizer_image_token): split on <image>, each chunk its own
    tokenizer call, BOS once, one image id between chunks."""
    ids = [hf.bos_token_id]
    for k, chunk in enumerate(text.split("<image>")):
        if k:
            ids.append(image_id)
        ids += hf(chunk, add_special_tokens=False).input_ids
    return ids


def hf_bytes(hf, i, image_id):
    if i == image_id:
        return b"<image>"
    piece = hf.convert_ids_to_tokens(i)
    m = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
    return bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()


def supervised_runs(hf, ids, labels, image_id):
    """The text of each maximal run of supervised tokens, spelled with transformers' pieces."""
    runs, cur = [], None
    for i, l in zip(ids, labels):
        if l == data.IGNORE_INDEX:
            cur = None
            continue
        assert l == i
        if cur is None:
            cur = bytearray()
            runs.append(cur)
        cur += hf_bytes(hf, i, image_id)
    return [bytes(r).decode() for r in runs]


def replies(record):
    return [t["value"] for t in record["conversations"] if t["from"] == "gpt"]


# ---- templates ----------------------------------------------------------------------------------

TWO_TURNS = [{"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A red boat."},
             {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "On a lake."}]


def test_vicuna_v1_string():
    text, spans = data.render_conversation(TWO_TURNS, "vicuna_v1", has_image=True)
    assert text == ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                    "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is "
                    "this? ASSISTANT: A red boat.</s>USER: Where is it? ASSISTANT: On a lake.</s>")
    assert [text[s:e] for s, e in spans] == [" A red boat.</s>", " On a lake.</s>"]  # from after the ":"
    assert data.prompt_for_generation(TWO_TURNS[:3], "vicuna_v1", has_image=True) == text[: text.index(" On a lake")]
    assert data.prompt_for_generation(["Hi"], "vicuna_v1").endswith("questions. USER: Hi ASSISTANT:")
    assert data.prompt_for_generation(["Hi"], "vicuna_v1", has_image=True).endswith("USER: <image>\nHi ASSISTANT:")


def test_llava_llama_2_string():
    text, spans = data.render_conversation(TWO_TURNS, "llava_llama_2", has_image=True)
    assert text == ("[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand "
                    "the visual content that the user provides, and assist the user with a variety of tasks using "
                    "natural language.\n<</SYS>>\n\n<image>\nWhat is this? [/INST] A red boat. </s><s>[INST] Where "
                    "is it? [/INST] On a lake. </s>")
    assert [text[s:e] for s, e in spans] == [" A red boat. </s>", " On a lake. </s>"]
    assert data.prompt_for_generation(TWO_TURNS[:3], "llava_llama_2", True).endswith("</s><s>[INST] Where is it? [/INST]")
    assert data.TEMPLATES["llava_llama_2"].stop == data.TEMPLATES["vicuna_v1"].stop == "</s>"


def test_plain_string():
    conv = [{"from": "human", "value": "Describe the image briefly.\n<image>"}, {"from": "gpt", "value": "a red circle."}]
    text, spans = data.render_conversation(conv, "plain", has_image=True)
    assert text == "<image>a red circle.\n" and [text[s:e] for s, e in spans] == ["a red circle.\n"]
    assert data.prompt_for_generation(["anything"], "plain", has_image=True) == "<image>"
    assert data.TEMPLATES["plain"].stop == "\n"
    with pytest.raises(data.BadSample, match="pairs") as e:
        data.render_conversation(TWO_TURNS, "plain", has_image=True)
    assert e.value.reason == "not_plain_pair"


@pytest.mark.parametrize("value, first", [
    ("What is it?\n<image>", "<image>\nWhat is it?"),
    ("<image>\nWhat is it?", "<image>\nWhat is it?"),
    ("What <image> is it? ", "<image>\nWhat  is it?"),
    ("<image>", "<image>"),
])
def test_image_placeholder_moves_to_front(value, first):
    text, _ = data.render_conversation([{"from": "human", "value": value}, {"from": "gpt", "value": "x"}],
                                       "vicuna_v1", has_image=True)
    assert text.split(" USER: ")[1].startswith(first + " ASSISTANT:")


def test_placeholder_in_later_question_moves_to_first():
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "A dog."}]
    text, _ = data.render_conversation(conv, "vicuna_v1", has_image=True)
    assert "USER: <image>\nHi ASSISTANT: Hello</s>USER: And this? ASSISTANT:" in text


# ---- tokenization against transformers --------------------------------------------------------

@pytest.mark.parametrize("template", ["vicuna_v1", "llava_llama_2"])
def test_real_records_ids_and_labels(tok, hf, template):
    """Token by token on 30 real three-turn records: ids equal the official per-chunk transformers
    tokenization, and the supervised tokens spell exactly the replies and their closing text."""
    close = {"vicuna_v1": "</s>", "llava_llama_2": " </s>"}[template]
    for record in bench_records():
        has_image = "image" in record
        ids, labels = data.tokenize_conversation(record["conversations"], tok, template, has_image=has_image)
        text, _ = data.render_conversation(record["conversations"], template, has_image)
        assert ids == hf_ids(hf, text, tok.image_token_id), record["id"]
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == (1 if template == "vicuna_v1" else 3)
        assert ids.count(tok.image_token_id) == int(has_image)
        runs = supervised_runs(hf, ids, labels, tok.image_token_id)
        assert len(runs) == 3
        for run, reply in zip(runs, replies(record)):
            assert run == " " + reply + close, (record["id"], run[:60], reply[:60])


def test_tricky_text_matches_transformers(tok, hf):
    """Byte fallback (accents, CJK, emoji), newlines, digits, double spaces, a reply starting with
    a quote or a space, an empty reply, text looking like a tag."""
    conv = [{"from": "human", "value": "Café ’ 日本 🙂?\n\n<image>"}, {"from": "gpt", "value": "\"Yes\" — 42  times.\nOK"},
            {"from": "human", "value": " leading space, <b>tag</b>"}, {"from": "gpt", "value": " spaced"},
            {"from": "human", "value": "empty?"}, {"from": "gpt", "value": ""}]
    for template in ["vicuna_v1", "llava_llama_2"]:
        close = {"vicuna_v1": "</s>", "llava_llama_2": " </s>"}[template]
        ids, labels = data.tokenize_conversation(conv, tok, template, has_image=True)
        text, _ = data.render_conversation(conv, template, True)
        assert ids == hf_ids(hf, text, tok.image_token_id)
        runs = supervised_runs(hf, ids, labels, tok.image_token_id)
        for run, reply in zip(runs, replies({"conversations": conv})):
            assert run == " " + reply + close
        assert len(runs) == 3


# Replies whose first character does not merge with the space before it, so that space is a
# token of its own, a lone "▁": a digit (LLaMA splits digits, so " 2" is "▁", "2"), an emoji and
# CJK (byte fallback), a newline, and a reply that starts with a space.
LONE_SPACE_REPLIES = ["2 cats are on the sofa.", "😀 a smiling face", "日本 means Japan.", "\nA list follows.",
                      " A reply with a leading space."]
QUESTION = "<image>\nWhat is it?"


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_llama_2", "plain"])
@pytest.mark.parametrize("reply", LONE_SPACE_REPLIES)
def test_the_space_before_a_reply_is_learned_as_officially(tok, hf, template, reply):
    """The official preprocess_v1 / preprocess_llama_2 / preprocess_plain mask the instruction by
    counting the tokens of "... ASSISTANT: " minus BOS and the trailing lone "▁" (plain: BOS and
    the image), so every token after the role's ":" (after "[/INST]", after the image) is a
    target, the lone "▁" included. Built by hand here: the prompt's tokens masked, every later
    token its own label."""
    prompt = {"vicuna_v1": data.VICUNA_SYSTEM + " USER: " + QUESTION + " ASSISTANT:",
              "llava_llama_2": f"[INST] <<SYS>>\n{data.LLAMA_2_SYSTEM}\n<</SYS>>\n\n{QUESTION} [/INST]",
              "plain": "<image>"}[template]
    text = prompt + {"vicuna_v1": f" {reply}</s>", "llava_llama_2": f" {reply} </s>", "plain": f"{reply}\n"}[template]
    conv = [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": reply}]
    ids, labels = data.tokenize_conversation(conv, tok, template, has_image=True)
    expected_ids, n = hf_ids(hf, text, tok.image_token_id), len(hf_ids(hf, prompt, tok.image_token_id))
    assert ids == expected_ids
    assert labels == [data.IGNORE_INDEX] * n + expected_ids[n:]
    if template != "plain" and not reply.startswith(" "):
        assert hf.convert_ids_to_tokens(ids[n]) == "\u2581"  # the case in point: a lone "▁" is learned


def official_v1_labels(hf, text, image_id):
    """The official preprocess_v1's masking, step for step, on a rendered vicuna_v1 sample: split
    into rounds at "</s>", mask each round's instruction ("... ASSISTANT: " minus BOS and the
    trailing "▁") by counting the tokens of the round and of the instruction tokenized alone.
    Written for a legacy tokenizer, where a round tokenized alone ("▁USER ...") has the ids it
    has in context (the official code's `not tokenizer.legacy` correction does not apply)."""
    ids = hf_ids(hf, text, image_id)
    target, cur, sep = list(ids), 1, " ASSISTANT: "
    target[:1] = [data.IGNORE_INDEX]
    for rou in text.split("</s>"):
        if rou == "":
            break
        instruction, reply = rou.split(sep)
        round_len = len(hf_ids(hf, rou, image_id))
        instruction_len = len(hf_ids(hf, instruction + sep, image_id)) - 2
        target[cur:cur + instruction_len] = [data.IGNORE_INDEX] * instruction_len
        cur += round_len
    target[cur:] = [data.IGNORE_INDEX] * (len(target) - cur)
    assert cur == len(ids), "tokenization mismatch"
    return ids, target


def test_multi_turn_labels_equal_the_official_preprocess_v1(tokdir):
    """The 30 real three-turn LLaVA-Bench records, tokenized as the released LLaVA-1.5 was
    trained (legacy: "▁USER" after "</s>"): ids and labels equal the official rule's."""
    from transformers import LlamaTokenizer
    legacy = llama.Tokenizer(tokdir, legacy=True)
    hf_legacy = LlamaTokenizer.from_pretrained(str(tokdir), legacy=True, add_bos_token=True)
    for record in bench_records():
        has_image = "image" in record
        for conv in (record["conversations"], record["conversations"][:2]):
            text, _ = data.render_conversation(conv, "vicuna_v1", has_image)
            ids, labels = data.tokenize_conversation(conv, legacy, "vicuna_v1", has_image=has_image)
            assert (ids, labels) == official_v1_labels(hf_legacy, text, legacy.image_token_id), record["id"]
    ids, _ = data.tokenize_conversation(record["conversations"], legacy, "vicuna_v1", has_image=has_image)
    assert hf_legacy.convert_ids_to_tokens(ids[ids.index(legacy.eos_id) + 1]).startswith("\u2581")  # "▁USER"


def test_literal_metaspace_in_text(tok, hf):
    """U+2581 ("▁") in a record is read by sentencepiece as a space: the ids are the official
    ones and the labels still cover exactly the reply."""
    conv = [{"from": "human", "value": "<image>\nWhat does \u2581 mean?"},
            {"from": "gpt", "value": "\u2581 is sentencepiece's space: \u2581\u2581x and a\u2581b."}]
    for template in ["vicuna_v1", "llava_llama_2"]:
        close = {"vicuna_v1": "</s>", "llava_llama_2": " </s>"}[template]
        ids, labels = data.tokenize_conversation(conv, tok, template, has_image=True)
        text, _ = data.render_conversation(conv, template, True)
        assert ids == hf_ids(hf, text, tok.image_token_id)
        assert supervised_runs(hf, ids, labels, tok.image_token_id) == [" " + conv[1]["value"].replace("\u2581", " ") + close]


def test_plain_stage1_tokens(tok, hf):
    for record in bench_records()[:12]:
        caption = record["conversations"][1]["value"]
        conv = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": caption}]
        ids, labels = data.tokenize_conversation(conv, tok, "plain", has_image=True)
        assert ids[:2] == [tok.bos_id, tok.image_token_id]
        assert ids[2:] == hf(caption + "\n", add_special_tokens=False).input_ids  # [BOS] <image> caption "\n"
        assert labels[:2] == [-100, -100] and labels[2:] == ids[2:]
        assert tok.decode(ids[2:]) == caption + "\n"
        assert tok.eos_id not in ids


def test_text_only_sample(tok, hf):
    conv = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]
    ids, labels = data.tokenize_conversation(conv, tok, "vicuna_v1", num_patches=9, has_image=False)
    assert tok.image_token_id not in ids
    assert supervised_runs(hf, ids, labels, tok.image_token_id) == [" Blue.</s>"]


def test_image_expansion_and_truncation(tok):
    conv = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A red boat on a calm lake."}]
    one, lab1 = data.tokenize_conversation(conv, tok, "vicuna_v1", num_patches=0, has_image=True)
    ids, labels = data.tokenize_conversation(conv, tok, "vicuna_v1", num_patches=7, has_image=True)
    k = one.index(tok.image_token_id)
    assert ids == one[:k] + [tok.image_token_id] * 7 + one[k + 1:]
    assert labels == lab1[:k] + [-100] * 7 + lab1[k + 1:]
    n = len(ids)
    first_label = next(p for p, l in enumerate(labels) if l != -100)
    # cut inside the reply: kept, shorter
    cut, cut_labels = data.tokenize_conversation(conv, tok, "vicuna_v1", 7, True, max_length=first_label + 2)
    assert cut == ids[: first_label + 2] and cut_labels == labels[: first_label + 2]
    # cut after the image but before any reply token: nothing to learn
    with pytest.raises(data.BadSample) as e:
        data.tokenize_conversation(conv, tok, "vicuna_v1", 7, True, max_length=first_label)
    assert e.value.reason == "nothing_to_learn"
    # cut through the image, and just before it: never
    for m in (k + 3, k + 6, k):
        with pytest.raises(data.BadSample) as e:
            data.tokenize_conversation(conv, tok, "vicuna_v1", 7, True, max_length=m)
        assert e.value.reason == "image_too_long", m
    # the image exactly fits: the sample is cut after it
    with pytest.raises(data.BadSample) as e:
        data.tokenize_conversation(conv, tok, "vicuna_v1", 7, True, max_length=k + 7)
    assert e.value.reason == "nothing_to_learn"
    assert len(data.tokenize_conversation(conv, tok, "vicuna_v1", 7, True, max_length=n)[0]) == n


def test_tokenize_prompt_matches_training_prefix(tok):
    conv = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A boat."}]
    ids, labels = data.tokenize_conversation(conv, tok, "vicuna_v1", num_patches=4, has_image=True)
    prompt = data.tokenize_prompt(["What is this?"], tok, "vicuna_v1", has_image=True, num_patches=4)
    first = next(p for p, l in enumerate(labels) if l != -100)
    assert ids[:first] == prompt  # the model sees at generation exactly what preceded the reply


# ---- the dataset: bad samples with workers ------------------------------------------------------

def _png(path, color=(200, 30, 30), size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _bad_sample_records(folder):
    _png(folder / "good.png")
    _png(folder / "good2.jpg", (20, 200, 20), (16, 24))
    (folder / "garbage.png").write_bytes(b"this is not an image at all")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    q = lambda v: {"from": "human", "value": v}
    a = lambda v: {"from": "gpt", "value": v}
    return [
        {"id": "good-image", "image": "good.png", "conversations": [q("<image>\nWhat?"), a("Red."), q("Sure?"), a("Yes.")]},
        {"id": "good-text", "conversations": [q("Say hi."), a("Hi.")]},
        {"id": "missing", "image": "nowhere.png", "conversations": [q("<image>\nWhat?"), a("Red.")]},
        {"id": "garbage", "image": "garbage.png", "conversations": [q("<image>\nWhat?"), a("Red.")]},
        {"id": "truncated", "image": "truncated.png", "conversations": [q("<image>\nWhat?"), a("Red.")]},
        {"id": "no-reply", "image": "good.png", "conversations": [q("<image>\nWhat?")]},
        {"id": "human-twice", "conversations": [q("One."), q("Two."), a("Three.")]},
        "a string, not a record",
        {"id": "no-conversations", "image": "good.png"},
        {"id": "placeholder-no-image", "conversations": [q("<image>\nWhat?"), a("Red.")]},
        {"id": "image-no-placeholder", "image": "good.png", "conversations": [q("What?"), a("Red.")]},
        {"id": "two-placeholders", "image": "good.png", "conversations": [q("<image> and <image>"), a("Red.")]},
        {"id": "placeholder-in-reply", "image": "good.png", "conversations": [q("<image>"), a("<image> red")]},
        {"id": "too-long-to-learn", "image": "good.png", "conversations": [q("<image>\n" + "word " * 400), a("Red.")]},
        {"id": "bad-turn", "conversations": [q("Hi"), {"from": "robot", "value": "beep"}]},
        {"id": "good-image-2", "image": "good2.jpg", "conversations": [q("Colour?\n<image>"), a("Green.")]},
        {"id": "good-text-2", "conversations": [{"from": "gpt", "value": "(dropped lead)"}, q("Bye."), a("Bye.")]},
    ]


EXPECTED_SKIPS = {"missing_image": 1, "corrupt_image": 2, "no_reply": 1, "roles_not_alternating": 1,
                  "unreadable_record": 3, "placeholder_without_image": 1, "image_without_placeholder": 1,
                  "too_many_placeholders": 1, "placeholder_in_reply": 1, "nothing_to_learn": 1}
GOOD = {"good-image", "good-text", "good-image-2", "good-text-2"}


def test_bad_samples_skipped_named_counted_with_workers(tok, tmp_path, capsys):
    records = _bad_sample_records(tmp_path / "img")
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    ds = data.LazySupervisedDataset(path, tmp_path / "img", tok, "vicuna_v1", image_size=32, num_patches=4,
                                    max_length=200)
    for epoch in range(2):
        seen = []
        for batch in batches(ds, 3, num_workers=2, shuffle=True, seed=epoch):
            seen += batch["ids"]
            B, T = batch["input_ids"].shape
            assert batch["labels"].shape == (B, T) and B >= 1
            rows = [r for r, i in enumerate(batch["ids"]) if i.startswith("good-image")]
            assert batch["pixel_values"] is None if not rows else batch["pixel_values"].shape == (len(rows), 3, 32, 32)
            n_img = (batch["input_ids"] == tok.image_token_id).sum(1).tolist()
            assert n_img == [4 if r in rows else 0 for r in range(B)]
        assert sorted(seen) == sorted(GOOD)
    assert ds.skips.counts() == EXPECTED_SKIPS
    assert ds.skips.events == 2 * sum(EXPECTED_SKIPS.values())
    err = capsys.readouterr().err
    for k, r in enumerate(records):
        if not (isinstance(r, dict) and r.get("id") in GOOD):
            rid = r.get("id") if isinstance(r, dict) else None
            assert f"skipped record {k} (id {rid!r})" in err, k
    assert "nowhere.png" in err and "garbage.png" in err
    summary = ds.skips.summary(len(ds))
    assert summary.startswith(f"data: skipped 13 of {len(records)} records")
    for reason, n in EXPECTED_SKIPS.items():
        assert f"{reason} {n}" in summary


def test_a_record_that_raises_anything_is_a_counted_bad_sample(tok, tmp_path, capsys):
    """A JSON escape of half a surrogate pair ("\\ud83d" without its partner) is valid JSON and
    makes sentencepiece raise a RuntimeError: that record is skipped and named, the rest train."""
    path = tmp_path / "train.json"
    path.write_text('[{"id": "ok", "conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]},'
                    ' {"id": "half-emoji", "conversations": [{"from": "human", "value": "Hi \\ud83d"},'
                    ' {"from": "gpt", "value": "Hello."}]}]')
    ds = data.LazySupervisedDataset(path, tmp_path, tok, "vicuna_v1", image_size=32, num_patches=4)
    assert [b["ids"] for b in batches(ds, 2, num_workers=2)] == [["ok"]]
    assert ds.skips.counts() == {"error": 1}
    assert "skipped record 1 (id 'half-emoji'): error: RuntimeError" in capsys.readouterr().err


def test_image_too_long_skipped(tok, tmp_path):
    """The image sits right after the system prompt, so 'too long for the image' is a property of
    max_length and num_patches: a dataset where images cannot fit still trains its text-only
    samples."""
    _png(tmp_path / "a.png")
    records = [{"id": "img", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                  {"from": "gpt", "value": "Red."}]},
               {"id": "txt", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}]
    ds = data.LazySupervisedDataset(records, tmp_path, tok, "vicuna_v1", image_size=16, num_patches=200, max_length=150)
    assert [b["ids"] for b in batches(ds, 2)] == [["txt"]]
    assert ds.skips.counts() == {"image_too_long": 1}


def test_dataset_reads_jsonl_and_names_a_bad_json(tok, tmp_path):
    records = _bad_sample_records(tmp_path / "img")
    lines = [json.dumps(r) for r in records[:3]] + ["{not json"]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    ds = data.LazySupervisedDataset(tmp_path / "d.jsonl", tmp_path / "img", tok, "vicuna_v1", 32, 4)
    assert len(ds) == 4 and ds[3].reason == "unreadable_record" and not ds[3]
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="bad.json"):
        data.LazySupervisedDataset(bad, tmp_path, tok, "vicuna_v1", 32, 4)


def test_collate_padding():
    s = lambda ids, img: {"input_ids": torch.tensor(ids), "labels": torch.tensor([-100] + ids[1:]),
                          "pixel_values": torch.full((3, 4, 4), float(ids[0])) if img else None,
                          "index": ids[0], "id": f"r{ids[0]}"}
    skipped = data.Skipped(7, "x", "missing_image", "gone")
    batch = data.Collator(pad_id=99)([s([1, 5, 6, 7, 8], True), None, s([2, 5], False), skipped, s([3, 5, 6], True)])
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 8], [2, 5, 99, 99, 99], [3, 5, 6, 99, 99]]
    assert batch["labels"].tolist() == [[-100, 5, 6, 7, 8], [-100, 5, -100, -100, -100], [-100, 5, 6, -100, -100]]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 3.0]  # the images of rows 0 and 2, in order
    assert batch["ids"] == ["r1", "r2", "r3"]
    assert [x.reason for x in batch["skipped"]] == ["returned_none", "missing_image"]
    text_only = data.Collator(pad_id=0)([s([4, 5], False)])
    assert text_only["pixel_values"] is None


# ---- ScienceQA -----------------------------------------------------------------------------------

SQA_HUMAN = {
    "1001": "Which of these objects is magnetic?\nContext: Look at the picture of two objects.\n"
            "Options: (A) wooden spoon (B) iron nail\n<image>",
    "1002": "Which city is the capital of the state?\nContext: N/A\nOptions: (A) Springfield (B) Chicago (C) Peoria",
    "1003": "Which word comes last in alphabetical order?\nContext: N/A\n"
            "Options: (A) apple (B) banana (C) cherry (D) plum\n<image>",
    "1004": "How many legs does a spider have?\nContext: Spiders are arachnids.\n"
            "Options: (A) two (B) four (C) six (D) seven (E) eight",
    "1005": "What does the map show?\nContext: This map shows rivers.\nOptions: (A) rivers (B) roads\n<image>",
}
SQA_REASONING_FIRST = {
    "1001": "Magnets attract some metals.\nIron is one of them. An iron nail is made of iron, so it is magnetic. "
            "The answer is B.",
    "1002": "Springfield is the capital of Illinois. The answer is A.",
    "1003": " The answer is D.",  # official quirk: empty lecture + solution leave one leading space
    "1004": "Arachnids are animals with jointed legs. A spider has eight legs. The answer is E.",
    "1005": "Maps use symbols. The answer is A.",
}
SQA_ANSWER_FIRST = {
    "1001": "The answer is B. BECAUSE: Magnets attract some metals.\nIron is one of them. An iron nail is made of "
            "iron, so it is magnetic.",
    "1002": "The answer is A. BECAUSE: Springfield is the capital of Illinois.",
    "1003": "The answer is D.",
    "1004": "The answer is E. BECAUSE: Arachnids are animals with jointed legs. A spider has eight legs.",
    "1005": "The answer is A. BECAUSE: Maps use symbols.",
}


@pytest.mark.parametrize("answer_first, targets", [(False, SQA_REASONING_FIRST), (True, SQA_ANSWER_FIRST)])
def test_scienceqa_conversion(answer_first, targets):
    records = data.scienceqa_to_llava(SQA / "problems.json", SQA / "pid_splits.json", "test", answer_first=answer_first)
    assert [r["id"] for r in records] == ["1001", "1002", "1003", "1004", "1005"]
    for r in records:
        human, gpt = r["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"] == SQA_HUMAN[r["id"]]
        assert gpt["value"] == targets[r["id"]]
        assert ("image" in r) == r["has_image"] == (r["id"] in ("1001", "1003", "1005"))
    by_id = {r["id"]: r for r in records}
    assert by_id["1001"]["image"] == "1001/image.png"  # official: relative to images/{split}
    assert [by_id[i]["answer"] for i in sorted(by_id)] == ["B", "A", "D", "E", "A"]
    assert by_id["1001"]["categories"] == ["NAT", "TXT", "IMG", "G1-6"]
    assert by_id["1002"]["categories"] == ["SOC", "NO", "G7-12"]
    assert by_id["1003"]["categories"] == ["LAN", "IMG", "G7-12"]
    assert by_id["1004"]["categories"] == ["NAT", "TXT", "G1-6"]
    assert by_id["1005"]["categories"] == ["SOC", "TXT", "IMG", "G7-12"]
    assert by_id["1002"]["no_context"] and not by_id["1005"]["no_context"]


def test_scienceqa_other_formats_and_training(tok, tmp_path):
    [r] = [x for x in data.scienceqa_to_llava(SQA / "problems.json", SQA / "pid_splits.json", "test",
                                               prompt_format="CQM-A") if x["id"] == "1002"]
    assert r["conversations"][0]["value"] == ("Context: N/A\nQuestion: Which city is the capital of the state?\n"
                                              "Options: (A) Springfield (B) Chicago (C) Peoria")
    assert r["conversations"][1]["value"] == "The answer is A."
    # image paths relative to another root, and the records train through the dataset
    records = data.scienceqa_to_llava(SQA / "problems.json", SQA / "pid_splits.json", "test", image_root=SQA / "images")
    assert {x["image"] for x in records if "image" in x} == {f"test/{p}/image.png" for p in ("1001", "1003", "1005")}
    ds = data.LazySupervisedDataset(records, SQA / "images", tok, "vicuna_v1", image_size=16, num_patches=4)
    batch = next(batches(ds, 5))
    assert batch["ids"] == ["1001", "1002", "1003", "1004", "1005"] and len(batch["pixel_values"]) == 3
    assert ds.skips.counts() == {}
