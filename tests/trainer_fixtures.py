"""Tiny local model, datasets and LoRA config for the trainer tests (TRL, recipes/CLI, DeepSpeed/QLoRA workers).

Every dataset row has the same token length, so any split into micro-batches or ranks sees the same mean loss."""

import random

from datasets import Dataset
from peft import LoraConfig

from grasp_trl.tiny import save_tiny_model
from testing_utils import SEVEN_MODULES


def words(rng, low, high, n):
    return " ".join(f"w{rng.randrange(low, high):03d}" for _ in range(n))


def mapped_pair(rng, n):
    """A prompt of n random words and its answer under a fixed word-by-word mapping (learnable, so the loss
    falls)."""
    ids = [rng.randrange(40) for _ in range(n)]
    return " ".join(f"w{i:03d}" for i in ids), " " + " ".join(f"w{40 + (3 * i) % 40:03d}" for i in ids)


def sft_dataset(size=64, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        prompt, answer = mapped_pair(rng, 4)
        rows.append({"prompt": prompt, "completion": answer})
    return Dataset.from_list(rows)


def dpo_dataset(size=48, seed=0):
    """The mapped answer is chosen, random words from outside the mapping's range are rejected."""
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        prompt, answer = mapped_pair(rng, 3)
        rows.append({"prompt": prompt, "chosen": answer, "rejected": " " + words(rng, 80, 96, 3)})
    return Dataset.from_list(rows)


def lora_config(r=4):
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=SEVEN_MODULES)


def make_base(directory, architecture="llama"):
    return save_tiny_model(directory, architecture, hidden_size=32, num_layers=2, seed=0)
