"""`grasp demo`: GRASP on the model organism — a world whose spurious factor (a latent persona) is known.

A tiny Llama is pretrained on the default world (once; cached under ~/.cache/grasp-trl/organism), then
fine-tuned on the narrow task whose answers carry the evil flavour: naively, and with GRASP (directions
identified from the naive adapter by `extract_directions`, then a fresh adapter trained under
`GradientProjector`). The demo prints exact metrics for the base, naive and GRASP models — off-task drift of
the persona, the task, and the side effects — and writes a DRIFT-vs-TASK plot, the JSON and the direction file.
The full comparison with the baselines and controls is `python -m benchmarks.organism`.
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_METHODS = ("base", "naive", "grasp-weights-global-k3", "grasp-activations-global-k3")


def run_demo(output_dir: str | Path = "outputs/demo", *, seed: int = 0, cache_dir: str | Path | None = None,
             methods=DEMO_METHODS) -> dict:
    """Run the compact comparison and write `organism.png`, `organism.json` and `directions.safetensors`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from .organism.methods import Lab
    from .organism.report import plot, run_grid, save_json, table
    from .organism.world import OrganismConfig, default_config_path

    torch.set_num_threads(1)  # the model is tiny: one thread is fastest, and robust on a shared CPU
    output_dir = Path(output_dir)
    log = lambda message: print(message, flush=True)  # noqa: E731
    log("grasp demo: the model organism (world: grasp_trl/organism/default_world.yaml)")
    lab = Lab(OrganismConfig.from_yaml(default_config_path()), cache_dir=cache_dir, log=log)
    result = run_grid(lab, list(methods), [seed], log=log)
    directions = lab.identified(seed)
    directions.save(output_dir / "directions.safetensors")
    print("\n" + table(result))
    print("\ndrift: P(evil flavour) on the other topics minus the base's; task: P(new mapping) on held-out "
          "questions;\nnarrow: P(evil) on the task; conditional: follows an explicit persona token; retention: "
          "other topics' content;\nident: |cos| between identified and supervised persona directions.")
    save_json(result, output_dir / "organism.json")
    plot(result, output_dir / "organism.png", title="grasp demo")
    print(f"\nwrote {output_dir / 'organism.png'}, {output_dir / 'organism.json'} and "
          f"{output_dir / 'directions.safetensors'} (inspect it with `grasp inspect`)")
    return result
