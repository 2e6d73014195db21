"""Evaluation as in the paper: ScienceQA accuracy per category, the GPT-judged LLaVA-Bench
relative score, and the paper's ScienceQA ablations re-run in miniature on the CPU.

    python eval.py scienceqa --model runs/sqa --root ScienceQA/data/scienceqa --split test --out preds.jsonl
    python eval.py judge --model runs/stage2 --questions qa90_questions.jsonl --answers qa90_gpt4_answer.jsonl \\
        --context caps_boxes_coco2014_val_80.jsonl --images coco/val2014 --judge-model gpt-4o --out judge.jsonl
    python eval.py ablate                        # trains the tiny variants, prints the ablation table

ScienceQA gets the prompt training used; `extract_answer` reads the letter strictly (a reply without one
counts wrong and is listed, never guessed). The text-only judge (generate_data's client) scores the
reference answer and ours from the image's captions and boxes on its first line ("8 6"), re-asked while
malformed. Answers go to JSONL as they come, so a rerun resumes. Each ablation is one tiny.run_tiny switch.
"""

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from contextlib import closing
from pathlib import Path

import torch
from tqdm import tqdm

import data
from chat import load
from clip import load_image, preprocess_batch
from generate_data import (Job, JsonlOutput, ParseError, add_client_args, client_from_args, format_context,
                           load_context_jsonl, log, read_jsonl, run_jobs)
from model import DTYPES, POSITIVE, device_name, dtype_for
from weights import WeightsError


def load_model(path, device="", dtype="", lora=None):
    """A llava-hf directory (ours or the Hub's; --lora: an adapter merged) and its tokenizer, as chat.py loads them."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return load(path, device, dtype_for(device, dtype), lora)


def ask(record, tokenizer, cfg, image_folder, blank_image=None):
    """A record's first question -> (prompt ids, PIL image or None); ValueError if it cannot be asked."""
    has_image, ctx = record.get("image") is not None, cfg.text.max_position_embeddings
    ids = data.tokenize_prompt(record["conversations"][:1], tokenizer, cfg.template, has_image=has_image,
                               num_patches=cfg.num_patches)
    if len(ids) >= ctx:
        raise ValueError(f"the prompt is {len(ids)} tokens, the model's context {ctx}")
    if not has_image:
        return ids, None
    return ids, blank_image if blank_image is not None else load_image(Path(image_folder) / record["image"])


def answer_all(model, tokenizer, records, image_folder, out_path, batch_size=8, max_new_tokens=1024,
               blank_image=None, key="id"):
    """Answer greedily, `batch_size` at a time, each record `out_path` (JSONL) does not hold yet, appending
    {key: id, "text", "new_tokens"} as each batch finishes; a record that cannot be asked (no readable
    image, prompt over the context) is named and left for a rerun. blank_image replaces every picture."""
    cfg, out, done = model.config, JsonlOutput(out_path), 0
    device = model.llm.embed_tokens.weight.device
    todo = [r for r in records if str(r[key]) not in out.finished]
    log(f"{out_path}: {len(records) - len(todo)} of {len(records)} answered earlier; {len(todo)} to go")
    with closing(out), tqdm(total=len(todo), unit="q", disable=None, file=sys.stderr, leave=False) as bar:
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
    return done


def write_scores(args, summary):
    path = Path(args.scores or Path(args.out).with_suffix(".scores.json"))
    path.write_text(json.dumps(summary, indent=1))
    print(f"scores: {path}")


# ---- 1. ScienceQA ---------------------------------------------------------------------------------
SQA_GROUPS = (("NAT", "SOC", "LAN"), ("TXT", "IMG", "NO"), ("G1-6", "G7-12"), ("Avg",))
SQA_COLUMNS = tuple(c for group in SQA_GROUPS for c in group)
LETTER_PROMPT = "Answer with the option's letter from the given choices directly."  # LLaVA-1.5's eval
_LEADING = re.compile(r"\(?([A-Z])\)?(?:\.(?:\s|$)|$)")               # "B", "(B)", "B.", "B. iron nail"
_ANSWER_IS = re.compile(r"The answer is \(?([A-Z])\)?(?![A-Za-z0-9])")  # not "The answer is Alabama"


