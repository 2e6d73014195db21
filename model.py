"""
LLaVA = a CLIP vision tower + a projector + a LLaMA/Vicuna language model.

    image [B,3,S,S] ──► CLIPVision ──► hidden_states[-2] [B,1+P,Dv] ──► drop CLS [B,P,Dv]
                                                                             │
                                                    projector (linear | Linear-GELU-Linear)
                                                                             ▼
    "USER: <image>×P\\nWhat is this? ASSISTANT:"  ──► embed_tokens ──► [B,T,D] ◄── scatter [B,P,D]
                                                                             │
                                                               Llama decoder ▼ logits [B,T,V]

The prompt already holds one `<image>` id per patch (as llava-hf's processor writes it), so splicing
the image in is a masked scatter: positions run 0..T-1 straight through the image. Checkpoints are
llava-hf directories, loaded as weights.py describes: config, meta build, one name map, assign.
"""

import argparse
import contextlib
import math
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip import CLIPVision, CLIPVisionConfig
from llama import KVCache, Llama, LlamaConfig, Tokenizer
from weights import assign_weights, fetch, hub_names, read_json, read_weights, save_state_dict
from weights import write_atomic, write_json_atomic


@dataclass
class LLaVAConfig:
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    text: LlamaConfig = field(default_factory=LlamaConfig)
    projector: str = "mlp2x_gelu"          # "linear" (LLaVA v1) | "mlp2x_gelu" (LLaVA-1.5)
    vision_feature_layer: int = -2         # HF hidden_states indexing; the paper ablates -1 vs -2
    vision_feature_select: str = "default"  # "default" drops CLS, "full" keeps it
    image_token_id: int = 32000
    pad_token_id: int = 32001
    pad_to_square: bool = True             # LLaVA-1.5 pads to a square before the CLIP crop
    template: str = "vicuna_v1"            # conversation template the checkpoint was tuned with
    bases: dict = None                     # a stage-1 output: where its vision tower and LLM are

    @property
    def num_patches(self):
        return self.vision.num_patches + (self.vision_feature_select == "full")

    @classmethod
    def from_hf(cls, d):
        """llava-hf config.json -> LLaVAConfig, transformers' defaults filled in (CLIP ViT-L/14 at 336 px)."""
        act, bases = d.get("projector_hidden_act", "gelu"), d.get("nanollava_bases")
        if d.get("model_type") not in (None, "llava") or act not in ("gelu", "linear"):
            raise ValueError(f"model_type {d.get('model_type')!r}, projector_hidden_act {act!r}: "
                             "not a LLaVA we read (llava; gelu or linear)")
        if bases is not None and not (isinstance(bases, dict) and bases.get("vision") and bases.get("llm")):
            raise ValueError("nanollava_bases needs the vision and llm directories")
        text = LlamaConfig.from_hf(d.get("text_config") or {})
        pad = d.get("pad_token_id")  # pads are never attended to nor supervised: any row will do,
        pad = pad if isinstance(pad, int) and 0 <= pad < text.vocab_size else 0  # but one that exists
        vision = {"hidden_size": 1024, "intermediate_size": 4096, "patch_size": 14, "image_size": 336,
                  "num_hidden_layers": 24, "num_attention_heads": 16, **(d.get("vision_config") or {})}
        return cls(vision=CLIPVisionConfig.from_hf(vision), text=text, projector="linear" if act == "linear"
                   else "mlp2x_gelu", vision_feature_layer=d.get("vision_feature_layer", -2),
                   vision_feature_select=d.get("vision_feature_select_strategy", "default"),
                   image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)), pad_token_id=pad,
                   pad_to_square=d.get("image_aspect_ratio", "pad") == "pad",
                   template=d.get("conversation_template", "vicuna_v1"), bases=bases)

    def to_hf(self):
        return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                "vision_config": self.vision.to_hf(), "text_config": self.text.to_hf(),
                "image_token_index": self.image_token_id, "pad_token_id": self.pad_token_id,
                "image_seq_length": self.num_patches, "multimodal_projector_bias": True,
                "projector_hidden_act": "linear" if self.projector == "linear" else "gelu",  # linear_2 = I
                "vision_feature_layer": self.vision_feature_layer, "vision_feature_select_strategy":
                self.vision_feature_select, "tie_word_embeddings": self.text.tie_word_embeddings,
                # ours: transformers ignores these, our loaders read them
                "image_aspect_ratio": "pad" if self.pad_to_square else "square",
                "conversation_template": self.template}


