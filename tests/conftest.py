"""Shared fixtures: tiny random models built from configs (no hub), offline environment."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest
import torch

from grasp_trl.directions import DirectionSet
from grasp_trl.tiny import SEVEN_MODULES, build_model  # noqa: F401  (SEVEN_MODULES: imported from here)


def random_directions(hidden_size: int, num_layers: int, k: int, seed: int = 0, layers=None) -> DirectionSet:
    """Random orthonormal bases (d x k) for the given layers (all by default)."""
    return DirectionSet.random(hidden_size, num_layers, k, seed=seed, layers=layers)


def lora_model(architecture="llama", *, r=4, target_modules=None, seed=0, hidden_size=32, num_layers=3, **lora):
    """A tiny random model wrapped in a PEFT LoRA adapter (B randomised so the update is not zero)."""
    from peft import LoraConfig, get_peft_model

    model = build_model(architecture, vocab_size=100, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules or SEVEN_MODULES, lora_dropout=0.0,
                        **lora)
    return get_peft_model(model, config)


def randomise_lora_b(model, seed=0, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a 2-core box two threads mostly spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 100, (2, 12), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}
