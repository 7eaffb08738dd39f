"""LoRA on hf-moe models: adapters on attention and fused experts train, save, reload and merge."""

import pytest
import torch
from peft import PeftModel

import hf_moe
from hf_moe.training.peft import apply_lora

BACKBONES = {
    "bert": {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 100},
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 100, "pad_token_id": 0},
}


def _model(family, backbone):
    config = getattr(hf_moe, f"{family}Config")(text_config=BACKBONES[backbone], num_experts=4, num_labels=2)
    torch.manual_seed(0)
    return hf_moe.MODEL_CLASSES[family, "ForSequenceClassification"](config)


@pytest.mark.parametrize("family, backbone", [("TopKMoe", "bert"), ("HyperRouter", "bert"), ("HyperMoe", "llama"),
                                              ("DynamicMoe", "llama"), ("MultiHeadMoe", "bert")])
def test_lora_trains_saves_reloads_and_merges(tmp_path, family, backbone):
    model = _model(family, backbone)
    peft_model = apply_lora(model, task_type="SEQ_CLS")
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("experts" in n and "lora_A" in n for n in trainable)  # fused experts carry adapters
    assert any(".router." in n for n in trainable) and any("classifier" in n or "score" in n for n in trainable)
    assert not any(".hypernet." in n for n in trainable)  # HyperRouter's hypernetwork stays frozen

    ids = torch.randint(1, 100, (4, 9), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 1, 0])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = peft_model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits

    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_model(family, backbone), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, adapted)
        merged = reloaded.merge_and_unload()
        assert type(merged) is type(model)
        assert (merged(input_ids=ids).logits - adapted).abs().max().item() <= 1e-5