def build_projector(kind, d_vision, d_text):
    """CLIP features -> the LLM's embeddings: one Linear (v1) or Linear-GELU(exact erf)-Linear (v1.5)."""
    if kind not in ("linear", "mlp2x_gelu"):
        raise ValueError(f"unknown projector {kind!r}: choose 'linear' or 'mlp2x_gelu'")
    linear_1 = nn.Linear(d_vision, d_text)  # drawn first, then linear_2: the init the seed has always given
    mlp = {"act": nn.GELU(), "linear_2": nn.Linear(d_text, d_text)} if kind == "mlp2x_gelu" else {}
    return nn.Sequential(OrderedDict(linear_1=linear_1, **mlp))  # transformers' names


class LLaVA(nn.Module):
    def __init__(self, config: LLaVAConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVision(config.vision)
        self.projector = build_projector(config.projector, config.vision.hidden_size, config.text.hidden_size)
        self.llm = Llama(config.text)

    def encode_images(self, pixel_values):
        """[N,3,S,S] -> [N,P,D_text] image tokens for the LLM."""
        feats = self.vision_tower(pixel_values, layer=self.config.vision_feature_layer)  # [N,1+P,Dv]
        return self.projector(feats[:, 1:] if self.config.vision_feature_select == "default" else feats)  # no CLS

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with image features scattered over the `<image>` positions, in
        order: row-major over the batch, patch by patch. Each image must own exactly P ids."""
        embeds = self.llm.embed_tokens(input_ids)  # [B,T,D]
        if pixel_values is None:
            if self.training and torch.is_grad_enabled():  # a sharded projector gathers its weights
                # when it runs, so every rank runs it on every micro-batch: 0 x a dummy's result
                embeds = embeds + 0.0 * self.projector(embeds.new_zeros(1, self.config.vision.hidden_size)).sum()
            return embeds
        feats = self.encode_images(pixel_values)  # [N,P,D]
        is_image, (N, P) = input_ids == self.config.image_token_id, feats.shape[:2]  # [B,T]
        if int(is_image.sum()) != N * P:
            raise ValueError(f"{int(is_image.sum())} <image> ids for {N} image(s) of {P} features: the prompt "
                             f"needs one <image> id ({self.config.image_token_id}) per patch")
        # masked_scatter keeps autograd into both the text embeddings and the projector
        return embeds.masked_scatter(is_image.unsqueeze(-1), feats.to(embeds.dtype))

    def forward(self, input_ids, pixel_values=None, labels=None, logits_at=None):
        """-> (logits [B,T,V], mean next-token loss over labels != -100 or None). Training passes
        logits_at, the supervised positions (supervised_positions), and gets their logits, [K,V]."""
        logits = self.llm(inputs_embeds=self.embed(input_ids, pixel_values), logits_at=logits_at)
        return logits, None if labels is None else next_token_loss(logits, labels)

    @torch.inference_mode()
    def generate(self, input_ids, pixel_values=None, max_new_tokens=256, temperature=0.0, top_p=1.0,
                 generator=None, eos_id=2, attention_mask=None, state=None):
        """Prefill once (image spliced in), then one token at a time through the KV cache, yielding new ids:
        ints for input_ids [T], a [B] tensor a step for [B,T] (image ids expanded; attention_mask [B,T] marks
        a left-padded batch's real tokens). Greedy at temperature 0, else temperature + top-p sampling drawn
        with `generator`. Stops after EOS (yielded; finished rows repeat it), max_new_tokens or a full context.
        `state` (GenerationState, batch 1) carries a conversation: given back, input_ids are the new turn."""
        single, dev = input_ids.dim() == 1, self.llm.embed_tokens.weight.device
        ids = (input_ids[None] if single else input_ids).to(dev)  # [B,T]
        cache, start, ids, max_new = self._context(ids, state, pixel_values, attention_mask, max_new_tokens)
        B, T = ids.shape
        keep = torch.ones(B, cache.max_len, dtype=torch.bool, device=dev)  # the slots of real tokens
        if attention_mask is not None:
            keep[:, :T] = attention_mask.to(device=dev, dtype=torch.bool)
        mask_to = lambda end: None if attention_mask is None else keep[:, :end]  # noqa: E731

        embeds = self.embed(ids, None if pixel_values is None else pixel_values.to(dev))
        logits = self.llm(inputs_embeds=embeds, cache=cache, attn_mask=mask_to(start + T), last_only=True)[:, -1]
        if state is not None:  # only now: a failed prefill leaves the conversation as it was
            state.cache = cache
            state.tokens += ids[0, len(state.tokens) - start:].tolist()
        static = getattr(self, "_static_step", None)  # it tracks slot [1] and RoPE position [B,1] as tensors:
        pos, n_real = torch.tensor([cache.pos], device=dev), keep[:, :cache.pos].sum(-1, keepdim=True)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        for i in range(max_new):
            nxt = sample_next(logits, temperature, top_p, generator)  # [B]
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)  # finished rows keep repeating EOS
                done = done | (nxt == eos_id)
            if state is not None:
                state.tokens.append(int(nxt[0]))
            yield int(nxt[0]) if single else nxt
            if i + 1 == max_new or (eos_id is not None and bool(done.all())):  # the one host sync a step
                break
            if static is not None:
                logits = static(self.llm, *_layer_views(cache), nxt, pos, n_real, keep)
                cache.pos += 1
                pos += 1  # in place: the compiled step reads the same tensors every time
                n_real += 1
            else:
                logits = self.llm(nxt[:, None], cache=cache, attn_mask=mask_to(cache.pos + 1), last_only=True)[:, -1]

    def _context(self, ids, state, pixel_values, attention_mask, max_new_tokens):
        """-> (a KVCache with room for what is fed + the new tokens, its start, ids to feed, how many new fit).
        A follow-up turn continues the conversation's cache (grown once if need be) after its last position:
        the last sampled token was never fed. Sizes round up to 256: the compiled step recompiles for each."""
        cache, start, what = None, 0, "the prompt"
        if state is not None and state.cache is not None:
            if ids.shape[0] != 1 or attention_mask is not None:
                raise ValueError("a conversation state continues one unpadded sequence (batch 1)")
            if pixel_values is not None:
                raise ValueError("this conversation already holds its image: start a new GenerationState")
            cache, start, what = state.cache, state.cache.pos, "the conversation with this message"
            unfed = torch.tensor(state.tokens[start:], dtype=ids.dtype, device=ids.device)
            ids = torch.cat([unfed[None], ids], 1)
        fed, ctx = start + ids.shape[1], self.config.text.max_position_embeddings
        if fed > ctx:
            raise ContextLengthError(f"{what} is {fed} tokens, longer than the model's context of {ctx} tokens "
                                     "(max_position_embeddings)")
        max_new = min(max_new_tokens, ctx - fed + 1)  # the last new token is never fed
        need = fed + max(max_new - 1, 0)
        if cache is None or cache.max_len < need:
            old, w = cache, self.llm.embed_tokens.weight
            cache = KVCache(self.config.text, ids.shape[0], min(ctx, -(-need // 256) * 256), w.dtype, w.device)
            if old is not None:  # growing copies once per turn
                cache.k[..., :start, :], cache.v[..., :start, :] = old.k[..., :start, :], old.v[..., :start, :]
                cache.pos = start
        return cache, start, ids, max_new

    def generate_batch(self, prompts, pixel_values=None, max_new_tokens=256, eos_id=2, **sampling):
        """Prompts (id lists, image ids expanded) left-padded into one batch -> each one's new ids, cut before
        EOS. pixel_values [N,3,S,S]: the images of the prompts that have one, in order; `sampling`: generate's."""
        B, T = len(prompts), max(len(p) for p in prompts)
        ids, mask = torch.full((B, T), self.config.pad_token_id), torch.zeros(B, T, dtype=torch.bool)
        for b, p in enumerate(prompts):
            ids[b, T - len(p):], mask[b, T - len(p):] = torch.as_tensor(p, dtype=torch.long), True
        steps = list(self.generate(ids, pixel_values, max_new_tokens, eos_id=eos_id, attention_mask=mask, **sampling))
        rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in prompts]  # one transfer at the end
        return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]

    def compile_decode(self, compile=True):
        """Decode with a static-shape step (keys written at a tensor slot, attention over the whole cache
        under a mask) under torch.compile ("reduce-overhead": a CUDA graph); compile=False: eager."""
        step = _static_decode_step
        self._static_step = torch.compile(step, mode="reduce-overhead", fullgraph=True) if compile else step

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """A llava-hf directory (the Hub's, transformers', ours) or Hub name. A stage-1 output
        holds the projector alone and names its bases (`nanollava_bases`), loaded first."""
        path = fetch(path)
        config, state = read_json(path / "config.json", "LLaVA config", LLaVAConfig.from_hf), read_weights(path)
        keys = [f"projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]
        if config.projector == "linear" and all(k in state for k in keys):  # else assign_weights refuses
            # transformers' "linear" is linear_2(linear_1(x)), ours one Linear: fold (exact for the I we save)
            w1, b1, w2, b2 = (state.pop(k).float() for k in keys)
            state[keys[0]], state[keys[1]] = w2 @ w1, w2 @ b1 + b2  # assign_weights casts to dtype
        if config.bases:
            model = cls.from_components(config.bases["vision"], config.bases["llm"], config.projector, dtype,
                                        device, config.vision_feature_layer, config.pad_to_square)
            model.config.template = config.template
            assign_weights(model.projector, state, path, dtype, device, part="projector.")
        else:
            with torch.device("meta"):
                model = cls(config)
            assign_weights(model, state, path, dtype, device)
        if not config.bases or (path / "tokenizer.model").exists():
            model.tokenizer_dir = path
        return model

    @classmethod
    def from_components(cls, clip_path, llm_path, projector="mlp2x_gelu", dtype=torch.float32,
                        device="cpu", vision_feature_layer=-2, pad_to_square=None, seed=0):
        """Start stage 1: a pretrained CLIP and LLaMA/Vicuna, a fresh projector, and the vocabulary extended
        the llava-hf way (<image> = V, <pad> = V+1, up to a multiple of 64; new rows: the old rows' mean)."""
        vision, llm_path = CLIPVision.from_pretrained(clip_path, dtype, device), fetch(llm_path)
        llm, tokenizer = Llama.from_pretrained(llm_path, dtype, device), Tokenizer(llm_path)
        old, new = llm.config.vocab_size, -(-max(llm.config.vocab_size, tokenizer.pad_id + 1) // 64) * 64
        for mod in (llm.embed_tokens, llm.lm_head) if new != old else ():
            w = mod.weight.data
            grown = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype).expand(new - old, -1)], 0)
            mod.weight = nn.Parameter(grown, requires_grad=mod.weight.requires_grad)
        llm.embed_tokens.num_embeddings = llm.lm_head.out_features = llm.config.vocab_size = new
        if llm.config.tie_word_embeddings:
            llm.lm_head.weight = llm.embed_tokens.weight
        config = LLaVAConfig(
            vision=vision.config, text=llm.config, projector=projector, vision_feature_layer=vision_feature_layer,
            image_token_id=tokenizer.image_token_id, pad_token_id=tokenizer.pad_id,
            pad_to_square=(projector == "mlp2x_gelu") if pad_to_square is None else pad_to_square)
        with torch.device("meta"):
            model = cls(config)
        model.vision_tower, model.llm, model.tokenizer_dir = vision, llm, Path(llm_path)
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init, drawn from `seed` alone
            torch.manual_seed(seed)
            model.projector = build_projector(projector, vision.config.hidden_size, llm.config.hidden_size)
        model.projector.to(device=device, dtype=dtype)
        return model

    def save_pretrained(self, directory, bases=None, state=None):
        """A llava-hf directory: config.json, safetensors under the Hub's names, tokenizer files. `bases`
        {"vision": dir, "llm": dir} (stage 1): the projector alone, and where the vision tower and LLM
        are. `state` replaces self.state_dict() (the trainer's, gathered from shards)."""
        state = {k: t.detach() for k, t in (self.state_dict() if state is None else state).items()
                 if not bases or k.startswith("projector.")}
        if self.config.projector == "linear":  # transformers' projector always has linear_2: make it I
            w = state["projector.linear_1.weight"]
            state.update({"projector.linear_2.weight": torch.eye(w.shape[0], dtype=w.dtype),
                          "projector.linear_2.bias": torch.zeros(w.shape[0], dtype=w.dtype)})
        save_state_dict(hub_names(state), directory)
        bases = {"nanollava_bases": {k: str(v) for k, v in bases.items()}} if bases else {}
        write_json_atomic(Path(directory) / "config.json", {**self.config.to_hf(), **bases})
        if getattr(self, "tokenizer_dir", None):
            write_tokenizer_files(Path(self.tokenizer_dir), Path(directory), self.config)


