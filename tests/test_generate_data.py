"""generate_data.py against a local fake OpenAI chat-completions server (127.0.0.1, no network).

The fake teacher answers with the real GPT-4 instruction data published with LLaVA-Bench
(tests/fixtures/generate_data/), written in our reply format, and can be told to misbehave:
429 with Retry-After, 500, a reply slower than the client's timeout, garbage bodies,
unparsable content, and error bodies that echo the API key back.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import generate_data as gd  # noqa: E402
from helpers import LocalChatServer  # noqa: E402

FIX = ROOT / "tests" / "fixtures" / "generate_data"
CAPTIONS = FIX / "captions_val2014_mini.json"
INSTANCES = FIX / "instances_val2014_mini.json"
CONTEXT80 = FIX / "caps_boxes_coco2014_val_80.jsonl"
GPT4 = FIX / "coco2014_val_gpt4_qa_30x3.jsonl"
KEY = "sk-test-NANOLLAVA-do-not-leak-7f3a9c1e5b"
N_IMAGES = 12  # images in the COCO-format fixture
DETAIL_QUESTIONS = (gd.PROMPTS_DIR / "detail_instructions.txt").read_text().strip().splitlines()


# -----------------------------------------------------------------------------
# The fake teacher


def _load_teacher_answers():
    """image id -> {type: (instruction, output)} from the real GPT-4 data; caption -> image id."""
    answers = {}
    for line in GPT4.read_text().splitlines():
        r = json.loads(line)
        kind = {"conv": "conversation"}.get(r["type"], r["type"])
        answers.setdefault(r["id"], {})[kind] = (r["instruction"], r["output"])
    first_caption = {}
    for line in CONTEXT80.read_text().splitlines():
        r = json.loads(line)
        first_caption[" ".join(r["captions"][0].split())] = r["id"]
    return answers, first_caption


ANSWERS, FIRST_CAPTION = _load_teacher_answers()
SYSTEMS = {gd.load_prompt(k).system: k for k in gd.TYPES}


def good_reply(image_id, kind, first_caption):
    q, a = ANSWERS.get(image_id, {}).get(kind, ("What is in the picture?", f"It shows this: {first_caption}"))
    if kind == "detail":
        return a
    if kind == "complex":
        return f"Question:\n{q}\nAnswer:\n{a}"
    return f"Question:\n{q}\nAnswer:\n{a}\nQuestion:\nWhat does the photo show?\nAnswer:\n{first_caption}"


class FakeTeacher(LocalChatServer):
    """The GPT-4 teacher on 127.0.0.1, answering from the published LLaVA-Bench data.

    script: actions for the next requests, in order (then "ok"); per_image: image id -> action
    for every request about it. Actions: ok, 429, 500, timeout, cut, garbage, nochoices, unparsable,
    echo500, echo401, echo_content. Every request is recorded as (image id, type, action)."""

    def __init__(self, latency=0.0, script=(), per_image=None, sleep_for_timeout=0.6):
        self.latency, self.script, self.per_image = latency, list(script), dict(per_image or {})
        self.sleep_for_timeout = sleep_for_timeout
        self.requests, self.times, self.auth = [], [], set()
        self.lock = threading.Lock()
        super().__init__(self.handle)

    def keys(self):
        with self.lock:
            return [f"{i}_{k}" for i, k, _ in self.requests]

    def handle(self, h, body):
        msgs = body["messages"]
        kind = SYSTEMS.get(msgs[0]["content"], "?")
        first_caption = msgs[-1]["content"].split("\n")[0]
        image_id = FIRST_CAPTION.get(first_caption, "?")
        with self.lock:
            action = self.per_image.get(image_id) or (self.script.pop(0) if self.script else "ok")
            self.requests.append((image_id, kind, action))
            self.times.append(time.monotonic())
            self.auth.add(h.headers.get("Authorization"))
        if self.latency:
            time.sleep(self.latency)
        auth = h.headers.get("Authorization", "")
        if action == "429":
            return self.send(h, 429, {"error": {"message": "slow down"}}, {"Retry-After": "0.2"})
        if action == "500":
            return self.send(h, 500, {"error": {"message": "internal error"}})
        if action == "echo500":
            return self.send(h, 500, {"error": {"message": f"boom, your header was {auth}"}})
        if action == "echo401":
            return self.send(h, 401, {"error": {"message": f"Incorrect API key provided: {auth[7:]}"}})
        if action == "timeout":
            time.sleep(self.sleep_for_timeout)
            try:
                return self.send(h, 200, self.completion(good_reply(image_id, kind, first_caption)))
            except OSError:
                return None  # the client hung up long ago
        if action == "cut":  # the reply ran to max_tokens
            reply = self.completion(good_reply(image_id, kind, first_caption))
            return self.send(h, 200, {**reply, "choices": [{**reply["choices"][0], "finish_reason": "length"}]})
        if action == "garbage":
            return self.send_raw(h, 200, b"<html>upstream proxy error</html>", "text/html")
        if action == "nochoices":
            return self.send(h, 200, {"id": "x", "object": "chat.completion", "choices": []})
        if action == "unparsable":
            return self.send(h, 200, self.completion("Sure, here is my question.\nQuestion:\nWhat is shown?"))
        if action == "echo_content":
            return self.send(h, 200, self.completion(f"Question:\nWhat key?\nAnswer:\nIt is {auth[7:]}."))
        return self.send(h, 200, self.completion(good_reply(image_id, kind, first_caption)))


def gen_args(teacher, out, *extra):
    return ["generate", "--captions", str(CAPTIONS), "--instances", str(INSTANCES), "--out", str(out),
            "--api-base", teacher.url, "--model", "fake", "--backoff-base", "0.01", "--timeout", "2", *extra]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def check_record(r, kind):
    assert r["id"].endswith("_" + kind) and r["image"].startswith("COCO_val2014_")
    conv = r["conversations"]
    assert len(conv) >= 2 and len(conv) % 2 == 0
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
    assert all(t["value"].strip() == t["value"] and t["value"] for t in conv)
    first = conv[0]["value"]
    assert first.count("<image>") == 1 and (first.startswith("<image>\n") or first.endswith("\n<image>"))
    assert all("<image>" not in t["value"] for t in conv[1:])
    if kind == "detail":
        assert first.replace("<image>", "").strip() in DETAIL_QUESTIONS
    if kind == "complex":
        assert len(conv) == 2


# -----------------------------------------------------------------------------
# Context: boxes, captions, prompts


def test_normalize_box_hand_computed():
    # 640x480 image, COCO box x=64.5 y=120 w=320.25 h=240.6 (pixels):
    # x1 = 64.5/640 = 0.10078 -> 0.101     y1 = 120/480 = 0.25
    # x2 = 384.75/640 = 0.60117 -> 0.601   y2 = 360.6/480 = 0.75125 -> 0.751
    assert gd.normalize_box([64.5, 120, 320.25, 240.6], 640, 480) == [0.101, 0.25, 0.601, 0.751]
    # a box poking outside the image is clamped to 0..1
    assert gd.normalize_box([-3.2, 470.0, 650.0, 20.0], 640, 480) == [0.0, 0.979, 1.0, 1.0]
    ctx = gd.ImageContext("000000000001", "a.jpg", ["A cat.", "A grey cat."],
                          [("cat", [0.101, 0.25, 0.601, 0.751]), ("dining table", [0.0, 0.5, 1.0, 1.0])])
    assert gd.format_context(ctx, with_boxes=True) == (
        "A cat.\nA grey cat.\n\ncat: [0.101, 0.25, 0.601, 0.751]\ndining table: [0.0, 0.5, 1.0, 1.0]")
    assert gd.format_context(ctx, with_boxes=False) == "A cat.\nA grey cat."


def test_coco_fixture_gives_the_published_context():
    """Absolute COCO xywh + image sizes -> exactly the normalised boxes LLaVA published."""
    ours = gd.load_coco(CAPTIONS, INSTANCES)
    published = {c.image_id: c for c in gd.load_context_jsonl(CONTEXT80)}
    assert len(ours) == N_IMAGES
    for c in ours:
        assert c.captions == published[c.image_id].captions
        assert c.boxes == published[c.image_id].boxes
        assert c.image == f"COCO_val2014_{c.image_id}.jpg"


def test_prompts_parse_and_are_our_own():
    # every few-shot response is in the format the parser reads
    for kind in gd.TYPES:
        p = gd.load_prompt(kind)
        assert len(p.examples) >= 2
        for ctx, resp in p.examples:
            gd.parse_reply(kind, resp)
            assert ("\n\n" in ctx) == (kind != "conversation")  # boxes only for detail/complex
    # no instruction or prompt line is copied from the published LLaVA data
    published = set()
    for line in GPT4.read_text().splitlines():
        r = json.loads(line)
        published |= {r["instruction"].lower(), *map(str.lower, r["output"].split(". "))}
    assert len(DETAIL_QUESTIONS) >= 10 and all(q and q == q.strip() for q in DETAIL_QUESTIONS)  # a question a line
    ours = list(DETAIL_QUESTIONS)
    for kind in gd.TYPES:
        p = gd.load_prompt(kind)
        ours += [line for text in [p.system] + [r for _, r in p.examples] for line in text.splitlines() if len(line) > 25]
    assert not [s for s in ours if s.lower() in published]


@pytest.mark.parametrize("kind,text,pairs", [
    ("conversation", "Question:\nHow many cats?\nAnswer:\nTwo cats.\nQuestion:\nWhere?\nAnswer:\nOn a sofa.",
     [("How many cats?", "Two cats."), ("Where?", "On a sofa.")]),
    ("conversation", "Sure! Here you go.\n\n**Question 1:** What color is the bus?\n**Answer 1:** It is red.",
     [("What color is the bus?", "It is red.")]),
    ("conversation", "question: Is it day?\nanswer: Yes, it is\nsunny.", [("Is it day?", "Yes, it is\nsunny.")]),
    ("complex", "Question:\nWhy?\nAnswer:\nBecause it rains.\n\nSecond paragraph.",
     [("Why?", "Because it rains.\n\nSecond paragraph.")]),
    ("detail", "  A red bus on a street.\n\nPeople walk by.  ", [(None, "A red bus on a street.\n\nPeople walk by.")]),
])
def test_parse_reply_good(kind, text, pairs):
    assert gd.parse_reply(kind, text) == pairs


@pytest.mark.parametrize("kind,text", [
    ("conversation", "Just some text without any labels."),
    ("conversation", "Answer:\nYes.\nQuestion:\nIs it?"),  # wrong order
    ("conversation", "Question:\nWhat?\nAnswer:\nThat.\nQuestion:\nAnd?"),  # no final answer
    ("conversation", "Question:\n\nAnswer:\nThat."),  # empty question
    ("complex", "Question:\nA?\nAnswer:\nB.\nQuestion:\nC?\nAnswer:\nD."),  # two pairs
    ("complex", ""),
    ("detail", "   "),
    ("detail", "Question:\nDescribe.\nAnswer:\nA bus."),
    ("detail", "According to the captions, a bus drives by."),  # leaks the symbolic input
    ("conversation", "Question:\nWhere is the cat?\nAnswer:\nAt [0.12, 0.4, 0.5, 0.9]."),
    ("complex", "Question:\nWhy?\nAnswer:\nThe bounding box shows a dog."),
])
def test_parse_reply_bad(kind, text):
    with pytest.raises(gd.ParseError):
        gd.parse_reply(kind, text)


def test_real_gpt4_answers_pass_the_parser():
    for image_id, by_type in ANSWERS.items():
        for kind in gd.TYPES:
            q, a = by_type[kind]
            got = gd.parse_reply(kind, good_reply(image_id, kind, "A man stands on a street."))
            assert got[0][1] == a and (kind == "detail" or got[0][0] == q)


# -----------------------------------------------------------------------------
# Generation end to end


def test_generate_all_types(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "gen.jsonl"
    with FakeTeacher() as t:
        rc = gd.main(gen_args(t, out, "--workers", "4", "--seed", "1"))
    assert rc == 0
    recs = read_jsonl(out)
    assert len(recs) == N_IMAGES * 3 == len({r["id"] for r in recs}) == len(t.requests)
    assert t.auth == {f"Bearer {KEY}"}
    by_id = {r["id"]: r for r in recs}
    for r in recs:
        kind = r["id"].rsplit("_", 1)[1]
        check_record(r, kind)
        image_id = r["id"].split("_")[0]
        # the teacher's real GPT-4 answers arrive intact
        assert r["conversations"][1]["value"] == ANSWERS[image_id][kind][1]
    firsts = [r["conversations"][0]["value"] for r in recs]
    assert any(f.startswith("<image>") for f in firsts) and any(f.endswith("<image>") for f in firsts)
    text = capsys.readouterr()
    assert f"done {N_IMAGES * 3} (+0 earlier)" in text.out and "tokens 3600 prompt + 720 completion = 4320" in text.out
    assert KEY not in text.out + text.err
    # same seed, same choices: a second output built from the same replies is identical
    out2 = tmp_path / "gen2.jsonl"
    with FakeTeacher() as t2:
        gd.main(gen_args(t2, out2, "--workers", "1", "--seed", "1"))
    assert {r["id"]: r for r in read_jsonl(out2)} == by_id


def test_conversation_gets_captions_only(tmp_path, capsys):
    ctx = gd.load_coco(CAPTIONS, INSTANCES)[0]
    prompts = {k: gd.load_prompt(k) for k in gd.TYPES}
    jobs = gd.make_jobs([ctx], gd.TYPES, prompts, 0, ["Q?"])
    user = {j.key.rsplit("_", 1)[1]: j.messages[-1]["content"] for j in jobs}
    assert user["conversation"] == "\n".join(ctx.captions)
    assert user["detail"] == user["complex"] == gd.format_context(ctx, with_boxes=True) != user["conversation"]
    assert [m["role"] for m in jobs[0].messages] == ["system", "user", "assistant", "user", "assistant", "user"]


def test_faults_are_retried_skipped_and_counted(tmp_path, monkeypatch, capsys):
    """One worker, 4 detail jobs (images sorted by id: A, B, C, D):
    A: 429 (Retry-After 0.2) -> 500 -> timeout -> garbage body -> no choices -> unparsable
       content (re-asked) -> ok: 7 requests, 5 retries, 1 re-ask, written.
    B: always 500: 1 + 5 retries = 6 requests, skipped "http 500".
    C: always unparsable content: 1 + 1 re-ask = 2 requests, skipped "unparsable".
    D: ok: 1 request."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    ids = [c.image_id for c in gd.load_coco(CAPTIONS)][:4]
    out = tmp_path / "faults.jsonl"
    script = ["429", "500", "timeout", "garbage", "nochoices", "unparsable"]
    with FakeTeacher(script=script, per_image={ids[1]: "500", ids[2]: "unparsable"}) as t:
        rc = gd.main(gen_args(t, out, "--types", "detail", "--limit", "4", "--workers", "1",
                              "--timeout", "0.25", "--max-retries", "5", "--parse-retries", "1"))
    assert rc == 3  # not everything finished
    assert [a for _, _, a in t.requests] == script + ["ok"] + ["500"] * 6 + ["unparsable"] * 2 + ["ok"]
    assert t.times[1] - t.times[0] >= 0.2  # Retry-After honoured
    recs = read_jsonl(out)  # every line is a whole record
    assert [r["id"] for r in recs] == [f"{ids[0]}_detail", f"{ids[3]}_detail"]
    for r in recs:
        check_record(r, "detail")
    text = capsys.readouterr()
    assert "done 2 (+0 earlier) of 4 jobs; skipped 2: http 500 1, unparsable 1" in text.out
    assert "requests 16 (retries 10, re-asks 2)" in text.out
    assert f"{ids[2]}_detail: unparsable reply" in text.err  # logged with the image id
    assert f"{ids[1]}_detail: http 500" in text.err
    # a rerun retries only the two skipped jobs
    with FakeTeacher() as t2:
        assert gd.main(gen_args(t2, out, "--types", "detail", "--limit", "4")) == 0
    assert sorted(t2.keys()) == sorted([f"{ids[1]}_detail", f"{ids[2]}_detail"])
    assert len(read_jsonl(out)) == 4


