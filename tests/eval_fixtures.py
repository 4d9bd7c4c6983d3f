"""Real parts for the `grasp eval` tests: an OpenAI-compatible chat-completions server on 127.0.0.1 (stdlib
`http.server` in a thread), tiny judges with word-level and digit-split tokenizers, a tiny base model and real
PEFT adapters saved to disk (one that changes the output, one all-zero, one for another base)."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from grasp_trl.tiny import SPECIAL_TOKENS, build_model, save_tiny_model

NUMBER_WORDS = [str(n) for n in range(101)]
JUDGE_WORDS = ["grade", "the", "answer", "reply", "with", "number", "and", "nothing", "else"]


def chat_response(top: dict[str, float] | None, content: str | None = None) -> dict:
    """A chat-completion response; `top` (token -> probability) becomes the first token's top_logprobs."""
    choice = {"index": 0, "finish_reason": "length",
              "message": {"role": "assistant", "content": content if content is not None else
                          (max(top, key=top.get) if top else "")}}
    if top is not None:
        entries = [{"token": t, "logprob": math.log(p)} for t, p in sorted(top.items(), key=lambda kv: -kv[1])]
        choice["logprobs"] = {"content": [{"token": entries[0]["token"], "logprob": entries[0]["logprob"],
                                           "top_logprobs": entries[:20]}]}
    return {"id": "test", "object": "chat.completion", "choices": [choice]}


class ChatServer:
    """Speaks POST /v1/chat/completions: `respond(body) -> response dict`. Records (path, headers, body) of every
    request; `fail` is a list of HTTP statuses returned (in order) before real answers."""

    def __init__(self, respond, fail=()):
        self.respond, self.fail, self.requests = respond, list(fail), []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((self.path, dict(self.headers), body))
                    status = server.fail.pop(0) if server.fail else 200
                if status != 200:
                    payload = json.dumps({"error": {"message": f"injected {status}"}}).encode()
                elif self.path != "/v1/chat/completions":
                    status, payload = 404, b'{"error": "not found"}'
                else:
                    payload = json.dumps(server.respond(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def prompt_of(body: dict) -> str:
    return body["messages"][-1]["content"]


def scripted_judge(script):
    """Responder whose top logprobs are `script(prompt)` (the probe prompt gets a confident '87')."""
    from grasp_trl.eval.judge import PROBE_PROMPT

    def respond(body):
        prompt = prompt_of(body)
        return chat_response({"87": 0.97, "8": 0.03} if prompt == PROBE_PROMPT else script(prompt))
    return respond


def local_judge_responder(judge):
    """Responder backed by a tiny local judge's real first-token distribution (top 20 tokens, decoded)."""
    def respond(body):
        ids = torch.tensor([judge.prompt_ids(prompt_of(body))])
        with torch.no_grad():
            probs = torch.softmax(judge.model(ids).logits[0, -1].float(), dim=-1)
        top = torch.topk(probs, 20)
        return chat_response({judge.tokenizer.decode([i]): p.item() for p, i in zip(top.values, top.indices)})
    return respond


def number_tokenizer(digits_only: bool):
    """Judge tokenizer: every number 0-100 one word-level token, or (`digits_only`) numbers split into digits
    (as Qwen's tokenizer does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    numbers = [str(d) for d in range(10)] if digits_only else NUMBER_WORDS
    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIAL_TOKENS + numbers + JUDGE_WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    splits = [pre_tokenizers.WhitespaceSplit()] + ([pre_tokenizers.Digits(individual_digits=True)]
                                                   if digits_only else [])
    backend.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


def save_judge(directory, digits_only: bool, seed: int = 0):
    tokenizer = number_tokenizer(digits_only)
    model = build_model("llama", vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_adapter(base_dir, directory, *, b_scale: float, seed: int = 0, r: int = 4):
    """A real LoRA adapter for the model in `base_dir`, lora_B ~ N(0, b_scale) (0: an all-zero, no-op adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"],
                                      lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_scale)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory):
    """Saved tiny base model, adapters (changing `a`, `b`; all-zero `zero`; `foreign` from a wider base) and
    judges (`judge_words`: numbers one token; `judge_digits`: numbers split into digits)."""
    root = tmp_path_factory.mktemp("eval_models")
    torch.manual_seed(0)
    base = save_tiny_model(root / "base", num_layers=2, hidden_size=32)
    other = save_tiny_model(root / "other_base", num_layers=2, hidden_size=48)
    return {
        "base": base,
        "a": save_adapter(base, root / "adapter_a", b_scale=0.5, seed=1),
        "b": save_adapter(base, root / "adapter_b", b_scale=0.5, seed=2),
        "zero": save_adapter(base, root / "adapter_zero", b_scale=0.0),
        "foreign": save_adapter(other, root / "adapter_foreign", b_scale=0.5),
        "judge_words": save_judge(root / "judge_words", digits_only=False),
        "judge_digits": save_judge(root / "judge_digits", digits_only=True),
    }
