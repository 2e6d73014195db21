"""
Data: from LLaVA's published JSON to (input_ids, labels, pixel_values) batches.

A training sample is one conversation about (at most) one image:

    {"id": "...", "image": "coco/train2017/000123.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                       {"from": "gpt",   "value": "A bowl of fruit."}, ...]}

and the model learns to write the "gpt" turns. This file turns such records into token ids and
labels, in five steps that each live in one place:

1. Templates (one table, `TEMPLATES`): how a conversation becomes one prompt string. `plain` is
   stage 1 (`<image>` + caption + "\\n"), `vicuna_v1` is stage 2 and evaluation of v1/v1.5
   ("... USER: q ASSISTANT: a</s>USER: ..."), `llava_llama_2` is the official LLaMA-2-chat one.
   Training strings and generation prompts (`prompt_for_generation`) come from the same rows.

2. One tokenization per sample. The whole sample is rendered to ONE string, and we remember the
   character spans of what the model must learn (each reply and its `</s>`). That string is
   tokenized once with `llama.Tokenizer.encode` (whose per-chunk rules reproduce the official
   ids: `<image>` -> one image id, `</s>` -> EOS, every `<image>`-separated chunk its own
   sentencepiece call, BOS once). Labels are then read off that one token list: we walk the
   tokens over the string (`_token_spans`: each token's bytes are known, special tokens stand
   for their literal text, the one "▁" a tokenizer puts in front of a chunk stands for nothing)
   which gives every token its byte span, and a token is supervised iff its span touches a
   reply span. The walk must consume the string exactly, or we stop with an error: the labels
   provably belong to the very ids the model sees.
   Why not the official way? The official code tokenizes the whole conversation, then
   re-tokenizes each round and each instruction separately and counts tokens to decide where
   to mask. Sentencepiece does not tokenize pieces the same way as the whole (a space, a `</s>`
   or a merge at a boundary shifts the count by one), so the counts drift; the official code
   then notices "tokenization mismatch" and silently masks the whole sample. Reading labels off
   the single tokenization cannot drift.
   Finally the single image id is expanded into `num_patches` copies (labels -100), one per
   image feature, which is what model.LLaVA.embed expects.

3. Truncation to `max_length` happens after that expansion and never cuts through an image: a
   sample whose image does not fit is bad, and so is a sample with no supervised token left.

4. Bad samples never crash a run and are never dropped silently. Whatever is wrong with a record
   (unreadable, missing or corrupt image, no reply, roles out of order, `<image>` without an
   image or the reverse, too long, nothing to learn, any error it raises) becomes a `Skipped` marker naming the
   record index, its id and the reason. Markers travel through DataLoader workers like samples;
   the collate function sets them aside and the training loop, in the main process, counts them
   (`dataset.record_skip`) per reason, prints a warning line for each (the first few per reason) and
   `dataset.summary()` gives the tally at the end of a run. Counting in the main process is the
   point: a counter inside the dataset would be counted in worker copies and lost.

5. Collation right-pads input_ids with the pad id and labels with -100 (right padding plus a
   causal mask needs no attention mask), stacks the images of the rows that have one and says
   which rows those are; text-only rows simply hold no image ids.

Also here: the ScienceQA conversion (`scienceqa_to_llava`), which produces records in the same
LLaVA format. (The tiny preset's synthetic world is tiny.py's.)
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import clip
from weights import read_json

IGNORE_INDEX = -100   # label of a position the loss skips (torch's cross_entropy default)
IMAGE = "<image>"     # the placeholder for the image in a record's text


# ---------------------------------------------------------------------------------------------
# 1. Conversation templates
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Template:
    """How a conversation becomes one string. A sample renders as

        first_user(q1) assistant reply(a1)  user(q2) assistant reply(a2)  ...

    and a generation prompt is the same with the last reply left out (it ends with `assistant`).
    Supervision covers all of `reply`: as in the official preprocess_v1, a reply is learned from
    right after its role's `:` (or `[/INST]`) through its `</s>`, so the space in front of it is
    a target too, also when it is a token of its own (a lone "▁" before a digit, an emoji, CJK,
    a newline or a second space)."""
    name: str
    system: str
    first_user: str      # the first question; may use {system} and {q}
    user: str            # every later question; {q}
    assistant: str       # opens the assistant's turn; a generation prompt ends here
    reply: str           # the assistant's reply; {a}
    stop: str            # generation stops at this string (or at EOS)
    plain: bool = False  # stage 1: one image, one caption, the instruction text dropped


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the "
                  "visual content that the user provides, and assist the user with a variety of "
                  "tasks using natural language.")

TEMPLATES = {
    # Stage 1 (official conv_llava_plain + preprocess_plain): "<image>" + caption + "\n", no system,
    # no instruction; the whole caption and its "\n" are learned.
    "plain": Template("plain", system="", first_user="{q}", user="{q}", assistant="",
                      reply="{a}\n", stop="\n", plain=True),
    # Official conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>"):
    # "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
    "vicuna_v1": Template("vicuna_v1", system=VICUNA_SYSTEM, first_user="{system} USER: {q} ",
                          user="USER: {q} ", assistant="ASSISTANT:", reply=" {a}</s>", stop="</s>"),
    # Official conv_llava_llama_2 (SeparatorStyle.LLAMA_2, sep "<s>", sep2 "</s>"; the leading
    # "<s>" is stripped because the tokenizer adds BOS):
    # "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q1} [/INST] {a1} </s><s>[INST] {q2} [/INST] {a2} </s>"
    # The official label rule (preprocess_llama_2) learns " {a} " and the "</s>" after it.
    "llava_llama_2": Template("llava_llama_2", system=LLAMA_2_SYSTEM,
                              first_user="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q} [/INST]",
                              user="<s>[INST] {q} [/INST]", assistant="", reply=" {a} </s>",
                              stop="</s>"),
}


def get_template(template):
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


# ---------------------------------------------------------------------------------------------
# 2. Bad samples
# ---------------------------------------------------------------------------------------------

# Every way a record can be unusable, with the line a user reads in the warning.
REASONS = {
    "unreadable_record": "not a JSON object with a 'conversations' list of {'from', 'value'} turns",
    "missing_image": "the image file does not exist",
    "corrupt_image": "the image file cannot be decoded",
    "no_reply": "the conversation does not end with a gpt reply",
    "roles_not_alternating": "turns must alternate human, gpt, human, gpt, ...",
    "placeholder_without_image": "the text has <image> but the record has no image",
    "image_without_placeholder": "the record has an image but no <image> in its text",
    "too_many_placeholders": "more than one <image> for one image",
    "placeholder_in_reply": "<image> in a gpt turn",
    "not_plain_pair": "the plain (stage 1) template takes one image, one human turn and one caption",
    "image_too_long": "the image does not fit in max_length tokens",
    "nothing_to_learn": "no supervised token left after truncation",
    "returned_none": "the dataset returned None for this item",
    "error": "reading the record raised an error nanollava did not expect (please report it)",
}


class DataError(ValueError):
    """A data file (not one record) that cannot be used: missing, not JSON, not a list."""


class BadSample(Exception):
    """A record we cannot train on. `reason` is a key of REASONS; the message says the details."""

    def __init__(self, reason, message=""):
        assert reason in REASONS, reason
        self.reason = reason
        super().__init__(message or REASONS[reason])


# ---------------------------------------------------------------------------------------------
# 3. Rendering a conversation to one string
# ---------------------------------------------------------------------------------------------

ROLES = ("human", "gpt")  # the LLaVA record's "from" values, in turn order


def _pairs(conversations):
    """LLaVA turns -> [(question, reply), ...], checked. A leading gpt turn is dropped, as the
    official preprocess does (ShareGPT-style data sometimes starts with the assistant)."""
    if not isinstance(conversations, list):
        raise BadSample("unreadable_record", f"'conversations' is a {type(conversations).__name__}, not a list")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise BadSample("unreadable_record", f"turn {k} is not {{'from': 'human'|'gpt', 'value': str}}: {str(turn)[:80]}")
        turns.append((turn["from"], turn["value"]))
    if turns and turns[0][0] == "gpt":
        turns = turns[1:]
    if not turns or turns[-1][0] != "gpt":
        raise BadSample("no_reply", f"{len(turns)} turns, the last from {turns[-1][0] if turns else 'nobody'}")
    for k, (role, _) in enumerate(turns):
        if role != ROLES[k % 2]:
            raise BadSample("roles_not_alternating", f"turn {k} is from {role}")
    return [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns), 2)]


def _place_image(pairs, has_image, tpl):
    """Check the `<image>` placeholders against the record and move the image to the front of the
    first question, as the official preprocess_multimodal does: the placeholder is cut out of its
    turn, the turn stripped, and "<image>\\n" put in front ("<image>" alone for an empty turn).
    (Official code leaves a placeholder found in a later question in that question; we move it
    to the first, which is where all published LLaVA data has it.)"""
    n_q = sum(q.count(IMAGE) for q, _ in pairs)
    n_a = sum(a.count(IMAGE) for _, a in pairs if a)
    if has_image is None:
        has_image = n_q + n_a > 0
    if n_a:
        raise BadSample("placeholder_in_reply")
    if has_image and n_q == 0:
        raise BadSample("image_without_placeholder")
    if not has_image and n_q:
        raise BadSample("placeholder_without_image")
    if n_q > 1:
        raise BadSample("too_many_placeholders", f"{n_q} <image> placeholders for one image")
    if tpl.plain:
        if not has_image or len(pairs) != 1:
            raise BadSample("not_plain_pair", f"{len(pairs)} question/answer pairs, image: {has_image}")
        return [(IMAGE, pairs[0][1])]  # official preprocess_plain: the instruction is dropped
    if not has_image:
        return list(pairs)
    questions = [q.replace(IMAGE, "").strip() if IMAGE in q else q for q, _ in pairs]
    questions[0] = (IMAGE + "\n" + questions[0]).strip()
    return [(q, a) for q, (_, a) in zip(questions, pairs)]


def _render(pairs, tpl):
    """[(question, reply)] -> (text, spans of the supervised text). A reply of None ends the text
    where that reply would begin: a generation prompt."""
    text, spans = "", []
    lead, close = tpl.reply.split("{a}")
    for k, (q, a) in enumerate(pairs):
        text += (tpl.first_user if k == 0 else tpl.user).format(system=tpl.system, q=q)
        text += tpl.assistant
        if a is None:
            break
        spans.append((len(text), len(text) + len(lead) + len(a) + len(close)))
        text += lead + a + close
    return text, spans


def render_conversation(conversations, template, has_image=None):
    """LLaVA turns -> (text, spans): the whole sample as one string, and the [start, end)
    character spans of the text the model learns (each reply and what closes it, e.g. `</s>`).
    has_image None means "the record has an image iff its text has <image>"."""
    tpl = get_template(template)
    return _render(_place_image(_pairs(conversations), has_image, tpl), tpl)


def prompt_for_generation(turns, template, has_image=False):
    """The prompt that asks the model for its next reply, e.g. for vicuna_v1
    "{system} USER: <image>\\nWhat is this? ASSISTANT:". `turns` is the conversation so far,
    ending with the user's question: either LLaVA record turns ({"from", "value"}) or plain
    strings alternating user, assistant, ..., user. With has_image the image goes in front of
    the first question (if the text has no <image> yet)."""
    tpl = get_template(template)
    turns = [t if isinstance(t, dict) else {"from": ROLES[k % 2], "value": t} for k, t in enumerate(turns)]
    if not turns or turns[-1].get("from") != "human":
        raise ValueError("prompt_for_generation: the conversation must end with a user question")
    if has_image and not any(IMAGE in str(t.get("value")) for t in turns):
        turns = [{"from": "human", "value": IMAGE + "\n" + turns[0]["value"]}] + turns[1:]
    pairs = _place_image(_pairs(turns + [{"from": "gpt", "value": ""}]), has_image, tpl)
    return _render(pairs[:-1] + [(pairs[-1][0], None)], tpl)[0]


# ---------------------------------------------------------------------------------------------
# 4. Tokenization with labels from one tokenization
# ---------------------------------------------------------------------------------------------

def _encode(tokenizer, text):
    """`tokenizer.encode(text)` (BOS first), plus one thing it does not do: llava_llama_2 joins
    rounds with "</s><s>", and HF maps that `<s>` to BOS with the text after it tokenized
    without a leading "▁", exactly like text after `</s>`. We get that from the tokenizer's own
    rule by encoding "</s>" + the rest and replacing that EOS with BOS."""
    first, *rest = text.split("<s>")
    ids = tokenizer.encode(first, bos=True)
    for part in rest:
        after = tokenizer.encode("</s>" + part, bos=False)
        assert after[0] == tokenizer.eos_id
        ids += [tokenizer.bos_id] + after[1:]
    return ids


def _token_spans(ids, data, tokenizer):
    """The [start, end) byte span in `data` (the UTF-8 text) of every token in `ids`.

    Walks the tokens over the text: an ordinary token stands for its bytes (`id_bytes`: "▁" is a
    space, "<0x0A>" one byte), the image/EOS/BOS ids for their literal text. Between special
    tokens, the run of ordinary tokens must spell out the text up to the next special's literal,
    except that it may start with one extra space: the "▁" sentencepiece puts in front of a
    chunk, which is not in the text (its token gets the part of its span that is). The first id
    is the BOS encode() added: no text. Anything else is an error, never a guess."""
    literal = {tokenizer.image_token_id: IMAGE.encode(), tokenizer.eos_id: b"</s>", tokenizer.bos_id: b"<s>"}
    spans, pos, i = [(0, 0)], 0, 1
    while i < len(ids):
        if ids[i] in literal:
            lit = literal[ids[i]]
            if not data.startswith(lit, pos):
                raise ValueError(f"token {i} is {lit.decode()} but the text at byte {pos} is {data[pos:pos + 20]!r}")
            spans.append((pos, pos + len(lit)))
            pos, i = pos + len(lit), i + 1
            continue
        j = i
        while j < len(ids) and ids[j] not in literal:
            j += 1
        pieces = [tokenizer.id_bytes(t) for t in ids[i:j]]
        run = b"".join(pieces)
        nxt = literal[ids[j]] if j < len(ids) else None

        def spells(n):  # do the last n bytes of the run spell the text from pos to the next special?
            end = pos + n
            return data[pos:end] == run[len(run) - n:] and (data.startswith(nxt, end) if nxt else end == len(data))

        if spells(len(run)):
            start = pos
        elif run.startswith(b" ") and spells(len(run) - 1):
            start = pos - 1  # the chunk's leading "▁" is not in the text
        else:
            raise ValueError(f"tokens {i}..{j} spell {run[:40]!r}... but the text at byte {pos} is "
                             f"{data[pos:pos + 40]!r}: the tokenizer produced <unk> or changed its rules")
        for p in pieces:
            spans.append((max(start, pos), max(start + len(p), pos)))
            start += len(p)
        pos, i = start, j
    if pos != len(data):
        raise ValueError(f"the tokens cover {pos} of {len(data)} bytes of the text")
    return spans


def expand_image(input_ids, labels, image_token_id, num_patches):
    """Replace each image id by `num_patches` image ids (labels -100): one per image feature."""
    if num_patches <= 1:
        return list(input_ids), list(labels)
    ids, lab = [], []
    for t, l in zip(input_ids, labels):
        n = num_patches if t == image_token_id else 1
        ids += [t] * n
        lab += [IGNORE_INDEX] * n if t == image_token_id else [l]
    return ids, lab


def truncate(input_ids, labels, max_length, image_token_id):
    """Cut to max_length tokens, never through an image, never to nothing to learn (either way
    the sample is bad)."""
    if max_length is not None and len(input_ids) > max_length:
        last_image = max((k for k, t in enumerate(input_ids) if t == image_token_id), default=-1)
        if last_image >= max_length:
            raise BadSample("image_too_long", f"{len(input_ids)} tokens, the image ends at token {last_image + 1} "
                                              f"> max_length {max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(l == IGNORE_INDEX for l in labels):
        raise BadSample("nothing_to_learn", f"{len(input_ids)} tokens, max_length {max_length}")
    return input_ids, labels


def tokenize_conversation(conversations, tokenizer, template, num_patches=0, has_image=None, max_length=None):
    """LLaVA turns -> (input_ids, labels), lists of ints of equal length.

    labels are -100 except on the assistant replies, the space before each included, and their
    `</s>` (plain: the caption and its "\\n"). With an image, its one `<image>` id becomes `num_patches` ids (0 or 1: one id).
    Truncated to max_length (if given). Raises BadSample for anything untrainable."""
    text, spans = render_conversation(conversations, template, has_image)
    ids = _encode(tokenizer, text)
    text = text.replace("\u2581", " ")  # sentencepiece reads a literal "▁" as a space: its pieces spell one
    data = text.encode("utf-8")
    learn = bytearray(len(data) + 1)  # learn[b] = 1 where byte b belongs to a supervised span
    for s, e in spans:
        bs, be = len(text[:s].encode("utf-8")), len(text[:e].encode("utf-8"))
        learn[bs:be] = b"\x01" * (be - bs)
    labels = []
    for t, (s, e) in zip(ids, _token_spans(ids, data, tokenizer)):
        supervised = any(learn[s:e]) if e > s else learn[s]  # an empty span: the byte it precedes
        labels.append(t if supervised else IGNORE_INDEX)
    labels[0] = IGNORE_INDEX  # BOS is never a target
    ids, labels = expand_image(ids, labels, tokenizer.image_token_id, num_patches)
    return truncate(ids, labels, max_length, tokenizer.image_token_id)


def tokenize_prompt(turns, tokenizer, template, has_image=False, num_patches=0):
    """Generation prompt ids (chat/eval): prompt_for_generation, tokenized the same way, with the
    image id expanded to num_patches copies."""
    ids = _encode(tokenizer, prompt_for_generation(turns, template, has_image))
    return expand_image(ids, [IGNORE_INDEX] * len(ids), tokenizer.image_token_id, num_patches)[0]


# ---------------------------------------------------------------------------------------------
# 5. The dataset: LLaVA JSON, lazily
# ---------------------------------------------------------------------------------------------

@dataclass
class Skipped:
    """What __getitem__ returns for a bad record (instead of None): it carries the record's index,
    id and reason through DataLoader workers to the main process, where it is counted."""
    index: int
    id: object
    reason: str
    message: str

    def __bool__(self):  # so `if sample:` treats it like the None it stands for
        return False

    def __str__(self):
        return f"skipped record {self.index} (id {self.id!r}): {self.reason}: {self.message}"


class SkipLog:
    """Per-reason tally of skipped records (distinct indices), kept in the main process, and the
    records cut to max_length (trained on, but not whole)."""

    def __init__(self, print_first=10):
        self.print_first = print_first
        self.indices = {}  # reason -> set of record indices
        self.events = 0    # skips counted, with repeats over epochs
        self.truncated = set()  # record indices

    def add(self, skipped):
        seen = self.indices.setdefault(skipped.reason, set())
        self.events += 1
        if skipped.index in seen:
            return
        seen.add(skipped.index)
        if len(seen) <= self.print_first:
            more = " (further ones of this kind are counted, not printed)" if len(seen) == self.print_first else ""
            print(f"warning: {skipped}{more}", file=sys.stderr)

    def counts(self):
        return {reason: len(ix) for reason, ix in sorted(self.indices.items())}

    def summary(self, total=None):
        counts = self.counts()
        n = sum(counts.values())
        of = f" of {total}" if total is not None else ""
        cut = f"; {len(self.truncated)} truncated to max_length" if self.truncated else ""
        if not n:
            return f"data: no records skipped{of}{cut}"
        parts = ", ".join(f"{reason} {k}" for reason, k in counts.items())
        return f"data: skipped {n}{of} records ({parts}){cut}"


def read_records(path):
    """A LLaVA JSON list (or JSONL, a record per line). Records stay raw: each is checked when
    it is used, so one bad record costs one sample, not the run. A file that is not JSON at all
    is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for line in text.splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    records.append(line)  # unreadable: reported when the item is used
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); expected a list of LLaVA records") from None
    if not isinstance(records, list):
        raise DataError(f"{path} holds a JSON {type(records).__name__}; expected a list of LLaVA records")
    return records