def test_a_cut_reply_is_asked_once_and_named(tmp_path, monkeypatch, capsys):
    """A reply that ran to max_tokens (finish_reason "length") would be cut again: skipped at once, its tokens
    counted, the flag to raise named."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeTeacher(script=["cut"]) as t:
        rc = gd.main(gen_args(t, tmp_path / "cut.jsonl", "--types", "detail", "--limit", "2", "--workers", "1",
                              "--max-tokens", "20"))
    assert rc == 3 and [a for _, _, a in t.requests] == ["cut", "ok"]
    text = capsys.readouterr()
    assert "skipped 1: cut reply 1" in text.out and "tokens 200 prompt + 40 completion = 240" in text.out
    assert "the reply ran to max_tokens 20: raise --max-tokens" in text.err
    assert len(read_jsonl(tmp_path / "cut.jsonl")) == 1


def test_budget_stops_scheduling(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "budget.jsonl"
    with FakeTeacher() as t:
        rc = gd.main(gen_args(t, out, "--max-requests", "5", "--workers", "2"))
    assert rc == 3 and len(t.requests) == 5 and len(read_jsonl(out)) == 5
    assert "budget of 5 requests spent" in capsys.readouterr().out
    with FakeTeacher() as t2:
        assert gd.main(gen_args(t2, out, "--workers", "3")) == 0
    assert len(t2.requests) == N_IMAGES * 3 - 5
    assert len({r["id"] for r in read_jsonl(out)}) == N_IMAGES * 3


def test_torn_last_line_is_cut_and_redone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "torn.jsonl"
    with FakeTeacher() as t:
        gd.main(gen_args(t, out, "--types", "detail", "--limit", "3"))
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])  # crash inside the 3rd write
    torn_id = json.loads(lines[2])["id"]
    with FakeTeacher() as t2:
        assert gd.main(gen_args(t2, out, "--types", "detail", "--limit", "3")) == 0
    assert t2.keys() == [torn_id]
    assert out.read_bytes().startswith(lines[0] + lines[1])
    assert sorted(r["id"] for r in read_jsonl(out)) == sorted(json.loads(x)["id"] for x in lines)
    assert "torn last line" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C to the process group"])
def test_kill_midway_and_resume(tmp_path, how):
    """Kill a real run after some records; the rerun asks only for unfinished pairs."""
    out = tmp_path / "killed.jsonl"
    env = dict(os.environ, OPENAI_API_KEY=KEY)
    with FakeTeacher(latency=0.3) as t:  # ~5 s of work: a busy machine still signals it midway
        cmd = [sys.executable, str(ROOT / "generate_data.py"), *gen_args(t, out, "--workers", "2")]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                             start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 6):
            time.sleep(0.02)
        p.kill() if how == "kill -9" else os.killpg(p.pid, signal.SIGINT)
        o1, e1 = p.communicate()
        run1 = t.keys()
    if how != "kill -9":  # one line that says what to do, no traceback
        assert p.returncode == 130 and b"run the same command to go on" in e1 and b"Traceback" not in e1, e1
    before = out.read_bytes()
    finished = {json.loads(x)["id"] for x in before.splitlines(keepends=True) if x.endswith(b"\n")}
    assert 6 <= len(finished) < N_IMAGES * 3
    with FakeTeacher() as t2:
        p2 = subprocess.run([sys.executable, str(ROOT / "generate_data.py"), *gen_args(t2, out, "--workers", "4")],
                            env=env, capture_output=True, cwd=tmp_path, timeout=60)
        run2 = t2.keys()
    assert p2.returncode == 0, p2.stderr.decode()
    recs = read_jsonl(out)
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)) == N_IMAGES * 3  # no duplicates, nothing missing
    assert out.read_bytes().startswith(before[: before.rfind(b"\n") + 1])  # finished answers kept as written
    assert not set(run2) & finished  # no request repeated for a finished pair
    assert len(run2) == N_IMAGES * 3 - len(finished)  # exactly the unfinished ones, once each
    assert set(run1) | set(run2) == set(ids)
    lost = set(run1) - finished  # sent but unwritten when killed: at most the window, 2 x workers
    assert len(lost) <= 4
    for blob in (o1, e1, p2.stdout, p2.stderr, out.read_bytes()):
        assert KEY.encode() not in blob


# -----------------------------------------------------------------------------
# The key never leaks


def test_api_key_never_leaks(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "leak.jsonl"
    ids = [c.image_id for c in gd.load_coco(CAPTIONS)]
    # error bodies that echo the key (retried, then skipped)
    with FakeTeacher(per_image={ids[0]: "echo500"}) as t:
        rc = gd.main(gen_args(t, out, "--types", "conversation", "--limit", "3", "--max-retries", "1"))
    assert rc == 3
    text = capsys.readouterr()
    assert "***" in text.err and KEY not in text.out + text.err and KEY not in out.read_text()
    # 401 echoing the key: the client stops (no other request could succeed), scrubbed
    with FakeTeacher(per_image={i: "echo401" for i in ids}) as t:
        rc = gd.main(gen_args(t, tmp_path / "leak401.jsonl", "--workers", "2"))
    text = capsys.readouterr()
    assert rc == 3 and "stopped: http 401" in text.out and len(t.requests) <= 2
    assert KEY not in text.out + text.err
    # exceptions raised by the client: message, traceback, chain, repr
    with FakeTeacher(per_image={"?": "echo500"}) as t:
        client = gd.ChatClient(t.url, "fake", max_retries=0, log=lambda m: None)
        with pytest.raises(gd.APIError) as ei:
            client.complete([{"role": "user", "content": "hi"}])
    e = ei.value
    blob = str(e) + "".join(traceback.format_exception(e)) + repr(client) + repr(e.__context__) + repr(e.__cause__)
    assert e.reason == "http 500" and "***" in str(e) and KEY not in blob
    # a connection error (nothing listens there any more)
    client = gd.ChatClient(t.url, "fake", max_retries=0, log=lambda m: None)
    with pytest.raises(gd.APIError) as ei:
        client.complete([{"role": "user", "content": "hi"}])
    assert ei.value.reason == "connection error" and KEY not in "".join(traceback.format_exception(ei.value))


def test_a_dummy_key_never_rewrites_what_the_teacher_wrote(tmp_path, monkeypatch, capsys):
    """Local servers take any word as a key (EMPTY, ollama, ...): it is scrubbed where a key can
    appear (an echoed error), never from a reply, so the records keep the teacher's words."""
    monkeypatch.setenv("OPENAI_API_KEY", "the")
    out = tmp_path / "dummy.jsonl"
    ids = [c.image_id for c in gd.load_coco(CAPTIONS)]
    with FakeTeacher(per_image={ids[0]: "echo500", ids[1]: "echo_content"}) as t:
        rc = gd.main(gen_args(t, out, "--types", "conversation", "--limit", "3", "--max-retries", "0"))
    assert rc == 3 and "header was Bearer ***" in capsys.readouterr().err
    replies = {r["id"]: [c["value"] for c in r["conversations"] if c["from"] == "gpt"] for r in read_jsonl(out)}
    assert replies[f"{ids[1]}_conversation"] == ["It is the."]  # the key in a reply is the reply's text
    first_caption = gd.load_coco(CAPTIONS)[2].captions[0]
    expected = [a for _, a in gd.parse_qa(good_reply(ids[2], "conversation", first_caption))]
    assert replies[f"{ids[2]}_conversation"] == expected and any(" the " in a for a in expected)