def extract_answer(text, n_choices=5):
    """A reply -> (letter, None), or (None, why). Accepted: a bare letter, a letter and a period at
    the start, or "The answer is X" exactly once (the official targets' reasoning-first ending and
    answer-first start); a start and a said answer that differ, or a letter outside the options, fail."""
    t = (text or "").strip()
    said, lead = _ANSWER_IS.findall(t), _LEADING.match(t)
    if len(said) > 1:
        return None, f"'The answer is' appears {len(said)} times"
    if lead and said and lead.group(1) != said[0]:
        return None, f"starts with {lead.group(1)}. but says the answer is {said[0]}"
    letter = said[0] if said else lead and lead.group(1)
    if not letter:
        return None, "no answer letter"
    if letter not in data.SQA_LETTERS[:n_choices]:
        return None, f"answer {letter} is not one of the {n_choices} options"
    return letter, None


def score_scienceqa(records, replies):
    """records (data.scienceqa_to_llava) and {pid: reply text} -> the report: accuracy (percent)
    and count per column of the paper's table, failures [{id, why, text}], ids without a reply."""
    right, total, failures = defaultdict(int), defaultdict(int), []
    missing = [r["id"] for r in records if r["id"] not in replies]
    for r in (r for r in records if r["id"] in replies):
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
    records = data.scienceqa_to_llava(Path(root) / "problems.json", Path(root) / "pid_splits.json", split,
                                      prompt_format=f"{prompt_format}-A")
    for r in records if letter_prompt else ():  # official --single-pred-prompt: after the text, before the image
        human, image = r["conversations"][0], "\n" + data.IMAGE if "image" in r else ""
        human["value"] = human["value"][:len(human["value"]) - len(image)] + "\n" + LETTER_PROMPT + image
    return records


def evaluate_scienceqa(model, tokenizer, records, image_folder, out_path, **answer_args):
    """Answer what `out_path` does not hold yet, then score the whole file against the records.
    -> (report, number answered in this call)."""
    generated = answer_all(model, tokenizer, records, image_folder, out_path, **answer_args)
    rows = read_jsonl(out_path, "predictions file")
    replies = {str(r["id"]): r["text"] for r in rows if isinstance(r, dict) and "text" in r}
    return score_scienceqa(records, replies), generated


