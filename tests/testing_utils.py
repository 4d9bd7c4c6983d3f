"""Plain helpers shared by the tests (TRL's `testing_utils` pattern): tiny LoRA models built from configs (no hub),
and the leakage oracle the invariant checks use.

`conftest.py` holds only fixtures and pytest hooks; test files import helpers from here."""

import json
import math
import re
from pathlib import Path

import torch

from grasp_trl.tiny import SEVEN_MODULES, build_model  # noqa: F401  (SEVEN_MODULES: the tests import it from here)

WRITERS = {"o_proj", "down_proj"}  # write into the residual stream: dW's rows live there
READERS = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}  # read from it: dW's columns live there
_BLOCK = re.compile(r"\.layers\.(\d+)\.")


def lora_model(architecture="llama", *, r=4, target_modules=None, seed=0, hidden_size=32, num_layers=3, **lora):
    """A tiny random model wrapped in a PEFT LoRA adapter; B is PEFT's zero init (`randomise_lora_b` makes the
    update non-zero)."""
    from peft import LoraConfig, get_peft_model

    model = build_model(architecture, vocab_size=100, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules or SEVEN_MODULES, lora_dropout=0.0, **lora)
    return get_peft_model(model, config)


def randomise_lora_b(model, seed=0, scale=0.1):
    """Fill every `lora_B` with seeded Gaussian noise (PEFT initialises B to zero, so `B A` would be zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def block_outputs(model, input_ids) -> dict[int, torch.Tensor]:
    """Each block's output on the *last* forward the model runs for `input_ids` (for clamp, the training one:
    its reference forward runs first, inside the model's pre-hook), as the next block sees it: these hooks are
    registered after any projector's, so they run after its edit."""
    from grasp_trl.modules import block_output_hooks

    captured = {}
    with block_output_hooks(model, lambda layer, hidden: captured.__setitem__(layer, hidden)):
        model(input_ids=input_ids)
    return captured


def training_model(kind="lora", checkpointing=None, seed=0):
    """A tiny 3-block model in train mode: LoRA with a non-zero update (`kind="lora"`) or a plain model
    (`"full"`), with gradient checkpointing (`"reentrant"`/`"non_reentrant"`) when asked."""
    if kind == "lora":
        model = lora_model(r=4, num_layers=3, seed=seed)
        randomise_lora_b(model, seed=seed, scale=0.3)
    else:
        model = build_model("llama", vocab_size=100, hidden_size=32, num_layers=3, seed=seed)
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
        model.enable_input_require_grads()
    model.train()
    return model


# ------------------------------------------------------------------------------------------ leakage oracle
# Written here, independently of the library's identification code (grasp_trl.identify / verify / projection's
# Gram formula): the dense update dW from PEFT itself (in memory) or as scaling * B @ A from the safetensors file
# (saved), in float64, and the plain definition of leakage on it.
def residual_role(name: str) -> str:
    """'write' or 'read' for a LoRA module of the tiny llama / qwen2 models, by its leaf name."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in WRITERS:
        return "write"
    if leaf in READERS:
        return "read"
    raise ValueError(f"{name}: the test oracle knows only {sorted(WRITERS | READERS)}")


def block_of(name: str) -> int:
    """Decoder block index of a module name (`...layers.7.mlp.down_proj` -> 7)."""
    return int(_BLOCK.search(name + ".").group(1))


def update_leakage(delta: torch.Tensor, basis: torch.Tensor, role: str) -> float:
    """In float64: writers `||U^T dW|| / ||dW||`, readers `||dW U|| / ||dW||` (0.0 for a zero update)."""
    delta, basis = delta.detach().cpu().double(), basis.detach().cpu().double()
    along = basis.T @ delta if role == "write" else delta @ basis
    total = delta.norm()
    return float(along.norm() / total) if total > 0 else 0.0


def lora_leakage(model, directions, adapter: str = "default") -> dict[str, float]:
    """Per LoRA module of an in-memory PEFT model in a block with a basis: the leakage of PEFT's own dense
    `module.get_delta_weight(adapter)`."""
    result = {}
    for name, module in model.named_modules():
        if adapter in getattr(module, "lora_A", {}) and block_of(name) in directions.bases:
            delta = module.get_delta_weight(adapter)
            result[name] = update_leakage(delta, directions.bases[block_of(name)], residual_role(name))
    return result


def saved_lora_leakage(adapter_dir, directions) -> dict[str, float]:
    """Per LoRA module of a saved adapter directory in a block with a basis: the leakage of
    `dW = scaling * B @ A`, read with safetensors (`scaling` = lora_alpha / r, or / sqrt(r) with rsLoRA; the
    ratio does not depend on it, but dW is the update PEFT applies)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
        raise NotImplementedError(f"{adapter_dir}: the test oracle reads plain LoRA configs only")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    result = {}
    for key, lora_a in tensors.items():
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0]
        if block_of(name) not in directions.bases:
            continue
        lora_b = tensors[key.replace(".lora_A.", ".lora_B.")]
        rank = lora_a.shape[0]
        scaling = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
        delta = scaling * lora_b.double() @ lora_a.double()
        result[name] = update_leakage(delta, directions.bases[block_of(name)], residual_role(name))
    return result
