"""Configs of the five hf-moe families. Each nests the dense backbone's config as `text_config` and adds MoE fields.

Defaults (docs/topk.md §5 and each family's §5): top-k routing with k = 2, balance loss 0.01 per MoE layer,
dropless, no jitter. Values are checked at construction and errors name the field.
"""

import copy

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .backbones import get_adapter


@strict
class MoeConfig(PreTrainedConfig):
    r"""
    Fields shared by every family.

    Args:
        text_config (`dict` or `PreTrainedConfig`): the dense backbone (bert, roberta, gpt2, llama, mistral, qwen2,
            qwen3, t5); its FFN blocks named by `moe_layers` become MoE layers.
        num_experts (`int`, defaults to 8): experts per MoE layer.
        num_experts_per_tok (`int`, defaults to 2): k of top-k routing; read at every forward, so it can change at
            inference time.
        moe_layers (`list[int]`, *optional*): indices of the backbone layers (per stack) that become MoE.
        moe_layer_frequency (`int`, defaults to 1): used when `moe_layers` is None: layer i becomes MoE iff
            `i % moe_layer_frequency == moe_layer_frequency - 1` (1: every layer; 2: every second layer starting at
            layer 1, as in Switch Transformers).
        moe_intermediate_size (`int`, *optional*): inner width of each expert (default: the dense FFN's).
        norm_topk_prob (`bool`, *optional*): renormalise the k selected probabilities to sum to 1. `None` means on
            for k >= 2 and off for k = 1 (Switch: weight = p_max), docs/topk.md §2.
        router_aux_loss_coef (`float`, defaults to 0.01): weight of the load-balancing loss, summed over MoE layers.
        router_z_loss_coef (`float`, defaults to 0.0): weight of the ST-MoE router z-loss.
        router_jitter_noise (`float`, defaults to 0.0): multiplicative U(1-eps, 1+eps) noise on the router input,
            in training only.
        router_jitter_scope (`str`, defaults to `"router"`): what the jitter multiplies (docs/topk.md §6, item 4):
            `"router"` a copy of the router input, in training; `"input"` the layer input, in training, so the experts
            see the noise too (Mixtral, Switch); `"input_always"` the layer input in training and at eval (HyperMoE's
            vendored Switch).
        router_dtype (`str`, defaults to `"float32"`): the dtype of the router's logits (docs/topk.md §6, item 3):
            float32 or wider; `"model"` the model dtype, as the official codes: top-k then takes the softmax in
            float32 (Mixtral), top-p sorts and sums the model-dtype probabilities (Dynamic MoE), HyperRouter generates
            its router in the model dtype. Losses and statistics stay in float32.
        router_loss_pooling (`str`, defaults to `"per_layer"`): how the balance loss and z-loss pool the MoE layers
            (docs/topk.md §6, items 1-2): `"per_layer"` each layer's losses over its non-padding tokens, summed;
            `"mixtral"` transformers' `load_balancing_loss_func`, expert fractions and mean probabilities pooled over
            the non-padding tokens of all layers (z-loss per layer); `"switch"` Switch Transformers' losses per stack,
            summed over stacks: the stack's layers concatenated along the sequence axis, padding included, balance
            statistics per sequence after capacity drops (a dropped slot counts as expert 0) averaged over sequences,
            z-loss the mean over all tokens.
        expert_capacity_factor (`float`, *optional*): capacity of `expert_capacity_rule="hf_moe"`; `None` is dropless.
        expert_capacity_rule (`str`, defaults to `"hf_moe"`): which slots an expert drops; first choices claim capacity
            before second choices, then in token order. `"hf_moe"`: at most ceil(expert_capacity_factor * S / E) of
            the S routed slots of the batch's non-padding tokens (docs/topk.md §7); `"switch"`: at most
            `expert_capacity` tokens of each sequence, padding included (Switch, docs/topk.md §6, item 5);
            `"gshard"`: at most k * ceil(S' / E) of the S' routed rows of the batch (MH-MoE's official gate,
            docs/mh_moe.md §6, item 3).
        expert_capacity (`int`, *optional*): the per-sequence count of `expert_capacity_rule="switch"` (64 in
            HyperMoE's Switch runs).
        dropped_token_output (`str`, defaults to `"zero"`): what a slot dropped for capacity adds to its token:
            `"zero"` nothing (transformers 5.x Switch); `"scaled_input"` its weight times the input, p_max * x at
            k = 1 (transformers 4.x Switch, HyperMoE's vendored copy; docs/hypermoe.md §6, item 3).
        output_router_logits (`bool`, defaults to `False`): return every MoE layer's router logits.
        initializer_range (`float`, defaults to 0.02): std of the router and expert initialisation.
    """

    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}
    # outputs `Trainer` leaves out of evaluation predictions (its default is ["cache"])
    keys_to_ignore_at_inference = ["cache", "router_stats"]

    text_config: dict | PreTrainedConfig | None = None
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_layers: list[int] | None = None
    moe_layer_frequency: int = 1
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool | None = None
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    router_jitter_noise: float = 0.0
    router_jitter_scope: str = "router"
    router_dtype: str = "float32"
    router_loss_pooling: str = "per_layer"
    expert_capacity_factor: float | None = None
    expert_capacity_rule: str = "hf_moe"
    expert_capacity: int | None = None
    dropped_token_output: str = "zero"
    output_router_logits: bool = False
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if isinstance(self.text_config, PreTrainedConfig):
            # never share a live dense config: the wrapper resets its attention/experts implementation in place
            self.text_config = copy.deepcopy(self.text_config)
        super().__post_init__(**kwargs)
        # generation reads the top-level flag: an encoder-decoder backbone (T5) makes the wrapper one too
        self.is_encoder_decoder = bool(getattr(self.text_config, "is_encoder_decoder", False))
        self.validate_moe_fields()

    def validate_moe_fields(self):
        get_adapter(self.text_config.model_type).ffn_spec(self.text_config)  # supported backbone, known activation
        _check(self.num_experts >= 1, "num_experts", self.num_experts, "must be >= 1")
        _check(
            1 <= self.num_experts_per_tok <= self.num_experts,
            "num_experts_per_tok",
            self.num_experts_per_tok,
            f"must be between 1 and num_experts ({self.num_experts})",
        )
        num_layers = getattr(self.text_config, "num_hidden_layers", None)
        if self.moe_layers is not None:
            _check(len(self.moe_layers) > 0, "moe_layers", self.moe_layers, "must name at least one layer (or be None)")
            _check(len(set(self.moe_layers)) == len(self.moe_layers), "moe_layers", self.moe_layers, "has duplicates")
            if num_layers is not None:
                _check(
                    all(0 <= i < num_layers for i in self.moe_layers),
                    "moe_layers",
                    self.moe_layers,
                    f"must hold layer indices in [0, {num_layers})",
                )
        _check(self.moe_layer_frequency >= 1, "moe_layer_frequency", self.moe_layer_frequency, "must be >= 1")
        self._check_every_stack_has_moe_layer()
        if self.moe_intermediate_size is not None:
            _check(self.moe_intermediate_size >= 1, "moe_intermediate_size", self.moe_intermediate_size, "must be >= 1")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        _check(0 <= self.router_jitter_noise < 1, "router_jitter_noise", self.router_jitter_noise, "must be in [0, 1)")
        if self.expert_capacity_factor is not None:
            _check(
                self.expert_capacity_factor > 0,
                "expert_capacity_factor",
                self.expert_capacity_factor,
                "must be > 0, or None for dropless routing",
            )
        choices = {  # official behaviours (docs/topk.md §6)
            "router_jitter_scope": ("router", "input", "input_always"),
            "router_dtype": ("float32", "model"),
            "router_loss_pooling": ("per_layer", "mixtral", "switch"),
            "expert_capacity_rule": ("hf_moe", "switch", "gshard"),
            "dropped_token_output": ("zero", "scaled_input"),
        }
        for name, allowed in choices.items():
            _check(getattr(self, name) in allowed, name, getattr(self, name), f"must be one of {allowed}")
        if self.expert_capacity_rule == "switch":
            _check(
                self.expert_capacity is not None and self.expert_capacity >= 1,
                "expert_capacity",
                self.expert_capacity,
                'must be >= 1 with expert_capacity_rule="switch" (tokens per expert and sequence)',
            )
        else:
            _check(
                self.expert_capacity is None,
                "expert_capacity",
                self.expert_capacity,
                'applies to expert_capacity_rule="switch" only; set that rule or leave it None',
            )
        _check(
            self.expert_capacity_factor is None or self.expert_capacity_rule == "hf_moe",
            "expert_capacity_factor",
            self.expert_capacity_factor,
            f'applies to expert_capacity_rule="hf_moe" only, not "{self.expert_capacity_rule}"; leave it None',
        )
        _check(self.initializer_range > 0, "initializer_range", self.initializer_range, "must be > 0")

    def _check_every_stack_has_moe_layer(self):
        """Refuse a placement that leaves a stack dense: one setting covers both stacks of T5, whose decoder may be
        shorter than its encoder."""
        num_layers = getattr(self.text_config, "num_hidden_layers", None)
        stacks = {"backbone": num_layers}
        if getattr(self.text_config, "is_encoder_decoder", False):
            stacks = {"encoder": num_layers, "decoder": getattr(self.text_config, "num_decoder_layers", num_layers)}
        for stack, size in stacks.items():
            has_moe = size is None or any(self.is_moe_layer(i) for i in range(size))
            if self.moe_layers is None:
                _check(
                    has_moe,
                    "moe_layer_frequency",
                    self.moe_layer_frequency,
                    f"makes no layer of the {stack} ({size} layers) MoE; use a value <= {size} (layer i is MoE iff "
                    "i % frequency == frequency - 1) or list the layers in moe_layers",
                )
            else:
                _check(
                    has_moe,
                    "moe_layers",
                    self.moe_layers,
                    f"names no layer of the {stack} ({size} layers); include an index below {size}",
                )

    def is_moe_layer(self, layer_idx: int) -> bool:
        if self.moe_layers is not None:
            return layer_idx in self.moe_layers
        return layer_idx % self.moe_layer_frequency == self.moe_layer_frequency - 1

    def normalize_topk(self, top_k: int) -> bool:
        """Whether the selected probabilities are renormalised at this k (docs/topk.md §2)."""
        return top_k >= 2 if self.norm_topk_prob is None else self.norm_topk_prob

    @property
    def fixed_experts_per_token(self) -> int | None:
        """Experts each token takes, or None where routing decides it per token."""
        return self.num_experts_per_tok

    def routing_summary(self) -> str:
        """The routing rule in a few characters, for model cards and conversion notes ("top-2")."""
        return f"top-{self.num_experts_per_tok}"


