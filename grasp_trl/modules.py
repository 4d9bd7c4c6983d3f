"""Which modules write to and which read from the residual stream, per architecture.

A *writer* adds its output to the residual stream (`o_proj`, `down_proj`, ...): its residual side is the
output side (dim 0 of a `Linear` weight). A *reader* consumes the normalised stream (`q_proj`, `up_proj`,
...): its residual side is the input side (dim 1). Everything in GRASP — extraction and both projection
mechanisms — needs this classification and the block index each module belongs to, for module names as they
appear in a transformers model, a PEFT model or a saved adapter's safetensors keys.

Supported by name: Llama, Mistral, Qwen2/Qwen3 (incl. MoE experts), Gemma/Gemma2, Phi-3 (fused `qkv_proj`,
`gate_up_proj`), GPT-2 (Conv1D `c_attn`/`c_fc`/`c_proj`) and GPT-NeoX. Anything else is classified through
`target_modules` (leaf name -> "write"/"read") or rejected with the list of linear modules found.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

Role = Literal["write", "read"]

WRITER_LEAVES = frozenset({"o_proj", "down_proj", "dense_4h_to_h", "c_proj", "w2", "out_proj"})
READER_LEAVES = frozenset(
    {
        "q_proj",
        "k_proj",
        "v_proj",
        "qkv_proj",
        "gate_proj",
        "up_proj",
        "gate_up_proj",
        "query_key_value",
        "dense_h_to_4h",
        "c_attn",
        "c_fc",
        "w1",
        "w3",
    }
)
# Leaf names whose role depends on the parent (GPT-NeoX's `attention.dense` writes; a bare `dense` is unknown).
PARENT_QUALIFIED = {("attention", "dense"): "write"}
# Non-block modules on the residual stream: they are not tied to a block index.
GLOBAL_MODULES = {"lm_head": "read", "embed_out": "read", "embed_tokens": "write", "wte": "write", "embed_in": "write"}

_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")
_ADAPTER_SUFFIX = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.[^.]+)?\.weight$|\.weight$|\.bias$"
)


class UnsupportedModulesError(ValueError):
    """Raised when modules on the residual stream cannot be classified as writers or readers."""


@dataclass(frozen=True)
class ResidualModule:
    """A module touching the residual stream: its full name, block index (None for global ones) and role."""

    name: str
    layer: int | None
    role: Role


def block_index(name: str) -> int | None:
    """Index of the decoder block a module name belongs to (`...layers.7.mlp...` -> 7), or None."""
    match = _BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def strip_adapter_suffix(key: str) -> str:
    """`...down_proj.lora_A.weight` (a safetensors key of a saved adapter) -> `...down_proj`."""
    return _ADAPTER_SUFFIX.sub("", key)


def _leaf_parts(name: str) -> list[str]:
    return [p for p in name.split(".") if not p.isdigit()]


def _matches(pattern: str, name: str) -> bool:
    """Whether a `target_modules` key (a leaf name, or a regex on the full name or the leaf) names `name`."""
    parts = _leaf_parts(name)
    leaf = parts[-1] if parts else name
    return pattern == leaf or bool(re.fullmatch(pattern, name)) or bool(re.fullmatch(pattern, leaf))


def check_target_modules(model, target_modules: Mapping[str, Role] | None) -> None:
    """Raise when a `grasp_target_modules` key names no module of `model`: such a mapping classifies nothing,
    so the modules it was meant for stay unconstrained without a word (a typo, or another architecture's names)."""
    if not target_modules:
        return
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [pattern for pattern in target_modules if not any(_matches(pattern, name) for name in names)]
    if unmatched:
        wrapped = [name for name, module in model.named_modules() if hasattr(module, "base_layer")]  # PEFT's
        leaves = sorted({_leaf_parts(n)[-1] for n in linear_module_names(model) + wrapped if _leaf_parts(n)})
        raise ValueError(
            f"grasp_target_modules: {', '.join(map(repr, unmatched))} matches no module of the "
            f"model; expected a leaf name or regex of its modules (linear leaves: "
            f"{', '.join(leaves[:20])})"
        )


def classify(name: str, target_modules: Mapping[str, Role] | None = None) -> Role | None:
    """Role of one module by name; `target_modules` (leaf name or regex -> role) takes precedence."""
    parts = _leaf_parts(name)
    leaf = parts[-1] if parts else name
    if target_modules:
        for pattern, role in target_modules.items():
            if _matches(pattern, name):
                if role not in ("write", "read"):
                    raise ValueError(f"grasp_target_modules[{pattern!r}]: expected 'write' or 'read', found {role!r}")
                return role
    parent = parts[-2] if len(parts) > 1 else ""
    if (parent, leaf) in PARENT_QUALIFIED:
        return PARENT_QUALIFIED[(parent, leaf)]
    if leaf in WRITER_LEAVES:
        return "write"
    if leaf in READER_LEAVES:
        return "read"
    if block_index(name) is None and leaf in GLOBAL_MODULES:
        return GLOBAL_MODULES[leaf]
    return None


def classify_all(
    names: Iterable[str], target_modules: Mapping[str, Role] | None = None, *, include_global: bool = False
) -> list[ResidualModule]:
    """Classify module names; unknown names inside decoder blocks raise `UnsupportedModulesError`.

    Global modules (embeddings, `lm_head`) are only returned with `include_global` (full fine-tuning);
    they are silently skipped otherwise since LoRA extraction works per block.
    """
    found, unknown = [], []
    for name in names:
        layer = block_index(name)
        role = classify(name, target_modules)
        if role is None:
            if layer is not None:
                unknown.append(name)
            continue
        if layer is None and not include_global:
            continue
        found.append(ResidualModule(name, layer, role))
    if unknown:
        raise UnsupportedModulesError(
            "Cannot tell whether these modules write to or read from the residual stream: "
            + ", ".join(sorted(unknown)[:20])
            + (" ..." if len(unknown) > 20 else "")
            + ". Classify them with grasp_target_modules, e.g. {'my_out': 'write', 'my_in': 'read'}, "
            "or leave them out of the adapter's target_modules."
        )
    return found


def linear_module_names(model) -> list[str]:
    """Names of all linear-like modules (Linear, Conv1D, bnb 4/8-bit Linear) in a model, for error messages
    and classification. PEFT wrappers are reported by the name of the wrapped module."""
    import torch.nn as nn

    names = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.Linear) or kind in {"Conv1D", "Linear4bit", "Linear8bitLt"}:
            if any(tag in name.split(".") for tag in ("lora_A", "lora_B", "base_layer", "lora_magnitude_vector")):
                continue
            names.append(name)
    return names


