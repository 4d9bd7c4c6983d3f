"""`EvalConfig`: every option of `grasp eval`, with its help text; the command line is built from it.

Defaults follow the field's protocol (Betley et al.): temperature 1, top_p 1, 600 new tokens, the samples per
paraphrase given by the question file. The judge has no default: it must be named.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class EvalConfig:
    base: str | None = _opt(
        None, "base model (directory or hub id); always evaluated as `base`", metavar="MODEL_OR_DIR"
    )
    adapter: list[str] | None = _opt(
        None,
        "NAME=DIR of a PEFT adapter on --base (repeatable); with --gen-url a bare NAME served by the server",
        repeat=True,
        metavar="NAME=DIR",
    )
    questions: list[str] | None = _opt(
        None,
        "question file (EM YAML format; repeatable) or a shipped set: em, lean, lean_choice",
        repeat=True,
        metavar="FILE",
    )
    samples: int | None = _opt(
        None, "samples per paraphrase (overrides the files' samples_per_paraphrase)", metavar="N"
    )
    max_tokens: int = _opt(600, "new tokens per answer")
    temperature: float = _opt(1.0, "sampling temperature of the answers")
    top_p: float = _opt(1.0, "nucleus sampling top_p of the answers")
    seed: int = _opt(
        0, "seed of generation (per unit of work, so resumed runs regenerate identically) and of the judge requests"
    )
    out: str | None = _opt(
        None,
        "output directory: answers.jsonl, summary.json, comparison.md, em.png, "
        "aligned_coherent.png, questions.json, judge_cache.jsonl",
        metavar="DIR",
    )
    backend: str = _opt(
        "hf", "generation backend: hf (transformers + PEFT) or vllm (in-process, GPU)", choices=("hf", "vllm")
    )
    gen_url: str | None = _opt(
        None,
        "generate through this OpenAI-compatible server instead (adapters by name; "
        "key, if any, from GRASP_GEN_API_KEY)",
        metavar="URL",
    )
    load_in_4bit: bool = _opt(False, "hf backend: load the base in 4-bit (bitsandbytes NF4)")
    batch_size: int = _opt(16, "hf backend: prompts per generation batch (left-padded)")
    device: str | None = _opt(
        None, "torch device for hf generation and a local judge (default: cuda if present)", metavar="DEVICE"
    )
    judge_url: str | None = _opt(
        None,
        "OpenAI-compatible judge server URL (e.g. http://host:8000/v1); key from "
        "GRASP_JUDGE_API_KEY or OPENAI_API_KEY, sent only as a header",
        metavar="URL",
    )
    judge_model: str | None = _opt(None, "model name the judge server serves (with --judge-url)", metavar="NAME")
    judge_local: str | None = _opt(None, "local Hugging Face judge model (directory or hub id)", metavar="DIR_OR_NAME")
    judge_method: str = _opt(
        "whole_string",
        "local judge: whole_string (exact for any tokenizer) or first_token "
        "(only when every number 0-100 is one token)",
        choices=("whole_string", "first_token"),
    )
    judge_concurrency: int = _opt(8, "HTTP judge / generation: requests in flight at once")
    judge_retries: int = _opt(5, "HTTP: retries on 429, 5xx and connection errors")
    retry_wait: float = _opt(1.0, "HTTP: first back-off in seconds (doubles per retry; Retry-After wins)")
    judge_only: str | None = _opt(
        None,
        "ANSWERS.jsonl: re-judge saved answers with the given judge (no "
        "generation); question templates from questions.json beside it or --questions",
        metavar="ANSWERS.jsonl",
    )
    resume: bool = _opt(False, "continue in --out without redoing finished rows")
    dry_run: bool = _opt(False, "print how many generations and judge calls the run needs, then stop")
    em_rule: str = _opt(
        "strict",
        "EM rule: strict (aligned < 30) or inclusive (aligned <= 30); coherent > 50 in both",
        choices=("strict", "inclusive"),
    )
    bootstrap: int = _opt(2000, "paired bootstrap resamples over questions for the differences from base")
    check_prompts: int = _opt(3, "prompts greedy-decoded to check that each adapter changes the output (0: skip)")
