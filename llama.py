"""
LLaMA / Vicuna, the language half of LLaVA, in plain PyTorch, and its sentencepiece tokenizer.

The decoder (Touvron et al. 2023) is pre-norm blocks, then a final RMSNorm and the vocabulary head:

    x = x + attn(rmsnorm(x))        causal attention with rotary positions (RoPE)
    x = x + mlp(rmsnorm(x))         SwiGLU: down(silu(gate(x)) * up(x))

Module names are the Hugging Face keys without their prefix (weights.LAYOUT). We are measured
against transformers' LlamaForCausalLM, so the numerics follow it operation by operation:
- RMSNorm in fp32, cast back to the input dtype, and only then times the weight.
- RoPE: inv_freq = 1 / theta ** (arange(0, d, 2) / d) and the angles in fp32, cos/sin cast to the
  activation dtype right before use. Meta's code rotates adjacent pairs (x0,x1), (x2,x3), ... as
  complex numbers; HF's conversion permuted the rows of q_proj/k_proj so that the same rotation
  pairs x_i with x_{i+d/2}: x*cos + rotate_half(x)*sin. Every HF-format checkpoint carries the
  permuted weights, so we use rotate_half (Meta's consolidated.pth would need the permutation).
- GQA: KV <= H key/value heads, and query head j reads kv head j // (H / KV) (SDPA's enable_gqa,
  without copies). Vicuna has KV == H; the path is for LLaMA-2-70B-style configs.
- Attention is F.scaled_dot_product_attention, with is_causal=True wherever there is no mask so
  the flash kernels run; right padding needs no mask (real tokens never look right).

KV cache (gpt-fast style): `KVCache` preallocates k/v [L, B, KV, max_len, hd] once; a forward with
it writes [pos, pos + T), attends over [0, pos + T) and advances pos (prefill: the prompt at once).
"""

import codecs
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from weights import WeightsError, assign_weights, fetch, read_json, read_weights

# -----------------------------------------------------------------------------------------------
# config


@dataclass
class LlamaConfig:
    # transformers' defaults (LLaMA-2-7B), but for the context: Vicuna v1.5's 4096
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> num_attention_heads (no GQA)
    head_dim: int | None = None             # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, d):
        """A transformers config dict (config.json, llava-hf text_config); a missing field means
        transformers' default. rope_theta is top-level (transformers 4) or in rope_parameters (5)."""
        d = dict(d or {})
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type is {d['model_type']!r}, not 'llama'")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"rope {rope} is not supported (only plain RoPE)")
        for key, plain in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if d.get(key, plain) != plain:
                raise ValueError(f"{key}={d[key]!r} is not supported (LLaMA uses {plain!r})")
        values = {f.name: d.get(f.name, f.default) for f in fields(cls)}
        values["max_position_embeddings"] = d.get("max_position_embeddings", 2048)
        values["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        return cls(**values)

    def to_hf(self):
        """The config.json dict transformers 4 and 5 both read (5 moves rope_theta itself)."""
        return dict(asdict(self), model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                    bos_token_id=1, eos_token_id=2, attention_bias=False, mlp_bias=False)


# -----------------------------------------------------------------------------------------------
# the model

# cuDNN attention, torch's first choice on Hopper, builds a plan for every new shape (every
# decoding step, every padded batch length); flash and memory-efficient attention need none.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)  # [..., hd] -> two [..., hd/2]
    return torch.cat((-x2, x1), dim=-1)


# ---- a block's elementwise pieces, plain functions of tensors that compile_elementwise swaps

def rms_norm(x, weight, eps: float):
    dtype = x.dtype
    x = x.float()  # the mean of squares in bf16 would lose the small activations
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)  # HF order: cast back first, then scale


_rms_norm = rms_norm  # the eager one, so that a compiled add_rms_norm traces the arithmetic itself


def add_rms_norm(x, delta, weight, eps: float):
    """(x + delta, rms_norm(x + delta)): compiled as one function, the sum is read once, and the
    two gradients that meet at it are added in the same kernel."""
    x = x + delta
    return x, _rms_norm(x, weight, eps)


