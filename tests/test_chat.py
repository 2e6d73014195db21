"""chat.py end to end on a tiny random llava-hf checkpoint and a real photo (skimage's astronaut):
--prompt as a subprocess, the REPL through stdin (two turns, /image, /reset), clear errors, and
a Hub name fetched from a local HTTP server laid out like the Hub."""

import functools
import http.server
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import chat  # noqa: E402
from llama import Tokenizer  # noqa: E402
from model import LLaVA  # noqa: E402
from helpers import make_tiny_llava  # noqa: E402

N = 10  # new tokens per answer: enough to see text, short enough to be fast
GREEDY = ["--temperature", "0", "--max-new-tokens", str(N)]
Q1, Q2 = "What is in the picture?", "How many people are there?"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import skimage.data
    root = tmp_path_factory.mktemp("chat")
    Image.fromarray(skimage.data.astronaut()).save(root / "astronaut.jpg", quality=90)
    Image.fromarray(skimage.data.chelsea()).save(root / "cat.jpg", quality=90)
    ckpt = make_tiny_llava(root / "tiny", seed=1)
    model = LLaVA.from_pretrained(ckpt).eval()
    return root, ckpt, model, Tokenizer(ckpt)


def expected(world, *turns, image="astronaut.jpg"):
    """The answers of an in-process greedy Chat to these questions, one conversation."""
    root, _, model, tok = world
    c = chat.Chat(model, tok, max_new_tokens=N, temperature=0)
    c.set_image(Image.open(root / image))
    return ["".join(c.ask(q)) for q in turns]


def run(args, stdin="", env=None):
    return subprocess.run([sys.executable, str(ROOT / "chat.py"), *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", timeout=120, cwd=ROOT, env={**os.environ, **(env or {})})


def test_prompt_mode_prints_the_answer(world):
    root, ckpt, _, _ = world
    r = run([str(root / "astronaut.jpg"), "--model", str(ckpt), "--prompt", Q1, *GREEDY])
    assert r.returncode == 0, r.stderr
    answer = expected(world, Q1)[0]
    assert answer.strip()
    assert r.stdout == answer + "\n"  # only the answer on stdout: scriptable


def test_repl_two_turns_image_and_reset(world):
    root, ckpt, _, _ = world
    stdin = f"{Q1}\n{Q2}\n/image {root / 'cat.jpg'}\n{Q1}\n/reset\n{Q1}\n/image {root / 'nope.jpg'}\n/image\n"
    r = run([str(root / "astronaut.jpg"), "--model", str(ckpt), *GREEDY], stdin=stdin)
    assert r.returncode == 0, r.stderr
    answers = [line.split("ASSISTANT: ", 1)[1] for line in r.stdout.splitlines() if "ASSISTANT: " in line]
    a1, a2 = expected(world, Q1, Q2)
    cat = expected(world, Q1, image="cat.jpg")[0]
    assert answers == [a1, a2, cat, cat]  # after /reset the same question gets the same answer
    assert a2 != a1 and cat != a1
    assert "(new image, new conversation)" in r.stdout and "(new conversation)" in r.stdout
    assert f"error: image not found: {root / 'nope.jpg'}" in r.stdout  # a bad /image is not fatal
    assert "usage: /image PATH" in r.stdout


def test_terminal_line_editing_and_ctrl_c_at_the_prompt(world):
    """In a real terminal (a pty): the left arrow edits the line (readline), and Ctrl-C at the
    prompt, sent to the whole foreground process group as a terminal does, quits quietly."""
    import pty
    import select
    import signal
    root, ckpt, _, _ = world
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, str(ROOT / "chat.py"), str(root / "astronaut.jpg"), "--model", str(ckpt),
                          *GREEDY], stdin=slave, stdout=slave, stderr=subprocess.PIPE, cwd=ROOT,
                         start_new_session=True, env={**os.environ, "TERM": "xterm"})
    os.close(slave)
    seen = b""

    def read_until(marker, count=1, timeout=60):
        nonlocal seen
        end = time.time() + timeout
        while seen.count(marker) < count and time.time() < end:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)
        assert seen.count(marker) >= count, seen[-500:]

    try:
        read_until(b"USER: ")
        os.write(master, Q1[:-2].encode() + b"?\x1b[D" + Q1[-2].encode() + b"\r")  # typo mended with the arrow
        read_until(b"USER: ", 2)
        # CPython's readline misses a SIGINT that lands after its prompt but before it sleeps in
        # poll() (a person's Ctrl-C comes later than the prompt's last byte): wait for the sleep
        wchan, end = Path(f"/proc/{p.pid}/wchan"), time.time() + 10
        while wchan.exists() and not re.search("poll|select", wchan.read_text()) and time.time() < end:
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGINT)
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    assert text.split("ASSISTANT: ", 1)[1].split("\r\n")[0] == expected(world, Q1)[0]
    err = p.stderr.read().decode()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_follow_up_equals_fresh_run_on_the_conversation(world):
    """Chat feeds only the new turn; the cache then holds exactly a fresh run's prompt."""
    root, _, model, tok = world
    c = chat.Chat(model, tok, max_new_tokens=N, temperature=0)
    c.set_image(Image.open(root / "astronaut.jpg"))
    "".join(c.ask(Q1))
    history = list(c.state.tokens)
    a2 = "".join(c.ask(Q2))
    follow = c.state.tokens[len(history):len(c.state.tokens) - N]
    assert follow[0] == tok.eos_id  # N tokens without EOS: chat closes the reply with </s>
    assert tok.decode(follow[1:]) == "USER: How many people are there? ASSISTANT:"
    fresh = list(model.generate(torch.tensor(history + follow), c.pixel_values, max_new_tokens=N, eos_id=tok.eos_id))
    assert a2 == tok.decode(fresh)
    assert c.turns[0] == Q1 and c.turns[2] == Q2 and len(c.turns) == 4