def cmd_scienceqa(args, show_failures=20):
    records = scienceqa_records(args.root, args.split, args.prompt_format, args.letter_prompt)[:args.limit]
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.lora)
    model.config.template = args.template or model.config.template
    log(f"scienceqa: {len(records)} problems of split {args.split!r}, template {model.config.template} -> {args.out}")
    t0 = time.perf_counter()
    report, generated = evaluate_scienceqa(model, tokenizer, records, Path(args.root) / "images" / args.split,
                                           args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    seconds, missing, fails = time.perf_counter() - t0, len(report["missing"]), report["failures"]
    print(format_table(report["accuracy"]))
    print(f"{report['correct']} of {report['scored']} correct"
          + (f"; {missing} of {len(records)} problems have no answer yet (run again to finish)" if missing else "")
          + (f"; generated {generated} answers in {seconds:.1f}s ({generated / seconds:.2f}/s)" if generated else ""))
    if fails:
        print(f"{len(fails)} replies without a readable answer, counted wrong (all in the scores file):")
    for f in fails[:show_failures]:
        print(f"  {f['id']}: {f['why']}: {' '.join(f['text'].split())[:100]!r}")
    write_scores(args, {**report, "model": str(args.model), "split": args.split, "problems": len(records),
                        "generated": generated, "seconds": round(seconds, 2)})
    return 0 if not missing else 3


# ---- 2. The judge: LLaVA-Bench relative score ------------------------------------------------------
JUDGE_SYSTEM = "You are a careful and impartial judge of answers to questions about images."
# Our wording of the official protocol (rule.json of LLaVA-Bench): same layout, same reply format.
JUDGE_RULE = ("Above are two AI assistants' answers to a user's question about an image. You cannot see the image; "
              "the sentences and object boxes under [Context] describe it (boxes are [x1, y1, x2, y2] as fractions "
              "of the image size). Rate how helpful, relevant, accurate and detailed each answer is, with one "
              "overall score per assistant on a scale of 1 to 10, higher being better.\nOn the first line write "
              "only the two scores, Assistant 1's then Assistant 2's, separated by a space. From the second line "
              "on, explain your judgment, without letting the order in which the answers were shown, or their "
              "length, sway you.")
_SCORES = re.compile(r"\s*(\d{1,2}(?:\.\d+)?)\s*(?:,\s*|\s+)(\d{1,2}(?:\.\d+)?)\s*")


def parse_scores(text):
    """The judge's reply -> (assistant 1's score, assistant 2's): its first non-empty line must be two
    numbers from 0 to 10 and nothing else ("8 6", "7.5, 9"), else ParseError, and run_jobs asks again."""
    first = next((line for line in (text or "").splitlines() if line.strip()), "")
    m = _SCORES.fullmatch(first)
    if not (m and all(0 <= float(v) <= 10 for v in m.groups())):
        raise ParseError(f"the first line is not two scores from 0 to 10: {first[:60]!r}")
    return tuple(map(float, m.groups()))


def judge_messages(context, question, reference, ours):
    """The official layout: context, question, the two answers (reference first), the rule."""
    content = (f"[Context]\n{context}\n\n[Question]\n{question}\n\n[Assistant 1]\n{reference}\n\n"
               f"[End of Assistant 1]\n\n[Assistant 2]\n{ours}\n\n[End of Assistant 2]\n\n[System]\n{JUDGE_RULE}\n\n")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


def relative_scores(rows):
    """Judgments [{category, scores: [reference, ours]}] -> per category and "all": n, the mean
    scores, relative = 100 * mean(ours) / mean(reference) (the official summary: a ratio of means)."""
    table = {}
    for cat in sorted({r["category"] for r in rows}) + (["all"] if rows else []):
        s = [r["scores"] for r in rows if cat in (r["category"], "all")]
        ref, ours = (sum(x[i] for x in s) / len(s) for i in (0, 1))
        table[cat] = {"n": len(s), "reference": round(ref, 3), "ours": round(ours, 3),
                      "relative": round(100 * ours / ref, 1) if ref else None}
    return table


def our_answers(args, questions):
    """--our-answers, else our model's answers, written (resumably) beside --out. An image is found
    by LLaVA-Bench's name ("000000441147.jpg") or COCO val2014's ("COCO_val2014_000000441147.jpg")."""
    if args.our_answers:
        return args.our_answers
    if not args.model or not args.images:
        raise SystemExit("error: give --model and --images (our model answers), or --our-answers FILE")
    path, images = Path(args.out).with_name(Path(args.out).stem + "_answers.jsonl"), Path(args.images)
    find = lambda name: images / name if (images / name).is_file() else images / f"COCO_val2014_{name}"  # noqa: E731
    records = [{"question_id": q["question_id"], "image": str(find(q["image"])),
                "conversations": [{"from": "human", "value": q["text"]}]} for q in questions]
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.lora)
    answer_all(model, tokenizer, records, ".", path, args.batch_size, args.max_new_tokens, key="question_id")
    return path


def judge_jobs(questions, references, ours, contexts, finished):
    """A job per question not judged yet, its parse the line written for it; one without a reference,
    our answer or its image's context is named in a warning and left out."""
    jobs = []
    for q in (q for q in questions if str(q["question_id"]) not in finished):
        qid = q["question_id"]
        gaps = [what for what, table, k in (("reference answer", references, qid), ("our answer", ours, qid),
                                            ("context", contexts, q["image"])) if k not in table]
        if gaps:
            log(f"warning: question {qid}: no {' and no '.join(gaps)}; not judged")
        else:
            messages = judge_messages(contexts[q["image"]], q["text"], references[qid], ours[qid])
            line = {"id": str(qid), "question_id": qid, "category": q.get("category", "?")}
            jobs.append(Job(str(qid), messages, lambda text, line=line: {  # line=: this question's, not the last
                **line, "scores": list(parse_scores(text)), "review": text}))
    return jobs


