"""Evaluation as in the paper: ScienceQA accuracy per category, the GPT-judged LLaVA-Bench
relative score, and the paper's ScienceQA ablations re-run in miniature on the CPU.

    python eval.py scienceqa --model runs/sqa --root ScienceQA/data/scienceqa --split test --out preds.jsonl
    python eval.py judge --model runs/stage2 --questions qa90_questions.jsonl --answers qa90_gpt4_answer.jsonl \\
        --context caps_boxes_coco2014_val_80.jsonl --images coco/val2014 --judge-model gpt-4o --out judge.jsonl
    python eval.py ablate                        # trains the tiny variants, prints the ablation table

ScienceQA: each problem becomes the prompt training used, the model answers greedily, and
`extract_answer` reads the letter strictly; a reply without one counts wrong and is listed, never
guessed. The judge (text only, through generate_data's client) reads the image's captions and
boxes, the question, the reference answer and ours, and scores both on its first line ("8 6");
a malformed first line is asked again; relative score = mean(ours) / mean(reference). Answers and
judgments are appended to JSONL files as they come, so a rerun resumes where it stopped. The
ablations (CLIP layer -1, no stage 1, answer first) are each one tiny.run_tiny switch, trained
on a multiple-choice tiny world and scored as ScienceQA.
"""

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

import data
from clip import load_image, preprocess_batch
from generate_data import (Job, JsonlOutput, ParseError, add_client_args, client_from_args, format_context,
                           load_context_jsonl, log, read_jsonl, run_jobs)
from llama import Tokenizer
from model import DTYPES, POSITIVE, LLaVA, device_name, dtype_for
from weights import WeightsError


def load_model(path, device="", dtype=""):
    """A llava-hf directory (ours or the Hub's) ready for generation, and its tokenizer."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = LLaVA.from_pretrained(path, dtype=dtype_for(device, dtype), device=device).eval()
    return model, Tokenizer(model.tokenizer_dir)


def ask(record, tokenizer, cfg, image_folder, blank_image=None):
    """A record's first question -> (prompt ids, PIL image or None); ValueError when it cannot be asked."""
    has_image = record.get("image") is not None
    ids = data.tokenize_prompt(record["conversations"][:1], tokenizer, cfg.template, has_image=has_image,
                               num_patches=cfg.num_patches)
    if len(ids) >= cfg.text.max_position_embeddings:
        raise ValueError(f"the prompt is {len(ids)} tokens, the model's context {cfg.text.max_position_embeddings}")
    if not has_image:
        return ids, None
    return ids, blank_image if blank_image is not None else load_image(Path(image_folder) / record["image"])


def answer_all(model, tokenizer, records, image_folder, out_path, batch_size=8, max_new_tokens=1024,
               blank_image=None, key="id", progress=True):
    """Answer, greedily and `batch_size` at a time, each record that `out_path` (JSONL) does not
    hold yet, appending {key: id, "text", "new_tokens"} as each batch finishes. A record that
    cannot be asked (image missing or unreadable, prompt longer than the context) is named and
    left for a rerun. blank_image replaces every picture (the text-alone baseline). -> answered."""
    cfg, out, done = model.config, JsonlOutput(out_path), 0
    device = model.llm.embed_tokens.weight.device
    todo = [r for r in records if str(r[key]) not in out.finished]
    if len(todo) < len(records):
        log(f"{out_path}: {len(records) - len(todo)} of {len(records)} answered earlier; {len(todo)} to go")
    try:
        with tqdm(total=len(todo), unit="q", disable=not progress, file=sys.stderr, leave=False) as bar:
            for start in range(0, len(todo), batch_size):
                batch, asked = todo[start:start + batch_size], []
                for r in batch:
                    try:
                        asked.append((r, *ask(r, tokenizer, cfg, image_folder, blank_image)))
                    except ValueError as e:  # ImageError is one
                        log(f"skipped {r[key]}: {e}")
                images = [img for _, _, img in asked if img is not None]
                px = preprocess_batch(images, cfg.vision.image_size, cfg.pad_to_square).to(device) if images else None
                outs = model.generate_batch([ids for _, ids, _ in asked], px, max_new_tokens=max_new_tokens,
                                            eos_id=tokenizer.eos_id) if asked else []
                for (r, _, _), ids in zip(asked, outs):
                    out.append({"id": str(r[key]), key: r[key], "text": tokenizer.decode(ids), "new_tokens": len(ids)})
                done += len(outs)
                bar.update(len(batch))
    finally:
        out.close()
    return done