def apply_rope(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def swiglu(gate, up):
    return F.silu(gate) * up


_EAGER = (rms_norm, add_rms_norm, apply_rope, swiglu)
_COMPILED = []


def compile_elementwise(on=True):
    """Rebind rms_norm, add_rms_norm, apply_rope and swiglu to torch.compile'd versions (on=False:
    the eager ones); returns whether they were compiled before. Eager, each is several kernels, each
    a pass over a whole activation; compiled, one fused kernel forward and one backward, the same
    arithmetic. The modules look these names up at call time, so rebinding is the whole switch."""
    global rms_norm, add_rms_norm, apply_rope, swiglu
    was = rms_norm is not _EAGER[0]
    if on and not _COMPILED:
        _COMPILED.extend(torch.compile(fn) for fn in _EAGER)
    rms_norm, add_rms_norm, apply_rope, swiglu = _COMPILED if on else _EAGER
    return was


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        D = config.hidden_size
        self.q_proj = nn.Linear(D, self.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hd, D, bias=False)

    def forward(self, x, cos, sin, cache=None, layer_idx=0, attn_mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd)                # [B,T,H*hd] -> [B,T,H,hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)                  # [B,T,KV,hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # [B,KV,T,hd]
        # RoPE while q and k are laid out [B,T,H,hd], as flash attention reads them: on the
        # transposed views a compiled RoPE would write new layouts, each copied back.
        cos, sin = cos.to(x.dtype)[:, :, None], sin.to(x.dtype)[:, :, None]  # [B|1,T,hd] -> [B|1,T,1,hd]
        q, k = apply_rope(q, k, cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                          # [B,H,T,hd], [B,KV,T,hd]
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # all keys so far: [B,KV,pos+T,hd]
        with sdpa_kernel(SDPA_BACKENDS):  # no mask is plain causal; for one query, "see everything"
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                                               enable_gqa=self.n_kv != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)  # [B,H,T,hd] -> [B,T,H*hd]
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, layer_idx=0, attn_mask=None):
        a = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer_idx, attn_mask)
        norm = self.post_attention_layernorm
        x, h = add_rms_norm(x, a, norm.weight, norm.eps)  # x + a, and its norm
        return x + self.mlp(h)


