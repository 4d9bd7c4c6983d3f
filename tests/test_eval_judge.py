"""Judges against real parts: a chat-completions server on 127.0.0.1 (scripted, or backed by a tiny local
judge's real logprobs) and local judges with word-level and digit-split tokenizers."""

import json
import socket

import pytest
import torch

from eval_fixtures import ChatServer, chat_response, local_judge_responder, scripted_judge
from grasp_trl.eval.config import EvalConfig
from grasp_trl.eval.judge import NO_JUDGE, NUMBERS, PROBE_PROMPT, HTTPJudge, LocalJudge, judge_from
from grasp_trl.eval.metrics import score

PROMPT = "grade the answer 50 reply with number and nothing else"


def _by_answer(prompt):
    return {"90": 0.6, "80": 0.4} if "good" in prompt else {"10": 0.7, "I": 0.3}


def test_http_judge_parameters_and_key_only_in_the_header(monkeypatch):
    with ChatServer(scripted_judge(_by_answer)) as server:
        judge = HTTPJudge(server.url, "judge-x", api_key="sk-secret-123", seed=7, concurrency=2)
        judge.probe()
        results = judge.judge_many(["a good answer", "a bad answer"])
        assert [score(r) for r in results] == [pytest.approx(86.0), pytest.approx(10.0)]
        assert len(server.requests) == 3
        for path, headers, body in server.requests:
            assert path == "/v1/chat/completions"
            assert headers["Authorization"] == "Bearer sk-secret-123"
            assert {k: body[k] for k in ("model", "max_tokens", "temperature", "logprobs", "top_logprobs", "seed")} == {
                "model": "judge-x",
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": 20,
                "seed": 7,
            }
            assert "sk-secret" not in json.dumps(body) and "sk-secret" not in path
        assert server.requests[0][2]["messages"] == [{"role": "user", "content": PROBE_PROMPT}]
        judge.judge_many(["a good answer"])  # cached: no new request
        assert len(server.requests) == 3


def test_http_judge_retries_429_and_500(tmp_path):
    with ChatServer(scripted_judge(_by_answer), fail=[429, 500, 503]) as server:
        judge = HTTPJudge(server.url, "j", retries=3, retry_wait=0.01, concurrency=1)
        assert score(judge.judge_many(["good"])[0]) == pytest.approx(86.0)
        assert len(server.requests) == 4
    with ChatServer(scripted_judge(_by_answer), fail=[500] * 3) as server:
        judge = HTTPJudge(server.url, "j", retries=2, retry_wait=0.01)
        with pytest.raises(ConnectionError) as info:
            judge.probabilities("good")
        assert str(info.value).startswith(
            f"--judge-url {server.url}: HTTP 500 from {server.url}/chat/completions after 3 attempt(s); expected 200"
        )
    with ChatServer(scripted_judge(_by_answer), fail=[401]) as server:  # not retried
        with pytest.raises(ConnectionError, match="HTTP 401 .* after 1 attempt"):
            HTTPJudge(server.url, "j", retries=3, retry_wait=0.01).probabilities("good")


def test_unreachable_judge_and_judge_without_logprobs_are_one_line():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(ConnectionError) as info:
        HTTPJudge(url, "j", retries=1, retry_wait=0.01).probe()
    message = str(info.value)
    assert message.startswith(f"--judge-url {url}: cannot reach {url}/chat/completions (") and "\n" not in message
    assert message.endswith("expected an OpenAI-compatible server answering POST /chat/completions")
    with ChatServer(lambda body: chat_response(None, content="50")) as server:
        with pytest.raises(ValueError) as info:
            HTTPJudge(server.url, "plain").probe()
        assert str(info.value).startswith(
            f"--judge-url {server.url} (model plain): response has no logprobs; "
            f"expected choices[0].logprobs.content[0].top_logprobs"
        )


def test_local_whole_string_equals_first_token_when_numbers_are_single_tokens(eval_models):
    whole = LocalJudge(str(eval_models["judge_words"]))
    first = LocalJudge(str(eval_models["judge_words"]), method="first_token")
    assert whole.continuations == []
    p, q = whole.probabilities(PROMPT), first.probabilities(PROMPT)
    assert set(p) == set(NUMBERS) and max(abs(p[n] - q[n]) for n in NUMBERS) < 1e-6
    assert score(p) == pytest.approx(score(q), abs=1e-6)


