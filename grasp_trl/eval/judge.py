"""Judges: turn a filled judge prompt into probabilities of the answers "0".."100".

* `HTTPJudge`: an OpenAI-compatible server, the field's one-token method: one completion token, temperature 0,
  `logprobs`, `top_logprobs=20`, a fixed seed; the probabilities of the top tokens that are integers 0-100 are
  the distribution. A start-up probe checks that logprobs come back and that numbers are single tokens (a
  judge whose tokenizer splits "87" into "8", "7" would be scored on first digits only: refused).
* `LocalJudge`: a Hugging Face causal LM. `whole_string` (default) scores every string "0".."100" exactly:
  P(its tokens) x P(the number ends there), where "ends" means the next token is not a digit continuation
  (end-of-turn, punctuation, anything else). This is right for digit-splitting tokenizers (Qwen, Llama-2) and,
  on a tokenizer where every number is one token, equals the `first_token` method, which it also offers.

Both go through `JudgeCache`, keyed by the judge's identity and the exact prompt, persisted in the output
directory, so a resumed or repeated run never pays twice for the same judgement.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .generate import chat_ids
from .http import ChatClient, top_logprobs
from .metrics import number_value

NUMBERS = [str(n) for n in range(101)]
PROBE_PROMPT = "Reply with the number 87 and nothing else."
KEEP_MIN = 1e-6  # raw probabilities below this are not stored (the rest: 6 significant digits)


class JudgeCache:
    """Judgements (prompt -> probabilities) of one judge, in memory and appended to a JSONL file."""

    def __init__(self, identity: dict, path: str | Path | None = None):
        self.prefix = json.dumps(identity, sort_keys=True) + "\0"
        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = {}
        self.lock = threading.Lock()
        if self.path and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a torn line from a crash: that judgement is asked again
                    continue
                self.entries[entry["key"]] = entry["probs"]

    def key(self, prompt: str) -> str:
        return hashlib.sha256((self.prefix + prompt).encode()).hexdigest()

    def get(self, prompt: str) -> dict | None:
        return self.entries.get(self.key(prompt))

    def put(self, prompt: str, probs: dict) -> None:
        key = self.key(prompt)
        with self.lock:
            self.entries[key] = probs
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as handle:
                    handle.write(json.dumps({"key": key, "probs": probs}) + "\n")
                    handle.flush()


class Judge:
    """Base: `identity` (recorded in summary.json) and `judge_many` through the cache."""

    identity: dict
    cache: JudgeCache | None = None
    concurrency: int = 1

    def probabilities(self, prompt: str) -> dict[str, float]:
        raise NotImplementedError

    def use_cache(self, path: str | Path | None) -> Judge:
        self.cache = JudgeCache(self.identity, path)
        return self

    def judge_many(self, prompts: list[str], progress=None) -> list[dict[str, float]]:
        """Probabilities for every prompt (cached ones are not asked again), in order."""
        cache = self.cache or self.use_cache(None).cache

        def one(prompt):
            probs = cache.get(prompt)
            if probs is None:
                probs = {t: float(f"{p:.6g}") for t, p in self.probabilities(prompt).items() if p >= KEEP_MIN}
                cache.put(prompt, probs)
            if progress is not None:
                progress.update(1)
            return probs

        if self.concurrency <= 1:
            return [one(p) for p in prompts]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, prompts))


class HTTPJudge(Judge):
    """Chat-completions judge with the one-token logprob method (see the module docstring)."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        seed: int = 0,
        concurrency: int = 8,
        retries: int = 5,
        retry_wait: float = 1.0,
    ):
        self.client = ChatClient(url, api_key=api_key, retries=retries, retry_wait=retry_wait, flag="--judge-url")
        self.model, self.seed, self.concurrency = model, seed, concurrency
        self.identity = {"url": url, "model": model, "method": "first_token_top20"}

    def body(self, prompt: str) -> dict:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 20,
            "seed": self.seed,
        }

    def probabilities(self, prompt: str) -> dict[str, float]:
        return top_logprobs(self.client.post(self.body(prompt)), f"--judge-url {self.client.url}")

    def probe(self) -> None:
        """Refuse, in one line, a judge that is unreachable, sends no logprobs, or splits numbers into digits."""
        probs = top_logprobs(
            self.client.post(self.body(PROBE_PROMPT)), f"--judge-url {self.client.url} (model {self.model})"
        )
        numbers = {t.strip() for t in probs if number_value(t) is not None}
        if not any(len(n) > 1 for n in numbers):
            top = sorted(probs, key=probs.get, reverse=True)[:5]
            raise ValueError(
                f"--judge-url {self.client.url}: judge model {self.model} does not answer numbers as "
                f"single tokens (asked for 87, top first tokens {top}); expected a multi-digit number "
                f"token, which the one-token method needs; use --judge-local (whole-string method) "
                f"or a judge whose tokenizer keeps 0-100 as one token"
            )


