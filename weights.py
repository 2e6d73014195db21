"""Checkpoints in and out: safetensors and JSON only (a .bin is a pickle, and unpickling runs code).

One loading path for CLIP, LLaMA and LLaVA: build the model on the meta device from its config, map the
memory-mapped safetensors' names through `LAYOUT`, check every key and shape, and make those very tensors
the parameters (assign=True): a 7B model never exists twice in memory. Writes are atomic and sharded as
transformers shards; `fetch` downloads a Hub model by name, resumably.
"""

import json
import os
import re
import time
from pathlib import Path

import requests
from safetensors import safe_open
from tqdm import tqdm

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
CHUNK, TRIES = 1 << 16, 5  # download: bytes per read (an interrupted read loses at most this), tries per file
OPTIONAL = ["tokenizer_config.json", "added_tokens.json"]  # what llama.Tokenizer reads, where the Hub has them


class WeightsError(Exception):
    """A checkpoint, config or download that cannot be used; the message says which and why."""


def read_json(path, what="config", parse=None):
    """path's JSON, or parse(it) (a config's from_hf): what fails is one WeightsError naming the file."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
        return obj if parse is None else parse(obj)
    except FileNotFoundError:
        raise WeightsError(f"{what} file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{what} file {path} is not valid JSON ({e})") from None
    except OSError as e:
        raise WeightsError(f"cannot read {what} file {path}: {e.strerror}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # what parse refuses
        raise WeightsError(f"{path}: {e}") from None


# (prefix in a checkpoint, ours; None: not ours), the longest wins; an unmatched key stays for assign_weights
# to refuse. Rows: the Hub's (what we write); transformers 5 saves and module names; CLIP; a Llama (`llm.`).
LAYOUT = [
    ("vision_tower.vision_model.", "vision_tower."), ("multi_modal_projector.", "projector."),
    ("language_model.lm_head.", "llm.lm_head."), ("language_model.model.", "llm."),
    ("vision_tower.", "vision_tower."), ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "projector."),
    ("model.language_model.", "llm."), ("vision_model.", "vision_tower."), ("text_model.", None),
    ("visual_projection.", None), ("text_projection.", None), ("logit_scale", None),
    *((p, "vision_tower." + p) for p in ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")),
    ("model.", "llm."), ("lm_head.", "llm.lm_head."),
]


def _rename(key, pairs):
    """key with the longest of the pairs' first prefixes that it starts with -> the second one."""
    old, new = max((p for p in pairs if key.startswith(p[0])), key=lambda p: len(p[0]), default=("", ""))
    return None if new is None else new + key[len(old):]


def read_weights(path):
    """load_state_dict(path) under our names (LAYOUT), less CLIP's text half and derived buffers."""
    out = {}
    for key, t in load_state_dict(path).items():
        name = _rename(key, LAYOUT)
        if name in out:
            raise WeightsError(f"{path} holds {name} twice (once as {key}): keep one layout")
        if name is not None and not key.endswith(("position_ids", "rotary_emb.inv_freq")):  # old, derived buffers
            out[name] = t
    return out


def hub_names(state):
    """Our names -> llava-hf's, the layout the Hub, transformers 4 and transformers 5 read."""
    return {_rename(k, [(ours, theirs) for theirs, ours in LAYOUT[:4]]): t for k, t in state.items()}


def _read_safetensors(file):
    try:  # safetensors raises its own error type for a bad or truncated header
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # views of a private mmap of the file
    except Exception as e:
        raise WeightsError(f"{file} is not a valid safetensors file ({e})") from None


def _weight_map(index_file):
    index = read_json(index_file, "safetensors index")
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict) or not index["weight_map"]:
        raise WeightsError(f'{index_file} has no "weight_map": it is not a safetensors index')
    return index["weight_map"]


def load_state_dict(path):
    """A directory holding model.safetensors or an index + its shards -> {key: tensor} as stored (dtype
    unchanged), on the CPU. Each key comes from the shard the index names."""
    path, index = Path(path), Path(path) / INDEX
    if (path / SINGLE).is_file() and not index.is_file():
        return _read_safetensors(path / SINGLE)
    if not index.is_file():
        raise WeightsError(f"no {SINGLE} or {INDEX} in {path}; pass a directory that holds the weights")
    weight_map, state = _weight_map(index), {}  # a key the index names but no shard holds: assign's missing
    shards = list(dict.fromkeys(weight_map.values()))  # each shard once, in index order
    if absent := [s for s in shards if not (path / s).is_file()]:
        raise WeightsError(f"{index} lists shards missing on disk: {', '.join(absent)}; the copy is incomplete")
    for shard in shards:
        for k, t in _read_safetensors(path / shard).items():
            if weight_map.get(k) != shard:
                raise WeightsError(f"{path / shard} holds {k}, which {index} places in {weight_map.get(k)}")
            state[k] = t
    return state


