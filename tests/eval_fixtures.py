"""Real parts for the `grasp eval` tests: an OpenAI-compatible chat-completions server on 127.0.0.1 (stdlib
`http.server` in a thread), and (built with `grasp_trl.eval.example`'s builders) tiny judges with word-level and
digit-split tokenizers, a tiny base model and real PEFT adapters saved to disk (two that change the output, one
all-zero, one for another base)."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def chat_response(top: dict[str, float] | None, content: str | None = None) -> dict:
    """A chat-completion response; `top` (token -> probability) becomes the first token's top_logprobs."""
    choice = {
        "index": 0,
        "finish_reason": "length",
        "message": {
            "role": "assistant",
            "content": content if content is not None else (max(top, key=top.get) if top else ""),
        },
    }
    if top is not None:
        entries = [{"token": t, "logprob": math.log(p)} for t, p in sorted(top.items(), key=lambda kv: -kv[1])]
        choice["logprobs"] = {
            "content": [{"token": entries[0]["token"], "logprob": entries[0]["logprob"], "top_logprobs": entries[:20]}]
        }
    return {"id": "test", "object": "chat.completion", "choices": [choice]}


class ChatServer:
    """Speaks POST /v1/chat/completions: `respond(body) -> response dict`. Records (path, headers, body) of every
    request; `fail` is a list of HTTP statuses returned (in order) before real answers."""

    def __init__(self, respond, fail=()):
        self.respond, self.fail, self.requests = respond, list(fail), []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a stuck client cannot hold a handler thread for long

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
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

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
