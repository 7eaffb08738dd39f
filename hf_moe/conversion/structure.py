"""What every conversion needs to know about the models it maps: the family config over a source's backbone config,
the hf-moe head of a checkpoint, where a module sits, how the parameters a conversion adds start, and why a
converted model does not compute its source's function."""

import copy
import zlib

import torch

from ..modeling import HEADS, get_family


def build_moe_config(dense_config, family: str, num_experts: int, num_experts_per_tok: int, moe_layers, **options):
    """The family config over `dense_config`. Where the family leaves renormalisation to k (`norm_topk_prob=None`),
    it is turned on so that upcycling preserves the function; a family with its own default (top-p's raw
    probabilities, as in its paper) keeps it."""
    config_class = get_family(family).config_class
    if config_class.norm_topk_prob is None:
        options.setdefault("norm_topk_prob", True)
    text_config = copy.deepcopy(dense_config)
    if hasattr(text_config, "quantization_config"):
        del text_config.quantization_config  # the MoE is built unquantised (GGUF sources arrive dequantised)
    return config_class(
        text_config=text_config,
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        moe_layers=moe_layers,
        dtype=dense_config.dtype,
        # task fields live on the wrapper config (it hands them to the backbone): keep the dense head's labels
        id2label=dense_config.id2label,
        label2id=dense_config.label2id,
        problem_type=dense_config.problem_type,
        **options,
    )


def head_of(config, architecture: str | None = None) -> str | None:
    """The hf-moe head whose transformers class for `config` is `architecture` (default: the checkpoint's first), e.g.
    `BertModel` -> "Model"; None if no head is."""
    architecture = architecture or (config.architectures or [None])[0]
    for head, auto_class in HEADS.items():
        model_class = auto_class._model_mapping.get(type(config), None)
        if model_class is not None and model_class.__name__ == architecture:
            return head
    return None


def module_path(root, module) -> str:
    """The name of `module` in `root.named_modules()`."""
    for path, candidate in root.named_modules():
        if candidate is module:
            return path
    raise KeyError(module)


def init_seed(seed: int, model, path: str) -> int:
    """The seed of the new module at `path` in `model`: each module draws the same numbers whatever else the model holds
    and in whichever order modules are initialised, so streaming and in-memory conversions agree. The path is spelled
    as hf-moe 0.1 laid its models out (`MoePreTrainedModel.path_in_0_1`), so a conversion draws the numbers it drew
    there."""
    return seed + zlib.crc32(model.path_in_0_1(path).encode())


@torch.no_grad()
def initialise_new_modules(model, seed: int, finish):
    """Re-initialise every hf-moe module of a model built in memory as the streaming conversion does (own seed, own
    `reset_parameters`, then `finish(module)`); the conversion then overwrites what it takes from its source."""
    init_types = model.init_module_types
    for path, module in model.named_modules():
        if isinstance(module, init_types):
            torch.manual_seed(init_seed(seed, model, path))
            module.reset_parameters()
            finish(module)


def why_not_exact(config, zeroed: bool, changes=()) -> str | None:
    """Why a converted model of `config` will not compute its source's function at step 0 (float32, eval mode), or
    None: the family's reason (docs/upcycling.md §3), the routing's, then the conversion's own `changes` (`zeroed`:
    the family's `zero_added_output` was applied)."""
    reasons = [reason for reason in [get_family(config.model_type).upcycling_departure(config, zeroed)] if reason]
    if not config.normalize_topk(config.num_experts_per_tok):
        reasons.append(
            f"{config.routing_summary()} routing with raw probabilities scales each FFN output by its kept mass "
            "(norm_topk_prob=True fixes it)"
        )
    if config.expert_capacity_factor is not None:
        reasons.append("the capacity rule (expert_capacity_factor) drops tokens")
    return "; ".join([*reasons, *changes]) or None