def assign_weights(module, state, source, dtype=None, device=None, part=""):
    """Check `state`'s keys under `part` (stripped) and shapes against module.state_dict() (a meta module's
    will do), every problem in one error; then make the tensors its own (cast to dtype, on device) -> module."""
    expected, first = module.state_dict(), {}
    # a tied parameter (lm_head = embed_tokens) is stored once, under its first name, as transformers does
    ties = {n: first.setdefault(id(p), n) for n, p in module.named_parameters(remove_duplicate=False)}
    ties = {n: t for n, t in ties.items() if t != n}
    ours = {k[len(part):]: t for k, t in state.items() if k.startswith(part) and k[len(part):] not in ties}
    missing = [k for k in expected if k not in ours and k not in ties]
    unexpected = [k for k in state if not k.startswith(part)] + [k for k in ours if k not in expected]
    wrong = [f"{k} (expected {list(expected[k].shape)}, found {list(ours[k].shape)})"
             for k in expected if k in ours and expected[k].shape != ours[k].shape]
    problems = {"missing keys": missing, "unexpected keys": unexpected, "wrong shapes": wrong}
    if missing or unexpected or wrong:  # the usual cause of all missing, all unexpected: an extra prefix
        extra = [u[:-len(missing[0])] for u in unexpected if missing and u.endswith("." + missing[0])]
        raise WeightsError(f"checkpoint {source} does not fit {type(module).__name__}: "
                           + "; ".join(f"{what}: {', '.join(keys)}" for what, keys in problems.items() if keys)
                           + (f" (the checkpoint keys carry an extra prefix {extra[0]!r})" if extra else ""))
    convert = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None)  # noqa: E731
    # assign=True: the tensors become the parameters (requires_grad kept), uncopied unless cast or moved
    module.load_state_dict({k: convert(ours[ties.get(k, k)]) for k in expected}, assign=True)
    for name, target in ties.items():  # assign made two parameters of the tied ones: one again
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner), attr, module.get_parameter(target))
    return module


def write_atomic(directory, writers):
    """{file name: write(temporary path)}: each file is written and fsynced under a temporary name,
    and only once all are written renamed into place, in order."""
    directory, done = Path(directory), []
    directory.mkdir(parents=True, exist_ok=True)
    try:
        for name, write in writers.items():
            # a name no other writer uses (not mkstemp: its files are mode 0600, whatever the umask)
            done.append((directory / f"{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp", directory / name))
            write(done[-1][0])
            with open(done[-1][0], "rb+") as f:  # on disk before a rename makes it the file
                os.fsync(f.fileno())
    except BaseException:
        for tmp, _ in done:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in done:
        os.replace(tmp, final)


def write_json_atomic(path, obj, indent=2):
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    write_atomic(Path(path).parent, {Path(path).name: lambda tmp: tmp.write_text(text, encoding="utf-8")})


def save_state_dict(state, directory, max_shard_bytes=5_000_000_000):
    """`state` as model.safetensors, or beyond max_shard_bytes as shards (greedy, as transformers) + index,
    atomically; the files of an older save that this one does not use are removed."""
    from safetensors.torch import save_file  # here, so that generate_data.py's JSON writes need no torch
    shards, size = [[]], 0
    for k, t in state.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(k)
        size += t.nbytes
    n = len(shards)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    # a copy of one shard at a time: safetensors refuses views and shared memory (tied weights)
    copy = lambda keys: {k: state[k].detach().cpu().contiguous().clone() for k in keys}  # noqa: E731
    writers = {name: lambda tmp, keys=keys: save_file(copy(keys), str(tmp), metadata={"format": "pt"})
               for name, keys in zip(names, shards)}
    if n > 1:  # the index goes last, so it never names shards that are not there yet
        index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        writers[INDEX] = lambda tmp: tmp.write_text(json.dumps(index, indent=2))
    write_atomic(directory, writers)
    ours = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?(\..+\.tmp)?")
    stale = [p for p in Path(directory).iterdir() if ours.fullmatch(p.name) and p.name not in writers]
    for p in sorted(stale, key=lambda p: not p.name.endswith(".index.json")):  # no index names a lost shard
        p.unlink(missing_ok=True)


