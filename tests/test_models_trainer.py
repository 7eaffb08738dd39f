"""transformers.Trainer on the sequence-classification heads (tiny BERT backbone): every family trains from a
`datasets.Dataset`, and the loss goes down on a learnable toy task."""

import pytest
import torch
from datasets import Dataset
from models_common import FAMILIES, make_model
from transformers import Trainer, TrainingArguments

pytestmark = pytest.mark.usefixtures("single_thread")

MARKER = 5  # the toy task: does token 5 occur in the sequence?


def _toy_dataset(num_rows, seq_len=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 100, (num_rows, seq_len), generator=generator)  # no marker yet
    labels = torch.arange(num_rows) % 2
    positions = torch.randint(1, seq_len - 2, (num_rows,), generator=generator)  # never in the padding
    ids[labels == 1, positions[labels == 1]] = MARKER
    ids[:, 0] = 3  # a fixed first token, as a [CLS]
    mask = torch.ones_like(ids)
    mask[::3, -2:] = 0  # some padding
    ids[mask == 0] = 0
    assert ((ids == MARKER).any(1).long() == labels).all()
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


def _args(tmp_path, **kwargs):
    return TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **kwargs,
    )


def _model(family):
    # default-sized balance loss (0.01) so that the task dominates the logged loss
    model = make_model(family, "bert", "ForSequenceClassification", num_labels=2, router_aux_loss_coef=0.01)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_trains_three_steps_and_evaluates(family, tmp_path):
    model = _model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    dataset = _toy_dataset(24)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3),
        train_dataset=dataset,
        eval_dataset=dataset.select(range(8)),
    )
    result = trainer.train()
    assert result.global_step == 3
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any(".router." in n for n in changed), "routers did not train"
    assert any(".experts." in n for n in changed), "experts did not train"
    assert any("classifier" in n for n in changed)
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_loss_goes_down_on_a_learnable_task(family, tmp_path):
    model = _model(family)
    # at a constant 3e-3 every family goes from ~0.73 to ~0.3 in 30 steps (1e-3 with linear decay barely moves)
    args = _args(
        tmp_path, max_steps=30, per_device_train_batch_size=16, learning_rate=3e-3, lr_scheduler_type="constant"
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_toy_dataset(128, seed=1),
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.2, (first, last, losses)