def test_a_teacher_that_is_down_stops_the_run_in_one_line(tmp_path, capsys):
    import socket
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    args = ["generate", "--captions", str(CAPTIONS), "--instances", str(INSTANCES), "--out", str(tmp_path / "o.jsonl"),
            "--api-base", url, "--backoff-base", "0.01", "--workers", "2", "--max-retries", "4"]
    t0 = time.monotonic()
    assert gd.main(args) == 3 and time.monotonic() - t0 < 20
    out = capsys.readouterr().out
    assert f"stopped: no connection to {url}/chat/completions: is --api-base right" in out
    assert f"done 0 (+0 earlier) of {N_IMAGES * 3} jobs" in out and "stopped " in out  # the rest unasked
    # a single job with a single try says the same
    assert gd.main(args[:-2] + ["--max-retries", "0", "--limit", "1", "--types", "conversation"]) == 3
    out = capsys.readouterr().out
    assert "skipped 1: connection error 1" in out and "is --api-base right" in out, out


def test_no_usable_caption_is_an_error(tmp_path):
    empty = tmp_path / "captions.json"
    empty.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}))
    with pytest.raises(SystemExit) as e:
        gd.main(["generate", "--captions", str(empty), "--types", "conversation", "--api-base", "http://127.0.0.1:9"])
    assert f"error: {empty}: no image with a usable caption" in str(e.value.code)


