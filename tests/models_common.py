"""Shared builders for the model tests (tests/test_models*.py): tiny backbone configs built in code, seeded inputs per
head, and the task losses written out with torch.nn.functional (independent of hf_moe and of transformers' loss code).

This module holds no tests; pytest collects it because of its name and finds nothing to run.
"""

import torch
import torch.nn.functional as F
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

import hf_moe
from hf_moe.modeling import all_families

VOCAB = 100
SEQ = 8
BATCH = 2
NUM_LABELS = 3
NUM_CHOICES = 2

FAMILIES = tuple(family.class_prefix for family in all_families().values())  # class-name prefixes
BACKBONES = ("bert", "roberta", "gpt2", "llama", "mistral", "qwen2", "qwen3", "t5")

_ENCODER_HEADS = (
    "Model",
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
    "ForCausalLM",
)
_DECODER_HEADS = ("Model", "ForCausalLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
_T5_HEADS = (
    "Model",
    "ForConditionalGeneration",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
)
HEADS_OF = {
    "bert": _ENCODER_HEADS,
    "roberta": _ENCODER_HEADS,
    "gpt2": _DECODER_HEADS,
    "llama": _DECODER_HEADS,
    "mistral": _DECODER_HEADS,
    "qwen2": _DECODER_HEADS,
    "qwen3": _DECODER_HEADS,
    "t5": _T5_HEADS,
}
# the transformers Auto class each head must load through
AUTO_CLASS = {
    "Model": AutoModel,
    "ForCausalLM": AutoModelForCausalLM,
    "ForMaskedLM": AutoModelForMaskedLM,
    "ForSequenceClassification": AutoModelForSequenceClassification,
    "ForTokenClassification": AutoModelForTokenClassification,
    "ForQuestionAnswering": AutoModelForQuestionAnswering,
    "ForMultipleChoice": AutoModelForMultipleChoice,
    "ForConditionalGeneration": AutoModelForSeq2SeqLM,
}
GENERATIVE_HEAD = {b: "ForCausalLM" for b in BACKBONES} | {"t5": "ForConditionalGeneration"}

# small family-specific sizes (the defaults are sized for real models)
FAMILY_KWARGS = {
    "TopKMoe": {},
    "HyperMoe": {
        "hyper_embedding_dim": 16,
        "hyper_layer_embedding_dim": 4,
        "hyper_hidden_dim": 16,
        "hyper_adapter_rank": 8,
    },
    "HyperRouter": {"hyper_router_hidden_dim": 16},
    "MultiHeadMoe": {"moe_num_heads": 2},
    "DynamicMoe": {},
}

# token ids used by the inputs stay in [FIRST_FREE_ID, VOCAB): 0 = pad, 1 = bos/eos (t5 eos), 2 = eos
FIRST_FREE_ID = 3


def text_config(backbone: str, **overrides) -> dict:
    """A tiny backbone config as a dict: hidden 32, 2 layers, 4 heads, vocab 100, intermediate 64."""
    if backbone in ("bert", "roberta"):
        config = dict(
            model_type=backbone,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            type_vocab_size=2,
            pad_token_id=0 if backbone == "bert" else 1,
        )
    elif backbone == "gpt2":
        config = dict(
            model_type="gpt2",
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_inner=64,
            vocab_size=VOCAB,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    elif backbone in ("llama", "mistral", "qwen2", "qwen3"):
        config = dict(
            model_type=backbone,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        if backbone == "qwen3":
            config["head_dim"] = 8
    elif backbone in ("t5", "t5_gated"):
        config = dict(
            model_type="t5",
            d_model=32,
            num_layers=2,
            num_heads=4,
            d_kv=8,
            d_ff=64,
            vocab_size=VOCAB,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            feed_forward_proj="gated-gelu" if backbone == "t5_gated" else "relu",
        )
    else:
        raise ValueError(backbone)
    config.update(overrides)
    return config


def dropout_free(backbone: str) -> dict:
    """Overrides that set every dropout probability of the backbone to 0."""
    if backbone in ("bert", "roberta"):
        return dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    if backbone == "gpt2":
        return dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
    if backbone.startswith("t5"):
        return dict(dropout_rate=0.0, classifier_dropout=0.0)
    return dict(attention_dropout=0.0)


def make_config(family: str, backbone: str, *, head: str = "Model", text_overrides=None, **moe_kwargs):
    config_class = hf_moe.MODEL_CLASSES[family, "Model"].config_class
    tc = text_config(backbone, **(text_overrides or {}))
    if head == "ForCausalLM" and backbone in ("bert", "roberta"):
        tc["is_decoder"] = True
    kwargs = dict(
        text_config=tc,
        num_experts=4,
        num_experts_per_tok=2,
        num_labels=2 if head == "ForQuestionAnswering" else NUM_LABELS,  # start and end logits
        router_aux_loss_coef=0.1,
        **FAMILY_KWARGS[family],
    )
    if family == "DynamicMoe":
        kwargs["router_entropy_loss_coef"] = 0.0  # the task-loss checks isolate the balance term
    kwargs.update(moe_kwargs)
    return config_class(**kwargs)


def make_model(family: str, backbone: str, head: str = "Model", *, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    config = make_config(family, backbone, head=head, **kwargs)
    return hf_moe.MODEL_CLASSES[family, head](config)


def random_ids(shape, seed=0, low=FIRST_FREE_ID, high=VOCAB):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=generator)


def make_inputs(backbone: str, head: str, *, with_labels: bool = True, seed: int = 0) -> dict:
    """Model inputs for one head, with labels (or positions) for the heads that take them."""
    t5 = backbone.startswith("t5")
    generator = torch.Generator().manual_seed(seed + 1)
    if head == "ForMultipleChoice":
        ids = random_ids((BATCH, NUM_CHOICES, SEQ), seed)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        ids = random_ids((BATCH, SEQ), seed)
        if t5:
            ids[:, -1] = 1  # T5ForSequenceClassification pools at the (single) eos token of every row
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if t5 and head == "Model":
        inputs["decoder_input_ids"] = random_ids((BATCH, SEQ - 2), seed + 7)
    if not with_labels:
        return inputs
    if head in ("ForCausalLM", "ForMaskedLM"):
        labels = random_ids((BATCH, SEQ), seed + 2)
        labels[0, :2] = -100  # ignored positions
        inputs["labels"] = labels
    elif head == "ForConditionalGeneration":
        labels = random_ids((BATCH, SEQ - 3), seed + 2)
        labels[1, -1] = -100
        inputs["labels"] = labels
    elif head in ("ForSequenceClassification", "ForMultipleChoice"):
        num = NUM_LABELS if head == "ForSequenceClassification" else NUM_CHOICES
        inputs["labels"] = torch.randint(0, num, (BATCH,), generator=generator)
    elif head == "ForTokenClassification":
        labels = torch.randint(0, NUM_LABELS, (BATCH, SEQ), generator=generator)
        labels[1, 0] = -100
        inputs["labels"] = labels
    elif head == "ForQuestionAnswering":
        inputs["start_positions"] = torch.randint(0, SEQ, (BATCH,), generator=generator)
        inputs["end_positions"] = torch.randint(0, SEQ, (BATCH,), generator=generator)
    return inputs


def task_loss(head: str, output, inputs: dict) -> torch.Tensor:
    """The task loss written out with torch.nn.functional from the returned logits."""
    if head == "ForCausalLM":
        logits = output.logits[:, :-1].float()
        labels = inputs["labels"][:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    if head in ("ForMaskedLM", "ForConditionalGeneration", "ForTokenClassification"):
        logits = output.logits.float()
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), inputs["labels"].reshape(-1), ignore_index=-100
        )
    if head in ("ForSequenceClassification", "ForMultipleChoice"):
        return F.cross_entropy(output.logits.float(), inputs["labels"])
    if head == "ForQuestionAnswering":
        start, end = output.start_logits.float(), output.end_logits.float()
        return (F.cross_entropy(start, inputs["start_positions"]) + F.cross_entropy(end, inputs["end_positions"])) / 2
    raise ValueError(head)


def main_tensor(head: str, output) -> torch.Tensor:
    """The head's principal output tensor."""
    if head == "Model":
        return output.last_hidden_state
    if head == "ForQuestionAnswering":
        return torch.stack([output.start_logits, output.end_logits])
    return output.logits


# ------------------------------------------------------------------------ dense -> expert copy (the reference)


def dense_ffn_as_expert(backbone: str, dense_layer) -> dict:
    """One dense layer's FFN in the fused experts layout, read from the transformers layer by hand."""
    if backbone in ("bert", "roberta"):
        return {
            "up_proj": dense_layer.intermediate.dense.weight,
            "up_proj_bias": dense_layer.intermediate.dense.bias,
            "down_proj": dense_layer.output.dense.weight,
            "down_proj_bias": dense_layer.output.dense.bias,
        }
    if backbone == "gpt2":  # Conv1D stores [in, out]
        return {
            "up_proj": dense_layer.mlp.c_fc.weight.T,
            "up_proj_bias": dense_layer.mlp.c_fc.bias,
            "down_proj": dense_layer.mlp.c_proj.weight.T,
            "down_proj_bias": dense_layer.mlp.c_proj.bias,
        }
    if backbone in ("llama", "mistral", "qwen2", "qwen3"):
        mlp = dense_layer.mlp
        return {
            "gate_up_proj": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0),
            "down_proj": mlp.down_proj.weight,
        }
    if backbone.startswith("t5"):
        ffn = dense_layer.layer[-1].DenseReluDense
        if hasattr(ffn, "wi_0"):
            return {"gate_up_proj": torch.cat([ffn.wi_0.weight, ffn.wi_1.weight], dim=0), "down_proj": ffn.wo.weight}
        return {"up_proj": ffn.wi.weight, "down_proj": ffn.wo.weight}
    raise ValueError(backbone)


def layer_stacks(backbone: str, base_model) -> dict:
    """{stack: [layer, ...]} of a transformers base model (BertModel, GPT2Model, LlamaModel, T5Model...)."""
    if backbone in ("bert", "roberta"):
        return {"encoder": list(base_model.encoder.layer)}
    if backbone == "gpt2":
        return {"decoder": list(base_model.h)}
    if backbone.startswith("t5"):
        return {"encoder": list(base_model.encoder.block), "decoder": list(base_model.decoder.block)}
    return {"decoder": list(base_model.layers)}


def moe_of_layer(backbone: str, layer):
    """The family layer that stands in `layer`'s FFN slot of an hf_moe model."""
    if backbone in ("bert", "roberta"):
        block = layer.intermediate
    elif backbone.startswith("t5"):
        block = layer.layer[-1].DenseReluDense
    else:
        block = layer.mlp
    return block.moe


def backbone_of(model):
    """The dense transformers model (any head) an hf_moe model takes the place of, which runs on its modules."""
    return model.backbone


def model_depth(model) -> int:
    """Transformer layers between a model's inputs and its outputs (T5's decoder follows its encoder)."""
    config = model.config.get_text_config()
    decoder = getattr(config, "num_decoder_layers", 0) if config.is_encoder_decoder else 0
    return config.num_hidden_layers + decoder


# the start of a child script (`python -I -c ... <repository>`) that cannot import hf_moe however it is installed:
# the repository on sys.path, or an editable-install finder or path hook
HIDE_HF_MOE = """
import importlib.util
import sys

REPO = sys.argv[1]
sys.meta_path = [
    f for f in sys.meta_path
    if "editable" not in type(f).__module__.lower() and "__editable__" not in repr(f)
]
# drop the repository itself (not the virtual environment CI creates inside it)
sys.path = [p for p in sys.path if p.rstrip("/") not in (REPO, "") and "__editable__" not in p]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("hf_moe") is None, "hf_moe is importable in the child"
"""
