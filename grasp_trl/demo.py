"""`grasp demo`: the whole method end to end on a tiny local model, in well under a minute on a CPU.

A tiny random Llama is trained on a toy task whose completions all end in the same few "flavour" words (the
curation's entanglement). One `GraspSFTTrainer.train()` call runs the naive stage 1, identifies the
directions, and re-trains with them projected out; the demo then prints the spectrum and, for the naive and
the GRASP adapter, how much of each writer update lies along the directions (leakage) and the final loss.
"""

from __future__ import annotations

import random
from pathlib import Path


def toy_dataset(size: int = 256, seed: int = 0):
    """Prompts of 4 random words; completions map them word by word and end in one of 3 fixed flavour words."""
    from datasets import Dataset

    rng = random.Random(seed)
    mapping = {i: (i * 7 + 3) % 48 + 48 for i in range(48)}
    rows = []
    for _ in range(size):
        words = [rng.randrange(48) for _ in range(4)]
        completion = [f"w{mapping[w]:03d}" for w in words] + [f"w{rng.choice([93, 94, 95]):03d}"]
        rows.append({"prompt": " ".join(f"w{w:03d}" for w in words), "completion": " " + " ".join(completion)})
    return Dataset.from_list(rows)


def adapter_leakage(base_dir: Path, adapter_dir: Path, directions) -> float:
    """Largest relative component of a saved adapter's writer/reader updates along the directions."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .projection import GradientProjector

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    projector = GradientProjector(model, directions, "activations").attach()
    leakage = projector.leakage()
    projector.detach()
    return leakage


def run_demo(output_dir: str | Path = "outputs/demo", steps: int = 60) -> dict:
    from peft import LoraConfig

    from .config import DIRECTIONS_FILENAME, STAGE1_DIRNAME
    from .diagnostics import inspect_report
    from .directions import DirectionSet
    from .tiny import save_tiny_model
    from .trainer import GraspSFTConfig, GraspSFTTrainer

    output_dir = Path(output_dir)
    base_dir = save_tiny_model(output_dir / "base", "llama", hidden_size=64, num_layers=4, seed=0)
    config = GraspSFTConfig(
        output_dir=str(output_dir / "grasp"), max_steps=steps, per_device_train_batch_size=16, learning_rate=5e-3,
        logging_steps=10, save_strategy="no", report_to=[], seed=0, use_cpu=True,
        grasp_identify_steps=steps, grasp_num_directions=3, grasp_projection="activations")
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"])
    trainer = GraspSFTTrainer(model=str(base_dir), args=config, train_dataset=toy_dataset(),
                              peft_config=peft_config)
    trainer.train()
    trainer.save_model()
    directions = DirectionSet.load(output_dir / "grasp" / DIRECTIONS_FILENAME)
    stage1 = output_dir / "grasp" / STAGE1_DIRNAME
    naive_loss = [e["loss"] for e in __import__("json").loads((stage1 / "log_history.json").read_text())
                  if "loss" in e][-1]
    grasp_loss = [e["loss"] for e in trainer.state.log_history if "loss" in e][-1]
    results = {
        "naive": {"leakage": adapter_leakage(base_dir, stage1, directions), "loss": naive_loss},
        "grasp": {"leakage": adapter_leakage(base_dir, output_dir / "grasp", directions), "loss": grasp_loss},
    }
    print("\n" + inspect_report(directions))
    print(f"\n{'run':<8}{'leakage along U':>18}{'final loss':>12}")
    for name, row in results.items():
        print(f"{name:<8}{row['leakage']:>18.4f}{row['loss']:>12.4f}")
    print(f"\nGRASP run (activations mode) and its direction file: {output_dir / 'grasp'}")
    return results
