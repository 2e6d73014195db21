"""serve.py through the official `openai` client and raw HTTP, on a tiny random llava-hf checkpoint written
by transformers. Replies are checked against LLaVA.generate on prompts built here by hand (the vicuna_v1
text, the image id expanded), so neither the server's templating nor its batching is its own oracle."""

import base64
import contextlib
import http.client
import http.server
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

openai = pytest.importorskip("openai")

import clip  # noqa: E402
import data  # noqa: E402
import serve  # noqa: E402
from llama import Tokenizer  # noqa: E402
from model import LLaVA  # noqa: E402
from helpers import make_tiny_llava, photo  # noqa: E402

SYSTEM = "A chat between a curious user and an artificial intelligence assistant."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny_llava(tmp_path_factory.mktemp("llava"))
    return LLaVA.from_pretrained(d).eval(), Tokenizer(d)


def start(model, tok, run=True, max_batch=8, max_queue=32, **kw):
    engine = serve.Engine(model, tok, max_batch, max_queue)
    server = serve.make_server(engine, "tiny", port=0, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, engine.start() if run else engine


@pytest.fixture(scope="module")
def srv(tiny):
    server, engine = start(*tiny)
    yield server, engine
    server.shutdown()
    server.server_close()


def client(server, key="unused"):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key=key,
                         max_retries=0, timeout=120)


def data_uri(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text, img=None):
    parts = [{"type": "text", "text": text}]
    return {"role": "user", "content": parts + [{"type": "image_url", "image_url": {"url": data_uri(img)}}]
            if img is not None else text}


def reference(tiny, turns, img=None, system=data.VICUNA_SYSTEM, max_new=24):
    """The vicuna_v1 prompt written out by hand -> (prompt ids, LLaVA.generate's greedy ids, EOS included)."""
    model, tok = tiny
    text = f"{system} "
    for k, q in enumerate(turns[::2]):
        q = ("<image>\n" + q) if k == 0 and img is not None else q
        text += f"USER: {q} ASSISTANT:" + (f" {turns[2 * k + 1]}</s>" if 2 * k + 1 < len(turns) else "")
    ids = [j for i in tok.encode(text) for j in [i] * (model.config.num_patches if i == tok.image_token_id else 1)]
    pv = None if img is None else clip.preprocess(img, model.config.vision.image_size, model.config.pad_to_square)
    out = list(model.generate(torch.tensor(ids), None if pv is None else pv[None], max_new_tokens=max_new,
                              eos_id=tok.eos_id))
    return ids, out


def expect(tiny, ids, out, max_new):
    """What the server must answer for LLaVA.generate's `out`: text, finish_reason, usage."""
    finish = "stop" if out[-1] == tiny[1].eos_id else "length"
    assert finish == "stop" or len(out) == max_new
    return tiny[1].decode([t for t in out if t != tiny[1].eos_id]), finish, (len(ids), len(out))


def answer(r):
    return r.choices[0].message.content, r.choices[0].finish_reason, (r.usage.prompt_tokens,
                                                                      r.usage.completion_tokens)


