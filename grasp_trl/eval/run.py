"""The `grasp eval` pipeline: plan -> check flags and the judge (cheap, first) -> load the generator and check
its adapters -> per (model, question) unit: generate, judge, append rows -> summary, comparison, plots.

Rows are appended to `answers.jsonl` one by one and flushed, so a crash loses no finished row; `--resume` skips
finished rows (a partly finished unit is regenerated with the same seed, so its rows match a one-shot run).
`--judge-only` replaces generation with the rows of a saved answers file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from ..directions import atomic_write
from .generate import BASE, adapter_info, check_adapters, parse_adapters
from .metrics import is_misaligned, score, summarise
from .questions import FORCED_CHOICE, FREE_FORM, Question, load_all, render

ANSWERS, QUESTIONS, CACHE = "answers.jsonl", "questions.json", "judge_cache.jsonl"


def row_key(row: dict) -> tuple:
    return (row["model"], row["question_id"], row["paraphrase_index"], row["sample_index"])


def read_rows(path: Path) -> list[dict]:
    """Rows of an answers file; a torn last line (a crash mid-write) is dropped."""
    rows = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number != len(lines):
                raise ValueError(f"{path}: line {number} is not JSON; expected one answer row per line") from exc
    return rows


def plan(questions: list[Question], models: list[str], samples: int | None) -> list[tuple[str, Question, list]]:
    """(model, question, [(paraphrase_index, sample_index), ...]) units of work, in run order."""
    units = []
    for model in models:
        for q in questions:
            n = (samples or q.samples_per_paraphrase) if q.type == FREE_FORM else 1
            units.append((model, q, [(p, s) for p in range(len(q.paraphrases)) for s in range(n)]))
    return units


def unit_seed(seed: int, model: str, question_id: str) -> int:
    """A seed per unit of work that does not depend on which other units run (resume-safe)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{model}:{question_id}".encode()).digest()[:4], "little")


def judge_rows(rows: list[dict], questions: dict[str, Question], judge, rule: str, progress=None) -> None:
    """Fill `scores`, `judge_probs` and `em` of free-form rows in place (all their metrics, one batch)."""
    asks = [
        (i, metric, render(template, row["question"], row["answer"]))
        for i, row in enumerate(rows)
        for metric, template in questions[row["question_id"]].judge_prompts.items()
    ]
    results = judge.judge_many([prompt for _, _, prompt in asks], progress)
    for row in rows:
        row["scores"], row["judge_probs"], row["judge"] = {}, {}, judge.identity
    for (i, metric, _), probs in zip(asks, results):
        rows[i]["scores"][metric] = score(probs)
        rows[i]["judge_probs"][metric] = probs
    for row in rows:
        s = row["scores"]
        row["em"] = is_misaligned(s["aligned"], s["coherent"], rule) if {"aligned", "coherent"} <= set(s) else None


def _generate_unit(generator, model, q: Question, jobs, config, info) -> list[dict]:
    """Rows (not yet judged) for one unit: sampled answers, or forced-choice probabilities in both orders."""
    common = dict(model=model, **info, question_file=q.file, question_id=q.id, system=q.system)
    if q.type == FREE_FORM:
        answers = generator.generate(
            model,
            [q.messages(q.paraphrases[p]) for p, _ in jobs],
            max_tokens=config.max_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=unit_seed(config.seed, model, q.id),
        )
        return [
            dict(common, kind="free_form", paraphrase_index=p, sample_index=s, question=q.paraphrases[p], answer=answer)
            for (p, s), answer in zip(jobs, answers)
        ]
    rows = []
    for p, s in jobs:
        probs = {
            order: generator.label_probs(model, q.messages(q.choice_prompt(q.paraphrases[p], swapped)), q.labels)
            for order, swapped in (("left_first", False), ("right_first", True))
        }
        right = [
            probs["left_first"][q.labels[1]] if probs["left_first"] else None,
            probs["right_first"][q.labels[0]] if probs["right_first"] else None,
        ]
        right = [r for r in right if r is not None]
        rows.append(
            dict(
                common,
                kind="forced_choice",
                paraphrase_index=p,
                sample_index=s,
                question=q.paraphrases[p],
                answer=None,
                options=list(q.options),
                choice_probs=probs,
                scores={"lean": 100 * sum(right) / len(right) if right else None},
                em=None,
            )
        )
    return rows


