"""The tiny preset: LLaVA in miniature, end to end on a laptop CPU (`python train.py --preset tiny`).

A synthetic world of coloured shapes stands in for COCO, random tiny towers for CLIP and Vicuna, and
then the run is the paper's, through train.train(): stage 0 teaches the tiny LLaMA the world's
language from text alone (its "Vicuna"), stage 1 aligns the projector on captions, stage 2 tunes
projector + LLM on conversations. Greedy answers to held-out pictures are scored against the same
model shown a blank picture: the gap is what it learned to see (samples.png shows a dozen). A second
world, multiple choice in the ScienceQA layout, shares the drawing and words and serves `eval.py ablate`.
"""

import hashlib
import io
import json
import math
import random
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont

import data
import train
from clip import CLIPVision, CLIPVisionConfig, load_image, preprocess_batch
from llama import Llama, LlamaConfig, Tokenizer
from model import LLaVA
from weights import read_json, save_state_dict, write_json_atomic


# ------------------------------------------------------------------------------------------------
# The world: 1-3 shapes, each in its own quadrant, colours and shapes distinct within a picture (so
# "the red one" names one object). Every question needs the picture: without it the model has only
# the answer priors, near uniform (1/6 colours, 1/3 shapes and counts, 1/4 places, 1/2 relations).
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 90, 220),
          "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 30)}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")  # reading order
COUNTS = ("zero", "one", "two", "three")
BACKGROUND = (235, 235, 230)
CAPTION_INSTRUCTIONS = ("Describe the image briefly.", "What is in this picture?",
                        "Give a short caption for the image.", "Name the shapes you see.")
QUESTION_TYPES = ("color", "shape", "count", "where", "relative")
QUESTION_WEIGHTS = {"color": 1, "shape": 1, "count": 1, "where": 2, "relative": 2}  # in training: places are learned last


def draw_scene(scene, size):
    """A scene (list of {"shape", "color", "box"}) -> PIL image."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene:
        x0, y0, x1, y1 = box = obj["box"]
        outline = [((x0 + x1) / 2, y0), (x0, y1), (x1, y1)] if obj["shape"] == "triangle" else box  # triangles point up
        {"circle": draw.ellipse, "square": draw.rectangle, "triangle": draw.polygon}[obj["shape"]](outline, fill=COLORS[obj["color"]])
    return img


def random_scene(rng, size, one_shape=False):
    """1-3 objects, each centred in its quadrant at 8/10 of its side: fixed places a tiny model learns."""
    n, half = rng.randint(1, 3), size // 2
    side, scene = int(0.8 * half), []
    for quadrant, color, shape in zip(rng.sample(QUADRANTS, n), rng.sample(sorted(COLORS), n), rng.sample(SHAPES, n)):
        x0, y0 = (half * (edge in quadrant) + (half - side) // 2 for edge in ("right", "bottom"))
        scene.append({"shape": shape, "color": color, "quadrant": quadrant, "box": [x0, y0, x0 + side, y0 + side]})
    if one_shape and n > 1:  # drawn again: one-shape worlds take the first one-shape scene of the random stream
        return random_scene(rng, size, one_shape)
    return sorted(scene, key=lambda o: QUADRANTS.index(o["quadrant"]))


def a_or_an(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def caption(scene):
    """"a red circle, an orange square and a green triangle." in reading order."""
    names = [a_or_an(f"{o['color']} {o['shape']}") for o in scene]
    return (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) + "."


def ask(scene, kind, rng):
    """-> (question, answer), naming the object right before the word the picture decides: the model looks there."""
    obj, name = rng.choice(scene), lambda o: f"{o['color']} {o['shape']}"
    if kind == "color":
        return f"What color is the {obj['shape']}?", f"The {obj['shape']} is {obj['color']}."
    if kind == "shape":
        return f"What shape is the {obj['color']} object?", f"It is {a_or_an(name(obj))}."
    if kind == "count":
        return "How many shapes are there?", "There is one shape." if len(scene) == 1 else f"There are {COUNTS[len(scene)]} shapes."
    if kind == "where":
        return f"Where is the {name(obj)}?", f"The {name(obj)} is in the {obj['quadrant']}."
    if kind == "relative":  # needs two objects; they differ in column or row (distinct quadrants)
        a, b = rng.sample(scene, 2)
        right, below = "right" in a["quadrant"], "bottom" in a["quadrant"]
        if right != ("right" in b["quadrant"]):
            return f"Is the {name(a)} left or right of the {name(b)}?", f"The {name(a)} is {'right' if right else 'left'} of it."
        return f"Is the {name(a)} above or below the {name(b)}?", f"The {name(a)} is {'below' if below else 'above'} it."
    raise ValueError(f"unknown question kind {kind!r}")


def normalize_answer(text):
    """For exact-match accuracy: lower case, no surrounding spaces or punctuation, single spaces."""
    return " ".join(text.lower().replace(",", " ").split()).strip(" .!?;:'\"")


def _record(rid, image, qa, **fields):
    return {"id": rid, "image": image, **fields,
            "conversations": [{"from": who, "value": v} for q, a in qa for who, v in (("human", q), ("gpt", a))]}


def _text(value):
    return value.replace(data.IMAGE, "").strip()


def _text_only(turns):
    return [{"from": t["from"], "value": _text(t["value"])} for t in turns]


def _lines(turns):
    """A tokenizer's lines from a conversation: each turn, then all of them laid out as the template does."""
    dialogue = " ".join(("USER: " if t["from"] == "human" else "ASSISTANT: ") + t["value"] for t in turns)
    return [_text(t["value"]) for t in turns] + [dialogue.replace(data.IMAGE, "").replace("\n", " ")]


