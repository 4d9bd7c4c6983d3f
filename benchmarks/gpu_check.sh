#!/usr/bin/env bash
# GPU check for GRASP (at most ~12 minutes on one NVIDIA GPU, no network needed; QLoRA under ZeRO-3 runs first).
#
# Run from the repository root on a machine with an NVIDIA GPU and the project's venv installed:
#     bash benchmarks/gpu_check.sh [OUTPUT_DIR]      # default: $OUT if set, else benchmarks/gpu_check_out
#
# 1. Builds a random-init ~1B-parameter Qwen2-shaped model (hidden 2048, 22 layers, MLP 5632; word-level tiny
#    tokenizer) on the GPU and saves it in bf16 — nothing is downloaded.
# 2. QLoRA under DeepSpeed ZeRO-3 on one GPU (torchrun, NCCL; CUDA bitsandbytes nf4, bf16 compute dtype and
#    `bnb_4bit_quant_storage`, so ZeRO-3 partitions the packed 4-bit base as HF documents): plain SFTTrainer vs
#    GraspSFTTrainer in `activations` and `weights` mode. First in line (issue #17: the product's promise, tested
#    on CPU ranks only, tests/test_qlora_deepspeed.py); not yet run on a GPU when written.
# 3. QLoRA (CUDA bitsandbytes nf4, bf16 compute): plain SFTTrainer vs GraspSFTTrainer in `activations` and
#    `weights` mode, 30 steps each, same data and seed.
# 4. DeepSpeed ZeRO-2 and ZeRO-3 on one GPU (torchrun, NCCL), bf16 base + LoRA: the same three runs.
# 5. FSDP2 on one GPU (torchrun, NCCL; accelerate's `fully_shard` per Qwen2DecoderLayer and on the root, bf16
#    mixed precision, PEFT's fp32 LoRA factors as DTensors): the same three runs. Added with the FSDP2 support
#    (tests/test_fsdp2.py, CPU ranks); not yet run on a GPU when written.
# Every run checks the invariant of its mode: `activations` — a probe hook registered after GRASP's records
# max ||g U|| / ||g|| of the gradient leaving every block during training (bound: 1e-2 in bf16);
# `weights` — the projector's leakage ||U^T dW|| / ||dW|| after training (fp32 LoRA factors, or DeepSpeed's fp32
# master of them; bound 1e-5).
# Each setting reports the per-step time ratio against the plain trainer (median, p10, p90 after 5 warm-up
# steps) and the peak-memory ratio (torch.cuda.max_memory_allocated). Results: one JSON per setting in the
# output directory and a summary on stdout; the script exits non-zero if any invariant fails.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/gpu_check_out}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
TORCHRUN="$(dirname "$(command -v "$PY")")/torchrun"
[ -x "$TORCHRUN" ] || TORCHRUN=torchrun
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1
export TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"

cat > "$WORK/check.py" <<'PYEOF'
"""One GPU-check setting: plain vs GRASP (activations, weights) on the ~1B model; prints and writes JSON."""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.overhead import ModelSize, StepTimer, dataset, directions_file, spread

SETTING, BASE, OUT_DIR = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
SIZE = ModelSize("1b", hidden_size=2048, num_layers=22, intermediate_size=5632, num_heads=16, batch_size=8,
                 seq_len=256, lora_r=16)
STEPS, WARMUP, K = 30, 5, 3
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base():
    from grasp_trl.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    with torch.device("cuda"):
        model = build_model("qwen2", vocab_size=len(tokenizer), hidden_size=SIZE.hidden_size,
                            num_layers=SIZE.num_layers, intermediate_size=SIZE.intermediate_size,
                            num_heads=SIZE.num_heads, seed=0)
    model.to(torch.bfloat16).save_pretrained(BASE)
    tokenizer.save_pretrained(BASE)
    print(f"base model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters -> {BASE}")


class ResidualProbe:
    """Forward hooks registered after GRASP's: record max ||g U_l|| / ||g|| of the projected block gradient."""

    def __init__(self, model, directions):
        from grasp_trl.modules import decoder_blocks

        self.worst, self.handles = 0.0, []
        for layer, basis in directions.bases.items():
            block = decoder_blocks(model)[layer]
            self.handles.append(block.register_forward_hook(self._forward(basis)))

    def _forward(self, basis):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if torch.is_grad_enabled() and hidden.requires_grad:
                hidden.register_hook(self._backward(basis))
        return hook

    def _backward(self, basis):
        def hook(grad):
            g = grad.float().reshape(-1, grad.shape[-1])
            u = basis.to(g.device)
            self.worst = max(self.worst, float((g @ u).norm() / g.norm().clamp_min(1e-30)))
        return hook