def decoder_blocks(model):
    """The decoder blocks (an `nn.ModuleList` of length `num_hidden_layers`) of a transformers model, possibly
    wrapped by PEFT or DeepSpeed. Raises a ValueError naming what was found if none matches."""
    import torch.nn as nn

    num_layers = num_hidden_layers(model)
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == num_layers and re.search(r"(^|\.)(layers|h|blocks|layer)$", name)
    ]
    if not candidates:
        lists = [f"{n} (len {len(m)})" for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        raise ValueError(
            f"Could not find the decoder blocks: expected an nn.ModuleList of length "
            f"num_hidden_layers={num_layers} named '...layers' or '...h'; found {lists or 'none'}"
        )
    return candidates[0][1]


@contextmanager
def block_output_hooks(model, edit):
    """Forward hooks on every decoder block calling `edit(layer, h_l)` with the block's output residual.

    A tensor returned replaces `h_l` (steering, ablation); None leaves the forward untouched (reading it).
    The hooks are removed when the block exits.
    """
    handles = []
    for layer, block in enumerate(decoder_blocks(model)):

        def hook(module, args, output, layer=layer):
            hidden = output[0] if isinstance(output, tuple) else output
            new = edit(layer, hidden)
            if new is None:
                return None
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        handles.append(block.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def text_config(model):
    """The text config of a (possibly wrapped, possibly multimodal) transformers model."""
    config = getattr(model, "config", None)
    while config is None and hasattr(model, "module"):
        model = model.module
        config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no `config`: not a transformers model")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# The names transformers configs give the two sizes GRASP needs (Llama/Qwen/..., GPT-2, T5-like).
CONFIG_KEYS = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
}


def config_value(config, what: str) -> int | None:
    """`what` (`hidden_size` or `num_layers`) of a text config, given as a config object or a `config.json`
    dict, under whichever name the architecture uses; None when it has none."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    return next((int(get(key)) for key in CONFIG_KEYS[what] if get(key)), None)


def _required(model, what: str) -> int:
    config = text_config(model)
    value = config_value(config, what)
    if value is None:
        raise ValueError(f"{type(config).__name__} has no {'/'.join(CONFIG_KEYS[what])}")
    return value


def hidden_size(model) -> int:
    """The residual stream's width of a (possibly wrapped) transformers model."""
    return _required(model, "hidden_size")


def num_hidden_layers(model) -> int:
    """The number of decoder blocks of a (possibly wrapped) transformers model."""
    return _required(model, "num_layers")
