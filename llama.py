"""
LLaMA / Vicuna: the language half of LLaVA, written out in plain PyTorch, plus its tokenizer.

The decoder (Touvron et al. 2023) is a stack of pre-norm blocks:

    x = x + attn(rmsnorm(x))        attention with rotary positions (RoPE), causal
    x = x + mlp(rmsnorm(x))         SwiGLU: down(silu(gate(x)) * up(x))

then a final RMSNorm and a linear head to vocabulary logits. Module names mirror the Hugging
Face checkpoint keys (`model.layers.3.self_attn.q_proj.weight` is our
`layers.3.self_attn.q_proj.weight`); weights.LAYOUT maps the files' prefixes.

Numerics follow transformers' LlamaForCausalLM operation by operation, because we are measured
against it:
- RMSNorm upcasts to fp32, normalises, casts back to the input dtype and only then multiplies by
  the weight (`weight * x.to(dtype)`), exactly HF's order.
- RoPE: inv_freq = 1 / theta ** (arange(0, d, 2) / d) in fp32 on the CPU, angles
  positions * inv_freq in fp32, emb = cat(freqs, freqs), cos/sin in fp32, cast to the
  activation dtype right before use. HF's elementwise product here equals the older
  "fp32 matmul with inner dim 1" bit for bit.
- rotate_half vs interleaved: Meta's original code rotates adjacent pairs (x0,x1), (x2,x3), ...
  as complex numbers. HF's conversion script permuted the rows of q_proj/k_proj so that the
  same rotation becomes "pair x_i with x_{i+d/2}", i.e. x*cos + rotate_half(x)*sin with
  rotate_half(x) = cat(-x2, x1). Every HF-format checkpoint (Vicuna, llava-hf) carries permuted
  weights, so we must use rotate_half; Meta's consolidated.pth weights would need that
  permutation first (we only read HF-format safetensors).
- GQA (grouped-query attention): num_key_value_heads KV <= num_attention_heads H, and query head
  j reads kv head j // (H / KV). SDPA's enable_gqa does exactly that without copying K/V.
  LLaMA-1/2-7B and Vicuna have KV == H; the path exists for LLaMA-2-70B-style configs.
- Attention is F.scaled_dot_product_attention everywhere. Training (no cache, no mask) uses
  is_causal=True so the flash kernels run; right padding needs no mask (real tokens never look
  right).

KV cache (gpt-fast style): `KVCache` preallocates k/v buffers [L, B, KV, max_len, hd] once, so
decoding never reallocates. A forward with a cache writes the new keys/values at
[cache.pos, cache.pos + T) and attends over [0, cache.pos + T); then cache.pos advances by T.
Prefill is a forward of the whole prompt, decode a forward of one token.

Masks: `attn_mask` is optional. A 2-D bool [B, T_kv] mask marks real tokens (left-padded
batches); it is combined with the causal rule, positions default to the count of real tokens
before each one (as HF generate does), and every query may always see itself so an all-padding
row never turns into NaN. A 3-D bool [B, T_q, T_kv] mask is used as given (True = may attend).

Loading is weights.py's one path (meta build, names mapped by weights.LAYOUT, assign); nothing
needs recomputing after the meta build: inv_freq is computed lazily on first use.

Tokenizer: sentencepiece only (no transformers at runtime). See `Tokenizer` for how its ids match
HF's LlamaTokenizer (legacy=False) and the official LLaVA per-chunk tokenization exactly.
"""

import codecs
import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from weights import WeightsError, assign_weights, fetch, read_config, read_json, read_weights

# -----------------------------------------------------------------------------------------------
# config


