"""
An OpenAI-compatible server for LLaVA with continuous batching, on the standard library's HTTP server.

    python serve.py --model llava-hf/llava-1.5-7b-hf [--port 8000] [--max-batch 8] [--api-key KEY]

POST /v1/chat/completions and GET /v1/models for any OpenAI client; data.py's template, clip.preprocess.
A LLaMA/Vicuna directory is served too, text only: a local teacher for generate_data.py.

The scheduler, vLLM's idea in miniature. One model thread owns a KV cache of --max-batch slots; HTTP
threads only queue requests and read their tokens. Each turn of its loop it prefills every waiting
request that finds a free slot (alone, straight into that slot, the image spliced in; out comes its
first token), then runs ONE decode step for all running rows together: row b feeds its last token at
its own position len_b, writes key and value at column len_b of its slot and attends to its columns
<= len_b only (a per-row mask). A row leaves the moment it ends (EOS, max_tokens, a stop string, its
client gone), and its slot takes the next waiting request:

              P   1   2   P   3   4   5   P   6   7     P   prefills, each request alone
    slot 0    A   a   a       a   ■       D   d   d     1.. decode steps, a token for every row
    slot 1    B   b   b       b   b   b       b   ■     ■   done: the slot is free at the next P
    slot 2                C   c   c   c       c   c

Both are forward_rows: rows of tokens at their own positions, written into their own slots. No row is
padded or waits for another, so greedy output is the same token for token alone or beside seven others.
A step spans the slots up to the highest busy one, the columns up to the longest row.
"""

import argparse
import base64
import binascii
import hmac
import http.client
import io
import ipaddress
import json
import os
import queue
import socket
import ssl
import sys
import threading
import time
import traceback
import urllib.parse
from collections import deque
from dataclasses import replace
from types import SimpleNamespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from PIL import Image

import data
from chat import load
from clip import preprocess
from llama import KVCache, Llama, StreamDecoder, Tokenizer
from model import DTYPES, POSITIVE, device_name, dtype_for, sample_next
import weights
from weights import WeightsError, read_json

MAX_BODY, MAX_IMAGE_BYTES, URL_TIMEOUT = 32 << 20, 20 << 20, 10  # pixels: PIL's bomb limit; URL_TIMEOUT in s


class APIError(Exception):
    """An error answered as OpenAI's error object; its message speaks to the caller, never of internals."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error", headers=()):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- the model loop ----------------------------------------------------------------------------

class Request:
    """A completion as the loop sees it: the prompt ids (image ids expanded), pixel_values [1,3,S,S] or None.
    The loop sets slot, len (columns filled: the next position), last (the token to feed next), generated,
    and puts ("token", id)..., then ("done", "stop"|"length") or ("error", why) on `events`."""

    def __init__(self, ids, pixel_values, max_new, temperature=1.0, top_p=1.0, generator=None, stops=()):
        self.ids, self.pixel_values, self.max_new, self.stops = ids, pixel_values, max_new, stops
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self.events, self.cancelled = queue.Queue(), False  # cancelled: set by the HTTP thread


class SlotWriter:
    """The KV cache of a forward over slots first..first+n-1: row b's T new keys and values go to its columns
    cols[b] ([n,T]), and attention reads those slots' first `width` columns (views, masked per row)."""

    def __init__(self, cache, first, n, width, cols):
        self.k, self.v = cache.k[:, first:first + n, :, :width], cache.v[:, first:first + n, :, :width]
        self.rows, self.cols = torch.arange(n, device=cols.device)[:, None], cols

    def update(self, i, k, v):  # [n,KV,T,hd] each -> layer i's whole [n,KV,width,hd]
        self.k[i][self.rows, :, self.cols] = k.transpose(1, 2)  # the [n,T] (row, column) pairs <- [n,T,KV,hd]
        self.v[i][self.rows, :, self.cols] = v.transpose(1, 2)
        return self.k[i], self.v[i]


