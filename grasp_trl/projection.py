"""Stage 2 of GRASP: keep the directions out of the learning signal. Pure torch; no trainer knowledge.

Three mechanisms (DESIGN §1):

* `activations` — a forward hook on every decoder block registers a tensor hook on the block's output `h_l`;
  in the backward pass that hook replaces the gradient `g` by `g - (g U_l) U_l^T`. The forward pass is
  untouched. Everything upstream of `h_l` (adapter, frozen weights as a route, earlier blocks) receives no
  first-order signal to move `h_l` along `U_l`. Works with LoRA, QLoRA, full fine-tuning, any optimizer and
  any engine that runs autograd (DDP, DeepSpeed ZeRO): it acts before any parameter gradient exists.
  Gradient checkpointing: the block's hooks run again during recomputation; the hook is registered whenever
  grad mode is on, so it lands on the output autograd actually traverses in both the reentrant (recomputed
  output) and the non-reentrant (original output) implementations, and projection is idempotent anyway.

* `weights` — per-parameter *constraints* `U^T (W - W_anchor) = 0` (residual side on dim 0: writer LoRA B,
  full writer weights) or `(W - W_anchor) U = 0` (dim 1: reader LoRA A, full reader weights). The gradient is
  projected before clipping and the optimizer see it (so Adam's moments stay honest): in a per-parameter
  tensor hook (`grad_hooks=True`, the default; under DeepSpeed it runs before reduction), or, where `.grad`
  holds the whole gradient after backward, by `project_gradients()` in one batched matmul per group of
  same-shaped factors (the trainers' choice without DeepSpeed: cheaper than one hook per factor, see
  benchmarks/README.md). After every optimizer step `project_parameters()` restores
  the constraint exactly (Adam's per-coordinate scaling otherwise re-introduces a component along `U`).
  LoRA constraints have a zero anchor (the update `B A` itself must be orthogonal); full fine-tuning keeps the
  pretrained component `U^T W0` / `W0 U` captured at `attach()`.

* `clamp` — during training only, each hooked block output's component along `U_l` is replaced by the base
  model's on the same batch: `h <- h - (h U) U^T + (h_base U) U^T`. A forward pre-hook on the model runs the
  base first (the PEFT adapter disabled, no grad), recording `h_base U` at every hooked block; the training
  forward then clamps to it. The pretrained content along `U_l` stays exactly, and no parameter can gain
  anything by moving it: the gradient of the clamped output along `U_l` is zero, as in `activations`, and in
  addition the adapter's effect along `U_l` never reaches later blocks. One extra no-grad forward per training
  forward (each micro-batch); LoRA only (the adapter-disabled forward is the base; full fine-tuning would need a
  frozen copy of the base). Gradient checkpointing is fine when each training forward is followed by its
  backward before the next training forward (as in TRL's SFT and DPO, gradient accumulation included): the
  recomputation clamps to the reference recorded for it, which no-grad forwards in between (DPO's reference
  pass) leave in place. Two training forwards before one backward under checkpointing would recompute the
  first against the second's reference (the shape check catches only a different shape).

* `ablate` — CAFT's mechanism with GRASP's directions: during training only, each hooked block output loses
  its component along `U_l`: `h <- h - (h U) U^T`. Downstream blocks then never see the directions while the
  adapter learns, so nothing can learn to write *or read* them; at inference nothing is ablated and the
  pretrained content along `U_l` flows as in the base. No extra forward; works for LoRA, QLoRA and full
  fine-tuning alike. Not GRASP's own mechanism (the paper's claim is that projection keeps the pretrained
  content *during* training, which ablation does not); it is here because in the organism benchmark it cut the
  drift more than any projection mode with the same identified directions (benchmarks/organism/README.md).
  Edited: block forwards inside a model forward run in train mode with grad enabled (under reentrant gradient
  checkpointing those run with grad off, hence the model-level flag), and any grad-enabled block forward in
  train mode (checkpointing's recomputation in backward). Untouched: eval mode, and no-grad forwards in train
  mode (DPO's reference pass, generation).

All projection math runs in fp32 and is cast back to the tensor's dtype.
"""

from __future__ import annotations

import functools
import time
from typing import Literal

import torch
from torch import nn

from .constraints import SIDE_WORDS, SIDES, Constraint, ConstraintGroup, Sides, find_constraints, group_constraints
from .directions import DirectionSet
from .lora import READER_LAYERS, ReaderLayer, active_adapter, residual_side
from .modules import check_target_modules, decoder_blocks