def fetch(name_or_dir, files=None, weights=True):
    """An existing local path comes back as is. A Hub name (org/name) is downloaded with requests + tqdm into
    $NANOLLAVA_CACHE (default ~/.cache/nanollava)/org--name, which comes back: `files` (default config.json,
    tokenizer.model and OPTIONAL), then (unless weights=False) the index and its shards or model.safetensors."""
    if Path(name_or_dir).expanduser().exists():
        return Path(name_or_dir).expanduser()
    name = str(name_or_dir)
    if not re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", name):  # org/name; each part starts with a word character: no ../
        raise WeightsError(f"no such directory: {name} (and it is not a Hub name like llava-hf/llava-1.5-7b-hf)")
    target = Path(os.environ.get("NANOLLAVA_CACHE") or "~/.cache/nanollava").expanduser() / name.replace("/", "--")
    marker, wanted = target / ".complete", files or ["config.json", "tokenizer.model", *OPTIONAL]
    if marker.is_file() and set(wanted) <= set(marker.read_text().split()):  # a finished fetch: no network
        return target
    target.mkdir(parents=True, exist_ok=True)
    session = requests.Session()
    session.headers["Accept-Encoding"] = "identity"  # byte counts must match Content-Length
    if os.environ.get("HF_TOKEN"):  # requests drops it on redirects to another host (the CDN)
        session.headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    for f in [*wanted, INDEX]:  # no index: a single model.safetensors
        _download(session, name, target / f, required=f not in [*OPTIONAL, INDEX])
    index = target / INDEX
    if not weights:  # no marker: a later fetch still gets the weights
        return target
    for shard in dict.fromkeys(_weight_map(index).values()) if index.is_file() else [SINGLE]:
        if not re.fullmatch(r"[\w-][\w.-]*", shard):  # a plain file name, nothing like ../x
            raise WeightsError(f"{index} names a shard {shard!r} that is not a plain file name")
        _download(session, name, target / shard)
    marker.write_text("\n".join(wanted) + "\n")  # last: the files a finished fetch asked for
    return target


def _download(session, name, final, required=True):
    """final via final.part, resuming a partial one; an optional file the Hub lacks is left out."""
    base = os.environ.get("NANOLLAVA_HUB_URL", "https://huggingface.co").rstrip("/")
    url, part = f"{base}/{name}/resolve/main/{final.name}", final.with_name(final.name + ".part")
    for attempt in range(TRIES):
        if final.is_file():  # renamed into place once complete
            return
        have = part.stat().st_size if part.exists() else 0
        try:
            r = session.get(url, headers={"Range": f"bytes={have}-"} if have else {}, stream=True,
                            timeout=(10, 60))
        except (requests.ConnectionError, requests.Timeout):
            raise WeightsError(f"{name} is no local directory, and {base} cannot be reached to download it "
                               "(offline?): download it elsewhere and give its directory instead") from None
        with r:
            code, resumed = r.status_code, r.headers.get("Content-Range", "").startswith(f"bytes {have}-")
            if code == 404 and not required:
                return
            if code == 404:
                why = " (nanollava reads only safetensors weights)" if final.name == SINGLE else ""
                raise WeightsError(f"{final.name} not found at {url}: is {name} a llava-hf model name?{why}")
            if code not in (200, 206, 416):
                why = " (gated or private? set HF_TOKEN)" if code in (401, 403) else ""
                raise WeightsError(f"downloading {url} failed: HTTP {code}{why}")
            if code == 416 or code == 206 and not resumed:  # a .part too long, or a range not asked for
                part.unlink()
                continue
            have = have if code == 206 else 0  # 200: the whole file, from a server that ignores Range
            total = have + int(r.headers.get("Content-Length", 0))
            try:  # urllib3 raises on a body shorter than its Content-Length
                with open(part, "ab" if have else "wb") as f, tqdm(total=total or None, initial=have, unit="B",
                                                                   unit_scale=True, desc=final.name) as bar:
                    for chunk in r.iter_content(chunk_size=CHUNK):
                        bar.update(f.write(chunk))
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError):
                time.sleep(attempt)  # keep the bytes we have and resume from there
                continue
        os.replace(part, final)
        return
    raise WeightsError(f"downloading {url} failed after {TRIES} tries; run again to resume from {part.name}")
