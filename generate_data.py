"""
GPT-assisted visual instruction data, as in the LLaVA paper (Liu et al. 2023, section 3).

The teacher is a text-only language model: it never sees a pixel. Each image is turned into
a *symbolic context* instead, the paper's trick:

    A man rides a wave on a surfboard.          <- its captions, one per line
    A surfer in a black wetsuit on a big wave.
    ...
                                                <- a blank line, then its objects
    person: [0.412, 0.301, 0.533, 0.724]           as `category: [x1, y1, x2, y2]`,
    surfboard: [0.398, 0.652, 0.604, 0.761]        normalised to 0..1, 3 decimals

and the teacher is asked, with a system message and a few hand-written examples (plain text
files under prompts/, one folder per type), to write one of three kinds of data:

    conversation  multi-turn Q&A about object types, counts, actions, positions (captions only)
    detail        a detailed description; the question is drawn from prompts/detail_instructions.txt
    complex       one question that needs step-by-step reasoning, and its answer

Its reply is parsed into a LLaVA-Instruct record, the format train.py reads:

    {"id": "000000296284_detail", "image": "COCO_train2014_000000296284.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nDescribe ..."},
                       {"from": "gpt", "value": "The photo shows ..."}]}

with `<image>` put before or after the first question at random, as the official data does.

Subcommands (one chapter each, in the order a user runs them):

    python generate_data.py generate --captions captions_train2014.json \\
        --instances instances_train2014.json --out generated.jsonl --model gpt-4o-mini
    python generate_data.py merge --inputs generated.jsonl --out llava_instruct.json \\
        --ratio conversation=58,detail=23,complex=77
    python generate_data.py pretrain --captions captions_train2014.json --out pretrain.json

`generate` is the default subcommand. `--dry-run N` prints the exact messages for N images
and sends nothing (no key needed).

Crash safety: at most once per finished answer
----------------------------------------------
A teacher call costs money, so a finished answer must never be asked for twice and never be
lost. The output is a JSONL file, and it *is* the progress record; there is no other state:

1. Every (image, type) pair is one job with a stable id `f"{image_id}_{type}"`.
2. As each answer arrives and parses, its record is appended as ONE line with one write, then
   flushed and fsync'ed before the next job is counted done. A record is either fully on disk
   or it is a torn last line (the process died inside the write).
3. On start, the file is read back: a torn last line (no trailing newline) is cut off, and
   every id in it is skipped, so no request is repeated for a finished pair. The cut-off pair
   is simply asked again: it never was finished.
4. A lock on the output file keeps two runs from appending to it at once.

What a crash can lose is bounded by the answers asked for but not yet written at that
moment: at most the scheduling window of 2 x `--workers` jobs. Ctrl-C loses nothing: the first
stops new requests and writes the answers already on their way, a second quits at once (as
safe as a crash). Replies that do not parse are logged with the image id and re-asked
(`--parse-retries`), then skipped and counted; they are never written half. Skipped jobs are tried again by the next run (their failures are usually
transient: 5xx, timeouts, an exhausted budget). The exit status is 0 only when every job is
finished, so `until python generate_data.py ...; do sleep 60; done` completes a dataset.

The API client (`ChatClient` + `run_jobs`) is reusable: eval.py's GPT judge imports it. It
speaks the OpenAI chat-completions protocol with `requests` (so any compatible server works:
OpenAI, vLLM, llama.cpp, ollama), retries 429/5xx/timeouts/connection errors with exponential
backoff and jitter, honours Retry-After, stops at a request budget, and sums token usage. The
key comes from OPENAI_API_KEY and is never printed, logged or written; it is scrubbed from
everything the server sends back and from every error message.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import json
import os
import random
import re
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import requests

from weights import write_json_atomic

try:  # advisory file lock (POSIX); without it we only lose the two-writers guard
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

TYPES = ("conversation", "detail", "complex")
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
IMAGE = "<image>"


def log(msg: str) -> None:
    """Progress and warnings go to stderr; stdout carries only dry-run text and the summary."""
    print(msg, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# 1. Symbolic context: COCO captions + boxes -> text the teacher reads


@dataclass
class ImageContext:
    image_id: str  # COCO ids are ints; we keep LLaVA's 12-digit zero-padded string form
    image: str  # file name relative to the image folder
    captions: list[str]
    boxes: list[tuple[str, list[float]]]  # (category, [x1, y1, x2, y2] normalised)


def normalize_box(bbox_xywh, width: float, height: float) -> list[float]:
    """COCO absolute [x, y, w, h] in pixels -> [x1, y1, x2, y2] as fractions of the image size,
    clamped to 0..1 (some COCO boxes poke a pixel outside) and rounded to 3 decimals."""
    x, y, w, h = (float(v) for v in bbox_xywh)
    corners = (x / width, y / height, (x + w) / width, (y + h) / height)
    return [round(min(max(v, 0.0), 1.0), 3) for v in corners]


def format_context(ctx: ImageContext, with_boxes: bool) -> str:
    """Captions joined by newlines; then (detail, complex) a blank line and one box per line."""
    text = "\n".join(ctx.captions)
    if with_boxes and ctx.boxes:
        text += "\n\n" + "\n".join(f"{cat}: [{', '.join(str(v) for v in box)}]" for cat, box in ctx.boxes)
    return text


def _image_id(raw) -> str:
    return f"{raw:012d}" if isinstance(raw, int) else str(raw)


def _read_json(path, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        sys.exit(f"error: {what} file {path} not found")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        sys.exit(f"error: {what} file {path} is not valid JSON ({e})")


def _clean(text: str) -> str:
    return " ".join(str(text).split())  # COCO captions carry stray newlines and double spaces


def load_coco(captions_path, instances_path=None) -> list[ImageContext]:
    """COCO `captions_*.json` (+ optional `instances_*.json`) -> one context per image that has
    captions, sorted by image id so that `--limit N` always names the same N images."""
    caps = _read_json(captions_path, "COCO captions")
    if not isinstance(caps, dict) or "annotations" not in caps or "images" not in caps:
        sys.exit(f"error: {captions_path} is not a COCO captions file (needs 'images' and 'annotations')")
    images = {im["id"]: im for im in caps["images"]}
    captions = defaultdict(list)
    for ann in caps["annotations"]:
        if _clean(ann.get("caption", "")):
            captions[ann["image_id"]].append(_clean(ann["caption"]))
    boxes = defaultdict(list)
    if instances_path is not None:
        inst = _read_json(instances_path, "COCO instances")
        if not isinstance(inst, dict) or not {"annotations", "images", "categories"} <= inst.keys():
            sys.exit(f"error: {instances_path} is not a COCO instances file "
                     "(needs 'images', 'annotations' and 'categories')")
        names = {c["id"]: c["name"] for c in inst["categories"]}
        sizes = {im["id"]: (im["width"], im["height"]) for im in inst["images"]}
        for ann in inst["annotations"]:
            if ann["image_id"] not in sizes:
                log(f"warning: {instances_path}: annotation {ann.get('id')} names unknown image "
                    f"{ann['image_id']}; skipped")
                continue
            w, h = sizes[ann["image_id"]]
            boxes[ann["image_id"]].append((names[ann["category_id"]], normalize_box(ann["bbox"], w, h)))
    out = []
    for iid in sorted(images):
        if captions.get(iid):
            out.append(ImageContext(_image_id(iid), images[iid]["file_name"], captions[iid], boxes.get(iid, [])))
    return out


def load_context_jsonl(path) -> list[ImageContext]:
    """The LLaVA-Bench form (`caps_boxes_coco2014_val_80.jsonl`): one image per line with
    `id`, `image`, `captions`, `instances` [{category, bbox}] already normalised x1y1x2y2."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                boxes = [(i["category"], [round(float(v), 3) for v in i["bbox"]]) for i in r.get("instances", [])]
                out.append(ImageContext(_image_id(r["id"]), r["image"], [_clean(c) for c in r["captions"]], boxes))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                log(f"warning: {path}:{n}: unreadable context record ({e!r}); skipped")
    return sorted(out, key=lambda c: c.image_id)


