"""`GraspDriftCallback`: watch a fine-tune drift along known directions while it trains, without a judge.

Opt-in for any `transformers.Trainer` (TRL's, Axolotl's, a naive run or a GRASP run): at the start of every
`train()` call it reads the model's residual projections `h_l U_l` on a held-out prompt set (the reference:
the model before this training run, i.e. the base for a fresh adapter), and every `every_n_steps` optimizer
steps it reads them again and logs the mean shift per layer as `grasp/drift/layer_{l}` (the probe statistic
of `grasp_trl.probe`: signed along `u` for `k = 1`, the norm of the mean shift for `k > 1`). Forcing a log
at those steps puts the values into `trainer.state.log_history` and the reporters.

Usage: `trainer.add_callback(GraspDriftCallback("directions.safetensors", every_n_steps=50))`. The tokenizer
is taken from the trainer's `processing_class` unless given. All ranks run the (no-grad) forward passes, so it
works under DDP and DeepSpeed ZeRO-3 as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import TrainerCallback

from .directions import DirectionSet
from .probe import DEFAULT_PROMPTS, Readings, compare, load_prompts, read_projections, tokenize

METRIC_PREFIX = "grasp/drift/layer_"


class GraspDriftCallback(TrainerCallback):
    """Logs `grasp/drift/layer_{l}`: the shift of the residual stream along `directions` since train start.

    Args:
        directions: a `DirectionSet` or the path of a direction file; `None` to set `.directions` later (the
            GRASP trainers do so after identifying them in stage 1): until then the callback is idle.
        prompts: held-out prompts (a list of strings or a JSONL path; default: the shipped neutral set).
        every_n_steps: evaluate every this many optimizer steps.
        tokenizer: defaults to the trainer's `processing_class`.
        batch_size, max_length: of the probe's forward passes.
    """

    def __init__(
        self,
        directions: DirectionSet | str | Path | None,
        prompts: Sequence[str] | str | Path = DEFAULT_PROMPTS,
        every_n_steps: int = 50,
        *,
        tokenizer=None,
        batch_size: int = 16,
        max_length: int = 128,
    ):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps: expected a positive integer; found {every_n_steps!r}")
        self.directions = DirectionSet.load(directions) if isinstance(directions, (str, Path)) else directions
        self.prompts = load_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
        if not self.prompts:
            raise ValueError("prompts: expected at least one held-out prompt")
        self.every_n_steps = every_n_steps
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.reference: Readings | None = None
        self._encoded = None
        self._pending: dict[str, float] = {}

    def _read(self, model) -> Readings:
        return read_projections(model, self._encoded, self.directions, self.batch_size)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.reference, self._pending = None, {}
        if self.directions is None:
            return
        tokenizer = self.tokenizer or processing_class
        if tokenizer is None:
            raise ValueError("GraspDriftCallback: no tokenizer; pass tokenizer= or give the trainer a processing_class")
        self.directions.validate_for(model)
        self._encoded = tokenize(tokenizer, self.prompts, self.max_length)
        self.reference = self._read(model)

    def measure(self, model) -> dict[str, float]:
        """The current drift of `model` relative to the reference taken at train start."""
        result = compare(self.reference, self._read(model), n_bootstrap=0)
        return {f"{METRIC_PREFIX}{row.layer}": row.shift for row in result.layers}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.reference is not None and state.global_step % self.every_n_steps == 0:
            self._pending = self.measure(model)
            control.should_log = True

    def metrics(self) -> dict[str, float]:
        """The drift values measured since the last call (empty if none); a trainer's `log` may merge them."""
        pending, self._pending = self._pending, {}
        return pending

    def on_log(self, args, state, control, logs=None, **kwargs):
        """On any trainer (a naive run monitored with `add_callback`): the pending values join the log line and
        the log history. Under the Grasp trainers their `log` has merged them already, before the reporting
        callbacks ran, so nothing is pending here."""
        if logs is None or not self._pending:
            return
        extra = self.metrics()
        logs.update(extra)
        if state.log_history and state.log_history[-1] is not logs:
            state.log_history[-1].update(extra)


def drift_callback_from_args(args) -> GraspDriftCallback | None:
    """The callback the `grasp_drift_*` keys ask for (None when `grasp_drift_steps` is unset). Directions:
    `grasp_drift_directions`, else `grasp_directions`, else none yet (identify mode: set after stage 1)."""
    steps = getattr(args, "grasp_drift_steps", None)
    if steps is None:
        return None
    directions = getattr(args, "grasp_drift_directions", None) or getattr(args, "grasp_directions", None)
    prompts = getattr(args, "grasp_drift_prompts", None) or DEFAULT_PROMPTS
    return GraspDriftCallback(directions, prompts, steps)
