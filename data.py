"""
Data: from LLaVA's published JSON to (input_ids, labels, pixel_values) batches.

A training sample is one conversation about at most one image, and the model learns the "gpt" turns:

    {"id": "...", "image": "coco/train2017/000123.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                       {"from": "gpt",   "value": "A bowl of fruit."}, ...]}

A template (`TEMPLATES`) renders it to one string, keeping the character spans of the replies;
`llama.Tokenizer.encode` tokenizes that once, with the official ids (`<image>` one id, `</s>` EOS,
each `<image>`-separated chunk its own sentencepiece call, BOS once); the image id becomes
`num_patches` ids, one per image feature; `max_length` cuts after that, never through the image.

The label rule, the official preprocess_v1's: every token after the assistant role's ":" through
the reply's `</s>` is a target, every other token is -100, so the space before a reply is learned
even when it is a lone "▁" (before a digit, an emoji, CJK, a newline). The labels are read off the
one tokenization: walking the tokens over the string gives each its byte span, and a token is a
target iff its span touches a reply. The official code re-tokenizes each round and instruction
alone and counts; sentencepiece tokenizes pieces unlike the whole, the counts drift, and the whole
sample is masked ("tokenization mismatch"). A walk that cannot spell the string is an error.

Bad records never end a run and are never dropped silently: whatever is wrong with one becomes a
`Skipped` (index, id, reason) that travels through DataLoader workers like a sample and is counted
in the main process (`dataset.record_skip`), where the count survives. Also here: ScienceQA records.
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

import clip
from weights import WeightsError, read_json

IGNORE_INDEX = -100   # label of a position the loss skips (torch's cross_entropy default)
IMAGE = "<image>"     # the placeholder for the image in a record's text
ROLES = ("human", "gpt")  # a record's turns' "from", in turn order


# ---- 1. Conversation templates ---------------------------------------------------------------

@dataclass(frozen=True)
class Template:
    """A sample renders as `first_user(q1) assistant reply(a1) user(q2) assistant reply(a2) ...`;
    a generation prompt is the same with the last reply left out. All of `reply` is learned."""
    system: str
    first_user: str      # the first question; may use {system} and {q}
    user: str            # every later question; {q}
    assistant: str       # opens the assistant's turn; a generation prompt ends here
    reply: str           # the assistant's reply; {a}
    stop: str            # generation stops at this string (or at EOS)
    plain: bool = False  # stage 1: one image, one caption, the instruction text dropped


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                  "that the user provides, and assist the user with a variety of tasks using natural language.")

TEMPLATES = {
    # Stage 1 (official conv_llava_plain, preprocess_plain): "<image>" + caption + "\n", all of it learned.
    "plain": Template(system="", first_user="{q}", user="{q}", assistant="", reply="{a}\n", stop="\n", plain=True),
    # Official conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>"):
    # "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
    "vicuna_v1": Template(system=VICUNA_SYSTEM, first_user="{system} USER: {q} ", user="USER: {q} ",
                          assistant="ASSISTANT:", reply=" {a}</s>", stop="</s>"),
    # Official conv_llava_llama_2 (its leading "<s>" is the BOS; preprocess_llama_2 learns " {a} </s>"):
    # "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q1} [/INST] {a1} </s><s>[INST] {q2} [/INST] {a2} </s>"
    "llava_llama_2": Template(system=LLAMA_2_SYSTEM, first_user="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q} [/INST]",
                              user="<s>[INST] {q} [/INST]", assistant="", reply=" {a} </s>", stop="</s>"),
}


def get_template(template):
    if not isinstance(template, Template) and template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES.get(template, template)


# ---- 2. Rendering a conversation to one string -----------------------------------------------

def _pairs(conversations, has_image, tpl):
    """LLaVA turns -> [(question, reply), ...], checked, the image placed as officially: a leading
    gpt turn dropped (ShareGPT-style data), "<image>\\n" put before the first question and the turn
    it was in stripped (preprocess_multimodal; it leaves one of a later question there)."""
    if not isinstance(conversations, list):
        raise BadSample("unreadable_record", f"'conversations' is a {type(conversations).__name__}, not a list")
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise BadSample("unreadable_record", f"turn {k} is not {{'from': human|gpt, 'value': text}}: {turn!r:.40}")
    turns = [(t["from"], t["value"]) for t in conversations]
    turns = turns[1:] if turns and turns[0][0] == "gpt" else turns
    if not turns or turns[-1][0] != "gpt":
        raise BadSample("no_reply", f"{len(turns)} turns, the last from {turns[-1][0] if turns else 'nobody'}")
    for k, (role, _) in enumerate(turns):
        if role != ROLES[k % 2]:
            raise BadSample("roles_not_alternating", f"turn {k} is from {role}")
    questions, replies = [v for _, v in turns[::2]], [v for _, v in turns[1::2]]
    n = sum(q.count(IMAGE) for q in questions)
    has_image = n > 0 if has_image is None else has_image
    if any(IMAGE in a for a in replies):
        raise BadSample("placeholder_in_reply", "<image> in a gpt turn")
    if has_image and n == 0:
        raise BadSample("image_without_placeholder", "the record has an image but no <image> in its text")
    if not has_image and n:
        raise BadSample("placeholder_without_image", "the text has <image> but the record has no image")
    if n > 1:
        raise BadSample("too_many_placeholders", f"{n} <image> placeholders for one image")
    if tpl.plain:
        if not has_image or len(questions) != 1:
            raise BadSample("not_plain_pair", f"{len(questions)} question/answer pairs, image: {has_image}")
        return [(IMAGE, replies[0])]  # official preprocess_plain: the instruction is dropped
    if has_image:
        questions = [q.replace(IMAGE, "").strip() if IMAGE in q else q for q in questions]
        questions[0] = (IMAGE + "\n" + questions[0]).strip()
    return list(zip(questions, replies))


def render_conversation(conversations, template, has_image=None):
    """LLaVA turns -> (the sample as one string, the [start, end) character spans it learns: each reply
    and what closes it). has_image None: the record has an image iff its text has <image>."""
    tpl = get_template(template)
    text, spans = "", []
    for k, (q, a) in enumerate(_pairs(conversations, has_image, tpl)):
        text += (tpl.first_user if k == 0 else tpl.user).format(system=tpl.system, q=q) + tpl.assistant
        reply = tpl.reply.format(a=a)
        spans.append((len(text), len(text) + len(reply)))
        text += reply
    return text, spans


def prompt_for_generation(turns, template, has_image=False):
    """The prompt for the next reply ("{system} USER: <image>\\nWhat is this? ASSISTANT:"): the sample with an empty
    last reply, cut where it starts. `turns` (LLaVA turns or strings, user first) end with the user's question;
    has_image puts the image first if no turn has it."""
    turns = [t if isinstance(t, dict) else {"from": ROLES[k % 2], "value": t} for k, t in enumerate(turns)]
    if not turns or turns[-1].get("from") != "human":
        raise ValueError("prompt_for_generation: the conversation must end with a user question")
    if has_image and not any(IMAGE in str(t.get("value")) for t in turns):
        turns = [{"from": "human", "value": IMAGE + "\n" + turns[0]["value"]}] + turns[1:]
    text, spans = render_conversation(turns + [{"from": "gpt", "value": ""}], template, has_image)
    return text[: spans[-1][0]]


# ---- 3. Tokenization with labels from one tokenization ---------------------------------------

def _encode(tokenizer, text):
    """`tokenizer.encode(text)`, and llava_llama_2's "</s><s>": HF makes that `<s>` BOS and tokenizes
    what follows as it does text after `</s>`, so we encode "</s>" + the rest and swap EOS for BOS."""
    first, *rest = text.split("<s>")
    ids = tokenizer.encode(first, bos=True)
    for part in rest:
        ids += [tokenizer.bos_id] + tokenizer.encode("</s>" + part, bos=False)[1:]
    return ids


def _labels(ids, text, spans, tokenizer):
    """The label of every token of `ids`, the one tokenization of `text`. A token stands for its bytes (`id_bytes`:
    "▁" a space, "<0x0A>" one byte), the image, EOS and BOS ids for their literal text, the first BOS and the "▁"
    sentencepiece puts before a chunk (the token after a special one) for nothing; no other skipping."""
    text = text.replace("\u2581", " ")  # sentencepiece reads a literal "▁" as a space: its pieces spell one
    data = text.encode("utf-8")
    learn = bytearray(len(data) + 1)  # 1 where a byte belongs to a supervised span
    for s, e in ((len(text[:s].encode("utf-8")), len(text[:e].encode("utf-8"))) for s, e in spans):
        learn[s:e] = b"\x01" * (e - s)
    literal = {tokenizer.image_token_id: IMAGE.encode(), tokenizer.eos_id: b"</s>", tokenizer.bos_id: b"<s>"}
    labels, pos = [IGNORE_INDEX], 0
    for k in range(1, len(ids)):
        start = pos
        for j, b in enumerate(literal.get(ids[k]) or tokenizer.id_bytes(ids[k])):
            if pos < len(data) and data[pos] == b:
                pos += 1
            elif not (j == 0 and b == ord(" ") and (k == 1 or ids[k - 1] in literal)):
                raise ValueError(f"token {k} (id {ids[k]}) does not spell the text at {data[pos:pos + 20]!r}")
        learned = any(learn[start:pos]) if pos > start else learn[pos]  # an empty span: the byte it precedes
        labels.append(ids[k] if learned else IGNORE_INDEX)
    if pos != len(data):
        raise ValueError(f"the tokens cover {pos} of {len(data)} bytes of the text")
    return labels


def expand_image(ids, labels, image_id, num_patches):
    """Each image id -> `num_patches` image ids (labels -100), one per image feature."""
    n = lambda t: max(num_patches, 1) if t == image_id else 1  # noqa: E731
    return ([t for t in ids for _ in range(n(t))],
            [IGNORE_INDEX if t == image_id else l for t, l in zip(ids, labels) for _ in range(n(t))])


def truncate(input_ids, labels, max_length, image_token_id):
    """Cut to max_length tokens; never through an image, never to nothing to learn (a bad sample)."""
    if max_length is not None and len(input_ids) > max_length:
        if image_token_id in input_ids[max_length:]:
            raise BadSample("image_too_long", f"{len(input_ids)} tokens, the image past max_length {max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(l == IGNORE_INDEX for l in labels):
        raise BadSample("nothing_to_learn", f"{len(input_ids)} tokens, max_length {max_length}")
    return input_ids, labels


def tokenize_conversation(conversations, tokenizer, template, num_patches=0, has_image=None, max_length=None):
    """LLaVA turns -> (input_ids, labels) by the rule above, the image id expanded to `num_patches`
    ids (0 or 1: one id), cut to max_length (if given). BadSample for anything untrainable."""
    text, spans = render_conversation(conversations, template, has_image)
    ids = _encode(tokenizer, text)
    ids, labels = expand_image(ids, _labels(ids, text, spans, tokenizer), tokenizer.image_token_id, num_patches)
    return truncate(ids, labels, max_length, tokenizer.image_token_id)


def tokenize_prompt(turns, tokenizer, template, has_image=False, num_patches=0):
    """The ids of prompt_for_generation (chat, eval), the image id expanded as in training."""
    ids = _encode(tokenizer, prompt_for_generation(turns, template, has_image))
    return expand_image(ids, ids, tokenizer.image_token_id, num_patches)[0]


# ---- 4. Bad samples; the dataset: LLaVA JSON, lazily; collation -----------------------------

# Every way a record can be unusable (a Skipped's reason); where it is raised, the message says the details.
REASONS = ("unreadable_record", "missing_image", "corrupt_image", "no_reply", "roles_not_alternating",
           "placeholder_without_image", "image_without_placeholder", "too_many_placeholders", "placeholder_in_reply",
           "not_plain_pair", "image_too_long", "nothing_to_learn", "returned_none", "error")


class DataError(ValueError):
    """A data file (not one record) that cannot be used: missing, not JSON, not a list."""


class BadSample(Exception):
    """A record we cannot train on, and why: `reason` (one of REASONS) and the message."""

    def __init__(self, reason, message):
        assert reason in REASONS, reason
        self.reason = reason
        super().__init__(message)


@dataclass
class Skipped:
    """A bad record, as __getitem__ returns it: carried through DataLoader workers to the main process, and counted."""
    index: int
    id: object
    reason: str
    message: str

    def __bool__(self):  # so `if sample:` treats it like the None it stands for
        return False

    def __str__(self):
        return f"skipped record {self.index} (id {self.id!r}): {self.reason}: {self.message}"


class SkipLog:
    """Per-reason tally of skipped records (distinct indices; `events` counts repeats over epochs),
    kept in the main process, and the records cut to max_length (trained on, but not whole)."""
    print_first = 10  # warnings per reason; the rest are only counted

    def __init__(self):
        self.indices, self.events, self.truncated = {}, 0, set()  # indices: reason -> record indices

    def add(self, skipped):
        seen = self.indices.setdefault(skipped.reason, set())
        self.events += 1
        if skipped.index not in seen and len(seen) < self.print_first:
            more = " (further ones of this kind are counted, not printed)" if len(seen) == self.print_first - 1 else ""
            print(f"warning: {skipped}{more}", file=sys.stderr)
        seen.add(skipped.index)

    def counts(self):
        return {reason: len(ix) for reason, ix in sorted(self.indices.items())}

    def summary(self, total):
        counts = self.counts()
        cut = f"; {len(self.truncated)} truncated to max_length" if self.truncated else ""
        if not counts:
            return f"data: no records skipped of {total}{cut}"
        parts = ", ".join(f"{reason} {k}" for reason, k in counts.items())
        return f"data: skipped {sum(counts.values())} of {total} records ({parts}){cut}"


def read_records(path):
    """A LLaVA JSON list, or JSONL (a record per line). Records stay raw and are checked when
    used, so a bad one costs one sample; a file that is not a JSON list is an error naming it."""
    path = Path(path)
    if path.suffix == ".jsonl" and path.is_file():
        records = []
        for line in filter(str.strip, path.read_text(encoding="utf-8").splitlines()):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                records.append(line)  # unreadable: a bad record when the item is used
        return records
    try:
        records = read_json(path, "data")
    except WeightsError as e:
        raise DataError(f"{e}; expected a list of LLaVA records") from None
    if not isinstance(records, list):
        raise DataError(f"{path} holds a JSON {type(records).__name__}; expected a list of LLaVA records")
    return records


class LazySupervisedDataset(torch.utils.data.Dataset):
    """LLaVA records -> {"input_ids", "labels", "pixel_values" (None for text-only), "index", "id",
    "length" (tokens before a cut), "truncated"}, or a `Skipped` for a bad record. `json_path` is a
    .json / .jsonl file or a list of records; images are `image_folder / record["image"]`."""

    def __init__(self, json_path, image_folder, tokenizer, template, image_size, num_patches,
                 pad_to_square=False, max_length=2048):
        self.records = list(json_path) if isinstance(json_path, (list, tuple)) else read_records(json_path)
        self.image_folder = Path(image_folder if image_folder is not None else ".")
        self.tokenizer, self.template, self.image_size = tokenizer, get_template(template), image_size
        self.num_patches, self.pad_to_square, self.max_length = num_patches, pad_to_square, max_length
        self.skips = SkipLog()

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        record = self.records[i]
        rid = record.get("id") if isinstance(record, dict) else None
        try:
            return self._sample(i, record)
        except BadSample as e:
            return Skipped(i, rid, e.reason, str(e))
        except Exception as e:  # whatever one record does, it costs that sample, never the run
            return Skipped(i, rid, "error", f"{type(e).__name__}: {e}")

    def _sample(self, i, record):
        image = record.get("image") if isinstance(record, dict) else None
        if not isinstance(record, dict) or "conversations" not in record or not isinstance(image, (str, type(None))):
            raise BadSample("unreadable_record", f"not {{'conversations': [...], 'image': path}}: {record!r:.40}")
        ids, labels = tokenize_conversation(record["conversations"], self.tokenizer, self.template,
                                            num_patches=self.num_patches, has_image=image is not None)
        length = len(ids)  # before any cut
        truncated = self.max_length is not None and length > self.max_length
        ids, labels = truncate(ids, labels, self.max_length, self.tokenizer.image_token_id)
        pixel_values = None
        if image is not None:  # after the text checks: a text-bad record costs no image decoding
            path = self.image_folder / image
            if not path.is_file():
                raise BadSample("missing_image", f"no file {path}")
            try:
                pixel_values = clip.preprocess(clip.load_image(path), self.image_size, self.pad_to_square)
            except clip.ImageError as e:
                raise BadSample("corrupt_image", str(e)) from None
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixel_values,
                "index": i, "id": record.get("id"), "length": length, "truncated": truncated}

    def record_skip(self, skipped):
        self.skips.add(skipped)


@dataclass
class Collator:
    """Samples -> {input_ids, labels: [B, T] right-padded with pad_id / -100 (a causal mask then needs
    no padding mask), pixel_values: [N, 3, S, S] of the N rows with an image, in order (or None),
    ids: per row, truncated: indices cut to max_length, skipped: the Skipped (or None) samples}."""
    pad_id: int

    def __call__(self, samples):
        skipped = [s if isinstance(s, Skipped) else Skipped(None, None, "returned_none", "the dataset returned None")
                   for s in samples if not s]
        good = [s for s in samples if s]
        pad = lambda key, value: (pad_sequence([s[key] for s in good], True, value) if good  # noqa: E731
                                  else torch.zeros(0, 0, dtype=torch.long))
        images = [s["pixel_values"] for s in good if s["pixel_values"] is not None]
        return {"input_ids": pad("input_ids", self.pad_id), "labels": pad("labels", IGNORE_INDEX),
                "pixel_values": torch.stack(images) if images else None, "ids": [s["id"] for s in good],
                "skipped": skipped, "truncated": [s["index"] for s in good if s.get("truncated")]}


# ---- 5. ScienceQA -> LLaVA records -----------------------------------------------------------

SQA_INPUTS = {"QCM": "Question: {q}\nContext: {c}\nOptions: {m}\n",
              "CQM": "Context: {c}\nQuestion: {q}\nOptions: {m}\n"}
SQA_OUTPUTS = {"LEA": "Answer: {l} {s} The answer is {a}.", "ALE": "Answer: The answer is {a}. BECAUSE: {l} {s}",
               "A": "Answer: The answer is {a}."}
SQA_LETTERS = "ABCDE"
SQA_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


def scienceqa_example(p, prompt_format="QCM-LEA"):
    """One ScienceQA problem `p` -> (human text, gpt text), string for string as the official
    convert_sqa_to_llava's create_one_example_chatbot, quirks included: one pass of "  " -> " ",
    strip, a trailing "BECAUSE:" dropped, the leading "Question: " / "Answer: " cut (so empty
    lecture and solution leave " The answer is A."). QCM-LEA is the paper's reasoning-first
    target, QCM-ALE answer-first, CQM-A the official zero-shot evaluation format."""
    in_fmt, out_fmt = prompt_format.split("-")
    # official: "\n" -> "\\n" and back, so a literal backslash-n in the text becomes a newline
    field = lambda key: (p.get(key) or "").replace("\n", "\\n").replace("\\n", "\n")  # noqa: E731
    choices = " ".join(f"({SQA_LETTERS[k]}) {c}" for k, c in enumerate(p["choices"]))
    text_in = SQA_INPUTS[in_fmt].format(q=p["question"], c=(p.get("hint") or "").strip() or "N/A", m=choices)
    text_out = SQA_OUTPUTS[out_fmt].format(l=field("lecture"), s=field("solution"), a=SQA_LETTERS[p["answer"]])
    texts = []
    for text, prefix in ((text_in, "Question: "), (text_out, "Answer: ")):
        text = text.replace("  ", " ").strip()
        if text.endswith("BECAUSE:"):
            text = text.replace("BECAUSE:", "").strip()
        texts.append(text.replace(prefix, "") if text.startswith(prefix) else text)
    return tuple(texts)


def scienceqa_to_llava(problems_json, pid_splits_json, split, image_root=None, answer_first=False, prompt_format=None):
    """ScienceQA release -> single-turn LLaVA records of `split`: reasoning-first (QCM-LEA), answer-first
    (QCM-ALE) or `prompt_format`. Images (images/{split}/{pid}/ beside problems.json) are given relative
    to `image_root` (default images/{split}: the official "{pid}/image.png"). Kept for evaluation:
    answer (letter), choices, subject, grade, has_text, has_image, no_context, categories."""
    problems, splits = read_json(problems_json, "ScienceQA problems"), read_json(pid_splits_json, "ScienceQA splits")
    if not isinstance(splits, dict) or split not in splits:
        raise DataError(f"{pid_splits_json} has no split {split!r}; it has {', '.join(map(repr, splits))}")
    images = Path(problems_json).parent / "images" / split
    root = Path(image_root) if image_root is not None else images
    records = []
    for pid in splits[split]:
        p = problems[pid]
        text_in, text_out = scienceqa_example(p, prompt_format or ("QCM-ALE" if answer_first else "QCM-LEA"))
        # the paper's table columns: subject, context (TXT a hint, IMG an image, NO neither), grade
        has_text, has_image = bool((p.get("hint") or "").strip()), p.get("image") is not None
        cats = [SQA_SUBJECTS.get(p.get("subject"), str(p.get("subject")))]
        cats += [c for c, on in (("TXT", has_text), ("IMG", has_image), ("NO", not has_text and not has_image)) if on]
        cats.append("G1-6" if int(str(p.get("grade", "grade0")).replace("grade", "") or 0) <= 6 else "G7-12")
        record = {"id": pid, "image": os.path.relpath(images / pid / p["image"], root)} if has_image else {"id": pid}
        record.update(conversations=[{"from": "human", "value": text_in + ("\n" + IMAGE if has_image else "")},
                                     {"from": "gpt", "value": text_out}], answer=SQA_LETTERS[p["answer"]],
                      choices=list(p["choices"]), subject=p.get("subject"), grade=p.get("grade"), has_text=has_text,
                      has_image=has_image, no_context="NO" in cats, categories=cats)
        records.append(record)
    return records