# -----------------------------------------------------------------------------
# 2. Prompts: our system messages and few-shot examples, kept as plain text files
#
# prompts/<type>/system.txt                       the instructions for the teacher
# prompts/<type>/example_<k>_context.txt          a hand-written context (captions [+ boxes])
# prompts/<type>/example_<k>_response.txt         the ideal reply to it, in the reply format
# prompts/detail_instructions.txt                 questions that ask for a detailed description
# prompts/brief_instructions.txt                  requests for a short description (pretrain)


@dataclass
class Prompt:
    system: str
    examples: list[tuple[str, str]]  # (context, response)


def read_lines(path) -> list[str]:
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        sys.exit(f"error: instruction list {path} not found")
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        sys.exit(f"error: instruction list {path} is empty")
    return lines


def load_prompt(kind: str, prompts_dir=PROMPTS_DIR) -> Prompt:
    folder = Path(prompts_dir) / kind
    if not (folder / "system.txt").is_file():
        sys.exit(f"error: {folder / 'system.txt'} not found (prompts for type '{kind}')")
    examples = []
    for ctx_file in sorted(folder.glob("example_*_context.txt")):
        resp_file = ctx_file.with_name(ctx_file.name.replace("_context.txt", "_response.txt"))
        if not resp_file.is_file():
            sys.exit(f"error: few-shot example {ctx_file} has no {resp_file.name}")
        examples.append((ctx_file.read_text(encoding="utf-8").strip(), resp_file.read_text(encoding="utf-8").strip()))
    return Prompt((folder / "system.txt").read_text(encoding="utf-8").strip(), examples)


def build_messages(prompt: Prompt, context: str) -> list[dict]:
    """system, then each example as a user/assistant pair, then the image's context."""
    messages = [{"role": "system", "content": prompt.system}]
    for ex_context, ex_response in prompt.examples:
        messages += [{"role": "user", "content": ex_context}, {"role": "assistant", "content": ex_response}]
    messages.append({"role": "user", "content": context})
    return messages


# -----------------------------------------------------------------------------
# 3. Reading the teacher's reply (the format our few-shot examples teach)
#
# conversation:  Question:\n<q>\nAnswer:\n<a>\nQuestion:\n...   (one or more pairs)
# complex:       Question:\n<q>\nAnswer:\n<a>                   (exactly one pair)
# detail:        the description itself, nothing else


