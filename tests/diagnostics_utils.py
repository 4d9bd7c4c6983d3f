"""Plain helpers the diagnostics tests (probe, plots, logit lens, drift) share: sizes, a tiny llama,
single-direction sets and an adapter with a planted drift along a direction. Their fixtures (`tokenizer`,
`prompts`, `u`, `identified`) are in conftest.py."""

import torch
from peft import LoraConfig, get_peft_model

from grasp_trl.directions import DirectionSet
from grasp_trl.modules import decoder_blocks
from grasp_trl.probe import batches, tokenize
from grasp_trl.tiny import build_model

D, L = 32, 3


def base_model(tokenizer):
    return build_model("llama", vocab_size=len(tokenizer), hidden_size=D, num_layers=L, seed=0)


def along(vector, layers=range(L), num_layers=L):
    return DirectionSet({l: vector[:, None].clone() for l in layers}, num_layers)


def planted_adapter(tokenizer, prompts, u, layer=1, scale=3.0):
    """A LoRA on block `layer`'s o_proj with dW = scale * u v^T, v the mean o_proj input on the prompts (so
    v^T x > 0 on average and the block's output moves along +u)."""
    model = get_peft_model(
        base_model(tokenizer),
        LoraConfig(r=2, lora_alpha=2, target_modules=["o_proj"], layers_to_transform=[layer], lora_dropout=0.0),
    )
    o_proj = decoder_blocks(model)[layer].self_attn.o_proj
    inputs = []
    handle = o_proj.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    ids, mask = next(batches(tokenize(tokenizer, prompts), len(prompts)))
    with torch.no_grad(), model.disable_adapter():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    v = torch.nn.functional.normalize(inputs[0][mask.bool()].mean(0), dim=0)
    with torch.no_grad():
        o_proj.lora_A["default"].weight.zero_()[0] = v
        o_proj.lora_B["default"].weight.zero_()[:, 0] = scale * u
    return model