def make_trainer(variant, directions_path):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from grasp_trl.tiny import build_tokenizer
    from grasp_trl.trainer import GraspSFTConfig, GraspSFTTrainer

    common = dict(output_dir=f"/tmp/gpu_check_{SETTING}_{variant}", max_steps=STEPS, learning_rate=1e-4,
                  per_device_train_batch_size=SIZE.batch_size, max_length=SIZE.seq_len, logging_steps=10,
                  save_strategy="no", report_to=[], seed=0, bf16=True, disable_tqdm=True)
    if SETTING == "fsdp2":
        common["fsdp"] = "full_shard"
        common["fsdp_config"] = {"version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]}
        model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.bfloat16)
    elif SETTING in ("zero2", "zero3", "qlora_zero3"):
        common["deepspeed"] = {"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": "auto",
                               "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
                               "zero_optimization": {"stage": int(SETTING[-1])}}
        if SETTING == "qlora_zero3":  # no device_map (ZeRO-3 refuses one): bitsandbytes loads onto the current GPU
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(BASE, quantization_config=quant, dtype=torch.bfloat16)
        else:
            model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.bfloat16)
    else:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(BASE, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": 0})
    lora = LoraConfig(r=SIZE.lora_r, lora_alpha=2 * SIZE.lora_r, lora_dropout=0.0, target_modules=SEVEN)
    timer = StepTimer()
    kwargs = dict(model=model, train_dataset=dataset(SIZE, STEPS * SIZE.batch_size), peft_config=lora,
                  processing_class=build_tokenizer(), callbacks=[timer])
    if variant == "plain":
        return SFTTrainer(args=SFTConfig(**common), **kwargs), timer
    config = GraspSFTConfig(**common, grasp_directions=str(directions_path), grasp_projection=variant)
    return GraspSFTTrainer(args=config, **kwargs), timer


def main():
    if SETTING == "build":
        return build_base()
    from grasp_trl.directions import DirectionSet

    directions_path = directions_file(OUT_DIR, SIZE, K)
    directions = DirectionSet.load(directions_path)
    result = {"setting": SETTING, "steps": STEPS, "warmup": WARMUP, "k": K, "gpu": torch.cuda.get_device_name(),
              "variants": {}}
    failures = []
    for variant in ("plain", "activations", "weights"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        trainer, timer = make_trainer(variant, directions_path)
        probe = ResidualProbe(trainer.model, directions) if variant == "activations" else None
        start = time.perf_counter()
        trainer.train()
        entry = {"train_seconds": time.perf_counter() - start, "step_seconds": timer.times,
                 "peak_memory_gb": torch.cuda.max_memory_allocated() / 2 ** 30,
                 "final_loss": [e["loss"] for e in trainer.state.log_history if "loss" in e][-1]}
        if variant == "activations":
            entry["max_residual_grad_along_U"] = probe.worst
            if not probe.worst <= 1e-2:
                failures.append(f"activations: ||g U||/||g|| = {probe.worst:.2e} > 1e-2")
        if variant == "weights":
            entry["leakage"] = trainer.grasp_projector.leakage()
            if not entry["leakage"] <= 1e-5:
                failures.append(f"weights: leakage {entry['leakage']:.2e} > 1e-5")
        result["variants"][variant] = entry
        del trainer, probe
    plain = result["variants"]["plain"]
    for variant in ("activations", "weights"):
        entry = result["variants"][variant]
        ratios = [t / p for t, p in zip(entry["step_seconds"][WARMUP:], plain["step_seconds"][WARMUP:])]
        stats = spread(ratios)
        entry.update(ratio_median=stats["median"], ratio_p10=stats["p10"], ratio_p90=stats["p90"],
                     memory_ratio=entry["peak_memory_gb"] / plain["peak_memory_gb"])
    result["failures"] = failures
    if int(os.environ.get("RANK", "0")) == 0:
        (OUT_DIR / f"{SETTING}.json").write_text(json.dumps(result, indent=1))
        for variant in ("activations", "weights"):
            e = result["variants"][variant]
            print(f"{SETTING:<6} {variant:<11} step ratio {e['ratio_median']:.3f} [{e['ratio_p10']:.3f}, "
                  f"{e['ratio_p90']:.3f}]  memory ratio {e['memory_ratio']:.3f}  plain step "
                  f"{statistics.median(plain['step_seconds'][WARMUP:]) * 1e3:.0f} ms  "
                  + (f"max ||gU||/||g|| {e['max_residual_grad_along_U']:.1e}" if variant == "activations"
                     else f"leakage {e['leakage']:.1e}"))
        print("FAILED: " + "; ".join(failures) if failures else f"{SETTING}: invariants hold")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
PYEOF

status=0
BASE="$WORK/base"
timeout 90 "$PY" "$WORK/check.py" build "$BASE" "$OUT_DIR"
timeout 150 "$TORCHRUN" --standalone --nproc_per_node 1 "$WORK/check.py" qlora_zero3 "$BASE" "$OUT_DIR" 2>&1 \
  | tee "$OUT_DIR/qlora_zero3.log" | grep -E "^(qlora_zero3|FAILED)" || status=1
timeout 150 "$PY" "$WORK/check.py" qlora "$BASE" "$OUT_DIR" 2>&1 | tee "$OUT_DIR/qlora.log" | grep -E "^(qlora|FAILED)" \
  || status=1
for stage in zero2 zero3 fsdp2; do
  timeout 110 "$TORCHRUN" --standalone --nproc_per_node 1 "$WORK/check.py" "$stage" "$BASE" "$OUT_DIR" 2>&1 \
    | tee "$OUT_DIR/$stage.log" | grep -E "^($stage|FAILED)" || status=1
done
[ "$status" -eq 0 ] && echo "GPU check passed" || echo "GPU check FAILED (see $OUT_DIR/*.log)"
exit "$status"