class ParseError(ValueError):
    """The teacher's reply does not follow the format; the job re-asks, then skips."""


_LABEL = re.compile(r"^[ \t]*(?:\*\*)?(question|answer)(?:[ \t]*\d+)?[ \t]*:(?:\*\*)?[ \t]*", re.I | re.M)
# The teacher must answer as if it saw the photo; these betray the symbolic input.
_LEAK = re.compile(r"\bcaptions?\b|\bbounding box(?:es)?\b|\bcoordinates?\b|\[\s*[01]?\.\d+\s*,", re.I)


def parse_qa(text: str) -> list[tuple[str, str]]:
    """'Question:'/'Answer:' blocks -> [(q, a), ...]. A short preamble before the first label
    ("Sure! Here are ...") is ignored; anything else out of order is an error."""
    labels = list(_LABEL.finditer(text))
    if not labels:
        raise ParseError("no 'Question:' / 'Answer:' labels")
    blocks = []
    for i, m in enumerate(labels):
        end = labels[i + 1].start() if i + 1 < len(labels) else len(text)
        body = text[m.end():end].strip()
        if not body:
            raise ParseError(f"empty {m.group(1).lower()} block")
        blocks.append((m.group(1).lower(), body))
    kinds = [k for k, _ in blocks]
    if kinds != ["question", "answer"] * (len(kinds) // 2) or len(kinds) % 2:
        raise ParseError(f"labels do not alternate Question/Answer: {' '.join(k[0].upper() for k in kinds)}")
    return [(blocks[i][1], blocks[i + 1][1]) for i in range(0, len(blocks), 2)]


def parse_reply(kind: str, text: str) -> list[tuple[str | None, str]]:
    """-> [(question, answer), ...]; detail's question is None (it is drawn from our list)."""
    text = (text or "").strip()
    if kind == "detail":
        if not text:
            raise ParseError("empty reply")
        if _LABEL.search(text):
            raise ParseError("a description should not contain Question:/Answer: labels")
        pairs = [(None, text)]
    else:
        pairs = parse_qa(text)
        if kind == "complex" and len(pairs) != 1:
            raise ParseError(f"expected exactly one question and answer, got {len(pairs)}")
    for q, a in pairs:
        leak = _LEAK.search(a) or (q and _LEAK.search(q))
        if leak:
            raise ParseError(f"mentions the symbolic input ({leak.group(0)!r})")
    return pairs


def job_rng(seed: int, image_id: str, kind: str) -> random.Random:
    """One generator per job, seeded by (seed, image, type): a resumed or reordered run makes
    the same choices (which detail question, where <image> goes) for the same job."""
    return random.Random(f"{seed}:{image_id}:{kind}")


def attach_image(question: str, rng: random.Random) -> str:
    return f"{IMAGE}\n{question}" if rng.random() < 0.5 else f"{question}\n{IMAGE}"


def make_record(ctx: ImageContext, kind: str, pairs, seed: int, detail_questions: list[str]) -> dict:
    rng = job_rng(seed, ctx.image_id, kind)
    if kind == "detail":
        pairs = [(rng.choice(detail_questions), pairs[0][1])]
    conversations = []
    for i, (q, a) in enumerate(pairs):
        conversations += [{"from": "human", "value": attach_image(q, rng) if i == 0 else q},
                          {"from": "gpt", "value": a}]
    return {"id": f"{ctx.image_id}_{kind}", "image": ctx.image, "conversations": conversations}


# -----------------------------------------------------------------------------
# 4. The API client: an OpenAI-compatible chat-completions endpoint over `requests`


class APIError(RuntimeError):
    """A request that failed for good. `reason` is short and countable ("http 500", "timeout").
    The message never holds the API key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class BudgetExhausted(APIError):
    def __init__(self, limit):
        super().__init__("budget", f"request budget of {limit} spent")


class Stopped(APIError):
    def __init__(self, why):
        super().__init__("stopped", f"client stopped: {why}")


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After is delta-seconds (we also accept fractions) or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


class ChatClient:
    """Thread-safe client for POST {api_base}/chat/completions.

    client = ChatClient("https://api.openai.com/v1", "gpt-4o-mini", workers=8, max_requests=1000)
    text, usage = client.complete([{"role": "user", "content": "Hi"}])

    Every HTTP attempt (retries included) counts against `max_requests`; once it is spent,
    complete() raises BudgetExhausted and run_jobs() schedules nothing more. 429, 408, 409, 5xx,
    timeouts, connection errors and malformed bodies are retried `max_retries` times with
    exponential backoff (base * 2**attempt, jittered to 50-100%, capped at backoff_max), never
    sooner than Retry-After; a 429 with Retry-After pauses every thread, not just the one that
    got it. 401/403/404 stop the client: no other request could succeed; so do `max_down`
    connection failures in a row (no server answers at api_base). Other 4xx fail the one request. Extra keyword arguments (temperature, max_tokens, ...) go into every request body.
    """

    def __init__(self, api_base: str, model: str, workers: int = 4, max_requests: int | None = None,
                 timeout: float = 120.0, max_retries: int = 6, backoff_base: float = 1.0,
                 backoff_max: float = 60.0, max_down: int = 20, api_key: str | None = None,
                 log: Callable[[str], None] = log, **params):
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.workers, self.max_requests = model, max(1, int(workers)), max_requests
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.max_down, self.down = max_down, 0  # connection failures in a row, of all threads
        self.params, self.log = params, log
        key = os.environ.get("OPENAI_API_KEY", "") if api_key is None else api_key
        self._secret = key.strip()
        self._headers = {"Content-Type": "application/json"}
        if self._secret:
            self._headers["Authorization"] = f"Bearer {self._secret}"
        self._lock = threading.Lock()
        self._local = threading.local()  # one requests.Session (connection pool) per thread
        self._stop = threading.Event()
        self._pause_until = 0.0
        self._jitter = random.Random()
        self.stop_reason: str | None = None
        self.requests = self.retries = 0
        self.prompt_tokens = self.completion_tokens = self.total_tokens = 0
        self.failures = Counter()  # attempts that failed, by reason (retried or not)

    def __repr__(self):  # no headers, no key
        return f"ChatClient({self.url!r}, model={self.model!r}, workers={self.workers})"

    # -- the secret never leaves --------------------------------------------------
    @property
    def has_key(self) -> bool:
        return bool(self._secret)

    def scrub(self, text: str) -> str:
        """For what a server echoes (error bodies, exception text): never for a reply's text."""
        return text.replace(self._secret, "***") if self._secret and text else text

    # -- budget and stopping ------------------------------------------------------
    @property
    def budget_left(self) -> float:
        return float("inf") if self.max_requests is None else max(0, self.max_requests - self.requests)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self, why: str) -> None:
        """No new requests and no more retries; requests already on the wire finish."""
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason = why
        self._stop.set()

    def _reserve(self) -> None:
        with self._lock:
            if self._stop.is_set():
                raise Stopped(self.stop_reason)
            if self.max_requests is not None and self.requests >= self.max_requests:
                raise BudgetExhausted(self.max_requests)
            self.requests += 1

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self._stop.wait(seconds):
            raise Stopped(self.stop_reason)

    def stats(self) -> dict:
        return {"requests": self.requests, "retries": self.retries, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens,
                "failures": dict(self.failures)}

    # -- one completion -------------------------------------------------------------
    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def complete(self, messages: list[dict], **overrides) -> tuple[str, dict]:
        """-> (reply text, usage dict). Raises APIError (reason, scrubbed message) when it gives up."""
        body = json.dumps({"model": self.model, "messages": messages, **self.params, **overrides})
        for attempt in range(self.max_retries + 1):
            self._reserve()
            self._sleep(self._pause_until - time.monotonic())
            # Exceptions are turned into (reason, detail) strings here and raised only after
            # the except block: a raised APIError then carries no __context__ chain that could
            # hold the request (and its Authorization header).
            retry_after, fatal = None, False
            try:
                resp = self._session().post(self.url, data=body, headers=self._headers, timeout=self.timeout)
            except requests.Timeout:
                reason, detail, retryable = "timeout", f"no reply within {self.timeout}s", True
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                    requests.exceptions.InvalidSchema, requests.exceptions.InvalidHeader) as e:
                reason, detail, retryable, fatal = "bad request setup", f"{type(e).__name__}: {str(e)[:300]}", False, True
            except requests.ConnectionError as e:
                reason, detail, retryable = "connection error", str(e)[:300], True
                with self._lock:
                    self.down += 1
                    down = self.down
                if down >= self.max_down:
                    self.stop(f"{down} connection failures in a row at {self.url}: is --api-base right and "
                              f"the server up? ({self.scrub(detail)[:160]})")
            except requests.RequestException as e:  # e.g. the body broke off mid-transfer
                reason, detail, retryable = "request error", f"{type(e).__name__}: {str(e)[:300]}", True
            else:
                self.down = 0
                status = resp.status_code
                if status == 200:
                    try:
                        text, usage = self._read_completion(resp)
                    except ValueError as e:
                        reason, detail, retryable = "bad response", str(e), True
                    else:
                        return text, usage
                else:
                    reason, detail = f"http {status}", resp.text[:300].strip()
                    retryable = status in (408, 409, 429) or status >= 500
                    fatal = status in (401, 403, 404)
                    retry_after = _retry_after_seconds(resp.headers.get("Retry-After"))
            detail = self.scrub(detail)
            with self._lock:
                self.failures[reason] += 1
            if fatal:
                self.stop(f"{reason} from {self.url}: {detail}")
            if not retryable or attempt == self.max_retries:
                tries = f" after {attempt + 1} attempts" if retryable else ""
                raise APIError(reason, self.scrub(f"{reason} from {self.url}{tries}: {detail}"))
            delay = min(self.backoff_max, self.backoff_base * 2 ** attempt) * self._jitter.uniform(0.5, 1.0)
            if retry_after is not None:
                delay = max(delay, min(retry_after, 600.0))
                if reason == "http 429":  # the server is rate-limiting all of us: every thread waits
                    with self._lock:
                        self._pause_until = max(self._pause_until, time.monotonic() + delay)
            with self._lock:
                self.retries += 1
            self.log(f"{reason}: {detail[:120]}; retry {attempt + 1}/{self.max_retries} in {delay:.2f}s")
            self._sleep(delay)
        raise AssertionError("unreachable")

    def _read_completion(self, resp) -> tuple[str, dict]:
        try:
            data = resp.json()
        except ValueError:
            raise ValueError(f"body is not JSON: {resp.text[:120]!r}") from None
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"no choices[0].message.content in {json.dumps(data)[:160]}") from None
        if not isinstance(text, str):
            raise ValueError(f"message content is {type(text).__name__}, not text")
        if choice.get("finish_reason") == "length":
            raise ValueError("reply cut off at the token limit (finish_reason=length)")
        usage = data.get("usage") or {}
        usage = {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        with self._lock:
            self.prompt_tokens += usage["prompt_tokens"]
            self.completion_tokens += usage["completion_tokens"]
            self.total_tokens += usage["total_tokens"] or usage["prompt_tokens"] + usage["completion_tokens"]
        return text, usage


# -----------------------------------------------------------------------------
# 5. Running many jobs through the client on a thread pool


@dataclass
class Job:
    key: str  # unique, used in log lines ("000000296284_detail")
    messages: list[dict]
    parse: Callable[[str], Any] = lambda text: text  # raises ParseError -> re-ask
    data: Any = None  # anything the caller wants back in handle_result


@dataclass
class JobReport:
    done: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    reasks: int = 0  # extra requests made because a reply did not parse
    seconds: float = 0.0
    stop_reason: str | None = None


def _work(client: ChatClient, job: Job, parse_retries: int, report: JobReport, lock):
    """Runs in a worker thread. -> (True, parsed) or (False, reason); never raises."""
    for attempt in range(parse_retries + 1):
        try:
            text, _ = client.complete(job.messages)
        except APIError as e:
            if e.reason not in ("budget", "stopped"):
                client.log(f"{job.key}: {e}")
            return False, e.reason
        try:
            return True, job.parse(text)
        except ParseError as e:
            snippet = " ".join(text.split())[:80]
            client.log(f"{job.key}: unparsable reply ({e}), attempt {attempt + 1}/{parse_retries + 1}: {snippet!r}")
            if attempt < parse_retries:
                with lock:
                    report.reasks += 1
    return False, "unparsable"


@contextlib.contextmanager
def _ctrl_c_stops(client: ChatClient):
    """First Ctrl-C: stop the client (no new requests, no retries), keep writing the answers
    already on their way. Second Ctrl-C: quit at once, which is safe because every record is
    written whole or not at all (exactly like a kill -9). Only the main thread gets signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame):
        if client.stopped:
            log("interrupted again: quitting now; the output file is consistent, rerun to resume")
            os._exit(130)
        client.stop("interrupted (Ctrl-C)")
        log("interrupted: finishing the requests in flight (Ctrl-C again to quit at once)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_jobs(client: ChatClient, jobs: Iterable[Job], handle_result: Callable[[Job, Any], None],
             parse_retries: int = 2, progress=None) -> JobReport:
    """Send every job through `client` on `client.workers` threads.

    `job.parse(text)` runs in the worker; a ParseError re-asks up to `parse_retries` times.
    `handle_result(job, parsed)` runs in the calling thread, one at a time, in completion
    order: the one place that writes, so it needs no lock. Failed jobs are counted by reason
    in the returned report. Jobs are pulled from the iterable lazily (a window of 2 x workers),
    so nothing is scheduled after the budget is spent or the client stopped. Ctrl-C stops new
    requests and retries but still hands over the answers already on their way; a second
    Ctrl-C quits at once.
    """
    report, lock, start = JobReport(), threading.Lock(), time.monotonic()
    pending = iter(jobs)
    in_flight: dict = {}
    with _ctrl_c_stops(client), ThreadPoolExecutor(client.workers, thread_name_prefix="chat") as pool:

        def fill():
            while len(in_flight) < 2 * client.workers and not client.stopped and client.budget_left > 0:
                job = next(pending, None)
                if job is None:
                    return
                in_flight[pool.submit(_work, client, job, parse_retries, report, lock)] = job

        fill()
        while in_flight:
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = in_flight.pop(fut)
                ok, value = fut.result()
                if ok:
                    try:
                        handle_result(job, value)
                    except BaseException:
                        client.stop("handle_result failed")
                        raise
                    report.done += 1
                else:
                    report.skipped[value] += 1
                if progress is not None:
                    progress.update(1)
            fill()
    # Jobs never scheduled: the budget ran out or the client was stopped.
    rest = sum(1 for _ in pending)
    if rest:
        report.skipped["not started (budget spent)" if not client.stopped else "not started (stopped)"] += rest
    report.seconds, report.stop_reason = time.monotonic() - start, client.stop_reason
    return report


# -----------------------------------------------------------------------------
# 6. The output file: append-only JSONL that is also the resume state


class JsonlOutput:
    """Open (creating) an append-only JSONL file; `finished` holds the ids already in it."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        self.f = open(self.path, "a+b")
        if fcntl is not None:
            try:
                fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.f.close()
                sys.exit(f"error: another run is writing {self.path}; wait for it or choose another --out")
        if not existed:  # make the new directory entry durable too
            _fsync_dir(self.path.parent)
        self.finished, self.torn_bytes = self._recover()

    def _recover(self) -> tuple[set[str], int]:
        self.f.seek(0)
        data = self.f.read()
        torn = 0
        if data and not data.endswith(b"\n"):  # died inside a write: that record never finished
            keep = data.rfind(b"\n") + 1
            torn = len(data) - keep
            self.f.truncate(keep)
            self.f.flush()
            os.fsync(self.f.fileno())
            data = data[:keep]
            log(f"{self.path}: cut off a torn last line ({torn} bytes) left by an interrupted run")
        ids = set()
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                ids.add(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError):
                log(f"warning: {self.path}:{n}: unreadable record ignored (its job will be redone)")
        return ids, torn

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self.f.seek(0, os.SEEK_END)
        self.f.write(line)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.finished.add(record["id"])

    def close(self):
        self.f.close()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# 7. generate: contexts -> jobs -> teacher -> records


def _load_contexts(args) -> list[ImageContext]:
    if args.context:
        ctxs = load_context_jsonl(args.context)
    elif args.captions:
        ctxs = load_coco(args.captions, args.instances)
    else:
        sys.exit("error: give --captions (COCO captions json, plus --instances for boxes) or --context (jsonl)")
    if args.limit is not None:
        ctxs = ctxs[: args.limit]
    return ctxs


def _parse_types(value: str) -> list[str]:
    kinds = [t.strip() for t in value.split(",") if t.strip()]
    bad = [t for t in kinds if t not in TYPES]
    if bad or not kinds:
        sys.exit(f"error: --types {value!r}: choose from {','.join(TYPES)}")
    return kinds


def make_jobs(ctxs, kinds, prompts, seed, detail_questions, skip=frozenset()) -> list[Job]:
    jobs = []
    for ctx in ctxs:
        for kind in kinds:
            key = f"{ctx.image_id}_{kind}"
            if key in skip:
                continue
            context = format_context(ctx, with_boxes=kind != "conversation")  # as in the paper

            def parse(text, ctx=ctx, kind=kind):
                return make_record(ctx, kind, parse_reply(kind, text), seed, detail_questions)

            jobs.append(Job(key, build_messages(prompts[kind], context), parse, data=ctx))
    return jobs


def cmd_generate(args) -> int:
    kinds = _parse_types(args.types)
    prompts = {k: load_prompt(k, args.prompts) for k in kinds}
    detail_questions = read_lines(Path(args.prompts) / "detail_instructions.txt")
    ctxs = _load_contexts(args)
    if not ctxs:
        sys.exit(f"error: {args.context or args.captions}: no image with a usable caption, so no job to send "
                 "(see the warnings above)")
    if args.captions and not args.instances and set(kinds) - {"conversation"}:
        sys.exit("error: detail and complex need boxes: give --instances (or --types conversation)")

    if args.dry_run is not None:  # the exact messages, no client, no key, no file
        for job in make_jobs(ctxs[: args.dry_run], kinds, prompts, args.seed, detail_questions):
            print(f"===== {job.key} ({len(job.messages)} messages) =====")
            for m in job.messages:
                print(f"--- {m['role']} ---\n{m['content']}")
            if job.key.endswith("_detail"):
                q = job_rng(args.seed, job.data.image_id, "detail").choice(detail_questions)
                print(f"--- (record question, drawn from detail_instructions.txt) ---\n{q}")
            print()
        return 0

    out = JsonlOutput(args.out)
    total = len(ctxs) * len(kinds)
    jobs = make_jobs(ctxs, kinds, prompts, args.seed, detail_questions, skip=out.finished)
    earlier = total - len(jobs)
    log(f"generate: {len(ctxs)} images x {len(kinds)} types = {total} jobs; {earlier} finished earlier "
        f"in {args.out}; {len(jobs)} to do with {args.workers} workers against {args.api_base}")

    params = {k: v for k, v in (("temperature", args.temperature), ("max_tokens", args.max_tokens)) if v is not None}
    client = ChatClient(args.api_base, args.model, workers=args.workers, max_requests=args.max_requests,
                        timeout=args.timeout, max_retries=args.max_retries, backoff_base=args.backoff_base,
                        max_down=args.max_down, **params)
    if not client.has_key:
        log("note: OPENAI_API_KEY is not set; sending no Authorization header")
    from tqdm import tqdm

    with tqdm(total=len(jobs), unit="job", disable=None, file=sys.stderr) as bar:
        try:
            report = run_jobs(client, jobs, lambda job, record: out.append(record),
                              parse_retries=args.parse_retries, progress=bar)
        finally:
            out.close()

    skipped = sum(report.skipped.values())
    rate = report.done / report.seconds if report.seconds > 0 else 0.0
    why = ", ".join(f"{r} {n}" for r, n in report.skipped.most_common()) or "none"
    print(f"done {report.done} (+{earlier} earlier) of {total} jobs; skipped {skipped}: {why}")
    print(f"requests {client.requests} (retries {client.retries}, re-asks {report.reasks}); tokens "
          f"{client.prompt_tokens} prompt + {client.completion_tokens} completion = {client.total_tokens}; "
          f"{report.seconds:.1f}s, {rate:.2f} records/s")
    if client.max_requests is not None and client.budget_left == 0 and skipped:
        print(f"budget of {client.max_requests} requests spent; rerun to continue where this run stopped")
    if report.stop_reason:
        print(f"stopped: {report.stop_reason}")
    return 0 if report.done + earlier == total else 3


# -----------------------------------------------------------------------------
# 8. merge: JSONL outputs -> the JSON list train.py reads, with mix ratios


def read_records(path) -> list[dict]:
    """Read a JSONL (or JSON list) of records, skipping unreadable ones with a warning."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            sys.exit(f"error: {path} is not valid JSON ({e})")
        return [r for r in rows if _valid(r, path, "?")]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            torn = n == len(text.splitlines()) and not text.endswith("\n")
            log(f"warning: {path}:{n}: {'torn last line' if torn else 'unreadable record'}; skipped")
            continue
        if _valid(r, path, n):
            out.append(r)
    return out


def _valid(r, path, n) -> bool:
    conv = r.get("conversations") if isinstance(r, dict) else None
    ok = (isinstance(r, dict) and "id" in r and isinstance(conv, list) and len(conv) >= 2 and len(conv) % 2 == 0
          and all(isinstance(t, dict) and t.get("from") == ("human", "gpt")[i % 2] and isinstance(t.get("value"), str)
                  and t["value"].strip() for i, t in enumerate(conv)))
    if ok and "image" in r:
        ok = conv[0]["value"].count(IMAGE) == 1 and all(IMAGE not in t["value"] for t in conv[1:])
    if not ok:
        log(f"warning: {path}:{n}: record {r.get('id') if isinstance(r, dict) else None!r} is not a valid "
            "LLaVA conversation; skipped")
    return ok


def record_type(r: dict) -> str:
    return str(r["id"]).rsplit("_", 1)[-1]


def parse_ratio(value: str) -> dict[str, float]:
    ratio = {}
    for part in value.split(","):
        name, _, w = part.partition("=")
        try:
            ratio[name.strip()] = float(w)
        except ValueError:
            sys.exit(f"error: --ratio {value!r}: write it as conversation=1,detail=1,complex=1")
        if ratio[name.strip()] < 0:
            sys.exit(f"error: --ratio {value!r}: weights must be >= 0")
    if not any(ratio.values()):
        sys.exit(f"error: --ratio {value!r}: at least one weight must be > 0")
    return ratio


def mix(records: list[dict], ratio: dict[str, float] | None, rng: random.Random) -> list[dict]:
    """Pick per-type counts in proportion to `ratio`, as many as possible without repeating a
    record (the scarcest type, relative to its weight, sets the scale). None keeps all."""
    by_type = defaultdict(list)
    for r in records:
        by_type[record_type(r)].append(r)
    if ratio is None:
        return list(records)
    missing = [t for t, w in ratio.items() if w > 0 and not by_type[t]]
    if missing:
        sys.exit(f"error: --ratio asks for {', '.join(missing)} but the inputs hold no such records")
    scale = min(len(by_type[t]) / w for t, w in ratio.items() if w > 0)
    chosen = []
    for t in sorted(by_type):
        n = min(len(by_type[t]), int(scale * ratio.get(t, 0.0) + 1e-9))
        chosen += rng.sample(by_type[t], n)
    return chosen


def cmd_merge(args) -> int:
    seen, records = set(), []
    for path in args.inputs:
        for r in read_records(path):
            if r["id"] in seen:
                log(f"warning: {path}: duplicate id {r['id']!r}; kept the first")
                continue
            seen.add(r["id"])
            records.append(r)
    rng = random.Random(args.seed)
    chosen = mix(records, parse_ratio(args.ratio) if args.ratio else None, rng)
    rng.shuffle(chosen)
    write_json_atomic(args.out, chosen, indent=None)
    counts = Counter(record_type(r) for r in chosen)
    print(f"merge: {len(chosen)} of {len(records)} records -> {args.out} "
          f"({', '.join(f'{t} {n}' for t, n in sorted(counts.items()))})")
    return 0


# -----------------------------------------------------------------------------
# 9. pretrain: image-caption pairs -> the 558K / 595K stage-1 format, no API
#
# {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
#     {"from": "human", "value": "<brief instruction>\n<image>"},
#     {"from": "gpt", "value": "<caption>"}]}
# The published 558K file puts <image> after the instruction; we place it first or last at
# random like the instruct data. Either way the `plain` template keeps only <image> + caption.


def read_pairs(path) -> list[tuple[str, str]]:
    """(image, caption) pairs from COCO captions json, a JSON/JSONL list of {image, caption},
    or a TSV of `image<TAB>caption` lines."""
    path = Path(path)
    if path.suffix == ".json":
        data = _read_json(path, "captions")
        if isinstance(data, dict) and "annotations" in data:
            names = {im["id"]: im["file_name"] for im in data["images"]}
            return [(names[a["image_id"]], a["caption"]) for a in data["annotations"] if a["image_id"] in names]
        rows = data
    elif path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log(f"warning: {path}:{n}: unreadable line; skipped")
    else:
        pairs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            image, tab, caption = line.partition("\t")
            if not tab:
                log(f"warning: {path}:{n}: no TAB between image and caption; skipped")
                continue
            pairs.append((image.strip(), caption))
        return pairs
    pairs = []
    for n, r in enumerate(rows if isinstance(rows, list) else [], 1):
        if isinstance(r, dict) and "image" in r and "caption" in r:
            pairs.append((r["image"], r["caption"]))
        else:
            log(f"warning: {path}: item {n} has no 'image' and 'caption'; skipped")
    return pairs


def cmd_pretrain(args) -> int:
    instructions = read_lines(args.instructions)
    rng = random.Random(args.seed)
    records, used, skipped = [], set(), 0
    for image, caption in read_pairs(args.captions):
        caption = _clean(caption)
        if not image or not caption:
            skipped += 1
            continue
        rid = stem = Path(image).with_suffix("").as_posix().replace("/", "_")
        k = 0
        while rid in used:  # one record per caption: an image's later captions get _1, _2, ...
            k += 1
            rid = f"{stem}_{k}"
        used.add(rid)
        question = attach_image(rng.choice(instructions), rng)
        records.append({"id": rid, "image": image, "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": caption}]})
    if args.limit is not None:
        records = records[: args.limit]
    write_json_atomic(args.out, records, indent=None)
    print(f"pretrain: {len(records)} records -> {args.out}" + (f" ({skipped} empty skipped)" if skipped else ""))
    return 0


# -----------------------------------------------------------------------------
# 10. Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LLaVA's GPT-assisted instruction data (see the module docstring).",
                                epilog="The API key is read from the environment variable OPENAI_API_KEY (never "
                                       "from the command line); a local server may need none.")
    sub = p.add_subparsers(dest="command")

    g = sub.add_parser("generate", help="captions + boxes -> teacher -> JSONL records (default)",
                       epilog="The API key is read from the environment variable OPENAI_API_KEY.")
    g.add_argument("--captions", help="COCO captions_*.json")
    g.add_argument("--instances", help="COCO instances_*.json (boxes; needed for detail and complex)")
    g.add_argument("--context", help="instead: JSONL with id, image, captions, instances (normalised bbox)")
    g.add_argument("--types", default=",".join(TYPES), help="comma list of conversation,detail,complex")
    g.add_argument("--out", default="generated.jsonl", help="JSONL output, appended to and resumed from")
    g.add_argument("--api-base", default="https://api.openai.com/v1",
                   help="any OpenAI-compatible server (vLLM, llama.cpp, ollama: http://host:port/v1); "
                        "the key comes from $OPENAI_API_KEY")
    g.add_argument("--model", default="gpt-4o-mini", help="teacher model (the paper used GPT-4)")
    g.add_argument("--workers", type=int, default=8, help="concurrent requests")
    g.add_argument("--max-requests", type=int, default=None, help="budget: HTTP requests, retries included")
    g.add_argument("--limit", type=int, default=None, help="only the first N images (by id)")
    g.add_argument("--seed", type=int, default=0, help="detail question and <image> placement per job")
    g.add_argument("--dry-run", type=int, default=None, metavar="N", help="print the messages for N images; send nothing")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    g.add_argument("--max-retries", type=int, default=6, help="per request, on 429/5xx/timeouts")
    g.add_argument("--max-down", type=int, default=20,
                   help="stop after this many connection failures in a row (no server at --api-base)")
    g.add_argument("--backoff-base", type=float, default=1.0, help="first retry waits ~this many seconds")
    g.add_argument("--parse-retries", type=int, default=2, help="re-asks when a reply does not parse")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the server's)")
    g.add_argument("--max-tokens", type=int, default=None, help="longest reply (default: the server's)")
    g.add_argument("--prompts", default=str(PROMPTS_DIR), help="folder with system messages and examples")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("merge", help="JSONL outputs -> one shuffled JSON list for train.py")
    m.add_argument("--inputs", nargs="+", required=True, help="the JSONL files `generate` wrote")
    m.add_argument("--out", default="llava_instruct.json", help="the JSON list train.py --data reads")
    m.add_argument("--ratio", default=None, help="e.g. conversation=58,detail=23,complex=77 (default: keep all)")
    m.add_argument("--seed", type=int, default=0, help="seed of the shuffle and of the --ratio sampling")
    m.set_defaults(func=cmd_merge)

    t = sub.add_parser("pretrain", help="image-caption pairs -> 558K/595K stage-1 JSON (no API)")
    t.add_argument("--captions", required=True, help="COCO captions json, JSON/JSONL of {image, caption}, or TSV")
    t.add_argument("--out", default="pretrain.json", help="the stage-1 JSON list train.py --stage 1 --data reads")
    t.add_argument("--instructions", default=str(PROMPTS_DIR / "brief_instructions.txt"),
                   help="one brief instruction per line, one drawn per caption (the paper's list by default)")
    t.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    t.add_argument("--seed", type=int, default=0, help="seed of the instruction draw and the <image> placement")
    t.set_defaults(func=cmd_pretrain)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--merge":  # the spelling of the merge step
        argv[0] = "merge"
    if not argv or argv[0] not in ("generate", "merge", "pretrain", "-h", "--help"):
        argv.insert(0, "generate")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