def make_synthetic(out_dir, n_train, n_test, seed=0, image_size=64, vocab_size=512):
    """Write the world into out_dir (images/, stage1.json captions, stage2.json questions, test.json with
    "answer" and "type", world.json what was drawn, tokenizer.model) and return their paths."""
    out, rng = Path(out_dir), random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with_image = lambda text: data.IMAGE + "\n" + text if rng.random() < 0.5 else text + "\n" + data.IMAGE  # as published
    world, stage1, stage2, test = {}, [], [], []
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(n):
            name, scene = f"{split}_{k:06d}", random_scene(rng, image_size)
            draw_scene(scene, image_size).save(out / "images" / f"{name}.png")
            world[name], kinds = scene, [t for t in QUESTION_TYPES if t != "relative" or len(scene) > 1]
            if split == "test":  # the kinds in turn (a one-shape picture has no relative position)
                kind = QUESTION_TYPES[k % len(QUESTION_TYPES)]
                kind = kind if kind in kinds else "where"
                q, a = ask(scene, kind, rng)
                test.append(_record(name, f"{name}.png", [(data.IMAGE + "\n" + q, a)], type=kind, answer=a))
                continue
            stage1.append(_record(name, f"{name}.png", [(with_image(rng.choice(CAPTION_INSTRUCTIONS)), caption(scene))]))
            # 3-6 distinct questions, half the time a description last (dense, as in LLaVA-Instruct; gives nothing away)
            qa = {}
            for _ in range(rng.randint(3, 6)):
                qa.setdefault(*ask(scene, rng.choices(kinds, [QUESTION_WEIGHTS[t] for t in kinds])[0], rng))
            if rng.random() < 0.5:
                qa[rng.choice(CAPTION_INSTRUCTIONS)] = caption(scene)
            (q, a), *rest = qa.items()
            stage2.append(_record(name, f"{name}.png", [(with_image(q), a), *rest]))
    files = {"stage1": stage1, "stage2": stage2, "test": test, "world": {"seed": seed, "image_size": image_size, "images": world}}
    paths = {"image_folder": out / "images", **{k: out / f"{k}.json" for k in files}, "tokenizer": out / "tokenizer.model"}
    for key, obj in files.items():
        write_json_atomic(paths[key], obj, indent=1)
    # the system prompt once a conversation: read that often, it becomes a few whole-word pieces
    lines = [data.VICUNA_SYSTEM] * len(stage2) + [data.LLAMA_2_SYSTEM, *CAPTION_INSTRUCTIONS, *COLORS, *SHAPES,
                                                  *QUADRANTS, *COUNTS, "yes no left right above below"]
    lines += [line for r in stage1 + stage2 + test for line in _lines(r["conversations"])]
    train_tokenizer(lines, paths["tokenizer"], vocab_size)
    return paths