def test_image_request_equals_generate_streamed_or_not(tiny, srv):
    c, img = client(srv[0]), photo(0)
    ids, out = reference(tiny, ["What is in the picture?"], img)
    want = expect(tiny, ids, out, 24)
    r = c.chat.completions.create(model="tiny", messages=[user("What is in the picture?", img)], temperature=0,
                                  max_tokens=24)
    assert r.object == "chat.completion" and r.model == "tiny" and r.id and r.created > 0
    assert answer(r) == want and r.usage.total_tokens == len(ids) + len(out)
    assert len(want[0]) > 5  # a real reply, not an empty one

    chunks = list(c.chat.completions.create(model="tiny", messages=[user("What is in the picture?", img)],
                                            temperature=0, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    u = chunks[-1].usage
    assert (text, finish[-1], (u.prompt_tokens, u.completion_tokens)) == want and len(finish) == 1
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 2  # it did stream


def test_system_text_only_multi_turn_and_max_tokens(tiny, srv):
    c = client(srv[0])
    # the system message replaces the template's; a text-only request; max_tokens hitting "length"
    ids, out = reference(tiny, ["How many people are there?"], system=SYSTEM, max_new=7)
    r = c.chat.completions.create(model="tiny", temperature=0, max_completion_tokens=7, messages=[
        {"role": "system", "content": SYSTEM}, user("How many people are there?")])
    assert answer(r) == expect(tiny, ids, out, 7)
    # earlier turns are history: the assistant's reply sits in the prompt as vicuna_v1 writes it
    turns = ["What is in the picture?", "A small red boat.", "What color is the car?"]
    ids, out = reference(tiny, turns, photo(1), max_new=20)
    r = c.chat.completions.create(model="tiny", temperature=0, max_tokens=20, messages=[
        user(turns[0], photo(1)), {"role": "assistant", "content": turns[1]}, user(turns[2])])
    assert answer(r) == expect(tiny, ids, out, 20)


def test_stop_strings(tiny, srv):
    c = client(srv[0])
    ids, out = reference(tiny, ["Describe the image in detail."], photo(2), max_new=30)
    full = tiny[1].decode([t for t in out if t != tiny[1].eos_id])
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert len(stop) == 2 and stop.strip()
    for stream in (False, True):
        r = c.chat.completions.create(model="tiny", temperature=0, max_tokens=30, stop=[stop, "\x00never"],
                                      stream=stream, messages=[user("Describe the image in detail.", photo(2))])
        if stream:
            chunks = list(r)
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert (text, finish) == (full[:full.index(stop)], "stop")


def tokens_of(req, got=()):
    got, event = list(got), None
    while event != "done":
        event, value = req.events.get(timeout=60)
        got += [value] if event == "token" else []
    return got


def test_greedy_equals_generate_token_for_token_alone_and_batched(tiny, monkeypatch):
    """Eight requests of different lengths, with and without images, each alone in the engine and then in one
    running batch, four joining while the first four decode: every one's tokens are LLaVA.generate's."""
    model, tok = tiny
    questions = ["What is in the picture?", "Hi", "Describe the image in detail. Explain why the scene is unusual.",
                 "How many people are there?", "What color is the car?", "Why?", "Describe it.", "Where is this?"]
    lengths = [60, 56, 52, 48, 16, 18, 20, 22]  # the first four still decode when the others join
    cases = [reference(tiny, [q], photo(k) if k % 2 == 0 else None, max_new=n)
             for k, (q, n) in enumerate(zip(questions, lengths))]
    assert all(len(out) == n for (_, out), n in zip(cases[:4], lengths))
    busy, step = [], serve.forward_rows
    monkeypatch.setattr(serve, "forward_rows", lambda *a: busy.append(len(engine.rows)) or step(*a))
    engine = serve.Engine(model, tok, max_batch=8)

    def request(k):
        img, cfg = photo(k) if k % 2 == 0 else None, model.config
        pv = None if img is None else clip.preprocess(img, cfg.vision.image_size, cfg.pad_to_square)[None]
        return serve.Request(cases[k][0], pv, lengths[k], temperature=0)
    reqs = [request(k) for k in range(4)]
    for r in reqs:
        engine.submit(r)
    engine.start()
    first = reqs[0].events.get()
    reqs += [request(k) for k in range(4, 8)]
    for r in reqs[4:]:
        engine.submit(r)
    assert [tokens_of(r, [first[1]] if k == 0 else []) for k, r in enumerate(reqs)] == [out for _, out in cases]
    assert max(busy) == 8 and not engine.rows  # they did run together, and all left
    busy.clear()
    for k in range(8):
        engine.submit(r := request(k))
        assert tokens_of(r) == cases[k][1], k
    assert max(busy) == 1


def test_concurrent_clients_equal_generate(tiny, srv):
    questions = ["What is in the picture?", "Hi", "How many people are there?", "Describe it.",
                 "What color is the car?", "Why?", "Where is this?", "Describe the image in detail."]
    imgs = [photo(k) if k % 3 else None for k in range(8)]
    wants = [expect(tiny, *reference(tiny, [q], img, max_new=20), 20) for q, img in zip(questions, imgs)]

    def ask(k, c):
        r = c.chat.completions.create(model="tiny", temperature=0, max_tokens=20, stream=k % 2 == 1,
                                      stream_options={"include_usage": True} if k % 2 else None,
                                      messages=[user(questions[k], imgs[k])])
        if k % 2 == 0:
            return answer(r)
        chunks = list(r)
        u = chunks[-1].usage
        return ("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices),
                [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1],
                (u.prompt_tokens, u.completion_tokens))
    def one_client(first):  # 10 requests one after another, images, text and streams mixed
        c = client(srv[0])
        return [(k, ask(k, c)) for k in ((first + j) % 8 for j in range(10))]
    with ThreadPoolExecutor(8) as pool:  # the load test: 8 clients x 10 requests, no failure
        replies = [r for rs in pool.map(one_client, range(8)) for r in rs]
    assert len(replies) == 80 and all(got == wants[k] for k, got in replies)


def test_sampling_is_seeded(srv):
    c = client(srv[0])
    ask = lambda seed: c.chat.completions.create(  # noqa: E731
        model="tiny", temperature=1.0, top_p=0.9, seed=seed, max_tokens=16, messages=[user("Hi")]
    ).choices[0].message.content
    assert ask(1) == ask(1) and ask(1) != ask(2)
    assert [m.id for m in c.models.list().data] == ["tiny"]


# ---- bad input: the right status, OpenAI's error object, and the server serves on ----

def post(server, body, headers=None, path="/v1/chat/completions"):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, raw, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read()), dict(resp.getheaders())
    conn.close()
    return out


def refused(server, body, status, words, headers=None, **kw):
    code, obj, _ = post(server, body, headers, **kw)
    err = obj["error"]
    assert code == status and set(err) == {"message", "type", "param", "code"}, (code, obj)
    assert words in err["message"] and "Traceback" not in err["message"], err
    return err


def ok(server):
    code, obj, _ = post(server, {"messages": [user("Hi")], "max_tokens": 2})
    assert code == 200 and obj["choices"][0]["message"]["role"] == "assistant"


def png_header(w, h):
    """A PNG that claims w x h pixels: its header alone, no real pixel data."""
    chunk = lambda kind, d: struct.pack(">I", len(d)) + kind + d + struct.pack(">I", zlib.crc32(kind + d))  # noqa
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def image_message(url):
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "What?"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}