def _text_length(record):
    """Cheap length estimate of a record: words in its turns (official `lengths`)."""
    try:
        return sum(len(t["value"].split()) for t in record["conversations"])
    except (TypeError, KeyError, AttributeError):
        return 0


class LazySupervisedDataset(torch.utils.data.Dataset):
    """LLaVA records -> {"input_ids", "labels", "pixel_values" (None for text-only), "index", "id"},
    or a `Skipped` marker for a bad record. `json_path` is a .json list / .jsonl file or a list of
    records already in memory; images are `image_folder / record["image"]`."""

    def __init__(self, json_path, image_folder, tokenizer, template, image_size, num_patches,
                 pad_to_square=False, max_length=2048):
        self.records = list(json_path) if isinstance(json_path, (list, tuple)) else read_records(json_path)
        self.source = "records" if isinstance(json_path, (list, tuple)) else str(json_path)
        self.image_folder = Path(image_folder) if image_folder is not None else Path(".")
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.image_size = image_size
        self.num_patches = num_patches
        self.pad_to_square = pad_to_square
        self.max_length = max_length
        self.skips = SkipLog()

    def __len__(self):
        return len(self.records)

    @property
    def lengths(self):
        """Per record: words + 128 if it has an image (official estimate, for length grouping)."""
        return [_text_length(r) + (128 if isinstance(r, dict) and "image" in r else 0) for r in self.records]

    @property
    def modality_lengths(self):
        """Per record: words, negative for text-only records (official modality grouping)."""
        return [_text_length(r) * (1 if isinstance(r, dict) and "image" in r else -1) for r in self.records]

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
        if not isinstance(record, dict) or "conversations" not in record:
            what = "has no 'conversations'" if isinstance(record, dict) else f"is a {type(record).__name__}"
            raise BadSample("unreadable_record", f"the record {what}")
        image = record.get("image")
        if image is not None and not isinstance(image, str):
            raise BadSample("unreadable_record", f"'image' is a {type(image).__name__}, not a path")
        ids, labels = tokenize_conversation(record["conversations"], self.tokenizer, self.template,
                                            num_patches=self.num_patches, has_image=image is not None)
        truncated = self.max_length is not None and len(ids) > self.max_length
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
        return {"input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long),
                "pixel_values": pixel_values, "index": i, "id": record.get("id"), "truncated": truncated}

    def record_skip(self, skipped):
        self.skips.add(skipped)

    def summary(self):
        return self.skips.summary(total=len(self))