def train_tokenizer(lines, path, vocab_size):
    """A LLaMA-shaped sentencepiece BPE (byte fallback, digits split, UNK 0 / BOS 1 / EOS 2) of `lines`."""
    model = io.BytesIO()  # trained in memory: a model_prefix path would be written into the file
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    Path(path).write_bytes(model.getvalue())


# ------------------------------------------------------------------------------------------------
# The multiple-choice world (eval.py ablate), in the ScienceQA release layout so that the ScienceQA path runs on it:
# one shape a picture, a "solution" that says what it shows, options in the world's order (a tiny model learns them fast)
#     What color is the shape?  Options: (A) red (B) blue (C) yellow (D) orange
#     reasoning-first: "The picture shows a blue circle in the top left. The answer is B."
#     answer-first:    "The answer is B. BECAUSE: The picture shows a blue circle in the top left."
MC_KINDS = ("color", "shape", "where", "exists")


def mc_problem(obj, kind, rng):
    """One multiple-choice problem about a one-shape scene -> (question, choices, right answer)."""
    if kind == "color":
        shown = {obj["color"], *rng.sample([c for c in COLORS if c != obj["color"]], 3)}
        return "What color is the shape?", [c for c in COLORS if c in shown], obj["color"]
    if kind == "shape":
        return "Which shape is in the picture?", list(SHAPES), obj["shape"]
    if kind == "where":
        return "Where is the shape?", list(QUADRANTS), obj["quadrant"]
    there = (obj["color"], obj["shape"])  # exists: half the time the shape that is there, else one that is not
    asked = there if rng.random() < 0.5 else rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) != there])
    return f"Is there {a_or_an(' '.join(asked))}?", ["yes", "no"], "yes" if asked == there else "no"


def make_mc_world(out_dir, n_train, n_test, seed=0, image_size=64, vocab_size=640):
    """Write the world as a ScienceQA release, plus what run_tiny takes, into out_dir; return the paths."""
    out, rng = Path(out_dir), random.Random(seed)
    problems, splits, stage1 = {}, {"train": [], "val": [], "test": []}, []
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(n):
            pid, scene = f"{split}{k:06d}", random_scene(rng, image_size, one_shape=True)
            (out / "images" / split / pid).mkdir(parents=True, exist_ok=True)
            draw_scene(scene, image_size).save(out / "images" / split / pid / "image.png")
            kind = MC_KINDS[k % len(MC_KINDS)] if split == "test" else rng.choice(MC_KINDS)
            question, choices, right = mc_problem(scene[0], kind, rng)
            solution = f"The picture shows {caption(scene)[:-1]} in the {scene[0]['quadrant']}."
            problems[pid] = {"question": question, "choices": choices, "answer": choices.index(right), "hint": "",
                             "image": "image.png", "task": "closed choice", "grade": "grade1", "subject": "natural science",
                             "topic": "shapes", "lecture": "", "solution": solution, "split": split}
            splits[split].append(pid)
            if split == "train":
                qa = [(data.IMAGE + "\n" + rng.choice(CAPTION_INSTRUCTIONS), caption(scene))]
                stage1.append(_record(pid, f"train/{pid}/image.png", qa))
    write_json_atomic(out / "problems.json", problems, indent=1)
    write_json_atomic(out / "pid_splits.json", splits, indent=None)
    paths = {"root": out, "image_folder": out / "images", "stage1": out / "stage1.json",
             "stage2": out / "stage2_reasoning_first.json", "stage2_answer_first": out / "stage2_answer_first.json",
             "test": out / "test.json", "tokenizer": out / "tokenizer.model"}
    records = {"stage1": stage1, **{key: data.scienceqa_to_llava(
        out / "problems.json", out / "pid_splits.json", split, image_root=out / "images", answer_first=af)
        for key, split, af in (("stage2", "train", False), ("stage2_answer_first", "train", True), ("test", "test", False))}}
    for key, obj in records.items():
        write_json_atomic(paths[key], obj, indent=None)
    lines = [data.VICUNA_SYSTEM, *CAPTION_INSTRUCTIONS, *(r["conversations"][1]["value"] for r in stage1)]
    lines += [line for r in records["stage2"] + records["stage2_answer_first"] for line in _lines(_text_only(r["conversations"]))]
    train_tokenizer(lines, paths["tokenizer"], vocab_size)
    return paths


