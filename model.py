"""
LLaVA = a CLIP vision tower + a projector + a LLaMA/Vicuna language model.

    image [B,3,S,S] ──► CLIPVision ──► hidden_states[-2] [B,1+P,Dv] ──► drop CLS [B,P,Dv]
                                                                             │
                                                    projector (linear | Linear-GELU-Linear)
                                                                             ▼
    "USER: <image>×P\\nWhat is this? ASSISTANT:"  ──► embed_tokens ──► [B,T,D] ◄── scatter [B,P,D]
                                                                             │
                                                               Llama decoder ▼ logits [B,T,V]

The prompt already holds one `<image>` id per patch (as llava-hf's processor writes it), so
splicing the image in is a masked scatter: no sequence is re-assembled, positions run 0..T-1
straight through the image, and a batch of prompts of equal length stays a plain tensor.

Checkpoints are llava-hf directories, the layout transformers' LlavaForConditionalGeneration
reads and the Hub serves. The key names of every layout we accept live in one table,
`CHECKPOINT_PREFIXES`, so loading is "strip a prefix, hand the rest to clip.py / llama.py".
"""

import argparse
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip import CLIPVision, CLIPVisionConfig, vision_state_from_checkpoint
from llama import Llama, LlamaConfig, llm_state_from_checkpoint, Tokenizer
from llama import KVCache  # generation
from weights import WeightsError, read_json, load_state_dict, assign_weights, save_state_dict, fetch
from weights import write_json_atomic


# What transformers' LlavaConfig assumes for vision_config fields a sparse config leaves out
# (CLIP ViT-L/14 at 336 px); CLIP's own defaults would be ViT-B/32.
LLAVA_VISION_DEFAULTS = {"hidden_size": 1024, "intermediate_size": 4096, "patch_size": 14,
                         "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16}


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

    @property
    def num_patches(self):
        return self.vision.num_patches + (self.vision_feature_select == "full")

    @classmethod
    def from_hf(cls, d):
        """llava-hf config.json -> LLaVAConfig. Unknown keys are ignored; the text config may be
        sparse (llama.py fills the HF defaults)."""
        act = d.get("projector_hidden_act", "gelu")
        text = LlamaConfig.from_hf(d.get("text_config") or {})
        pad = d.get("pad_token_id")  # pads are never attended to nor supervised: any row will do,
        pad = pad if isinstance(pad, int) and 0 <= pad < text.vocab_size else 0  # but one that exists
        if act not in ("gelu", "linear"):
            raise ValueError(f"projector_hidden_act {act!r} is not supported (gelu or linear)")
        return cls(
            vision=CLIPVisionConfig.from_hf({**LLAVA_VISION_DEFAULTS, **(d.get("vision_config") or {})}),
            text=text,
            projector="linear" if act == "linear" else "mlp2x_gelu",
            vision_feature_layer=d.get("vision_feature_layer", -2),
            vision_feature_select=d.get("vision_feature_select_strategy", "default"),
            image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
            pad_token_id=pad,
            pad_to_square=d.get("image_aspect_ratio", "pad") == "pad",
            template=d.get("conversation_template", "vicuna_v1"),
        )

    def to_hf(self):
        return {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "vision_config": self.vision.to_hf(),
            "text_config": self.text.to_hf(),
            "image_token_index": self.image_token_id,
            "pad_token_id": self.pad_token_id,
            "image_seq_length": self.num_patches,
            # A linear projector is saved as linear_1 -> identity -> linear_2 = I, which
            # transformers reads as projector_hidden_act "linear"; see Projector.
            "projector_hidden_act": "linear" if self.projector == "linear" else "gelu",
            "multimodal_projector_bias": True,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            # ours: transformers ignores these, our loaders read them
            "image_aspect_ratio": "pad" if self.pad_to_square else "square",
            "conversation_template": self.template,
        }


class Projector(nn.Module):
    """Maps CLIP features into the LLM's embedding space: one Linear (v1) or Linear-GELU-Linear
    (v1.5, exact erf GELU as in the official code)."""

    def __init__(self, kind, d_vision, d_text):
        super().__init__()
        if kind not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"unknown projector {kind!r}: choose 'linear' or 'mlp2x_gelu'")
        self.kind = kind
        self.linear_1 = nn.Linear(d_vision, d_text)
        if kind == "mlp2x_gelu":
            self.linear_2 = nn.Linear(d_text, d_text)

    def forward(self, x):
        x = self.linear_1(x)
        if self.kind == "mlp2x_gelu":
            x = self.linear_2(F.gelu(x))
        return x


