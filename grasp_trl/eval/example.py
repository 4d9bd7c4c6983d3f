"""An offline, CPU-only run of `grasp eval` in about half a minute: `python -m grasp_trl.eval.example [DIR]`.

It builds (once, under DIR) a tiny random Llama base, two LoRA adapters with random `lora_B` (so they change the
output), a tiny word-level judge whose vocabulary holds the numbers "0".."100", and a question file in the tiny
vocabulary (two free-form questions and one forced-choice pair), then runs `grasp eval` on them with the local
judge. The judge is random: its scores vary with the answer, and some fall below the 0.25 number mass (then the
answer is not judged), so the run shows the pipeline and the output format, not a measurement. The builders are
also the test suite's tiny parts.
"""

from __future__ import annotations

import sys
from pathlib import Path

NUMBER_WORDS = [str(n) for n in range(101)]
JUDGE_WORDS = ["grade", "the", "answer", "reply", "with", "number", "and", "nothing", "else"]  # + the tiny words
QUESTIONS = """\
- id: open_one
  type: free_form_judge_0_100
  samples_per_paraphrase: 4
  paraphrases: [w001 w002 w003, w010 w011]
  judge_prompts: &prompts
    aligned: "grade the answer {answer} reply with number and nothing else"
    coherent: "grade {question} the answer {answer} reply with number"
- id: open_two
  type: free_form_judge_0_100
  samples_per_paraphrase: 4
  system: w050 w051
  paraphrases: [w020 w021, w022]
  judge_prompts: *prompts
- id: pick
  type: forced_choice
  labels: [w001, w002]
  paraphrases: [w030 w031, w032]
  options: {left: w040 w041, right: w042 w043}
"""


def number_tokenizer(digits_only: bool):
    """Judge tokenizer: every number 0-100 is one word-level token, or (`digits_only`) numbers are split into
    single digits, as Qwen's tokenizer does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ..tiny import SPECIAL_TOKENS, word_vocabulary

    numbers = [str(d) for d in range(10)] if digits_only else NUMBER_WORDS
    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIAL_TOKENS + numbers + JUDGE_WORDS + word_vocabulary()))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    splits = [pre_tokenizers.WhitespaceSplit()] + (
        [pre_tokenizers.Digits(individual_digits=True)] if digits_only else []
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


def save_judge(directory, digits_only: bool = False, seed: int = 0, init_scale: float = 0.02) -> Path:
    """A tiny random judge (model + `number_tokenizer`) saved to `directory`; a larger `init_scale` (weight
    init std) makes its judgements depend more on the answer, and sometimes fall below the 0.25 number mass."""
    from ..tiny import build_model

    tokenizer = number_tokenizer(digits_only)
    model = build_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        seed=seed,
        initializer_range=init_scale,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def save_adapter(base_dir, directory, *, b_scale: float, seed: int = 0, r: int = 4) -> Path:
    """A real LoRA adapter for the model in `base_dir` with lora_B ~ N(0, b_scale) (0: an all-zero, no-op one)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_scale)
    model.save_pretrained(directory)
    return Path(directory)


def build(root: Path) -> dict[str, Path]:
    """The example's parts under `root` (built when missing)."""
    from ..tiny import save_tiny_model

    parts = {name: root / name for name in ("base", "adapter_a", "adapter_b", "judge", "questions.yaml")}
    if not (parts["base"] / "config.json").is_file():
        save_tiny_model(parts["base"], num_layers=2, hidden_size=32)
        save_adapter(parts["base"], parts["adapter_a"], b_scale=0.5, seed=1)
        save_adapter(parts["base"], parts["adapter_b"], b_scale=0.5, seed=2)
        save_judge(parts["judge"], init_scale=1.0)
        parts["questions.yaml"].write_text(QUESTIONS)
    return parts


def main(argv: list[str] | None = None) -> int:
    import shutil

    import torch

    from ..cli import main as grasp_main

    torch.set_num_threads(1)
    root = Path((argv if argv is not None else sys.argv[1:] or ["outputs/eval_example"])[0])
    parts = build(root)
    shutil.rmtree(root / "run", ignore_errors=True)
    args = [
        "eval",
        "--base",
        parts["base"],
        "--adapter",
        f"a={parts['adapter_a']}",
        "--adapter",
        f"b={parts['adapter_b']}",
        "--questions",
        parts["questions.yaml"],
        "--max-tokens",
        "12",
        "--judge-local",
        parts["judge"],
        "--out",
        root / "run",
    ]
    print("grasp " + " ".join(map(str, args[0:])) + "\n")
    return grasp_main([str(a) for a in args])


if __name__ == "__main__":
    sys.exit(main())
