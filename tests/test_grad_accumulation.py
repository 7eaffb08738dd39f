"""Router losses under Trainer's gradient accumulation and data parallelism (issue #10, item 3), for every family on
the causal-LM (tiny Llama) and sequence-classification (tiny BERT) heads, in float64 so that only the weighting is
tested:

(a) without router losses, batch 4 x 4 accumulation steps gives batch 16 x 1 step's gradients and logged loss;
(b) a 2-process gloo run (batch 4 x 2 steps per rank) gives the 1-process batch-16 gradients and logged loss;
(c) with router losses, the router part of the gradient is the mean of the per-micro-batch router-loss gradients
    (weighted by each micro-batch's share of the predicted tokens for the causal-LM head, see
    `MoePreTrainedModel.accepts_loss_kwargs`), and the logged loss is the same mean of the per-micro-batch losses.

The data has padding (right-padded rows of different lengths). Run as a script under torchrun, this file is the
2-process worker of (b).
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from models_common import FAMILIES, VOCAB, dropout_free, make_model
from transformers import Trainer, TrainerCallback, TrainingArguments

pytestmark = pytest.mark.usefixtures("single_thread")

HEADS = {"ForCausalLM": "llama", "ForSequenceClassification": "bert"}
CASES = [(family, head) for family in FAMILIES for head in HEADS]
ROWS, SEQ = 16, 10
TOLERANCE = 1e-5
# every router-loss term on, at the families' default balance weight (HyperRouter's own default is 0)
ROUTER_COEFFICIENTS = {"router_aux_loss_coef": 0.01, "router_z_loss_coef": 0.001}
NO_ROUTER_LOSS = {"router_aux_loss_coef": 0.0, "router_z_loss_coef": 0.0}


def build_model(family, head, coefficients):
    backbone = HEADS[head]
    model = make_model(family, backbone, head, seed=0, text_overrides=dropout_free(backbone)).double()
    set_router_coefficients(model, coefficients)
    return model


def set_router_coefficients(model, coefficients):
    """Router-loss weights, read by the model at every forward (top-p's entropy term with the others)."""
    for name, value in coefficients.items():
        setattr(model.config, name, value)
    if hasattr(model.config, "router_entropy_loss_coef"):
        model.config.router_entropy_loss_coef = 1e-4 if coefficients["router_aux_loss_coef"] else 0.0


def padded_dataset(head, equal_lengths=False):
    """16 right-padded rows; with `equal_lengths` every row holds 7 real tokens (padding still present)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (ROWS, SEQ), generator=generator)
    lengths = torch.full((ROWS,), 7) if equal_lengths else torch.randint(3, SEQ + 1, (ROWS,), generator=generator)
    mask = (torch.arange(SEQ) < lengths[:, None]).long()
    ids[mask == 0] = 0
    if head == "ForCausalLM":
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.randint(0, 3, (ROWS,), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


class GradientRecorder(TrainerCallback):
    """Keeps the gradients the optimizer is about to apply (synchronised across processes under DDP)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def train_one_step(model, dataset, output_dir, batch, accumulation):
    """(gradients, logged loss, the micro-batches this process ran) of one Trainer optimizer step."""
    recorder, micro_batches = GradientRecorder(), []

    def record(module, args, kwargs):
        micro_batches.append({k: v for k, v in kwargs.items() if k in ("input_ids", "attention_mask", "labels")})

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    args = TrainingArguments(
        output_dir=str(output_dir), use_cpu=True, report_to="none", save_strategy="no", max_steps=1,
        per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_grad_norm=0.0,
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[recorder])
    trainer.train()
    hook.remove()
    return recorder.gradients, trainer.state.log_history[0]["loss"], micro_batches


def relative_error(gradients, reference):
    """||g - g_ref|| / ||g_ref|| over all parameters together (the same parameters must have gradients)."""
    assert gradients.keys() == reference.keys()
    difference = sum((gradients[n] - reference[n]).pow(2).sum() for n in reference).sqrt()
    return (difference / sum(reference[n].pow(2).sum() for n in reference).sqrt()).item()


def micro_batch_weights(head, micro_batches):
    """Each micro-batch's weight in the accumulated step: its share of the predicted tokens for the causal-LM head
    (the task loss is a token mean over the whole step), 1 / number of micro-batches for sequence classification."""
    if head != "ForCausalLM":
        return [1 / len(micro_batches)] * len(micro_batches)
    counts = [mb["labels"][:, 1:].ne(-100).sum().item() for mb in micro_batches]
    return [count / sum(counts) for count in counts]


def router_gradient_reference(model, head, micro_batches):
    """sum_m w_m * grad(L_with_router_losses(m) - L_without(m)) by plain forwards, and sum_m w_m * L_with(m)."""
    model = copy.deepcopy(model).train()
    model.zero_grad()
    weights = micro_batch_weights(head, micro_batches)
    logged = 0.0
    for weight, micro_batch in zip(weights, micro_batches):
        set_router_coefficients(model, ROUTER_COEFFICIENTS)
        with_router = model(**micro_batch).loss
        set_router_coefficients(model, NO_ROUTER_LOSS)
        (weight * (with_router - model(**micro_batch).loss)).backward()
        logged += weight * with_router.item()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, logged


@pytest.mark.parametrize("family, head", CASES)
def test_accumulation_equals_one_large_batch_without_router_losses(family, head, tmp_path):
    dataset = padded_dataset(head)
    full, full_loss, _ = train_one_step(build_model(family, head, NO_ROUTER_LOSS), dataset, tmp_path, 16, 1)
    accumulated, accumulated_loss, _ = train_one_step(
        build_model(family, head, NO_ROUTER_LOSS), dataset, tmp_path, 4, 4
    )
    assert relative_error(accumulated, full) <= TOLERANCE
    assert accumulated_loss == pytest.approx(full_loss, rel=TOLERANCE)


# sequence classification has one label per row: equal lengths would change nothing
@pytest.mark.parametrize(
    "family, head, equal_lengths",
    [(family, head, False) for family, head in CASES] + [(family, "ForCausalLM", True) for family in FAMILIES],
)
def test_router_losses_keep_their_weight_under_accumulation(family, head, equal_lengths, tmp_path):
    dataset = padded_dataset(head, equal_lengths)
    without, _, _ = train_one_step(build_model(family, head, NO_ROUTER_LOSS), dataset, tmp_path, 4, 4)
    model = build_model(family, head, ROUTER_COEFFICIENTS)
    initial = copy.deepcopy(model)
    with_router, logged, micro_batches = train_one_step(model, dataset, tmp_path, 4, 4)
    assert len(micro_batches) == 4
    if equal_lengths:
        assert micro_batch_weights(head, micro_batches) == [0.25] * 4  # the plain mean over micro-batches
    reference, reference_logged = router_gradient_reference(initial, head, micro_batches)
    router_part = {n: with_router[n] - without[n] for n in with_router}
    assert relative_error(router_part, reference) <= TOLERANCE
    assert logged == pytest.approx(reference_logged, rel=TOLERANCE)


def run_two_processes(output_dir):
    """This file's worker under torchrun, 2 CPU processes (gloo): batch 4 x 2 accumulation steps per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               str(output_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(output_dir / f"rank{rank}.pt") for rank in (0, 1)]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    return run_two_processes(tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("family, head", CASES)
def test_two_processes_equal_one_process_with_the_same_global_batch(family, head, two_process_results, tmp_path):
    dataset = padded_dataset(head)
    (gradients, logged, _), (gradients_1, logged_1, _) = (
        ranks[family, head, "without"] for ranks in two_process_results
    )
    assert relative_error(gradients_1, gradients) == 0  # DDP synchronised them
    single, single_logged, _ = train_one_step(build_model(family, head, NO_ROUTER_LOSS), dataset, tmp_path, 16, 1)
    assert relative_error(gradients, single) <= TOLERANCE
    assert logged == logged_1 == pytest.approx(single_logged, rel=TOLERANCE)

    # router losses: the weighted mean over the micro-batches of both processes
    with_router, logged, micro_batches = two_process_results[0][family, head, "with"]
    micro_batches = micro_batches + two_process_results[1][family, head, "with"][2]
    assert len(micro_batches) == 4 and sum(len(mb["labels"]) for mb in micro_batches) == ROWS
    reference, reference_logged = router_gradient_reference(build_model(family, head, ROUTER_COEFFICIENTS), head,
                                                            micro_batches)
    router_part = {n: with_router[n] - gradients[n] for n in with_router}
    assert relative_error(router_part, reference) <= TOLERANCE
    assert logged == pytest.approx(reference_logged, rel=TOLERANCE)


if __name__ == "__main__":  # the 2-process worker of run_two_processes
    torch.set_num_threads(1)
    output_dir = Path(sys.argv[1])
    results = {}
    for family, head in CASES:
        for name, coefficients in (("without", NO_ROUTER_LOSS), ("with", ROUTER_COEFFICIENTS)):
            model = build_model(family, head, coefficients)
            results[family, head, name] = train_one_step(model, padded_dataset(head), output_dir / "trainer", 4, 2)
    torch.save(results, output_dir / f"rank{os.environ['RANK']}.pt")
