"""Every family on every backbone, every head the backbone has: build, forward, backward, loss = task loss written out
here + coef x aux_loss, and save_pretrained -> AutoModelFor*.from_pretrained round trip.

The full head matrix runs for TopKMoe; the other families run the sequence-classification head, the generative head
and one more head (masked LM on bert, multiple choice on roberta, elsewhere rotating with the backbone), so that
every (family, head) pair is met on some backbone.
"""

import pytest
import torch
from models_common import (
    AUTO_CLASS,
    BACKBONES,
    FAMILIES,
    GENERATIVE_HEAD,
    HEADS_OF,
    main_tensor,
    make_inputs,
    make_model,
    model_depth,
    task_loss,
)

import hf_moe

pytestmark = pytest.mark.usefixtures("single_thread")


BERT_EXTRA = {"bert": "ForMaskedLM", "roberta": "ForMultipleChoice"}


def _cases():
    cases = []
    for b_idx, backbone in enumerate(BACKBONES):
        heads = HEADS_OF[backbone]
        for f_idx, family in enumerate(FAMILIES):
            if family == "TopKMoe":
                chosen = list(heads)
            else:
                fixed = ["ForSequenceClassification", GENERATIVE_HEAD[backbone]]
                if backbone in BERT_EXTRA:  # heads only encoders have
                    chosen = fixed + [BERT_EXTRA[backbone]]
                else:
                    rest = [h for h in heads if h not in fixed]
                    chosen = fixed + [rest[(f_idx + b_idx) % len(rest)]]
            cases += [pytest.param(family, backbone, head, id=f"{family}-{backbone}-{head}") for head in chosen]
    return cases


CASES = _cases()


def test_case_list_covers_every_family_head_pair():
    pairs = {(c.values[0], c.values[2]) for c in CASES}
    for family in FAMILIES:
        for head in {h for heads in HEADS_OF.values() for h in heads}:
            assert (family, head) in pairs, (family, head)
        assert {c.values[1] for c in CASES if c.values[0] == family} == set(BACKBONES)


@pytest.mark.parametrize("family, backbone, head", CASES)
def test_forward_backward_loss_and_round_trip(family, backbone, head, tmp_path, assert_fp32_close):
    model = make_model(family, backbone, head)
    assert type(model) is hf_moe.MODEL_CLASSES[family, head]
    assert isinstance(model, hf_moe.MoePreTrainedModel)
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.Module) and hasattr(m, "moe")]
    # t5 has an encoder and a decoder stack, except for token classification (encoder only)
    num_moe_layers = 4 if backbone == "t5" and head != "ForTokenClassification" else 2
    assert len(blocks) == num_moe_layers

    # training-mode forward + backward with labels
    model.train()
    inputs = make_inputs(backbone, head)
    out = model(**inputs, output_router_logits=True)
    assert out.aux_loss is not None and out.aux_loss.ndim == 0 and torch.isfinite(out.aux_loss)
    assert len(out.router_logits) == num_moe_layers
    assert all(r.shape[-1] == model.config.num_experts for r in out.router_logits)
    if head == "Model":
        assert getattr(out, "loss", None) is None
        objective = main_tensor(head, out).pow(2).mean() + out.aux_loss
    else:
        expected = task_loss(head, out, inputs) + model.config.router_aux_loss_coef * out.aux_loss
        torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
        objective = out.loss
    objective.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    moe_params = [n for n in grads if ".moe." in n or ".hyper_generators." in f".{n}"]
    assert moe_params and all(grads[n] is not None for n in moe_params), [n for n in moe_params if grads[n] is None]
    routers = [n for n in grads if ".router." in n]
    assert routers and all(grads[n].abs().sum() > 0 for n in routers), "router gets no gradient"
    experts = [n for n in grads if ".experts." in n]
    assert experts and any(grads[n].abs().sum() > 0 for n in experts)

    # save -> the matching Auto class -> same class, same outputs (eval mode)
    model.eval()
    eval_inputs = make_inputs(backbone, head, seed=3)
    with torch.no_grad():
        before = model(**eval_inputs)
    model.save_pretrained(tmp_path)
    loaded = AUTO_CLASS[head].from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert not loaded.training
    assert type(loaded.config) is type(model.config)
    # (problem_type is inferred by the forward with labels, and dtype is bookkeeping)
    volatile = ("problem_type", "dtype")
    saved_text, loaded_text = model.config.text_config.to_dict(), loaded.config.text_config.to_dict()
    assert {k: v for k, v in loaded_text.items() if k not in volatile} == {
        k: v for k, v in saved_text.items() if k not in volatile
    }
    with torch.no_grad():
        after = loaded(**eval_inputs)
    # parameters are bitwise equal; outputs agree to float32 rounding (reloaded tensors live in other buffers, and
    # CPU kernels may round differently at other addresses: cloning the loaded parameters gives bitwise equality)
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded_state[name]), f"{name} changed in the round trip"
    depth = model_depth(model)
    assert_fp32_close(main_tensor(head, after), main_tensor(head, before), depth, "output after the round trip")
    assert_fp32_close(after.aux_loss, before.aux_loss, depth, "aux loss after the round trip")
    if head != "Model":
        assert_fp32_close(after.loss, before.loss, depth, "loss after the round trip")