def cmd_judge(args):
    questions = read_jsonl(args.questions, "questions file")[: args.limit]
    references = {r["question_id"]: r["text"] for r in read_jsonl(args.answers, "reference answers file")}
    contexts = {c.image: format_context(c, with_boxes=True) for c in load_context_jsonl(args.context)}
    ours = {r["question_id"]: r["text"] for r in read_jsonl(our_answers(args, questions), "our answers file")
            if "question_id" in r}
    client = client_from_args(args, args.judge_model)
    with closing(JsonlOutput(args.out)) as out:
        jobs = judge_jobs(questions, references, ours, contexts, out.finished)
        log(f"judge: {len(questions)} questions, {len(out.finished)} judged earlier in {args.out}, "
            f"{len(jobs)} to ask {args.judge_model} at {args.api_base}")
        report = run_jobs(client, jobs, lambda job, line: out.append(line), parse_retries=args.parse_retries)
    rows = [r for r in read_jsonl(args.out, "judgments file") if isinstance(r.get("scores"), list)]
    table = relative_scores(rows)
    print(f"{'category':<9} {'n':>3} {'reference':>10} {'ours':>6} {'relative':>9}")
    for cat, t in table.items():
        rel = "-" if t["relative"] is None else f"{t['relative']:.1f}%"
        print(f"{cat:<9} {t['n']:>3} {t['reference']:>10.2f} {t['ours']:>6.2f} {rel:>9}")
    print(f"judged {report.done} now (+{len(rows) - report.done} earlier); malformed judge replies re-asked "
          f"{report.reasks} times, {report.skipped.get('unparsable', 0)} questions still malformed; skipped "
          f"{dict(report.skipped) or 'none'}; requests {client.requests} (retries {client.retries}), tokens "
          f"{client.total_tokens}")
    write_scores(args, {"relative": table, "judge_model": args.judge_model, "reasks": report.reasks,
                        "skipped": dict(report.skipped), "judged": len(rows)})
    return 0 if len(rows) == len(questions) else 3


# ---- 3. The paper's ablations on the tiny world ----------------------------------------------------
ABLATIONS = {  # tag: row label, run_tiny switches, trained answer-first, the paper's (Table 8: ScienceQA, 13B)
    "best": ("best variant (CLIP layer -2, stage 1, reasoning first)", {}, False, 90.92),
    "layer-1": ("visual features: last layer (-1)", {"vision_layer": -1}, False, 89.96),
    "answer-first": ("answer first (then the reasoning)", {}, True, 89.77),
    "no-stage1": ("no stage 1 (stage 2 from a fresh projector)", {"skip_stage1": True}, False, 85.81),
}


def cmd_ablate(args):
    import torch.distributed as dist
    import tiny  # trains through train.py: only this command needs it
    from PIL import Image

    t0, root, results = time.perf_counter(), Path(args.out), {}
    world = tiny.make_mc_world(root / "data", args.n_train, args.n_test, seed=args.seed,
                               image_size=tiny.TINY_CLIP["image_size"] * 2)
    records = data.scienceqa_to_llava(world["root"] / "problems.json", world["root"] / "pid_splits.json", "test")
    tags = [t for t in ABLATIONS if t in args.only]  # in the table's order
    log(f"ablate: {args.n_train} training, {args.n_test} test problems in {world['root']}; {', '.join(tags)}")

    def accuracy(model, tok, preds, blank_image=None):  # scored as ScienceQA is
        return evaluate_scienceqa(model, tok, records, world["image_folder"] / "test", preds, batch_size=32,
                                  max_new_tokens=args.max_new_tokens, blank_image=blank_image)[0]["accuracy"]["Avg"]

    try:
        for tag in tags:
            _, switches, answer_first, _ = ABLATIONS[tag]
            w = {**world, "stage2": world["stage2_answer_first"]} if answer_first else world
            tiny.run_tiny(tiny.preset_config(root, args.seed), world=w, tag=tag, evaluate=False, **switches)
            model, tok = load_model(root / tag / "stage2", "cpu", "fp32")
            results[tag] = {"accuracy": accuracy(model, tok, root / tag / "preds.jsonl")}
            if tag == "best":  # what the text alone gives: every picture replaced by a blank one
                blank = Image.new("RGB", (64, 64), tiny.BACKGROUND)
                results[tag]["blank_image_accuracy"] = accuracy(model, tok, root / tag / "preds_blank.jsonl", blank)
            log(f"ablate: {tag}: {results[tag]}")
    finally:
        if dist.is_initialized():  # run_tiny's process group
            dist.destroy_process_group()
    chance = 100 * sum(1 / len(r["choices"]) for r in records) / len(records)
    summary = {"results": results, "chance": round(chance, 2), "n_train": args.n_train, "n_test": args.n_test,
               "seed": args.seed, "minutes": round((time.perf_counter() - t0) / 60, 2)}
    print(format_ablation_table(summary))
    (root / "ablation.json").write_text(json.dumps(summary, indent=1))
    return 0