@dataclass
class LlamaConfig:
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
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")

    # What transformers' LlamaConfig assumes for a field a config.json leaves out (transformers 5
    # configuration_llama.py; rope_theta is RotaryEmbeddingConfigMixin.default_theta).
    HF_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6,
                       rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False)

    @classmethod
    def from_hf(cls, d):
        """A transformers LlamaConfig dict (config.json or a llava-hf text_config), possibly
        sparse. rope_theta is top-level (transformers 4) or in rope_parameters (transformers 5)."""
        d = dict(d or {})
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type is {d['model_type']!r}, not 'llama'")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not supported (only plain RoPE)")
        for key, plain in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if d.get(key, plain) != plain:
                raise ValueError(f"{key}={d[key]!r} is not supported (LLaMA uses {plain!r})")
        values = {k: d.get(k, v) for k, v in cls.HF_DEFAULTS.items()}
        values["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", cls.HF_DEFAULTS["rope_theta"])))
        values["num_key_value_heads"] = d.get("num_key_value_heads")
        values["head_dim"] = d.get("head_dim")
        return cls(**values)

    def to_hf(self):
        """The config.json dict transformers 4 and 5 both read (5 moves rope_theta itself)."""
        d = asdict(self)
        d.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                 bos_token_id=1, eos_token_id=2, attention_bias=False, mlp_bias=False)
        return d


# -----------------------------------------------------------------------------------------------
# the model

# The SDPA kernels we allow. torch >= 2.5 on Hopper tries cuDNN attention first, and cuDNN builds
# an execution plan for every new shape (tenths of a second each): every decoding step (the key
# length grows by one) and every new padded batch length in training would pay it. Flash and
# memory-efficient attention need no plan, so we leave cuDNN out. None = torch's own choice.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)

    def after_add(self, x, delta):
        """(x + delta, self(x + delta)), as one fused function (see add_rms_norm)."""
        return add_rms_norm(x, delta, self.weight, self.eps)


