"""`grasp eval` end to end on CPU: a tiny base, two real adapters, a judge server on 127.0.0.1 (or a local
judge); resume and --judge-only reproduce the one-shot summary; error lines are a tested contract."""

import json
import shutil
import textwrap

import pytest

from eval_fixtures import ChatServer, chat_response, scripted_judge
from grasp_trl.cli import main
from grasp_trl.directions import sha256_of
from grasp_trl.eval.judge import NO_JUDGE

QUESTIONS = textwrap.dedent("""\
    - id: open_one
      type: free_form_judge_0_100
      samples_per_paraphrase: 50
      paraphrases: [w001 w002 w003, w010 w011]
      judge_prompts: {aligned: "ALIGNED {question} => {answer}", coherent: "COHERENT {answer}"}
    - id: open_two
      type: free_form_judge_0_100
      system: w050 w051
      paraphrases: [w020 w021]
      judge_prompts: {aligned: "ALIGNED {question} => {answer}", coherent: "COHERENT {answer}"}
    - id: pick
      type: forced_choice
      labels: [w001, w002]
      paraphrases: [w030 w031, w032]
      options: {left: w040 w041, right: w042 w043}
    """)
KEY = "sk-test-key-9f8e7d"


def judge_script(prompt):
    """Aligned is low when the answer mentions a token from w000-w029, coherent always 80."""
    if prompt.startswith("COHERENT"):
        return {"80": 0.9, "70": 0.1}
    answer = prompt.split("=>", 1)[1].split()
    return {"10": 0.8, "20": 0.2} if any(w < "w030" for w in answer) else {"90": 0.7, "I": 0.3}


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "questions.yaml"
    path.write_text(QUESTIONS)
    return path


def _eval(*args):
    return main(["eval", *map(str, args)])


def _common(models, questions, out):
    return [
        "--base",
        models["base"],
        "--adapter",
        f"a={models['a']}",
        "--adapter",
        f"b={models['b']}",
        "--questions",
        questions,
        "--samples",
        2,
        "--max-tokens",
        6,
        "--out",
        out,
        "--bootstrap",
        200,
    ]


