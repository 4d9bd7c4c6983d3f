"""Shared fixtures and the offline environment; plain helpers (tiny LoRA models) live in `testing_utils.py`."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a 2-core box two threads mostly spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_batch():
    """Two seeded rows of 12 token ids (labels = inputs) in the tiny vocabulary."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 100, (2, 12), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}
