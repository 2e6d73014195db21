"""weights.py: safetensors round trips (single, sharded, transformers both ways), key/shape
checking, atomic saves, and fetch against a local HTTP server laid out like the Hub."""

import http.server
import json
import os
import re
import socket
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import weights
from weights import WeightsError, assign_weights, fetch, load_state_dict, read_json, save_state_dict


def small_state():
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(16, 8, generator=g),
        "layers.0.proj.weight": torch.randn(8, 8, generator=g).to(torch.float16),
        "layers.0.proj.bias": torch.randn(8, generator=g).to(torch.bfloat16),
        "layers.1.proj.weight": torch.randn(8, 8, generator=g),
        "counter": torch.arange(5),
    }


def assert_same(a, b):
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------- save/load

def test_single_file_round_trip(tmp_path):
    state = small_state()
    save_state_dict(state, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no .tmp left
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert_same(load_state_dict(tmp_path), state)


def test_sharded_round_trip_and_index_format(tmp_path, monkeypatch):
    state, renamed, replace = small_state(), [], os.replace
    monkeypatch.setattr(os, "replace", lambda tmp, final: (renamed.append(Path(final).name), replace(tmp, final)))
    save_state_dict(state, tmp_path, max_shard_bytes=300)
    names = sorted(p.name for p in tmp_path.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in names and len(names) == len(shards) + 1
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", n) for n in shards)
    assert renamed[-1] == "model.safetensors.index.json"  # last: it never names a shard not there yet
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert set(index["weight_map"]) == set(state)
    for key, shard in index["weight_map"].items():  # each key really is in the shard the index names
        with safe_open(str(tmp_path / shard), "pt") as f:
            assert torch.equal(f.get_tensor(key), state[key])
    assert_same(load_state_dict(tmp_path), state)


def test_shared_storage_is_saved(tmp_path):
    w = torch.randn(4, 4)
    state = {"embed.weight": w, "lm_head.weight": w, "half": w[:2]}  # tied weights and a view
    save_state_dict(state, tmp_path)
    assert_same(load_state_dict(tmp_path), {"embed.weight": w, "lm_head.weight": w, "half": w[:2]})


def test_transformers_reads_ours_and_we_read_theirs(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ours = tmp_path / "ours"
    save_state_dict(model.state_dict(), ours, max_shard_bytes=4000)
    cfg.save_pretrained(ours)
    assert len(list(ours.glob("model-*.safetensors"))) > 1
    loaded = transformers.LlamaForCausalLM.from_pretrained(ours)
    assert_same(loaded.state_dict(), model.state_dict())

    theirs = tmp_path / "theirs"
    model.save_pretrained(theirs, max_shard_size="4KB")
    assert (theirs / "model.safetensors.index.json").is_file()
    assert_same(load_state_dict(theirs), model.state_dict())


def test_resave_removes_stale_files(tmp_path):
    state = small_state()
    save_state_dict(state, tmp_path, max_shard_bytes=300)
    (tmp_path / "config.json").write_text("{}")
    save_state_dict(state, tmp_path)  # now fits one file: old shards and index must go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert_same(load_state_dict(tmp_path), state)
    save_state_dict(state, tmp_path, max_shard_bytes=300)  # and back: old single file must go
    assert "model.safetensors" not in {p.name for p in tmp_path.iterdir()}
    assert_same(load_state_dict(tmp_path), state)


def test_failed_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    old = small_state()
    save_state_dict(old, tmp_path, max_shard_bytes=300)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save_file(tensors, filename, metadata=metadata)

    import safetensors.torch
    real_save_file = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)  # save_state_dict imports it when called
    new = {k: v + 1 for k, v in old.items()}
    with pytest.raises(OSError, match="disk full"):
        save_state_dict(new, tmp_path, max_shard_bytes=300)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # untouched, no .tmp
    assert_same(load_state_dict(tmp_path), old)


def test_load_errors(tmp_path):
    with pytest.raises(WeightsError, match=r"no model.safetensors or model.safetensors.index.json in .*pass a directory"):
        load_state_dict(tmp_path)
    with pytest.raises(WeightsError, match="no model.safetensors or model.safetensors.index.json in .*nope"):
        load_state_dict(tmp_path / "nope")
    bad = tmp_path / "bad" / "model.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(WeightsError, match=rf"{re.escape(str(bad))} is not a valid safetensors file"):
        load_state_dict(bad.parent)
    sharded = tmp_path / "sharded"
    save_state_dict(small_state(), sharded, max_shard_bytes=300)
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(WeightsError, match="shards missing on disk: model-00002-of-00003.safetensors"):
        load_state_dict(sharded)
    # a key in a shard the index does not place it in (a duplicate, or one the index lacks)
    save_state_dict(small_state(), sharded, max_shard_bytes=300)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    first = sorted(index["weight_map"])[0]
    home = index["weight_map"][first]
    stray = next(s for s in sorted(set(index["weight_map"].values())) if s != home)
    from safetensors.torch import load_file, save_file
    save_file({**load_file(sharded / stray), first: small_state()[first]}, str(sharded / stray))
    with pytest.raises(WeightsError, match=rf"{stray} holds {re.escape(first)}, which .* places in {home}"):
        load_state_dict(sharded)


def test_read_json(tmp_path):
    (tmp_path / "c.json").write_text('{"a": 1}')
    assert read_json(tmp_path / "c.json") == {"a": 1}
    with pytest.raises(WeightsError, match="config file not found: .*missing.json"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(WeightsError, match="tokenizer file .*bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json", what="tokenizer")


# ------------------------------------------------------------------------------------------- assign

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(4)
        self.register_buffer("steps", torch.zeros(3, dtype=torch.long))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def test_assign_names_every_problem_at_once():
    with torch.device("meta"):
        m = Tiny()
    state = {"proj.weight": torch.zeros(4, 9), "norm.weight": torch.ones(4), "steps": torch.zeros(3, dtype=torch.long),
             "extra.weight": torch.zeros(1), "proj.bias": torch.zeros(4)}  # norm.bias missing
    with pytest.raises(WeightsError) as e:
        assign_weights(m, state, "/x/model.safetensors")
    msg = str(e.value)
    assert msg.startswith("checkpoint /x/model.safetensors does not fit Tiny: ")
    assert "missing keys: norm.bias" in msg and "unexpected keys: extra.weight" in msg
    assert "wrong shapes: proj.weight (expected [4, 8], found [4, 9])" in msg
    assert "\n" not in msg


def test_assign_prefix_hint():
    with torch.device("meta"):
        m = Tiny()
    state = {"vision_model." + k: v for k, v in Tiny().state_dict().items()}
    with pytest.raises(WeightsError, match="extra prefix 'vision_model.'"):
        assign_weights(m, state, "ckpt")


def test_assign_casts_moves_and_keeps_requires_grad():
    ref = Tiny()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    with torch.device("meta"):
        m = Tiny()
    m.proj.weight.requires_grad_(False)  # a frozen tower stays frozen
    assign_weights(m, state, "ckpt", dtype=torch.bfloat16, device="cpu")
    assert isinstance(m.proj.weight, nn.Parameter) and isinstance(m.norm.bias, nn.Parameter)
    assert m.proj.weight.requires_grad is False and m.proj.bias.requires_grad is True
    assert m.proj.weight.dtype == torch.bfloat16 and m.proj.weight.device.type == "cpu"
    assert m.steps.dtype == torch.long  # integer buffers are not cast
    assert torch.equal(m.proj.weight, ref.proj.weight.to(torch.bfloat16))
    assert m.scratch.is_meta  # non-persistent buffers are the module's own job


def test_assign_without_cast_does_not_copy(tmp_path):
    save_state_dict(Tiny().state_dict(), tmp_path)
    state = load_state_dict(tmp_path)
    with torch.device("meta"):
        m = Tiny()
    assign_weights(m, state, tmp_path)
    assert m.proj.weight.data_ptr() == state["proj.weight"].data_ptr()  # the mmap'd tensor itself
    out = m.norm(m.proj(torch.randn(2, 8)))
    out.sum().backward()
    assert m.proj.weight.grad is not None


# ------------------------------------------------------------------------------------------- fetch

class FakeHub:
    """Serves {repo: {filename: bytes}} at /{repo}/resolve/main/{filename} with Range support;
    truncate[filename] = n sends only n bytes of that file once, then drops the connection."""

    def __init__(self, repos):
        self.repos, self.truncate, self.ignore_range, self.log = repos, {}, False, []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                m = re.fullmatch(r"/(.+)/resolve/main/(.+)", self.path)
                data = m and hub.repos.get(m.group(1), {}).get(m.group(2))
                hub.log.append((self.path, self.headers.get("Range"), self.headers.get("Authorization")))
                if data is None:
                    self.send_error(404)
                    return
                start, rng = 0, self.headers.get("Range")
                if rng and not hub.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                cut = hub.truncate.pop(m.group(2), None)
                if cut is not None:  # promise everything, send a little, hang up
                    self.wfile.write(data[start:start + cut])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    src = tmp_path / "src"
    state = {f"layers.{i}.weight": torch.randn(32, 32) for i in range(4)}  # 4 KiB each
    save_state_dict(state, src, max_shard_bytes=9000)
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    files["config.json"] = b'{"model_type": "llava"}'
    files["tokenizer.model"] = bytes(range(256)) * 4
    files["tokenizer_config.json"] = b"{}"
    single = tmp_path / "single"
    save_state_dict(state, single)
    clip = {"config.json": b"{}", "model.safetensors": (single / "model.safetensors").read_bytes()}
    server = FakeHub({"test-org/tiny": files, "test-org/clip": clip})
    server.state, server.files = state, files
    monkeypatch.setenv("NANOLLAVA_HUB_URL", server.url)
    monkeypatch.setenv("NANOLLAVA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.close()


def test_fetch_full_download_then_offline_from_cache(hub, tmp_path):
    d = fetch("test-org/tiny")
    assert d == tmp_path / "cache" / "test-org--tiny"
    assert {p.name for p in d.iterdir()} == set(hub.files) | {".complete"}  # optional 404s are fine
    assert all((d / n).read_bytes() == b for n, b in hub.files.items())
    assert_same(load_state_dict(d), hub.state)
    assert not list(d.glob("*.part"))
    hub.close()  # once complete, the cache is used without the network
    assert fetch("test-org/tiny") == d


def test_fetch_without_weights_then_with_them(hub):
    """weights=False (train.py --check-data): configs and tokenizer only, and no marker, so the next
    fetch still gets the weights."""
    d = fetch("test-org/tiny", weights=False)
    assert {p.name for p in d.iterdir()} == {n for n in hub.files if not n.startswith("model-")}  # the index, no shards
    assert fetch("test-org/tiny") == d and (d / ".complete").is_file()
    assert_same(load_state_dict(d), hub.state)


def test_fetch_single_file_repo_with_chosen_files(hub):
    d = fetch("test-org/clip", files=["config.json"])  # no tokenizer asked for: none required
    assert {p.name for p in d.iterdir()} == {"config.json", "model.safetensors", ".complete"}
    assert_same(load_state_dict(d), hub.state)
    with pytest.raises(WeightsError, match="tokenizer.model not found at"):
        fetch("test-org/clip")  # the default set needs a tokenizer


def test_fetch_local_dir_as_is(tmp_path):
    assert fetch(tmp_path) == tmp_path
    assert fetch(str(tmp_path)) == tmp_path
    with pytest.raises(WeightsError, match="no such directory"):
        fetch(str(tmp_path / "a" / "b"))


def test_fetch_resumes_interrupted_transfer(hub, monkeypatch):
    monkeypatch.setattr(weights, "CHUNK", 100)  # a broken read loses its chunk: keep them small
    shard = "model-00001-of-00002.safetensors"
    hub.truncate[shard] = 1000
    d = fetch("test-org/tiny")
    assert (d / shard).read_bytes() == hub.files[shard]
    ranges = [r for p, r, _ in hub.log if p.endswith(shard)]
    assert ranges == [None, "bytes=1000-"]
    assert_same(load_state_dict(d), hub.state)


def test_fetch_resumes_part_file_from_earlier_run(hub, tmp_path):
    d = tmp_path / "cache" / "test-org--tiny"
    d.mkdir(parents=True)
    (d / "tokenizer.model.part").write_bytes(hub.files["tokenizer.model"][:300])
    fetch("test-org/tiny")
    assert (d / "tokenizer.model").read_bytes() == hub.files["tokenizer.model"]
    assert [r for p, r, _ in hub.log if p.endswith("/tokenizer.model")] == ["bytes=300-"]


def test_fetch_restarts_when_server_ignores_range(hub, tmp_path):
    d = tmp_path / "cache" / "test-org--tiny"
    d.mkdir(parents=True)
    (d / "tokenizer.model.part").write_bytes(b"garbage" * 10)
    hub.ignore_range = True
    fetch("test-org/tiny")
    assert (d / "tokenizer.model").read_bytes() == hub.files["tokenizer.model"]


def test_fetch_sends_token(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    fetch("test-org/tiny")
    assert {auth for _, _, auth in hub.log} == {"Bearer hf_secret"}


def test_fetch_404_on_required_file(hub):
    with pytest.raises(WeightsError, match=r"config.json not found at http://127.0.0.1:\d+/test-org/nothing/"
                                           r"resolve/main/config.json: is test-org/nothing a llava-hf model name\?"):
        fetch("test-org/nothing")
    del hub.files["model-00002-of-00002.safetensors"]
    with pytest.raises(WeightsError, match="model-00002-of-00002.safetensors not found at"):
        fetch("test-org/tiny")
    hub.repos["test-org/bin-only"] = {"config.json": b"{}", "tokenizer.model": b"x", "pytorch_model.bin": b"x"}
    with pytest.raises(WeightsError, match="model.safetensors not found at .* reads only safetensors"):
        fetch("test-org/bin-only")


def test_fetch_offline(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NANOLLAVA_HUB_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NANOLLAVA_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match=rf"test-org/tiny is no local directory, and http://127.0.0.1:{port} "
                                           r"cannot be reached to download it \(offline\?\)"):
        fetch("test-org/tiny")


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "records.json"
    weights.write_json_atomic(path, [{"value": "café <image>"}], indent=None)  # makes the folder
    assert json.loads(path.read_text(encoding="utf-8")) == [{"value": "café <image>"}]
    assert "café" in path.read_text(encoding="utf-8")  # UTF-8 as is, not \u escapes
    plain = tmp_path / "plain.json"
    plain.write_text("{}")  # the permissions any file written here gets (the umask's), not mkstemp's 0600
    assert path.stat().st_mode == plain.stat().st_mode

    class Unserialisable:
        pass
    with pytest.raises(TypeError):  # json fails halfway through the new content
        weights.write_json_atomic(path, [{"a": 1}, Unserialisable()])
    assert json.loads(path.read_text(encoding="utf-8")) == [{"value": "café <image>"}]
    assert [p.name for p in path.parent.iterdir()] == ["records.json"]  # no temporary left behind