def _append(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
        os.fsync(handle.fileno())


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for package in ("grasp-trl", "torch", "transformers", "peft", "tokenizers", "bitsandbytes", "vllm"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def _questions_record(questions: list[Question]) -> dict:
    from ..directions import sha256_of

    files = list(dict.fromkeys(q.file for q in questions))
    return {"files": [{"file": f, "sha256": sha256_of(f)} for f in files], "questions": [asdict(q) for q in questions]}


def _load_record(path: Path) -> tuple[list[Question], list[dict]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"--judge-only: no {path} beside the answers file; expected the questions.json a "
            f"run writes, or give the question files with --questions"
        )
    record = json.loads(path.read_text())
    questions = [
        Question(
            **dict(
                q,
                paraphrases=tuple(q["paraphrases"]),
                labels=tuple(q["labels"]),
                options=tuple(q["options"]) if q["options"] else None,
            )
        )
        for q in record["questions"]
    ]
    return questions, record["files"]


def _check_flags(config) -> None:
    if not config.out:
        raise ValueError("--out: expected an output directory; found none")
    if config.judge_only:
        if not Path(config.judge_only).is_file():
            raise FileNotFoundError(f"--judge-only {config.judge_only}: answers file not found")
        if Path(config.judge_only).resolve() == (Path(config.out) / ANSWERS).resolve():
            raise ValueError(
                f"--judge-only {config.judge_only}: expected a different --out than the answers' "
                f"directory (re-judged rows are written to --out)"
            )
        return
    if not config.base:
        raise ValueError("--base: expected the base model (directory or hub id); found none")
    if config.backend == "vllm" and not config.gen_url:
        from .generate import require_vllm

        require_vllm()
    if not config.questions:
        raise ValueError(
            "--questions: expected at least one question file (or a shipped set: em, lean, lean_choice); found none"
        )


def _inputs(config) -> tuple[list[Question], list[dict], list[dict] | None]:
    """Questions, their files' record, and (for --judge-only) the saved rows, all checked."""
    saved = read_rows(Path(config.judge_only)) if config.judge_only else None
    if config.judge_only and not config.questions:
        questions, files = _load_record(Path(config.judge_only).parent / QUESTIONS)
    else:
        questions = load_all(config.questions)
        files = _questions_record(questions)["files"]
    ids = {q.id for q in questions}
    missing = [r["question_id"] for r in saved or [] if r["question_id"] not in ids]
    if missing:
        raise ValueError(
            f"--judge-only {config.judge_only}: question id {missing[0]!r} is in no question file "
            f"given; expected the files the answers were generated from"
        )
    return questions, files, saved


def _work_line(
    n_questions: int, models: str, todo_questions: list[Question], generations: int, done: int, config
) -> str:
    """The --dry-run report: the work left (one entry of `todo_questions` per pending row)."""
    from .judge import NO_JUDGE

    judge_calls = sum(len(q.judge_prompts) for q in todo_questions)
    choices = sum(q.type == FORCED_CHOICE for q in todo_questions)
    return (
        f"grasp eval --dry-run: {n_questions} questions, {models} model(s): {generations} generations, "
        f"{judge_calls} judge calls, {2 * choices} forced-choice scorings ({done} rows already done)"
        + ("" if config.judge_url or config.judge_local or not judge_calls else f"; {NO_JUDGE}")
    )


def _bar(judge_calls: int):
    from tqdm.auto import tqdm

    return tqdm(total=judge_calls, desc="judging", unit="call", disable=not judge_calls)


def _check_conversations(questions: list[Question], n: int) -> list[list[dict]]:
    """The first paraphrase of the first `n` questions, as sent to the model (for the no-op adapter check)."""
    return [
        q.messages(q.paraphrases[0] if q.type == FREE_FORM else q.choice_prompt(q.paraphrases[0], False))
        for q in questions[:n]
    ]


def _rejudge(todo: list[dict], by_id, judge, config, answers_path: Path, progress, clock: dict) -> None:
    """--judge-only: score saved rows again, one (model, question) group at a time."""
    groups: dict[tuple, list] = {}
    for row in todo:
        groups.setdefault((row["model"], row["question_id"]), []).append(dict(row))
    for rows in groups.values():
        if by_id[rows[0]["question_id"]].type == FREE_FORM:
            with _timed(clock, "judging"):
                judge_rows(rows, by_id, judge, config.em_rule, progress)
        _append(answers_path, rows)
    progress.close()


def _generate_all(
    units, done: set, generator, info: dict, by_id, judge, config, answers_path: Path, progress, clock: dict
) -> None:
    """Generate and judge every unfinished (model, question) unit, appending its missing rows."""
    from tqdm.auto import tqdm

    made = tqdm(
        total=sum((m, q.id, p, s) not in done for m, q, jobs in units for p, s in jobs),
        desc="generating",
        unit="answer",
    )
    for model, q, jobs in units:
        if all((model, q.id, p, s) in done for p, s in jobs):
            continue
        with _timed(clock, "generation"):
            rows = [r for r in _generate_unit(generator, model, q, jobs, config, info[model]) if row_key(r) not in done]
        made.update(len(rows))
        if q.type == FREE_FORM:
            with _timed(clock, "judging"):
                judge_rows(rows, by_id, judge, config.em_rule, progress)
        _append(answers_path, rows)
    made.close()
    progress.close()


@contextmanager
def _timed(clock: dict, key: str):
    """Add the wall time of the block to `clock[key]` (seconds; reported as summary.json's `timings_s`)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        clock[key] = clock.get(key, 0.0) + time.perf_counter() - start


def run_eval(config) -> dict | None:
    """Run `grasp eval` as configured; returns summary.json's content (None for --dry-run)."""
    from .judge import judge_from
    from .report import write_reports

    _check_flags(config)
    out = Path(config.out)
    answers_path = out / ANSWERS
    if answers_path.is_file() and not config.resume and not config.dry_run:
        raise ValueError(f"--out {out}: already holds {ANSWERS}; expected --resume to continue it, or a new directory")
    questions, files, saved = _inputs(config)
    by_id = {q.id: q for q in questions}
    adapters = {} if saved is not None else parse_adapters(config.adapter or [], need_dirs=not config.gen_url)
    done = {row_key(r) for r in read_rows(answers_path)} if config.resume and answers_path.is_file() else set()
    if saved is not None:
        todo = [r for r in saved if row_key(r) not in done]
        todo_questions = [by_id[r["question_id"]] for r in todo]
    else:
        units = plan(questions, [BASE, *adapters], config.samples)
        todo_questions = [q for m, q, jobs in units for p, s in jobs if (m, q.id, p, s) not in done]
    judge_calls = sum(len(q.judge_prompts) for q in todo_questions)
    if config.dry_run:
        generations = 0 if saved is not None else sum(q.type == FREE_FORM for q in todo_questions)
        models = "saved" if saved is not None else str(1 + len(adapters))
        print(_work_line(len(questions), models, todo_questions, generations, len(done), config))
        return None

    out.mkdir(parents=True, exist_ok=True)
    judge = judge_from(config, out / CACHE) if judge_calls or config.judge_url or config.judge_local else None
    if done and judge:
        _check_same_judge(read_rows(answers_path), judge.identity, out)
    if done:  # rewrite without a torn last line before appending
        kept = read_rows(answers_path)
        atomic_write(answers_path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))
    info, clock = {}, {}
    if saved is not None:
        _rejudge(todo, by_id, judge, config, answers_path, _bar(judge_calls), clock)
    else:
        record = _questions_record(questions)
        atomic_write(out / QUESTIONS, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
        info = {name: {"base": config.base, **adapter_info(d)} for name, d in {BASE: None, **adapters}.items()}
        if todo_questions:  # (a finished --resume only rewrites the reports)
            with _timed(clock, "loading"):
                generator = make_generator(config, adapters)
            if adapters and config.check_prompts:
                check_adapters(generator, list(adapters), _check_conversations(questions, config.check_prompts))
            _generate_all(units, done, generator, info, by_id, judge, config, answers_path, _bar(judge_calls), clock)

    rows = read_rows(answers_path)
    summary = {
        "models": summarise(rows, n_resamples=config.bootstrap, seed=config.seed),
        "judge": judge.identity if judge else _previous_judge(out),
        "questions": files,
        "versions": _versions(),
        "em_rule": config.em_rule,
        "generation": None
        if saved is not None
        else {
            "backend": "url" if config.gen_url else config.backend,
            "gen_url": config.gen_url,
            "base": config.base,
            "adapters": {n: info[n]["adapter_path"] for n in adapters},
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_tokens": config.max_tokens,
            "samples": config.samples,
            "seed": config.seed,
        },
        "answers_from": str(Path(config.judge_only).resolve()) if config.judge_only else None,
        "timings_s": {key: round(value, 2) for key, value in clock.items()},  # this invocation only
    }
    if saved is not None:  # the re-scored answers' generation settings, from their run's summary
        source = Path(config.judge_only).parent / "summary.json"
        summary["generation"] = json.loads(source.read_text()).get("generation") if source.is_file() else None
    write_reports(out, summary, rows)
    return summary


def _check_same_judge(rows: list[dict], identity: dict, out: Path) -> None:
    """--resume must not mix judges within one answers file."""
    other = next((r["judge"] for r in rows if r.get("judge") and r["judge"] != identity), None)
    if other is not None:
        raise ValueError(
            f"--resume: rows in {out / ANSWERS} were judged by {other}; expected the same judge, found "
            f"{identity}; re-score them with --judge-only ANSWERS.jsonl --out NEW_DIR instead"
        )


def _previous_judge(out: Path):
    """With nothing left to judge (a finished --resume), the judge recorded by the earlier summary."""
    path = out / "summary.json"
    return json.loads(path.read_text()).get("judge") if path.is_file() else None


def make_generator(config, adapters: dict):
    """The generation backend the flags choose."""
    from .generate import HFGenerator, OpenAIGenerator, VLLMGenerator

    if config.gen_url:
        key = os.environ.get("GRASP_GEN_API_KEY")
        return OpenAIGenerator(
            config.gen_url,
            config.base,
            api_key=key,
            concurrency=config.judge_concurrency,
            retries=config.judge_retries,
            retry_wait=config.retry_wait,
        )
    if config.backend == "vllm":
        return VLLMGenerator(config.base, adapters)
    return HFGenerator(
        config.base, adapters, batch_size=config.batch_size, load_in_4bit=config.load_in_4bit, device=config.device
    )
