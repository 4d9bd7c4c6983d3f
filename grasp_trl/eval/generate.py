"""Generation backends: answers (sampled) and option-label probabilities (forced choice) per model.

A "model" is `base` or an adapter name. Three backends with one interface (`generate`, `label_probs`):

* `HFGenerator` (`--backend hf`): transformers + PEFT, every adapter loaded once under its name and switched
  with `set_adapter` (the base runs with adapters disabled); left-padded batches; each batch seeded from the
  caller's seed, so a unit of work regenerates identically on resume; optional 4-bit loading (bitsandbytes).
* `OpenAIGenerator` (`--gen-url`): an OpenAI-compatible server (e.g. `vllm serve BASE --enable-lora
  --lora-modules NAME=DIR`), the base addressed by the `--base` name and adapters by their names.
* `VLLMGenerator` (`--backend vllm`): vLLM in-process, one `LoRARequest` per adapter; imported only when chosen.

`check_adapters` refuses an adapter whose greedy answers to a few prompts equal the base's (an all-zero or
mis-saved adapter would otherwise be evaluated as a "fine-tuned" model that is just the base).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

BASE = "base"


def chat_text(tokenizer, messages: list[dict]) -> str:
    """The conversation rendered for generation (chat template when the tokenizer has one, else the contents
    joined by blank lines)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `chat_text` (special tokens come from the template, not added twice)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.encode(chat_text(tokenizer, messages), add_special_tokens=False)
    return tokenizer.encode(chat_text(tokenizer, messages))