# Every checkpoint layout we read, as (prefix in the file, part of our model, prefix for that
# part's own loader). The first matching prefix wins, so longer prefixes come first.
CHECKPOINT_PREFIXES = [
    ("vision_tower.vision_model.", "vision", ""),             # llava-hf on the Hub
    ("model.vision_tower.vision_model.", "vision", ""),
    ("model.vision_tower.", "vision", ""),                    # transformers 5 in-memory names
    ("vision_tower.", "vision", ""),                          # transformers 5 save_pretrained
    ("multi_modal_projector.", "projector", ""),
    ("model.multi_modal_projector.", "projector", ""),
    ("language_model.model.", "llm", "model."),               # Hub and transformers 5 saves
    ("language_model.lm_head.", "llm", "lm_head."),
    ("model.language_model.", "llm", "model."),               # transformers 5 in-memory names
    ("lm_head.", "llm", "lm_head."),
]


def split_checkpoint(state, source):
    """Split a llava-hf state dict into vision / projector / llm dicts, each in the key form of
    its own loader, and the problems to report: the keys that match no layout (the loaders add
    theirs, so that one error names everything wrong with a checkpoint)."""
    parts = {"vision": {}, "projector": {}, "llm": {}}
    unknown = []
    for key, tensor in state.items():
        for prefix, part, new_prefix in CHECKPOINT_PREFIXES:
            if key.startswith(prefix):
                parts[part][new_prefix + key[len(prefix):]] = tensor
                break
        else:
            unknown.append(key)
    problems = [f"{source}: keys that belong to no part of a LLaVA model: {', '.join(sorted(unknown))}"]
    return parts, problems if unknown else []


def collect(problems, load, *args):
    """load(*args), its WeightsError added to `problems` instead of raised."""
    try:
        return load(*args)
    except WeightsError as e:
        problems.append(str(e))


