"""GPT-assisted visual instruction data, as in the LLaVA paper (Liu et al. 2023, section 3).

A text-only teacher never sees a pixel: it gets each image's COCO captions and (detail, complex)
boxes `category: [x1, y1, x2, y2]` in 0..1; a system message and few-shot examples (prompts/<type>/)
ask it for a multi-turn `conversation`, a `detail`ed description or one `complex` reasoning question.
`generate` makes each reply a LLaVA-Instruct record, `merge --ratio conversation=58,detail=23,complex=77`
the records one training file. A paid answer is asked for once: the output JSONL (an fsync'ed line
a record) is the only progress record; a rerun skips its ids. The key comes from OPENAI_API_KEY and
is scrubbed from all that a server echoes back.
"""

import argparse
import fcntl
import json
import os
import random
import re
import sys
import threading
from collections import Counter, defaultdict, namedtuple
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import closing, suppress
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import requests
from tqdm import tqdm

import weights

TYPES = ("conversation", "detail", "complex")
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
Prompt = namedtuple("Prompt", "system examples")  # examples: [(context, ideal response), ...]
# image_id: LLaVA's 12-digit form of COCO's id; boxes: [(category, [x1, y1, x2, y2] in 0..1), ...]
ImageContext = namedtuple("ImageContext", "image_id image captions boxes")
# key names the job in logs; parse(text) -> what the caller keeps, or a ParseError to re-ask
Job = namedtuple("Job", "key messages parse")


def log(msg):
    print(msg, file=sys.stderr, flush=True)  # stdout carries only the summaries


def read_text(path, what):
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        sys.exit(f"error: {what} {path} not found")


def read_jsonl(path, what):
    """The records of a JSON-lines file; an unreadable line is named and skipped."""
    text = read_text(path, what)
    lines, rows = text.splitlines(), []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if line.strip():
                torn = n == len(lines) and not text.endswith("\n")  # what a crash inside a write leaves
                log(f"warning: {path}:{n}: {'torn last line' if torn else 'unreadable line'}; skipped")
    return rows


def read_json(path, what):
    """A .json file's document, else the records of a JSON-lines file."""
    try:
        return json.loads(read_text(path, what)) if str(path).endswith(".json") else read_jsonl(path, what)
    except json.JSONDecodeError as e:
        sys.exit(f"error: {what} {path} is not valid JSON ({e})")


# ---- 1. The symbolic context in, the teacher's reply out as a record ------------------------------
def normalize_box(bbox_xywh, width, height):
    """COCO [x, y, w, h] in pixels -> [x1, y1, x2, y2] in 0..1, clamped, 3 decimals."""
    x, y, w, h = map(float, bbox_xywh)
    return [round(min(max(v, 0.0), 1.0), 3) for v in (x / width, y / height, (x + w) / width, (y + h) / height)]


def format_context(ctx, with_boxes):
    boxes = [f"{cat}: [{', '.join(map(str, box))}]" for cat, box in ctx.boxes] if with_boxes else []
    return "\n".join(ctx.captions) + ("\n\n" + "\n".join(boxes) if boxes else "")


def _clean(text):
    return " ".join(str(text).split())  # COCO captions carry stray newlines and double spaces


def load_coco(captions_path, instances_path=None):
    """COCO captions (+ instances: boxes) -> a context per captioned image, sorted by id (for --limit)."""
    caps, captions, boxes = read_json(captions_path, "COCO captions"), defaultdict(list), defaultdict(list)
    inst = read_json(instances_path, "COCO instances") if instances_path else {}
    try:
        for a in caps["annotations"]:
            if _clean(a.get("caption", "")):
                captions[a["image_id"]].append(_clean(a["caption"]))
        names = {c["id"]: c["name"] for c in inst.get("categories", [])}
        sizes = {im["id"]: (im["width"], im["height"]) for im in inst.get("images", [])}
        for a in inst.get("annotations", []):  # an image the file does not list is a KeyError, as a bad file
            boxes[a["image_id"]].append((names[a["category_id"]], normalize_box(a["bbox"], *sizes[a["image_id"]])))
        return [ImageContext(f"{im['id']:012d}", im["file_name"], captions[im["id"]], boxes[im["id"]])
                for im in sorted(caps["images"], key=lambda im: im["id"]) if captions[im["id"]]]
    except (AttributeError, KeyError, TypeError) as e:
        sys.exit(f"error: {captions_path} / {instances_path}: not COCO captions / instances files ({e!r})")