# ------------------------------------------------------------------------------------------------
# The bases and the preset
TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
TINY_LLM = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
TINY_POSITION_RMS = 0.4  # the random patch embedding's output RMS on the world's pictures
# where the LLM trains (0, 2), Muon: it learns the world's lookups in far fewer steps than the paper's AdamW
TINY_STAGES = {0: dict(lr=3e-3, global_batch=32, micro_batch=32, epochs=1, optimizer="muon", template="vicuna_v1"),
               1: dict(lr=2e-2, global_batch=32, micro_batch=32, epochs=1, template="plain", lora_r=0),
               2: dict(lr=1e-3, projector_lr=2e-2, global_batch=8, micro_batch=8, epochs=4.5, adam_beta2=0.95,
                       optimizer="muon", template="vicuna_v1")}
TINY_PRESETS = {  # the world's size, and what each preset changes in TINY_STAGES
    "tiny": dict(n_train=4000, n_test=250, stages={}),                        # stage 2: 2250 steps
    "tiny-long": dict(n_train=4000, n_test=250, stages={2: dict(epochs=12)}),  # stage 2: 6000 steps
    "tiny-short": dict(n_train=1000, n_test=100,                               # stage 2: 375 steps
                       stages={0: dict(max_steps=40), 1: dict(max_steps=20), 2: dict(epochs=3)})}