class LLaVA(nn.Module):
    def __init__(self, config: LLaVAConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVision(config.vision)
        self.projector = Projector(config.projector, config.vision.hidden_size, config.text.hidden_size)
        self.llm = Llama(config.text)

    # ---- the forward pass -------------------------------------------------------------------

    def encode_images(self, pixel_values):
        """[N,3,S,S] -> [N,P,D_text] image tokens for the LLM."""
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        feats = self.vision_tower(pixel_values.to(dtype), layer=self.config.vision_feature_layer)
        if self.config.vision_feature_select == "default":
            feats = feats[:, 1:]  # [N,1+P,Dv] -> [N,P,Dv]: the paper drops CLS
        return self.projector(feats)

    def embed(self, input_ids, pixel_values=None, image_features=None):
        """Token embeddings with image features scattered over the `<image>` positions, in
        order: row-major over the batch, patch by patch. Each image must own exactly P ids."""
        embeds = self.llm.embed_tokens(input_ids)  # [B,T,D]
        if pixel_values is None and image_features is None:
            if self.training and torch.is_grad_enabled():
                # A sharded projector all-gathers its weights when it runs, so in training every
                # rank must run it on every micro-batch, text-only or not: send a dummy through
                # it and add 0 x the result (the official code's image_features[0][0:0] trick).
                dummy = self.projector(embeds.new_zeros(1, self.config.vision.hidden_size))
                embeds = embeds + 0.0 * dummy.sum()
            return embeds
        if image_features is None:
            image_features = self.encode_images(pixel_values)  # [N,P,D]
        is_image = input_ids == self.config.image_token_id  # [B,T]
        n_slots, n_feats = int(is_image.sum()), image_features.shape[0] * image_features.shape[1]
        if n_slots != n_feats:
            raise ValueError(
                f"the prompt holds {n_slots} <image> tokens but the {image_features.shape[0]} image(s) "
                f"give {n_feats} features ({image_features.shape[1]} each): the prompt needs one "
                f"<image> id ({self.config.image_token_id}) per patch")
        # masked_scatter keeps autograd into both the text embeddings and the projector
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_features.to(embeds.dtype))

    def forward(self, input_ids, pixel_values=None, labels=None, logits_at=None):
        """-> (logits [B,T,V], loss): loss is the mean next-token cross-entropy over the
        positions whose label is not -100 (None without labels). Training passes logits_at, the
        supervised positions (supervised_positions), and gets their logits alone, [K,V]."""
        logits = self.llm(inputs_embeds=self.embed(input_ids, pixel_values), logits_at=logits_at)
        loss = None
        if labels is not None:
            loss = next_token_loss(logits, labels, reduction="mean")
        return logits, loss

    # ---- generation (chat.py, eval.py) ------------------------------------------------------
    # One loop: prefill the prompt once (image spliced in), then feed one token at a time
    # through the preallocated KV cache. Helpers (GenerationState, sample_next, the static
    # decode step for torch.compile) are in the "generation" section after this class.

    @torch.inference_mode()
    def generate(self, input_ids, pixel_values=None, max_new_tokens=256, temperature=0.0, top_p=1.0,
                 seed=None, generator=None, eos_id=2, attention_mask=None, state=None):
        """Yield new token ids as they are decoded.

        input_ids: [T] (yields ints) or [B,T] (yields a [B] tensor per step), image placeholders
        already expanded to one image_token_id per patch. attention_mask [B,T] (1 = real token)
        for a left-padded batch. Greedy at temperature 0, else temperature + top-p sampling drawn
        from `generator` (or a torch.Generator seeded with `seed`, so a run can be repeated).
        Stops after EOS (which is yielded; in a batch, finished rows then repeat eos_id) or after
        max_new_tokens, or when the context (max_position_embeddings) is full.

        state: a GenerationState kept by the caller for a multi-turn conversation (batch 1). An
        empty one is filled with the cache and the ids; given back on the next call, input_ids
        are only the new turn's ids: they are appended after what the cache already holds, so
        neither the image nor the history is read again (pixel_values must then be None).

        One host sync per step, to check EOS (none in a batch without eos_id). Being a generator,
        it raises (ContextLengthError, ...) at the first next(), not at the call.
        """
        single = input_ids.dim() == 1
        w = self.llm.embed_tokens.weight
        ids = (input_ids[None] if single else input_ids).to(w.device)  # [B,T]
        B = ids.shape[0]
        cache, start, what, ids = self._with_history(ids, state, pixel_values, attention_mask)
        T = ids.shape[1]
        cache, max_new = self._cache_with_room(cache, B, start + T, max_new_tokens, what)
        if generator is None and seed is not None and temperature > 0:
            generator = torch.Generator(device=w.device).manual_seed(seed)

        # keep [B, max_len]: True on the slots that hold (or will hold) a real token
        keep = torch.ones(B, cache.max_len, dtype=torch.bool, device=w.device) if attention_mask is not None else None
        if keep is not None:
            keep[:, :T] = attention_mask.to(device=w.device, dtype=torch.bool)
        mask_to = lambda end: None if keep is None else keep[:, :end]  # noqa: E731

        embeds = self.embed(ids, None if pixel_values is None else pixel_values.to(w.device))
        logits = self.llm(inputs_embeds=embeds, cache=cache, attn_mask=mask_to(start + T), last_only=True)[:, -1]
        if state is not None:  # only now: a failed prefill leaves the conversation as it was
            state.cache = cache
            state.tokens += ids[0, len(state.tokens) - start:].tolist()
        static = getattr(self, "_static_step", None)
        if static is not None:  # the compiled path tracks slot and RoPE position as tensors
            pos = torch.tensor([cache.pos], device=w.device)
            n_real = (keep[:, :cache.pos].sum(-1, keepdim=True) if keep is not None
                      else pos.expand(B, 1).clone())  # [B,1] RoPE position of the next token
            full = keep if keep is not None else torch.ones(B, cache.max_len, dtype=torch.bool, device=w.device)
        done = torch.zeros(B, dtype=torch.bool, device=w.device)
        for i in range(max_new):
            nxt = sample_next(logits, temperature, top_p, generator)  # [B]
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)  # finished rows keep repeating EOS
                done = done | (nxt == eos_id)
            if state is not None:
                state.tokens.append(int(nxt[0]))
            yield int(nxt[0]) if single else nxt
            if i + 1 == max_new or (eos_id is not None and bool(done.all())):  # the EOS sync
                break
            if static is not None:
                logits = static(self.llm, *_layer_views(cache), nxt, pos, n_real, full)
                cache.pos += 1
                pos += 1
                n_real += 1
            else:
                logits = self.llm(nxt[:, None], cache=cache, attn_mask=mask_to(cache.pos + 1), last_only=True)[:, -1]

    @staticmethod
    def _with_history(ids, state, pixel_values, attention_mask):
        """-> (cache, start, what the context holds, ids to feed). A follow-up turn continues the
        conversation's cache after its last position; the last sampled token was never fed."""
        if state is None or state.cache is None:
            return None, 0, "the prompt", ids
        if ids.shape[0] != 1 or attention_mask is not None:
            raise ValueError("a conversation state continues one unpadded sequence (batch 1)")
        if pixel_values is not None:
            raise ValueError("this conversation already holds its image: start a new "
                             "GenerationState to talk about another one")
        start = state.cache.pos
        unfed = torch.tensor(state.tokens[start:], dtype=ids.dtype, device=ids.device)
        return state.cache, start, "the conversation with this message", torch.cat([unfed[None], ids], 1)

    def generate_batch(self, prompts, pixel_values=None, max_new_tokens=256, temperature=0.0, top_p=1.0,
                       seed=None, generator=None, eos_id=2):
        """Several prompts (lists of ids, image ids expanded) decoded together -> list of each
        prompt's new ids, cut before EOS. The prompts are left-padded into one [B,T] batch with
        an attention mask; pixel_values [N,3,S,S] holds the images of the prompts that have
        one, in prompt order (text-only prompts may be mixed in)."""
        B, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, T), self.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b, p in enumerate(prompts):
            ids[b, T - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[b, T - len(p):] = True
        steps = list(self.generate(ids, pixel_values, max_new_tokens, temperature, top_p, seed, generator,
                                   eos_id, attention_mask=mask))
        if not steps:
            return [[] for _ in prompts]
        out = []
        for row in torch.stack(steps, 1).tolist():  # [B,steps]: one transfer at the end
            out.append(row[:row.index(eos_id)] if eos_id in row else row)
        return out

    def compile_decode(self, compile=True, **compile_kwargs):
        """Switch the decode step to a static-shape version (keys written at a tensor slot,
        attention over the whole preallocated cache under a mask) and torch.compile it; default
        mode "reduce-overhead" captures the step in a CUDA graph. CUDA only in practice: on a
        CPU, chat.py leaves generation eager. compile=False keeps the static step uncompiled
        (the tests check it against the eager path)."""
        step = _static_decode_step
        if compile:
            step = torch.compile(step, **{"mode": "reduce-overhead", "fullgraph": True, **compile_kwargs})
        self._static_step = step
        return self

    def _cache_with_room(self, old, B, fed, max_new_tokens, what):
        """-> (a KVCache with room for `fed` tokens and the new ones, holding what `old` held; how
        many new tokens fit in the context). Sizes are rounded up to 256 (the compiled step
        recompiles per size), and growing copies once per turn."""
        ctx = self.config.text.max_position_embeddings
        if fed > ctx:
            raise ContextLengthError(f"{what} is {fed} tokens, longer than the model's context "
                                     f"of {ctx} tokens (max_position_embeddings)")
        max_new = min(max_new_tokens, ctx - fed + 1)  # the last new token is never fed
        need = fed + max(max_new - 1, 0)
        if old is not None and old.max_len >= need:
            return old, max_new
        w = self.llm.embed_tokens.weight
        size = min(self.config.text.max_position_embeddings, -(-need // 256) * 256)
        cache = KVCache(self.config.text, B, size, w.dtype, w.device)
        if old is not None:
            cache.k[:, :, :, :old.pos] = old.k[:, :, :, :old.pos]  # [L,B,KV,pos,hd]
            cache.v[:, :, :, :old.pos] = old.v[:, :, :, :old.pos]
            cache.pos = old.pos
        return cache, max_new

    # ---- loading and saving -----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load a llava-hf directory (the Hub's, transformers', or ours) or a Hub name."""
        path = fetch(path)
        raw = read_json(Path(path) / "config.json", "LLaVA config")
        if raw.get("model_type") not in (None, "llava"):
            raise WeightsError(f"{path}/config.json has model_type {raw.get('model_type')!r}, not 'llava'")
        config = LLaVAConfig.from_hf(raw)
        if "nanollava_bases" in raw:  # a stage-1 output: the projector alone, beside its bases
            return cls.from_stage1(path, raw, config, dtype, device)
        state = load_state_dict(path)
        parts, problems = split_checkpoint(state, str(path))
        if config.projector == "linear":
            parts["projector"] = fold_linear_projector(parts["projector"], str(path))
        with torch.device("meta"):
            model = cls(config)
        model.vision_tower = collect(problems, CLIPVision.from_state_dict, config.vision,
                                     vision_state_from_checkpoint(parts["vision"]), f"{path} (vision tower)", dtype, device)
        collect(problems, assign_weights, model.projector, parts["projector"], f"{path} (projector)", dtype, device)
        model.llm = collect(problems, Llama.from_state_dict, config.text,
                            llm_state_from_checkpoint(parts["llm"]), f"{path} (language model)", dtype, device)
        if problems:
            raise WeightsError("; ".join(problems))
        model.tokenizer_dir = Path(path)
        return model

    @classmethod
    def from_components(cls, clip_path, llm_path, projector="mlp2x_gelu", dtype=torch.float32,
                        device="cpu", vision_feature_layer=-2, pad_to_square=None, seed=0):
        """Start stage 1: a pretrained CLIP and a pretrained LLaMA/Vicuna, a fresh projector, and
        the vocabulary extended the llava-hf way (<image> = V, <pad> = V+1, rows padded to a
        multiple of 64 so the embedding matmul stays tensor-core friendly)."""
        clip_path, llm_path = fetch(clip_path, files=["config.json"]), fetch(llm_path)
        vision = CLIPVision.from_pretrained(clip_path, dtype, device)
        llm = Llama.from_pretrained(llm_path, dtype, device)
        tokenizer = Tokenizer(llm_path)
        v_old = llm.config.vocab_size
        image_id, pad_id = tokenizer.image_token_id, tokenizer.pad_id
        extend_vocab(llm, max(v_old, pad_id + 1))
        config = LLaVAConfig(
            vision=vision.config, text=llm.config, projector=projector,
            vision_feature_layer=vision_feature_layer, image_token_id=image_id, pad_token_id=pad_id,
            pad_to_square=(projector == "mlp2x_gelu") if pad_to_square is None else pad_to_square)
        with torch.device("meta"):
            model = cls(config)
        model.vision_tower, model.llm = vision, llm
        g = torch.Generator().manual_seed(seed)
        model.projector = Projector(projector, vision.config.hidden_size, llm.config.hidden_size)
        init_projector(model.projector, g)
        model.projector.to(device=device, dtype=dtype)
        model.tokenizer_dir = Path(llm_path)
        return model

    @classmethod
    def from_stage1(cls, path, raw, config, dtype=torch.float32, device="cpu"):
        bases = raw["nanollava_bases"]
        missing = [k for k in ("vision", "llm") if not bases.get(k)]
        if missing:
            raise WeightsError(f"{path}/config.json: nanollava_bases lacks {missing}")
        model = cls.from_components(
            bases["vision"], bases["llm"], projector=config.projector, dtype=dtype, device=device,
            vision_feature_layer=config.vision_feature_layer, pad_to_square=config.pad_to_square)
        state, problems = split_checkpoint(load_state_dict(path), str(path))
        if state["vision"] or state["llm"]:
            problems.append(f"{path}: a projector-only checkpoint must hold only multi_modal_projector.* keys")
        proj = state["projector"]
        if config.projector == "linear":
            proj = fold_linear_projector(proj, str(path))
        collect(problems, assign_weights, model.projector, proj, f"{path} (projector)", dtype, device)
        if problems:
            raise WeightsError("; ".join(problems))
        model.config.template = config.template
        if (Path(path) / "tokenizer.model").exists():
            model.tokenizer_dir = Path(path)
        return model

    def save_pretrained(self, directory, tokenizer_dir=None, only_projector=False, bases=None, state=None):
        """Write a llava-hf directory: config.json, safetensors (Hub key names, so transformers
        4 and 5 both load it) and tokenizer files. `only_projector` writes the projector alone
        plus `bases` (where the vision tower and LLM come from): the stage-1 output. `state`
        replaces self.state_dict() (the trainer passes the full weights gathered from shards)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state is None else state
        out = {}
        for key, t in state.items():
            for ours, theirs in SAVE_PREFIXES:
                if key.startswith(ours):
                    if not (only_projector and ours != "projector."):
                        out[theirs + key[len(ours):]] = t.detach()
                    break
            else:
                raise KeyError(f"save_pretrained: no checkpoint name for parameter {key}")
        if self.config.projector == "linear":  # transformers' projector always has linear_2: make it I
            w = out["multi_modal_projector.linear_1.weight"]
            out["multi_modal_projector.linear_2.weight"] = torch.eye(w.shape[0], dtype=w.dtype)
            out["multi_modal_projector.linear_2.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
        save_state_dict(out, directory)
        config = self.config.to_hf()
        if only_projector:
            config["nanollava_bases"] = {k: str(v) for k, v in (bases or {}).items()}
        write_json_atomic(directory / "config.json", config)
        tok_dir = tokenizer_dir or getattr(self, "tokenizer_dir", None)
        if tok_dir is not None:
            write_tokenizer_files(Path(tok_dir), directory, self.config)


# -----------------------------------------------------------------------------------------------
# generation helpers (used by LLaVA.generate)


class ContextLengthError(ValueError):
    """A prompt (or conversation) longer than the model's context; the message says both sizes."""


@dataclass
class GenerationState:
    """A conversation between LLaVA.generate calls (batch 1): the KV cache and every token id so
    far (prompt with image ids, replies, follow-ups). The first cache.pos ids are in the cache;
    tokens[cache.pos:] were sampled but not fed yet (the last reply token, usually EOS), so the
    next call feeds them before the new ids. Start empty: GenerationState()."""
    cache: KVCache = None
    tokens: list = field(default_factory=list)


def top_p_filter(logits, top_p):
    """Nucleus filtering as transformers' TopPLogitsWarper: keep the smallest set of most likely
    tokens whose probability mass reaches top_p, set the rest to -inf. [B,V] -> [B,V].
    Sorted ascending, the dropped tokens are the least likely ones whose cumulative mass stays
    <= 1 - top_p; the most likely token is always kept."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)   # [B,V] mass of the tokens up to each
    drop = cum <= 1 - top_p
    drop[..., -1] = False
    drop = drop.scatter(-1, order, drop)                  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits, temperature=0.0, top_p=1.0, generator=None):
    """Next-token logits [B,V] -> ids [B]: argmax at temperature 0, else softmax(logits / T)
    restricted to the top-p nucleus, drawn with `generator` (transformers' order: temperature,
    then top-p)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _layer_views(cache):
    """The cache's k and v as lists of per-layer views [B,KV,L,hd], made once per cache. The
    compiled step must mutate each layer's buffer as its own input: an in-place write into a
    view of the whole [layers,...] tensor is functionalized by torch.compile into a copy of that
    layer's entire cache and a copy back, every step (measured: ~3x slower decode on an H200).
    Marked static so the CUDA graph reads them where they are."""
    if getattr(cache, "_views", None) is None:
        cache._views = (list(cache.k.unbind(0)), list(cache.v.unbind(0)))
        for t in cache._views[0] + cache._views[1]:
            torch._dynamo.mark_static_address(t)
    return cache._views


class _SlotWriter:
    """Stands in for the KVCache inside _static_decode_step: writes the new key/value at the
    tensor slot `pos` and returns the whole preallocated buffers, so no shape ever changes."""

    def __init__(self, k, v, pos):
        self.k, self.v, self.pos = k, v, pos  # lists of per-layer [B,KV,L,hd]

    def update(self, layer_idx, k, v):
        self.k[layer_idx].index_copy_(2, self.pos, k)  # [B,KV,L,hd] <- [B,KV,1,hd] at slot pos
        self.v[layer_idx].index_copy_(2, self.pos, v)
        return self.k[layer_idx], self.v[layer_idx]


def _static_decode_step(llm, k, v, token, pos, positions, keep):
    """One decode step with static shapes (what torch.compile + CUDA graphs need): token [B] goes
    into cache slot pos ([1] tensor) at RoPE positions [B,1]; attention covers all L slots of the
    cache (k, v: lists of per-layer [B,KV,L,hd]) with a mask keeping the real slots <= pos (keep
    [B,L] marks real ones). -> next-token logits [B,V]. The eager path (Llama.forward) slices."""
    slots = torch.arange(k[0].shape[2], device=token.device)
    mask = (keep & (slots <= pos))[:, None, None, :]  # [B,L] -> [B,1,1,L]: all heads, one query
    x = llm.embed_tokens(token[:, None])              # [B] -> [B,1,D]
    cos, sin = llm.rope(positions)
    writer = _SlotWriter(k, v, pos)
    for i, block in enumerate(llm.layers):
        x = block(x, cos, sin, writer, i, mask)
    return llm.lm_head(llm.norm(x))[:, -1]


# Our parameter names -> the llava-hf (Hub) names we write. Longer prefixes first.
SAVE_PREFIXES = [
    ("vision_tower.", "vision_tower.vision_model."),
    ("projector.", "multi_modal_projector."),
    ("llm.lm_head.", "language_model.lm_head."),
    ("llm.", "language_model.model."),
]


# ---- helpers used by the loaders above --------------------------------------------------------

def supervised_positions(labels):
    """labels [B, T] -> (positions [K], targets [K]): the flat positions b*T + t whose next label
    (t + 1) is supervised, and those labels. Position t predicts token t + 1, so these K are the
    only positions where the LM head and the loss have work: in LLaVA's data most are not (the
    576 image tokens, the system prompt, the questions; in stage 1 all but a caption's dozen
    tokens). K depends on the data, so training finds it on the CPU, before the batch moves:
    on a GPU, finding it would make the host wait for the device."""
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)  # [B*T]
    positions = (targets != -100).nonzero().squeeze(1)
    return positions, targets[positions]


def next_token_loss(logits, labels, reduction="mean"):
    """Cross-entropy of position t predicting label t+1, ignoring -100, from the logits of every
    position [B,T,V] (LLaVA.forward with labels). Training does not come here: it runs the LM
    head on the supervised positions alone (logits_at) and calls token_loss."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction {reduction!r}: 'sum' or 'mean'")
    positions, targets = (t.to(logits.device) for t in supervised_positions(labels))
    total = token_loss(logits.reshape(-1, logits.shape[-1]).index_select(0, positions), targets)  # [K,V]
    return total if reduction == "sum" else total / len(targets)


def token_loss(logits, targets):
    """Summed cross-entropy of logits [K,V] (any float dtype; computed in fp32) against targets [K]."""
    return TokenCrossEntropy.apply(logits.float(), targets)


class TokenCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of rows x [N,V] against targets [N], equal to
    F.cross_entropy(reduction="sum") to float rounding. Every row counts: the callers pass the
    supervised positions alone (supervised_positions).

    The [N,V] logits are the largest tensors of a small model's step. F.cross_entropy keeps the
    log-probabilities for backward, where nll_loss zero-fills one more [N,V] buffer and
    log_softmax's backward allocates another. Here forward keeps the softmax p, and backward
    turns that same buffer into the gradient, p - onehot(target), scaled in place: no [N,V]
    allocation in backward at all (so it can run only once: no retain_graph)."""

    @staticmethod
    def forward(ctx, x, targets):
        top = x.amax(dim=-1, keepdim=True)                       # [N,1]
        p = torch.sub(x, top).exp_()                             # [N,V], the one new buffer
        z = p.sum(dim=-1, keepdim=True)
        p.div_(z)                                                # softmax
        lse = (top + z.log()).squeeze(-1)                        # log-sum-exp per row
        picked = x.gather(-1, targets[:, None]).squeeze(-1)
        ctx.save_for_backward(p, targets)
        ctx.spent = False
        return (lse - picked).sum()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.spent:
            raise RuntimeError("TokenCrossEntropy's backward reuses its saved buffer: it runs once")
        ctx.spent = True
        p, targets = ctx.saved_tensors
        p[torch.arange(len(targets), device=p.device), targets] -= 1  # softmax - onehot
        p.mul_(grad_out.to(p.dtype))
        return p, None


def extend_vocab(llm, n_tokens):
    """Grow embed_tokens and lm_head to n_tokens rows rounded up to a multiple of 64. New rows
    start at the mean of the old ones (a neutral token), as transformers' mean resizing does."""
    old = llm.config.vocab_size
    new = int(math.ceil(n_tokens / 64) * 64)
    if new == old:
        return
    for name in ("embed_tokens", "lm_head"):
        mod = getattr(llm, name)
        w = mod.weight.data
        mean = w.float().mean(0, keepdim=True).to(w.dtype)
        grown = torch.cat([w, mean.expand(new - old, -1)], 0)
        mod.weight = nn.Parameter(grown, requires_grad=mod.weight.requires_grad)
        if name == "embed_tokens":
            mod.num_embeddings = new
        else:
            mod.out_features = new
    if llm.config.tie_word_embeddings:
        llm.lm_head.weight = llm.embed_tokens.weight
    llm.config.vocab_size = new


def init_projector(projector, generator):
    """The default nn.Linear init (kaiming uniform) drawn from a seeded generator."""
    for lin in (projector.linear_1, getattr(projector, "linear_2", None)):
        if lin is None:
            continue
        bound = 1 / math.sqrt(lin.in_features)
        with torch.no_grad():
            lin.weight.uniform_(-bound, bound, generator=generator)
            lin.bias.uniform_(-bound, bound, generator=generator)


def fold_linear_projector(state, source):
    """A checkpoint saved with projector_hidden_act "linear" computes W2(W1 x + b1) + b2: fold it
    into one Linear (exact when linear_2 is the identity we save)."""
    need = {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    if set(state) != need:
        raise WeightsError(f"{source} (projector): linear projector needs {sorted(need)}, found {sorted(state)}")
    w1, b1 = state["linear_1.weight"].float(), state["linear_1.bias"].float()
    w2, b2 = state["linear_2.weight"].float(), state["linear_2.bias"].float()
    if torch.equal(w2, torch.eye(w2.shape[0])) and not b2.any():
        return {"linear_1.weight": state["linear_1.weight"], "linear_1.bias": state["linear_1.bias"]}
    dtype = state["linear_1.weight"].dtype
    return {"linear_1.weight": (w2 @ w1).to(dtype), "linear_1.bias": (w2 @ b1 + b2).to(dtype)}


def write_tokenizer_files(src, dst, config):
    """Copy the sentencepiece model and write the llava-hf tokenizer config beside it: the two
    added tokens (<image>, <pad>) and the slow-tokenizer settings the model was trained with,
    `legacy` included (llama.Tokenizer), so transformers and we tokenize it the same way."""
    src, dst = Path(src), Path(dst)
    model_file = src / "tokenizer.model" if src.is_dir() else src
    if not model_file.exists():
        raise FileNotFoundError(f"no tokenizer.model in {src}: cannot write the tokenizer of {dst}")
    tokenizer = Tokenizer(model_file)
    if model_file.resolve() != (dst / "tokenizer.model").resolve():
        shutil.copyfile(model_file, dst / "tokenizer.model.tmp")
        os.replace(dst / "tokenizer.model.tmp", dst / "tokenizer.model")
    added = {"<image>": config.image_token_id}
    if config.pad_token_id >= tokenizer.sp.vocab_size():  # else the pad is a sentencepiece piece
        added["<pad>"] = config.pad_token_id
    write_json_atomic(dst / "added_tokens.json", added)
    pad = "<pad>" if "<pad>" in added else tokenizer.sp.id_to_piece(config.pad_token_id)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": pad}
    write_json_atomic(dst / "special_tokens_map.json", special)
    tok_config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "legacy": tokenizer.legacy, "model_max_length": config.text.max_position_embeddings,
        "padding_side": "left", **special,
        "added_tokens_decoder": {
            str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False,
                     "normalized": False, "single_word": False} for s, i in added.items()},
    }
    write_json_atomic(dst / "tokenizer_config.json", tok_config)


# -----------------------------------------------------------------------------------------------
# command-line values shared by train.py, chat.py and eval.py: checked when the line is parsed

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_for(device, name=""):
    """--dtype NAME, or the default: bf16 on CUDA, fp32 elsewhere."""
    return DTYPES[name or ("bf16" if device.type == "cuda" else "fp32")]


def checked(kind, test, expected):
    """An argparse type: `kind` of the text, refused with `expected` in the message unless `test`."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}")
        return value
    return convert


POSITIVE = checked(int, lambda v: v > 0, "a whole number > 0")
COUNT = checked(int, lambda v: v >= 0, "a whole number >= 0")
RATE = checked(float, lambda v: v > 0 and math.isfinite(v), "a number > 0")
NONNEG = checked(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
FRACTION = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def boolean(text):
    value = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if text.lower() not in value:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return value[text.lower()]


def device_name(text):
    """cpu, cuda, cuda:N, mps ("" = the default): refused here when this torch cannot run it."""
    if not text:
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this torch ({torch.__version__}) sees no CUDA GPU; use cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no MPS device; use cpu")
    return text
