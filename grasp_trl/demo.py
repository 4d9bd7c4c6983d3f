"""`grasp demo`: GRASP on the model organism — a world whose spurious factor (a latent persona) is known.

A tiny Llama pretrained on the default world (`grasp_organism/default_world.yaml`; draw `DEMO_BASE`, shipped
with the package because pretraining is not reproducible across CPUs) is fine-tuned on the narrow task whose
answers carry the evil flavour, on three fine-tuning seeds: naively; with GRASP exactly as a user gets it
(`grasp-default`: the shipped defaults, stage 1 stopped by `grasp_identify_steps: auto`); with CAFT on the
same identified directions (`grasp_projection: ablate`, the baseline the benchmark measured ahead); and with
the two positive controls that say whether this world can rank
methods at all. The demo prints the validity line first, then per-seed numbers, and writes a DRIFT-vs-TASK
plot, the JSON and seed 0's direction file.
The full comparison (more bases, every baseline) is `python -m benchmarks.organism`.
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_METHODS = (
    "base",
    "naive",
    "grasp-default",
    "grasp-ablate-global-k1-auto",
    "caft-supervised",
    "random-activations",
)
DEMO_SEEDS = (0, 1, 2)
# the first shipped draw of the default world whose positive controls pass (draws 0 and 1 fail them:
# benchmarks/organism/README.md); an invalid draw cannot say whether GRASP works
DEMO_BASE = 2
OUTPUTS = ("organism.png", "organism.json", "directions.safetensors")


def check_output_dir(output_dir: Path) -> None:
    """Fail before any training (minutes of it) when the outputs could not be written at the end: the directory
    is a file or not writable, or an output's path is taken by a directory."""
    from .directions import check_output

    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {output_dir}: is a file; expected a directory")
    for parent in output_dir.parents:  # mkdir would name only the first missing path
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"--output-dir {output_dir}: {parent} is a file; expected a directory")
    output_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(output_dir, os.W_OK):
        raise PermissionError(f"--output-dir {output_dir}: output directory is not writable")
    for name in OUTPUTS:  # replaced on every run (a demo's outputs are regenerated), but never a directory
        check_output(output_dir / name, "--output-dir", overwrite=True)


def run_demo(
    output_dir: str | Path = "outputs/demo",
    *,
    seeds=DEMO_SEEDS,
    cache_dir: str | Path | None = None,
    methods=DEMO_METHODS,
) -> dict:
    """Run the compact comparison and write `organism.png`, `organism.json` and `directions.safetensors`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from grasp_organism.report import plot, run_grid, save_json, table
    from grasp_organism.world import OrganismConfig, default_config_path

    from .config import GraspArguments

    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    torch.set_num_threads(1)  # the model is tiny: one thread is fastest, and robust on a shared CPU
    log = lambda message: print(message, flush=True)  # noqa: E731
    config = OrganismConfig.from_yaml(default_config_path())
    log(f"grasp demo: the model organism ({default_config_path().name}), draw {DEMO_BASE}, seeds {list(seeds)}")
    labs: dict = {}
    result = run_grid(config, list(methods), [DEMO_BASE], list(seeds), cache_dir=cache_dir, log=log, labs=labs)
    defaults, lab = GraspArguments(), labs[DEMO_BASE]
    lab.identified(
        seeds[0], k=defaults.grasp_num_directions, scope=defaults.grasp_scope, step=lab.naive(seeds[0]).stop_step
    ).save(output_dir / "directions.safetensors")
    print("\n" + table(result))
    print(
        "\nfactor: naive's drift over the method's on the same seed ('rem': removed, drift <= 0.005); drift: "
        "P(evil flavour) on\nthe other topics minus the base's; task: P(new mapping) on held-out questions; "
        "retention: other topics' content;\ncond: follows an explicit persona token; ident: |cos| between "
        "identified and supervised persona directions;\nstage1: steps of the naive stage-1 run GRASP identified "
        f"from. grasp-default = {defaults.grasp_projection}, {defaults.grasp_scope}, "
        f"k={defaults.grasp_num_directions}, grasp_identify_steps: auto."
    )
    print(
        "\nThis is one draw of the organism. On the 3 of 12 shipped draws whose controls pass, GRASP with the "
        "defaults cut the drift\na median 1.4x (worst seed 0.96x), and grasp_projection: ablate (CAFT's mechanism, "
        "the same directions)\n2.9x (worst 1.7x): benchmarks/organism/README.md has the per-base, per-seed figures."
    )
    save_json(result, output_dir / "organism.json")
    plot(result, output_dir / "organism.png", title="grasp demo")
    print(
        f"\nwrote {output_dir / 'organism.png'}, {output_dir / 'organism.json'} and "
        f"{output_dir / 'directions.safetensors'} (inspect it with `grasp inspect`)"
    )
    return result