# =============================================================================================
# 1. ScienceQA
# =============================================================================================

SQA_GROUPS = (("NAT", "SOC", "LAN"), ("TXT", "IMG", "NO"), ("G1-6", "G7-12"), ("Avg",))
SQA_COLUMNS = tuple(c for group in SQA_GROUPS for c in group)
LETTER_PROMPT = "Answer with the option's letter from the given choices directly."  # LLaVA-1.5's eval

_BARE = re.compile(r"\(?([A-Z])\)?")                                 # "B", "(B)"
_LEADING = re.compile(r"\(?([A-Z])\)?\.(?:\s|$)")                    # "B. iron nail", "B."
_ANSWER_IS = re.compile(r"The answer is \(?([A-Z])\)?(?![A-Za-z0-9])")  # not "The answer is Alabama"


def extract_answer(text, n_choices=5):
    """The answer letter of a reply -> (letter, None), or (None, why) for a failure.

    Accepted: a bare letter, a letter and a period at the start, or "The answer is X"
    exactly once (the official targets end "The answer is X." reasoning-first and start with
    it answer-first). A reply that starts with one letter and then says the answer is another
    is a failure, and so is a letter outside this problem's options."""
    t = (text or "").strip()
    bare = _BARE.fullmatch(t)
    if bare:
        letter = bare.group(1)
    else:
        said, lead = _ANSWER_IS.findall(t), _LEADING.match(t)
        if len(said) > 1:
            return None, f"'The answer is' appears {len(said)} times"
        if lead and said and lead.group(1) != said[0]:
            return None, f"starts with {lead.group(1)}. but says the answer is {said[0]}"
        if not said and not lead:
            return None, "no answer letter"
        letter = said[0] if said else lead.group(1)
    if letter not in data.SQA_LETTERS[:n_choices]:
        return None, f"answer {letter} is not one of the {n_choices} options"
    return letter, None


def score_scienceqa(records, replies):
    """records (data.scienceqa_to_llava) and {pid: reply text} -> the report: accuracy (percent)
    and count per column of the paper's table, failures [{id, why, text}], ids without a reply."""
    right, total = defaultdict(int), defaultdict(int)
    failures, missing = [], []
    for r in records:
        if r["id"] not in replies:
            missing.append(r["id"])
            continue
        letter, why = extract_answer(replies[r["id"]], len(r["choices"]))
        if why:
            failures.append({"id": r["id"], "why": why, "text": replies[r["id"]]})
        for col in r["categories"] + ["Avg"]:
            total[col] += 1
            right[col] += letter == r["answer"]
    accuracy = {c: round(100 * right[c] / total[c], 2) if total[c] else None for c in SQA_COLUMNS}
    return {"accuracy": accuracy, "count": {c: total[c] for c in SQA_COLUMNS}, "correct": right["Avg"],
            "scored": total["Avg"], "failures": failures, "missing": missing}


def format_table(accuracy):
    """The paper's table: two lines, groups separated by |, "-" for an empty column."""
    cell = lambda v: f"{'-':>6}" if v is None else f"{v:6.2f}"  # noqa: E731
    head = " | ".join(" ".join(f"{c:>6}" for c in g) for g in SQA_GROUPS)
    return head + "\n" + " | ".join(" ".join(cell(accuracy[c]) for c in g) for g in SQA_GROUPS)


def scienceqa_records(root, split, prompt_format="QCM", letter_prompt=False):
    """The split as LLaVA records (the training conversion; the target order does not change
    the prompt). prompt_format QCM (the paper's) or CQM (LLaVA-1.5's evaluation file)."""
    root = Path(root)
    for f in ("problems.json", "pid_splits.json"):
        if not (root / f).is_file():
            raise SystemExit(f"error: --root {root}: no {f} (expected the ScienceQA release layout)")
    records = data.scienceqa_to_llava(root / "problems.json", root / "pid_splits.json", split,
                                      prompt_format=f"{prompt_format}-A")
    for r in records if letter_prompt else ():  # official --single-pred-prompt: after the text, before the image
        human, image = r["conversations"][0], "\n" + data.IMAGE if "image" in r else ""
        human["value"] = human["value"][:len(human["value"]) - len(image)] + "\n" + LETTER_PROMPT + image
    return records