def forward_rows(llm, cache, first, x, lens, width):
    """x [n,T,D]: the next T tokens of slots first.., row b's at positions lens[b]..lens[b]+T-1, written there in
    its slot and attending to its columns up to each one (width: max(lens) + T) -> each row's last logits [n,V].
    A prefill is one row of T tokens from 0, a decode step a row per slot 0..n-1 of one token each (a free slot
    among them computes a row nobody reads)."""
    cols = lens[:, None] + torch.arange(x.shape[1], device=lens.device)  # [n,T]
    mask = (torch.arange(width, device=lens.device) <= cols[..., None])[:, None]  # [n,1,T,width]: all heads
    cos, sin = llm.rope(cols)
    writer = SlotWriter(cache, first, len(x), width, cols)
    for i, block in enumerate(llm.layers):
        x = block(x, cos, sin, writer, i, mask)
    return llm.lm_head(llm.norm(x[:, -1]))


class Engine:
    """The one thread that runs the model: admits waiting requests into free slots, then decodes them."""

    def __init__(self, model, tokenizer, max_batch=8, max_queue=32):
        self.model, self.tok, self.max_batch, self.max_queue = model, tokenizer, max_batch, max_queue
        w, ctx = model.llm.embed_tokens.weight, model.config.text.max_position_embeddings
        self.cache = KVCache(model.config.text, max_batch, ctx, w.dtype, w.device)
        self.device, self.waiting, self.rows, self.cancelled = w.device, deque(), {}, 0  # rows: slot -> Request
        self.cond = threading.Condition()

    def start(self):
        threading.Thread(target=self.run, name="model-loop", daemon=True).start()
        return self

    def submit(self, req):
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise APIError(429, f"all {self.max_batch} slots are busy and {self.max_queue} requests wait",
                               code="rate_limit_exceeded", kind="rate_limit_error", headers=[("Retry-After", "1")])
            self.waiting.append(req)
            self.cond.notify()

    def run(self):
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.waiting and not self.rows:
                        self.cond.wait()
                    new = [self.waiting.popleft() for _ in range(min(len(self.waiting),
                                                                     self.max_batch - len(self.rows)))]
                try:
                    for req in new:
                        self._prefill(req)
                    self._step()
                except Exception:  # fails the requests at hand, not the loop; the operator gets the traceback
                    traceback.print_exc()
                    for req in set(new) | set(self.rows.values()):
                        req.events.put(("error", "the model failed on this request"))
                    self.rows.clear()

    def _prefill(self, req):
        if req.cancelled:  # its client left while it waited
            return
        req.slot, req.len, req.generated = min(set(range(self.max_batch)) - set(self.rows)), len(req.ids), 0
        pixels = None if req.pixel_values is None else req.pixel_values.to(self.device)
        embeds = self.model.embed(torch.tensor(req.ids, device=self.device)[None], pixels)
        start = torch.zeros(1, dtype=torch.long, device=self.device)
        logits = forward_rows(self.model.llm, self.cache, req.slot, embeds, start, len(req.ids))
        self.rows[req.slot] = req
        self._emit(req, self._sample([req], logits)[0])

    def _step(self):
        for slot in [s for s, req in self.rows.items() if req.cancelled]:
            del self.rows[slot]
            self.cancelled += 1
        if not self.rows:
            return
        reqs = [self.rows.get(b) for b in range(max(self.rows) + 1)]
        tokens, lens = (torch.tensor([getattr(r, a) if r else 0 for r in reqs], device=self.device)
                        for a in ("last", "len"))
        x, width = self.model.llm.embed_tokens(tokens[:, None]), max(r.len for r in reqs if r) + 1  # no host sync
        logits = forward_rows(self.model.llm, self.cache, 0, x, lens, width)
        for req, token in zip(reqs, self._sample(reqs, logits)):
            if req:
                req.len += 1
                self._emit(req, token)

    @staticmethod
    def _sample(reqs, logits):
        """Argmax for every row at once, then each sampling row drawn with its own generator."""
        out = logits.argmax(-1)
        for b, req in enumerate(reqs):
            if req and req.temperature > 0:
                out[b] = sample_next(logits[b:b + 1], req.temperature, req.top_p, req.generator)[0]
        return out.tolist()  # the one host sync of a step

    def _emit(self, req, token):
        req.last, req.generated = token, req.generated + 1
        req.events.put(("token", token))
        finish = "stop" if token == self.tok.eos_id else "length" if req.generated >= req.max_new else None
        if finish:
            del self.rows[req.slot]
            req.events.put(("done", finish))


