"""
Weights: reading, checking, writing and fetching checkpoints. Only safetensors and JSON.

Why only safetensors: a .bin checkpoint is a pickle, and unpickling runs whatever code the
file holds. A safetensors file is a JSON header plus raw tensor bytes, so reading one can only
ever produce tensors. It is also what the Hub ships for llava-hf, openai CLIP and Vicuna.

How a 7B model is loaded without ever existing twice in memory: the model is built on the meta
device (shapes, no storage), load_state_dict memory-maps the files (safetensors tensors are
views of an mmap, so pages are read lazily when touched), and assign_weights hands those very
tensors to the module with load_state_dict(assign=True) instead of copying them into freshly
allocated parameters. Before that it checks every key and shape and names all problems at once.

Saving is atomic: every file is written under a temporary name in the same directory and then
renamed over the old one (os.replace), so a crash mid-save leaves the previous checkpoint
readable, never a half-written one. Large states are sharded the way transformers does it
(model-00001-of-00003.safetensors + model.safetensors.index.json), so either tool reads both.

fetch downloads a Hub model with requests + tqdm into a cache directory, resumes partial files
with HTTP Range requests, and checks each file's size before renaming it into place.
"""

import json
import os
import re
import secrets
import time
from pathlib import Path

import requests
from safetensors import safe_open
from tqdm import tqdm

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class WeightsError(Exception):
    """A checkpoint, config or download that cannot be used; the message says which and why."""


def read_json(path, what="config"):
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"{what} file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{what} file {path} is not valid JSON ({e})") from None
    except OSError as e:
        raise WeightsError(f"cannot read {what} file {path}: {e.strerror}") from None


# -----------------------------------------------------------------------------------------------
# reading

def _read_safetensors(file):
    try:  # safetensors raises its own error type for a bad or truncated header
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # views of a private mmap of the file
    except Exception as e:
        raise WeightsError(f"{file} is not a valid safetensors file ({e})") from None


def _weight_map(index_file):
    index = read_json(index_file, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f'{index_file} has no "weight_map": it is not a safetensors index')
    return weight_map


def load_state_dict(path):
    """A .safetensors file, or a directory holding an index + shards, model.safetensors, or
    exactly one *.safetensors file. Tensors come back as stored (dtype unchanged), on the CPU."""
    path = Path(path)
    if path.is_file():
        return _read_safetensors(path)
    if not path.is_dir():
        raise WeightsError(f"no such file or directory: {path}")
    if (path / INDEX).is_file():
        weight_map = _weight_map(path / INDEX)
        shards = list(dict.fromkeys(weight_map.values()))  # each shard once, in index order
        absent = [s for s in shards if not (path / s).is_file()]
        if absent:
            raise WeightsError(f"{path / INDEX} lists shards missing on disk: {', '.join(absent)}; "
                               f"the download or copy of {path} is incomplete")
        state = {}
        for shard in shards:
            for k, t in _read_safetensors(path / shard).items():
                if k in state:
                    raise WeightsError(f"key {k} is stored in two shards in {path}")
                state[k] = t
        lost = [k for k in weight_map if k not in state]
        if lost:
            raise WeightsError(f"{path / INDEX} lists keys that no shard holds: {', '.join(lost)}")
        return state
    if (path / SINGLE).is_file():
        return _read_safetensors(path / SINGLE)
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return _read_safetensors(files[0])
    if files:
        raise WeightsError(f"{path} holds several .safetensors files ({', '.join(f.name for f in files)}) "
                           f"but no {INDEX} that says how they fit together")
    raise WeightsError(f"no {SINGLE} or {INDEX} in {path}; pass a directory that holds the weights")


# -----------------------------------------------------------------------------------------------
# checking and assigning

def _prefix_hint(missing, unexpected):
    """The usual cause of 'everything missing, everything unexpected': a prefix too many or few."""
    for u in unexpected:
        if missing and u.endswith("." + missing[0]):
            return f" (the checkpoint keys carry an extra prefix {u[:-len(missing[0])]!r})"
        if missing and missing[0].endswith("." + u):
            return f" (the checkpoint keys lack the prefix {missing[0][:-len(u)]!r})"
    return ""