def rope_inv_freq(head_dim, theta):
    """[head_dim/2] fp32 inverse frequencies, computed on the CPU as transformers does."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)  # [..., hd] -> two [..., hd/2]
    return torch.cat((-x2, x1), dim=-1)


# ---- the elementwise pieces of a block, as plain functions of tensors (see compile_elementwise)

def rms_norm(x, weight, eps: float):
    dtype = x.dtype
    x = x.float()  # the mean of squares in bf16 would lose the small activations
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)  # HF order: cast back first, then scale


_rms_norm = rms_norm  # the eager function, which compile_elementwise does not rebind


def add_rms_norm(x, delta, weight, eps: float):
    """(x + delta, rms_norm(x + delta)): a block's residual add and the norm that reads its sum.
    Compiled as one function, the sum is read once instead of written and read back, and in
    backward the two gradients that meet at the sum are added in the same kernel."""
    x = x + delta
    return x, _rms_norm(x, weight, eps)


def apply_rope(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def swiglu(gate, up):
    return F.silu(gate) * up


_EAGER = (rms_norm, add_rms_norm, apply_rope, swiglu)
_COMPILED = []


def compile_elementwise(on=True):
    """Rebind rms_norm, add_rms_norm, apply_rope and swiglu to torch.compile'd versions
    (on=False: the eager ones again). Returns whether they were compiled before, so a caller can
    put things back.

    Why: in a bf16 training step each of these is several kernels, each reading and writing a
    whole activation (RMSNorm: upcast, square, mean, rsqrt, multiply, downcast, scale; RoPE: two
    products, a negation, a concatenation and a sum per tensor), forward and backward again:
    on a GPU such passes over memory can cost more time than the matrix products. Compiled,
    each function is one fused kernel forward and one backward, with the same arithmetic; the
    residual add joins the norm after it (add_rms_norm) for the same reason. The modules call these
    names as module globals at call time, so rebinding them here is the whole switch; the
    arithmetic is the eager code's. train.py turns it on for CUDA (--compile-elementwise auto)
    and back off when it returns; on a CPU inductor's C++ build costs more than it saves at
    tiny sizes, and decoding compiles its whole step instead (LLaVA.compile_decode)."""
    global rms_norm, add_rms_norm, apply_rope, swiglu
    was = rms_norm is not _EAGER[0]
    if on and not _COMPILED:
        _COMPILED.extend(torch.compile(fn) for fn in _EAGER)
    rms_norm, add_rms_norm, apply_rope, swiglu = _COMPILED if on else _EAGER
    return was


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
        # RoPE before the heads move forward, so q and k stay laid out [B,T,H,hd] in memory, as
        # flash attention reads them: applied to the [B,H,T,hd] views, the compiled RoPE would
        # write new layouts, and each would be copied back (the math does not care about layout).
        cos, sin = cos.to(x.dtype)[:, :, None], sin.to(x.dtype)[:, :, None]  # [B|1,T,hd] -> [B|1,T,1,hd]
        q, k = apply_rope(q, k, cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                          # [B,H,T,hd], [B,KV,T,hd]
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # all keys so far: [B,KV,pos+T,hd]
        # attn_mask None means plain causal; with T_q == 1 (decoding) that is "see everything".
        with sdpa_kernel(SDPA_BACKENDS) if SDPA_BACKENDS else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                enable_gqa=self.n_kv != self.n_head)  # query head j uses kv head j // (H/KV)
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
        x, h = self.post_attention_layernorm.after_add(x, a)  # x + a, and its norm
        return x + self.mlp(h)


class KVCache:
    """Preallocated keys and values for every layer: [L, B, KV, max_len, hd] each.
    `pos` is how many positions are filled; Llama.forward advances it after each call."""

    def __init__(self, config: LlamaConfig, batch_size, max_len, dtype=torch.float32, device="cpu"):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch_size, self.max_len, self.pos = batch_size, max_len, 0

    def update(self, layer_idx, k, v):
        """Write k, v [B,KV,T,hd] at [pos, pos+T) of layer `layer_idx`; return [B,KV,pos+T,hd]."""
        end = self.pos + k.shape[2]
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def reset(self):
        self.pos = 0


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
        self._inv_freq = None  # not a buffer: derived from the config, made on first use

    def rope(self, positions):
        """positions [B,T] or [T] -> (cos, sin), each [B or 1, T, head_dim] in fp32."""
        if positions.dim() == 1:
            positions = positions[None]  # [T] -> [1,T]
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta).to(positions.device)
        freqs = positions[..., None].float() * self._inv_freq  # [B,T,1] * [hd/2] -> [B,T,hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)                 # [B,T,hd]: the rotate_half layout
        return emb.cos(), emb.sin()

    def forward(self, input_ids=None, inputs_embeds=None, cache=None, positions=None, attn_mask=None,
                last_only=False, logits_at=None):
        """-> logits [B,T,V] in the model dtype. The LM head can run on fewer positions: last_only
        gives [B,1,V], the next-token logits that generation needs; logits_at, flat indices b*T + t
        of N positions, gives [N,V] (training: the positions whose next token is supervised, see
        model.supervised_positions). See the module docstring for cache and masks."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        start = 0
        if cache is not None:
            start = cache.pos
            if cache.batch_size != B:
                raise ValueError(f"KV cache holds batch size {cache.batch_size}, the input has {B}")
            if start + T > cache.max_len:
                raise ValueError(f"KV cache of {cache.max_len} positions cannot take {T} more after {start}")
        T_kv = start + T

        mask = None
        if attn_mask is not None:
            attn_mask = attn_mask.to(device=x.device, dtype=torch.bool)
            if attn_mask.dim() == 2:  # key padding [B,T_kv]: True = a real token
                if tuple(attn_mask.shape) != (B, T_kv):
                    raise ValueError(f"attn_mask is {list(attn_mask.shape)}, expected [B, T_kv] = [{B}, {T_kv}]")
                if positions is None:  # number real tokens 0, 1, 2, ... across the left padding
                    positions = (attn_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # [B,T]
                causal = self._causal(T, T_kv, start, x.device)                   # [T,T_kv]
                mask = causal[None] & attn_mask[:, None, :]                        # [B,T,T_kv]
                mask = mask | self._diagonal(T, T_kv, start, x.device)[None]       # a pad sees itself
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (B, T, T_kv):
                    raise ValueError(f"attn_mask is {list(attn_mask.shape)}, expected [B, T_q, T_kv] = [{B}, {T}, {T_kv}]")
                mask = attn_mask
            else:
                raise ValueError("attn_mask must be [B, T_kv] (padding) or [B, T_q, T_kv]")
            mask = mask[:, None]  # [B,T,T_kv] -> [B,1,T,T_kv], shared by all heads
        elif start > 0 and T > 1:  # a chunk after cached tokens: causal, offset by `start`
            mask = self._causal(T, T_kv, start, x.device)[None, None]  # [1,1,T,T_kv]

        if positions is None:
            positions = torch.arange(start, T_kv, device=x.device)  # [T]
        cos, sin = self.rope(positions.to(x.device))
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # once here, not in every layer (HF's cast)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.pos = T_kv
        if last_only:
            x = x[:, -1:]  # [B,T,D] -> [B,1,D]
        elif logits_at is not None:
            x = x.reshape(B * T, -1).index_select(0, logits_at)  # [B,T,D] -> [B*T,D] -> [N,D]
        return self.lm_head(self.norm(x))

    @staticmethod
    def _causal(T, T_kv, start, device):
        """[T,T_kv] bool: query i (at position start+i) may see keys 0..start+i."""
        q = torch.arange(start, T_kv, device=device)[:, None]
        return torch.arange(T_kv, device=device)[None] <= q

    @staticmethod
    def _diagonal(T, T_kv, start, device):
        q = torch.arange(start, T_kv, device=device)[:, None]
        return torch.arange(T_kv, device=device)[None] == q

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """A transformers LlamaForCausalLM directory (config.json + safetensors) or Hub name."""
        path = fetch(path)
        with torch.device("meta"):
            model = cls(read_config(path, LlamaConfig.from_hf, "LLaMA config"))
        return assign_weights(model, read_weights(path), path, dtype, device, part="llm.")


# -----------------------------------------------------------------------------------------------
# tokenizer

# Protobuf merges a repeated occurrence of a message field into the first one, so appending
# "field 3 (normalizer_spec) = {field 3 (add_dummy_prefix) = false}" to a serialized
# sentencepiece ModelProto yields the same model with add_dummy_prefix switched off. Bytes:
# 0x1a = field 3, length-delimited; 0x02 = 2 bytes follow; 0x18 = field 3, varint; 0x00 = false.
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


class Tokenizer:
    """The LLaMA sentencepiece tokenizer with LLaVA's two extra tokens, without transformers.

    Ids match transformers' LlamaTokenizer called the way the LLaVA pipeline calls it: BOS
    once, then every `<image>`-separated chunk tokenized as its own call. Within a call, HF does:
      - split the text on special tokens; here only `</s>` (-> eos_id) can appear;
      - the first piece: spaces -> "▁", and one "▁" prepended unless it already starts with one;
      - a piece after `</s>`: the same with `legacy=True`; with `legacy=False`, nothing prepended
        (so a second Vicuna turn reads "</s>▁USER" in legacy mode and "</s>USER" without);
      - then BPE with byte fallback.
    Plain sentencepiece with add_dummy_prefix would always prepend "▁" (so " hi" -> "▁▁hi",
    where HF gives "▁hi") and cannot skip it after `</s>`. So we load a second copy of the model
    with add_dummy_prefix off (see _NO_DUMMY_PREFIX) and do the prepending ourselves.

    `legacy` is how the weights were trained: the released LLaVA-1.5 with transformers 4.31's
    slow tokenizer, whose rule was legacy, and today's official code with `legacy=False`. It is
    read from the directory's tokenizer_config.json; one that does not say is taken as legacy,
    the rule of the transformers those checkpoints were made with (transformers 5 would assume
    False). LLaVA.save_pretrained writes it into every directory it saves.

    decode drops bos/eos/unk/pad/image and any id outside the vocabulary, turns "▁" into
    spaces, joins byte-fallback pieces into UTF-8 and strips the one leading space the encoder
    added (as HF's decoder does). Invalid UTF-8 becomes U+FFFD (Python's rule; HF writes one
    U+FFFD per byte of an invalid run: only garbage output can tell them apart).
    """

    def __init__(self, path, legacy=None):
        path = Path(path)
        model_file = path / "tokenizer.model" if path.is_dir() else path
        if not model_file.is_file():
            raise WeightsError(f"no sentencepiece tokenizer.model at {model_file}; pass the model "
                               f"directory (it must hold tokenizer.model) or the file itself")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError for a bad file
            raise WeightsError(f"{model_file} is not a sentencepiece model ({e})") from None
        self.sp_no_prefix = spm.SentencePieceProcessor(model_proto=self.sp.serialized_model_proto() + _NO_DUMMY_PREFIX)
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        config_file = model_file.parent / "tokenizer_config.json"
        config = read_json(config_file, "tokenizer config") if config_file.is_file() else {}
        self.legacy = bool(config.get("legacy", True)) if legacy is None else bool(legacy)
        n = self.sp.vocab_size()
        added = _added_tokens(model_file.parent, config)
        self.image_token_id = added.get("<image>", n)
        self.pad_id = added.get("<pad>", n + 1)
        self.vocab_size = max([n, self.image_token_id + 1, self.pad_id + 1, *(i + 1 for i in added.values())])
        # bytes each id decodes to ("▁" -> space, "<0xAB>" -> that byte, special ids -> nothing)
        self._bytes = []
        for i in range(n):
            if self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_unused(i):
                self._bytes.append(b"")
            elif self.sp.is_byte(i):
                self._bytes.append(bytes([int(self.sp.id_to_piece(i)[1:-1], 16)]))  # "<0x0A>" -> b"\n"
            else:
                self._bytes.append(self.sp.id_to_piece(i).replace("▁", " ").encode("utf-8"))

    def _encode_piece(self, text, first):
        if not text:
            return []
        if first and not text.startswith((" ", "▁")):
            text = " " + text  # HF Metaspace prepend_scheme "first"
        return self.sp_no_prefix.encode(text)

    def encode(self, text, bos=True):
        """text -> ids: `<image>` -> image_token_id, `</s>` -> eos_id, BOS once at the start."""
        ids = [self.bos_id] if bos else []
        for i, chunk in enumerate(text.split("<image>")):
            if i:
                ids.append(self.image_token_id)
            for j, piece in enumerate(chunk.split("</s>")):
                if j:
                    ids.append(self.eos_id)
                ids += self._encode_piece(piece, first=j == 0 or self.legacy)
        return ids

    def id_bytes(self, i):
        """The UTF-8 bytes one id contributes to decoded text (b"" for special ids)."""
        i = int(i)
        return self._bytes[i] if 0 <= i < len(self._bytes) else b""

    def decode_stream(self, ids):
        """Yield decoded text piece by piece; never a partial multi-byte character."""
        stream = StreamDecoder(self)
        for i in ids:
            text = stream.push(i)
            if text:
                yield text
        text = stream.flush()
        if text:
            yield text

    def decode(self, ids):
        if hasattr(ids, "tolist"):  # a tensor
            ids = ids.tolist()
        return "".join(self.decode_stream(ids))

    def __len__(self):
        return self.vocab_size


class StreamDecoder:
    """Incremental decoding for streaming generation: push(id) returns the text that became
    complete (maybe ""), flush() the rest. Bytes of a character split over several byte-fallback
    pieces (emoji, CJK) are held until the character is whole."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False

    def _emit(self, text):
        if text and not self._started:
            self._started = True
            if text[0] == " ":  # the space sentencepiece put in front of the first word
                text = text[1:]
        return text

    def push(self, token_id):
        return self._emit(self._utf8.decode(self.tokenizer.id_bytes(token_id)))

    def flush(self):
        return self._emit(self._utf8.decode(b"", final=True))


def _added_tokens(directory, config):
    """{content: id} of the tokens added on top of the sentencepiece vocabulary (llava-hf:
    <image> 32000, <pad> 32001), from added_tokens.json or the tokenizer config."""
    added = {}
    if (directory / "added_tokens.json").is_file():
        added.update({str(k): int(v) for k, v in read_json(directory / "added_tokens.json", "added tokens").items()})
    for i, tok in (config.get("added_tokens_decoder") or {}).items():
        added.setdefault(tok["content"] if isinstance(tok, dict) else str(tok), int(i))
    return added
