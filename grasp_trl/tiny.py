"""Tiny random models and word-level tokenizers built locally, for the demo, tests and benchmarks.

Nothing here touches a model hub: the model comes from a config, the tokenizer from the `tokenizers`
package, and both are saved to a directory that `from_pretrained` (and `axolotl train`) can load offline.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
# Every linear layer of a Llama-style decoder block: the LoRA targets of the demo, tests and benchmarks.
SEVEN_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def word_vocabulary(size: int = 96) -> list[str]:
    """A deterministic list of `size` plain lowercase words (`w000`, `w001`, ...) plus the special tokens."""
    return SPECIAL_TOKENS + [f"w{i:03d}" for i in range(size)]


def build_tokenizer(words: list[str] | None = None):
    """A whitespace word-level `PreTrainedTokenizerFast` with pad/unk/bos/eos and a minimal chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = words or word_vocabulary()
    vocab = {word: index for index, word in enumerate(dict.fromkeys(SPECIAL_TOKENS + list(words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
        "{% if add_generation_prompt %} {% endif %}"
    )
    return tokenizer


def build_model(
    architecture: str = "llama",
    *,
    vocab_size: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    intermediate_size: int | None = None,
    num_heads: int = 4,
    seed: int = 0,
    **overrides,
):
    """A randomly initialised causal LM of the given architecture (llama, qwen2, qwen3, mistral, gemma,
    gemma2, phi3, gpt2, gpt_neox), deterministic for a seed."""
    import torch
    import transformers as tf

    intermediate_size = intermediate_size or 2 * hidden_size
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    kv = dict(num_key_value_heads=max(1, num_heads // 2))
    configs = {
        "llama": lambda: tf.LlamaConfig(**common, **kv, tie_word_embeddings=False),
        "qwen2": lambda: tf.Qwen2Config(**common, **kv, tie_word_embeddings=False),
        "qwen3": lambda: tf.Qwen3Config(**common, **kv, head_dim=hidden_size // num_heads),
        "mistral": lambda: tf.MistralConfig(**common, **kv, sliding_window=None),
        "gemma": lambda: tf.GemmaConfig(**common, **kv, head_dim=hidden_size // num_heads),
        "gemma2": lambda: tf.Gemma2Config(**common, **kv, head_dim=hidden_size // num_heads),
        "phi3": lambda: tf.Phi3Config(**common, **kv),
        "gpt2": lambda: tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=256,
            bos_token_id=2,
            eos_token_id=3,
        ),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**common),
    }
    if architecture not in configs:
        raise ValueError(f"architecture: expected one of {sorted(configs)}, found {architecture!r}")
    config = configs[architecture]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(config)


def save_tiny_model(directory: str | Path, architecture: str = "llama", *, seed: int = 0, **kwargs) -> Path:
    """Build a tiny model + tokenizer and save both to `directory` (loadable offline). Returns the path."""
    directory = Path(directory)
    tokenizer = build_tokenizer()
    model = build_model(architecture, vocab_size=len(tokenizer), seed=seed, **kwargs)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