def test_local_whole_string_is_exact_on_a_digit_splitting_tokenizer(eval_models):
    judge = LocalJudge(str(eval_models["judge_digits"]))
    tok = judge.tokenizer
    assert tok.convert_ids_to_tokens(tok.encode("57", add_special_tokens=False)) == ["5", "7"]
    probs = judge.probabilities(PROMPT)
    prompt = judge.prompt_ids(PROMPT)
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]

    def next_dist(ids):  # one full forward, no cache
        with torch.no_grad():
            return torch.softmax(judge.model(torch.tensor([ids])).logits[0, -1].double(), dim=-1)

    for number in ["0", "7", "42", "100"]:
        tokens = tok.encode(number, add_special_tokens=False)
        expected = 1.0
        for j, t in enumerate(tokens):
            expected *= next_dist(prompt + tokens[:j])[t].item()
        expected *= 1 - next_dist(prompt + tokens)[digits].sum().item()
        assert probs[number] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError) as info:
        LocalJudge(str(eval_models["judge_digits"]), method="first_token")
    assert str(info.value) == (
        f"--judge-local {eval_models['judge_digits']}: tokenizer splits numbers ('100' -> 3 "
        f"tokens); expected one token per number for --judge-method first_token; use "
        f"whole_string"
    )


def test_http_judge_backed_by_real_local_logprobs(eval_models):
    local = LocalJudge(str(eval_models["judge_words"]), method="first_token")
    with ChatServer(local_judge_responder(local)) as server:
        remote = HTTPJudge(server.url, "tiny-words")
        probs = remote.probabilities(PROMPT)
        assert len(probs) == 20
        full = local.probabilities(PROMPT)  # every number's probability from the same model
        numbers_in_top = [t for t in probs if t in full]
        assert numbers_in_top and all(probs[t] == pytest.approx(full[t], rel=1e-5) for t in numbers_in_top)
        assert min(probs[t] for t in numbers_in_top) >= max(p for t, p in full.items() if t not in numbers_in_top)
        mass = sum(full[t] for t in numbers_in_top)  # the score the one-token method sees (None below 0.25)
        expected = sum(int(t) * full[t] for t in numbers_in_top) / mass if mass >= 0.25 else None
        assert score(probs) == (pytest.approx(expected, rel=1e-6) if expected is not None else None)


def test_http_probe_refuses_a_judge_that_splits_numbers(eval_models):
    local = LocalJudge(str(eval_models["judge_digits"]))
    with ChatServer(local_judge_responder(local)) as server:
        with pytest.raises(ValueError) as info:
            HTTPJudge(server.url, "tiny-digits").probe()
    message = str(info.value)
    assert message.startswith(
        f"--judge-url {server.url}: judge model tiny-digits does not answer numbers as single "
        f"tokens (asked for 87, top first tokens ["
    )
    assert "use --judge-local (whole-string method)" in message and "\n" not in message


def test_judge_from_flags_key_fallback_and_no_silent_default(monkeypatch, tmp_path):
    monkeypatch.delenv("GRASP_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fallback")
    with ChatServer(scripted_judge(_by_answer)) as server:
        judge = judge_from(EvalConfig(judge_url=server.url, judge_model="m"), tmp_path / "cache.jsonl")
        judge.judge_many(["good"])
        assert [h["Authorization"] for _, h, _ in server.requests] == ["Bearer sk-fallback"] * 2
        assert (tmp_path / "cache.jsonl").is_file() and "sk-fallback" not in (tmp_path / "cache.jsonl").read_text()
    with pytest.raises(ValueError) as info:
        judge_from(EvalConfig(), None)
    assert str(info.value) == NO_JUDGE
    with pytest.raises(ValueError, match=r"^--judge-url / --judge-local: expected one judge; found both$"):
        judge_from(EvalConfig(judge_url="http://x", judge_model="m", judge_local="dir"), None)
