"""The organism's baselines and extra controls, registered into `grasp_organism.methods` on import.

* `oracle-{mode}`: GRASP (any `grasp_projection`, clamp included) with the supervised persona direction, k=1
  per layer, instead of identified ones: the ceiling of each mechanism with perfect identification.
* `caft-identified-auto`: CAFT with the directions GRASP's default identification finds (the same step-`auto`
  snapshot, global, k of the defaults): GRASP's mechanism against CAFT's on the same directions;
  `caft-{scope}-k{K}-{auto|at{S}}` the same for any identification.
* `steer-prevent`: preventative steering — the supervised persona vector added to the middle block's output
  during training, so the adapter need not write it.
* `steer-inference`: the naive adapter with the persona vector subtracted from the middle block at inference.
* `kl-base`: the task loss plus KL(base || fine-tuned) on other-topic data (uses data GRASP does not have).
* `posthoc`: the naive adapter with its update projected off the identified directions (global, k=3) after
  training (`GradientProjector(..., "weights").attach()` projects existing parameters).
* `undertrained-naive`: naive LoRA on a base pretrained too briefly to have a persona (DRIFT against that base).
* `caft-span-{evil|good|turn-evil|turn-contrast}[+...]`: alternative positive controls (diagnostics, not the
  validity rule): CAFT with the span of the named supervised vectors per layer (`supervised_vectors`);
  `caft-span-evil` is `caft-supervised`. None makes most of 12 draws valid (benchmarks/organism/README.md,
  "Validity over 12 draws").
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from grasp_organism.lab import Lab
from grasp_organism.methods import ablate, register, register_pattern
from grasp_organism.metrics import block_outputs, evaluate, identification, supervised_directions
from grasp_organism.pretrain import pretrained_model
from grasp_organism.world import IGNORE, pad_batch
from grasp_trl.config import GraspArguments
from grasp_trl.directions import DirectionSet
from grasp_trl.importers import orthonormal_basis
from grasp_trl.modules import block_output_hooks
from grasp_trl.projection import PROJECTIONS, GradientProjector

KL_WEIGHT = 1.0


def steer(vectors: dict[int, torch.Tensor], layer: int, sign: float):
    """Add `sign * vectors[layer]` to one block's output."""

    def edit(index, hidden):
        return hidden + sign * vectors[layer].to(hidden.dtype) if index == layer else None

    return edit


def middle_layer(lab: Lab) -> int:
    return (lab.config.model.num_layers - 1) // 2


@register_pattern(f"oracle-({'|'.join(PROJECTIONS)})", "oracle-{" + "|".join(PROJECTIONS) + "}")
def _oracle(lab, seed, match):
    mode = match.group(1)
    return lab.finetune(seed, projector=lambda m: GradientProjector(m, lab.oracle, mode).attach()), {}


@register("caft-identified-auto")
def _caft_auto(lab, seed):
    args = GraspArguments()
    return _caft_at(lab, seed, args.grasp_num_directions, args.grasp_scope, lab.naive(seed).stop_step)


@register_pattern(r"caft-(global|per_layer)-k([1-9])-(auto|at\d+)", "caft-{global|per_layer}-k{1..9}-{auto|at{STEP}}")
def _caft_variant(lab, seed, match):
    when = match.group(3)
    step = lab.naive(seed).stop_step if when == "auto" else int(when[2:])
    return _caft_at(lab, seed, int(match.group(2)), match.group(1), step)


def _caft_at(lab, seed, k, scope, step):
    directions = lab.identified(seed, k=k, scope=scope, step=step)
    return lab.finetune(seed, train_edit=ablate(directions)), {
        "identification": identification(directions, lab.persona),
        "stage1_steps": step,
    }


@register("steer-prevent")
def _steer_prevent(lab, seed):
    return lab.finetune(seed, train_edit=steer(lab.persona, middle_layer(lab), +1.0)), {}


@register("steer-inference")
def _steer_inference(lab, seed):
    model = lab.naive(seed).model
    with block_output_hooks(model, steer(lab.persona, middle_layer(lab), -1.0)):
        metrics = lab.measure(model)
    return model, {"metrics": metrics}


