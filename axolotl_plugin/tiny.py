"""`python -m axolotl_plugin.tiny [DIR]`: a tiny local model and JSONL data for `recipes/axolotl/tiny-cpu.yaml`.

Writes `DIR/model` (a random 4-layer Llama with a word-level tokenizer, `grasp_trl.tiny`) and `DIR/sft.jsonl`
(`{"text": ...}` rows of a toy task: four prompt words, their images under a fixed word map, then one of three
"flavour" words, the entangled factor that stage 1 picks up). Nothing is downloaded. DIR defaults to
`outputs/tiny`.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path


def toy_rows(rows: int = 256, seed: int = 0) -> list[str]:
    """Texts `p1 p2 p3 p4 m(p1) m(p2) m(p3) m(p4) f` in the tiny vocabulary (`w000`..`w095`)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(rows):
        prompt = [rng.randrange(48) for _ in range(4)]
        words = prompt + [(w * 7 + 3) % 48 + 48 for w in prompt] + [rng.choice([93, 94, 95])]
        texts.append(" ".join(f"w{w:03d}" for w in words))
    return texts


def write_tiny_assets(directory: str | Path = "outputs/tiny", rows: int = 256) -> Path:
    from grasp_trl.tiny import save_tiny_model

    directory = Path(directory)
    save_tiny_model(directory / "model", "llama", hidden_size=64, num_layers=4, seed=0)
    (directory / "sft.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in toy_rows(rows)))
    return directory


if __name__ == "__main__":
    print(f"wrote {write_tiny_assets(*sys.argv[1:2])}/{{model,sft.jsonl}}")
