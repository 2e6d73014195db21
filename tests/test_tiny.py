"""tiny.py: the synthetic worlds (what is drawn is what is said), the tiny bases, and the preset
run as a newcomer runs it: `python train.py --preset tiny-short`, stopped and resumed too."""

import json
import math
import re
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
import llama
import tiny
import train
from helpers import batches, losses, run, start_and_signal


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    w = tiny.make_synthetic(root / "data", n_train=8, n_test=2, seed=0, image_size=64, vocab_size=400)
    clip_dir, llm_dir = tiny.make_tiny_bases(root, w["tokenizer"], seed=0)
    return {**w, "clip": clip_dir, "llm": llm_dir}


# ---- the synthetic world -------------------------------------------------------------------------

def _answer_from_world(question, scene):
    """Re-derive an answer from what the generator says it drew, independently of tiny.ask."""
    find = lambda color=None, shape=None: [o for o in scene if color in (None, o["color"]) and shape in (None, o["shape"])]
    cx = lambda o: (o["box"][0] + o["box"][2]) / 2
    cy = lambda o: (o["box"][1] + o["box"][3]) / 2
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        [o] = find(shape=m[1]); return f"The {m[1]} is {o['color']}."
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        [o] = find(color=m[1]); return f"It is {'an' if m[1] == 'orange' else 'a'} {m[1]} {o['shape']}."
    if question == "How many shapes are there?":
        return {1: "There is one shape.", 2: "There are two shapes.", 3: "There are three shapes."}[len(scene)]
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        [o] = find(m[1], m[2]); size = 64
        where = ("top" if cy(o) < size / 2 else "bottom") + " " + ("left" if cx(o) < size / 2 else "right")
        return f"The {m[1]} {m[2]} is in the {where}."
    if m := re.fullmatch(r"Is the (\w+) (\w+) left or right of the (\w+) (\w+)\?", question):
        [a], [b] = find(m[1], m[2]), find(m[3], m[4])
        return f"The {m[1]} {m[2]} is {'left' if cx(a) < cx(b) else 'right'} of it."
    if m := re.fullmatch(r"Is the (\w+) (\w+) above or below the (\w+) (\w+)\?", question):
        [a], [b] = find(m[1], m[2]), find(m[3], m[4])
        return f"The {m[1]} {m[2]} is {'above' if cy(a) < cy(b) else 'below'} it."
    raise AssertionError(f"unexpected question {question!r}")