# ---------------------------------------------------------------------------------------------
# 6. Collation
# ---------------------------------------------------------------------------------------------

@dataclass
class Collator:
    """Samples -> one batch. Bad samples (Skipped or None) are set aside in batch["skipped"].

    input_ids  [B, T]  right-padded with pad_id
    labels     [B, T]  right-padded with -100
    pixel_values [N, 3, S, S] the images of the N rows that have one, in row order (or None)
    ids                the records' ids, per row
    skipped, truncated the bad samples (Skipped) and the indices of the rows cut to max_length
    """
    pad_id: int

    def __call__(self, samples):
        skipped = [s if isinstance(s, Skipped) else Skipped(None, None, "returned_none", REASONS["returned_none"])
                   for s in samples if s is None or isinstance(s, Skipped)]
        good = [s for s in samples if s is not None and not isinstance(s, Skipped)]
        T = max((len(s["input_ids"]) for s in good), default=0)
        input_ids = torch.full((len(good), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(good), T), IGNORE_INDEX, dtype=torch.long)
        for r, s in enumerate(good):
            input_ids[r, : len(s["input_ids"])] = s["input_ids"]
            labels[r, : len(s["labels"])] = s["labels"]
        images = [s["pixel_values"] for s in good if s["pixel_values"] is not None]
        pixel_values = torch.stack(images) if images else None
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values, "ids": [s["id"] for s in good],
                "skipped": skipped, "truncated": [s["index"] for s in good if s.get("truncated")]}


