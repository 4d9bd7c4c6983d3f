"""A model organism of spurious correlation: a world with a known latent persona, a tiny Llama pretrained on
it, and exact metrics for how fine-tuning methods (naive LoRA, GRASP, baselines) move it."""