def evaluate_scienceqa(model, tokenizer, records, image_folder, out_path, limit=None, **answer_args):
    """Answer what `out_path` does not hold yet (the first `limit` problems), then score the
    whole file against the records. -> (report, number answered in this call)."""
    records = records[:limit]
    generated = answer_all(model, tokenizer, records, image_folder, out_path, **answer_args)
    rows = read_jsonl(out_path, "predictions file")
    replies = {str(r["id"]): r["text"] for r in rows if isinstance(r, dict) and "text" in r}
    return score_scienceqa(records, replies), generated


def print_report(report, n_problems, seconds, generated, show_failures=20):
    print(format_table(report["accuracy"]))
    line = f"{report['correct']} of {report['scored']} correct"
    if report["missing"]:
        line += f"; {len(report['missing'])} of {n_problems} problems have no answer yet (run again to finish)"
    if generated:
        line += f"; generated {generated} answers in {seconds:.1f}s ({generated / seconds:.2f} questions/s)"
    print(line)
    fails = report["failures"]
    if fails:
        print(f"{len(fails)} replies without a readable answer (counted wrong):")
        for f in fails[:show_failures]:
            print(f"  {f['id']}: {f['why']}: {' '.join(f['text'].split())[:100]!r}")
        if len(fails) > show_failures:
            print(f"  ... and {len(fails) - show_failures} more (all in the scores file)")


