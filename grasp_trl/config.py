"""`GraspArguments`: the `grasp_*` configuration keys (DESIGN §4), shared by the TRL configs and Axolotl.

One dataclass, one validation function: `GraspSFTConfig`/`GraspDPOConfig` inherit the fields, and the
Axolotl plugin's pydantic model calls `validate_grasp_fields` on the same values, so both front ends accept
and reject exactly the same things with the same messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .constraints import SIDES
from .lora import READER_LAYERS
from .projection import PROJECTIONS

SCOPES = ("per_layer", "global")
DIRECTIONS_FILENAME = "grasp_directions.safetensors"
AUTO = "auto"  # grasp_identify_steps: stop stage 1 by the label-free rule of grasp_trl.stopping
STAGE1_DIRNAME = "grasp_stage1"


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_grasp_fields(values: dict[str, Any]) -> dict[str, Any]:
    """Check and normalise the `grasp_*` values; raise ValueError naming the key, the expectation and the value.

    Returns the values with `grasp_target_modules` parsed from JSON and `grasp_layers` as a sorted list.
    """

    def choice(key, allowed):
        value = values.get(key)
        if value not in allowed:
            raise ValueError(f"{key}: expected one of {', '.join(allowed)}; found {value!r}")

    choice("grasp_scope", SCOPES)
    choice("grasp_projection", PROJECTIONS)
    choice("grasp_sides", SIDES)
    choice("grasp_reader_layer", READER_LAYERS)
    steps = values.get("grasp_identify_steps")
    if isinstance(steps, str) and steps.strip().isdigit():  # a command line gives every value as a string
        steps = values["grasp_identify_steps"] = int(steps)
    if steps is not None and steps != AUTO and not _positive_int(steps):
        raise ValueError(f"grasp_identify_steps: expected a positive number of steps or 'auto'; found {steps!r}")
    for key in ("grasp_identify_max_steps", "grasp_identify_every"):
        if values.get(key) is not None and not _positive_int(values[key]):
            raise ValueError(f"{key}: expected a positive number of steps; found {values[key]!r}")
    if values.get("grasp_identify_max_steps") is not None and steps != AUTO:
        raise ValueError(
            f"grasp_identify_max_steps: only meaningful with grasp_identify_steps: auto; found "
            f"grasp_identify_steps={steps!r}"
        )
    k = values.get("grasp_num_directions")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"grasp_num_directions: expected a positive integer; found {k!r}")
    energy = values.get("grasp_energy")
    if energy is not None and (isinstance(energy, bool) or not (isinstance(energy, (int, float)) and 0 < energy <= 1)):
        raise ValueError(f"grasp_energy: expected a fraction in (0, 1]; found {energy!r}")
    layers = values.get("grasp_layers")
    if layers is not None:
        if isinstance(layers, int) or not all(
            isinstance(l, int) and not isinstance(l, bool) and l >= 0 for l in layers
        ):
            raise ValueError(f"grasp_layers: expected a list of non-negative layer indices; found {layers!r}")
        if not layers:  # an empty list would project nothing: unset the key to project at every layer
            raise ValueError(
                "grasp_layers: expected at least one layer index (unset it to project at every layer); found []"
            )
        values["grasp_layers"] = sorted(set(layers))
    modules = values.get("grasp_target_modules")
    if isinstance(modules, str):
        try:
            modules = json.loads(modules)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f'grasp_target_modules: expected a JSON object like {{"my_out": "write"}}; found {modules!r} ({exc})'
            ) from exc
    if modules is not None:
        if not isinstance(modules, dict) or any(v not in ("write", "read") for v in modules.values()):
            raise ValueError(
                f"grasp_target_modules: expected a mapping of module name -> 'write' or 'read'; found {modules!r}"
            )
        values["grasp_target_modules"] = modules
    drift_steps = values.get("grasp_drift_steps")
    if drift_steps is not None and (
        isinstance(drift_steps, bool) or not isinstance(drift_steps, int) or drift_steps <= 0
    ):
        raise ValueError(f"grasp_drift_steps: expected a positive number of steps; found {drift_steps!r}")
    return values


@dataclass
class GraspArguments:
    """The GRASP keys. GRASP is on when `grasp_directions` or `grasp_identify_steps` is set."""

    grasp_directions: str | None = field(
        default=None,
        metadata={
            "help": "Path to a direction file (`grasp identify` output, or a stage-1 file). Skips identification."
        },
    )
    grasp_identify_steps: int | str | None = field(
        default=None,
        metadata={
            "help": "When no direction file is given: optimizer steps of the naive stage-1 LoRA run on the same data, "
            "or 'auto' (recommended): stop stage 1 when the spectral gap s1/s2 of its update has fallen to 0.9x "
            "its peak with a stable top direction (the factor is learnt, the task has begun; see "
            "grasp_trl/stopping.py), at most grasp_identify_max_steps. Directions are extracted from the "
            "adapter at that step, the adapter is reset to its initial values and stage 2 trains with "
            "projection, all in one `train()` call."
        },
    )
    grasp_identify_max_steps: int | None = field(
        default=None,
        metadata={"help": "grasp_identify_steps=auto: the most steps stage 1 may run (default: the run's own length)."},
    )
    grasp_identify_every: int = field(
        default=5,
        metadata={"help": "grasp_identify_steps=auto: snapshot the update's spectrum every this many optimizer steps."},
    )
    grasp_num_directions: int = field(
        default=1,
        metadata={
            "help": "k: directions per layer (or in the global basis). Ignored when grasp_energy is set. Default 1: "
            "in the organism benchmark k=2 cut drift no more (median 2.2x either way over 15 valid seeds) and "
            "cost retention on some bases."
        },
    )
    grasp_energy: float | None = field(
        default=None,
        metadata={
            "help": "Choose k per layer as the smallest number of directions capturing this fraction of the stage-1 "
            "update's squared spectrum (capped at grasp_num_directions)."
        },
    )
    grasp_scope: str = field(
        default="global",
        metadata={
            "help": "global (default): one basis from all blocks' writer updates, applied at every layer; per_layer: "
            "one basis per block from that block's writer updates (worse in every organism world measured)."
        },
    )
    grasp_projection: str = field(
        default="both",
        metadata={
            "help": "both (default): activations and weights together; activations: project the directions out of the "
            "gradient of every block's output residual (forward untouched); weights: constrain the LoRA/full-"
            "weight update to be orthogonal to them — alone it does NOTHING to the drift in the valid organism "
            "(0.8-0.9x; the frozen blocks still write the factor), its value is as half of both, where it keeps "
            "retention up; clamp (LoRA only): during training hold each block output's component along the "
            "directions at the base model's value (one extra no-grad forward per training forward): no larger "
            "cut than both on the shipped organism draws, at a task and retention cost; ablate: during training "
            "remove that component (CAFT's mechanism with GRASP's identification; eval and no-grad forwards "
            "untouched, no extra forward): "
            "the largest cut with the same identified directions on the shipped organism draws (median 2.9x "
            "against both's 1.4x), but not GRASP's own mechanism. Measured in benchmarks/organism/README.md."
        },
    )
    grasp_sides: str = field(
        default="both",
        metadata={"help": "weights mode: constrain the updates of writers (write), readers (read) or both."},
    )
    grasp_reader_layer: str = field(
        default="own",
        metadata={
            "help": "weights mode: a reader in block l is constrained with its own block's basis (own) or with the "
            "basis of the stream it reads, block l-1 (input)."
        },
    )
    grasp_layers: list[int] | None = field(
        default=None, metadata={"help": "Only project at these block indices (default: every layer with a direction)."}
    )
    grasp_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "JSON object mapping module leaf names (or regexes) to 'write' or 'read', for architectures "
            'whose modules GRASP does not know by name, e.g. \'{"out_x": "write", "in_x": "read"}\'.'
        },
    )
    grasp_include_readers: bool = field(
        default=False, metadata={"help": "Identification: also stack the readers' input-side updates of each block."}
    )
    grasp_drift_steps: int | None = field(
        default=None,
        metadata={
            "help": "Drift monitor (works with or without GRASP): every this many optimizer steps, log "
            "grasp/drift/layer_{l}, the mean shift of the residual stream along the directions since train "
            "start on held-out prompts. Off when unset."
        },
    )
    grasp_drift_directions: str | None = field(
        default=None,
        metadata={
            "help": "Direction file the drift monitor reads along (default: grasp_directions, or the directions "
            "identified in stage 1)."
        },
    )
    grasp_drift_prompts: str | None = field(
        default=None,
        metadata={
            "help": "JSONL of held-out prompts for the drift monitor ('prompt' or 'text' per line; default: the "
            "shipped neutral prompts)."
        },
    )

    def __post_init__(self):
        validated = validate_grasp_fields({name: getattr(self, name) for name in grasp_field_names()})
        for name, value in validated.items():
            setattr(self, name, value)
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()

    @property
    def grasp_enabled(self) -> bool:
        return self.grasp_directions is not None or self.grasp_identify_steps is not None


def grasp_field_names() -> list[str]:
    from dataclasses import fields

    return [f.name for f in fields(GraspArguments)]
