"""Smoke tests of the benchmark scripts: they run with tiny settings and write JSON with the documented keys.

No timing is asserted (speed belongs in the benchmarks' own reports); what is checked is that the scripts work
end to end, that their figures are finite and positive, and that bad options are rejected.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name, *args):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    return result


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_identify_benchmark_writes_json(tmp_path):
    out = tmp_path / "identify.json"
    result = run_script(
        "identify.py",
        "--shapes",
        "tiny",
        "--cases",
        "per_layer",
        "--dense-shape",
        "tiny",
        "--workdir",
        str(tmp_path / "adapters"),
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["machine"]["cpus"] >= 1
    (case,) = data["cases"]
    assert (case["shape"], case["scope"], case["include_readers"], case["layers"]) == ("tiny", "per_layer", False, 3)
    for key in ("seconds", "cpu_seconds", "peak_rss_mb", "dense_seconds_extrapolated", "speedup_vs_dense_extrapolated"):
        assert positive(case[key]), (key, case[key])
    assert positive(data["dense"]["seconds"]) and data["dense"]["shape"] == [32, 64]  # tiny k_proj dW
    adapter = tmp_path / "adapters" / "tiny"  # a real PEFT adapter directory: PEFT's own key names
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight" in keys and len(keys) == 3 * 7 * 2


def test_identify_benchmark_rejects_unknown_shape(tmp_path):
    result = run_script("identify.py", "--shapes", "13b", "--workdir", str(tmp_path))
    assert result.returncode != 0 and "--shapes" in result.stderr and "13b" in result.stderr


def test_overhead_benchmark_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "overhead.json", tmp_path / "overhead.png"
    result = run_script(
        "overhead.py",
        "--sizes",
        "tiny",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--pairs",
        "3",
        "--memory-steps",
        "0",
        "--projector-ks",
        "1,2",
        "--projector-layers",
        "1",
        "--projector-repeats",
        "1",
        "--json",
        str(out),
        "--plot",
        str(png),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    (model,) = data["models"]
    assert model["model"]["name"] == "tiny" and model["parameters"] > 0
    assert set(model["variants"]) == {"plain", "activations", "weights", "both", "clamp", "ablate"}
    assert len(model["variants"]["plain"]["step_seconds"][0]) == 1  # 2 steps, 1 warm-up discarded
    for variant in ("activations", "weights", "both", "clamp", "ablate"):
        stats = model["variants"][variant]
        for key in ("ratio_median", "ratio_p10", "ratio_p90", "train_ratio"):
            assert positive(stats[key]), (variant, key)
        assert stats["ratio_p10"] <= stats["ratio_median"] <= stats["ratio_p90"]
        toggled = model["toggled"][variant]  # within-run A/B: 3 GRASP steps, each between two plain steps
        assert toggled["toggled_pairs"] == 3 and len(toggled["toggled_step_seconds"]) == 3 + 2 * 3  # from step 3
        for key in (
            "toggled_ratio_median",
            "toggled_ratio_p10",
            "toggled_ratio_p90",
            "attributed_ratio",
            "grasp_ms_per_step",
            "toggled_plain_step_seconds_median",
        ):
            assert positive(toggled[key]), (variant, key)
        low, high = toggled["toggled_ratio_ci95"]
        assert low <= toggled["toggled_ratio_median"] <= high and toggled["attributed_ratio"] > 1
        grasp_seconds = toggled["toggled_grasp_seconds"]  # GRASP's own code, timed per step (not compared here)
        assert len(grasp_seconds) == len(toggled["toggled_step_seconds"])
        assert all(math.isfinite(t) and t >= 0 for t in grasp_seconds), grasp_seconds
    assert [row["k"] for row in data["projector"]] == [1, 2]
    for row in data["projector"]:
        assert all(
            positive(row[key])
            for key in ("grad_projection_hooks_ms", "grad_projection_ms", "post_step_projection_ms", "one_matmul_ms")
        )
    assert "| tiny |" in data["markdown"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_overhead_memory_runs(tmp_path):
    """The per-variant memory subprocesses report a peak-RSS increase and a ratio against the plain trainer."""
    out = tmp_path / "overhead.json"
    result = run_script(
        "overhead.py",
        "--sizes",
        "tiny",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--pairs",
        "0",
        "--memory-steps",
        "1",
        "--projector-ks",
        "none",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    memory = json.loads(out.read_text())["models"][0]["memory"]
    assert set(memory) == {"plain", "activations", "weights", "both", "clamp", "ablate"}
    for variant in ("activations", "weights", "both", "clamp", "ablate"):
        assert positive(memory[variant]["memory_ratio"]) and positive(memory[variant]["peak_rss_mb"])