class Generator(Protocol):
    """What the pipeline needs from a backend; `name` is `base` or an adapter name."""

    def generate(
        self,
        name: str,
        conversations: list[list[dict]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[str]:
        """One answer per conversation (greedy at temperature 0), reproducible for a seed."""

    def label_probs(self, name: str, messages: list[dict], labels) -> dict[str, float] | None:
        """The next-token probabilities of the option labels after `messages`, normalised over the labels."""


def parse_adapters(specs: list[str], *, need_dirs: bool) -> dict[str, str | None]:
    """`--adapter NAME=DIR` values -> {name: dir}; with an HTTP backend a bare NAME (served by name) is allowed."""
    adapters: dict[str, str | None] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not name or (sep and not directory) or (not sep and need_dirs):
            raise ValueError(f"--adapter {spec}: expected NAME=DIR" + ("" if need_dirs else " or NAME"))
        if name == BASE or name in adapters:
            raise ValueError(
                f"--adapter {spec}: name {name!r} is {'reserved' if name == BASE else 'repeated'}; "
                f"expected a unique name other than {BASE!r}"
            )
        adapters[name] = directory or None
    return adapters


def adapter_info(directory: str | None) -> dict:
    """Recorded per answer row: the adapter's absolute path and the sha256 of its weights file."""
    from ..directions import sha256_of

    if not directory:
        return {"adapter_path": None, "adapter_sha256": None}
    weights = Path(directory) / "adapter_model.safetensors"
    return {
        "adapter_path": str(Path(directory).resolve()),
        "adapter_sha256": sha256_of(weights) if weights.is_file() else None,
    }


def _normalised(probs: dict[str, float], labels) -> dict[str, float] | None:
    total = sum(probs.get(label, 0.0) for label in labels)
    return {label: probs.get(label, 0.0) / total for label in labels} if total > 0 else None


class HFGenerator:
    """transformers + PEFT generation (see the module docstring)."""

    def __init__(
        self,
        base: str,
        adapters: dict[str, str],
        *,
        batch_size: int = 16,
        load_in_4bit: bool = False,
        device: str | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..lora import check_adapter_fits

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs = {"dtype": "auto"}
        if load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            )
            kwargs["device_map"] = {"": self.device}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(base)
            model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
        except Exception as exc:
            raise ValueError(
                f"--base {base}: cannot load a causal LM and its tokenizer "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from exc
        if not load_in_4bit:
            model.to(self.device)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        for directory in adapters.values():  # all checked on the bare base before any is loaded
            check_adapter_fits(model, directory)
        for name, directory in adapters.items():
            if not hasattr(model, "peft_config"):
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, directory, adapter_name=name)
            else:
                model.load_adapter(directory, adapter_name=name)
        self.model = model.eval()
        self.batch_size = batch_size

    def _using(self, name: str):
        if name == BASE:
            return self.model.disable_adapter() if hasattr(self.model, "peft_config") else nullcontext()
        self.model.set_adapter(name)
        return nullcontext()

    def _encode(self, conversations):
        texts = [chat_text(self.tokenizer, m) for m in conversations]
        special = not getattr(self.tokenizer, "chat_template", None)
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special).to(self.device)

    def generate(
        self,
        name: str,
        conversations: list[list[dict]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[str]:
        import torch

        answers = []
        for start in range(0, len(conversations), self.batch_size):
            batch = self._encode(conversations[start : start + self.batch_size])
            torch.manual_seed(seed + start)
            # the protocol's sampling only: the generation_config (transformers' default top_k=50; Qwen ships
            # top_k=20, repetition_penalty=1.05) must not change it
            sample = (
                dict(
                    do_sample=True, temperature=temperature, top_p=top_p, top_k=None, min_p=None, repetition_penalty=1.0
                )
                if temperature > 0
                else dict(do_sample=False, repetition_penalty=1.0)
            )
            with torch.no_grad(), self._using(name):
                out = self.model.generate(
                    **batch, max_new_tokens=max_tokens, pad_token_id=self.tokenizer.pad_token_id, **sample
                )
            new = out[:, batch["input_ids"].shape[1] :]
            answers += [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return answers

    def label_probs(self, name: str, messages: list[dict], labels) -> dict[str, float] | None:
        """P(first token of each label) after the generation prompt, normalised over the labels."""
        import torch

        ids = []
        for label in labels:
            tokens = self.tokenizer.encode(label, add_special_tokens=False)
            if len(tokens) != 1 or tokens[0] == self.tokenizer.unk_token_id:
                raise ValueError(
                    f"forced-choice label {label!r}: expected one known token of the base model's "
                    f"tokenizer; found {len(tokens)} token(s) {tokens}"
                )
            ids.append(tokens[0])
        batch = self._encode([messages])
        with torch.no_grad(), self._using(name):
            logits = self.model(**batch).logits[0, -1].float()
        probs = torch.softmax(logits, dim=-1)
        return _normalised({label: probs[i].item() for label, i in zip(labels, ids)}, labels)


class OpenAIGenerator:
    """Generation through an OpenAI-compatible server (see the module docstring)."""

    def __init__(
        self,
        url: str,
        base: str,
        *,
        api_key: str | None = None,
        concurrency: int = 8,
        retries: int = 5,
        retry_wait: float = 1.0,
    ):
        from .http import ChatClient

        self.client = ChatClient(url, api_key=api_key, retries=retries, retry_wait=retry_wait, flag="--gen-url")
        self.base, self.concurrency = base, concurrency

    def _model(self, name: str) -> str:
        return self.base if name == BASE else name

    def generate(self, name, conversations, *, max_tokens, temperature, top_p=1.0, seed=0) -> list[str]:
        def one(item):
            index, messages = item
            body = {
                "model": self._model(name),
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "seed": seed + index,
            }
            response = self.client.post(body)
            try:
                return (response["choices"][0]["message"]["content"] or "").strip()
            except (KeyError, IndexError, TypeError) as exc:
                raise ValueError(
                    f"--gen-url {self.client.url}: expected choices[0].message.content in the "
                    f"response; found {str(response)[:80]}"
                ) from exc

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, enumerate(conversations)))

    def label_probs(self, name, messages, labels):
        from .http import top_logprobs

        body = {
            "model": self._model(name),
            "messages": messages,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 20,
        }
        probs = top_logprobs(self.client.post(body), f"--gen-url {self.client.url}")
        stripped: dict[str, float] = {}
        for token, p in probs.items():
            stripped[token.strip()] = stripped.get(token.strip(), 0.0) + p
        return _normalised(stripped, labels)


def require_vllm() -> None:
    """Fail in one line, before any model is loaded, when `--backend vllm` cannot work here."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ImportError(
            "--backend vllm: vllm is not installed in this environment; expected an importable "
            "vllm (install it in a separate environment, see docs/EVAL.md), or use --backend hf "
            "or --gen-url"
        )


class VLLMGenerator:
    """vLLM in-process (GPU; optional: install vllm in its own environment, see docs/EVAL.md)."""

    RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts

    def __init__(self, base: str, adapters: dict[str, str]):
        require_vllm()
        import torch
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        from ..lora import read_adapter_config

        if not torch.cuda.is_available():
            raise ValueError("--backend vllm: expected a CUDA GPU; found none (use --backend hf on CPU)")
        rank = max([read_adapter_config(Path(d)).get("r", 8) for d in adapters.values()] or [8])
        lora = (
            dict(
                enable_lora=True,
                max_loras=len(adapters),
                max_lora_rank=next((r for r in self.RANKS if r >= rank), rank),
            )
            if adapters
            else {}
        )
        self.llm = LLM(model=base, seed=0, **lora)
        self.requests = {
            name: LoRARequest(name, i + 1, str(Path(d).resolve())) for i, (name, d) in enumerate(adapters.items())
        }

    def generate(self, name, conversations, *, max_tokens, temperature, top_p=1.0, seed=0) -> list[str]:
        from vllm import SamplingParams

        params = [
            SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed + i)
            for i in range(len(conversations))
        ]
        outputs = self.llm.chat(conversations, params, lora_request=self.requests.get(name), use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]

    def label_probs(self, name, messages, labels):
        from vllm import SamplingParams

        out = self.llm.chat(
            [messages],
            SamplingParams(temperature=0, max_tokens=1, logprobs=20),
            lora_request=self.requests.get(name),
            use_tqdm=False,
        )[0].outputs[0]
        probs: dict[str, float] = {}
        for entry in out.logprobs[0].values():
            token = (entry.decoded_token or "").strip()
            probs[token] = probs.get(token, 0.0) + math.exp(entry.logprob)
        return _normalised(probs, labels)


def check_adapters(
    generator: Generator, names: list[str], conversations: list[list[dict]], *, max_tokens: int = 16
) -> None:
    """Refuse (one line) an adapter whose greedy answers to `conversations` are identical to the base's."""
    reference = generator.generate(BASE, conversations, max_tokens=max_tokens, temperature=0.0)
    for name in names:
        if generator.generate(name, conversations, max_tokens=max_tokens, temperature=0.0) == reference:
            raise ValueError(
                f"--adapter {name}: greedy answers to {len(conversations)} prompt(s) are identical with "
                f"and without it; expected an adapter that changes the model (all-zero lora_B? an "
                f"untrained or mis-saved adapter?)"
            )
