"""Fine-tune a dense checkpoint, or its upcycled MoE of any family, on a GLUE/SuperGLUE task with `Trainer`.

    from hf_moe.training.glue import finetune
    result = finetune("sentence-transformers/all-MiniLM-L6-v2", "sst2", family="hypermoe", output_dir="runs/sst2",
                      max_train_samples=1000, epochs=1, max_length=64)
    result["accuracy"], result["train_time_s"], result["total_params"], result["active_params"]

The dense model is loaded with the task's head (`AutoModelForSequenceClassification`, or
`AutoModelForMultipleChoice` for COPA), upcycled in memory when `family` is given (`family=None` is the dense
baseline), trained with `Trainer` on CPU or whatever `Trainer` finds (`use_cpu=True` by default) and evaluated on the
task's dev split with its official metric (`Task.compute_metrics_fn`). Encoder (BERT-style) and decoder (Llama-style)
backbones both work; a decoder tokenizer without a pad token pads with eos and the model's `pad_token_id` is set to it.
Under `torchrun` the `Trainer` runs data-parallel (gloo on CPU).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["finetune", "build_trainer", "parameter_counts", "parameter_checksum", "validate_family"]


def validate_family(family: str | None) -> None:
    """ValueError listing the valid families if `family` is not a model type of hf-moe (None = dense is valid)."""
    from ..modeling import FAMILY_CONFIG_CLASSES

    if family is not None and family not in FAMILY_CONFIG_CLASSES:
        raise ValueError(f"unknown family {family!r}; valid families: {', '.join(sorted(FAMILY_CONFIG_CLASSES))} "
                         "(or None for the dense baseline)")


def _base_model(model):
    """The hf-moe / transformers model under PEFT and DDP wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def parameter_counts(model, experts_per_token: float | None = None) -> dict[str, int]:
    """total, expert and active parameters of `model` (active = total - expert params of the unselected experts).

    experts_per_token: the measured mean for data-dependent routing (dynamic top-p); default: the config's top-k."""
    from ..modeling import SortedLoopExperts

    model = _base_model(model)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for m in model.modules() if isinstance(m, SortedLoopExperts) for p in m.parameters())
    config = model.config
    num_experts = getattr(config, "num_experts", None)
    if not experts or not num_experts:
        return {"total_params": total, "expert_params": 0, "active_params": total}
    k = experts_per_token if experts_per_token is not None else config.num_experts_per_tok
    active = total - experts * (1 - min(k, num_experts) / num_experts)
    return {"total_params": total, "expert_params": experts, "active_params": int(round(active))}