def assign_weights(module, state, source, dtype=None, device=None):
    """Check `state` against module.state_dict() (persistent params + buffers; a meta module
    still knows its shapes), then make its tensors the module's own. Returns the module."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} (expected {list(expected[k].shape)}, found {list(state[k].shape)})"
             for k in expected if k in state and tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys)}" for label, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
        raise WeightsError(f"checkpoint {source} does not fit {type(module).__name__}: "
                           + "; ".join(parts) + _prefix_hint(missing, unexpected))

    def convert(t):
        if dtype is not None and t.is_floating_point():  # integer buffers keep their type
            t = t.to(dtype)
        return t if device is None else t.to(device)

    # assign=True: the tensors become the parameters (wrapped in nn.Parameter with the module's
    # requires_grad), nothing is copied into a second allocation
    module.load_state_dict({k: convert(state[k]) for k in expected}, strict=True, assign=True)
    return module


# -----------------------------------------------------------------------------------------------
# writing

def _fsync(path):  # the bytes are on disk before the rename makes them the checkpoint
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_json_atomic(path, obj, indent=2):
    """Write obj as JSON to a temporary file in the same directory, fsync, rename over `path`:
    readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name no other writer uses (not mkstemp: its files are private, mode 0600, whatever the umask)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_state_dict(state, directory, max_shard_bytes=5_000_000_000, prefix="model"):
    """Write `state` as {prefix}.safetensors, or as shards + index when it exceeds max_shard_bytes.
    Every file goes to NAME.tmp first and is renamed into place; files of an older save in the
    same directory that the new one does not use are removed. Returns the written paths."""
    from safetensors.torch import save_file  # here, so that generate_data.py's JSON writes need no torch
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, set()
    for k, t in state.items():
        if t.device.type == "meta":
            raise WeightsError(f"cannot save {k}: it is on the meta device (never loaded)")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:  # safetensors refuses shared memory (tied weights): copy it
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[k] = t

    shards, size = [[]], 0  # greedy in state order, like transformers; a huge tensor gets its own
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(k)
        size += n
    n = len(shards)
    names = [f"{prefix}.safetensors"] if n == 1 else \
            [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    index_name = f"{prefix}.safetensors.index.json"

    written = []  # (tmp, final): write everything first, rename only when all writes succeeded
    try:
        for name, keys in zip(names, shards):
            written.append((directory / (name + ".tmp"), directory / name))
            save_file({k: tensors[k] for k in keys}, str(written[-1][0]), metadata={"format": "pt"})
            _fsync(written[-1][0])
        if n > 1:  # the index goes last, so it never points at shards that are not there yet
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
            written.append((directory / (index_name + ".tmp"), directory / index_name))
            written[-1][0].write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            _fsync(written[-1][0])
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in written:
        os.replace(tmp, final)

    # an older save's files: the stale index first, so no index ever names a removed shard
    ours = re.compile(rf"{re.escape(prefix)}(-\d{{5}}-of-\d{{5}})?\.safetensors(\.index\.json)?(\.tmp)?")
    keep = {final.name for _, final in written}
    stale = [p for p in directory.iterdir() if ours.fullmatch(p.name) and p.name not in keep]
    for p in sorted(stale, key=lambda p: not p.name.endswith(".index.json")):
        p.unlink(missing_ok=True)
    return [final for _, final in written]


# -----------------------------------------------------------------------------------------------
# fetching from the Hub

HUB = "https://huggingface.co"
REQUIRED = ["config.json", "tokenizer.model"]
OPTIONAL = ["tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
            "generation_config.json", "preprocessor_config.json"]
CHUNK = 1 << 16  # bytes per read: an interrupted read loses at most this much


def is_hub_name(name):
    """org/name, as the Hub spells repositories (no "." or ".." parts)."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", str(name))) and not any(p in (".", "..") for p in str(name).split("/"))


def fetch(name_or_dir, cache_dir=None, files=None):
    """An existing local path is returned as is. A Hub name (org/name) is downloaded into
    {cache_dir or $NANOLLAVA_CACHE or ~/.cache/nanollava}/org--name and that directory returned:
    config.json, the tokenizer files (or exactly `files`, all required), then the weights
    (the index and its shards, else model.safetensors)."""
    path = Path(name_or_dir).expanduser()
    if path.exists():
        return path
    name = str(name_or_dir)
    if not is_hub_name(name):
        raise WeightsError(f"no such directory: {name} (and it is not a Hub name like llava-hf/llava-1.5-7b-hf)")
    base = os.environ.get("NANOLLAVA_HUB_URL", HUB).rstrip("/")
    root = Path(cache_dir or os.environ.get("NANOLLAVA_CACHE") or "~/.cache/nanollava").expanduser()
    target = root / name.replace("/", "--")
    required, optional = (list(files), []) if files is not None else (REQUIRED, OPTIONAL)
    marker = target / ".complete"  # written last: which files a finished fetch asked for
    if marker.is_file() and set(required + optional) <= set(marker.read_text().split()):
        return target  # nothing to ask the network: works offline once downloaded

    target.mkdir(parents=True, exist_ok=True)
    session = requests.Session()
    session.headers["Accept-Encoding"] = "identity"  # byte counts must match Content-Length
    if os.environ.get("HF_TOKEN"):  # requests drops it on redirects to another host (the CDN)
        session.headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    for f in required:
        _download(session, base, name, f, target)
    for f in optional:
        _download(session, base, name, f, target, required=False)
    if _download(session, base, name, INDEX, target, required=False):
        for shard in dict.fromkeys(_weight_map(target / INDEX).values()):
            if not re.fullmatch(r"[\w-][\w.-]*", shard):  # a plain file name, nothing like ../x
                raise WeightsError(f"{target / INDEX} names a shard {shard!r} that is not a plain file name")
            _download(session, base, name, shard, target)
    else:
        _download(session, base, name, SINGLE, target, why=" (nanollava reads only safetensors weights)")
    marker.write_text("\n".join(required + optional) + "\n")
    return target


def _download(session, base, name, filename, target, required=True, tries=5, why=""):
    """One file into target/filename via filename.part, resuming a partial .part. Returns False
    only for an optional file that does not exist (404)."""
    final, part = target / filename, target / (filename + ".part")
    if final.is_file():
        return True  # files are renamed into place only once complete
    url = f"{base}/{name}/resolve/main/{filename}"
    for attempt in range(tries):
        have = part.stat().st_size if part.exists() else 0
        try:
            r = session.get(url, headers={"Range": f"bytes={have}-"} if have else {}, stream=True, timeout=(10, 60))
        except (requests.ConnectionError, requests.Timeout):
            raise WeightsError(f"{name} is no local directory, and {base} cannot be reached to download it "
                               "(offline?): download it elsewhere and give its directory instead") from None
        with r:
            if r.status_code == 404 and not required:
                return False
            if r.status_code == 404:
                raise WeightsError(f"{filename} not found at {url}: is {name} a llava-hf model name?{why}")
            if r.status_code in (401, 403):
                raise WeightsError(f"access to {url} denied (HTTP {r.status_code}): {name} does not exist, "
                                   "or it is gated or private and needs HF_TOKEN set")
            if r.status_code == 416:  # a .part longer than the file: start over
                part.unlink()
                continue
            if r.status_code not in (200, 206):
                raise WeightsError(f"downloading {url} failed: HTTP {r.status_code} {r.reason}")
            total = None
            if r.status_code == 206:  # Content-Range: bytes START-END/TOTAL
                m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", r.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != have:
                    part.unlink()
                    continue
                total = int(m.group(2)) if m.group(2) != "*" else None
            else:  # 200: the whole file (a server that ignores Range also answers 200: restart)
                have = 0
                total = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
            try:
                with open(part, "ab" if have else "wb") as f, \
                        tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=filename) as bar:
                    for chunk in r.iter_content(chunk_size=CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError):
                time.sleep(min(attempt, 5))  # keep the bytes we have and resume from there
                continue
        size = part.stat().st_size
        if total is None or size == total:
            os.replace(part, final)
            return True
        if size > total:
            part.unlink()
        # else the server closed early without an error: resume on the next try
    raise WeightsError(f"downloading {url} failed after {tries} tries; run again to resume "
                       f"from the {part.name} kept so far")
