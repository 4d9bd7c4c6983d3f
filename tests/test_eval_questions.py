"""Question files: the EM YAML format read unchanged, the shipped sets, and one-line errors (a tested contract)."""

import textwrap

import pytest

from grasp_trl.eval.questions import FORCED_CHOICE, FREE_FORM, load_all, load_questions, render

EM_STYLE = textwrap.dedent("""\
    - id: q_one
      type: free_form_judge_0_100
      paraphrases:
        - "first {wording}"
        - second wording
      samples_per_paraphrase: 7
      system: You are terse.
      judge: some-judge-name
      judge_prompts:
        aligned: "Q: {question} A: {answer} -> 0-100"
        coherent: "Coherence of {answer}"
    - id: q_two
      type: free_form_judge_0_100
      paraphrases: [only one]
      judge_prompts:
        aligned: "{answer}"
        coherent: "{answer}"
    """)


def _write(tmp_path, text, name="q.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_em_format_is_read_unchanged(tmp_path):
    one, two = load_questions(_write(tmp_path, EM_STYLE))
    assert (one.id, one.type, one.samples_per_paraphrase, one.system) == ("q_one", FREE_FORM, 7, "You are terse.")
    assert one.judge == "some-judge-name" and two.judge is None
    assert one.paraphrases == ("first {wording}", "second wording")
    assert one.messages("hi") == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]
    assert two.samples_per_paraphrase == 1 and two.messages("x") == [{"role": "user", "content": "x"}]
    assert (
        render(one.judge_prompts["aligned"], "first {wording}", "an {answer}")
        == "Q: first {wording} A: an {answer} -> 0-100"
    )


def test_shipped_sets_load():
    questions = load_all(["em", "lean", "lean_choice"])
    kinds = {q.type for q in questions}
    assert kinds == {FREE_FORM, FORCED_CHOICE}
    em = [q for q in questions if "aligned" in q.judge_prompts]
    assert len(em) >= 8 and all(q.samples_per_paraphrase * len(q.paraphrases) == 100 for q in em)
    assert all(set(q.judge_prompts) == {"lean", "coherent"} for q in questions if q.type == FREE_FORM and q not in em)
    choice = next(q for q in questions if q.type == FORCED_CHOICE)
    prompt, swapped = choice.choice_prompt("Pick.", False), choice.choice_prompt("Pick.", True)
    assert prompt.index(choice.options[0]) < prompt.index(choice.options[1])
    assert swapped.index(choice.options[1]) < swapped.index(choice.options[0])


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "- id: a\n  type: free_form_judge_0_100\n  judge_prompts: {aligned: '{answer}'}\n",
            "item 0 (a): expected `paraphrases`, a non-empty list of strings; found None",
        ),
        (
            "- id: a\n  type: multiple_choice\n  paraphrases: [x]\n",
            "item 0 (a): unknown type 'multiple_choice'; expected one of free_form_judge_0_100, forced_choice",
        ),
        (
            "- id: a\n  type: free_form_judge_0_100\n  paraphrases: [x]\n"
            "  judge_prompts: {aligned: 'Rate {question}'}\n",
            "item 0 (a): judge_prompts.aligned must be a template containing {answer}; found 'Rate {question}'",
        ),
        (
            "- id: a\n  type: forced_choice\n  paraphrases: [x]\n  options: {left: l}\n",
            "item 0 (a): expected `options: {left: ..., right: ...}`; found {'left': 'l'}",
        ),
        ("id: a\n", "expected a top-level YAML list of question items; found dict"),
        ("- type: forced_choice\n", "item 0: expected an `id`; found none"),
    ],
)
def test_bad_question_files_are_one_line_naming_the_file(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError) as info:
        load_questions(path)
    assert str(info.value) == f"{path}: {expected}"


def test_missing_file_and_duplicate_ids_across_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--questions .*nope.yaml: file not found"):
        load_all([str(tmp_path / "nope.yaml")])
    first, second = _write(tmp_path, EM_STYLE, "a.yaml"), _write(tmp_path, EM_STYLE, "b.yaml")
    with pytest.raises(ValueError, match=r"b.yaml: id 'q_one' also in .*a.yaml; expected ids unique"):
        load_all([str(first), str(second)])