class KVCache:
    """Preallocated keys and values, [L, B, KV, max_len, hd] each; positions [0, pos) are filled."""

    def __init__(self, config: LlamaConfig, batch_size, max_len, dtype=torch.float32, device="cpu"):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k, self.v = (torch.zeros(shape, dtype=dtype, device=device) for _ in "kv")
        self.batch_size, self.max_len, self.pos = batch_size, max_len, 0

    def update(self, layer_idx, k, v):
        """Write k, v [B,KV,T,hd] at [pos, pos+T) of layer `layer_idx`; return [B,KV,pos+T,hd]."""
        end = self.pos + k.shape[2]
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._inv_freq = None  # not a buffer: made on first use, so a meta build needs no fixing

    def rope(self, positions):
        """positions [B,T] or [T] -> (cos, sin), each [B or 1, T, head_dim] in fp32."""
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            hd = self.config.head_dim  # computed on the CPU, as transformers does
            inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
            self._inv_freq = inv_freq.to(positions.device)
        freqs = positions.reshape(-1, positions.shape[-1], 1).float() * self._inv_freq  # [B|1,T,1] -> [B|1,T,hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B|1,T,hd]: the rotate_half layout
        return emb.cos(), emb.sin()

    def forward(self, input_ids=None, inputs_embeds=None, cache=None, positions=None, attn_mask=None,
                last_only=False, logits_at=None):
        """-> logits [B,T,V] in the model dtype; last_only: [B,1,V] (generation's next token);
        logits_at, flat indices b*T + t of N positions: [N,V] (training's supervised positions)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        start = 0 if cache is None else cache.pos
        if cache is not None and (cache.batch_size != B or start + T > cache.max_len):
            raise ValueError(f"a KV cache of batch size {cache.batch_size} and {cache.max_len} positions "
                             f"cannot take batch size {B} and {T} more after {start}")
        mask, positions = self._mask(attn_mask, positions, B, T, start, x.device)
        cos, sin = self.rope(positions.to(x.device))
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.pos = start + T
        if last_only:
            x = x[:, -1:]  # [B,T,D] -> [B,1,D]
        elif logits_at is not None:
            x = x.reshape(B * T, -1).index_select(0, logits_at)  # [B,T,D] -> [B*T,D] -> [N,D]
        return self.lm_head(self.norm(x))

    @staticmethod
    def _mask(attn_mask, positions, B, T, start, device):
        """-> (SDPA mask or None for plain causal, positions). A bool attn_mask [B, T_kv] marks the
        real tokens of a left-padded batch: it joins the causal rule, positions count the real
        tokens before each one (as HF generate), and every query sees itself, so an all-padding
        row never turns into NaN. [B, T, T_kv] is used as given (True = may attend)."""
        T_kv = start + T
        q = torch.arange(start, T_kv, device=device)  # [T]: the queries' positions
        k = torch.arange(T_kv, device=device)[None]  # [1,T_kv]
        if attn_mask is None:  # plain causal, but a chunk after cached tokens needs the offset
            mask = (k <= q[:, None])[None, None] if start > 0 and T > 1 else None  # [1,1,T,T_kv]
        elif attn_mask.dim() == 2 and tuple(attn_mask.shape) == (B, T_kv):
            real = attn_mask.to(device=device, dtype=torch.bool)  # [B,T_kv]
            if positions is None:  # number the real tokens 0, 1, 2, ... across the left padding
                positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # [B,T]
            mask = ((k <= q[:, None]) & real[:, None] | (k == q[:, None]))[:, None]  # [B,T,T_kv] -> [B,1,T,T_kv]
        elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (B, T, T_kv):
            mask = attn_mask.to(device=device, dtype=torch.bool)[:, None]  # [B,1,T,T_kv]: all heads
        else:
            raise ValueError(f"attn_mask is {list(attn_mask.shape)}, expected [B, T_kv] = [{B}, {T_kv}] "
                             f"(padding) or [B, T_q, T_kv] = [{B}, {T}, {T_kv}]")
        return mask, q if positions is None else positions

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """A transformers LlamaForCausalLM directory (config.json + safetensors) or Hub name."""
        path = fetch(path)
        with torch.device("meta"):
            model = cls(read_json(path / "config.json", "LLaMA config", LlamaConfig.from_hf))
        return assign_weights(model, read_weights(path), path, dtype, device, part="llm.")


# -----------------------------------------------------------------------------------------------
# tokenizer

# Protobuf merges a repeated message field into the first, so appending "field 3 (normalizer_spec)
# = {field 3 (add_dummy_prefix) = false}" to a serialized ModelProto switches the dummy prefix off.
# 0x1a = field 3, length-delimited; 0x02 = 2 bytes follow; 0x18 = field 3, varint; 0x00 = false.
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


class Tokenizer:
    """The LLaMA sentencepiece tokenizer with LLaVA's <image> and <pad>, without transformers.

    Ids equal transformers' LlamaTokenizer's, called as the LLaVA pipeline calls it: BOS once, each
    `<image>`-separated chunk its own call. Within a call HF splits the text on `</s>` (-> EOS),
    turns spaces into "▁" and prepends one "▁" to the first piece unless it starts with one; a
    piece after `</s>` gets that "▁" only with legacy=True ("</s>▁USER" vs "</s>USER"); then BPE
    with byte fallback. Sentencepiece's own dummy prefix would always prepend (" hi" -> "▁▁hi")
    and never skip, so a second copy of the model runs without it and we prepend ourselves.
    `legacy` is the rule the weights were trained with, from tokenizer_config.json; where it is not
    said, legacy (the released LLaVA-1.5 was trained with transformers 4.31's slow tokenizer).
    decode drops special and unknown ids, joins byte-fallback pieces into UTF-8 (invalid bytes ->
    U+FFFD) and strips the leading space the encoder added, as HF does."""

    def __init__(self, path, legacy=None):
        path = Path(path)
        model_file = path / "tokenizer.model" if path.is_dir() else path
        if not model_file.is_file():
            raise WeightsError(f"no sentencepiece tokenizer.model at {model_file}; pass the model "
                               f"directory (it must hold tokenizer.model) or the file itself")
        try:
            self.sp = sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except Exception as e:  # OSError or RuntimeError, by sentencepiece version
            raise WeightsError(f"{model_file} is not a sentencepiece model ({e})") from None
        self.sp_no_prefix = spm.SentencePieceProcessor(model_proto=sp.serialized_model_proto() + _NO_DUMMY_PREFIX)
        self.bos_id, self.eos_id, self.unk_id = sp.bos_id(), sp.eos_id(), sp.unk_id()
        files = model_file.with_name("tokenizer_config.json"), model_file.with_name("added_tokens.json")
        config, added = (read_json(f, f.name) if f.is_file() else {} for f in files)
        self.legacy = bool(config.get("legacy", True) if legacy is None else legacy)
        # the tokens added on top of the vocabulary (llava-hf: <image> 32000, <pad> 32001)
        added = {str(k): int(v) for k, v in added.items()}
        for i, tok in (config.get("added_tokens_decoder") or {}).items():
            added.setdefault(tok["content"] if isinstance(tok, dict) else str(tok), int(i))
        n = sp.vocab_size()
        self.image_token_id, self.pad_id = added.get("<image>", n), added.get("<pad>", n + 1)
        self.vocab_size = max([n, self.image_token_id + 1, self.pad_id + 1, *(i + 1 for i in added.values())])
        self._bytes = [b"" if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
                       else bytes([int(sp.id_to_piece(i)[1:-1], 16)]) if sp.is_byte(i)  # "<0x0A>" -> b"\n"
                       else sp.id_to_piece(i).replace("▁", " ").encode("utf-8") for i in range(n)]

    def encode(self, text, bos=True):
        """text -> ids: `<image>` -> image_token_id, `</s>` -> eos_id, BOS once at the start."""
        ids = [self.bos_id] if bos else []
        for i, chunk in enumerate(text.split("<image>")):
            ids += [self.image_token_id] if i else []
            for j, piece in enumerate(chunk.split("</s>")):
                ids += [self.eos_id] if j else []
                if piece and (j == 0 or self.legacy) and not piece.startswith((" ", "▁")):
                    piece = " " + piece  # HF's Metaspace prepend_scheme "first"
                ids += self.sp_no_prefix.encode(piece)
        return ids

    def id_bytes(self, i):
        """The UTF-8 bytes one id contributes to decoded text (b"" for special ids)."""
        i = int(i)
        return self._bytes[i] if 0 <= i < len(self._bytes) else b""

    def decode_stream(self, ids):
        """Yield decoded text piece by piece; never a partial multi-byte character."""
        stream = StreamDecoder(self)
        yield from filter(None, (stream.push(i) for i in ids))
        if text := stream.flush():
            yield text

    def decode(self, ids):
        return "".join(self.decode_stream(ids.tolist() if hasattr(ids, "tolist") else ids))


class StreamDecoder:
    """push(id) -> the text that became complete (maybe ""), flush() -> the rest: the bytes of a
    character split over byte-fallback pieces (emoji, CJK) wait until it is whole."""

    def __init__(self, tokenizer):
        self.tokenizer, self._started = tokenizer, False
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _emit(self, text):
        if text and not self._started:  # drop the space sentencepiece put before the first word
            self._started, text = True, text.removeprefix(" ")
        return text

    def push(self, token_id):
        return self._emit(self._utf8.decode(self.tokenizer.id_bytes(token_id)))

    def flush(self):
        return self._emit(self._utf8.decode(b"", final=True))