class LocalJudge(Judge):
    """A local Hugging Face judge (see the module docstring for the two methods)."""

    def __init__(self, name: str, *, method: str = "whole_string", device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if method not in ("whole_string", "first_token"):
            raise ValueError(f"--judge-method: expected whole_string or first_token; found {method!r}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForCausalLM.from_pretrained(name, dtype="auto").eval()
        except Exception as exc:
            raise ValueError(
                f"--judge-local {name}: cannot load a causal LM and its tokenizer "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from exc
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.method = method
        self.candidates = [self.tokenizer.encode(n, add_special_tokens=False) for n in NUMBERS]
        split = [(n, ids) for n, ids in zip(NUMBERS, self.candidates) if len(ids) != 1]
        if method == "first_token" and split:
            n, ids = split[-1]
            raise ValueError(
                f"--judge-local {name}: tokenizer splits numbers ({n!r} -> {len(ids)} tokens); "
                f"expected one token per number for --judge-method first_token; use whole_string"
            )
        self.continuations = sorted(
            {t for n in range(1000) for t in self.tokenizer.encode(str(n), add_special_tokens=False)[1:]}
        )
        self.identity = {"local": name, "model": getattr(self.model.config, "_name_or_path", name), "method": method}

    def prompt_ids(self, prompt: str) -> list[int]:
        """The judge prompt as one user turn, ready for the assistant's answer."""
        return chat_ids(self.tokenizer, [{"role": "user", "content": prompt}])

    def probabilities(self, prompt: str) -> dict[str, float]:
        import torch

        ids = torch.tensor([self.prompt_ids(prompt)], device=self.device)
        with torch.no_grad():
            out = self.model(ids, use_cache=self.method == "whole_string")
            first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            if self.method == "first_token":
                return {n: math.exp(first[c[0]].item()) for n, c in zip(NUMBERS, self.candidates)}
            return self._whole_strings(first, out.past_key_values)

    def _whole_strings(self, first, cache) -> dict[str, float]:
        """log P(string) = sum of its tokens' log-probabilities + log P(next token is no digit continuation),
        for all 101 strings in one batched forward over the cached prompt."""
        import torch

        width = max(len(c) for c in self.candidates)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = torch.tensor([c + [pad] * (width - len(c)) for c in self.candidates], device=self.device)
        prompt_len = cache.get_seq_length()
        cache.batch_repeat_interleave(len(self.candidates))
        mask = torch.ones(len(self.candidates), prompt_len + width, dtype=torch.long, device=self.device)
        with torch.no_grad():
            logits = self.model(batch, attention_mask=mask, past_key_values=cache).logits.float()
        steps = torch.log_softmax(logits, dim=-1)  # steps[b, j]: distribution after candidate token j
        continuation = torch.tensor(self.continuations, dtype=torch.long, device=self.device)
        result = {}
        for b, (number, tokens) in enumerate(zip(NUMBERS, self.candidates)):
            logp = first[tokens[0]].item() + sum(steps[b, j - 1, tokens[j]].item() for j in range(1, len(tokens)))
            cont = steps[b, len(tokens) - 1].exp()[continuation].sum().item() if len(continuation) else 0.0
            result[number] = math.exp(logp) * max(0.0, 1.0 - cont)
        return result


def judge_from(config, cache_path: str | Path | None) -> Judge:
    """The judge the config names (HTTP or local), probed, with its cache; one line when none is given."""
    import os

    if config.judge_url and config.judge_local:
        raise ValueError("--judge-url / --judge-local: expected one judge; found both")
    if config.judge_url:
        if not config.judge_model:
            raise ValueError(
                f"--judge-model: expected the judge model's name for --judge-url {config.judge_url}; found none"
            )
        key = os.environ.get("GRASP_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        judge = HTTPJudge(
            config.judge_url,
            config.judge_model,
            api_key=key,
            seed=config.seed,
            concurrency=config.judge_concurrency,
            retries=config.judge_retries,
            retry_wait=config.retry_wait,
        )
        judge.probe()
    elif config.judge_local:
        judge = LocalJudge(config.judge_local, method=config.judge_method, device=config.device)
    else:
        raise ValueError(NO_JUDGE)
    return judge.use_cache(cache_path)


NO_JUDGE = (
    "no judge given: expected --judge-url URL --judge-model NAME (OpenAI-compatible, key from "
    "GRASP_JUDGE_API_KEY or OPENAI_API_KEY) or --judge-local DIR_OR_NAME; the judge is never chosen "
    "silently"
)
