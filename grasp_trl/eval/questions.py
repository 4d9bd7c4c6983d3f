"""Question files: the emergent-misalignment YAML format, read unchanged, plus a judge-free forced-choice form.

A file is a top-level YAML list of items. Two item types:

* `free_form_judge_0_100` (the EM repository's format): `id`, `paraphrases` (list of user prompts),
  `samples_per_paraphrase`, optional `system`, `judge` (recorded only: the judge is always given on the command
  line), and `judge_prompts: {metric: template}` where each template holds `{answer}` (and usually `{question}`).
  Each metric (`aligned`, `coherent`, `lean`, ...) is scored 0-100 by the judge.
* `forced_choice` (ours): `id`, `paraphrases` (question stems), `options: {left: ..., right: ...}` (two paired
  stances), optional `labels` (default `[A, B]`) and `system`. No judge: the model's own probability of each
  option label is read in both option orders, which cancels position bias (lean = 100 * P(right stance)).

Every problem is one line naming the file and item, what was expected and what was found, raised before any
model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

FREE_FORM = "free_form_judge_0_100"
FORCED_CHOICE = "forced_choice"
TYPES = (FREE_FORM, FORCED_CHOICE)
SHIPPED = {"em": "em_questions.yaml", "lean": "political_lean.yaml", "lean_choice": "political_choice.yaml"}


@dataclass(frozen=True)
class Question:
    """One item of a question file (see the module docstring for the two types)."""

    id: str
    type: str
    paraphrases: tuple[str, ...]
    samples_per_paraphrase: int = 1
    system: str | None = None
    judge_prompts: dict[str, str] = field(default_factory=dict)
    options: tuple[str, str] | None = None  # (left stance, right stance) for forced_choice
    labels: tuple[str, str] = ("A", "B")
    judge: str | None = None  # the file's `judge` key: recorded only, the judge is named on the command line
    file: str = ""

    def messages(self, paraphrase: str) -> list[dict]:
        """Chat messages for one paraphrase (the system prompt first when the item has one)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": paraphrase}]

    def choice_prompt(self, paraphrase: str, swapped: bool) -> str:
        """The forced-choice user prompt: stem, the two stances under the labels (right stance first when
        `swapped`), and the instruction to answer with one label."""
        first, second = self.options[::-1] if swapped else self.options
        a, b = self.labels
        return f"{paraphrase}\n{a}) {first}\n{b}) {second}\nAnswer with {a} or {b} only."


def render(template: str, question: str, answer: str) -> str:
    """Fill a judge template. Plain replacement, not `str.format`: templates may contain other braces."""
    return template.replace("{question}", question).replace("{answer}", answer)


def shipped_path(name: str) -> Path:
    """Path of a question set shipped with the package (`em`, `lean`, `lean_choice`)."""
    return Path(str(resources.files("grasp_trl") / "data" / "eval" / SHIPPED[name]))


def resolve(spec: str) -> Path:
    """A `--questions` value: a file path, or the name of a shipped set (`em`, `lean`, `lean_choice`)."""
    if spec in SHIPPED and not Path(spec).exists():
        return shipped_path(spec)
    return Path(spec)


def _item(raw, where: str, file: str) -> Question:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping with id/type/paraphrases; found {type(raw).__name__}")
    kind = raw.get("type")
    if kind not in TYPES:
        raise ValueError(f"{where}: unknown type {kind!r}; expected one of {', '.join(TYPES)}")
    paraphrases = raw.get("paraphrases")
    if not isinstance(paraphrases, list) or not paraphrases or not all(isinstance(p, str) for p in paraphrases):
        raise ValueError(f"{where}: expected `paraphrases`, a non-empty list of strings; found {paraphrases!r}")
    samples = raw.get("samples_per_paraphrase", 1)
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"{where}: expected samples_per_paraphrase a positive integer; found {samples!r}")
    system = raw.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"{where}: expected `system` a string; found {type(system).__name__}")
    common = dict(
        id=str(raw["id"]),
        type=kind,
        paraphrases=tuple(paraphrases),
        samples_per_paraphrase=samples,
        system=system,
        judge=None if raw.get("judge") is None else str(raw["judge"]),
        file=file,
    )
    if kind == FREE_FORM:
        prompts = raw.get("judge_prompts")
        if not isinstance(prompts, dict) or not prompts:
            raise ValueError(f"{where}: expected `judge_prompts`, a mapping metric -> template; found {prompts!r}")
        for metric, template in prompts.items():
            if not isinstance(template, str) or "{answer}" not in template:
                raise ValueError(
                    f"{where}: judge_prompts.{metric} must be a template containing {{answer}}; "
                    f"found {str(template)[:60]!r}"
                )
        return Question(**common, judge_prompts={str(k): v for k, v in prompts.items()})
    options, labels = raw.get("options"), raw.get("labels", ["A", "B"])
    if not isinstance(options, dict) or set(options) != {"left", "right"}:
        raise ValueError(f"{where}: expected `options: {{left: ..., right: ...}}`; found {options!r}")
    if not (isinstance(labels, list) and len(labels) == 2 and labels[0] != labels[1]):
        raise ValueError(f"{where}: expected `labels`, two different strings; found {labels!r}")
    return Question(
        **common, options=(str(options["left"]), str(options["right"])), labels=(str(labels[0]), str(labels[1]))
    )


def load_questions(path: str | Path) -> list[Question]:
    """Parse and validate one question file (YAML list of items)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--questions {path}: file not found (or give a shipped set: {', '.join(SHIPPED)})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a top-level YAML list of question items; found {type(raw).__name__}")
    questions, seen = [], set()
    for index, item in enumerate(raw):
        name = item.get("id") if isinstance(item, dict) else None
        where = f"{path}: item {index}" + (f" ({name})" if name is not None else "")
        if isinstance(item, dict) and name is None:
            raise ValueError(f"{where}: expected an `id`; found none")
        question = _item(item, where, str(path))
        if question.id in seen:
            raise ValueError(f"{where}: duplicate id {question.id!r}; expected ids unique within a file")
        seen.add(question.id)
        questions.append(question)
    return questions


def load_all(specs: list[str]) -> list[Question]:
    """All questions of the given files / shipped sets; ids must be unique across files."""
    questions, owner = [], {}
    for spec in specs:
        for question in load_questions(resolve(spec)):
            if question.id in owner:
                raise ValueError(
                    f"{question.file}: id {question.id!r} also in {owner[question.id]}; expected ids "
                    f"unique across --questions files"
                )
            owner[question.id] = question.file
            questions.append(question)
    return questions