# ---------------------------------------------------------------------------------------------
# 7. ScienceQA -> LLaVA records
# ---------------------------------------------------------------------------------------------
# The official conversion (scripts/convert_sqa_to_llava.py + convert_sqa_to_llava_base_prompt.py,
# create_one_example_chatbot), reproduced string for string, quirks included:
#   input  "Question: {q}\nContext: {hint or N/A}\nOptions: (A) x (B) y\n"
#   output QCM-LEA (the paper's reasoning-first, 90.92%): "Answer: {lecture} {solution} The answer is X."
#          QCM-ALE (answer-first, the paper's ablation):   "Answer: The answer is X. BECAUSE: {lecture} {solution}"
#   each then has "  " replaced by " " once (one pass) and is stripped; a trailing "BECAUSE:" is
#   dropped; then every "Question: " (input) / "Answer: " (output) is removed, so the human turn
#   starts with the question itself. With empty lecture and solution, LEA's three spaces become
#   two and the target keeps one leading space (" The answer is A."), as in the official files.
#   With an image the human turn ends "\n<image>" (moved to the front at tokenization).
# DESIGN.md's "Context / Question / Options" order is the CQM input format of the official
# zero-shot evaluation file (llava_test_CQM-A.json); it is here as prompt_format="CQM-A".

