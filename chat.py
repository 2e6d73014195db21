"""
Talk to LLaVA about a picture in the terminal.

    python chat.py photo.jpg                                   # llava-hf/llava-1.5-7b-hf, fetched once
    python chat.py photo.jpg --model runs/stage2 --prompt "What is unusual about this image?"

Without --prompt it is a REPL (the answer streams; follow-ups keep the conversation; /image,
/reset; readline editing in a terminal); with --prompt it answers once on stdout, for scripts.

How a conversation stays cheap: the first question is prefilled once with the image spliced in, and
the conversation keeps that KV cache (model.GenerationState): a follow-up feeds only its own tokens.
Its ids are what follows the `</s>` closing the previous reply in data.py's tokenization of the
whole conversation; `</s>` is a boundary of the tokenizer's chunks, so they are exactly the ids a
fresh tokenization gives there, while the cache keeps the ids the model wrote, not a re-tokenization.
"""

import argparse
import sys
import time

import torch

import data
from clip import ImageError, load_image, preprocess
from llama import Tokenizer
from lora import load_adapter, merge_lora
from model import DTYPES, NONNEG, POSITIVE, LLaVA, ContextLengthError, GenerationState, checked, device_name, dtype_for
from weights import WeightsError, fetch


class Chat:
    """One conversation about (at most) one image: the turns so far as text, and the model's KV
    cache of exactly those turns. `ask` streams the reply text piece by piece."""

    def __init__(self, model, tokenizer, template=None, max_new_tokens=512, temperature=0.2, top_p=1.0,
                 seed=None):
        self.model, self.tok = model, tokenizer
        self.template = template or model.config.template
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        self.generator = torch.Generator(device=model.llm.embed_tokens.weight.device)
        self.generator.seed() if seed is None else self.generator.manual_seed(seed)
        self.pixel_values = None
        self.reset()

    def reset(self):
        self.turns = []  # question, reply, question, reply, ... (text)
        self.state = GenerationState()

    def set_image(self, image):
        """A PIL image (or None for a text-only chat); starts a new conversation. The one
        preprocessing used everywhere: clip.preprocess with the checkpoint's size and padding."""
        cfg, device = self.model.config, self.model.llm.embed_tokens.weight.device
        self.pixel_values = None
        if image is not None:
            self.pixel_values = preprocess(image, cfg.vision.image_size, cfg.pad_to_square)[None].to(device)
        self.reset()

    def next_ids(self, question):
        """The ids to feed for this question: the whole prompt on the first turn, else what comes
        after the `</s>` closing the last reply (plus that `</s>` if the reply never wrote it)."""
        full = data.tokenize_prompt(self.turns + [question], self.tok, self.template,
                                    has_image=self.pixel_values is not None,
                                    num_patches=self.model.config.num_patches)
        if self.state.cache is None:
            return full
        eos = self.tok.eos_id
        if eos not in full:
            raise ValueError(f"template {self.template!r} has no multi-turn form: /reset to ask anew")
        after = full[len(full) - full[::-1].index(eos):]
        return after if self.state.tokens[-1] == eos else [eos] + after

    def ask(self, question):
        """Yield the reply as text pieces while it is generated (never half a character)."""
        ids = self.next_ids(question)
        first = self.state.cache is None
        before, reply = len(self.state.tokens), []

        def new_tokens():
            for t in self.model.generate(torch.tensor(ids), self.pixel_values if first else None,
                                         eos_id=self.tok.eos_id, state=self.state, generator=self.generator,
                                         **self.sampling):
                if t == self.tok.eos_id:
                    return
                reply.append(t)
                yield t
        try:
            yield from self.tok.decode_stream(new_tokens())
        finally:  # also when stopped halfway (Ctrl-C): the text history follows the cache
            if len(self.state.tokens) > before:
                self.turns += [question, self.tok.decode(reply).strip()]


def load(name, device, dtype, lora=None):
    """--model (a llava-hf dir or Hub name, fetched once), --lora (an adapter, merged) -> (model, tokenizer)."""
    try:
        path = fetch(name)
    except WeightsError as e:
        raise WeightsError(f"--model {name}: {e}") from None
    model = LLaVA.from_pretrained(path, dtype=dtype, device=device).eval()
    if lora:  # folded into the weights: the model then runs as fast as the base
        merge_lora(load_adapter(model, lora))
    tok = Tokenizer(getattr(model, "tokenizer_dir", path))
    if tok.image_token_id != model.config.image_token_id:
        raise WeightsError(f"{path}: the tokenizer's <image> id {tok.image_token_id} is not the model's "
                           f"image_token_index {model.config.image_token_id}")
    return model, tok


def repl(chat):
    if sys.stdin.isatty():
        import readline  # noqa: F401  (input() gets line editing and history)
    print("commands: /image PATH (another picture, new conversation), /reset, "
          "empty line, Ctrl-D or Ctrl-C to quit, Ctrl-C during an answer stops it", file=sys.stderr)
    while True:
        try:
            line = input("USER: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            return 0
        if line == "/reset":
            chat.reset()
            print("(new conversation)")
            continue
        if line.split()[0] == "/image":
            if line == "/image":
                print("usage: /image PATH (a picture file; the conversation starts over about it)")
                continue
            try:
                chat.set_image(load_image(line[len("/image"):].strip()))
                print("(new image, new conversation)")
            except ImageError as e:
                print(f"error: {e}")
            continue
        print("ASSISTANT: ", end="", flush=True)
        try:
            for piece in chat.ask(line):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        except (ContextLengthError, ValueError, data.BadSample) as e:
            print(f"\nerror: {e}. /reset starts a new conversation.", end="")
        print()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with LLaVA about an image.")
    p.add_argument("image", nargs="?", help="the picture to talk about (leave out for a text-only chat)")
    p.add_argument("--model", default="llava-hf/llava-1.5-7b-hf",
                   help="a llava-hf directory or Hub name (default: llava-hf/llava-1.5-7b-hf, fetched once, ~14 GB)")
    p.add_argument("--lora", help="a LoRA adapter directory (train.py's or PEFT's) to apply to --model")
    p.add_argument("--prompt", help="answer this one question, print the answer and exit")
    p.add_argument("--device", type=device_name, default="", help="cpu, cuda, ... (default: cuda if there is one)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--temperature", type=NONNEG, default=0.2, help="0 = greedy (default 0.2, as the official cli)")
    p.add_argument("--top-p", type=checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]"), default=1.0,
                   help="nucleus sampling mass (default 1: off)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=512, help="longest answer in tokens (default 512)")
    p.add_argument("--seed", type=int, help="seed of the sampler (default: random)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # a terminal that cannot show a character gets "?"
        sys.stdout.reconfigure(errors="replace")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype_for(device, args.dtype)
    try:
        image = load_image(args.image) if args.image else None  # before a 14 GB load, not after
        t0 = time.perf_counter()
        print(f"loading {args.model} on {device} ({dtype})...", file=sys.stderr)
        model, tok = load(args.model, device, dtype, args.lora)
        print(f"loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if args.compile and device.type == "cuda":
            model.compile_decode()  # the first answer pays for the compilation
        elif args.compile:
            print("note: --compile is for CUDA (a CUDA graph of the decode step); running eager on CPU",
                  file=sys.stderr)
        chat = Chat(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed)
        chat.set_image(image)
        if args.prompt is None:
            return repl(chat)
        for piece in chat.ask(args.prompt):
            print(piece, end="", flush=True)
        print()
        return 0
    except (ImageError, WeightsError, ContextLengthError, data.BadSample) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while loading, or during a --prompt answer
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