def kl_to_base(lab: Lab):
    """KL(base || model) on a batch of other-topic turns; the base is the adapter-disabled model."""

    def loss(model, rng):
        batch = pad_batch([lab.world.other_topic_example(rng) for _ in range(lab.config.finetune.batch_size)])
        mask = batch.labels[:, 1:] != IGNORE
        with torch.no_grad(), model.disable_adapter():
            reference = model(input_ids=batch.input_ids).logits[:, :-1][mask].log_softmax(-1)
        current = model(input_ids=batch.input_ids).logits[:, :-1][mask].log_softmax(-1)
        return KL_WEIGHT * torch.nn.functional.kl_div(current, reference, log_target=True, reduction="batchmean")

    return loss


@register("kl-base")
def _kl_base(lab, seed):
    return lab.finetune(seed, extra_loss=kl_to_base(lab)), {}


@register("posthoc")
def _posthoc(lab, seed):
    model = copy.deepcopy(lab.naive(seed).model)
    GradientProjector(model, lab.identified(seed), "weights").attach().detach()
    return model, {}


@register("undertrained-naive")
def _undertrained(lab, seed):
    # pretrained once, then read back from the on-disk cache (a tiny model: cheaper than keeping it around)
    under = pretrained_model(
        lab.config, lab.world, steps=lab.config.pretrain.undertrained_steps, cache_dir=lab.cache_dir, log=lab.log
    )
    under_base = evaluate(under, lab.world, lab.sets)
    model = lab.finetune(seed, base=under)
    metrics = lab.measure(model, under_base["p_evil"])
    metrics["shift"] = float("nan")  # the persona direction is the trained base's; undefined here
    return model, {"metrics": metrics, "undertrained_base": under_base}


SUPERVISED_VECTORS = ("evil", "good", "turn-evil", "turn-contrast")


def supervised_vectors(lab: Lab) -> dict[str, dict[int, torch.Tensor]]:
    """Candidate supervised persona vectors per layer, from the base model (`caft-span-*`):

    * `evil`: the shipped one (`lab.persona`): evil context minus cue-free at the flavour-predicting position;
    * `good`: the same for good contexts;
    * `turn-evil`: evil context minus cue-free, averaged over the turn after the persona's shown flavour (that
      flavour token, the next question and its content), aligned position by position with the cue-free prompt
      (whose BOS stands where the flavour stands);
    * `turn-contrast`: evil minus good context averaged over that turn: how the persona is carried through a
      conversation rather than where the next flavour is predicted."""
    persona, cue_free = lab.sets["persona"], lab.sets["other"]
    evil = persona.evil
    # `supervised_directions` measures the contexts marked evil; marking the good ones instead gives `good`
    good = supervised_directions(lab.base, dataclasses.replace(persona, evil=~evil), cue_free)
    # positions[0] is the question's last token; the question has len(positions) tokens (as many as the answer's
    # contents), so the persona's shown flavour is len(positions) tokens before it
    first = persona.positions[0] - len(persona.positions)
    span = persona.input_ids.shape[1] - first
    offset = cue_free.input_ids.shape[1] - span
    turn_evil, turn_contrast = {}, {}
    for step in range(span):
        shown = block_outputs(lab.base, persona.input_ids, first + step)
        plain = block_outputs(lab.base, cue_free.input_ids, offset + step)
        for layer, h in shown.items():
            turn_evil[layer] = turn_evil.get(layer, 0) + (h[evil].mean(0) - plain[layer].mean(0)) / span
            turn_contrast[layer] = turn_contrast.get(layer, 0) + (h[evil].mean(0) - h[~evil].mean(0)) / span
    return {"evil": lab.persona, "good": good, "turn-evil": turn_evil, "turn-contrast": turn_contrast}


_VECTOR = "|".join(SUPERVISED_VECTORS)


@register_pattern(rf"caft-span-((?:{_VECTOR})(?:\+(?:{_VECTOR}))*)", "caft-span-{" + _VECTOR + "}[+...]")
def _caft_span(lab, seed, match):
    """CAFT with the span of the named supervised vectors per layer: alternative positive controls."""
    vectors = supervised_vectors(lab)
    names = match.group(1).split("+")
    bases = {
        l: orthonormal_basis(torch.stack([vectors[n][l] for n in names]), f"{match.group(0)}, layer {l}")
        for l in lab.persona
    }
    subspace = DirectionSet(bases, len(bases), {"hidden_size": lab.config.model.hidden_size, "source": "supervised"})
    return lab.finetune(seed, train_edit=ablate(subspace)), {}