def format_ablation_table(summary):
    results, paper_best = summary["results"], ABLATIONS["best"][3]
    best = results.get("best", {}).get("accuracy")
    rows = [("", "tiny world", "paper (ScienceQA, 13B)")]
    for tag, r in results.items():
        label, paper, acc = ABLATIONS[tag][0], ABLATIONS[tag][3], r["accuracy"]
        ours = f"{acc:.2f}" + (f" ({acc - best:+.2f})" if tag != "best" and best is not None else "")
        rows.append((label, ours, f"{paper:.2f}" + (f" ({paper - paper_best:+.2f})" if tag != "best" else "")))
    if "blank_image_accuracy" in results.get("best", {}):
        rows.append(("best variant, every test picture blank", f"{results['best']['blank_image_accuracy']:.2f}", ""))
    rows.append(("chance (one option at random)", f"{summary['chance']:.2f}", ""))
    return "\n".join([f"{a:<56} {b:>12}   {c:>22}".rstrip() for a, b, c in rows] + [
        f"accuracy (%) on {summary['n_test']} held-out multiple-choice problems; {summary['n_train']} training "
        f"problems, seed {summary['seed']}; {summary['minutes']:.1f} min on the CPU"])


# ---- Command line ----------------------------------------------------------------------------------
def add_common(s, out, what, model_required=True):
    s.add_argument("--model", required=model_required, help="a llava-hf directory (ours or the Hub's) or Hub name")
    s.add_argument("--lora", help="a LoRA adapter directory (train.py's or PEFT's) to apply to --model")
    s.add_argument("--batch-size", type=POSITIVE, default=8)
    s.add_argument("--max-new-tokens", type=POSITIVE, default=1024)
    s.add_argument("--device", type=device_name, default="", help="default cuda if available, else cpu")
    s.add_argument("--dtype", default="", choices=["", *DTYPES], help="default bf16 on cuda, fp32 on cpu")
    s.add_argument("--out", default=out, help=f"{what} JSONL, appended to and resumed from")
    s.add_argument("--scores", help="the summary as JSON (default: OUT with .scores.json)")
    s.add_argument("--limit", type=int, help="only the first N questions")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scienceqa", help="accuracy per category on a ScienceQA split")
    add_common(s, "scienceqa_preds.jsonl", "predictions")
    s.add_argument("--root", required=True, help="the release: problems.json, pid_splits.json, images/")
    s.add_argument("--split", default="test")
    s.add_argument("--prompt-format", default="QCM", choices=["QCM", "CQM"], help="CQM: LLaVA-1.5's evaluation")
    s.add_argument("--letter-prompt", action="store_true", help=f"append LLaVA-1.5's {LETTER_PROMPT!r}")
    s.add_argument("--template", help="conversation template (default: the checkpoint's)")

    j = sub.add_parser("judge", help="LLaVA-Bench: relative score against reference answers, by a text-only judge")
    add_common(j, "judge.jsonl", "judgments", model_required=False)
    j.add_argument("--questions", required=True, help="qa90_questions.jsonl")
    j.add_argument("--answers", required=True, help="the reference answers: qa90_gpt4_answer.jsonl")
    j.add_argument("--context", required=True, help="captions and boxes: caps_boxes_coco2014_val_80.jsonl")
    j.add_argument("--images", help="COCO val2014 images (for our model's answers)")
    j.add_argument("--our-answers", help="our answers as JSONL {question_id, text}: no model needed")
    j.add_argument("--judge-model", required=True, help="the judge (the paper: GPT-4)")
    add_client_args(j, workers=4, parse_retries=3, temperature=0.2, max_tokens=1024)  # the official review's sampling

    a = sub.add_parser("ablate", help="the paper's ablations on the tiny synthetic world (CPU)")
    a.add_argument("--out", default="runs/ablate")
    a.add_argument("--n-train", type=int, default=4000, help="training problems (a few hundred before it looks)")
    a.add_argument("--n-test", type=int, default=300)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--max-new-tokens", type=int, default=64, help="the longest target is about 40 tokens")
    a.add_argument("--only", nargs="+", choices=list(ABLATIONS), default=list(ABLATIONS), help="the variants to run")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return {"scienceqa": cmd_scienceqa, "judge": cmd_judge, "ablate": cmd_ablate}[args.command](args)
    except (WeightsError, data.DataError) as e:  # a file we were given cannot be used: one line
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