# -----------------------------------------------------------------------------
# The client, reused as eval.py's judge would use it


def test_run_jobs_for_a_judge():
    """A custom parse (a 1-10 score) re-asks on malformed replies; handle_result runs in the
    caller's thread; usage is summed."""
    replies = iter(["8 7", "Score: great", "6 9", "10 2"])
    lock = threading.Lock()

    class Teacher(FakeTeacher):
        def handle(self, h, body):
            with lock:
                text = next(replies)
            self.requests.append(("?", "judge", text))
            self.send(h, 200, self.completion(text))

    def parse(text):
        parts = text.split()
        if len(parts) != 2 or not all(p.isdigit() and 1 <= int(p) <= 10 for p in parts):
            raise gd.ParseError(f"not two scores: {text!r}")
        return tuple(map(int, parts))

    got, threads = {}, set()
    with Teacher() as t:
        client = gd.ChatClient(t.url, "judge", workers=1, api_key="", log=lambda m: None)
        jobs = [gd.Job(f"q{i}", [{"role": "user", "content": f"question {i}"}], parse) for i in range(3)]
        report = gd.run_jobs(client, jobs, lambda job, s: (got.__setitem__(job.key, s),
                                                           threads.add(threading.get_ident())))
    assert got == {"q0": (8, 7), "q1": (6, 9), "q2": (10, 2)}
    assert threads == {threading.get_ident()}
    assert report.done == 3 and report.reasks == 1 and not report.skipped
    assert client.requests == 4 and client.total_tokens == 480
    assert t.auth == set() or t.auth == {None}  # no key given: no Authorization header


