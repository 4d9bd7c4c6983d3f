"""GRASP on QLoRA, on CPU: a real bitsandbytes 4-bit base (nf4, double quantisation, bf16 storage and compute)
with a LoRA adapter and gradient checkpointing, trained by GraspSFTTrainer for 20 steps in each mode.

TRL's SFTTrainer casts a quantized model's LoRA weights to bf16 (the QLoRA paper's recommendation), so the
adapter itself is bf16. The runs go through tests/distributed/grasp_worker.py in one plain process (the
same code path the ZeRO tests launch with torchrun), and the tests read what it saved:
* `activations`: every gradient leaving a hooked residual has `||g U|| <= 1e-6 ||g||` (observed by hooks that
  run after the projector's, through the recomputed forward of gradient checkpointing);
* `weights`: the update of the saved (and the live) bf16 adapter is orthogonal to the directions up to bf16
  rounding of the fp32-projected value: <= BF16_TOL (measured 5.8e-4 to 7.1e-4; rounding does not accumulate,
  every step re-projects);
* every 4-bit layer's packed weights and quantisation constants are byte-for-byte unchanged.
"""

from __future__ import annotations

import pytest

from distributed.launch import launch, saved_leakage
from grasp_trl.directions import DirectionSet
from grasp_trl.tiny import save_tiny_model

pytestmark = pytest.mark.slow

TOL = 1e-6
BF16_TOL = 2e-3
STEPS = 20
MODES = ("activations", "weights", "both")


@pytest.fixture(scope="module")
def qlora_runs(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("qlora")
    base = save_tiny_model(root / "base", "llama", hidden_size=64, num_layers=2, seed=0)
    directions = DirectionSet.random(64, 2, k=2, seed=1)
    directions.save(root / "directions.safetensors")
    runs = [
        {
            "name": f"qlora_{mode}",
            "out_dir": str(root / "out"),
            "projection": mode,
            "qlora": True,
            "gradient_checkpointing": True,
            "steps": STEPS,
            "per_device": 8,
            "lr": 1e-2,
        }
        for mode in MODES
    ]
    results = launch(
        {"base_dir": str(base), "directions": str(root / "directions.safetensors"), "runs": runs},
        root / "launch",
        distributed=False,
    )
    return {"base": base, "out": root / "out", "directions": directions, "results": results}


@pytest.mark.parametrize("mode", MODES)
def test_qlora_run_keeps_invariants_and_the_4bit_base(qlora_runs, mode):
    result = qlora_runs["results"][f"qlora_{mode}"]
    assert result["quantized_modules"] == 7 * 2  # every projection of both blocks is 4-bit
    assert result["quantized_unchanged"]
    assert result["trainable_dtypes"] == ["torch.bfloat16"]  # TRL's cast of a QLoRA adapter
    losses = [entry["loss"] for entry in result["log_history"] if "loss" in entry]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    if mode in ("activations", "both"):
        assert result["residual_gradients_seen"] >= STEPS * 2  # every step, every hooked block
        assert result["residual_leakage"] <= TOL, result["residual_leakage"]
    if mode in ("weights", "both"):
        leakage = saved_leakage(qlora_runs["out"] / f"qlora_{mode}", qlora_runs["directions"])
        assert leakage <= BF16_TOL, leakage
        assert result["master_leakage"] <= BF16_TOL
