"""LoRA (Hu et al. 2021, "Low-Rank Adaptation of Large Language Models"), written out.

A frozen weight W [out, in] learns only a low-rank change: y = W x + (B A x) * alpha / r, with A [r, in]
drawn as nn.Linear draws its weight and B [out, r] zero, so training starts from the base model exactly.
For a 7B LLaMA at r 128 that is 320M trained parameters instead of 6.7B; the base stays in the compute dtype,
and only A and B (fp32) have gradients and optimizer state. merge_lora folds B A back into W. Adapters are
read and written in PEFT's format, so `peft.PeftModel.from_pretrained(llava_hf_model, dir)` loads ours.
"""

import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from weights import LAYOUT, _read_safetensors, _rename, assign_weights, hub_names, read_json, write_atomic

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's, before the LlavaForConditionalGeneration's names
HF_LLM = ("model.language_model.", "language_model.model.")  # the LLM's blocks in transformers 5, 4
PATTERNS = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform")  # not ours


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r, alpha, dropout=0.0):
        super().__init__()
        self.base, self.r, self.alpha, self.scaling = base.requires_grad_(False), r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout)  # on the LoRA path's input only, as PEFT
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev))   # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev))  # [out, r]: B A = 0 at init
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, PEFT's default

    def forward(self, x):
        y = self.base(x)  # [..., out] in the base's dtype
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # [..., in] -> [..., r], in fp32
        delta = F.linear(h, self.lora_B)  # [..., r] -> [..., out]
        return y + (delta * self.scaling).to(y.dtype)


def add_lora(llm, r, alpha, dropout=0.0, targets=None):
    """Freeze `llm` and wrap, in place, each nn.Linear of its blocks whose name (`layers.N.self_attn.q_proj`)
    is or ends in `.` + one of `targets` (default: all of them, as the official find_all_linear_names: never
    the LM head) in a LoRALinear -> the number of LoRA parameters."""
    llm.requires_grad_(False)
    for name, mod in list(llm.layers.named_modules(prefix="layers")):
        wanted = targets is None or any(f".{name}".endswith("." + t) for t in targets)  # PEFT's list rule
        if isinstance(mod, nn.Linear) and wanted:
            owner, _, attr = name.rpartition(".")
            setattr(llm.get_submodule(owner), attr, LoRALinear(mod, r, alpha, dropout))
    return sum(p.numel() for p in llm.parameters() if p.requires_grad)


def merge_lora(module):
    """Every LoRALinear under `module` back into its plain nn.Linear, W + (B A) * scaling (PEFT's order)."""
    for name, m in list(module.named_modules()):
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.base.weight += ((m.lora_B @ m.lora_A) * m.scaling).to(m.base.weight.dtype)
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, m.base)
    return module


def save_adapter(model, directory, base_name):
    """A LLaVA's factors as a PEFT adapter directory, under llava-hf's Hub names (which transformers 4 and 5
    both read: PEFT maps them onto transformers 5's layout) and PEFT's prefix."""
    loras = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not loras:
        raise ValueError("the model has no LoRA layers to save: call add_lora first")
    first, leaves = next(iter(loras.values())), sorted({n.rpartition(".")[2] for n in loras})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r, "lora_alpha": first.alpha,
              "lora_dropout": first.dropout.p, "bias": "none", "base_model_name_or_path": str(base_name),
              # a regex, so that PEFT leaves the vision tower's q/k/v_proj alone
              "target_modules": rf".*language_model.*\.({'|'.join(leaves)})", "fan_in_fan_out": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}
    ours = {f"{n}.lora_{f}": getattr(m, f"lora_{f}").detach().cpu().contiguous() for n, m in loras.items()
            for f in "AB"}
    state = {PEFT_PREFIX + k + ".weight": t for k, t in hub_names(ours).items()}
    from safetensors.torch import save_file
    write_atomic(directory, {WEIGHTS: lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}),
                             CONFIG: lambda tmp: tmp.write_text(json.dumps(config, indent=2))})


def _lora_config(c):
    """adapter_config.json -> (r, alpha, dropout, target_modules); what we cannot apply is refused."""
    if c.get("peft_type") != "LORA" or c.get("bias", "none") != "none" or any(c.get(k) for k in PATTERNS):
        raise ValueError("not a plain LoRA adapter (peft_type LORA, bias none, no DoRA, rsLoRA or patterns)")
    return int(c["r"]), float(c["lora_alpha"]), float(c.get("lora_dropout") or 0.0), c["target_modules"]


def load_adapter(model, directory):
    """add_lora to a LLaVA as a PEFT adapter directory says, and its factors (layouts of transformers 4 and 5;
    a projector PEFT saved as a module to save, too) -> model. Every key or shape that does not fit is
    named in one WeightsError."""
    directory = Path(directory)
    r, alpha, dropout, targets = read_json(directory / CONFIG, "PEFT adapter config", _lora_config)
    if isinstance(targets, str):  # PEFT's regex over transformers' module names (either layout)
        names = [n for n, m in model.llm.layers.named_modules(prefix="layers") if isinstance(m, nn.Linear)]
        targets = [n for n in names if any(re.fullmatch(targets, p + n) for p in HF_LLM)]
    add_lora(model.llm, r, alpha, dropout, targets)
    current, adapter = {k: t for k, t in model.state_dict().items() if not re.search(r"\.lora_[AB]$", k)}, {}
    for key, t in _read_safetensors(directory / WEIGHTS).items():
        name = re.sub(r"\.(lora_[AB])\.weight$", r".\1", key.removeprefix(PEFT_PREFIX))
        name = _rename(name, LAYOUT) or name  # an unknown name stays as it is, for assign_weights to refuse
        # factors in fp32; a saved projector in the model's dtype
        adapter[name] = t.float() if ".lora_" in name else t.to(current[name].dtype) if name in current else t
    dev = model.llm.embed_tokens.weight.device  # the factors join the model where it is
    return assign_weights(model, {**current, **adapter}, directory / WEIGHTS, device=dev)
