"""LoRA for hf-moe models with PEFT: adapters on attention and on the fused experts (`target_parameters`), routers,
HyperMoE's hypernetworks and the task head fully trainable (docs/backbones.md §4)."""

from peft import LoraConfig, get_peft_model

from ..modeling import MoePreTrainedModel, get_adapter

TASK_HEADS = ["classifier", "score", "qa_outputs"]


def moe_lora_config(model: MoePreTrainedModel, r: int = 8, lora_alpha: int = 16, task_type: str | None = None,
                    experts: bool = True, **kwargs) -> LoraConfig:
    """A LoraConfig for `model`: rank-r adapters on attention and (if `experts`) on every fused expert weight; the
    family's own modules (registry: `peft_modules_to_save`) and the task head trained in full."""
    config = model.config
    gated = any(name.endswith("experts.gate_up_proj") for name, _ in model.named_parameters())
    expert_params = ["experts.gate_up_proj", "experts.down_proj"] if gated else ["experts.up_proj", "experts.down_proj"]
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        task_type=task_type,
        target_modules=list(get_adapter(config.text_config.model_type).attention_modules),
        target_parameters=expert_params if experts else None,
        modules_to_save=[*model.family.peft_modules_to_save, *TASK_HEADS],
        **kwargs,
    )


def apply_lora(model: MoePreTrainedModel, **lora_kwargs):
    """`get_peft_model` with `moe_lora_config` (HyperRouter's hypernetwork is held in buffers: never trainable)."""
    return get_peft_model(model, moe_lora_config(model, **lora_kwargs))