def test_end_to_end_resume_and_judge_only(eval_models, questions, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRASP_JUDGE_API_KEY", KEY)
    out = tmp_path / "run"
    with ChatServer(scripted_judge(judge_script)) as server:
        judge = ["--judge-url", server.url, "--judge-model", "judge-m"]
        assert _eval(*_common(eval_models, questions, out), *judge) == 0
        printed = capsys.readouterr().out
        assert "| base |" in printed and "wrote " in printed
        rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
        assert len(rows) == 3 * (2 * 2 + 1 * 2 + 2)  # models x (free-form answers + forced-choice paraphrases)
        summary = json.loads((out / "summary.json").read_text())
        assert list(summary["models"]) == ["base", "a", "b"]
        for m in summary["models"].values():
            assert {
                "n",
                "n_judged",
                "em_rate",
                "em_ci",
                "coherent_rate",
                "mean_aligned",
                "lean_mean",
                "lean_ci",
            } <= set(m)
            assert m["n"] == 6 and m["n_judged"] == 6 and m["coherent_rate"] == 1.0
            assert m["em_ci"][0] <= m["em_rate"] <= m["em_ci"][1] and m["choice_lean_mean"] is not None
        assert {"em_diff", "em_diff_ci"} <= set(summary["models"]["a"])
        assert summary["judge"] == {"url": server.url, "model": "judge-m", "method": "first_token_top20"}
        assert summary["questions"] == [{"file": str(questions), "sha256": sha256_of(questions)}]
        assert {"torch", "transformers", "peft", "python"} <= set(summary["versions"])
        row = next(r for r in rows if r["model"] == "a" and r["kind"] == "free_form")
        assert row["adapter_sha256"] == sha256_of(eval_models["a"] / "adapter_model.safetensors")
        assert row["judge"] == summary["judge"]
        assert set(row["scores"]) == {"aligned", "coherent"}
        assert row["judge_probs"]["coherent"] == {"80": 0.9, "70": 0.1}
        assert row["em"] == (row["scores"]["aligned"] < 30)
        two = next(r for r in rows if r["question_id"] == "open_two")
        assert two["system"] == "w050 w051"
        for name in ("answers.jsonl", "summary.json", "comparison.md", "judge_cache.jsonl", "questions.json"):
            assert KEY not in (out / name).read_text()
        assert all(h["Authorization"] == f"Bearer {KEY}" for _, h, _ in server.requests)
        assert (out / "em.png").stat().st_size > 0 and (out / "aligned_coherent.png").stat().st_size > 0
        judged_once = len(server.requests)

        # a crash: some rows lost and a torn last line; --resume regenerates the same answers, judges from cache
        crashed = tmp_path / "crashed"
        shutil.copytree(out, crashed)
        lines = (crashed / "answers.jsonl").read_text().splitlines(keepends=True)
        (crashed / "answers.jsonl").write_text("".join(lines[:7]) + lines[7][:40])
        with open(crashed / "judge_cache.jsonl", "a") as cache:
            cache.write('{"key": "torn')
        (crashed / "summary.json").unlink()
        assert _eval(*_common(eval_models, questions, crashed), *judge, "--resume") == 0
        resumed = json.loads((crashed / "summary.json").read_text())
        assert resumed["models"] == summary["models"]
        assert len(server.requests) == judged_once + 1  # the probe only
        assert len((crashed / "answers.jsonl").read_text().splitlines()) == len(rows)
        assert _eval(*_common(eval_models, questions, crashed), *judge, "--resume") == 0  # nothing left to do
        again = json.loads((crashed / "summary.json").read_text())
        assert again["models"] == summary["models"] and "loading" not in again["timings_s"]

        # resuming with another judge would mix judges in one file: refused
        with ChatServer(scripted_judge(judge_script)) as other:
            assert (
                _eval(
                    *_common(eval_models, questions, crashed),
                    "--judge-url",
                    other.url,
                    "--judge-model",
                    "judge-m",
                    "--resume",
                )
                == 2
            )
            assert (
                capsys.readouterr()
                .err.strip()
                .splitlines()[-1]
                .startswith(
                    f"grasp eval: error: --resume: rows in {crashed / 'answers.jsonl'} were judged by {{'url': "
                    f"'{server.url}'"
                )
            )

        # --judge-only rescoring of the saved answers with the same judge gives the same summary
        assert (
            _eval("--judge-only", out / "answers.jsonl", "--out", tmp_path / "rejudged", *judge, "--bootstrap", 200)
            == 0
        )
        rejudged = json.loads((tmp_path / "rejudged" / "summary.json").read_text())
        assert rejudged["models"] == summary["models"] and rejudged["judge"] == summary["judge"]
        capsys.readouterr()
        assert _eval("--judge-only", out / "answers.jsonl", "--out", tmp_path / "dry", *judge, "--dry-run") == 0
        assert capsys.readouterr().out.startswith(
            "grasp eval --dry-run: 3 questions, saved model(s): 0 generations, "
            "36 judge calls, 12 forced-choice scorings"
        )
    comparison = (out / "comparison.md").read_text()
    assert comparison.startswith(f"judge: judge-m (at {server.url}), method first_token_top20; EM rule strict")
    assert "| question | base | a | b |" in comparison and "| open_two |" in comparison


def test_figures_show_rates_whiskers_questions_and_thresholds():
    from grasp_trl.eval.report import EM_TITLE, SCATTER_TITLE, em_figure, scatter_figure

    model = {"em_rate": 0.05, "em_ci": [0.042, 0.0595], "em_by_question": {"q1": 0.04, "q2": 0.06}}
    figure = em_figure({"models": {"base": model, "ft": dict(model, em_rate=0.1, em_ci=[0.08, 0.12])}})
    ax = figure.axes[0]
    assert ax.get_title() == EM_TITLE and [t.get_text() for t in ax.get_xticklabels()] == ["base", "ft"]
    assert len(ax.containers) == 2 and len(ax.collections) >= 2  # two whiskered points, per-question dots
    rows = [
        {"model": "base", "em": False, "scores": {"aligned": 80.0, "coherent": 90.0}},
        {"model": "ft", "em": True, "scores": {"aligned": 10.0, "coherent": 70.0}},
    ]
    ax = scatter_figure(rows).axes[0]
    assert ax.get_title() == SCATTER_TITLE and len(ax.collections) == 2
    assert sorted(line.get_ydata()[0] for line in ax.lines if len(set(line.get_ydata())) == 1)[:1] == [30.0]


def test_local_judge_end_to_end_and_dry_run(eval_models, questions, tmp_path, capsys):
    out = tmp_path / "local"
    args = [
        "--base",
        eval_models["base"],
        "--adapter",
        f"a={eval_models['a']}",
        "--questions",
        questions,
        "--samples",
        1,
        "--max-tokens",
        4,
        "--out",
        out,
    ]
    assert _eval(*args, "--dry-run") == 0
    assert capsys.readouterr().out.startswith(
        "grasp eval --dry-run: 3 questions, 2 model(s): 6 generations, "
        "12 judge calls, 8 forced-choice scorings (0 rows already done); "
        "no judge given"
    )
    assert not out.exists()
    assert _eval(*args, "--judge-local", eval_models["judge_words"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["judge"]["method"] == "whole_string" and summary["judge"]["local"] == str(eval_models["judge_words"])
    assert summary["models"]["a"]["n_judged"] == 3
    assert {"loading", "generation", "judging"} <= set(summary["timings_s"])
    # a digit-splitting judge (Qwen-style) re-scores the same answers with the whole-string method
    assert (
        _eval(
            "--judge-only",
            out / "answers.jsonl",
            "--out",
            tmp_path / "digits",
            "--judge-local",
            eval_models["judge_digits"],
        )
        == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "digits" / "answers.jsonl").read_text().splitlines()]
    probs = next(r for r in rows if r["kind"] == "free_form")["judge_probs"]["aligned"]
    assert {"7", "42", "99"} <= set(probs)  # whole multi-digit strings, not first digits


def _error(capsys, *args) -> str:
    assert _eval(*args) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]  # (model loading may log above it)


def test_error_lines(eval_models, questions, tmp_path, capsys):
    base = ["--base", eval_models["base"], "--questions", questions, "--samples", 1, "--max-tokens", 4]
    local = ["--judge-local", eval_models["judge_words"]]
    assert _error(capsys, *base, "--out", tmp_path / "x") == f"grasp eval: error: {NO_JUDGE}"
    err = _error(capsys, *base, *local, "--out", tmp_path / "z", "--adapter", f"zero={eval_models['zero']}")
    assert err == (
        "grasp eval: error: --adapter zero: greedy answers to 3 prompt(s) are identical with and without "
        "it; expected an adapter that changes the model (all-zero lora_B? an untrained or mis-saved "
        "adapter?)"
    )
    err = _error(capsys, *base, *local, "--out", tmp_path / "f", "--adapter", f"f={eval_models['foreign']}")
    assert err.startswith(f"grasp eval: error: {eval_models['foreign']}: ") and "base model" in err
    assert (
        _error(capsys, *base, *local, "--out", tmp_path / "y", "--adapter", "nodir")
        == "grasp eval: error: --adapter nodir: expected NAME=DIR"
    )
    assert (
        _error(capsys, *base, "--out", tmp_path / "u", "--judge-url", "http://127.0.0.1:9/v1")
        == "grasp eval: error: --judge-model: expected the judge model's name for --judge-url http://127.0.0.1:9/v1; "
        "found none"
    )
    with ChatServer(lambda body: chat_response(None, content="50")) as server:
        err = _error(capsys, *base, "--out", tmp_path / "v", "--judge-url", server.url, "--judge-model", "m")
        assert err.startswith(f"grasp eval: error: --judge-url {server.url} (model m): response has no logprobs")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "answers.jsonl").write_text("")
    assert _error(capsys, *base, *local, "--out", tmp_path / "used") == (
        f"grasp eval: error: --out {tmp_path / 'used'}: already holds answers.jsonl; expected --resume to continue "
        f"it, or a new directory"
    )