class ContextLengthError(ValueError):
    """A prompt (or conversation) longer than the model's context; the message says both sizes."""


@dataclass
class GenerationState:
    """A conversation between LLaVA.generate calls (batch 1): the KV cache and every id so far;
    tokens[cache.pos:] were sampled but not fed yet (the last reply token, usually EOS)."""
    cache: KVCache = None
    tokens: list = field(default_factory=list)


def top_p_filter(logits, top_p):
    """Nucleus filtering as transformers' TopPLogitsWarper, [B,V] -> [B,V]: sorted ascending, the
    tokens whose cumulative mass stays <= 1 - top_p go to -inf; the most likely one always stays."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p  # [B,V]
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))  # back to vocabulary order


def sample_next(logits, temperature=0.0, top_p=1.0, generator=None):
    """Next-token logits [B,V] -> ids [B]: argmax at temperature 0, else softmax(logits / T) in
    the top-p nucleus (transformers' order: temperature, then top-p), drawn with `generator`."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _layer_views(cache):
    """The cache's k and v as per-layer views [B,KV,L,hd], made once and marked static: compiled,
    a write into a view of the whole tensor would copy that layer's cache and back every step."""
    if getattr(cache, "_views", None) is None:
        cache._views = (list(cache.k.unbind(0)), list(cache.v.unbind(0)))
        for t in cache._views[0] + cache._views[1]:
            torch._dynamo.mark_static_address(t)
    return cache._views


class _SlotWriter:
    """The KVCache of _static_decode_step: writes at the tensor slot `pos`, returns whole buffers."""

    def __init__(self, k, v, pos):
        self.k, self.v, self.pos = k, v, pos  # lists of per-layer [B,KV,L,hd]

    def update(self, i, k, v):  # [B,KV,L,hd] <- [B,KV,1,hd] at slot pos; index_copy_ returns the buffer
        return self.k[i].index_copy_(2, self.pos, k), self.v[i].index_copy_(2, self.pos, v)


def _static_decode_step(llm, k, v, token, pos, positions, keep):
    """One decode step with static shapes: token [B] into cache slot pos ([1]) at RoPE positions
    [B,1], attending to all L slots masked to the real ones (keep [B,L]) <= pos. -> logits [B,V]."""
    slots = torch.arange(k[0].shape[2], device=token.device)
    mask = (keep & (slots <= pos))[:, None, None, :]  # [B,L] -> [B,1,1,L]: all heads, one query
    x = llm.embed_tokens(token[:, None])              # [B] -> [B,1,D]
    (cos, sin), writer = llm.rope(positions), _SlotWriter(k, v, pos)
    for i, block in enumerate(llm.layers):
        x = block(x, cos, sin, writer, i, mask)
    return llm.lm_head(llm.norm(x))[:, -1]


def supervised_positions(labels):
    """labels [B,T] -> (positions [K], targets [K]): the flat b*T + t whose next label is supervised, and
    those labels: only there has the LM head work. Found on the CPU: K depends on the data."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)  # [B*T]
    positions = (targets != -100).nonzero().squeeze(1)
    return positions, targets[positions]


def next_token_loss(logits, labels):
    """Mean cross-entropy of position t predicting label t+1, ignoring -100, from the logits of every
    position [B,T,V]. Training instead runs the LM head on the supervised positions alone."""
    positions, targets = (t.to(logits.device) for t in supervised_positions(labels))
    return token_loss(logits.reshape(-1, logits.shape[-1]).index_select(0, positions), targets) / len(targets)


def token_loss(logits, targets):
    """Summed cross-entropy of logits [K,V] (any float dtype; computed in fp32) against targets [K]."""
    return TokenCrossEntropy.apply(logits.float(), targets)


class TokenCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(reduction="sum") of x [N,V] against targets [N] in less memory (the logits are a small
    model's largest tensors): backward turns the softmax p kept by forward into p - onehot(target) in place.
    So it runs once: a second backward finds p modified, and autograd's version check refuses it."""

    @staticmethod
    def forward(ctx, x, targets):
        top = x.amax(dim=-1, keepdim=True)                       # [N,1]
        p = torch.sub(x, top).exp_()                             # [N,V], the one new buffer
        z = p.sum(dim=-1, keepdim=True)
        p.div_(z)                                                # softmax
        ctx.save_for_backward(p, targets)
        return ((top + z.log()).squeeze(-1) - x.gather(-1, targets[:, None]).squeeze(-1)).sum()  # lse - picked

    @staticmethod
    def backward(ctx, grad_out):
        p, targets = ctx.saved_tensors
        p[torch.arange(len(targets), device=p.device), targets] -= 1  # softmax - onehot
        return p.mul_(grad_out.to(p.dtype)), None


def write_tokenizer_files(src, dst, config):
    """Copy the sentencepiece model and write the llava-hf tokenizer config beside it: the added <image> and
    <pad>, and the slow tokenizer's settings, `legacy` among them: transformers tokenizes it as we do."""
    tokenizer = Tokenizer(src)  # a WeightsError naming a missing or broken tokenizer.model
    own_pad = config.pad_token_id >= tokenizer.sp.vocab_size()  # else the pad is a sentencepiece piece
    pad = "<pad>" if own_pad else tokenizer.sp.id_to_piece(config.pad_token_id)
    added = {"<image>": config.image_token_id, **({"<pad>": config.pad_token_id} if own_pad else {})}
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": pad}
    tok_config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                  "legacy": tokenizer.legacy, "model_max_length": config.text.max_position_embeddings,
                  "padding_side": "left", **special, "added_tokens_decoder": {str(i): {
                      "content": s, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False} for s, i in added.items()}}
    if src.resolve() != dst.resolve():
        write_atomic(dst, {"tokenizer.model": lambda tmp: shutil.copyfile(src / "tokenizer.model", tmp)})
    for name, obj in (("added_tokens.json", added), ("special_tokens_map.json", special),
                      ("tokenizer_config.json", tok_config)):
        write_json_atomic(dst / name, obj)


