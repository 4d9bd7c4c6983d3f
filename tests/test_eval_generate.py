"""Generation with the tiny model and real PEFT adapters: left-padded batches equal one-by-one decoding, seeded
sampling is reproducible, adapters switch by name, and the no-op adapter check fires."""

import pytest

from grasp_trl.eval.generate import BASE, HFGenerator, check_adapters, parse_adapters

PROMPTS = [
    [{"role": "user", "content": "w001 w002 w003 w004 w005"}],
    [{"role": "user", "content": "w010"}],
    [{"role": "system", "content": "w060"}, {"role": "user", "content": "w020 w021"}],
]


@pytest.fixture(scope="module")
def generator(eval_models):
    return HFGenerator(
        str(eval_models["base"]), {"a": str(eval_models["a"]), "zero": str(eval_models["zero"])}, batch_size=3
    )


def test_left_padded_batches_equal_single_prompts(generator):
    batched = generator.generate("a", PROMPTS, max_tokens=6, temperature=0.0)
    single = [generator.generate("a", [p], max_tokens=6, temperature=0.0)[0] for p in PROMPTS]
    assert batched == single and generator.tokenizer.padding_side == "left"


def test_seeded_sampling_is_reproducible_and_adapters_switch(generator):
    first = generator.generate(BASE, PROMPTS * 2, max_tokens=6, temperature=1.0, seed=5)
    assert generator.generate(BASE, PROMPTS * 2, max_tokens=6, temperature=1.0, seed=5) == first
    assert generator.generate(BASE, PROMPTS * 2, max_tokens=6, temperature=1.0, seed=6) != first
    greedy = {name: generator.generate(name, PROMPTS, max_tokens=6, temperature=0.0) for name in (BASE, "a", "zero")}
    assert greedy["a"] != greedy[BASE] and greedy["zero"] == greedy[BASE]
    assert generator.generate(BASE, PROMPTS, max_tokens=6, temperature=0.0) == greedy[BASE]  # base after adapters


def test_noop_adapter_is_refused(generator):
    check_adapters(generator, ["a"], PROMPTS)
    with pytest.raises(ValueError, match=r"^--adapter zero: greedy answers to 3 prompt\(s\) are identical"):
        check_adapters(generator, ["a", "zero"], PROMPTS)


def test_forced_choice_label_probabilities(generator):
    probs = generator.label_probs("a", PROMPTS[0], ("w001", "w002"))
    assert set(probs) == {"w001", "w002"} and sum(probs.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"^forced-choice label 'A': expected one known token"):
        generator.label_probs("a", PROMPTS[0], ("A", "B"))


def test_adapter_flags():
    assert parse_adapters(["x=/d", "y=/e"], need_dirs=True) == {"x": "/d", "y": "/e"}
    assert parse_adapters(["served"], need_dirs=False) == {"served": None}
    with pytest.raises(ValueError, match=r"^--adapter base=/d: name 'base' is reserved"):
        parse_adapters(["base=/d"], need_dirs=True)
    with pytest.raises(ValueError, match=r"^--adapter x=/e: name 'x' is repeated"):
        parse_adapters(["x=/d", "x=/e"], need_dirs=True)


def test_checkpoint_sampling_defaults_do_not_change_the_protocol(generator):
    """Qwen's generation_config ships top_k / repetition_penalty; answers must be sampled at T, top_p only."""
    import copy

    config = generator.model.generation_config
    clean = generator.generate(BASE, PROMPTS, max_tokens=6, temperature=1.0, seed=9)
    generator.model.generation_config = copy.deepcopy(config)
    generator.model.generation_config.top_k, generator.model.generation_config.repetition_penalty = 1, 3.0
    try:
        assert generator.generate(BASE, PROMPTS, max_tokens=6, temperature=1.0, seed=9) == clean
    finally:
        generator.model.generation_config = config