def _check(ok: bool, field: str, value, requirement: str):
    if not ok:
        raise ValueError(f"{field}={value!r} {requirement}.")


@strict
class TopKMoeConfig(MoeConfig):
    r"""Standard sparse top-k MoE (Shazeer et al. 2017; Switch/Mixtral routing): softmax over all experts, top-k."""

    model_type = "topk_moe"


@strict
class HyperMoeConfig(MoeConfig):
    r"""
    HyperMoE (Zhao et al., ACL 2024; official code Bumble666/Hyper_MoE): top-k routing plus a HyperExpert generated
    from the embeddings of the experts a token did not select. Dimensions are those of every official script.

    Args:
        hyper_embedding_dim (`int`, defaults to 128): expert embeddings and their per-layer MLP.
        hyper_layer_embedding_dim (`int`, defaults to 10): layer embedding of the shared generator.
        hyper_hidden_dim (`int`, defaults to 128): width of the generator trunk.
        hyper_adapter_rank (`int`, defaults to 64): bottleneck r of the generated adapter d -> r -> d.
        hyper_init (`str`, defaults to `"tiny"`): `"tiny"` is the official generator init (HyperMoE starts as the plain
            MoE); `"normal"` draws every Linear and Embedding weight of the HyperMoE modules from
            N(0, initializer_range) with zero biases, as GPT-2's generic init does in the official GPT-2 variant
            (docs/hypermoe.md §6, item 5).
        router_type (`str`, defaults to `"linear"`): `"linear"` is the router of docs/topk.md; `"noisy_top_k"` is the
            official GPT-2 variant's noisy top-k gate and its CV² balance loss (docs/hypermoe.md §6, item 7).
    """

    model_type = "hypermoe"

    hyper_embedding_dim: int = 128
    hyper_layer_embedding_dim: int = 10
    hyper_hidden_dim: int = 128
    hyper_adapter_rank: int = 64
    hyper_init: str = "tiny"
    router_type: str = "linear"

    def validate_moe_fields(self):
        super().validate_moe_fields()
        for name in ("hyper_embedding_dim", "hyper_layer_embedding_dim", "hyper_hidden_dim", "hyper_adapter_rank"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        _check(self.hyper_init in ("tiny", "normal"), "hyper_init", self.hyper_init, 'must be "tiny" or "normal"')
        _check(
            self.router_type in ("linear", "noisy_top_k"),
            "router_type",
            self.router_type,
            'must be "linear" or "noisy_top_k"',
        )
        _check(
            self.router_type == "linear" or self.router_loss_pooling == "per_layer",
            "router_type",
            self.router_type,
            'has its own per-layer balance loss (CV²): use it with router_loss_pooling="per_layer"',
        )


@strict
class HyperRouterConfig(MoeConfig):
    r"""
    HyperRouter (Do et al., EMNLP 2023; official code giangdip2410/HyperRouter): a frozen hypernetwork generates each
    layer's router from a trainable embedding. Gating is a softmax over the k selected logits, which equals
    renormalised top-k, so `norm_topk_prob` must stay on. No balance loss by default, as in the official code.

    Args:
        hyper_router_hidden_dim (`int`, defaults to 256): hypernetwork width H (every published run used 256).
        router_dense_uniform (`bool`, defaults to `False`): route every token to all E experts with weight 1/E, the
            official evaluation "with all experts" (`set_router_mode`); read at every forward, so it can be set on
            `model.config` before an evaluation (docs/hyperrouter.md §6, item 3).
    """

    model_type = "hyperrouter"

    norm_topk_prob: bool | None = True
    router_aux_loss_coef: float = 0.0
    hyper_router_hidden_dim: int = 256
    router_dense_uniform: bool = False

    def validate_moe_fields(self):
        super().validate_moe_fields()
        _check(
            self.norm_topk_prob is not False,
            "norm_topk_prob",
            self.norm_topk_prob,
            "cannot be False for HyperRouter, whose gate is a softmax over the k selected logits",
        )
        _check(
            self.hyper_router_hidden_dim >= 1, "hyper_router_hidden_dim", self.hyper_router_hidden_dim, "must be >= 1"
        )

    def normalize_topk(self, top_k: int) -> bool:
        return True  # softmax over the k selected logits, also for k = 1


@strict
class MultiHeadMoeConfig(MoeConfig):
    r"""
    Multi-Head MoE (Wu et al. 2024, arXiv 2404.15045; v2 Huang et al. arXiv 2411.16205): each token is projected,
    split into `moe_num_heads` sub-tokens of width d/h that are routed separately, merged and projected back. The
    residual stays outside the merge (official code yushuiwx/MH-MoE), so h = 1 is exactly the top-k baseline.

    Args:
        moe_num_heads (`int`, defaults to 4): h, the number of sub-tokens per token (v1 main runs).
        moe_residual_inside (`bool`, defaults to `False`): add each sub-token to its experts' output before the merge,
            as paper v1 Eq. 6 does; the block's own residual stays (docs/mh_moe.md §6, item 1).
        router_type (`str`, defaults to `"linear"`): `"linear"` is the softmax gate of the official code;
            `"xmoe"` is the X-MoE cosine router the paper describes (docs/mh_moe.md §6, item 2).
        router_xmoe_dim (`int`, defaults to 16): width of the X-MoE routing space and expert embeddings.
        router_temperature (`float`, defaults to 0.07): fixed temperature tau dividing the X-MoE cosine scores.
        router_aux_loss_top1 (`bool`, defaults to `False`): count only each sub-token's first choice in the balance
            loss, as the official `gshard_loss` does (docs/mh_moe.md §6, item 4).
        router_ignore_padding_tokens (`bool`, defaults to `True`): keep padding sub-tokens out of the router's losses,
            statistics and capacity count; `False` routes them like real ones, as the official gate does, which
            never reads the mask (docs/mh_moe.md §6, item 5).
        head_proj_bias_init (`str`, defaults to `"zeros"`): `"torch_default"` keeps PyTorch's nn.Linear bias init
            U(±1/sqrt(d)) for `head_proj.bias`, as the official code does (docs/mh_moe.md §6, item 6).
        router_init (`str`, defaults to `"normal"`): `"normal"` draws the linear router from N(0, initializer_range);
            `"torch_default"` uses PyTorch's nn.Linear init, as the official gate (docs/mh_moe.md §6, item 8).
    """

    model_type = "mh_moe"

    moe_num_heads: int = 4
    moe_residual_inside: bool = False
    router_type: str = "linear"
    router_xmoe_dim: int = 16
    router_temperature: float = 0.07
    router_aux_loss_top1: bool = False
    router_ignore_padding_tokens: bool = True
    head_proj_bias_init: str = "zeros"
    router_init: str = "normal"

    def validate_moe_fields(self):
        super().validate_moe_fields()
        _check(self.moe_num_heads >= 1, "moe_num_heads", self.moe_num_heads, "must be >= 1")
        _check(self.router_type in ("linear", "xmoe"), "router_type", self.router_type, 'must be "linear" or "xmoe"')
        _check(self.router_xmoe_dim >= 1, "router_xmoe_dim", self.router_xmoe_dim, "must be >= 1")
        _check(self.router_temperature > 0, "router_temperature", self.router_temperature, "must be > 0")
        _check(
            self.head_proj_bias_init in ("zeros", "torch_default"),
            "head_proj_bias_init",
            self.head_proj_bias_init,
            'must be "zeros" or "torch_default"',
        )
        _check(
            self.router_init in ("normal", "torch_default"),
            "router_init",
            self.router_init,
            'must be "normal" or "torch_default"',
        )
        _check(
            self.router_init == "normal" or self.router_type == "linear",
            "router_init",
            self.router_init,
            'applies to the linear router only; the "xmoe" router has its own init',
        )
        _check(
            not self.router_aux_loss_top1 or self.router_loss_pooling == "per_layer",
            "router_aux_loss_top1",
            self.router_aux_loss_top1,
            'is a per-layer balance loss: use it with router_loss_pooling="per_layer"',
        )
        hidden_size = getattr(self.text_config, "hidden_size", None)
        if hidden_size is not None:
            _check(
                hidden_size % self.moe_num_heads == 0,
                "moe_num_heads",
                self.moe_num_heads,
                f"must divide the backbone's hidden_size ({hidden_size})",
            )


@strict
class DynamicMoeConfig(MoeConfig):
    r"""
    Dynamic top-p routing (Huang et al., "Harder Tasks Need More Experts", ACL 2024; official code
    ZhenweiAn/Dynamic_MoE): each token takes the fewest experts whose probabilities sum past `router_top_p`.

    Args:
        router_top_p (`float`, defaults to 0.4): the threshold p (headline setting of the paper).
        router_max_experts (`int`, *optional*): cap on experts per token; `None` is the exact rule (up to E).
        router_entropy_loss_coef (`float`, defaults to 1e-4): weight of the router-entropy loss.
        norm_topk_prob (`bool`, defaults to `False`): raw probabilities as weights, as in the paper.
    """

    model_type = "dynamic_moe"

    norm_topk_prob: bool | None = False
    router_top_p: float = 0.4
    router_max_experts: int | None = None
    router_entropy_loss_coef: float = 1e-4

    @property
    def fixed_experts_per_token(self) -> None:
        return None

    def routing_summary(self) -> str:
        return f"top-p {self.router_top_p}"

    def validate_moe_fields(self):
        super().validate_moe_fields()
        _check(0 < self.router_top_p <= 1, "router_top_p", self.router_top_p, "must be in (0, 1]")
        if self.router_max_experts is not None:
            _check(
                1 <= self.router_max_experts <= self.num_experts,
                "router_max_experts",
                self.router_max_experts,
                f"must be between 1 and num_experts ({self.num_experts}), or None",
            )
        _check(
            self.router_entropy_loss_coef >= 0,
            "router_entropy_loss_coef",
            self.router_entropy_loss_coef,
            "must be >= 0",
        )
        _check(
            self.router_loss_pooling != "switch",
            "router_loss_pooling",
            self.router_loss_pooling,
            'cannot be "switch" for top-p: Switch would count its empty slots as dropped; use "per_layer" or "mixtral"',
        )


__all__ = [
    "MoeConfig",
    "TopKMoeConfig",
    "HyperMoeConfig",
    "HyperRouterConfig",
    "MultiHeadMoeConfig",
    "DynamicMoeConfig",
]
