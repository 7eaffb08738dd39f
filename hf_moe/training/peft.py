"""LoRA for hf-moe models with PEFT: adapters on attention and on the fused experts (`target_parameters`), routers,
HyperMoE's hypernetworks and the task head fully trainable (docs/backbones.md §4)."""

from peft import LoraConfig, get_peft_model

from ..modeling import MoePreTrainedModel

# attention projections per backbone (what `target_modules` matches)
ATTENTION_MODULES = {
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "t5": ["q", "k", "v", "o"],
}
# hf-moe modules trained in full next to the adapters (small, and new at upcycling time)
MOE_MODULES_TO_SAVE = [
    "router", "expert_embedding", "embedding_process", "hyper_generators.encoder", "hyper_generators.decoder",
    "head_proj", "merge_proj",
]
TASK_HEADS = ["classifier", "score", "qa_outputs"]


def moe_lora_config(model: MoePreTrainedModel, r: int = 8, lora_alpha: int = 16, task_type: str | None = None,
                    experts: bool = True, **kwargs) -> LoraConfig:
    """A LoraConfig for `model`: rank-r adapters on attention and (if `experts`) on every fused expert weight."""
    config = model.config
    gated = any(name.endswith("experts.gate_up_proj") for name, _ in model.named_parameters())
    expert_params = ["experts.gate_up_proj", "experts.down_proj"] if gated else ["experts.up_proj", "experts.down_proj"]
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        task_type=task_type,
        target_modules=ATTENTION_MODULES[config.text_config.model_type],
        target_parameters=expert_params if experts else None,
        modules_to_save=MOE_MODULES_TO_SAVE + TASK_HEADS,
        **kwargs,
    )


def apply_lora(model: MoePreTrainedModel, **lora_kwargs):
    """`get_peft_model` with `moe_lora_config` (HyperRouter's hypernetwork is held in buffers: never trainable)."""
    return get_peft_model(model, moe_lora_config(model, **lora_kwargs))
