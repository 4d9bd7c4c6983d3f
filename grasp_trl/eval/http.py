"""A minimal OpenAI-compatible chat-completions client (stdlib `urllib`), shared by the HTTP judge and the HTTP
generation backend.

Retries with exponential back-off (honouring `Retry-After`) on 429, 5xx and connection errors; any other HTTP
error is raised at once. The API key travels only in the `Authorization` header and never appears in a message.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass


def endpoint(url: str) -> str:
    """`http://host/v1` -> `http://host/v1/chat/completions` (a URL already ending so is kept)."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


@dataclass
class ChatClient:
    """POSTs chat-completion requests to one server. `flag` names the command-line flag in error messages."""

    url: str
    api_key: str | None = None
    retries: int = 5
    retry_wait: float = 1.0
    timeout: float = 120.0
    flag: str = "--judge-url"

    def post(self, body: dict) -> dict:
        """The parsed JSON response to `body`; one-line errors name the flag and the URL."""
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        target = endpoint(self.url)
        attempt = 0
        while True:
            request = urllib.request.Request(target, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
                try:
                    return json.loads(payload)
                except json.JSONDecodeError as exc:
                    raise ValueError(
                        f"{self.flag} {self.url}: expected a JSON chat-completion response from "
                        f"{target}; found {payload[:60]!r}"
                    ) from exc
            except urllib.error.HTTPError as exc:
                retryable = exc.code == 429 or exc.code >= 500
                detail = exc.read()[:200].decode(errors="replace").replace("\n", " ")
                if not retryable or attempt == self.retries:
                    raise ConnectionError(
                        f"{self.flag} {self.url}: HTTP {exc.code} from {target} after "
                        f"{attempt + 1} attempt(s); expected 200 ({detail})"
                    ) from exc
                wait = exc.headers.get("Retry-After") if exc.headers else None
                time.sleep(float(wait) if wait and wait.replace(".", "", 1).isdigit() else self.retry_wait * 2**attempt)
            except (urllib.error.URLError, OSError) as exc:
                if attempt == self.retries:
                    reason = getattr(exc, "reason", exc)
                    raise ConnectionError(
                        f"{self.flag} {self.url}: cannot reach {target} ({reason}); expected an "
                        f"OpenAI-compatible server answering POST /chat/completions"
                    ) from exc
                time.sleep(self.retry_wait * 2**attempt)
            attempt += 1


def top_logprobs(response: dict, where: str) -> dict[str, float]:
    """token -> probability of the first generated token's top alternatives, from a chat-completion response.

    Raises one line naming `where` when the response carries no logprobs."""
    try:
        entries = response["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        entries = None
    if not entries:
        found = (response.get("choices") or [{}])[0].get("logprobs") if isinstance(response, dict) else response
        raise ValueError(
            f"{where}: response has no logprobs; expected choices[0].logprobs.content[0].top_logprobs "
            f"(request logprobs=true, top_logprobs=20); found {str(found)[:80]}"
        )
    probs: dict[str, float] = {}
    for entry in entries:
        probs[entry["token"]] = probs.get(entry["token"], 0.0) + math.exp(entry["logprob"])
    return probs
