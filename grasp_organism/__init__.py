"""A model organism of spurious correlation: a world with a known latent persona, a tiny Llama pretrained on
it, and exact metrics for how fine-tuning methods (naive LoRA, GRASP, baselines) move it.

`world` (the data-generating process and its YAML config), `pretrain` (deterministic, cached pretraining),
`metrics` (exact next-token-probability metrics and the supervised persona direction), `lab` (one organism and
the one fine-tuning loop every method shares), `methods` (the registry: naive, GRASP, the positive controls),
`validity` (are the controls passing?), `report` (grids over bases x seeds, tables, JSON, plots).
The benchmark's baselines register themselves from `benchmarks/organism/baselines.py`.
"""