def init_normal(module, std=0.02):
    """GPT-2 / HF style init: N(0, 0.02) weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    return module


def make_tiny_bases(root, tokenizer_path, seed):
    """Random tiny CLIP and LLaMA, saved as transformers saves openai's CLIP and Vicuna."""
    torch.manual_seed(seed)
    clip_dir, llm_dir = Path(root) / "clip", Path(root) / "llm"
    vision = init_normal(CLIPVision(CLIPVisionConfig(**TINY_CLIP)))
    with torch.no_grad():  # positions that say where a patch is, as a pretrained CLIP's do (random ones too faintly)
        nn.init.normal_(vision.embeddings.class_embedding, std=0.02)
        table = grid_position_embedding(TINY_CLIP["image_size"] // TINY_CLIP["patch_size"], TINY_CLIP["hidden_size"])
        vision.embeddings.position_embedding.weight.copy_(table * TINY_POSITION_RMS)
    save_state_dict(vision.state_dict(), clip_dir)
    write_json_atomic(clip_dir / "config.json", vision.config.to_hf())
    llm = init_normal(Llama(LlamaConfig(vocab_size=Tokenizer(tokenizer_path).sp.vocab_size(), **TINY_LLM)))
    save_llm_dir(llm, llm_dir, tokenizer_path)
    return clip_dir, llm_dir


def grid_position_embedding(grid, dim):
    """[1 + grid**2, dim], unit RMS: zeros for CLS, then per patch MAE's 2-D sin-cos of its row | its column."""
    freqs = 1.0 / 100 ** (torch.arange(dim // 4) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    enc = lambda pos: torch.cat([torch.sin(pos.flatten()[:, None] * freqs), torch.cos(pos.flatten()[:, None] * freqs)], 1)  # noqa: E731
    table = torch.cat([enc(rows.float()), enc(cols.float())], 1)  # [grid**2, dim]
    return torch.cat([torch.zeros(1, dim), table / table.pow(2).mean().sqrt()])


def save_llm_dir(llm, directory, tokenizer_path):
    """A transformers LlamaForCausalLM directory: what LLaVA.from_components expects of Vicuna."""
    save_state_dict({k if k.startswith("lm_head.") else "model." + k: v for k, v in llm.state_dict().items()}, directory)
    write_json_atomic(directory / "config.json", llm.config.to_hf())
    (directory / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    # A world trained from scratch has no release to match: today's rule, no "▁" after </s>
    write_json_atomic(directory / "tokenizer_config.json", {"legacy": False})


def run_tiny(cfg, skip_stage1=False, vision_layer=None, world=None, tag="", evaluate=True):
    """The whole preset (TINY_PRESETS), in its own --out. The switches are eval.py ablate's: skip_stage1 (stage 2 from
    a fresh projector), vision_layer (CLIP's -1 or -2), world (another's paths), evaluate=False (train only).
    --lora-r N makes stage 2 a LoRA run (stages 0 and 1 are as ever)."""
    t0, name = time.perf_counter(), cfg.preset or "tiny"
    preset = TINY_PRESETS[name]
    stages = {k: {**v, **preset["stages"].get(k, {})} for k, v in TINY_STAGES.items()}
    root = Path(cfg.out or f"runs/{name}")
    run_dir = root / tag if tag else root
    train.log0(f"{name} preset in {root}, on {torch.get_num_threads()} CPU threads "
               "(--threads N or OMP_NUM_THREADS=N to change: on a busy machine, fewer than the free cores)")
    world = world or make_synthetic(root / "data", preset["n_train"], preset["n_test"], seed=cfg.seed,
                                    image_size=TINY_CLIP["image_size"] * 2)
    clip_dir, llm_dir = make_tiny_bases(root, world["tokenizer"], cfg.seed)
    common = dict(preset="", clip=str(clip_dir), llm=str(llm_dir), image_folder=str(world["image_folder"]), projector="mlp2x_gelu",
                  image_size=TINY_CLIP["image_size"], pad_to_square=False, max_length=256, warmup_ratio=0.03, num_workers=0,
                  save_every=0, overwrite=True, log_every=100, vision_layer=cfg.vision_layer if vision_layer is None else vision_layer)
    # Stage 0, the world's "Vicuna": the LLaMA learns the world's language from the stage-2 text, as Vicuna
    # knew English before LLaVA. Kept while tokenizer, LLM and recipe stay: one world's ablations share it.
    stamp = root / "llm_pretrained" / "nanollava_stage0.json"
    recipe = json.dumps([TINY_LLM, stages[0], cfg.seed, hashlib.sha256(Path(world["tokenizer"]).read_bytes()).hexdigest()])
    if not stamp.exists() or stamp.read_text() != recipe:
        text = [{"id": r["id"] + "_text", "conversations": _text_only(r["conversations"])} for r in read_json(world["stage2"])]
        write_json_atomic(root / "data" / "text_only.json", text)
        train.train(replace(cfg, stage=2, init="", lora_r=0, data=str(root / "data" / "text_only.json"),
                            out=str(root / "llm_pretrain"), **common, **stages[0]))
        if dist.get_rank() == 0:
            save_llm_dir(LLaVA.from_pretrained(root / "llm_pretrain").llm, stamp.parent, llm_dir / "tokenizer.model")
            stamp.write_text(recipe)
        dist.barrier()
    common["llm"] = str(stamp.parent)
    if not skip_stage1:
        train.train(replace(cfg, stage=1, data=str(world["stage1"]), out=str(run_dir / "stage1"), **common, **stages[1]))
    train.train(replace(cfg, stage=2, init="" if skip_stage1 else str(run_dir / "stage1"), data=str(world["stage2"]),
                        out=str(run_dir / "stage2"), **common, **stages[2]))
    if dist.get_rank() == 0 and evaluate:
        return report(name, world, root, run_dir, t0)


# ------------------------------------------------------------------------------------------------
# Its accuracy: greedy answers to held-out questions shown the picture, and a blank one (its priors)
def score(model, records, folder, blank=False, batch_size=50):
    """-> (accuracy, {question type: accuracy}, [(answer, right)])"""
    tok, c = Tokenizer(model.tokenizer_dir), model.config
    said, by_type = [], {}
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        prompts = [data.tokenize_prompt(r["conversations"][:1], tok, c.template, has_image=True, num_patches=c.num_patches)
                   for r in chunk]
        images = [Image.new("RGB", (64, 64), BACKGROUND) if blank else load_image(folder / r["image"]) for r in chunk]
        pixels = preprocess_batch(images, c.vision.image_size, c.pad_to_square)
        for r, out in zip(chunk, model.generate_batch(prompts, pixels, max_new_tokens=32, eos_id=tok.eos_id)):
            text = tok.decode(out).strip()
            said.append((text, normalize_answer(text) == normalize_answer(r["answer"])))
            by_type.setdefault(r.get("type", "all"), []).append(said[-1][1])
    return sum(ok for _, ok in said) / len(records), {k: sum(v) / len(v) for k, v in sorted(by_type.items())}, said


def draw_samples(records, folder, seen, blank, path, columns=4):
    """Pictures, questions and (answer, right) with the picture and a blank one: proof that the model looks."""
    font, cell, side = ImageFont.load_default(size=13), 250, 128
    sheet = Image.new("RGB", (cell * columns, cell * math.ceil(len(records) / columns)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (r, s, b) in enumerate(zip(records, seen, blank)):
        x, y = cell * (k % columns) + 8, cell * (k // columns) + 8
        sheet.paste(load_image(folder / r["image"]).resize((side, side), Image.NEAREST), (x, y))
        said = [(f"{label}: {text}", (0, 128, 0) if ok else (200, 0, 0)) for label, (text, ok) in (("seen", s), ("blank", b))]
        y += side + 4
        for text, colour in [(_text(r["conversations"][0]["value"]), "black"), *said]:
            for line in textwrap.wrap(text, 34):
                draw.text((x, y), line, fill=colour, font=font)
                y += 16
    sheet.save(path)


def report(name, world, root, run_dir, t0):
    """Score the stage-2 model, draw samples.png and loss.png, write result.json, say how to chat with it."""
    model, records, folder = LLaVA.from_pretrained(run_dir / "stage2").eval(), read_json(world["test"]), Path(world["image_folder"])
    (acc, acc_by_type, seen), (blank, blank_by_type, unseen) = (score(model, records, folder, b) for b in (False, True))
    draw_samples(records[:12], folder, seen, unseen, run_dir / "samples.png")
    train.draw_loss_curve([(label, train.logged_losses(d / "train_log.jsonl")) for label, d in (
        ("stage 0 (text)", root / "llm_pretrain"), ("stage 1", run_dir / "stage1"), ("stage 2", run_dir / "stage2"))
        if (d / "train_log.jsonl").exists()], run_dir / "loss.png")
    minutes = (time.perf_counter() - t0) / 60
    result = {"accuracy": acc, "blank_image_accuracy": blank, "minutes": round(minutes, 2),
              "by_type": {k: {"image": acc_by_type[k], "blank": blank_by_type[k]} for k in acc_by_type}}
    write_json_atomic(run_dir / "result.json", result)
    per_type = ", ".join(f"{k} {v['image']:.0%} ({v['blank']:.0%})" for k, v in result["by_type"].items())
    examples = [_text(records[0]["conversations"][0]["value"]), "How many shapes are there?", "What shape is the red object?"]
    # its world only: a real photo gets word salad
    print(f"\n{name} preset: held-out accuracy {acc:.1%} with the image, {blank:.1%} with a "
          f"blank image (chance-level means it answers from the picture); {minutes:.1f} min.\n"
          f"pictures and answers: {run_dir / 'samples.png'}, loss of every stage: {run_dir / 'loss.png'}\n"
          f"by question type, with the image (blank): {per_type}\n"
          f"Chat with it: python chat.py {folder / records[0]['image']} --model {run_dir / 'stage2'}\nIt knows only its "
          "world of 1-3 coloured shapes in the four quadrants of a picture, and five kinds of question (colour, shape, "
          "count, place, left/right or above/below), e.g.\n  " + "\n  ".join(examples), flush=True)
    return result


def preset_config(out, seed, preset="tiny"):
    """The train.py config of a preset run (what `python train.py --preset PRESET` parses)."""
    return train.parse_args(["--preset", preset, "--out", str(out), "--seed", str(seed)])