# ---- OpenAI JSON -> a Request; its tokens -> text ----------------------------------------------

def public(ip):
    """Whether an address is on the internet: not loopback, link-local, private, multicast, unspecified, reserved."""
    a = ipaddress.ip_address(ip.split("%")[0])  # without an IPv6 scope ("%eth0")
    a = getattr(a, "ipv4_mapped", None) or a
    return a.is_global and not a.is_multicast


def fetch(url, where, allow_private=False):
    """An http(s) URL -> its bytes (up to one past MAX_IMAGE_BYTES), read within URL_TIMEOUT s; no redirects.
    The socket connects to the address that was checked (not to the name again), so DNS rebinding has no window."""
    u, fail = urllib.parse.urlsplit(url), lambda why: APIError(400, f"{where}: the image URL {why}", where)
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
        addrs = [a[4][0] for a in socket.getaddrinfo(u.hostname or "", port, type=socket.SOCK_STREAM)]
    except (OSError, ValueError, UnicodeError):
        raise fail("is unreachable: its host:port does not resolve") from None
    if not allow_private and not all(map(public, addrs)):
        raise fail("is refused: its host is a private, loopback or reserved address (see --allow-private-urls)")
    conn = (http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection)(u.hostname, port)
    deadline, raw = time.monotonic() + URL_TIMEOUT, bytearray()
    try:
        conn.sock = socket.create_connection((addrs[0], port), URL_TIMEOUT)
        if u.scheme == "https":
            conn.sock = ssl.create_default_context().wrap_socket(conn.sock, server_hostname=u.hostname)
        conn.request("GET", (u.path or "/") + (f"?{u.query}" if u.query else ""), headers={"User-Agent": "nanollava"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise fail(f"answered HTTP {resp.status}" + " (redirects are not followed)" * (300 <= resp.status < 400))
        while len(raw) <= MAX_IMAGE_BYTES and (chunk := resp.read1(1 << 16)):  # counted, not Content-Length
            raw += chunk
            if time.monotonic() > deadline:
                raise TimeoutError
        return bytes(raw)
    except TimeoutError:
        raise fail(f"timed out after {URL_TIMEOUT} s") from None
    except (OSError, http.client.HTTPException) as e:
        raise fail(f"is unreachable ({type(e).__name__})") from None
    finally:
        conn.close()


def read_image(part, where, allow_private=False):
    """An image_url part (an http(s) URL or a data: URI) -> a PIL image, checked before decoding (bytes, pixels)."""
    url = part["image_url"].get("url") if isinstance(part.get("image_url"), dict) else None
    head, _, payload = url.partition(",") if isinstance(url, str) else ("", "", "")
    if head.lower().startswith(("http://", "https://")):
        raw = fetch(url, where, allow_private)
    elif head.startswith("data:image/") and head.endswith(";base64"):
        try:
            raw = base64.b64decode(payload, validate=True)
        except binascii.Error:
            raise APIError(400, f"{where}: the data URI is not valid base64", where) from None
    else:
        raise APIError(400, f"{where}: image_url.url must be an http(s) URL or a data:image/...;base64, URI", where)
    if len(raw) > MAX_IMAGE_BYTES:  # a URL's body stops right after the limit
        raise APIError(400, f"{where}: the image is over {MAX_IMAGE_BYTES} bytes", where)
    limit = Image.MAX_IMAGE_PIXELS
    try:
        img = Image.open(io.BytesIO(raw))  # the header only; PIL itself refuses twice the limit
        if limit and img.size[0] * img.size[1] > limit:
            raise Image.DecompressionBombError
        img.load()
        return img
    except Image.DecompressionBombError:
        raise APIError(400, f"{where}: the image has over {limit} pixels (PIL's bomb limit)", where) from None
    except Exception as e:  # whatever PIL raises for bytes that are no image it reads
        raise APIError(400, f"{where}: not an image PIL can read ({type(e).__name__})", where) from None


def read_messages(messages, allow_private=False):
    """OpenAI messages -> (the system text or None, LLaVA turns {"from", "value"}, the image or None)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {'role', 'content'} objects", "messages")
    system, turns, image = None, [], None
    for k, m in enumerate(messages):
        where, role = f"messages[{k}]", m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if role in ("system", "user", "assistant") else None
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise APIError(400, f"{where} must be {{'role': system|user|assistant, 'content': text|parts}}", where)
        texts = []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str) and data.IMAGE not in part["text"]:
                texts.append(part["text"])
            elif kind == "image_url" and role == "user" and image is None:
                image = read_image(part, f"{where}.content[{j}]", allow_private)
            else:
                raise APIError(400, f"{where}.content[{j}]: not a text part (without {data.IMAGE}) nor the user's "
                               "one image_url part", where)
        if role == "system":
            system = "\n".join(texts) if system is None else system + "\n" + "\n".join(texts)
        else:  # data.py checks the order: user first, alternating, the user's last
            turns.append({"from": data.ROLES[role == "assistant"], "value": "\n".join(texts)})
    return system, turns, image


OPTIONS = {  # name: (default, test, what it must be)
    "temperature": (1.0, lambda v: type(v) in (int, float) and 0 <= v <= 2, "a number in [0, 2]"),
    "top_p": (1.0, lambda v: type(v) in (int, float) and 0 < v <= 1, "a number in (0, 1]"),
    "max_tokens": (None, lambda v: type(v) is int and v > 0, "a whole number > 0"),
    "max_completion_tokens": (None, lambda v: type(v) is int and v > 0, "a whole number > 0"),
    "stop": ([], lambda v: type(v) is str or type(v) is list and len(v) <= 4 and all(type(s) is str for s in v),
             "a string or a list of up to 4 strings"),
    "seed": (None, lambda v: type(v) is int, "a whole number"),
    "n": (1, lambda v: v == 1 and type(v) is int, "1 (one choice a request)"),
    "stream": (False, lambda v: type(v) is bool, "true or false"),
    "stream_options": ({}, lambda v: type(v) is dict, "an object such as {'include_usage': true}"),
}


def parse_chat(body, engine, names, allow_private=False):
    """A chat.completions body -> (Request, its options); APIError 400 or 404 for what is wrong in it."""
    if body.get("model") is not None and body["model"] not in names:
        raise APIError(404, f"model {body['model']!r} is not served here, {names[0]!r} is", "model", "model_not_found")
    opt = {name: body[name] if body.get(name) is not None else default for name, (default, _, _) in OPTIONS.items()}
    for name, (_, ok, expected) in OPTIONS.items():
        if body.get(name) is not None and not ok(body[name]):
            raise APIError(400, f"'{name}' must be {expected}, not {json.dumps(body[name])[:40]}", name)
    system, turns, image = read_messages(body.get("messages"), allow_private)
    cfg, template = engine.model.config, data.get_template(engine.model.config.template)
    if image is not None and cfg.vision is None:
        raise APIError(400, f"model {names[0]!r} reads text only: send no image_url part", "messages")
    try:  # the system message replaces the template's
        template = template if system is None else replace(template, system=system)
        ids = data.tokenize_prompt(turns, engine.tok, template, image is not None, cfg.num_patches)
        pixels = None if image is None else preprocess(image, cfg.vision.image_size, cfg.pad_to_square)[None]
    except (ValueError, data.BadSample) as e:
        raise APIError(400, f"messages: {e}", "messages") from None
    if len(ids) > (ctx := cfg.text.max_position_embeddings):
        raise APIError(400, f"the prompt is {len(ids)} tokens, longer than the model's context of {ctx} tokens",
                       "messages", "context_length_exceeded")
    generator = torch.Generator(device=engine.device)
    generator.seed() if opt["seed"] is None else generator.manual_seed(opt["seed"])
    max_new = min(opt["max_completion_tokens"] or opt["max_tokens"] or ctx, ctx - len(ids) + 1)  # as generate
    stops = [s for s in ([opt["stop"]] if type(opt["stop"]) is str else opt["stop"]) if s]
    return Request(ids, pixels, max_new, opt["temperature"], opt["top_p"], generator, stops), opt


def reply_pieces(req, tok):
    """The reply as text while its tokens arrive; sets req.finish ("stop" | "length") and req.used (the
    tokens it took). A stop string ends it there and frees the slot; text that may begin one waits."""
    decoder, text, sent, req.finish, req.used = StreamDecoder(tok), "", 0, None, 0
    while req.finish is None:
        kind, value = req.events.get()
        if kind == "error":
            raise APIError(500, value, kind="server_error")
        if kind == "done":
            text, req.finish = text + decoder.flush(), value
        else:
            text, req.used = text + decoder.push(value), req.used + 1
        cuts = [i for i in (text.find(s, sent) for s in req.stops) if i >= 0]  # a stop can only start unsent
        if cuts:
            text, req.finish, req.cancelled = text[:min(cuts)], "stop", True
        held = 0 if req.finish else max((k for s in req.stops for k in range(1, len(s)) if text.endswith(s[:k])),
                                        default=0)
        if len(text) - held > sent:
            yield text[sent:len(text) - held]
            sent = len(text) - held


# ---- HTTP --------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    protocol_version, timeout = "HTTP/1.1", 60  # keep-alive; a stalled client's thread gives up after 60 s

    def do_GET(self):
        self._serve("/v1/models", lambda: self._send(200, {"object": "list", "data": [{
            "id": self.server.names[0], "object": "model", "created": self.server.created, "owned_by": "nanollava"}]}))

    def do_POST(self):
        self._serve("/v1/chat/completions", self._chat)

    def _serve(self, path, route):
        try:
            got, key = self.headers.get("Authorization", "").encode(), self.server.api_key
            if key and not hmac.compare_digest(got, f"Bearer {key}".encode()):
                raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
            if self.path.split("?")[0] != path:
                raise APIError(404, f"no {self.command} {self.path} here; try {path}", code="unknown_url")
            route()
        except APIError as e:
            self._send(e.status, e.body, e.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            traceback.print_exc()  # the operator's to read; the client gets one line
            self._send(500, APIError(500, "internal server error", kind="server_error").body)

    def _send(self, status, obj, headers=(), stream=False):
        body = b"" if stream else json.dumps(obj).encode()
        self.send_response(status)
        length = [("Cache-Control", "no-cache")] if stream else [("Content-Length", str(len(body)))]
        for name, value in [("Content-Type", "text/event-stream" if stream else "application/json"), *length,
                            *headers, *[("Connection", "close")] * (stream or status >= 400)]:
            self.send_header(name, value)  # an error may leave the body unread: the connection closes
        self.close_connection = stream or status >= 400
        self.end_headers()
        self.wfile.write(body)

    def _chat(self):
        length, limit = self.headers.get("Content-Length", ""), self.server.max_body
        if length.isdigit() and int(length) > limit:
            raise APIError(413, f"the body is {length} bytes, over the limit of {limit}", code="request_too_large")
        try:
            body = json.loads(self.rfile.read(int(length)) if length.isdigit() else b"")
        except ValueError:
            raise APIError(400, "the body is not valid JSON (with a Content-Length)") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        engine, name = self.server.engine, self.server.names[0]
        req, opt = parse_chat(body, engine, self.server.names, self.server.allow_private)
        engine.submit(req)
        head = {"id": f"chatcmpl-{os.urandom(12).hex()}", "created": int(time.time()), "model": name}
        usage = lambda: {"prompt_tokens": len(req.ids), "completion_tokens": req.used,  # noqa: E731
                         "total_tokens": len(req.ids) + req.used}
        try:
            if not opt["stream"]:
                text = "".join(reply_pieces(req, engine.tok))
                return self._send(200, {**head, "object": "chat.completion", "usage": usage(), "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": req.finish}]})
            self._send(200, None, stream=True)  # server-sent events; the connection's end is the stream's
            event = lambda obj: self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")  # noqa: E731
            chunk = lambda delta, finish=None: {**head, "object": "chat.completion.chunk", "choices": [  # noqa: E731
                {"index": 0, "delta": delta, "finish_reason": finish}]}
            event(chunk({"role": "assistant", "content": ""}))
            try:  # a write to a client that left raises BrokenPipe/ConnectionReset: the finally frees its slot
                for piece in reply_pieces(req, engine.tok):
                    event(chunk({"content": piece}))
                event(chunk({}, req.finish))
                if opt["stream_options"].get("include_usage"):
                    event({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage()})
            except APIError as e:
                event(e.body)
            self.wfile.write(b"data: [DONE]\n\n")
        finally:
            req.cancelled = True  # the loop drops the row at its next step (nothing to do once it is done)


class TextOnly:
    """A LLaMA/Vicuna as the loop sees a LLaVA: the same LLM and config, Vicuna's template, no vision."""

    def __init__(self, llm):
        self.llm, self.config = llm, SimpleNamespace(text=llm.config, template="vicuna_v1", vision=None, num_patches=0)

    def embed(self, input_ids, pixel_values=None):
        return self.llm.embed_tokens(input_ids)


def load_model(name, device, dtype, lora=None):
    """--model [--lora] -> (model, tokenizer): a llava-hf directory, or a LLaMA/Vicuna one (TextOnly)."""
    try:
        path = weights.fetch(name)
        if read_json(path / "config.json").get("model_type") == "llava":
            return load(path, device, dtype, lora)
        if lora:
            raise WeightsError("--lora applies to a llava-hf model; this is a LLaMA")
        return TextOnly(Llama.from_pretrained(path, dtype, device).eval()), Tokenizer(path)
    except WeightsError as e:
        raise WeightsError(f"--model {name}: {e}") from None


def make_server(engine, name, host="127.0.0.1", port=8000, api_key=None, max_body=MAX_BODY, allow_private=False):
    """A ThreadingHTTPServer (a thread a connection) in front of `engine`; port 0 picks a free port."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads, server.engine, server.api_key, server.max_body = True, engine, api_key, max_body
    server.allow_private = allow_private  # image URLs to loopback, private, ... addresses
    server.names, server.created = [name, os.path.basename(name.rstrip("/"))], int(time.time())
    return server


def main(argv=None):
    p = argparse.ArgumentParser(description="Serve LLaVA over the OpenAI chat-completions API.")
    p.add_argument("--model", default="llava-hf/llava-1.5-7b-hf", help="a llava-hf (or LLaMA) directory or Hub name")
    p.add_argument("--lora", help="a LoRA adapter directory (train.py's or PEFT's) to apply to --model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=POSITIVE, default=8, help="requests decoded together (KV cache slots)")
    p.add_argument("--max-queue", type=POSITIVE, default=32, help="requests waiting for a slot before a 429")
    p.add_argument("--api-key", default=os.environ.get("NANOLLAVA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $NANOLLAVA_API_KEY; unset: no key)")
    p.add_argument("--allow-private-urls", action="store_true", help="fetch image URLs on private addresses too")
    p.add_argument("--device", type=device_name, default="", help="cpu, cuda, ... (default: cuda if there is one)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model, tok = load_model(args.model, device, dtype_for(device, args.dtype), args.lora)
    except (WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    engine = Engine(model, tok, args.max_batch, args.max_queue).start()
    server = make_server(engine, args.model, args.host, args.port, args.api_key, allow_private=args.allow_private_urls)
    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: {args.host} is reachable from other machines and no --api-key is set", file=sys.stderr)
    print(f"serving {args.model} at http://{args.host}:{server.server_address[1]}/v1", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
