"""Runs several GRASP training configurations in one process and records what the tests compare.

Launched by tests/test_deepspeed.py, tests/test_qlora.py and tests/test_qlora_deepspeed.py, because starting
torch.distributed + DeepSpeed costs far more than the tiny runs themselves:

    torchrun --nproc_per_node 2 tests/distributed/grasp_worker.py RUNS.json   # DeepSpeed ZeRO, 2 CPU ranks
    GRASP_WORKER_ENGINE=fsdp2 torchrun --nproc_per_node 2 ... RUNS.json      # FSDP2 through accelerate
    python tests/distributed/grasp_worker.py RUNS.json                        # single-process references

RUNS.json: {"base_dir": ..., "directions": ..., "runs": [{...}, ...]}; each run writes its final adapter (or
full model) to `<out_dir>/<name>/` and rank 0 writes `<out_dir>/<name>/result.json` (log history, the fp32
master leakage DeepSpeed holds at the end, timing). Run keys:

    name, out_dir, steps, per_device, grad_accum, lr, projection, trainer ("sft"/"dpo"), full (bool: full
    fine-tuning), qlora (bool), gradient_checkpointing (non-reentrant), bf16;
    deepspeed (recipe path; required under torchrun), zero_overrides (merged into
    zero_optimization), config_overrides (top-level keys; null deletes one), identify_steps (identify-then-
    project in one train() call, global scope, instead of the shared direction file), zero_init (load the model after a
    ZeRO-3 config, i.e. partitioned while loading), checkpoint (save a checkpoint, DeepSpeed's included, after
    the last step), bypass_master (the post-step projection writes the working copy only, never the fp32
    master: `WorkingCopyProjection`, to show that the master update matters); bypass_post_step (no post-step
    projection at all during train(), `GraspCallback` removed: the gradient hooks alone, to show that the checks
    can fail); rank_results (every rank also writes `result.rank<i>.json`, as FSDP2 runs do); fsdp_config (with
    GRASP_WORKER_ENGINE=fsdp2: the run's `fsdp_config`, version 2 by default).

FSDP2 on CPU: accelerate selects `DistributedType.FSDP` only for accelerator device types (accelerate/state.py:
the FSDP branch sits under `elif self.distributed_type in [MULTI_GPU, MULTI_MLU, ...]`, which MULTI_CPU is not
in), so a CPU run with `fsdp` set trains as plain MULTI_CPU. `force_fsdp_on_cpu` flips that one attribute after
accelerate built its state; everything after it (accelerate's `fsdp2_prepare_model`: `fully_shard` per
decoder layer and on the root, FULL_STATE_DICT saving, DTensor gradient clipping) is accelerate's own code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DISTRIBUTED = int(os.environ.get("WORLD_SIZE", "1")) > 1
FSDP2 = DISTRIBUTED and os.environ.get("GRASP_WORKER_ENGINE") == "fsdp2"
if DISTRIBUTED and not FSDP2:  # DESIGN §6: DeepSpeed through accelerate on CPU ranks (before the PartialState)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the datasets the other tests use
from trainer_fixtures import dpo_dataset, lora_config, sft_dataset  # noqa: E402  (rows of equal token length)


def deepspeed_config(run: dict) -> dict | None:
    """The recipe file, with the run's `zero_overrides` merged into `zero_optimization`."""
    if not run.get("deepspeed"):
        return None
    config = json.loads(Path(run["deepspeed"]).read_text())
    config["zero_optimization"].update(run.get("zero_overrides", {}))
    for key, value in run.get("config_overrides", {}).items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def build_model(base_dir: str, run: dict):
    """Base model (4-bit nf4 for QLoRA) wrapped in a deterministic LoRA adapter, or the full model."""
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(0)
    kwargs = {"dtype": torch.bfloat16 if run.get("qlora") else torch.float32}
    if run.get("qlora"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if run.get("full"):
        return model
    from peft import get_peft_model

    if run.get("qlora"):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=run.get("gradient_checkpointing", False)
        )
    set_seed(0)
    return get_peft_model(model, lora_config(r=4))


class WorkingCopyProjection(TrainerCallback):
    """The naive post-step projection this project replaces: every constrained parameter's working copy
    (`param.data`, gathered under ZeRO-3) is projected, DeepSpeed's fp32 master never. The bypass runs use it in
    place of `GraspCallback`'s post-step projection, to prove that the master update matters."""

    def __init__(self, projector):
        self.projector = projector

    def on_optimizer_step(self, args, state, control, **kwargs):
        import deepspeed

        from grasp_trl.projection import project_constraint

        constraints = self.projector.constraints
        partitioned = any(hasattr(c.param, "ds_id") for c in constraints)  # ZeRO-3
        with deepspeed.zero.GatheredParameters([c.param for c in constraints], modifier_rank=0, enabled=partitioned):
            for constraint in constraints:
                constraint.param.data.copy_(project_constraint(constraint, constraint.param.data.float()))