def load_context_jsonl(path):
    """LLaVA-Bench's form: a line per image with id, image, captions, instances [{category, bbox}]."""
    out = []
    for r in read_json(path, "context"):
        try:
            boxes = [(i["category"], [round(float(v), 3) for v in i["bbox"]]) for i in r.get("instances", [])]
            out.append(ImageContext(str(r["id"]), r["image"], [_clean(c) for c in r["captions"]], boxes))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            log(f"warning: {path}: unreadable context record ({e!r}); skipped")
    return sorted(out, key=lambda c: c.image_id)


def load_prompt(kind):
    """prompts/<kind>/system.txt and its example_<k>_context.txt / example_<k>_response.txt pairs."""
    folder = PROMPTS_DIR / kind
    read = lambda p: read_text(p, f"prompt file (type {kind}; in prompts/)").strip()  # noqa: E731
    return Prompt(read(folder / "system.txt"), [(read(c), read(c.with_name(c.name.replace("_context", "_response"))))
                                                for c in sorted(folder.glob("example_*_context.txt"))])


class ParseError(ValueError):
    """The teacher's reply does not follow the format; the job re-asks, then skips."""


# conversation: "Question:\n<q>\nAnswer:\n<a>\n..." (one or more pairs); complex: exactly one pair;
# detail: the description alone. Labels may come bold or numbered ("**Question 1:**").
_LABEL = re.compile(r"^[ \t]*(?:\*\*)?(question|answer)(?:[ \t]*\d+)?[ \t]*:(?:\*\*)?[ \t]*", re.I | re.M)
# The teacher must answer as if it saw the photo; these betray the symbolic input.
_LEAK = re.compile(r"\bcaptions?\b|\bbounding box(?:es)?\b|\bcoordinates?\b|\[\s*[01]?\.\d+\s*,", re.I)