# -----------------------------------------------------------------------------
# merge


def _fake_records(n_by_type):
    recs = []
    for kind, n in n_by_type.items():
        for i in range(n):
            recs.append({"id": f"{i:012d}_{kind}", "image": f"{i}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": f"A {kind} {i}."}]})
    return recs


def test_merge_ratios(tmp_path, capsys):
    recs = _fake_records({"conversation": 10, "detail": 4, "complex": 6})
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in recs[:12]) + "not json\n")
    bad = {"id": "x_detail", "image": "x.jpg", "conversation": "misspelt"}
    b.write_text("".join(json.dumps(r) + "\n" for r in recs[10:] + [bad]) + '{"id": "torn')  # dup + bad + torn
    kinds = lambda path: sorted(r["id"].rsplit("_", 1)[1] for r in json.loads(Path(path).read_text()))  # noqa: E731

    assert gd.main(["merge", "--inputs", str(a), str(b), "--out", str(tmp_path / "all.json")]) == 0
    assert kinds(tmp_path / "all.json") == ["complex"] * 6 + ["conversation"] * 10 + ["detail"] * 4
    gd.main(["merge", "--inputs", str(a), str(b), "--out", str(tmp_path / "eq.json"),
             "--ratio", "conversation=1,detail=1,complex=1"])
    assert kinds(tmp_path / "eq.json") == ["complex"] * 4 + ["conversation"] * 4 + ["detail"] * 4
    gd.main(["merge", "--inputs", str(a), str(b), "--out", str(tmp_path / "r.json"),
             "--ratio", "conversation=2,detail=1,complex=0"])
    assert kinds(tmp_path / "r.json") == ["conversation"] * 8 + ["detail"] * 4
    # seeded shuffle: same seed same order, another seed another order
    orders = []
    for seed, name in ((0, "s0.json"), (0, "s0b.json"), (1, "s1.json")):
        gd.main(["merge", "--inputs", str(a), str(b), "--out", str(tmp_path / name), "--seed", str(seed)])
        orders.append([r["id"] for r in json.loads((tmp_path / name).read_text())])
    assert orders[0] == orders[1] != orders[2]
    err = capsys.readouterr().err
    assert "duplicate id" in err and "torn last line" in err and "is not a LLaVA record; skipped" in err