# ---- command-line values of train.py, chat.py and eval.py, checked when the line is parsed ----

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_for(device, name=""):
    """--dtype NAME, or the default: bf16 on CUDA, fp32 elsewhere."""
    return DTYPES[name or ("bf16" if device.type == "cuda" else "fp32")]


def checked(kind, test, expected):
    """An argparse type: `kind` of the text, refused with `expected` in the message unless `test`."""
    def convert(text):
        with contextlib.suppress(ValueError):
            if (value := kind(text)) is not None and test(value):
                return value
        raise argparse.ArgumentTypeError(f"{text!r} is not {expected}")
    return convert


POSITIVE = checked(int, lambda v: v > 0, "a whole number > 0")
COUNT = checked(int, lambda v: v >= 0, "a whole number >= 0")
RATE = checked(float, lambda v: v > 0 and math.isfinite(v), "a number > 0")
NONNEG = checked(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
FRACTION = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
boolean = checked(lambda text: BOOLEANS.get(text.lower()), lambda v: True, "true or false")


def device_name(text):
    """cpu, cuda, cuda:N, mps ("" = the default): refused here when this torch cannot run it."""
    try:
        kind = torch.device(text).type if text else ""
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available() or kind == "mps" and not torch.backends.mps.is_available():
        what = "CUDA GPU" if kind == "cuda" else "MPS device"
        raise argparse.ArgumentTypeError(f"{text!r}: this torch ({torch.__version__}) sees no {what}; use cpu")
    return text
