"""Checking the `weights`-mode invariant from what was saved: an adapter directory and a direction file.

The invariant (DESIGN §1): for every constrained LoRA module the trained update `dW = s B A` has no component
along the layer's basis on its residual side — `||U^T dW|| <= tol ||dW||` for writers, `||dW U|| <= tol ||dW||`
for readers. On the residual side both read `||U^T L R|| / ||L R||` with `dW_res = L R`,
computed from `r x r` Gram matrices without forming `dW` (`lora.py` says which side that is).
"""

from __future__ import annotations

from pathlib import Path

from .directions import DirectionSet
from .lora import basis_layer, factors_from_adapter_dir
from .projection import relative_component


def saved_adapter_leakage(
    adapter_dir: str | Path, directions: DirectionSet, *, reader_layer: str = "own", target_modules=None
) -> dict[str, float]:
    """Relative leakage of every writer and reader update of a saved LoRA adapter along `directions`.

    Modules in blocks without a basis are skipped; `reader_layer` is the projector's option of the same name.
    """
    factors, _ = factors_from_adapter_dir(adapter_dir, include_readers=True, target_modules=target_modules)
    result = {}
    for factor in factors:
        layer = basis_layer(factor.role, factor.layer, reader_layer)
        if layer in directions.bases:
            result[factor.name] = relative_component(factor.left, factor.right, directions.bases[layer])
    return result
