"""Plain helpers shared by the tests (TRL's `testing_utils` pattern): tiny LoRA models built from configs (no hub).

`conftest.py` holds only fixtures and pytest hooks; test files import helpers from here."""

import torch

from grasp_trl.tiny import build_model

SEVEN_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(architecture="llama", *, r=4, target_modules=None, seed=0, hidden_size=32, num_layers=3, **lora):
    """A tiny random model wrapped in a PEFT LoRA adapter (B randomised so the update is not zero)."""
    from peft import LoraConfig, get_peft_model

    model = build_model(architecture, vocab_size=100, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules or SEVEN_MODULES, lora_dropout=0.0,
                        **lora)
    return get_peft_model(model, config)


def randomise_lora_b(model, seed=0, scale=0.1):
    """Fill every `lora_B` with seeded Gaussian noise (PEFT initialises B to zero, so `B A` would be zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