Projection = Literal["activations", "weights", "both", "clamp", "ablate"]
PROJECTIONS = ("activations", "weights", "both", "clamp", "ablate")
FORWARD_EDITS = ("clamp", "ablate")  # the modes that edit block outputs in training forwards


def remove_component(
    x: torch.Tensor,
    basis: torch.Tensor,
    dim: int,
    anchor: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`x - U (U^T x - C)` (`dim=0`) or `x - (x U - C) U^T` (`dim=1`), and the coefficients `U^T x` / `x U`.

    fp32 `x` of shape `(rows, cols)` with `basis` `(d, k)`, or a stack `(n, rows, cols)` with one basis per
    item `(n, d, k)`: same-shaped LoRA factors are projected in one batched matmul. `anchor` (`C`, shaped
    like the coefficients) is the component to keep; None keeps none. One fused multiply-subtract writes the
    result, into `out` when given (`out=x` works in place).
    """
    fused = torch.baddbmm if x.dim() == 3 else torch.addmm
    if dim == 0:
        coefficients = basis.mT @ x
        excess = coefficients if anchor is None else coefficients - anchor
        return fused(x, basis, excess, alpha=-1, out=out), coefficients
    coefficients = x @ basis
    excess = coefficients if anchor is None else coefficients - anchor
    return fused(x, excess, basis.mT, alpha=-1, out=out), coefficients


def _as_matrix(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`x` in fp32 as a matrix whose rows (`dim=0`) or columns (`dim=-1`/`1`) live in the residual stream; a
    view of `x` when it is contiguous fp32."""
    x32 = x.float()
    return x32.reshape(x32.shape[0], -1) if dim == 0 else x32.reshape(-1, x32.shape[-1])


def _squared_norm(x: torch.Tensor) -> torch.Tensor:
    values = x.reshape(-1)
    return torch.dot(values, values)


def project_out(x: torch.Tensor, basis: torch.Tensor, dim: int) -> torch.Tensor:
    """Remove from `x` its component along the orthonormal columns of `basis` on dimension `dim`, in fp32.

    `dim=0`: `x - U (U^T x)`; `dim=-1`/`1`: `x - (x U) U^T`. Returns a new tensor of `x`'s dtype.
    """
    return project_out_with_norms(x, basis, dim)[0]


def project_out_with_norms(
    x: torch.Tensor, basis: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`project_out(x, basis, dim)`, `||x||^2` and `||removed||^2` (what the gradient hooks run).

    The removed part is `U c` with `c = U^T x` (or `c U^T`), so its squared norm is `||c||^2` (orthonormal
    `U`): no second full-size tensor is formed.
    """
    flat = _as_matrix(x, dim)
    out, coefficients = remove_component(flat, basis, dim)
    return out.reshape(x.shape).to(x.dtype), _squared_norm(flat), _squared_norm(coefficients)


def project_stack_(
    tensors: list[torch.Tensor], basis: torch.Tensor, dim: int, anchor: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`remove_component` applied in place to same-shaped `tensors`: one tensor with a `(d, k)` basis, or n
    stacked into one batched matmul with an `(n, d, k)` basis. Returns `||x||^2` and `||removed||^2` over all.

    A single contiguous fp32 tensor is projected where it lies (no copy); a stack costs one copy in and one
    out, which pays when the tensors are small and per-call overhead dominates (see `group_constraints`).
    """
    if len(tensors) == 1:
        matrix = _as_matrix(tensors[0], dim)
    else:
        matrix = torch.stack(tensors).float()
    total = _squared_norm(matrix)
    _, coefficients = remove_component(matrix, basis, dim, anchor, out=matrix)
    if len(tensors) > 1:
        torch._foreach_copy_(tensors, list(matrix.unbind(0)))
    elif matrix.data_ptr() != tensors[0].data_ptr() or matrix.dtype != tensors[0].dtype:  # worked on a copy
        tensors[0].copy_(matrix.reshape(tensors[0].shape))
    return total, _squared_norm(coefficients)


def project_constraint(constraint: Constraint, weight: torch.Tensor) -> torch.Tensor:
    """The closest weight satisfying `constraint`: `W - U (U^T W - C)` or `W - (W U - D) U^T`, in `W`'s dtype."""
    dim = constraint.dim
    return (
        remove_component(_as_matrix(weight, dim), constraint.basis, dim, constraint.anchor)[0]
        .reshape(weight.shape)
        .to(weight.dtype)
    )


def relative_component(left: torch.Tensor, right: torch.Tensor, basis: torch.Tensor) -> float:
    """`||U^T L R||_F / ||L R||_F` in float64 through `r x r` Grams, never forming `L R` (0.0 for zero).

    With `L R` the residual side of a LoRA update (`B A` for writers, `A^T B^T` for readers) this is the
    relative leakage of the update along the basis.
    """
    left, right, basis = left.double(), right.double(), basis.double().to(left.device)
    gram_right = right @ right.T
    total = ((left.T @ left) * gram_right).sum().clamp_min(0).sqrt()
    along_left = basis.T @ left
    along = ((along_left @ gram_right) * along_left).sum().clamp_min(0).sqrt()
    return float(along / total) if total > 0 else 0.0


def _timed(method):
    """Add a per-step entry point's wall time to the projector's `seconds` while its `timing` is on (the overhead
    benchmark's measure of GRASP's own time); entries nested in another (the block hooks clamp's reference
    forward runs) are counted once, inside the outer one."""

    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        if not self.timing or self._timing_depth:
            return method(self, *args, **kwargs)
        start = time.perf_counter()
        self._timing_depth += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            self._timing_depth -= 1
            self.seconds += time.perf_counter() - start

    return timed


class GradientProjector:
    """Install GRASP's projection on a model: residual-stream gradient hooks and/or weight-update constraints.

    Args:
        model: a transformers model, a PEFT model wrapping one, or a full fine-tune.
        directions: the `DirectionSet` to project out (validated against the model).
        projection: `activations` (default; residual-stream gradient projection), `weights` (constrain the
            update of LoRA A/B or full weights), `both`, or `clamp` (hold each block output's component along
            the directions at the base model's value during training; LoRA only), or `ablate` (remove that
            component during training, CAFT's mechanism).
        sides: `weights` mode: constrain writers, readers or both.
        reader_layer: which block's basis constrains a reader in block `l`: `own` (`U_l`, default; the stream
            the block's writers are constrained on) or `input` (`U_{l-1}`, the stream it actually reads; block
            0's readers are then unconstrained).
        target_modules: extra module classification (leaf name or regex -> "write"/"read").
        adapter_name: PEFT adapter to constrain (default: the active one).
        track_stats: accumulate the share of gradient norm removed, of the block outputs' gradients
            (`activations`/`both`) and of the constrained parameters' (`weights`/`both`); see
            `pop_grad_removed_fractions`.
        grad_hooks: `weights` mode: project each constrained parameter's gradient in its own tensor hook, as
            autograd produces it (True, default: right under every engine, including DeepSpeed ZeRO, which
            consumes gradients during backward), or leave it to `project_gradients()`, which the caller runs
            after backward and before clipping and which projects same-shaped factors as one stack (False:
            cheaper for the many small LoRA factors of every block; only where `.grad` holds the whole gradient
            after backward — single process, DDP).

    Usage: `attach()` after the model is wrapped by PEFT and before training; with `grad_hooks=False`,
    `project_gradients()` after every backward; `project_parameters()` after every optimizer step (both no-ops
    in `activations` mode); `detach()` to remove every hook.
    """

    def __init__(
        self,
        model: nn.Module,
        directions: DirectionSet,
        projection: Projection = "activations",
        sides: Sides = "both",
        *,
        reader_layer: ReaderLayer = "own",
        target_modules=None,
        adapter_name: str | None = None,
        track_stats: bool = True,
        grad_hooks: bool = True,
    ):
        if projection not in PROJECTIONS:
            raise ValueError(f"projection: expected one of {PROJECTIONS}, found {projection!r}")
        if sides not in SIDES:
            raise ValueError(f"sides: expected one of {SIDES}, found {sides!r}")
        if reader_layer not in READER_LAYERS:
            raise ValueError(f"reader_layer: expected one of {READER_LAYERS}, found {reader_layer!r}")
        directions.validate_for(model)
        check_target_modules(model, target_modules)
        self.model = model
        self.directions = directions
        self.projection = projection
        self.sides = sides
        self.reader_layer = reader_layer
        self.target_modules = target_modules
        self.adapter_name = adapter_name
        self.track_stats = track_stats
        self.grad_hooks = grad_hooks
        self.constraints: list[Constraint] = []  # enforced (weights mode)
        self.groups: list[ConstraintGroup] = []  # the constraints, batched by shape
        self.monitored: list[Constraint] = []  # reported by leakage() (every mode)
        self._handles: list = []
        self._basis_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._norms: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # kind -> (||g||^2, ||removed||^2)
        self._reference: dict[int, torch.Tensor] = {}  # clamp: h_base U per hooked block, for the current batch
        self._capturing = False  # clamp: the base (adapter-disabled) forward is running
        self._training_forward = False  # clamp/ablate: a train-mode, grad-enabled model forward is running
        self.attached = False
        self.timing = False  # with True, `seconds` accumulates the time spent in the per-step entry points
        self.seconds = 0.0
        self._timing_depth = 0

    @property
    def uses_activations(self) -> bool:
        return self.projection in ("activations", "both")

    @property
    def uses_weights(self) -> bool:
        return self.projection in ("weights", "both")

    @property
    def uses_clamp(self) -> bool:
        return self.projection == "clamp"

    @property
    def edits_forward(self) -> bool:
        return self.projection in FORWARD_EDITS

    # ------------------------------------------------------------------------------------------ lifecycle
    def attach(self) -> GradientProjector:
        """Register the hooks; in `weights` mode build the constraints and project the current parameters."""
        if self.attached:
            return self
        if self.directions.is_empty:
            self.attached = True
            return self
        constraints = self.check_constrainable()  # before any hook exists
        if self.uses_activations or self.edits_forward:
            if self.uses_clamp and not hasattr(self.model, "disable_adapter"):
                raise ValueError(
                    "projection='clamp' needs a PEFT (LoRA/QLoRA) model: the base model's forward is "
                    "the adapter-disabled one; found a plain "
                    f"{type(self.model).__name__} (full fine-tuning would need a frozen copy of the "
                    "base; use 'activations' or 'both' there)"
                )
            blocks = decoder_blocks(self.model)
            on_output = self._edit_block_output if self.edits_forward else self._on_block_output
            for layer in self.directions.bases:
                self._handles.append(blocks[layer].register_forward_hook(functools.partial(on_output, layer)))
            if self.edits_forward:
                self._handles.append(self.model.register_forward_pre_hook(self._enter_forward, with_kwargs=True))
                self._handles.append(self.model.register_forward_hook(self._exit_forward, always_call=True))
        if self.uses_weights:
            self.constraints = constraints
            self.groups = group_constraints(self.constraints)
            if self.grad_hooks and self._sharded():
                raise ValueError(
                    "weights projection on FSDP2 (DTensor) parameters: FSDP2 assigns the reduced, "
                    "sharded gradient to `.grad` directly, so per-parameter gradient hooks never see "
                    "it; use GradientProjector(..., grad_hooks=False) and call project_gradients() "
                    "after backward (the Grasp trainers do)"
                )
            for constraint in self.constraints if self.grad_hooks else ():
                constraint.hook = constraint.param.register_hook(
                    functools.partial(self._project_param_grad, constraint)
                )
            self.project_parameters()
            self.monitored = self.constraints
        else:  # not enforced, but leakage() still reports how much the update writes along the directions
            try:
                self.monitored = self._build_constraints()
            except ValueError:
                self.monitored = []
        self.attached = True
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for constraint in self.constraints:
            if constraint.hook is not None:
                constraint.hook.remove()
                constraint.hook = None
        self._handles.clear()
        self._reference = {}
        self._training_forward = self._capturing = False
        self.constraints, self.monitored, self.groups = [], [], []
        self.attached = False

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()

    # ---------------------------------------------------------------------------------- activations mode
    def _basis(self, layer: int, device: torch.device) -> torch.Tensor:
        key = (layer, device)
        if key not in self._basis_cache:
            self._basis_cache[key] = self.directions.bases[layer].to(device, torch.float32)
        return self._basis_cache[key]

    @_timed
    def _on_block_output(self, layer, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(functools.partial(self._project_residual_grad, layer))

    @_timed
    def _project_residual_grad(self, layer: int, grad: torch.Tensor) -> torch.Tensor:
        projected, total, removed = project_out_with_norms(grad, self._basis(layer, grad.device), dim=-1)
        self._record("residual", total, removed)
        return projected

    # ------------------------------------------------------------------------------- clamp and ablate modes
    def _enter_forward(self, model, args, kwargs):
        """Before each model forward: note whether it is a training one (train mode, grad enabled); for clamp,
        run the base on the same inputs first (adapter disabled, no grad) so each hooked block records
        `h_base U`. The flag is needed because under reentrant gradient checkpointing the blocks' first forward
        runs with grad disabled; the recomputation in backward runs with grad enabled."""
        if self._capturing:
            return None
        self._training_forward = model.training and torch.is_grad_enabled()
        if self.uses_clamp and self._training_forward:
            self._record_reference(model, args, kwargs)
        return None

    def _exit_forward(self, model, args, output):
        if not self._capturing:
            self._training_forward = False

    def _edits(self, module) -> bool:
        """Whether a block forward is edited: one inside a training model forward, or the recomputation of one
        in backward (grad enabled). A no-grad forward in train mode (DPO's reference pass, generation) is not,
        and does not disturb the edit of a training forward whose backward is still to come."""
        return module.training and (self._training_forward or torch.is_grad_enabled())

    @_timed
    def _record_reference(self, model, args, kwargs):
        """Clamp: the base forward on the training batch; its `h_base U` is kept until the next training forward
        (a recomputation in backward clamps to it)."""
        self._reference = {}
        self._capturing = True
        try:
            with torch.no_grad(), model.disable_adapter():
                model(*args, **kwargs)
        finally:
            self._capturing = False

    @_timed
    def _edit_block_output(self, layer, module, args, output):
        """`h - (h U - c) U^T` on a training forward's block output: `c` the recorded `h_base U` (clamp) or none
        (ablate). During clamp's base forward, record `h_base U` instead."""
        hidden = output[0] if isinstance(output, tuple) else output
        if not isinstance(hidden, torch.Tensor):
            return None
        basis = self._basis(layer, hidden.device)
        if self._capturing:
            self._reference[layer] = hidden.float() @ basis
            return None
        anchor = self._reference.get(layer) if self.uses_clamp else None
        if not self._edits(module) or (self.uses_clamp and (anchor is None or anchor.shape[:-1] != hidden.shape[:-1])):
            return None
        along = hidden.float() @ basis
        edited = (hidden.float() - (along if anchor is None else along - anchor) @ basis.T).to(hidden.dtype)
        return (edited,) + tuple(output[1:]) if isinstance(output, tuple) else edited

    # ---------------------------------------------------------------------------------------------- stats
    def _record(self, kind: str, total: torch.Tensor, removed: torch.Tensor) -> None:
        """Keep the squared norms for `pop_grad_removed_fractions`; summed there, not here (no op per hook)."""
        if not self.track_stats:
            return
        norms = self._norms.setdefault(kind, [])
        norms.append((total, removed))
        if len(norms) >= 4096:  # bounded memory when nobody pops (the projector used without a trainer)
            self._norms[kind] = [_summed(norms)]

    def pop_grad_removed_fractions(self) -> dict[str, float]:
        """Share of gradient norm (sqrt of the squared-norm ratio) removed since the last call, by kind:
        `residual` (block outputs' gradients: `activations`, `both`) and `weight` (constrained parameters'
        gradients: `weights`, `both`); a kind with no data since the last call is absent."""
        result = {}
        for kind, norms in self._norms.items():
            if norms:
                total, removed = (float(value) for value in _summed(norms))
                result[kind] = (removed / total) ** 0.5 if total > 0 else 0.0
        self._norms = {}
        return result

    # -------------------------------------------------------------------------------------- weights mode
    def check_constrainable(self) -> list[Constraint] | None:
        """The `weights` constraints (None in other modes), or a ValueError when there are none: with LoRA but no
        module of the constrained side in a block with a direction, `weights` would constrain nothing. Changes
        no parameter, so the trainers call it at construction too, before stage 1 trains."""
        if not self.uses_weights:
            return None
        constraints = self._build_constraints()
        if not constraints:
            raise ValueError(
                f"grasp_sides={self.sides}: the LoRA has no {SIDE_WORDS[self.sides]} module in a "
                f"block with a direction (layers {sorted(self.directions.bases)}); the weights "
                "projection would constrain nothing. Expected LoRA target_modules on that side, "
                "or another grasp_sides"
            )
        return constraints

    def _build_constraints(self) -> list[Constraint]:
        return find_constraints(
            self.model,
            self.directions,
            self.sides,
            reader_layer=self.reader_layer,
            target_modules=self.target_modules,
            adapter_name=self.adapter_name,
            basis=self._basis,
        )

    @_timed
    def _project_param_grad(self, constraint: Constraint, grad: torch.Tensor) -> torch.Tensor:
        basis = constraint.basis if constraint.basis.device == grad.device else constraint.basis.to(grad.device)
        projected, total, removed = project_out_with_norms(grad, basis, dim=constraint.dim)
        self._record("weight", total, removed)
        return projected

    @_timed
    @torch.no_grad()
    def project_gradients(self) -> None:
        """Project the accumulated `.grad` of every constrained parameter, stack by stack (with `grad_hooks=False`;
        call after backward, before clipping and the optimizer step). No-op otherwise."""
        if self.grad_hooks:
            return
        self._rebind()
        if self._sharded():
            from .fsdp import project_dtensors_

            items = [(c.param.grad, c.basis, c.dim, None) for c in self.constraints if c.param.grad is not None]
            if items:
                self._record("weight", *project_dtensors_(items, stats=True))
            return
        for group in self.groups:
            grads = [c.param.grad for c in group.constraints]
            if all(g is not None for g in grads):
                self._record("weight", *project_stack_(grads, group.bases, group.dim))
                continue
            for constraint, grad in zip(group.constraints, grads):  # some factor got no gradient this step
                if grad is not None:
                    self._record("weight", *project_stack_([grad], constraint.basis, constraint.dim))

    def _rebind(self) -> None:
        """Follow parameters replaced since `attach()` (FSDP2 wrapping); regroup when any changed."""
        if any([c.rebind() for c in self.constraints]):
            self.groups = group_constraints(self.constraints)

    def _sharded(self) -> bool:
        """True when the constrained parameters are FSDP2 DTensors (all or none: FSDP2 shards a whole model)."""
        from .fsdp import is_dtensor

        sharded = [is_dtensor(c.param) for c in self.constraints]
        if any(sharded) and not all(sharded):
            names = [c.name for c, s in zip(self.constraints, sharded) if not s][:3]
            raise ValueError(
                f"weights projection: some constrained parameters are FSDP2 DTensors and some are not "
                f"(plain: {names}); apply fully_shard to every block holding a constrained parameter "
                "(and to the root)"
            )
        return bool(sharded) and sharded[0]

    @_timed
    @torch.no_grad()
    def project_parameters(self) -> None:
        """Restore every weight constraint exactly (call after each optimizer step). No-op in activations mode.

        Under DeepSpeed the fp32 master copy and the working copy are both updated, one parameter at a time
        (see `deepspeed.py`); otherwise the parameters are projected in place, stack by stack.
        """
        if not self.constraints:
            return
        from .deepspeed import managed_by_deepspeed, update_params

        self._rebind()
        if self._sharded():  # FSDP2: each rank projects its own shard (see fsdp.py)
            from .fsdp import project_dtensors_

            project_dtensors_([(c.param, c.basis, c.dim, c.anchor) for c in self.constraints])
            return

        if any(managed_by_deepspeed(c.param) for c in self.constraints):
            update_params([(c.param, functools.partial(project_constraint, c)) for c in self.constraints])
            return
        for group in self.groups:
            project_stack_([c.param.data for c in group.constraints], group.bases, group.dim, group.anchor)

    # ---------------------------------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def leakage_by_module(self) -> dict[str, float]:
        """Relative component of each constrained update along the directions.

        LoRA: `||U^T B A|| / ||B A||` (writers) or `||B A U|| / ||B A||` (readers), without forming `B A`.
        Full fine-tuning: `||U^T W - C|| / ||W||` (the pretrained component `C` is kept, not the whole `W`).
        """
        from .deepspeed import full_fp32

        result = {}
        for constraint in self.monitored:
            constraint.rebind()
            if constraint.anchor is not None:
                weight = full_fp32(constraint.param)
                excess = constraint.component(weight) - constraint.anchor
                result[constraint.name] = float(excess.norm() / weight.norm().clamp_min(1e-30))
                continue
            module = self.model.get_submodule(constraint.name.rsplit(".", 1)[0])
            adapter = active_adapter(self.model, self.adapter_name)
            role = "write" if constraint.dim == 0 else "read"
            left, right = residual_side(
                role, full_fp32(module.lora_A[adapter].weight), full_fp32(module.lora_B[adapter].weight)
            )
            result[constraint.name] = relative_component(left, right, constraint.basis)
        return result

    def leakage(self) -> float:
        """Largest relative leakage over the constrained parameters (0.0 when nothing is constrained)."""
        return max(self.leakage_by_module().values(), default=0.0)


def _summed(norms: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    totals, removed = zip(*norms)
    device = totals[0].device
    return torch.stack([t.to(device) for t in totals]).sum(), torch.stack([r.to(device) for r in removed]).sum()