def test_bad_requests_are_refused_and_the_server_serves_on(srv):
    s, good = srv[0], {"messages": [user("Hi")]}
    b64 = lambda raw: "data:image/png;base64," + base64.b64encode(raw).decode()  # noqa: E731
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({}, 400, "'messages'"),
        ({"messages": "Hi"}, 400, "'messages'"),
        ({"messages": [{"role": "robot", "content": "Hi"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "content[0]"),
        ({"messages": [{"role": "user", "content": "Hi <image>"}]}, 400, "<image>"),
        ({"messages": [user("Hi"), {"role": "assistant", "content": "Hello"}]}, 400, "end with a user question"),
        ({**good, "temperature": "hot"}, 400, "'temperature'"),
        ({**good, "max_tokens": 0}, 400, "'max_tokens'"),
        ({**good, "n": 2}, 400, "'n'"),
        ({**good, "stream": "yes"}, 400, "'stream'"),
        ({**good, "stop": [1]}, 400, "'stop'"),
        ({**good, "model": "gpt-4o"}, 404, "not served"),
        (image_message("ftp://example.com/cat.png"), 400, "http(s) URL or a data:image/"),
        (image_message("data:image/png;base64,@@not base64@@"), 400, "base64"),
        (image_message("data:text/plain,hello"), 400, "data:image/"),
        (image_message(b64(b"hello, not an image")), 400, "not an image"),
        (image_message(b64(png_header(10000, 10000))), 400, "pixels"),  # over PIL's limit: our check
        (image_message(b64(png_header(30000, 30000))), 400, "pixels"),  # over twice it: PIL's own
        ({"messages": [user("the quick brown fox " * 400)]}, 400, "longer than the model's context of 1024"),
    ]
    for body, status, words in cases:
        refused(s, body, status, words)
        ok(s)
    refused(s, good, 404, "no POST", path="/v1/completions")
    err = refused(s, {"messages": [user("the quick brown fox " * 400)]}, 400, "tokens")
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"


def test_api_key_and_body_limit(tiny):
    server, _ = start(*tiny, api_key="s3cret-key", max_body=4096)
    body = {"messages": [user("Hi")], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
        refused(server, body, 401, "API key", headers)
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").models.list()
    auth = {"Authorization": "Bearer s3cret-key"}
    refused(server, {"messages": [user("x" * 5000)]}, 413, "over the limit of 4096", auth)
    assert post(server, body, auth)[0] == 200
    assert client(server, "s3cret-key").chat.completions.create(model="tiny", messages=[user("Hi")],
                                                                max_tokens=2).choices[0].message.content is not None
    server.shutdown()


def test_full_queue_is_429_then_served(tiny):
    server, engine = start(*tiny, run=False, max_batch=1, max_queue=2)  # the loop waits: requests queue up
    body = {"messages": [user("Hi")], "max_tokens": 3}
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(post, server, body) for _ in range(2)]
        while len(engine.waiting) < 2:
            time.sleep(0.01)
        code, obj, headers = post(server, body)
        assert code == 429 and obj["error"]["code"] == "rate_limit_exceeded" and headers["Retry-After"] == "1"
        engine.start()
        assert [w.result()[0] for w in waiting] == [200, 200]
    assert post(server, body)[0] == 200
    server.shutdown()


def test_client_gone_mid_stream_frees_its_slot(tiny, srv):
    server, engine = srv
    ids, out = reference(tiny, ["Tell me a long story."], max_new=400)
    assert tiny[1].eos_id not in out  # the reply would run to max_tokens: only the disconnect can end it
    before = engine.cancelled
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"messages": [user("Tell me a long story.")], "temperature": 0, "max_tokens": 400, "stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    resp.close()
    conn.close()
    deadline = time.time() + 30
    while (engine.rows or engine.cancelled == before) and time.time() < deadline:
        time.sleep(0.01)
    assert not engine.rows and engine.cancelled == before + 1
    ok(server)


def test_a_model_failure_fails_its_requests_not_the_server(srv, monkeypatch):
    def broken(*a):
        raise RuntimeError("internal detail /secret/path")
    monkeypatch.setattr(serve, "forward_rows", broken)
    err = refused(srv[0], {"messages": [user("Hi")], "max_tokens": 5}, 500, "the model failed")
    assert "secret" not in err["message"] and err["type"] == "server_error"
    monkeypatch.undo()
    ok(srv[0])


@contextlib.contextmanager
def served(model_dir, env):
    """python serve.py --model model_dir on a free port, as a user starts it -> its base URL."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(model_dir), "--port", "0"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, "serve.py exited before serving"
        yield line.split(" at ")[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_command_line_server(tmp_path):
    """python serve.py as a user starts it: the key from NANOLLAVA_API_KEY, a free port, then a reply."""
    d = make_tiny_llava(tmp_path / "tiny")
    env = {**os.environ, "NANOLLAVA_API_KEY": "env-key", "OMP_NUM_THREADS": "1"}
    with served(d, env) as url:
        c = openai.OpenAI(base_url=url, api_key="env-key", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == [str(d)]
        r = c.chat.completions.create(model="tiny", messages=[user("Hi")], max_tokens=3)
        assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=c.base_url, api_key="wrong", max_retries=0).models.list()


class ImageHost(http.server.BaseHTTPRequestHandler):
    """The web an image URL points to: a PNG, a non-image, bodies without end or with a lying Content-Length,
    a silent server, a slow drip and a redirect to a private address."""

    def do_GET(self):
        png, big = base64.b64decode(data_uri(photo(3)).partition(",")[2]), b"\0" * (1 << 16)
        send = {"/cat.png": png, "/text": b"hello, not an image", "/lie": big * 40}.get(self.path, b"")
        self.send_response(302 if self.path == "/redirect" else 200)
        self.send_header("Location", "http://10.0.0.1/cat.png")
        if send:  # /lie claims 1000 bytes and sends 2.6 MB; /endless, /drip and /silent send no length at all
            self.send_header("Content-Length", "1000" if self.path == "/lie" else str(len(send)))
        self.end_headers()
        time.sleep(4 if self.path == "/silent" else 0)
        for _ in range(400 if self.path in ("/endless", "/drip") else 0):
            self.wfile.write(b"\0" if self.path == "/drip" else big)
            time.sleep(0.05 if self.path == "/drip" else 0)
        self.wfile.write(send)

    def log_message(self, *a):
        pass


def test_image_urls_fetched_or_refused(tiny, monkeypatch):
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHost)
    web.daemon_threads, web.handle_error = True, lambda *a: None  # a client that hangs up is no error here
    threading.Thread(target=web.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{web.server_address[1]}"
    server, _ = start(*tiny, allow_private=True)
    ask = lambda u: client(server).chat.completions.create(  # noqa: E731
        model="tiny", temperature=0, max_tokens=12, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in the picture?"}, {"type": "image_url", "image_url": {"url": u}}]}])
    want = expect(tiny, *reference(tiny, ["What is in the picture?"], photo(3), max_new=12), 12)
    assert answer(ask(f"{url}/cat.png")) == answer(ask(data_uri(photo(3)))) == want  # the same bytes as a data URI
    monkeypatch.setattr(serve, "URL_TIMEOUT", 1.5)
    monkeypatch.setattr(serve, "MAX_IMAGE_BYTES", 1 << 20)
    for path, words in [("/text", "not an image"), ("/endless", "the image is over 1048576 bytes"),
                        ("/lie", "not an image"),  # the 1000 bytes it claimed, the rest never read
                        ("/silent", "timed out after 1.5 s"), ("/drip", "timed out after 1.5 s"),
                        ("/redirect", "HTTP 302 (redirects are not followed)")]:
        err = refused(server, image_message(url + path), 400, words)
        assert err["param"] == "messages[0].content[1]"
        ok(server)
    refused(server, image_message("http://127.0.0.1:1/cat.png"), 400, "unreachable (ConnectionRefusedError)")
    refused(server, image_message("http://no-such-host.invalid/cat.png"), 400, "does not resolve")
    server.shutdown()
    server, _ = start(*tiny)  # the default: only public addresses
    for host in ("127.0.0.1", "[::1]", "localhost", "10.0.0.1", "169.254.169.254", "224.0.0.1", "0.0.0.0"):
        refused(server, image_message(f"http://{host}:{web.server_address[1]}/cat.png"), 400, "is refused")
    ok(server)
    server.shutdown()
    web.shutdown()


def make_tiny_llama(directory, max_positions=4096, eos_logit=0.0):
    """A random LlamaForCausalLM and its sentencepiece tokenizer, saved as a Vicuna directory is. eos_logit
    makes hidden unit 0 a constant that raises EOS's logit: sampled replies end after a few tokens."""
    import transformers
    from helpers import make_sp_tokenizer
    make_sp_tokenizer(directory)
    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                                      max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    if eos_logit:
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 8.0
            model.lm_head.weight[2] = 0.0
            model.lm_head.weight[2, 0] = eos_logit / 8
    model.save_pretrained(directory)
    return Path(directory)


def test_a_llama_directory_is_served_text_only(tmp_path):
    """A plain LLaMA answers as transformers' greedy generate does on the vicuna_v1 prompt; an image is refused."""
    import transformers
    d = make_tiny_llama(tmp_path / "llama", max_positions=256)
    model, tok = serve.load_model(str(d), torch.device("cpu"), torch.float32)
    server, _ = start(model, tok)
    try:
        c = client(server)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                                               user("Hi there")], max_tokens=12, temperature=0)
        ids = tok.encode("Be brief. USER: Hi there ASSISTANT:")
        hf = transformers.LlamaForCausalLM.from_pretrained(d).eval()
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=2)[0, len(ids):]
        assert r.choices[0].message.content == tok.decode([t for t in out.tolist() if t != 2])
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(out)
        with pytest.raises(openai.BadRequestError, match="reads text only"):
            c.chat.completions.create(model="tiny", messages=[user("What is it?", photo(0))])
    finally:
        server.shutdown()
        server.server_close()