def test_errors_are_one_line(world, tmp_path, capsys):
    root, ckpt, _, _ = world
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for f in ckpt.iterdir():
        if f.suffix != ".safetensors":
            (incomplete / f.name).write_bytes(f.read_bytes())
    cases = [
        ([str(tmp_path / "missing.jpg"), "--model", str(ckpt), "--prompt", "hi"], "image not found"),
        ([str(tmp_path / "broken.jpg"), "--model", str(ckpt), "--prompt", "hi"], "cannot read image"),
        ([str(root / "astronaut.jpg"), "--model", str(incomplete), "--prompt", "hi"], str(incomplete)),
        ([str(root / "astronaut.jpg"), "--model", str(ckpt), "--prompt", "The lazy dog sleeps. " * 200],
         r"tokens, longer than the model's context of 1024 tokens"),
    ]
    for argv, message in cases:
        assert chat.main(argv + GREEDY) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and message in err, err
    # the context error says how long the prompt is
    assert chat.main(cases[-1][0] + GREEDY) == 1
    err = capsys.readouterr().err
    n = int(err.split("the prompt is ")[1].split()[0])
    assert n > 1024


def test_subprocess_error_has_no_traceback(world, tmp_path):
    _, ckpt, _, _ = world
    r = run([str(tmp_path / "missing.jpg"), "--model", str(ckpt), "--prompt", "hi"])
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: image not found: {tmp_path / 'missing.jpg'}"


def test_compile_is_a_noop_on_cpu(world, capsys):
    root, ckpt, _, _ = world
    assert chat.main([str(root / "astronaut.jpg"), "--model", str(ckpt), "--prompt", Q1, "--compile", *GREEDY]) == 0
    out = capsys.readouterr()
    assert "--compile is for CUDA" in out.err
    assert out.out == expected(world, Q1)[0] + "\n"


def test_sampling_with_seed_is_repeatable(world, capsys):
    root, ckpt, _, _ = world
    argv = [str(root / "astronaut.jpg"), "--model", str(ckpt), "--prompt", Q1, "--temperature", "1.0",
            "--top-p", "0.9", "--max-new-tokens", "16"]
    outs = []
    for seed in ("5", "5", "6"):
        assert chat.main(argv + ["--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] != outs[2]


def test_hub_name_is_fetched_and_cached(world, tmp_path, monkeypatch, capsys):
    """--model org/name through a local server in the Hub's URL layout, then the cached copy."""
    root, ckpt, _, _ = world

    class Hub(http.server.SimpleHTTPRequestHandler):
        def translate_path(self, path):  # /test-org/tiny-llava/resolve/main/FILE -> ckpt/FILE
            prefix = "/test-org/tiny-llava/resolve/main/"
            return str(ckpt / path[len(prefix):]) if path.startswith(prefix) else "/nonexistent"

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Hub, directory=str(ckpt)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("NANOLLAVA_HUB_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("NANOLLAVA_CACHE", str(tmp_path / "cache"))
    argv = [str(root / "astronaut.jpg"), "--model", "test-org/tiny-llava", "--prompt", Q1, *GREEDY]
    try:
        assert chat.main(argv) == 0
    finally:
        server.shutdown()
        server.server_close()
    out = capsys.readouterr()
    assert out.out == expected(world, Q1)[0] + "\n"
    assert "model.safetensors" in out.err  # the tqdm bar of the download
    cached = tmp_path / "cache" / "test-org--tiny-llava"
    assert (cached / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    # the server is gone: the cached copy answers offline
    assert chat.main(argv) == 0
    assert capsys.readouterr().out == expected(world, Q1)[0] + "\n"


@pytest.mark.parametrize("flag, value, says", [("--temperature", "-1", "'-1' is not a number >= 0"),
                                               ("--top-p", "0", "is not a number in (0, 1]"),
                                               ("--max-new-tokens", "0", "'0' is not")])
def test_bad_values_are_refused_when_parsed(flag, value, says, capsys):
    with pytest.raises(SystemExit) as e:
        chat.parse_args(["x.jpg", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: " in err and says in err, err


def test_a_cuda_device_without_cuda_is_refused_when_parsed(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        chat.parse_args(["x.jpg", "--device", "cuda"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "sees no CUDA GPU; use cpu" in err, err