def force_fsdp_on_cpu() -> None:
    """Let accelerate apply FSDP on CPU ranks: where it built a MULTI_CPU state with an FSDP plugin, make it
    an FSDP state (see the module docstring for why accelerate does not by itself)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # what later states copy

    AcceleratorState.__init__ = init


def fsdp_args(run: dict) -> dict:
    if not FSDP2:
        return {}
    config = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], **run.get("fsdp_config", {})}
    return {"fsdp": "full_shard", "fsdp_config": config}


def save_gathered_adapter(trainer, target: Path) -> None:
    """The LoRA tensors of accelerate's full-state-dict gather (`get_state_dict`, collective), written by rank 0
    as a PEFT adapter directory: what `save_model` writes, independently of PEFT's saving (which on
    transformers 5.24 / peft 0.21 writes no tensor when accelerate's FSDP activation checkpointing wrapped the
    layers; plain TRL shows the same)."""
    import shutil

    from safetensors.torch import save_file

    state = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.args.should_save:
        adapter = {
            key.replace(".default.weight", ".weight").replace(
                "._checkpoint_wrapped_module", ""
            ): value.float().contiguous()
            for key, value in state.items()
            if ".lora_" in key and ".default." in key
        }  # the trained adapter (DPO also holds "ref")
        target.mkdir(parents=True, exist_ok=True)
        save_file(adapter, str(target / "adapter_model.safetensors"))
        shutil.copyfile(target.parent / "adapter_config.json", target / "adapter_config.json")


def train_one(spec: dict, run: dict) -> dict:
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from grasp_trl.compat import checkpointing_args
    from grasp_trl.trainer import GraspDPOConfig, GraspDPOTrainer, GraspSFTConfig, GraspSFTTrainer

    out = Path(run["out_dir"]) / run["name"]
    dpo = run.get("trainer") == "dpo"
    common = dict(
        output_dir=str(out),
        max_steps=run["steps"],
        per_device_train_batch_size=run["per_device"],
        gradient_accumulation_steps=run.get("grad_accum", 1),
        learning_rate=run.get("lr", 1e-2),
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="steps" if run.get("checkpoint") else "no",
        save_steps=run["steps"],
        report_to=[],
        seed=0,
        data_seed=0,
        bf16=run.get("bf16", False),
        dataloader_num_workers=0,
        **checkpointing_args(run.get("gradient_checkpointing", False), use_reentrant=False),
        deepspeed=deepspeed_config(run),
        grasp_projection=run["projection"],
        disable_tqdm=True,
        **fsdp_args(run),
        # identify-then-project in the same train() call, or the shared direction file
        **(
            {"grasp_identify_steps": run["identify_steps"], "grasp_scope": "global"}
            if run.get("identify_steps")
            else {"grasp_directions": spec["directions"]}
        ),
    )
    if DISTRIBUTED:
        common["accelerator_config"] = {"use_configured_state": True}
    if run.get("bf16") or not DISTRIBUTED or FSDP2:
        common["use_cpu"] = True  # transformers refuses bf16 without a GPU otherwise
    size = run["per_device"] * run.get("grad_accum", 1) * int(os.environ.get("WORLD_SIZE", "1"))
    # Built before the config, the model loads whole and DeepSpeed partitions it at start; with `zero_init`
    # it loads after a ZeRO-3 config, so `from_pretrained` partitions it while loading (zero.Init).
    model = None if run.get("zero_init") else build_model(spec["base_dir"], run)
    config_class, trainer_class, data = (
        (GraspDPOConfig, GraspDPOTrainer, dpo_dataset(size))
        if dpo
        else (GraspSFTConfig, GraspSFTTrainer, sft_dataset(size))
    )
    config = config_class(**common, max_length=32, **({"beta": 0.1} if dpo else {}))
    model = model if model is not None else build_model(spec["base_dir"], run)
    trainer = trainer_class(model=model, args=config, train_dataset=data, processing_class=spec["tokenizer"])
    quantized_before = quantized_state(trainer.model) if run.get("qlora") else None
    residual = (
        probe_residual_gradients(trainer)
        if trainer.grasp_projector is not None and trainer.grasp_projector.uses_activations
        else None
    )
    start = time.perf_counter()
    if run.get("bypass_master") or run.get("bypass_post_step"):
        trainer.remove_callback(trainer.grasp_callback)
    if run.get("bypass_master"):
        trainer.add_callback(WorkingCopyProjection(trainer.grasp_projector))
    trainer.train()
    seconds = time.perf_counter() - start
    master_leakage = trainer.grasp_projector.leakage()  # reads DeepSpeed's fp32 master where there is one
    trainer.save_model()
    if FSDP2:
        save_gathered_adapter(trainer, out / "gathered")
    result = {
        "name": run["name"],
        "seconds": seconds,
        "master_leakage": master_leakage,
        "log_history": trainer.state.log_history,
        "engine": type(trainer.model_wrapped).__name__,
        "distributed_type": str(trainer.accelerator.state.distributed_type),
        "param_types": sorted({type(p).__name__ for p in trainer.model.parameters()}),
        "zero_stage": getattr(trainer.accelerator.state.deepspeed_plugin, "zero_stage", None),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}),
    }
    if residual is not None:
        result["residual_leakage"], result["residual_gradients_seen"] = residual["max"], residual["count"]
    if quantized_before is not None:
        after = quantized_state(trainer.model)
        result["quantized_modules"] = len({key.split(".weight")[0] for key in after})
        result["quantized_unchanged"] = after.keys() == quantized_before.keys() and all(
            torch.equal(quantized_before[k], after[k]) for k in after
        )
        result["quantized_local_fraction"] = quantized_local_fraction(trainer.model)
    if FSDP2:
        result["checkpoint_wrapped"] = any("_checkpoint_wrapped_module" in n for n, _ in trainer.model.named_modules())
        result["placements"] = sorted({str(tuple(c.param.placements)) for c in trainer.grasp_projector.constraints})
    if FSDP2 or run.get("rank_results"):  # every rank's own view (the residual probe is per rank)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"result.rank{trainer.args.process_index}.json").write_text(json.dumps(result, indent=1, default=str))
    if trainer.args.should_save:
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    trainer.accelerator.free_memory()
    unset_hf_deepspeed_config()  # the next run's model must load unpartitioned again
    if FSDP2:  # what accelerate itself decided for this CPU process group; the next run's state flips it again
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU
    AcceleratorState._reset_state()  # keeps the process group; lets the next run bring its own DeepSpeed config
    return result


def probe_residual_gradients(trainer) -> dict:
    """Record `max ||g U_l|| / ||g||` over the gradients that leave each hooked residual `h_l` during training
    (DESIGN §1's activations invariant), observed by hooks registered after the projector's, so they see
    what the projector passed on; with gradient checkpointing they follow the recomputed forward too."""
    from grasp_trl.modules import decoder_blocks

    stats = {"max": 0.0, "count": 0}
    bases = trainer.grasp_directions.bases

    def record(layer, grad):
        basis = bases[layer].to(grad.device)
        ratio = float((grad.float() @ basis).norm() / grad.float().norm().clamp_min(1e-30))
        stats["max"], stats["count"] = max(stats["max"], ratio), stats["count"] + 1

    def on_output(layer, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if torch.is_grad_enabled() and hidden.requires_grad:
            hidden.register_hook(lambda grad: record(layer, grad))

    blocks = decoder_blocks(trainer.model)
    for layer in bases:
        blocks[layer].register_forward_hook(lambda m, a, o, layer=layer: on_output(layer, m, a, o))
    return stats


def quantized_state(model) -> dict[str, torch.Tensor]:
    """Every bitsandbytes 4-bit layer's packed weight and quantisation constants, as its state dict stores them
    (bitsandbytes may repack weights for its CPU kernel; the state dict is the canonical format). Weights that
    ZeRO-3 partitioned are gathered whole first (a collective: every rank calls this at the same point)."""
    import bitsandbytes as bnb

    modules = [(name, module) for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    partitioned = [module.weight for _, module in modules if hasattr(module.weight, "ds_id")]
    state = {}
    with zero3_gathered(partitioned):
        for name, module in modules:
            for key, value in module.state_dict().items():
                if key.startswith("weight"):  # compared as raw bytes: packed nf4 viewed as bf16 holds NaN patterns
                    state[f"{name}.{key}"] = value.detach().contiguous().view(torch.uint8).clone()
    return state


@contextmanager
def zero3_gathered(params: list):
    """ZeRO-3 parameters gathered whole for reading (nothing to do for an empty list)."""
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def quantized_local_fraction(model) -> float:
    """The share of the 4-bit weights' elements this rank holds: 1.0 unless ZeRO-3 partitioned them (then
    about 1 / world size), showing that ZeRO-3 really shards the packed base (`bnb_4bit_quant_storage`)."""
    import bitsandbytes as bnb

    weights = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    local = sum(w.ds_tensor.numel() if hasattr(w, "ds_id") else w.numel() for w in weights)
    return local / sum(w.ds_numel if hasattr(w, "ds_id") else w.numel() for w in weights)


def main(path: str) -> None:
    spec = json.loads(Path(path).read_text())
    if DISTRIBUTED:
        from accelerate import PartialState

        if FSDP2:
            force_fsdp_on_cpu()
        PartialState(backend="gloo", cpu=FSDP2)
    from transformers import AutoTokenizer

    spec["tokenizer"] = AutoTokenizer.from_pretrained(spec["base_dir"])
    for run in spec["runs"]:
        train_one(spec, run)


if __name__ == "__main__":
    main(sys.argv[1])
