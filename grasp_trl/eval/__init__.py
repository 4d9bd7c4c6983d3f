"""`grasp eval`: emergent misalignment and political lean, measured the way the field does.

Modules, one concept each: `questions` (question files), `generate` (answer backends), `http` (OpenAI-compatible
client), `judge` (HTTP and local judges, the judgement cache), `metrics` (scores, EM rule, Wilson, paired
bootstrap, summaries), `report` (summary.json, comparison.md, plots), `run` (the pipeline), `config` (options),
`cli` (the command line), `example` (an offline tiny run; the tests' tiny parts). Documentation: docs/EVAL.md.
"""
