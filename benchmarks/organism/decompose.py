"""`python -m benchmarks.organism.decompose --world W.yaml --bases 3 --seeds 3 --json OUT.json`

Where the drift that survives GRASP lives. Per (base, seed), the naive run, `grasp-default` and the same
identified directions used by CAFT (`caft-identified-auto`) and by `clamp` (`grasp-clamp-global-k1-auto`) are
trained, and each model's mean residual shift from the base, `delta = mean(h - h_base)` on the cue-free
other-topic prompts at the flavour-predicting position, is split per layer against the supervised persona
direction `v` and the identified basis `U` (the one every method here uses):

* `shift`: `delta . v / |v|^2`, the lab's persona shift;
* `via_u`: `(U U^T delta) . v / |v|^2`, the part of it carried inside the identified subspace;
* `via_perp`: `shift - via_u`, the part carried outside it;
* `along_u`: `|U^T delta| / |delta|`, how much of the whole shift lies in the subspace;

(means over layers) beside DRIFT and TASK. If GRASP's leftover drift came from the projected directions moving
anyway (their content changed by side effects, which projection does not forbid and ablation does), `via_u`
would stay near the naive run's; if it comes from the part of the factor the identification missed, `via_perp`
carries it.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .common import add_design_arguments, labs, world_path, write_json  # noqa: E402

METHODS = ["naive", "grasp-default", "caft-identified-auto", "grasp-clamp-global-k1-auto"]
PARTS = ("shift", "via_u", "via_perp", "along_u")


def split_shift(delta: torch.Tensor, basis: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """One layer's shift `delta` (d) split against the persona direction `v` (d) and an orthonormal `basis`
    (d x k), in float64: `shift = via_u + via_perp` exactly, `along_u` in [0, 1]."""
    delta, basis, v = delta.double(), basis.double(), v.double()
    inside = basis @ (basis.T @ delta)
    shift, via_u = float(delta @ v / (v @ v)), float(inside @ v / (v @ v))
    along = float(inside.norm() / delta.norm()) if delta.norm() > 0 else 0.0
    return {"shift": shift, "via_u": via_u, "via_perp": shift - via_u, "along_u": along}


def decompose(lab, seed: int, methods=METHODS) -> list[dict]:
    """DRIFT, TASK and the layer-mean split of each method's persona shift, for one seed of one base."""
    from grasp_organism import methods as registry
    from grasp_organism.metrics import block_outputs, identification

    directions = lab.identified(seed, k=1, scope="global", step=lab.naive(seed).stop_step)  # grasp-default's
    other = lab.sets["other"]
    rows = []
    for name in methods:
        model, extra = registry.train(lab, name, seed)
        metrics = extra.get("metrics") or lab.measure(model)
        outputs = block_outputs(model, other.input_ids, other.positions[-1] + 1)
        layers = [
            split_shift((outputs[l] - lab.base_outputs[l]).mean(0), directions.bases[l], v)
            for l, v in lab.persona.items()
        ]
        parts = {key: statistics.mean(layer[key] for layer in layers) for key in PARTS}
        coverage = statistics.mean(identification(directions, lab.persona).values())
        rows.append(
            dict(method=name, seed=seed, drift=metrics["drift"], task=metrics["task"], identification=coverage, **parts)
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.organism.decompose",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_design_arguments(parser, bases=3, seeds=3)
    parser.add_argument("--json", default=None, help="write every row here")
    args = parser.parse_args(argv)

    import benchmarks.organism.baselines  # noqa: F401  (registers caft-identified-auto)

    rows = []
    for base, lab in labs(args):
        for seed in range(args.seeds):
            for row in decompose(lab, seed):
                rows.append(dict(base=base, **row))
                print(
                    " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()),
                    flush=True,
                )
    print("\nmedian over bases x seeds:")
    for name in METHODS:
        mine = [r for r in rows if r["method"] == name]
        print(
            f"{name:28s} "
            + "  ".join(f"{k} {statistics.median(r[k] for r in mine):+.3f}" for k in ("drift", "task", *PARTS))
        )
    if args.json:
        write_json(args.json, {"world": Path(world_path(args)).name, "rows": rows})


if __name__ == "__main__":
    main()
