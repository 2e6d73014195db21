"""eval.py: the ScienceQA prompts as evaluation sees them, answer extraction, the paper's
category table, `eval.py scienceqa` end to end with a tiny checkpoint (interrupted and resumed),
`eval.py judge` against a fake judge on 127.0.0.1 (malformed replies included), the ablation
glue and the model-size presets."""

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import data  # noqa: E402
import eval as ev  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402
from helpers import LocalChatServer, make_sp_tokenizer  # noqa: E402
from model import LLaVA  # noqa: E402

FIX = ROOT / "tests" / "fixtures"
SQA = FIX / "scienceqa"
QA90 = FIX / "llava_bench_qa90"
CONTEXT80 = FIX / "generate_data" / "caps_boxes_coco2014_val_80.jsonl"
SYSTEM = data.VICUNA_SYSTEM


# ---- the prompt evaluation sends is the prompt training learned from ------------------------------

EXPECTED_PROMPTS = {  # vicuna_v1; the image moves to the front of the question, as in training
    "1001": f"{SYSTEM} USER: <image>\nWhich of these objects is magnetic?\nContext: Look at the picture of two "
            "objects.\nOptions: (A) wooden spoon (B) iron nail ASSISTANT:",
    "1002": f"{SYSTEM} USER: Which city is the capital of the state?\nContext: N/A\nOptions: (A) Springfield "
            "(B) Chicago (C) Peoria ASSISTANT:",
    "1004": f"{SYSTEM} USER: How many legs does a spider have?\nContext: Spiders are arachnids.\nOptions: (A) two "
            "(B) four (C) six (D) seven (E) eight ASSISTANT:",
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from llama import Tokenizer
    return Tokenizer(make_sp_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("answer_first", [False, True])
def test_eval_prompt_is_the_training_prompt_in_both_orders(tok, answer_first):
    records = data.scienceqa_to_llava(SQA / "problems.json", SQA / "pid_splits.json", "test", answer_first=answer_first)
    evaluated = {r["id"]: r for r in ev.scienceqa_records(SQA, "test")}
    assert [len(r["choices"]) for r in records] == [2, 3, 4, 5, 2]
    for r in records:
        human, target = r["conversations"][0], r["conversations"][1]["value"]
        assert evaluated[r["id"]]["conversations"][0] == human  # the target order never changes the prompt
        prompt = data.prompt_for_generation([human], "vicuna_v1", has_image="image" in r)
        if r["id"] in EXPECTED_PROMPTS:
            assert prompt == EXPECTED_PROMPTS[r["id"]]
        text, spans = data.render_conversation(r["conversations"], "vicuna_v1", has_image="image" in r)
        assert text == prompt + " " + target + "</s>" and spans == [(len(prompt), len(text))]
        # ids: the evaluation prompt is exactly the unsupervised head of the training sample
        ids, labels = data.tokenize_conversation(r["conversations"], tok, "vicuna_v1", num_patches=4,
                                                 has_image="image" in r)
        p = data.tokenize_prompt([human], tok, "vicuna_v1", has_image="image" in r, num_patches=4)
        assert ids[:len(p)] == p and set(labels[:len(p)]) == {-100}
        # everything after the prompt is learned, a lone "▁" for the template's space included
        assert -100 not in labels[len(p):]
        assert p.count(tok.image_token_id) == (4 if "image" in r else 0)


def test_official_evaluation_prompt_variants():
    r = {x["id"]: x for x in ev.scienceqa_records(SQA, "test", prompt_format="CQM", letter_prompt=True)}
    assert r["1002"]["conversations"][0]["value"] == (
        "Context: N/A\nQuestion: Which city is the capital of the state?\nOptions: (A) Springfield (B) Chicago "
        "(C) Peoria\nAnswer with the option's letter from the given choices directly.")
    # official model_vqa_science: the image first, the letter instruction right after the options
    assert data.prompt_for_generation(r["1005"]["conversations"][:1], "vicuna_v1", has_image=True) == (
        f"{SYSTEM} USER: <image>\nContext: This map shows rivers.\nQuestion: What does the map show?\n"
        "Options: (A) rivers (B) roads\nAnswer with the option's letter from the given choices directly. ASSISTANT:")


# ---- answer extraction ----------------------------------------------------------------------------

EXTRACTION = [  # reply, number of options, letter (None = failure), a word of the reason
    ("B", 2, "B", None),
    ("  B \n", 2, "B", None),
    ("(B)", 2, "B", None),
    ("B.", 2, "B", None),
    ("B. iron nail", 2, "B", None),
    ("The answer is B.", 2, "B", None),
    ("Magnets attract iron.\nAn iron nail is iron. The answer is B.", 2, "B", None),
    ("The answer is B. BECAUSE: an iron nail is made of iron.", 2, "B", None),
    ("The answer is (B).", 2, "B", None),
    ("The answer is B", 2, "B", None),  # cut off by max_new_tokens before the period
    ("A. The answer is A.", 2, "A", None),
    ("The answer is not C. The answer is B.", 3, "B", None),  # "not" is no letter
    ("", 2, None, "no answer"),
    ("The answer is B. The answer is B.", 2, None, "2 times"),  # exactly once, even when they agree
    ("The answer is A. Wait. The answer is B.", 2, None, "2 times"),
    ("A. The answer is B.", 2, None, "starts with A"),
    ("E", 2, None, "not one of the 2"),
    ("The answer is E.", 4, None, "not one of the 4"),
    ("The answer is Alabama.", 5, None, "no answer"),
    ("A spider has eight legs.", 5, None, "no answer"),  # "A " is an article, not "A."
    ("the answer is b.", 5, None, "no answer"),
    ("I think it is B", 5, None, "no answer"),
    ("AB", 5, None, "no answer"),
    ("B) iron nail", 2, None, "no answer"),
    ("Answer: B", 2, None, "no answer"),
]


@pytest.mark.parametrize("text, n, letter, why", EXTRACTION)
def test_extract_answer(text, n, letter, why):
    got, reason = ev.extract_answer(text, n)
    assert got == letter
    assert (reason is None) == (why is None)
    if why:
        assert why in reason


# ---- the paper's table on known predictions (hand-computed) ---------------------------------------

KNOWN = {"1001": "The answer is B.",            # NAT TXT IMG G1-6    right
         "1002": "B",                           # SOC NO G7-12        wrong (A)
         "1003": "D. plum",                     # LAN IMG G7-12       right
         "1004": "The answer is E. The answer is E.",  # NAT TXT G1-6   failure -> wrong
         "1005": " A"}                          # SOC TXT IMG G7-12   right
KNOWN_ACCURACY = {"NAT": 50.0, "SOC": 50.0, "LAN": 100.0, "TXT": 66.67, "IMG": 100.0, "NO": 0.0,
                  "G1-6": 50.0, "G7-12": 66.67, "Avg": 60.0}
KNOWN_TABLE = ("   NAT    SOC    LAN |    TXT    IMG     NO |   G1-6  G7-12 |    Avg\n"
               " 50.00  50.00 100.00 |  66.67 100.00   0.00 |  50.00  66.67 |  60.00")


def test_category_accuracy_on_known_predictions():
    records = ev.scienceqa_records(SQA, "test")
    report = ev.score_scienceqa(records, KNOWN)
    assert report["accuracy"] == KNOWN_ACCURACY
    assert report["count"] == {"NAT": 2, "SOC": 2, "LAN": 1, "TXT": 3, "IMG": 3, "NO": 1, "G1-6": 2, "G7-12": 3,
                               "Avg": 5}
    assert (report["correct"], report["scored"], report["missing"]) == (3, 5, [])
    assert [f["id"] for f in report["failures"]] == ["1004"]
    assert ev.format_table(report["accuracy"]) == KNOWN_TABLE
    # a partial file: only what has a reply is scored, the rest is named; empty columns print "-"
    part = ev.score_scienceqa(records, {"1002": "A"})
    assert part["missing"] == ["1001", "1003", "1004", "1005"] and part["accuracy"]["NAT"] is None
    assert part["accuracy"]["SOC"] == part["accuracy"]["Avg"] == 100.0
    assert "     - " in ev.format_table(part["accuracy"])


# ---- eval.py scienceqa end to end -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A random tiny LLaVA (tiny.make_tiny_bases + from_components) saved as a llava-hf directory."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = make_sp_tokenizer(root / "tok")
    clip_dir, llm_dir = tiny.make_tiny_bases(root, tokenizer, seed=0)
    model = LLaVA.from_components(clip_dir, llm_dir, projector="mlp2x_gelu", seed=0)
    model.save_pretrained(root / "ckpt")
    return root / "ckpt"


@pytest.fixture
def counting(monkeypatch):
    """Count the prompts LLaVA.generate_batch is asked to answer; `fail_on` = a call number
    that raises KeyboardInterrupt (the run is killed there)."""
    state = {"prompts": 0, "calls": 0, "fail_on": None}
    real = LLaVA.generate_batch

    def wrapper(self, prompts, *args, **kwargs):
        state["calls"] += 1
        if state["calls"] == state["fail_on"]:
            raise KeyboardInterrupt
        state["prompts"] += len(prompts)
        return real(self, prompts, *args, **kwargs)

    monkeypatch.setattr(LLaVA, "generate_batch", wrapper)
    return state


def sqa(ckpt, out, *extra):
    return ev.main(["scienceqa", "--model", str(ckpt), "--root", str(SQA), "--split", "test", "--out", str(out),
                    "--max-new-tokens", "4", "--device", "cpu", *extra])


def lines(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines()]


def test_scienceqa_end_to_end_resumes_without_regenerating(tiny_ckpt, tmp_path, counting, capsys):
    out = tmp_path / "preds.jsonl"
    assert sqa(tiny_ckpt, out, "--batch-size", "2", "--limit", "3") == 0  # the first 3, all answered
    assert counting["prompts"] == 3 and [r["id"] for r in lines(out)] == ["1001", "1002", "1003"]
    assert "of 3 correct" in capsys.readouterr().out
    assert sqa(tiny_ckpt, out, "--batch-size", "2") == 0
    assert counting["prompts"] == 5  # only 1004 and 1005 were generated
    rows = lines(out)
    assert sorted(r["id"] for r in rows) == ["1001", "1002", "1003", "1004", "1005"]
    scores = json.loads(out.with_suffix(".scores.json").read_text())
    assert scores["scored"] == 5 and scores["missing"] == [] and scores["generated"] == 2
    printed = capsys.readouterr().out
    assert "   NAT    SOC    LAN |    TXT    IMG     NO |   G1-6  G7-12 |    Avg" in printed
    # greedy answers do not depend on the batch they were generated in (left padding + mask)
    one = tmp_path / "batch1.jsonl"
    assert sqa(tiny_ckpt, one, "--batch-size", "1") == 0
    assert {r["id"]: r["text"] for r in lines(one)} == {r["id"]: r["text"] for r in rows}


def test_scienceqa_killed_mid_run_and_torn_line(tiny_ckpt, tmp_path, counting):
    out = tmp_path / "preds.jsonl"
    counting["fail_on"] = 2  # killed while generating the second batch
    with pytest.raises(KeyboardInterrupt):
        sqa(tiny_ckpt, out, "--batch-size", "2")
    assert [r["id"] for r in lines(out)] == ["1001", "1002"] and counting["prompts"] == 2
    with open(out, "a") as f:  # and a torn last line, as a kill inside a write leaves it
        f.write('{"id": "1003", "text": "The ans')
    counting["fail_on"] = None
    assert sqa(tiny_ckpt, out, "--batch-size", "2") == 0
    assert counting["prompts"] == 5  # 1003, 1004, 1005: nothing finished was asked again
    assert sorted(r["id"] for r in lines(out)) == ["1001", "1002", "1003", "1004", "1005"]


def test_scienceqa_table_from_known_predictions(tiny_ckpt, tmp_path, counting, capsys):
    out = tmp_path / "preds.jsonl"
    out.write_text("".join(json.dumps({"id": pid, "text": text}) + "\n" for pid, text in KNOWN.items()))
    assert sqa(tiny_ckpt, out) == 0
    assert counting["prompts"] == 0
    printed = capsys.readouterr().out
    assert KNOWN_TABLE in printed and "3 of 5 correct" in printed
    assert re.search(r"1004: 'The answer is' appears 2 times", printed)
    scores = json.loads(out.with_suffix(".scores.json").read_text())
    assert scores["accuracy"] == KNOWN_ACCURACY and [f["id"] for f in scores["failures"]] == ["1004"]


def test_scienceqa_missing_image_is_reported_and_skipped(tiny_ckpt, tmp_path, counting, capsys):
    import shutil
    root = tmp_path / "sqa"
    shutil.copytree(SQA, root)
    (root / "images" / "test" / "1003" / "image.png").unlink()
    out = tmp_path / "preds.jsonl"
    assert ev.main(["scienceqa", "--model", str(tiny_ckpt), "--root", str(root), "--out", str(out),
                    "--max-new-tokens", "2", "--device", "cpu"]) == 3
    assert "skipped 1003: image not found" in capsys.readouterr().err
    assert sorted(r["id"] for r in lines(out)) == ["1001", "1002", "1004", "1005"]


def test_a_wrong_split_or_problems_file_is_one_line(tiny_ckpt, tmp_path):
    import shutil
    root = tmp_path / "sqa"
    shutil.copytree(SQA, root)
    cmd = [sys.executable, str(ROOT / "eval.py"), "scienceqa", "--model", str(tiny_ckpt), "--root", str(root),
           "--split", "tset", "--out", str(tmp_path / "p.jsonl")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip() == f"error: {root / 'pid_splits.json'} has no split 'tset'; it has 'train', 'val', 'test'"
    (root / "problems.json").write_text('{"1001": ')
    with pytest.raises(SystemExit) as e:
        ev.main(["scienceqa", "--model", str(tiny_ckpt), "--root", str(root), "--out", str(tmp_path / "p.jsonl")])
    assert str(e.value.code).startswith(f"error: ScienceQA problems file {root / 'problems.json'} is not valid JSON")


# ---- eval.py judge against a fake judge -------------------------------------------------------------

QUESTIONS = [json.loads(l) for l in (QA90 / "qa90_questions.jsonl").read_text().splitlines()]
OUR_SCORE = lambda qid: 2 + qid % 7  # noqa: E731   the fake judge: reference 8, ours 2..8
MALFORMED = {  # question id -> replies before a good one (the first line is never two scores)
    0: ["Assistant 1: 8\nAssistant 2: 6\nBoth are good."],
    1: ["8/10 6/10\nclose call"],
    2: ["8", "8 6 5\nthree numbers"],
    3: ["Both answers are fine."] * 99,  # never well-formed: skipped after the re-asks
    4: [""],
    5: ["11 3\nout of range"],
    6: ["Assistant 1 is better.\n8 6"],  # the scores, but not on the first line
}


class FakeJudge(LocalChatServer):
    """POST /v1/chat/completions on 127.0.0.1: finds the question by our answer's text ("ours
    {qid}") and answers "8 {OUR_SCORE}\\nexplanation", after the scripted malformed replies."""

    def __init__(self, malformed):
        self.malformed = {k: list(v) for k, v in malformed.items()}
        self.requests, self.bodies, self.lock = [], [], threading.Lock()
        super().__init__(lambda h, body: self.send(h, 200, self.completion(self.reply(body))))

    def reply(self, body):
        content = body["messages"][-1]["content"]
        m = re.search(r"\[Assistant 2\]\n(?:ours (\d+)|(.*))\n", content)
        qid = int(m.group(1)) if m.group(1) else -1
        with self.lock:
            self.requests.append(qid)
            self.bodies.append(body)
            queue = self.malformed.get(qid)
            if queue:
                return queue.pop(0)
        return f"8 {OUR_SCORE(qid) if qid >= 0 else 5}\nAssistant 1 is more detailed."


def judge_args(tmp_path, url, *extra):
    return ["judge", "--questions", str(QA90 / "qa90_questions.jsonl"), "--answers",
            str(QA90 / "qa90_gpt4_answer.jsonl"), "--context", str(CONTEXT80), "--api-base", url,
            "--judge-model", "fake-judge", "--out", str(tmp_path / "judge.jsonl"), "--backoff-base", "0.01",
            *extra]


def expected_relative(qids):
    out = {}
    for cat in ("conv", "detail", "complex", "all"):
        ids = [q["question_id"] for q in QUESTIONS if q["question_id"] in qids and cat in (q["category"], "all")]
        out[cat] = pytest.approx(100 * sum(OUR_SCORE(i) for i in ids) / len(ids) / 8, abs=0.051)  # 1 decimal
    return out


def test_judge_scores_malformed_replies_and_resumes(tmp_path, capsys):
    ours = tmp_path / "ours.jsonl"
    ours.write_text("".join(json.dumps({"question_id": q["question_id"], "text": f"ours {q['question_id']}"}) + "\n"
                            for q in QUESTIONS))
    with FakeJudge(MALFORMED) as judge:
        assert ev.main(judge_args(tmp_path, judge.url, "--our-answers", str(ours), "--parse-retries", "3")) == 3
        asked = list(judge.requests)
    rows = lines(tmp_path / "judge.jsonl")
    by_id = {r["question_id"]: r for r in rows}
    assert len(rows) == 89 and 3 not in by_id  # never well-formed: not written, not scored
    for qid, r in by_id.items():  # every score came from a good reply, none from a malformed one
        assert r["scores"] == [8.0, float(OUR_SCORE(qid))], qid
        assert r["review"].startswith(f"8 {OUR_SCORE(qid)}\n")
    assert asked.count(3) == 4 and asked.count(2) == 3 and asked.count(0) == asked.count(6) == 2
    assert len(asked) == 100  # 90 first asks, 10 re-asks (1+1+2+3+1+1+1)
    printed = capsys.readouterr().out
    assert "re-asked 10 times, 1 questions still malformed" in printed
    exp = expected_relative(set(by_id))
    summary = json.loads((tmp_path / "judge.scores.json").read_text())
    assert {k: v["relative"] for k, v in summary["relative"].items()} == exp
    assert summary["relative"]["conv"]["n"] == 29 and summary["relative"]["all"]["n"] == 89  # 3 is conv
    assert re.search(rf"conv\s+29\s+8\.00\s+\S+\s+{summary['relative']['conv']['relative']}%", printed)
    # what the judge read: system + one user message in the official layout, the real context
    body = judge.bodies[0]
    assert body["model"] == "fake-judge" and body["temperature"] == 0.2
    user = body["messages"][1]["content"]
    q = next(q for q in QUESTIONS if f"ours {q['question_id']}\n" in user)
    ctx = next(json.loads(l) for l in CONTEXT80.read_text().splitlines() if json.loads(l)["image"] == q["image"])
    assert user.startswith(f"[Context]\n{ctx['captions'][0]}\n")
    assert f"\n\n{ctx['instances'][0]['category']}: [" in user
    assert f"[Question]\n{q['text']}\n\n[Assistant 1]\n" in user and "[End of Assistant 2]\n\n[System]\n" in user
    # a rerun asks only for the one question still missing
    with FakeJudge({}) as judge:
        assert ev.main(judge_args(tmp_path, judge.url, "--our-answers", str(ours))) == 0
        assert judge.requests == [3]
    assert len(lines(tmp_path / "judge.jsonl")) == 90
    final = json.loads((tmp_path / "judge.scores.json").read_text())["relative"]
    assert {k: v["relative"] for k, v in final.items()} == expected_relative(set(range(90)))


@pytest.mark.parametrize("reply", ["8 6", "8, 6", " 7.5 9 \nwhy", "\n\n10 1\nwhy", "0 10"])
def test_parse_scores_accepts(reply):
    a, b = ev.parse_scores(reply)
    assert 0 <= a <= 10 and 0 <= b <= 10


@pytest.mark.parametrize("reply", ["", "Assistant 1: 8, Assistant 2: 6", "8/10 6/10", "8", "8 6 5", "11 3",
                                   "-1 5", "Scores: 8 6", "eight six", "**8 6**", "8 and 6", "1. 8\n2. 6"])
def test_parse_scores_rejects(reply):
    with pytest.raises(ev.ParseError):
        ev.parse_scores(reply)


def test_judge_with_our_model_answering(tiny_ckpt, tmp_path, counting):
    images = tmp_path / "coco"
    images.mkdir()
    first, second = QUESTIONS[0]["image"], QUESTIONS[3]["image"]
    Image.new("RGB", (40, 30), (200, 30, 30)).save(images / first)
    Image.new("RGB", (30, 40), (30, 30, 200)).save(images / f"COCO_val2014_{second}")  # COCO's own name
    with FakeJudge({}) as judge:
        assert ev.main(judge_args(tmp_path, judge.url, "--model", str(tiny_ckpt), "--images", str(images),
                                  "--limit", "6", "--max-new-tokens", "3", "--batch-size", "4",
                                  "--device", "cpu")) == 0
        assert sorted(judge.requests) == [-1] * 6  # our (random) answers, not "ours N"
    answers = lines(tmp_path / "judge_answers.jsonl")
    assert sorted(r["question_id"] for r in answers) == [0, 1, 2, 3, 4, 5] and counting["prompts"] == 6
    assert all(r["new_tokens"] <= 3 for r in answers)
    assert len(lines(tmp_path / "judge.jsonl")) == 6


# ---- ablations ----------------------------------------------------------------------------------

def test_multiple_choice_world(tmp_path):
    w = tiny.make_mc_world(tmp_path / "mc", n_train=30, n_test=10, seed=1, image_size=64)
    problems = json.loads((w["root"] / "problems.json").read_text())
    splits = json.loads((w["root"] / "pid_splits.json").read_text())
    assert len(splits["train"]) == 30 and len(splits["test"]) == 10
    for pid in splits["train"] + splits["test"]:
        p = problems[pid]
        assert 2 <= len(p["choices"]) <= 4 and len(set(p["choices"])) == len(p["choices"])
        assert p["solution"].endswith(".") and (w["image_folder"] / p["split"] / pid / "image.png").is_file()
    for path, answer_first in ((w["stage2"], False), (w["stage2_answer_first"], True)):
        for r in json.loads(path.read_text()):
            target = r["conversations"][1]["value"]
            if answer_first:
                assert target.startswith(f"The answer is {r['answer']}. BECAUSE: ")
            else:
                assert target.endswith(f". The answer is {r['answer']}.") and not target.startswith("The answer")
            assert ev.extract_answer(target, len(r["choices"])) == (r["answer"], None)
    s1 = json.loads(w["stage1"].read_text())
    assert len(s1) == 30 and all((w["image_folder"] / r["image"]).is_file() for r in s1)
    # the tokenizer covers the world's text without byte fallback
    from llama import Tokenizer
    t = Tokenizer(w["tokenizer"])
    sample = json.loads(w["stage2"].read_text())[0]["conversations"][1]["value"]
    assert all(not t.sp.is_byte(i) for i in t.encode(sample))


def test_train_on_scienceqa_data(tmp_path):
    """`train.py --stage 2 --data scienceqa --scienceqa-root DIR --answer-first` trains on the
    release converted on the fly."""
    w = tiny.make_mc_world(tmp_path / "mc", n_train=16, n_test=2, seed=0, image_size=64)
    clip_dir, llm_dir = tiny.make_tiny_bases(tmp_path, w["tokenizer"], seed=0)
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--stage", "2", "--clip", str(clip_dir), "--llm", str(llm_dir),
           "--data", "scienceqa", "--scienceqa-root", str(w["root"]), "--answer-first", "--projector", "mlp2x_gelu",
           "--image-size", "32", "--pad-to-square", "false", "--global-batch", "8", "--micro-batch", "8",
           "--max-steps", "2", "--num-workers", "0", "--max-length", "256", "--lr", "1e-3", "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "16 samples, 2 steps" in p.stdout + p.stderr
    assert (out / "model.safetensors").is_file()
    cfg = train.parse_args(["--stage", "2", "--data", "scienceqa", "--scienceqa-root", str(w["root"])])
    records, folder = train.training_data(cfg)
    assert folder == w["root"] / "images" and records[0]["conversations"][1]["value"].endswith(
        f"The answer is {records[0]['answer']}.")
    bad = train.parse_args(["--stage", "2", "--data", "scienceqa", "--scienceqa-root", str(tmp_path)])
    with pytest.raises(SystemExit, match="no problems.json"):
        train.training_data(bad)


def test_ablate_runs_each_variant_with_its_switch(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """The glue of `eval.py ablate`: each variant is run_tiny with its one switch (training
    replaced by copying the tiny checkpoint), then evaluated on the held-out split."""
    import shutil
    calls = []

    def fake_run_tiny(cfg, skip_stage1=False, vision_layer=None, world=None, tag="", evaluate=True):
        calls.append({"tag": tag, "skip_stage1": skip_stage1, "vision_layer": vision_layer,
                      "stage2": Path(world["stage2"]).name, "out": cfg.out, "evaluate": evaluate})
        shutil.copytree(tiny_ckpt, Path(cfg.out) / tag / "stage2")
        return {"accuracy": 0.0}

    monkeypatch.setattr(tiny, "run_tiny", fake_run_tiny)
    assert ev.main(["ablate", "--out", str(tmp_path / "abl"), "--n-train", "8", "--n-test", "6",
                    "--max-new-tokens", "4"]) == 0
    assert [(c["tag"], c["skip_stage1"], c["vision_layer"], c["stage2"]) for c in calls] == [
        ("best", False, None, "stage2_reasoning_first.json"),
        ("layer-1", False, -1, "stage2_reasoning_first.json"),
        ("answer-first", False, None, "stage2_answer_first.json"),
        ("no-stage1", True, None, "stage2_reasoning_first.json")]
    assert not any(c["evaluate"] for c in calls)  # the open-answer scoring does not apply to this world
    printed = capsys.readouterr().out
    for label in ("best variant", "last layer (-1)", "answer first", "no stage 1", "chance", "every test picture blank"):
        assert label in printed
    assert "89.96 (-0.96)" in printed and "85.81 (-5.11)" in printed
    result = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert set(result["results"]) == {"best", "layer-1", "answer-first", "no-stage1"}
    assert all(len(lines(tmp_path / "abl" / t / "preds.jsonl")) == 6 for t in result["results"])


