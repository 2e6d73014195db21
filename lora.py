"""LoRA (Hu et al. 2021), written out: a frozen weight W [out, in] learns only a low-rank change,
y = W x + (B A x) * alpha / r, A [r, in] drawn as nn.Linear draws, B [out, r] zero: training starts from the
base model exactly. At r 128 a 7B LLaMA trains 320M parameters, not 6.7B: the base stays frozen in the compute
dtype, only A and B (fp32) have gradients and optimizer state. Adapters are read and written in PEFT's format.
"""

import json
import re
from pathlib import Path

import torch.nn as nn

from weights import LAYOUT, _read_safetensors, _rename, assign_weights, read_json, write_atomic

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's, before the LlavaForConditionalGeneration's names
HF_LLM = ("model.language_model.", "language_model.model.")  # the LLM's blocks in transformers 5, 4
PATTERNS = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform")  # not ours


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r, alpha, dropout=0.0):
        super().__init__()
        self.base, self.r, self.alpha, self.scaling = base.requires_grad_(False), r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout)  # on the LoRA path's input only, as PEFT
        # as PEFT's: A's weight [r, in] kaiming-uniform (nn.Linear's own init), B's [out, r] zero
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        y = self.base(x)  # [..., in] -> [..., out] in the base's dtype
        delta = self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype)))  # via [..., r]
        return y + (delta * self.scaling).to(y.dtype)


def add_lora(llm, r, alpha, dropout=0.0, targets=None):
    """Freeze `llm`; wrap each nn.Linear of its blocks named (`layers.N.self_attn.q_proj`) or ending in `.` +
    one of `targets` (default: all, as the official find_all_linear_names: no LM head) -> LoRA's #params."""
    llm.requires_grad_(False)
    for name, mod in list(llm.layers.named_modules(prefix="layers")):
        wanted = targets is None or any(f".{name}".endswith("." + t) for t in targets)  # PEFT's list rule
        if isinstance(mod, nn.Linear) and wanted:
            llm.set_submodule(name, LoRALinear(mod, r, alpha, dropout))
    return sum(p.numel() for p in llm.parameters() if p.requires_grad)


def merged_state(module, state):
    """`state` (module's names, LoRA factors among them: the trainer's gathered one) -> the merged module's:
    W + (B A) * scaling, in W's dtype and PEFT's order of operations, so that merges agree exactly."""
    state = dict(state)
    for name, m in module.named_modules():
        if isinstance(m, LoRALinear):
            p = name + "." if name else ""
            W, A, B = (state.pop(p + k) for k in ("base.weight", "lora_A.weight", "lora_B.weight"))
            state[p + "weight"] = W + ((B @ A) * m.scaling).to(W.dtype)
    return state


def merge_lora(module):
    """Every LoRALinear under `module` back into its plain nn.Linear, merged (one at a time)."""
    for name, m in list(module.named_modules()):
        if isinstance(m, LoRALinear):
            m.base.weight.data = merged_state(m, m.state_dict())["weight"]
            module.set_submodule(name, m.base)
    return module


def save_adapter(model, directory, base_name, state=None, projector=False):
    """A LLaVA's factors (and projector: a PEFT module to save) as a PEFT adapter directory, named as PEFT
    names them on transformers 5. `state` replaces model.state_dict() (the trainer's, from its shards)."""
    loras = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    first, leaves = next(iter(loras.values())), sorted({n.rpartition(".")[2] for n in loras})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_name),
              "r": first.r, "lora_alpha": first.alpha, "lora_dropout": first.dropout.p, "bias": "none",
              "target_modules": rf".*language_model.*\.({'|'.join(leaves)})",  # a regex: not the vision tower
              "modules_to_save": ["multi_modal_projector"] if projector else None}
    keep = tuple(f"{n}.lora_" for n in loras) + (("projector.",) if projector else ())
    to_hf = [("llm.", HF_LLM[0]), ("projector.", "model.multi_modal_projector.")]
    tensors = {PEFT_PREFIX + _rename(k, to_hf): t.detach().cpu().contiguous()
               for k, t in (model.state_dict() if state is None else state).items() if k.startswith(keep)}
    from safetensors.torch import save_file
    write_atomic(directory, {WEIGHTS: lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}),
                             CONFIG: lambda tmp: tmp.write_text(json.dumps(config, indent=2))})


def _lora_config(c):
    """adapter_config.json -> (r, alpha, dropout, target_modules); what we cannot apply is refused."""
    if c.get("peft_type") != "LORA" or c.get("bias", "none") != "none" or any(c.get(k) for k in PATTERNS):
        raise ValueError("not a plain LoRA adapter (peft_type LORA, bias none, no DoRA, rsLoRA or patterns)")
    return int(c["r"]), float(c["lora_alpha"]), float(c.get("lora_dropout") or 0.0), c["target_modules"]


def load_adapter(model, directory):
    """add_lora to a LLaVA as a PEFT adapter directory says, then its factors (transformers 4's or 5's names;
    a projector saved as a module to save too) -> model. What does not fit is named in one WeightsError."""
    directory = Path(directory)
    r, alpha, dropout, targets = read_json(directory / CONFIG, "PEFT adapter config", _lora_config)
    if isinstance(targets, str):  # PEFT's regex over transformers' module names (either layout)
        names = [n for n, m in model.llm.layers.named_modules(prefix="layers") if isinstance(m, nn.Linear)]
        targets = [n for n in names if any(re.fullmatch(targets, p + n) for p in HF_LLM)]
    add_lora(model.llm, r, alpha, dropout, targets)
    current, adapter = {k: t for k, t in model.state_dict().items() if ".lora_" not in k}, {}
    for key, t in _read_safetensors(directory / WEIGHTS).items():
        name = _rename(key.removeprefix(PEFT_PREFIX), LAYOUT) or key  # unknown: for assign_weights to refuse
        # factors in fp32; a saved projector in the model's dtype
        adapter[name] = t.float() if ".lora_" in name else t.to(current[name].dtype) if name in current else t
    dev = model.llm.embed_tokens.weight.device  # the factors join the model where it is
    return assign_weights(model, {**current, **adapter}, directory / WEIGHTS, device=dev)