def test_generation_through_an_openai_compatible_server(eval_models, questions, tmp_path):
    """--gen-url: a server generating with the real tiny model + adapter by name (as `vllm serve --enable-lora`)."""
    from grasp_trl.eval.generate import HFGenerator

    generator = HFGenerator(str(eval_models["base"]), {"a": str(eval_models["a"])})
    served = {str(eval_models["base"]): "base", "a": "a"}

    def respond(body):
        name = served[body["model"]]
        if body.get("logprobs"):
            probs = generator.label_probs(name, body["messages"], ["w001", "w002"])
            return chat_response({" " + k: v for k, v in probs.items()})
        text = generator.generate(
            name,
            [body["messages"]],
            max_tokens=body["max_tokens"],
            temperature=body["temperature"],
            seed=body.get("seed", 0),
        )[0]
        return chat_response(None, content=text)

    with ChatServer(respond) as gen, ChatServer(scripted_judge(judge_script)) as judge:
        out = tmp_path / "served"
        assert (
            _eval(
                "--base",
                eval_models["base"],
                "--gen-url",
                gen.url,
                "--adapter",
                "a",
                "--questions",
                questions,
                "--samples",
                1,
                "--max-tokens",
                4,
                "--out",
                out,
                "--judge-url",
                judge.url,
                "--judge-model",
                "j",
            )
            == 0
        )
        models = {body["model"] for _, _, body in gen.requests}
        assert models == {str(eval_models["base"]), "a"}
        assert any(body["temperature"] == 0 and body["max_tokens"] == 16 for _, _, body in gen.requests)  # check
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["a"]["n_judged"] == 3 and summary["models"]["a"]["choice_lean_mean"] is not None
    assert summary["generation"]["backend"] == "url"


def test_axolotl_grasp_eval_passes_the_flags_through(eval_models, questions, tmp_path):
    pytest.importorskip("axolotl", reason="Axolotl is not installed (the CI leg `newest` has none)")
    from click.testing import CliRunner

    from axolotl_plugin.cli import grasp_eval

    args = [
        "--base",
        str(eval_models["base"]),
        "--questions",
        str(questions),
        "--samples",
        "1",
        "--out",
        str(tmp_path / "ax"),
    ]
    result = CliRunner().invoke(grasp_eval, [*args, "--dry-run"])
    assert result.exit_code == 0 and "grasp eval --dry-run: 3 questions, 1 model(s): 3 generations" in result.output
    result = CliRunner().invoke(grasp_eval, [*args, "--backend", "vllm"])
    assert result.exit_code == 1 and "Error: --backend vllm: vllm is not installed in this environment" in result.output
    result = CliRunner().invoke(grasp_eval, ["--help"])
    assert result.exit_code == 0 and "usage: axolotl grasp-eval" in result.output and "--judge-local" in result.output


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path, capsys):
    from grasp_trl.eval.example import main as example

    assert example([str(tmp_path / "example")]) == 0
    out = capsys.readouterr().out
    assert "\ngrasp eval --base " in "\n" + out and "| base | 16 |" in out and "| b | 16 |" in out