# -----------------------------------------------------------------------------
# The records load and tokenize through data.py (when data.py is there)


def _data_module():
    try:
        import data
    except ImportError:
        pytest.skip("data.py not present yet")
    if not hasattr(data, "tokenize_conversation"):
        pytest.skip("data.py has no tokenize_conversation yet")
    return data


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A small sentencepiece BPE model trained on the fixture text (byte fallback, like LLaMA's)."""
    spm = pytest.importorskip("sentencepiece")
    llama = pytest.importorskip("llama")
    d = tmp_path_factory.mktemp("tok")
    text = [line for line in (r["output"] for r in map(json.loads, GPT4.read_text().splitlines()))]
    text += [c for r in map(json.loads, CONTEXT80.read_text().splitlines()) for c in r["captions"]]
    (d / "corpus.txt").write_text("\n".join(text))
    spm.SentencePieceTrainer.train(  # LLaMA-like: identity normalisation, byte fallback
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=600, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        num_threads=1, minloglevel=2)
    return llama.Tokenizer(d / "tokenizer.model")


def _dataset(data, path, image_folder, tok, template):
    """data.LazySupervisedDataset over our file, every image a small real JPEG."""
    from PIL import Image

    for r in json.loads(Path(path).read_text()):
        (image_folder / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        if not (image_folder / r["image"]).exists():
            Image.new("RGB", (40, 30), (200, 100, 50)).save(image_folder / r["image"])
    return data.LazySupervisedDataset(str(path), str(image_folder), tok, template, image_size=28, num_patches=4)


def _squash(text):
    return "".join(text.split())


def test_records_tokenize_through_data_py(tmp_path, monkeypatch, tiny_tokenizer):
    data = _data_module()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "gen.jsonl"
    with FakeTeacher() as t:
        gd.main(gen_args(t, out, "--workers", "4"))
    merged = tmp_path / "llava_instruct.json"
    gd.main(["merge", "--inputs", str(out), "--out", str(merged)])
    tok = tiny_tokenizer
    ds = _dataset(data, merged, tmp_path / "images", tok, "vicuna_v1")
    assert len(ds) == N_IMAGES * 3
    for i in range(len(ds)):
        s = ds[i]
        assert isinstance(s, dict), f"data.py skipped our record: {s}"
        ids, labels = s["input_ids"].tolist(), s["labels"].tolist()
        assert ids.count(tok.image_token_id) == 4 and s["pixel_values"] is not None
        supervised = [x for x, lab in zip(ids, labels) if lab != -100]
        # exactly the assistant replies (+ one </s> each) are learned
        replies = [t["value"] for t in ds.records[i]["conversations"][1::2]]
        assert supervised.count(tok.eos_id) == len(replies)
        assert _squash(tok.decode(supervised)) == _squash("".join(replies))


def test_help_says_where_the_key_comes_from_and_every_flag_has_help(capsys):
    parser = gd.build_parser()
    assert "OPENAI_API_KEY" in parser.format_help()
    subs = next(a for a in parser._actions if a.choices and "merge" in a.choices).choices
    for name in ("generate", "merge"):
        for action in subs[name]._actions:
            assert action.help, (name, action.dest)  # every flag says what it does
