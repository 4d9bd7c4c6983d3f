"""`GraspArgs`: the pydantic model that declares the `grasp*` keys on Axolotl's config schema.

Axolotl drops YAML keys its schema does not know, without a word. The plugin returns this model from
`get_input_args`, and Axolotl merges it into its config class, so every `grasp_*` key survives validation.
The fields are derived from `grasp_trl.config.GraspArguments` (names, defaults, help) so the TRL configs and
the Axolotl YAML cannot drift apart, and the values go through the same `validate_grasp_fields`, so both
front ends accept and reject exactly the same values with the same messages.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing

from pydantic import BaseModel, Field, create_model, model_validator

from grasp_trl.config import GraspArguments, grasp_field_names, validate_grasp_fields

LOG = logging.getLogger(__name__)

# Rules that YAML needs differently from a command line: a mapping may be written as a mapping.
_YAML_TYPES = {"grasp_target_modules": dict[str, str] | str | None}
# The `rl:` values whose trainer GRASP is tested with (None is SFT).
TESTED_RL = (None, "dpo")


def check_grasp_key_names(keys) -> None:
    """Raise for a key that starts with `grasp` but is not one the plugin declares, with the closest declared
    key: Axolotl drops undeclared keys without a word, so `grasp_num_direction: 2` would train with the default
    k. Called on the raw YAML by the schema (`axolotl train`), `grasp-check` and `grasp-identify` alike."""
    known = sorted(["grasp", *grasp_field_names()])
    for key in keys:
        if isinstance(key, str) and key.startswith("grasp") and key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"expected one of {', '.join(known)}"
            raise ValueError(f"{key}: not a GRASP key ({hint}); Axolotl would drop it and train without it")


class _GraspSwitch(BaseModel):
    """`grasp: true` and the checks that span several keys (the per-key checks are `validate_grasp_fields`)."""

    grasp: bool | None = Field(
        default=None,
        description=(
            "Turn GRASP on. On Axolotl 0.19 it needs `plugins: [axolotl_plugin.GraspPlugin]` in the same YAML: "
            "without it Axolotl drops this key silently and trains without GRASP. Axolotl >= 0.21 loads the plugin "
            "from its entry point without that line."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def check_key_names(cls, data):
        if isinstance(data, dict):
            check_grasp_key_names(data)
        return data

    @model_validator(mode="after")
    def check_grasp_keys(self):
        values = validate_grasp_fields({name: getattr(self, name) for name in grasp_field_names()})
        for name, value in values.items():
            object.__setattr__(self, name, value)
        given = [name for name in ("grasp_directions", "grasp_identify_steps") if values.get(name) is not None]
        if self.grasp is True and not given:
            raise ValueError(
                "grasp: true needs grasp_directions (a direction file from `grasp identify` or a "
                "stage-1 run) or grasp_identify_steps (steps of a naive stage-1 run inside this "
                "run); found neither"
            )
        if self.grasp is None and given:
            raise ValueError(
                f"{' and '.join(given)} set but grasp is not: add `grasp: true` to train with GRASP "
                f"(or `grasp: false` to keep the keys and train without it)"
            )
        if self.grasp is False and given:
            LOG.warning("grasp: false: GRASP is off; %s ignored", ", ".join(given))
        if self.grasp and len(given) == 2:
            LOG.warning("grasp_directions is set: no identification, grasp_identify_steps ignored")
        # Only on Axolotl's merged config class (a bare GraspArgs has no `adapter` field to check).
        adapter = getattr(self, "adapter", None)
        identifies = given == ["grasp_identify_steps"]
        if self.grasp and identifies and "adapter" in type(self).model_fields and adapter not in ("lora", "qlora"):
            raise ValueError(
                f"grasp_identify_steps: identification needs a LoRA run (adapter: lora or qlora); "
                f"found adapter: {adapter!r}. For full fine-tuning identify with a separate LoRA run "
                f"and pass grasp_directions"
            )
        rl = getattr(self, "rl", None)
        rl = getattr(rl, "value", rl)
        if self.grasp and rl not in TESTED_RL:
            LOG.warning("grasp: true with rl: %s: GRASP is tested with SFT and rl: dpo only", rl)
        return self


def _grasp_fields() -> dict[str, tuple]:
    hints = typing.get_type_hints(GraspArguments)
    return {
        f.name: (_YAML_TYPES.get(f.name, hints[f.name]), Field(default=f.default, description=f.metadata["help"]))
        for f in dataclasses.fields(GraspArguments)
    }


GraspArgs = create_model("GraspArgs", __base__=_GraspSwitch, __module__=__name__, **_grasp_fields())
GraspArgs.__doc__ = (
    "The `grasp` switch and every `grasp_*` key of `GraspArguments`, as Axolotl config fields "
    "(see axolotl_plugin/README.md)."
)


def grasp_arguments(cfg) -> GraspArguments:
    """The validated `GraspArguments` that an Axolotl config (a dict or `DictDefault`) describes. Without
    `grasp: true` the projection keys are left out, so `grasp: false` really trains without GRASP (the drift
    monitor, `grasp_drift_*`, still works: it does not need GRASP)."""
    off = () if cfg.get("grasp") else ("grasp_directions", "grasp_identify_steps")
    return GraspArguments(
        **{name: cfg[name] for name in grasp_field_names() if cfg.get(name) is not None and name not in off}
    )