def parameter_checksum(model) -> str:
    """sha256 over every parameter's name and float32 bytes (equal on every rank after a correct DDP run)."""
    digest = hashlib.sha256()
    for name, param in sorted(_base_model(model).named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load_dense(model_name_or_path, task, tokenizer, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForMultipleChoice, AutoModelForSequenceClassification

    from ..tasks import MULTIPLE_CHOICE, REGRESSION

    config = AutoConfig.from_pretrained(model_name_or_path)
    if getattr(config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id  # decoder backbones: pool the last non-pad token
    if task.problem_type == MULTIPLE_CHOICE:
        return _load_with_new_head(AutoModelForMultipleChoice, model_name_or_path, config=config, dtype=dtype)
    config.num_labels = task.num_labels
    config.id2label, config.label2id = task.id2label, task.label2id
    config.problem_type = "regression" if task.problem_type == REGRESSION else "single_label_classification"
    return _load_with_new_head(AutoModelForSequenceClassification, model_name_or_path, config=config, dtype=dtype)


def _load_with_new_head(auto_class, model_name_or_path, **kwargs):
    """`auto_class.from_pretrained` without transformers' load report when all it lists is the task head (new,
    hence missing from a dense checkpoint) or the checkpoint's own head (unused): every other missing, unexpected or
    mismatched weight is still reported."""
    modeling_logger, held = logging.getLogger("transformers.modeling_utils"), []

    def hold_report(record):
        if "LOAD REPORT" in record.getMessage():
            held.append(record)
            return False
        return True

    modeling_logger.addFilter(hold_report)
    try:
        model, info = auto_class.from_pretrained(model_name_or_path, output_loading_info=True, **kwargs)
    finally:
        modeling_logger.removeFilter(hold_report)
    in_backbone = [key for key in (*info["missing_keys"], *info["unexpected_keys"])
                   if key.startswith(f"{model.base_model_prefix}.")]
    if in_backbone or info["mismatched_keys"]:
        for record in held:
            modeling_logger.handle(record)
    return model


def _subset(dataset, n, seed=None):
    if n is None or n >= len(dataset):
        return dataset
    if seed is not None:
        dataset = dataset.shuffle(seed=seed)
    return dataset.select(range(n))


def build_trainer(
    model_name_or_path: str,
    task,
    *,
    family: str | None = None,
    num_experts: int = 8,
    top_k: int = 2,
    router_top_p: float | None = None,
    data_dir: str | os.PathLike | None = None,
    output_dir: str,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    epochs: float = 1.0,
    max_steps: int = -1,
    lr: float = 5e-5,
    batch_size: int = 16,
    eval_batch_size: int | None = None,
    max_length: int = 128,
    seed: int = 0,
    peft: str | None = None,
    lora_r: int = 8,
    telemetry: bool = True,
    k_schedule: tuple[int, int] | None = None,
    training_args: dict[str, Any] | None = None,
    callbacks: list | None = None,
    **family_options,
):
    """Everything `finetune` sets up: returns `(trainer, info)` with `info` holding the task, the raw eval split,
    the telemetry callback (or None) and the parameter counts before PEFT wrapping."""
    from transformers import (
        AutoTokenizer,
        DataCollatorForMultipleChoice,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from ..conversion import UpcycleOptions, upcycle_model
    from ..tasks import MULTIPLE_CHOICE, ensure_pad_token, get_task
    from .telemetry import RouterTelemetryCallback

    task = get_task(task)  # ValueError listing the valid tasks
    validate_family(family)
    if peft not in (None, "lora"):
        raise ValueError(f"unknown peft method {peft!r}; valid: None, 'lora'")
    if router_top_p is not None:
        family_options["router_top_p"] = router_top_p

    # data first: a missing file or an offline Hub fails before any model is loaded
    train_raw = _subset(task.load("train", data_dir), max_train_samples, seed)
    eval_split = task.eval_splits[0]
    eval_raw = _subset(task.load(eval_split, data_dir), max_eval_samples)

    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if tokenizer.pad_token is None:
        ensure_pad_token(tokenizer)
    model = _load_dense(model_name_or_path, task, tokenizer)
    if family is not None:
        model = upcycle_model(model, family, num_experts=num_experts, num_experts_per_tok=top_k,
                              options=UpcycleOptions(seed=seed), **family_options)
    model.train()
    counts = parameter_counts(model)
    if peft == "lora":
        if family is None:
            raise ValueError("peft='lora' is implemented for hf-moe family models; pass family=...")
        from .peft import apply_lora

        model = apply_lora(model, r=lora_r, lora_alpha=2 * lora_r)

    train_ds = task.encode(train_raw, tokenizer, max_length)
    eval_ds = task.encode(eval_raw, tokenizer, max_length)
    if task.problem_type == MULTIPLE_CHOICE:
        collator = DataCollatorForMultipleChoice(tokenizer)
    else:
        collator = DataCollatorWithPadding(tokenizer)

    args = dict(
        output_dir=output_dir,
        use_cpu=True,
        report_to="none",
        num_train_epochs=epochs,
        max_steps=max_steps if max_steps is not None else -1,
        learning_rate=lr,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=eval_batch_size or 2 * batch_size,
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10,
        dataloader_num_workers=0,
        warmup_steps=0.1,
    )
    args.update(training_args or {})
    callbacks = list(callbacks or [])
    telemetry_cb = None
    if telemetry and family is not None:
        telemetry_cb = RouterTelemetryCallback(k_schedule=k_schedule, output_dir=output_dir)
        callbacks.append(telemetry_cb)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=task.compute_metrics_fn(eval_raw),
        callbacks=callbacks,
    )
    info = {"task": task, "eval_split": eval_split, "eval_raw": eval_raw, "telemetry": telemetry_cb, "counts": counts,
            "tokenizer": tokenizer}
    return trainer, info


def finetune(
    model_name_or_path: str,
    task,
    *,
    family: str | None = None,
    resume_from_checkpoint: str | bool | None = None,
    checksum: bool = False,
    save_model: bool = False,
    **kwargs,
) -> dict:
    """Fine-tune `model_name_or_path` (dense, or upcycled into `family`) on `task`; evaluate on its dev split.

    task: a task name (`hf_moe.tasks.TASKS`; unknown names raise ValueError listing the valid ones). family: an hf-moe
    model type (`topk_moe`, `hypermoe`, `hyperrouter`, `mh_moe`, `dynamic_moe`) or None for the dense baseline.
    Every other keyword is `build_trainer`'s: num_experts/top_k/router_top_p and any other keyword (`norm_topk_prob=True`, `moe_layer_frequency=2`, ...) go to
    the family config. data_dir: local GLUE/SuperGLUE folder (default `$HF_MOE_DATA_DIR`, else the Hub).
    max_train_samples: a seeded random subset of train; max_eval_samples: the first rows of the dev split.
    epochs or max_steps (> 0 wins); peft="lora": LoRA adapters (`apply_lora`), routers and head trained in full.
    telemetry: `RouterTelemetryCallback` for MoE models (writes router_stats.json and expert_usage.png).
    Extra keywords also accepted: `eval_batch_size`, `lora_r`, `k_schedule` (HyperRouter k_min, k_max),
    `training_args` (dict overriding TrainingArguments fields, e.g. save_steps), `callbacks`. save_model: save the
    trained model and its tokenizer into `output_dir` (reloads with the Auto class; a LoRA run saves its adapter).

    Returns a dict: the task's metric keys (e.g. "accuracy"), "main_metric", "eval_loss", "train_time_s",
    "eval_time_s", "train_loss", "global_step", "total_params", "expert_params", "active_params" (dynamic top-p:
    from the measured mean experts per token), "experts_per_token" (MoE), "trainable_params", and with
    `checksum=True` "param_sha256"."""
    trainer, info = build_trainer(model_name_or_path, task, family=family, **kwargs)
    task = info["task"]
    start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    train_time = time.perf_counter() - start
    start = time.perf_counter()
    metrics = trainer.evaluate()
    eval_time = time.perf_counter() - start

    result: dict[str, Any] = {"task": task.name, "family": family or "dense", "main_metric": task.main_metric}
    for key in task.metric_keys:
        result[key] = metrics.get(f"eval_{key}", math.nan)
    result.update(
        eval_loss=metrics.get("eval_loss", math.nan),
        eval_split=info["eval_split"],
        eval_samples=len(info["eval_raw"]),
        train_samples=len(trainer.train_dataset),
        train_loss=train_output.training_loss,
        global_step=train_output.global_step,
        train_time_s=train_time,
        eval_time_s=eval_time,
    )
    telemetry_cb = info["telemetry"]
    experts_per_token = telemetry_cb.mean_experts_per_token() if telemetry_cb is not None else None
    if experts_per_token is not None:
        result["experts_per_token"] = experts_per_token
    counts = info["counts"]
    if family == "dynamic_moe" and experts_per_token is not None:
        counts = parameter_counts(trainer.model, experts_per_token=experts_per_token)
    result.update(counts)
    result["trainable_params"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if checksum:
        result["param_sha256"] = parameter_checksum(trainer.model)
    if save_model:
        trainer.save_model()  # into output_dir; the main process writes under DDP
    return result