def test_synthetic_world(tmp_path):
    p = tiny.make_synthetic(tmp_path / "a", n_train=40, n_test=120, seed=5)
    tiny.make_synthetic(tmp_path / "b", n_train=40, n_test=120, seed=5)
    r = tiny.make_synthetic(tmp_path / "c", n_train=40, n_test=120, seed=6)
    files = sorted(f.relative_to(tmp_path / "a") for f in (tmp_path / "a").rglob("*") if f.is_file())
    assert files == sorted(f.relative_to(tmp_path / "b") for f in (tmp_path / "b").rglob("*") if f.is_file())
    for f in files:  # deterministic for a seed, images and tokenizer included
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert p["stage2"].read_text() != r["stage2"].read_text()

    world = json.loads(p["world"].read_text())["images"]
    stage1, stage2, test = (json.loads(p[k].read_text()) for k in ("stage1", "stage2", "test"))
    assert len(stage1) == len(stage2) == 40 and len(test) == 120
    for rec in stage1:
        scene = world[rec["id"]]
        order = sorted(scene, key=lambda o: ((o["box"][1] + o["box"][3]) > 64, (o["box"][0] + o["box"][2]) > 64))
        names = [f"{'an' if o['color'] == 'orange' else 'a'} {o['color']} {o['shape']}" for o in order]  # the one vowel
        expected = (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) + "."
        assert rec["conversations"][1]["value"] == expected
        assert rec["conversations"][0]["value"].count("<image>") == 1
    captions = {r["id"]: r["conversations"][1]["value"] for r in stage1}
    for rec in stage2 + test:
        scene = world[rec["id"]]
        turns = rec["conversations"]
        assert 2 <= len(turns) <= 14 and [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        for qt, at in zip(turns[::2], turns[1::2]):
            question = qt["value"].replace("<image>", "").strip()
            if question in tiny.CAPTION_INSTRUCTIONS:  # stage 2 opens with a description
                assert at["value"] == captions[rec["id"]], rec["id"]
            else:
                assert at["value"] == _answer_from_world(question, scene), rec["id"]
    for rec in test:
        assert rec["answer"] == rec["conversations"][1]["value"] and rec["type"] in tiny.QUESTION_TYPES

    # the training mix follows QUESTION_WEIGHTS (place and relative position, the questions a
    # model learns last, asked twice as often): the share of those two kinds, counted from the
    # questions' wording, against the share the weights give each scene (repeats are dropped,
    # and "How many shapes are there?" repeats most, hence the one-sided slack)
    kind_of = {"What color": "color", "What shape": "shape", "How many": "count", "Where is": "where", "Is the": "relative"}
    w = tiny.QUESTION_WEIGHTS
    seen, expected = [], []
    for rec in stage2:
        n = len(world[rec["id"]])
        share = (w["where"] + (w["relative"] if n > 1 else 0)) / (sum(w.values()) - (0 if n > 1 else w["relative"]))
        for qt in rec["conversations"][::2]:
            question = qt["value"].replace("<image>", "").strip()
            if question not in tiny.CAPTION_INSTRUCTIONS:
                seen.append(next(k for prefix, k in kind_of.items() if question.startswith(prefix)) in ("where", "relative"))
                expected.append(share)
    assert sum(expected) / len(expected) - 0.08 < sum(seen) / len(seen) < sum(expected) / len(expected) + 0.15

    # the pixels show what the metadata says: each shape's colour at its centre, background elsewhere
    for name, scene in list(world.items())[:40]:
        img = Image.open(p["image_folder"] / f"{name}.png").convert("RGB")
        assert img.size == (64, 64)
        for o in scene:
            x0, y0, x1, y1 = o["box"]
            point = ((x0 + x1) // 2, (y0 + 2 * y1) // 3)  # inside circle, square and triangle alike
            assert img.getpixel(point) == tiny.COLORS[o["color"]], (name, o)
        for quadrant, corner in zip(tiny.QUADRANTS, [(0, 0), (63, 0), (0, 63), (63, 63)]):
            assert img.getpixel(corner) == tiny.BACKGROUND

    # no answer guessable without the image: per question type, the words of the answer that
    # the question does not contain (the colour, the place, ...) are near uniform, so the best
    # blind guess is right for under half of the test questions
    def decided(r):
        asked = set(re.findall(r"\w+", r["conversations"][0]["value"].lower()))
        return " ".join(w for w in re.findall(r"\w+", r["answer"].lower()) if w not in asked)
    blind = 0
    for kind in tiny.QUESTION_TYPES:
        answers = [decided(r) for r in test if r["type"] == kind]
        assert answers, kind
        blind += max(answers.count(x) for x in set(answers))
    assert blind / len(test) < 0.5

    # the tokenizer: small, byte fallback, reads every text of the world back
    t = llama.Tokenizer(p["tokenizer"])
    assert t.sp.vocab_size() <= 512 and t.sp.is_byte(t.sp.piece_to_id("<0x0A>"))
    for rec in stage2[:10]:
        ids, labels = data.tokenize_conversation(rec["conversations"], t, "vicuna_v1", num_patches=16, has_image=True)
        assert t.decode([i for i, l in zip(ids, labels) if l != -100]) == " ".join(
            turn["value"] for turn in rec["conversations"][1::2])  # each reply's "▁" is a space
    assert len(t.encode("a red circle and a blue square.", bos=False)) <= 8

    # the synthetic data trains through the real dataset and loader
    ds = data.LazySupervisedDataset(p["stage1"], p["image_folder"], t, "plain", image_size=32, num_patches=16)
    batch = next(batches(ds, 8))
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and ds.skips.counts() == {}


def test_normalize_answer():
    assert tiny.normalize_answer("  Top Left. ") == "top left"
    assert tiny.normalize_answer("Red!") == "red" and tiny.normalize_answer("yes") == "yes"


def test_tiny_clip_position_embedding_encodes_row_and_column(world):
    """The tiny CLIP stands in for a pretrained one, whose position embeddings encode where a
    patch is: the first half of each patch's vector is a function of its row alone, the second
    of its column alone (sin-cos by hand below), zeros for the class token, RMS as configured."""
    from weights import load_state_dict
    state = load_state_dict(Path(world["clip"]))
    table = state[next(k for k in state if k.endswith("position_embedding.weight"))]
    grid, dim = 4, tiny.TINY_CLIP["hidden_size"]
    assert table.shape == (1 + grid * grid, dim) and not table[0].any()
    assert math.isclose(table[1:].pow(2).mean().sqrt().item(), tiny.TINY_POSITION_RMS, rel_tol=1e-5)
    half, quarter = dim // 2, dim // 4
    for r in range(grid):
        for c in range(grid):
            v = table[1 + r * grid + c]
            assert torch.equal(v[:half], table[1 + r * grid][:half])  # same row, any column
            assert torch.equal(v[half:], table[1 + c][half:])         # same column, any row
    scale = table[1 + 1 * grid][quarter].item() / math.cos(1.0)       # row 1, lowest frequency: cos(1)
    assert math.isclose(table[1 + 2 * grid][0].item(), scale * math.sin(2.0), rel_tol=1e-5)
    assert math.isclose(table[1 + 3][half + 1].item(), scale * math.sin(3.0 / 100 ** (1 / quarter)), rel_tol=1e-5)


@pytest.fixture(scope="module")
def tiny_short(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-short") / "tiny"
    return root, run(["--preset", "tiny-short", "--out", str(root), "--threads", "2"], timeout=900)


def test_tiny_short_preset_learns_to_see(tiny_short):
    """`python train.py --preset tiny-short`, as a newcomer runs it: the README's main job with
    a smaller world and fewer steps. Stage 0, 1 and 2, then greedy answers to held-out pictures
    against the same model shown a blank picture, and how to chat with it."""
    root, p = tiny_short
    result = json.loads((root / "result.json").read_text())
    assert set(result["by_type"]) == set(tiny.QUESTION_TYPES)
    assert result["accuracy"] >= result["blank_image_accuracy"] + 0.15, result
    assert result["by_type"]["count"]["image"] >= 0.8, result  # the first thing it learns to see
    assert f"held-out accuracy {result['accuracy']:.1%} with the image" in p.stdout
    assert "on 2 CPU threads" in p.stdout and "It knows only its world" in p.stdout
    assert f"--model {root / 'stage2'}" in p.stdout
    # the sheet of pictures: 12 held-out ones, 4 by 3, each pasted at 128 px over its answers
    from PIL import Image
    sheet = Image.open(root / "samples.png").convert("RGB")
    first = json.loads((root / "data" / "test.json").read_text())[0]["image"]
    picture = Image.open(root / "data" / "images" / first).convert("RGB").resize((128, 128), Image.NEAREST)
    assert sheet.size == (1000, 750) and sheet.crop((8, 8, 136, 136)).tobytes() == picture.tobytes()
    assert Image.open(root / "loss.png").size == (800, 420) and f"{root / 'samples.png'}" in p.stdout
    stage2 = json.loads((root / "stage2" / "train_config.json").read_text())
    assert stage2["epochs"] == 3 and stage2["lr"] == tiny.TINY_STAGES[2]["lr"]


def test_the_preset_stopped_in_each_stage_and_resumed_ends_as_the_uninterrupted_run(tiny_short, tmp_path):
    """Ctrl-C in stage 0, then in stage 1, then in stage 2 of the one-minute preset, each time
    continued with --resume auto: every stage's losses and the held-out answers are the
    uninterrupted run's."""
    ref, _ = tiny_short
    root = tmp_path / "tiny"
    cmd = ["--preset", "tiny-short", "--out", str(root), "--threads", "2"]
    for i, (stage, after) in enumerate((("llm_pretrain", 5), ("stage1", 5), ("stage2", 50))):
        rc, text = start_and_signal(cmd + ["--resume", "auto"] * (i > 0), root / stage / "train_log.jsonl",
                                    signal.SIGINT, after)
        assert rc == 130 and "Traceback" not in text, text[-3000:]
        assert "saved; continue with the same command and --resume auto" in text.splitlines()[-1]
        assert str(root / stage / "checkpoint-") in text.splitlines()[-1] and not (root / "result.json").exists()
    p = run(cmd + ["--resume", "auto"], timeout=900)
    for stage in ("llm_pretrain", "stage1", "stage2"):
        assert losses(root / stage) == losses(ref / stage), stage
    got, want = (json.loads((r / "result.json").read_text()) for r in (root, ref))
    assert {**got, "minutes": 0} == {**want, "minutes": 0}
    assert f"held-out accuracy {want['accuracy']:.1%} with the image" in p.stdout


def test_presets_differ_only_where_they_say():
    base, long, short = (tiny.TINY_PRESETS[k] for k in ("tiny", "tiny-long", "tiny-short"))
    assert long["stages"] == {2: {"epochs": 12}} and (long["n_train"], long["n_test"]) == (base["n_train"], base["n_test"])
    assert set(short["stages"]) == {0, 1, 2} and set(tiny.TINY_PRESETS) == set(train.PRESETS)