def test_generate_data_with_a_served_llama_as_teacher(tmp_path):
    """The README's pipeline as a user runs it: python serve.py on a LLaMA directory, then python
    generate_data.py generate --api-base at it: records are written (the wiring, not their quality); then
    eval.py judge asks it too, greedy (each of 3 questions asked twice, its replies no scores)."""
    d, out = make_tiny_llama(tmp_path / "llama", eos_logit=8.0), tmp_path / "detail.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENAI_API_KEY": ""}
    with served(d, env) as url:
        fix = ROOT / "tests" / "fixtures" / "generate_data"
        gen = subprocess.run([sys.executable, str(ROOT / "generate_data.py"), "generate", "--types", "detail",
                              "--captions", str(fix / "captions_val2014_mini.json"), "--instances",
                              str(fix / "instances_val2014_mini.json"), "--out", str(out), "--api-base",
                              url, "--model", str(d), "--max-tokens", "96",
                              "--workers", "4", "--backoff-base", "0.01"], capture_output=True, text=True, env=env, timeout=300)
        qa90 = ROOT / "tests" / "fixtures" / "llava_bench_qa90"  # the judge: no reply parses as two scores
        judge = subprocess.run([sys.executable, str(ROOT / "eval.py"), "judge", "--questions",
                                str(qa90 / "qa90_questions.jsonl"), "--answers", str(qa90 / "qa90_gpt4_answer.jsonl"),
                                "--our-answers", str(qa90 / "qa90_gpt4_answer.jsonl"), "--context",
                                str(fix / "caps_boxes_coco2014_val_80.jsonl"), "--limit", "3", "--parse-retries", "1", "--temperature", "0",
                                "--api-base", url, "--judge-model", str(d),
                                "--out", str(tmp_path / "judge.jsonl")], capture_output=True, text=True, env=env,
                               timeout=300)
    assert judge.returncode == 3 and "judged 0 now" in judge.stdout and "requests 6 (retries 0)" in judge.stdout, (
        judge.stdout + judge.stderr)
    assert gen.returncode in (0, 3), gen.stderr  # 3: some image's three replies were all empty (sampled)
    records = [json.loads(r) for r in out.read_text().splitlines()]
    assert len(records) == len({r["id"] for r in records}) >= 9, gen.stdout + gen.stderr  # of 12
    assert all(r["id"].endswith("_detail") and r["conversations"][1]["value"] for r in records)
    assert all(r["conversations"][0]["value"].count("<image>") == 1 for r in records)