def parse_qa(text):
    """'Question:'/'Answer:' blocks -> [(q, a), ...]. A preamble before the first label ("Sure!
    Here you go.") is ignored; anything else out of order, or an empty block, is an error."""
    labels = list(_LABEL.finditer(text))
    ends = [m.start() for m in labels[1:]] + [len(text)]
    blocks = [(m.group(1).lower(), text[m.end():end].strip()) for m, end in zip(labels, ends)]
    kinds = [k for k, _ in blocks]
    if not blocks or kinds != ["question", "answer"] * (len(kinds) // 2) or not all(b for _, b in blocks):
        raise ParseError(f"not alternating non-empty Question:/Answer: blocks: {' '.join(k[0] for k in kinds)!r}")
    return [(q, a) for (_, q), (_, a) in zip(blocks[::2], blocks[1::2])]


def parse_reply(kind, text):
    """-> [(question, answer), ...]; detail's question is None (it is drawn from our list)."""
    text = (text or "").strip()
    if kind == "detail" and (not text or _LABEL.search(text)):
        raise ParseError("a description must be non-empty text without Question:/Answer: labels")
    pairs = [(None, text)] if kind == "detail" else parse_qa(text)
    if kind == "complex" and len(pairs) != 1:
        raise ParseError(f"expected exactly one question and answer, got {len(pairs)}")
    if leak := next((m for q, a in pairs for m in (_LEAK.search(a), q and _LEAK.search(q)) if m), None):
        raise ParseError(f"mentions the symbolic input ({leak.group(0)!r})")
    return pairs


def make_record(ctx, kind, seed, detail_questions, reply):
    """The teacher's reply -> the record train.py reads (or a ParseError); <image> before or after
    the first question at random, as LLaVA's."""
    pairs, rng = parse_reply(kind, reply), random.Random(f"{seed}:{ctx.image_id}:{kind}")  # a rerun chooses alike
    if kind == "detail":
        pairs = [(rng.choice(detail_questions), pairs[0][1])]
    (q, a), *rest = pairs
    turns = [(f"<image>\n{q}" if rng.random() < 0.5 else f"{q}\n<image>", a), *rest]
    return {"id": f"{ctx.image_id}_{kind}", "image": ctx.image, "conversations": [
        {"from": who, "value": v} for turn in turns for who, v in zip(("human", "gpt"), turn)]}


# ---- 2. The API client: OpenAI chat completions over `requests`, run on a thread pool -------------
class APIError(RuntimeError):
    """A request that failed for good; `reason` is short and countable ("http 500", "budget")."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


class ChatClient:
    """Thread-safe POST {api_base}/chat/completions, every attempt counted against `max_requests`.
    408/409/429/5xx, timeouts, lost connections and malformed bodies are retried after about
    base * 2**attempt seconds, never sooner than Retry-After; 401/403/404, a malformed URL and a
    request that never connected stop it, as no other request could succeed."""

    def __init__(self, api_base, model, workers=4, max_requests=None, timeout=120.0, max_retries=6,
                 backoff_base=1.0, api_key=None, log=log, **params):
        self.url, self.body = api_base.rstrip("/") + "/chat/completions", {"model": model, **params}
        self.workers, self.max_requests, self.timeout, self.max_retries = workers, max_requests, timeout, max_retries
        self.backoff_base, self.log, self.stop_reason = backoff_base, log, None
        self._secret = (os.environ.get("OPENAI_API_KEY", "") if api_key is None else api_key).strip()
        self._headers = {"Authorization": f"Bearer {self._secret}"} if self._secret else {}
        self._lock, self._stop = threading.Lock(), threading.Event()
        self.requests = self.retries = self.prompt_tokens = self.completion_tokens = self.total_tokens = 0

    def scrub(self, text):
        """For what a server echoes, never for a reply: a dummy key ("the") must not rewrite it."""
        return text.replace(self._secret, "***") if self._secret else text

    def stop(self, why):
        """No new requests and no more retries; the requests already on the wire finish."""
        self.stop_reason = self.stop_reason or self.scrub(why)
        self._stop.set()

    def complete(self, messages):
        """-> the reply text, else an APIError (its message scrubbed) once it gives up."""
        body, delay = {**self.body, "messages": messages}, 0.0
        for attempt in range(self.max_retries + 1):
            if self._stop.wait(delay):  # stopped: nothing more is sent
                raise APIError("stopped", f"client stopped: {self.stop_reason}")
            with self._lock:
                if self.max_requests is not None and self.requests >= self.max_requests:
                    raise APIError("budget", f"request budget of {self.max_requests} spent")
                self.requests, self.retries = self.requests + 1, self.retries + (attempt > 0)
            reason, detail, then, retry_after = self._attempt(body)
            if reason is None:
                return detail
            message = self.scrub(f"{reason} from {self.url}: {detail}")
            if reason == "connection error" and attempt == self.max_retries:  # no server there, for any job
                self.stop(f"no connection to {self.url}: is --api-base right and the server up?")
            if then == "stop":
                self.stop(message)
            if then != "retry" or attempt == self.max_retries:
                raise APIError(reason, message)
            delay = min(60.0, self.backoff_base * 2 ** attempt) * random.uniform(0.5, 1.0)
            with suppress(TypeError, ValueError):  # never sooner than Retry-After in seconds (a date: ignored)
                delay = max(delay, min(float(retry_after), 600.0))
            self.log(f"{message[:160]}; retry {attempt + 1}/{self.max_retries} in {delay:.2f}s")

    def _attempt(self, body):
        """One POST -> (None, reply, ...) or (reason, detail, "retry" | "fail" | "stop", Retry-After).
        An exception ends here as a string: no APIError may chain back to the request and its key."""
        try:
            resp = requests.post(self.url, json=body, headers=self._headers, timeout=self.timeout)
        except (ValueError, requests.RequestException) as e:  # a malformed URL is a ValueError
            reason = "timeout" if isinstance(e, requests.Timeout) else "connection error" if isinstance(
                e, requests.ConnectionError) else "request error"
            return reason, f"{type(e).__name__}: {str(e)[:300]}", "stop" if isinstance(e, ValueError) else "retry", None
        if (s := resp.status_code) != 200:
            then = "stop" if s in (401, 403, 404) else "retry" if s in (408, 409, 429) or s >= 500 else "fail"
            return f"http {s}", resp.text[:300].strip(), then, resp.headers.get("Retry-After")
        try:
            data = resp.json()
            choice, usage = data["choices"][0], data.get("usage") or {}
            text, cut_off = choice["message"]["content"], choice.get("finish_reason") == "length"
            p, c, t = (int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):
            text = None
        if not isinstance(text, str):
            return "bad response", f"no whole reply at choices[0].message.content: {resp.text[:160]!r}", "retry", None
        with self._lock:  # a cut reply's tokens are spent too
            self.prompt_tokens, self.completion_tokens = self.prompt_tokens + p, self.completion_tokens + c
            self.total_tokens += t or p + c
        if cut_off:  # the same request would be cut again: not retried
            why = f"the reply ran to max_tokens {self.body.get('max_tokens')}: raise --max-tokens"
            return "cut reply", why, "fail", None
        return None, text, None, None


def run_jobs(client, jobs, handle_result, parse_retries=2):
    """Every job through `client` -> report (done, skipped by reason, reasks). A ParseError from
    `job.parse(text)` re-asks, `parse_retries` times at most; `handle_result(job, parsed)` runs in
    this thread, so the one place that writes needs no lock; a kill loses only the answers in flight."""
    report = SimpleNamespace(done=0, skipped=Counter(), reasks=0)

    def work(job):  # -> (ok, parsed or reason, re-asks); never raises
        for attempt in range(parse_retries + 1):
            try:
                text = client.complete(job.messages)
                return True, job.parse(text), attempt
            except APIError as e:
                if e.reason not in ("budget", "stopped"):
                    client.log(f"{job.key}: {e}")
                return False, e.reason, attempt
            except ParseError as e:
                client.log(f"{job.key}: unparsable reply, attempt {attempt + 1}/{parse_retries + 1}: {e}")
        return False, "unparsable", parse_retries

    with ThreadPoolExecutor(client.workers, thread_name_prefix="chat") as pool:
        futures = {pool.submit(work, job): job for job in jobs}  # once stopped or spent, a job ends unasked
        try:
            for fut in tqdm(as_completed(futures), total=len(futures), unit="job", disable=None, file=sys.stderr):
                (ok, value, reasks), job = fut.result(), futures[fut]
                report.reasks += reasks
                if ok:
                    handle_result(job, value)
                    report.done += 1
                else:
                    report.skipped[value] += 1
        except KeyboardInterrupt:  # quit at once, as safe as kill -9: what finished is on disk
            print("\ninterrupted: the finished answers are saved; run the same command to go on", file=sys.stderr)
            os._exit(130)
        except BaseException:  # the jobs in flight end at once, without retries
            client.stop("the run failed")
            pool.shutdown(cancel_futures=True)
            raise
    return report


class JsonlOutput:
    """An append-only JSONL file that is also the resume state (`finished`: its ids), locked against a
    second run; a torn last line (a crash inside a write) is cut off, so its job is asked again."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            sys.exit(f"error: another run is writing {self.path}; wait for it or choose another --out")
        data = self.path.read_bytes()
        if (keep := data.rfind(b"\n") + 1) < len(data):
            os.truncate(self.fd, keep)
            os.fsync(self.fd)
            log(f"{self.path}: cut off a torn last line ({len(data) - keep} bytes) left by an interrupted run")
        self.finished = {r["id"] for r in read_jsonl(self.path, "output") if isinstance(r, dict) and "id" in r}

    def append(self, record):
        """One write of one whole line, on disk before the job counts as done."""
        os.write(self.fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        os.fsync(self.fd)
        self.finished.add(record["id"])

    def close(self):
        os.close(self.fd)


def add_client_args(p, workers=8, parse_retries=2, temperature=None, max_tokens=None):
    """The flags of a ChatClient and run_jobs, shared by every command that asks a model."""
    p.add_argument("--api-base", default="https://api.openai.com/v1",
                   help="any OpenAI-compatible server (vLLM, llama.cpp, ollama: http://host:port/v1)")
    p.add_argument("--workers", type=int, default=workers, help="concurrent requests")
    p.add_argument("--max-requests", type=int, help="budget: HTTP requests, retries included")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--max-retries", type=int, default=6, help="per request, on 429/5xx/timeouts")
    p.add_argument("--backoff-base", type=float, default=1.0, help="the first retry waits about this many seconds")
    p.add_argument("--parse-retries", type=int, default=parse_retries, help="re-asks when a reply does not parse")
    p.add_argument("--temperature", type=float, default=temperature, help="default %(default)s (None: the server's)")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="default %(default)s (None: the server's)")


def client_from_args(args, model):
    params = {k: getattr(args, k) for k in ("temperature", "max_tokens") if getattr(args, k) is not None}
    return ChatClient(args.api_base, model, args.workers, args.max_requests, args.timeout, args.max_retries,
                      args.backoff_base, **params)


# ---- 3. The two subcommands: generate and merge -------------------------------------------------
def make_jobs(ctxs, kinds, prompts, seed, detail_questions, skip=frozenset()):
    """A job per (image, type) not in `skip`: the system message, each example as a user/assistant
    pair, then the image's context (conversation gets the captions only, as in the paper)."""
    jobs = []
    for ctx, kind in ((ctx, kind) for ctx in ctxs for kind in kinds if f"{ctx.image_id}_{kind}" not in skip):
        shots = [{"role": r, "content": t} for ex in prompts[kind].examples for r, t in zip(("user", "assistant"), ex)]
        messages = [{"role": "system", "content": prompts[kind].system}, *shots,
                    {"role": "user", "content": format_context(ctx, kind != "conversation")}]
        jobs.append(Job(f"{ctx.image_id}_{kind}", messages, partial(make_record, ctx, kind, seed, detail_questions)))
    return jobs


def cmd_generate(args):
    if not args.instances and set(args.types) - {"conversation"}:
        sys.exit("error: detail and complex need boxes: give --instances (or --types conversation)")
    prompts = {k: load_prompt(k) for k in args.types}
    questions = read_text(PROMPTS_DIR / "detail_instructions.txt", "prompt file").strip().splitlines()
    ctxs = load_coco(args.captions, args.instances)[:args.limit] or sys.exit(
        f"error: {args.captions}: no image with a usable caption, so no job to send")
    client, total = client_from_args(args, args.model), len(ctxs) * len(args.types)
    with closing(JsonlOutput(args.out)) as out:
        jobs = make_jobs(ctxs, args.types, prompts, args.seed, questions, skip=out.finished)
        report = run_jobs(client, jobs, lambda job, record: out.append(record), args.parse_retries)
    why = ", ".join(f"{r} {n}" for r, n in report.skipped.most_common()) or "none"
    print(f"done {report.done} (+{total - len(jobs)} earlier) of {total} jobs; skipped {report.skipped.total()}: {why}")
    print(f"requests {client.requests} (retries {client.retries}, re-asks {report.reasks}); tokens "
          f"{client.prompt_tokens} prompt + {client.completion_tokens} completion = {client.total_tokens}")
    if report.skipped["budget"]:
        print(f"budget of {client.max_requests} requests spent; rerun to continue where this run stopped")
    if client.stop_reason:
        print(f"stopped: {client.stop_reason}")
    return 0 if report.done == len(jobs) else 3


def parse_ratio(value):  # "conversation=58,detail=23,complex=77"; argparse words a ValueError
    ratio = {name.strip(): float(w) for name, w in (part.split("=") for part in value.split(","))}
    if min(ratio.values()) < 0 or not any(ratio.values()):
        raise ValueError(value)
    return ratio


def cmd_merge(args):
    """LLaVA records, first of each id, in per-type counts in proportion to --ratio: as many as
    there are without repeating one (the scarcest type for its weight sets the scale); shuffled."""
    seen, by_type, rng = set(), defaultdict(list), random.Random(args.seed)
    for path in args.inputs:
        for r in read_json(path, "records"):
            if not (isinstance(r, dict) and "id" in r and isinstance(r.get("conversations"), list)):
                log(f"warning: {path}: {str(r)[:80]} is not a LLaVA record; skipped")
            elif r["id"] in seen:
                log(f"warning: {path}: duplicate id {r['id']!r}; kept the first")
            else:
                seen.add(r["id"])
                by_type[str(r["id"]).rsplit("_", 1)[-1]].append(r)  # generate's ids end in _<type>
    if args.ratio:
        if missing := [t for t, w in args.ratio.items() if w > 0 and not by_type[t]]:
            sys.exit(f"error: --ratio asks for {', '.join(missing)} but the inputs hold no such records")
        scale = min(len(by_type[t]) / w for t, w in args.ratio.items() if w > 0)
        by_type = {t: rng.sample(rs, min(len(rs), int(scale * args.ratio.get(t, 0.0) + 1e-9)))
                   for t, rs in sorted(by_type.items())}
    chosen = [r for t in sorted(by_type) for r in by_type[t]]
    rng.shuffle(chosen)
    weights.write_json_atomic(args.out, chosen, indent=None)
    counts = ", ".join(f"{t} {len(rs)}" for t, rs in sorted(by_type.items()) if rs)
    print(f"merge: {len(chosen)} of {len(seen)} records -> {args.out} ({counts})")
    return 0


def build_parser():
    key = "The API key is read from the environment variable OPENAI_API_KEY (never from the command line)."
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=key)
    sub = p.add_subparsers(dest="command")
    a = sub.add_parser("generate", help="captions + boxes -> teacher -> JSONL records (the default)", epilog=key)
    a.add_argument("--captions", required=True, help="COCO captions_*.json")
    a.add_argument("--instances", help="COCO instances_*.json (the boxes; detail and complex need them)")
    a.add_argument("--types", nargs="+", choices=TYPES, default=TYPES, help="the kinds of data to ask for")
    a.add_argument("--out", default="generated.jsonl", help="JSONL output, appended to and resumed from")
    a.add_argument("--model", default="gpt-4o-mini", help="teacher model (the paper used GPT-4)")
    a.add_argument("--limit", type=int, help="only the first N images (by id)")
    a.add_argument("--seed", type=int, default=0, help="seeds the detail question and <image> placement per job")
    add_client_args(a)
    m = sub.add_parser("merge", help="JSONL outputs -> one shuffled JSON list for train.py")
    m.add_argument("--inputs", nargs="+", required=True, help="the JSONL files `generate` wrote (or .json lists)")
    m.add_argument("--out", default="llava_instruct.json", help="the JSON list train.py --data reads")
    m.add_argument("--ratio", type=parse_ratio, help="e.g. conversation=58,detail=23,complex=77 (default: keep all)")
    m.add_argument("--seed", type=int, default=0, help="seeds the shuffle and the --ratio sampling")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("generate", "merge", "-h", "--help"):
        argv.insert(0, "generate")  # the README's spelling: generate is the default
    args = build_parser().parse_args(argv)
    return {"generate": cmd_generate, "merge": cmd_merge}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
