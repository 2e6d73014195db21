"""Shared test helpers.

`make_sp_tokenizer(dir)` trains a tiny sentencepiece BPE model shaped like the LLaMA/Vicuna one
(BPE, byte fallback, digits split, no normalisation, dummy prefix on, UNK 0 / BOS 1 / EOS 2) and
writes it into `dir` together with the llava-hf tokenizer files (`tokenizer_config.json`,
`special_tokens_map.json`, `added_tokens.json` with `<image>` = vocab_size and
`<pad>` = vocab_size + 1). Training runs once per (vocab_size, text) and is cached on disk under
the system temp dir, so many tests (and pytest processes) share one model.
"""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")

# Our own sentences (not copied from any data set): plain English with the words the LLaVA
# templates use, digits, punctuation, a little code and some repeated phrases so BPE has merges.
DEFAULT_TEXT = """\
A chat between a curious user and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the user's questions.
USER: What is in the picture? ASSISTANT: The picture shows a small red boat on a calm lake.
USER: How many people are there? ASSISTANT: There are 3 people standing near the water.
USER: What color is the car? ASSISTANT: The car is blue, and it is parked next to a tree.
The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the warm sun.
A man is riding a bicycle down a busy street while a woman walks her dog on the sidewalk.
Two children are playing with a ball in the park; their parents watch from a wooden bench.
The kitchen has a white table, four chairs, a window, and a bowl of fresh fruit.
There is a cat sitting on the windowsill, looking at the birds outside.
In 2023, the team trained the model for 12 hours on 8 GPUs with a batch size of 128.
The answer is (A) because the image shows a sunny day with clear skies.
Describe the image in detail. Explain why the scene is unusual.
def forward(self, x):
    if x is None:
        return 0
    for layer in self.layers:
        x = layer(x)
        if x.sum() > 0:
            x = x * 2
    return self.proj(x) + 1
Two  spaces  between  words  here.  And    four    there.
Question: Which of these animals can fly? Options: (A) dog (B) bird (C) fish
Context: The weather is cold and the ground is covered with snow.
She said, "Let's meet at 10:30 near the station!" He replied: "Sure, see you there."
The train arrives at the station at noon, and the passengers step onto the platform.
Large language models read text as tokens and predict the next token one at a time.
Vision encoders turn an image into patches, and each patch becomes a feature vector.
"""


def _train(model_path, vocab_size, text):
    import sentencepiece as spm  # imported here so test collection stays cheap

    lines = [line for line in text.splitlines() if line.strip()]
    # Repeat the text a few times so merges have counts; settings mirror LLaMA's tokenizer.model.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4),
        model_prefix=str(model_path.with_suffix("")),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )


def llava_hf_tokenizer_files(vocab_size):
    """The llava-hf tokenizer side files for a base vocabulary of `vocab_size` pieces."""
    image_id, pad_id = vocab_size, vocab_size + 1

    def added(content):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            "0": added("<unk>"), "1": added("<s>"), "2": added("</s>"),
            str(image_id): added("<image>"), str(pad_id): added("<pad>"),
        },
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<pad>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
               "additional_special_tokens": ["<image>"]}
    added_tokens = {"<image>": image_id, "<pad>": pad_id}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special,
            "added_tokens.json": added_tokens}


def make_sp_tokenizer(dir, vocab_size=512, text=None):
    """Train (or reuse) a tiny LLaMA-style sentencepiece model and write llava-hf tokenizer files.

    Returns the path of `dir/tokenizer.model`. `vocab_size` must exceed 259 (3 specials + 256 byte
    pieces) plus the number of distinct characters in `text`.
    """
    text = DEFAULT_TEXT if text is None else text
    key = hashlib.sha256(f"{vocab_size}\n{text}".encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "nanollava-test-sp" / key
    cached = cache / "tokenizer.model"
    if not cached.exists():
        # Train in a private dir and rename into place, so parallel test processes never see a
        # half-written model.
        cache.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=cache.parent))
        _train(work / "tokenizer.model", vocab_size, text)
        try:
            os.rename(work, cache)
        except OSError:  # another process won the race; its model is identical
            shutil.rmtree(work, ignore_errors=True)

    import sentencepiece as spm

    n = spm.SentencePieceProcessor(model_file=str(cached)).vocab_size()
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, dir / "tokenizer.model")
    for name, content in llava_hf_tokenizer_files(n).items():
        (dir / name).write_text(json.dumps(content, indent=2))
    return dir / "tokenizer.model"


class LocalChatServer:
    """An OpenAI-compatible POST /v1/chat/completions server on 127.0.0.1 (a free port), run in
    a thread for the length of a `with` block: `handle(handler, body)` answers each request,
    with `send`/`send_raw` and a `completion(text)` body. The fake GPT-4 teacher of
    test_generate_data and the fake judge of test_eval are both one of these."""

    def __init__(self, handle):
        import socket
        import sys
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()  # header and body go out as two writes: no Nagle delay between
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):
                pass

            def do_POST(self):
                handle(self, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                if not isinstance(sys.exc_info()[1], OSError):  # a client that hung up is no news
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def completion(text):
        return {"id": "chatcmpl-1", "object": "chat.completion", "model": "fake",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}

    @classmethod
    def send(cls, h, status, obj, headers=None):
        cls.send_raw(h, status, json.dumps(obj).encode(), "application/json", headers)

    @staticmethod
    def send_raw(h, status, data, ctype, headers=None):
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)