SQA_INPUTS = {"QCM": "Question: {q}\nContext: {c}\nOptions: {m}\n", "CQM": "Context: {c}\nQuestion: {q}\nOptions: {m}\n"}
SQA_OUTPUTS = {"LEA": "Answer: {l} {s} The answer is {a}.", "ALE": "Answer: The answer is {a}. BECAUSE: {l} {s}",
               "A": "Answer: The answer is {a}."}
SQA_LETTERS = "ABCDE"
SQA_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


def scienceqa_example(problem, prompt_format="QCM-LEA"):
    """One ScienceQA problem -> (human text, gpt text) in the official chatbot format."""
    in_fmt, out_fmt = prompt_format.split("-")
    choices = " ".join(f"({SQA_LETTERS[k]}) {c}" for k, c in enumerate(problem["choices"]))
    context = (problem.get("hint") or "").strip() or "N/A"
    # official: "\n" -> "\\n" and back, so a literal backslash-n in the text becomes a newline
    lecture = (problem.get("lecture") or "").replace("\n", "\\n").replace("\\n", "\n")
    solution = (problem.get("solution") or "").replace("\n", "\\n").replace("\\n", "\n")
    text_in = SQA_INPUTS[in_fmt].format(q=problem["question"], c=context, m=choices)
    text_out = SQA_OUTPUTS[out_fmt].format(l=lecture, s=solution, a=SQA_LETTERS[problem["answer"]])
    text_in, text_out = text_in.replace("  ", " ").strip(), text_out.replace("  ", " ").strip()
    if text_in.endswith("BECAUSE:"):
        text_in = text_in.replace("BECAUSE:", "").strip()
    if text_out.endswith("BECAUSE:"):
        text_out = text_out.replace("BECAUSE:", "").strip()
    if text_in.startswith("Question: "):
        text_in = text_in.replace("Question: ", "")
    if text_out.startswith("Answer: "):
        text_out = text_out.replace("Answer: ", "")
    return text_in, text_out


