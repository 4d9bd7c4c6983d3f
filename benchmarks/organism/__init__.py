"""The organism benchmark: GRASP against the baselines on a world with a known spurious factor."""
