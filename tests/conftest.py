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

from diagnostics_utils import D
from grasp_trl.eval.example import save_adapter, save_judge
from grasp_trl.identify import extract_directions
from grasp_trl.tiny import build_tokenizer, save_tiny_model
from testing_utils import lora_model, randomise_lora_b


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


# ------------------------------------------------------------------------- diagnostics (probe, plots, drift)
@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(0)
    return [
        " ".join(f"w{int(i):03d}" for i in torch.randint(96, (int(n),), generator=generator))
        for n in torch.randint(4, 12, (24,), generator=generator)
    ]


@pytest.fixture(scope="module")
def u():
    return torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(5)), dim=0)


@pytest.fixture(scope="module")
def identified():
    model = lora_model(hidden_size=D, num_layers=4, r=4)
    randomise_lora_b(model)
    return extract_directions(model, k=2)


# ---------------------------------------------------------------------------------------------- grasp eval
@pytest.fixture(scope="session")
def eval_models(tmp_path_factory):
    """Saved tiny base model, adapters (changing `a`, `b`; all-zero `zero`; `foreign` from a wider base) and
    judges (`judge_words`: numbers one token; `judge_digits`: numbers split into digits)."""
    root = tmp_path_factory.mktemp("eval_models")
    torch.manual_seed(0)
    base = save_tiny_model(root / "base", num_layers=2, hidden_size=32)
    other = save_tiny_model(root / "other_base", num_layers=2, hidden_size=48)
    return {
        "base": base,
        "a": save_adapter(base, root / "adapter_a", b_scale=0.5, seed=1),
        "b": save_adapter(base, root / "adapter_b", b_scale=0.5, seed=2),
        "zero": save_adapter(base, root / "adapter_zero", b_scale=0.0),
        "foreign": save_adapter(other, root / "adapter_foreign", b_scale=0.5),
        "judge_words": save_judge(root / "judge_words", digits_only=False),
        "judge_digits": save_judge(root / "judge_digits", digits_only=True),
    }