# ---- train.py on the real command line ----------------------------------------------------------

def batches(dataset, batch_size, num_workers=0, shuffle=False, seed=0):
    """A DataLoader over `dataset` with data.Collator, counting bad samples in this process as
    train.py's loop does; yields only batches with a good sample."""
    import torch
    import data
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers, collate_fn=data.Collator(dataset.tokenizer.pad_id))
    for batch in loader:
        for s in batch.pop("skipped"):
            dataset.record_skip(s)
        if batch["ids"]:
            yield batch


def run(args, nproc=1, timeout=240, check=True):
    cmd = [sys.executable, TRAIN] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", TRAIN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def losses(out):
    return [json.loads(l)["loss"] for l in open(Path(out) / "train_log.jsonl")]


def start_and_signal(args, log, sig, after_steps, nproc=1):
    """train.py (under torchrun if nproc > 1) in its own process group, sent `sig` as a
    terminal's Ctrl-C is sent: to the group (torchrun, every rank, the DataLoader workers too)
    once `after_steps` steps are logged."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, TRAIN] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", TRAIN]
    p = subprocess.Popen(cmd + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env, start_new_session=True)
    deadline = time.time() + 600  # a loaded machine (CI's two cores) can take minutes to the step
    while time.time() < deadline and p.poll() is None and not (log.exists() and log.read_text().count("\n") >= after_steps):
        time.sleep(0.02)
    os.killpg(p.pid, sig)
    text, _ = p.communicate(timeout=120)
    return p.returncode, text


def make_world(root):
    """A small synthetic world and random tiny bases under root: what train.py runs on in tests."""
    import tiny
    w = tiny.make_synthetic(root / "data", n_train=48, n_test=8, seed=0, image_size=64, vocab_size=400)
    clip_dir, llm_dir = tiny.make_tiny_bases(root, w["tokenizer"], seed=0)
    return {**w, "clip": clip_dir, "llm": llm_dir, "root": root}


def base_args(world, out, stage=2, **over):
    args = {"stage": stage, "clip": world["clip"], "llm": world["llm"],
            "data": world["stage1" if stage == 1 else "stage2"], "image-folder": world["image_folder"],
            "projector": "mlp2x_gelu", "image-size": 32, "pad-to-square": "false",
            "template": "plain" if stage == 1 else "vicuna_v1", "lr": 1e-3, "global-batch": 8,
            "micro-batch": 4, "max-steps": 3, "num-workers": 0, "max-length": 256, "out": out,
            "warmup-ratio": 0.0, "seed": 0, "dist-timeout": 60}
    args.update(over)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def trained(out, stage):
    from safetensors.torch import load_file
    state = load_file(str(Path(out) / "model.safetensors"))
    keep = ("multi_modal_projector.",) if stage == 1 else ("multi_modal_projector.", "language_model.")
    return {k: v for k, v in state.items() if k.startswith(keep)}


def assert_same_run(a, b, stage, atol=2e-5):
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) and all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6) for x, y in zip(la, lb)), (la, lb)
    pa, pb = trained(a, stage), trained(b, stage)
    assert pa.keys() == pb.keys()
    worst = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    assert worst < atol, worst


# ---- a tiny llava-hf checkpoint (test_model, test_chat, test_serve, test_lora) ---------------------

def make_tiny_llava(directory, seed=0, image_size=56, max_positions=1024, **text_overrides):
    """A random LlavaForConditionalGeneration (tiny CLIP 56px/14 -> 16 patches, Llama with 4 query
    heads over 2 kv heads) saved by transformers, with a LLaMA-style sentencepiece tokenizer
    (<image> = 512, <pad> = 513, vocabulary padded to 576 as llava-hf pads to 32064)."""
    import torch
    import transformers  # here, so that test collection stays cheap
    directory = Path(directory)
    make_sp_tokenizer(directory)  # 512 pieces
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=image_size, patch_size=14)
    text = transformers.LlamaConfig(**{
        "vocab_size": 576, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": max_positions,
        "initializer_range": 0.1, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 513,
        **text_overrides})
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=512,
                                      pad_token_id=513, projector_hidden_act="gelu",
                                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                                      image_seq_length=(image_size // 14) ** 2)
    transformers.LlavaForConditionalGeneration(config).eval().save_pretrained(directory)
    return directory


def photo(seed=0, size=(64, 48)):
    """A small deterministic RGB picture (not square, so pad-to-square matters)."""
    import torch
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


def prompt_ids(tok, model, question, image=True):
    """Token ids of a vicuna_v1 first turn with the <image> id expanded to one id per patch."""
    text = ("A chat between a curious user and an artificial intelligence assistant. "
            f"USER: {'<image>' + chr(10) if image else ''}{question} ASSISTANT:")
    ids = []
    for i in tok.encode(text):
        ids += [i] * model.config.num_patches if i == tok.image_token_id else [i]
    return ids