def cmd_scienceqa(args):
    records = scienceqa_records(args.root, args.split, args.prompt_format, args.letter_prompt)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    model.config.template = args.template or model.config.template
    n = len(records[:args.limit])
    log(f"scienceqa: {n} problems of split {args.split!r} ({sum('image' in r for r in records[:n])} with an "
        f"image), batch {args.batch_size}, template {model.config.template}, -> {args.out}")
    t0 = time.perf_counter()
    report, generated = evaluate_scienceqa(model, tokenizer, records, Path(args.root) / "images" / args.split,
                                           args.out, args.limit, batch_size=args.batch_size,
                                           max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - t0
    print_report(report, n, seconds, generated)
    scores = Path(args.scores or Path(args.out).with_suffix(".scores.json"))
    scores.write_text(json.dumps({**report, "model": str(args.model), "split": args.split, "problems": n,
                                  "generated": generated, "seconds": round(seconds, 2)}, indent=1))
    print(f"scores: {scores}")
    return 0 if not report["missing"] else 3


# =============================================================================================
# 2. The judge: LLaVA-Bench relative score
# =============================================================================================

JUDGE_CATEGORIES = ("conv", "detail", "complex")
JUDGE_SYSTEM = "You are a careful and impartial judge of answers to questions about images."
# Our wording of the official protocol (rule.json of LLaVA-Bench): same layout, same reply format.
JUDGE_RULE = (
    "Above are two AI assistants' answers to a user's question about an image. You cannot see the "
    "image; the sentences and object boxes under [Context] describe it (boxes are [x1, y1, x2, y2] "
    "as fractions of the image size). Rate how helpful, relevant, accurate and detailed each answer "
    "is, with one overall score per assistant on a scale of 1 to 10, higher being better.\n"
    "On the first line write only the two scores, Assistant 1's then Assistant 2's, separated by a "
    "space. From the second line on, explain your judgment, without letting the order in which the "
    "answers were shown, or their length, sway you.")
_SCORES = re.compile(r"\s*(\d{1,2}(?:\.\d+)?)\s*(?:,\s*|\s+)(\d{1,2}(?:\.\d+)?)\s*")


def parse_scores(text):
    """The judge's reply -> (score of assistant 1, score of assistant 2). Its first non-empty
    line must be exactly two numbers from 0 to 10 separated by a space or a comma ("8 6",
    "7.5, 9"); anything else ("Assistant 1: 8", "8/10 6/10", "8", "8 6 5", "11 3") raises
    ParseError, which run_jobs answers by asking again."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    if not lines:
        raise ParseError("empty reply")
    m = _SCORES.fullmatch(lines[0])
    if not m:
        raise ParseError(f"the first line is not two scores: {lines[0][:60]!r}")
    a, b = float(m.group(1)), float(m.group(2))
    if not (0 <= a <= 10 and 0 <= b <= 10):
        raise ParseError(f"scores out of 0..10: {lines[0][:60]!r}")
    return a, b


def judge_messages(context, question, reference, ours):
    """The official layout: context, question, the two answers (reference first), the rule."""
    content = (f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
               f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
               f"[Assistant 2]\n{ours}\n\n[End of Assistant 2]\n\n[System]\n{JUDGE_RULE}\n\n")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


def relative_scores(rows):
    """Judgments [{category, scores: [reference, ours]}] -> per category and "all": n, mean
    reference and our score, relative = 100 * mean(ours) / mean(reference) (the official
    summary: a ratio of means)."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["category"]].append(r["scores"])
        groups["all"].append(r["scores"])
    table = {}
    for cat in [*JUDGE_CATEGORIES, *sorted(set(groups) - {*JUDGE_CATEGORIES, "all"}), "all"]:
        s = groups.get(cat)
        if not s:
            continue
        ref, ours = sum(x[0] for x in s) / len(s), sum(x[1] for x in s) / len(s)
        table[cat] = {"n": len(s), "reference": round(ref, 3), "ours": round(ours, 3),
                      "relative": round(100 * ours / ref, 1) if ref else None}
    return table


def format_judge_table(table):
    lines = [f"{'category':<9} {'n':>3} {'reference':>10} {'ours':>6} {'relative':>9}"]
    for cat, t in table.items():
        rel = "-" if t["relative"] is None else f"{t['relative']:.1f}%"
        lines.append(f"{cat:<9} {t['n']:>3} {t['reference']:>10.2f} {t['ours']:>6.2f} {rel:>9}")
    return "\n".join(lines)


def find_image(images, name):
    """LLaVA-Bench names images by their COCO id ("000000441147.jpg"); COCO's val2014 folder
    has them as "COCO_val2014_000000441147.jpg". Either works."""
    candidates = (Path(images) / name, Path(images) / f"COCO_val2014_{name}")
    return next((c for c in candidates if c.is_file()), candidates[0])


def our_answers(args, questions):
    """The JSONL of our answers: --our-answers, else our model's, answered (resumably) beside --out."""
    if args.our_answers:
        return args.our_answers
    if not args.model or not args.images:
        raise SystemExit("error: give --model and --images (our model answers), or --our-answers FILE")
    path = Path(args.out).with_name(Path(args.out).stem + "_answers.jsonl")
    records = [{"question_id": q["question_id"], "image": str(find_image(args.images, q["image"])),
                "conversations": [{"from": "human", "value": q["text"]}]} for q in questions]
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    answer_all(model, tokenizer, records, ".", path, args.batch_size, args.max_new_tokens, key="question_id")
    return path


def judge_jobs(questions, references, ours, contexts, finished):
    """A job per question not judged yet; one that lacks a reference, our answer or its image's
    context is counted in a warning and left out."""
    jobs, lacking = [], defaultdict(list)
    for q in (q for q in questions if str(q["question_id"]) not in finished):
        qid = q["question_id"]
        gaps = [what for what, table, k in (("reference answer", references, qid), ("our answer", ours, qid),
                                            ("context", contexts, q["image"])) if k not in table]
        for what in gaps:
            lacking[what].append(qid)
        if not gaps:
            messages = judge_messages(contexts[q["image"]], q["text"], references[qid], ours[qid])
            jobs.append(Job(str(qid), messages, lambda text: (parse_scores(text), text), data=q))
    for what, ids in lacking.items():
        log(f"warning: no {what} for {len(ids)} questions (ids {ids[:10]}); not judged")
    return jobs


def cmd_judge(args):
    questions = read_jsonl(args.questions, "questions file")[: args.limit]
    references = {r["question_id"]: r["text"] for r in read_jsonl(args.answers, "reference answers file")}
    contexts = {c.image: format_context(c, with_boxes=True) for c in load_context_jsonl(args.context)}
    ours = {r["question_id"]: r["text"] for r in read_jsonl(our_answers(args, questions), "our answers file")
            if "question_id" in r}
    out = JsonlOutput(args.out)
    jobs = judge_jobs(questions, references, ours, contexts, out.finished)
    log(f"judge: {len(questions)} questions, {len(out.finished)} judged earlier in {args.out}, "
        f"{len(jobs)} to ask {args.judge_model} at {args.api_base}")
    client = client_from_args(args, args.judge_model)

    def write(job, parsed):  # the scores and the judge's whole reply
        scores, review = parsed
        out.append({"id": job.key, "question_id": job.data["question_id"], "category": job.data.get("category", "?"),
                    "scores": list(scores), "review": review})

    try:
        report = run_jobs(client, jobs, write, parse_retries=args.parse_retries)
    finally:
        out.close()
    rows = [r for r in read_jsonl(args.out, "judgments file") if isinstance(r.get("scores"), list)]
    table = relative_scores(rows)
    print(format_judge_table(table))
    print(f"judged {report.done} now (+{len(rows) - report.done} earlier); malformed judge replies re-asked "
          f"{report.reasks} times, {report.skipped.get('unparsable', 0)} questions still malformed after "
          f"{args.parse_retries} re-asks; skipped {dict(report.skipped) or 'none'}; requests {client.requests} "
          f"(retries {client.retries}), tokens {client.total_tokens}")
    summary = Path(args.scores or Path(args.out).with_suffix(".scores.json"))
    summary.write_text(json.dumps({"relative": table, "judge_model": args.judge_model, "reasks": report.reasks,
                                   "skipped": dict(report.skipped), "judged": len(rows)}, indent=1))
    print(f"scores: {summary}")
    return 0 if len(rows) == len(questions) else 3


# =============================================================================================
# 3. The paper's ablations on the tiny world
# =============================================================================================

# The paper's Table 8 (ScienceQA test accuracy, 13B).
PAPER_ABLATIONS = {"best": 90.92, "layer-1": 89.96, "answer-first": 89.77, "no-stage1": 85.81}
ABLATIONS = (  # tag, row label, run_tiny switches, trained on the answer-first targets
    ("best", "best variant (CLIP layer -2, stage 1, reasoning first)", {}, False),
    ("layer-1", "visual features: last layer (-1)", {"vision_layer": -1}, False),
    ("answer-first", "answer first (then the reasoning)", {}, True),
    ("no-stage1", "no stage 1 (stage 2 from a fresh projector)", {"skip_stage1": True}, False),
)


def cmd_ablate(args):
    import torch.distributed as dist
    import tiny  # trains through train.py: only this command needs it
    from PIL import Image

    t0, root = time.perf_counter(), Path(args.out)
    world = tiny.make_mc_world(root / "data", args.n_train, args.n_test, seed=args.seed,
                               image_size=tiny.TINY_CLIP["image_size"] * 2)
    records = data.scienceqa_to_llava(world["root"] / "problems.json", world["root"] / "pid_splits.json", "test")
    chance = 100 * sum(1 / len(r["choices"]) for r in records) / len(records)
    variants = [v for v in ABLATIONS if v[0] in args.only]
    log(f"ablate: multiple-choice world of {args.n_train} training and {args.n_test} test problems in "
        f"{world['root']}; variants {', '.join(tag for tag, *_ in variants)}")

    def accuracy(model, tokenizer, preds, blank_image=None):
        report, _ = evaluate_scienceqa(model, tokenizer, records, world["image_folder"] / "test", preds,
                                       batch_size=32, max_new_tokens=args.max_new_tokens, blank_image=blank_image,
                                       progress=False)
        return report["accuracy"]["Avg"], len(report["failures"])

    results = {}
    try:
        for tag, _, switches, answer_first in variants:
            t = time.perf_counter()
            w = {**world, "stage2": world["stage2_answer_first"]} if answer_first else world
            tiny.run_tiny(tiny.preset_config(root, args.seed), world=w, tag=tag, evaluate=False, **switches)
            model, tokenizer = load_model(root / tag / "stage2", "cpu", "fp32")  # scored as ScienceQA is
            acc, failures = accuracy(model, tokenizer, root / tag / "preds.jsonl")
            results[tag] = {"accuracy": acc, "failures": failures, "minutes": round((time.perf_counter() - t) / 60, 2)}
            if tag == "best":  # what the text alone gives: every picture replaced by a blank one
                blank = Image.new("RGB", (64, 64), tiny.BACKGROUND)
                results[tag]["blank_image_accuracy"] = accuracy(model, tokenizer, root / tag / "preds_blank.jsonl",
                                                                blank)[0]
            log(f"ablate: {tag}: {results[tag]}")
    finally:
        if dist.is_initialized():  # run_tiny's process group
            dist.destroy_process_group()
    minutes = (time.perf_counter() - t0) / 60
    print(format_ablation_table(results, chance, args, minutes))
    (root / "ablation.json").write_text(json.dumps({"results": results, "chance": round(chance, 2),
                                                    "n_train": args.n_train, "n_test": args.n_test,
                                                    "minutes": round(minutes, 2)}, indent=1))
    return 0


def format_ablation_table(results, chance, args, minutes):
    best, paper_best = results.get("best", {}).get("accuracy"), PAPER_ABLATIONS["best"]
    lines = [f"{'':<56} {'tiny world':>12}   {'paper (ScienceQA, 13B)':>22}"]
    for tag, label, _, _ in (v for v in ABLATIONS if v[0] in results):
        acc, paper = results[tag]["accuracy"], PAPER_ABLATIONS[tag]
        ours = f"{acc:.2f}" + (f" ({acc - best:+.2f})" if tag != "best" and best is not None else "")
        theirs = f"{paper:.2f}" + (f" ({paper - paper_best:+.2f})" if tag != "best" else "")
        lines.append(f"{label:<56} {ours:>12}   {theirs:>22}")
    if "blank_image_accuracy" in results.get("best", {}):
        lines.append(f"{'best variant, every test picture blank':<56} {results['best']['blank_image_accuracy']:>12.2f}")
    lines.append(f"{'chance (one option at random)':<56} {chance:>12.2f}")
    lines.append(f"accuracy (%) on {args.n_test} held-out multiple-choice problems; {args.n_train} training "
                 f"problems, seed {args.seed}; {minutes:.1f} min on the CPU")
    return "\n".join(lines)


# =============================================================================================
# Command line
# =============================================================================================

def model_args(s, required=True):
    s.add_argument("--model", required=required, help="a llava-hf directory (ours or the Hub's) or Hub name")
    s.add_argument("--batch-size", type=POSITIVE, default=8)
    s.add_argument("--max-new-tokens", type=POSITIVE, default=1024)
    s.add_argument("--device", type=device_name, default="", help="default cuda if available, else cpu")
    s.add_argument("--dtype", default="", choices=["", *DTYPES], help="default bf16 on cuda, fp32 on cpu")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scienceqa", help="accuracy per category on a ScienceQA split")
    s.set_defaults(func=cmd_scienceqa)
    model_args(s)
    s.add_argument("--root", required=True, help="the release: problems.json, pid_splits.json, images/")
    s.add_argument("--split", default="test")
    s.add_argument("--out", default="scienceqa_preds.jsonl", help="predictions JSONL, appended to and resumed from")
    s.add_argument("--scores", help="the table as JSON (default: OUT with .scores.json)")
    s.add_argument("--limit", type=int, help="only the first N problems of the split")
    s.add_argument("--prompt-format", default="QCM", choices=["QCM", "CQM"],
                   help="QCM: question, context, options (the paper's); CQM: LLaVA-1.5's evaluation file")
    s.add_argument("--letter-prompt", action="store_true",
                   help=f"append LLaVA-1.5's {LETTER_PROMPT!r} (for models trained that way)")
    s.add_argument("--template", help="conversation template (default: the checkpoint's)")

    j = sub.add_parser("judge", help="LLaVA-Bench: relative score against reference answers, by a text-only judge")
    j.set_defaults(func=cmd_judge)
    model_args(j, required=False)
    j.add_argument("--questions", required=True, help="qa90_questions.jsonl")
    j.add_argument("--answers", required=True, help="the reference answers: qa90_gpt4_answer.jsonl")
    j.add_argument("--context", required=True, help="captions and boxes: caps_boxes_coco2014_val_80.jsonl")
    j.add_argument("--images", help="COCO val2014 images (for our model's answers)")
    j.add_argument("--our-answers", help="our answers as JSONL {question_id, text}: no model needed")
    j.add_argument("--out", default="judge.jsonl", help="judgments JSONL, appended to and resumed from")
    j.add_argument("--scores", help="the summary as JSON (default: OUT with .scores.json)")
    j.add_argument("--limit", type=int, help="only the first N questions")
    j.add_argument("--judge-model", required=True, help="the judge (the paper: GPT-4)")
    add_client_args(j, workers=4, parse_retries=3, temperature=0.2, max_tokens=1024)  # the official review's

    a = sub.add_parser("ablate", help="the paper's ablations on the tiny synthetic world (CPU)")
    a.set_defaults(func=cmd_ablate)
    a.add_argument("--out", default="runs/ablate")
    a.add_argument("--n-train", type=int, default=4000,
                   help="training problems and stage-1 captions; stage-2 steps = tiny.TINY_STAGES[2] epochs "
                        "x n-train / its global batch (the model needs a few hundred to start using the picture)")
    a.add_argument("--n-test", type=int, default=300)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--max-new-tokens", type=int, default=64, help="the longest target is about 40 tokens")
    tags = ",".join(t for t, *_ in ABLATIONS)
    a.add_argument("--only", default=tags, type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
                   help="comma list of variants: " + tags)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (WeightsError, data.DataError) as e:  # a file we were given cannot be used: one line
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