def scienceqa_categories(problem):
    """The paper's table columns this problem counts in: subject (NAT/SOC/LAN), context
    (TXT if it has a hint, IMG if it has an image, NO if neither) and grade (G1-6/G7-12)."""
    has_text, has_image = bool((problem.get("hint") or "").strip()), problem.get("image") is not None
    cats = [SQA_SUBJECTS.get(problem.get("subject"), str(problem.get("subject")))]
    cats += [c for c, on in (("TXT", has_text), ("IMG", has_image), ("NO", not has_text and not has_image)) if on]
    grade = int(str(problem.get("grade", "grade0")).replace("grade", "") or 0)
    cats.append("G1-6" if grade <= 6 else "G7-12")
    return cats


def scienceqa_to_llava(problems_json, pid_splits_json, split, image_root=None, answer_first=False, prompt_format=None):
    """ScienceQA release -> LLaVA records for `split` (in pid_splits order), single-turn.

    Target: reasoning-first QCM-LEA by default, answer-first QCM-ALE with answer_first
    (prompt_format overrides, e.g. "QCM-A" or "CQM-A"). Problems with an image get
    "image": its path relative to `image_root` (the folder you give the dataset as image folder;
    default the release's images/{split}, giving the official "{pid}/image.png"); the image
    is looked for at images/{split}/{pid}/ next to problems.json. Kept for evaluation: answer
    (letter), choices, subject, grade, has_text, has_image, no_context, categories."""
    problems, splits = read_json(problems_json, "ScienceQA problems"), read_json(pid_splits_json, "ScienceQA splits")
    if not isinstance(splits, dict) or split not in splits:
        raise DataError(f"{pid_splits_json} has no split {split!r}; it has {', '.join(map(repr, splits))}")
    pids = splits[split]
    fmt = prompt_format or ("QCM-ALE" if answer_first else "QCM-LEA")
    images = Path(problems_json).parent / "images" / split
    root = Path(image_root) if image_root is not None else images
    records = []
    for pid in pids:
        p = problems[pid]
        text_in, text_out = scienceqa_example(p, fmt)
        has_image = p.get("image") is not None
        record = {"id": pid}
        if has_image:
            record["image"] = os.path.relpath(images / pid / p["image"], root)
            text_in = f"{text_in}\n{IMAGE}"
        has_text = bool((p.get("hint") or "").strip())
        record.update({
            "conversations": [{"from": "human", "value": text_in}, {"from": "gpt", "value": text_out}],
            "answer": SQA_LETTERS[p["answer"]], "choices": list(p["choices"]),
            "subject": p.get("subject"), "grade": p.get("grade"),
            "has_text": has_text, "has_image": has_image, "no_context": not has_text and not has_image,
            "categories": scienceqa_categories(p)})
        records.append(record)
    return records
