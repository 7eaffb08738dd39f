"""Fine-tune a dense checkpoint, or its upcycled MoE of any family, on a GLUE or SuperGLUE task with `Trainer`.

    from hf_moe.training.finetune import finetune
    result = finetune("sentence-transformers/all-MiniLM-L6-v2", "sst2", family="hypermoe", output_dir="runs/sst2",
                      max_train_samples=1000, epochs=1, max_length=64)
    result["accuracy"], result["train_time_s"], result["total_params"], result["active_params"]

`finetune` takes keywords; underneath, `build_trainer(FinetuneArguments(...), MoeArguments(...))` returns a
`TrainerBundle` (the `Trainer` and what evaluation needs besides it) for those who drive the `Trainer` themselves.

The dense model is loaded with the task's head (`AutoModelForSequenceClassification`, or
`AutoModelForMultipleChoice` for COPA), upcycled in memory when `family` is given (`family=None` is the dense
baseline), trained with `Trainer` on CPU or whatever `Trainer` finds (`use_cpu=True` by default) and evaluated on the
task's dev split with its official metric (`Task.compute_metrics_fn`). Encoder (BERT-style) and decoder (Llama-style)
backbones both work; a decoder tokenizer without a pad token pads with eos and the model's `pad_token_id` is set to it.
Under `torchrun` the `Trainer` runs data-parallel (gloo on CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from ..options import MoeArguments

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback

    from ..tasks import Task
    from .telemetry import RouterTelemetryCallback

__all__ = ["FinetuneArguments", "TrainerBundle", "build_trainer", "finetune", "finetune_arguments",
           "parameter_checksum", "parameter_counts", "validate_family"]


@dataclass
class FinetuneArguments:
    """What `build_trainer` fine-tunes on which task, and how (HfArgumentParser style: each field's help in its
    metadata). The MoE itself is `hf_moe.options.MoeArguments`."""

    model_name_or_path: str = field(metadata={"help": "dense checkpoint folder or Hub id"})
    task: str = field(metadata={"help": "task name (hf_moe.tasks.TASKS; a Task object also works)"})
    output_dir: str = field(metadata={"help": "the Trainer's output folder (router telemetry goes there too)"})
    data_dir: str | None = field(
        default=None, metadata={"help": "local GLUE/SuperGLUE folder (default $HF_MOE_DATA_DIR, else the Hub)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "a seeded random subset of train"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "the first rows of the dev split"})
    epochs: float = field(default=1.0, metadata={"help": "training epochs"})
    max_steps: int = field(default=-1, metadata={"help": "training steps; > 0 overrides epochs"})
    lr: float = field(default=5e-5, metadata={"help": "learning rate"})
    batch_size: int = field(default=16, metadata={"help": "training batch size per device"})
    eval_batch_size: int | None = field(default=None, metadata={"help": "eval batch size (default 2 x batch_size)"})
    max_length: int = field(default=128, metadata={"help": "tokens per example"})
    seed: int = field(default=0, metadata={"help": "seed of the train subset, the upcycling and training"})
    peft: str | None = field(
        default=None, metadata={"help": "'lora': LoRA adapters (apply_lora), routers and head trained in full"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (lora_alpha = 2 x rank)"})
    telemetry: bool = field(
        default=True, metadata={"help": "RouterTelemetryCallback for MoE models (router_stats.json, expert_usage.png)"})
    k_schedule: tuple[int, int] | None = field(
        default=None, metadata={"help": "HyperRouter's k schedule (k_min, k_max) over training"})
    eval_top_k: tuple[int, ...] = field(
        default=(), metadata={"help": "also evaluate with num_experts_per_tok set to each of these k (top-k routing)"})
    training_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "TrainingArguments fields overriding the recipe's, e.g. save_steps"})
    distributed: dict[str, int] | None = field(
        default=None, metadata={"help": "DistributedConfig sizes (tp_size, ep_size, fsdp_size) under torchrun: the "
                                        "checkpoint, an hf-moe one, is loaded sharded (README, Scaling out)"})


@dataclass
class TrainerBundle:
    """What `build_trainer` sets up: the `Trainer`, and what `finetune` reads besides it."""

    trainer: Trainer
    task: Task
    tokenizer: PreTrainedTokenizerBase
    eval_split: str
    eval_raw: Dataset  # the dev rows before encoding: the metric reads their labels
    telemetry: RouterTelemetryCallback | None  # None for the dense model or telemetry=False
    counts: dict[str, int]  # `parameter_counts` of the model before PEFT wrapping


def validate_family(family: str | None) -> None:
    """ValueError listing the valid families if `family` is not a model type of hf-moe (None = dense is valid)."""
    from ..modeling import check_family

    if family is not None:
        try:
            check_family(family)
        except ValueError as error:
            raise ValueError(f"{error} (Or None for the dense baseline.)") from None


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
        param = param.full_tensor() if hasattr(param, "full_tensor") else param  # sharded: every rank gathers
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load_dense(model_name_or_path, task, tokenizer, dtype=torch.float32, **load_kwargs):
    from transformers import AutoConfig, AutoModelForMultipleChoice, AutoModelForSequenceClassification

    from ..tasks import MULTIPLE_CHOICE, REGRESSION

    config = AutoConfig.from_pretrained(model_name_or_path)
    if getattr(config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id  # decoder backbones: pool the last non-pad token
    if task.problem_type == MULTIPLE_CHOICE:
        return _load_with_new_head(AutoModelForMultipleChoice, model_name_or_path, config=config, dtype=dtype,
                                   **load_kwargs)
    config.num_labels = task.num_labels
    config.id2label, config.label2id = task.id2label, task.label2id
    config.problem_type = "regression" if task.problem_type == REGRESSION else "single_label_classification"
    return _load_with_new_head(AutoModelForSequenceClassification, model_name_or_path, config=config, dtype=dtype,
                               **load_kwargs)


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


def finetune_arguments(model_name_or_path: str, task, **keywords) -> tuple[FinetuneArguments, MoeArguments]:
    """`finetune`'s keywords as its two dataclasses: the fields of `FinetuneArguments`, the fields of `MoeArguments`,
    and every other keyword a family config field (added to `MoeArguments.config_overrides`)."""
    finetune_keywords = {name: keywords.pop(name) for name in _field_names(FinetuneArguments) & keywords.keys()}
    moe_keywords = {name: keywords.pop(name) for name in _field_names(MoeArguments) & keywords.keys()}
    moe = MoeArguments(**moe_keywords)
    moe.config_overrides = {**moe.config_overrides, **keywords}
    return FinetuneArguments(model_name_or_path, task, **finetune_keywords), moe


def _field_names(dataclass_type) -> set[str]:
    return {f.name for f in fields(dataclass_type)}


def _check_arguments(args: FinetuneArguments, moe: MoeArguments) -> Task:
    """The task of `args`; ValueError, before anything loads, for an unknown task, family or PEFT method."""
    from ..tasks import get_task

    task = get_task(args.task)  # ValueError listing the valid tasks
    validate_family(moe.family)
    if args.peft not in (None, "lora"):
        raise ValueError(f"unknown peft method {args.peft!r}; valid: None, 'lora'")
    if args.eval_top_k and (moe.family is None or _routes_by_probability_mass(moe.family)):
        raise ValueError(f"eval_top_k sets the k of top-k routing; {moe.family or 'the dense model'} has none")
    if args.peft == "lora" and moe.family is None:
        raise ValueError("peft='lora' is implemented for hf-moe family models; pass family=...")
    if args.distributed and (moe.family is not None or args.peft is not None):
        raise ValueError(
            "distributed loads an hf-moe checkpoint sharded, which neither upcycling in memory nor LoRA can follow: "
            "upcycle first (hf-moe upcycle), then fine-tune that checkpoint with family=None, without peft."
        )
    return task


def _routes_by_probability_mass(family: str) -> bool:
    """Whether `family` selects experts up to a probability (`router_top_p`) rather than a number k."""
    from .. import get_family

    return hasattr(get_family(family).config_class, "router_top_p")


def _load_model(args: FinetuneArguments, moe: MoeArguments, task: Task, tokenizer):
    """The dense model with the task's head, upcycled into `moe.family` unless it is None; returns (model, counts)
    with the parameter counts taken before any LoRA wrapping."""
    from ..conversion import UpcycleOptions, upcycle_model

    distributed = {}
    if args.distributed:
        from transformers.distributed import DistributedConfig

        distributed["distributed_config"] = DistributedConfig(**args.distributed)
    model = _load_dense(args.model_name_or_path, task, tokenizer, **distributed)
    if moe.family is not None:
        model = upcycle_model(model, moe.family, options=UpcycleOptions(seed=args.seed), **moe.upcycle_kwargs())
    model.train()
    counts = parameter_counts(model)
    if args.peft == "lora":
        from .peft import apply_lora

        model = apply_lora(model, r=args.lora_r, lora_alpha=2 * args.lora_r)
    return model, counts


def _training_arguments(args: FinetuneArguments):
    """The recipe's `TrainingArguments` (CPU, no checkpoints, no reporting), with `args.training_args` on top."""
    from transformers import TrainingArguments

    recipe = {
        "output_dir": args.output_dir,
        "use_cpu": True,
        "report_to": "none",
        "num_train_epochs": args.epochs,
        "max_steps": args.max_steps if args.max_steps is not None else -1,
        "learning_rate": args.lr,
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": args.eval_batch_size or 2 * args.batch_size,
        "seed": args.seed,
        "data_seed": args.seed,
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 10,
        "dataloader_num_workers": 0,
        "warmup_steps": 0.1,
    }
    return TrainingArguments(**{**recipe, **(args.training_args or {})})


def build_trainer(args: FinetuneArguments, moe: MoeArguments | None = None, *,
                  callbacks: list[TrainerCallback] | None = None) -> TrainerBundle:
    """Everything `finetune` sets up before training: data, tokenizer, model (dense when `moe` is None or has no
    family), collator and `Trainer`, with `RouterTelemetryCallback` added to `callbacks` for an MoE model."""
    from transformers import (
        AutoTokenizer,
        DataCollatorForMultipleChoice,
        DataCollatorWithPadding,
        Trainer,
        set_seed,
    )

    from ..tasks import MULTIPLE_CHOICE, ensure_pad_token
    from .telemetry import RouterTelemetryCallback

    moe = moe or MoeArguments()
    task = _check_arguments(args, moe)
    # data first: a missing file or an offline Hub fails before any model is loaded
    train_raw = _subset(task.load("train", args.data_dir), args.max_train_samples, args.seed)
    eval_split = task.eval_splits[0]
    eval_raw = _subset(task.load(eval_split, args.data_dir), args.max_eval_samples)

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tokenizer.pad_token is None:
        ensure_pad_token(tokenizer)
    model, counts = _load_model(args, moe, task, tokenizer)
    if task.problem_type == MULTIPLE_CHOICE:
        collator = DataCollatorForMultipleChoice(tokenizer)
    else:
        collator = DataCollatorWithPadding(tokenizer)
    callbacks = list(callbacks or [])
    telemetry = None
    if args.telemetry and hasattr(_base_model(model), "moe_blocks"):  # upcycled, or an hf-moe checkpoint
        telemetry = RouterTelemetryCallback(k_schedule=args.k_schedule, output_dir=args.output_dir)
        callbacks.append(telemetry)
    trainer = Trainer(
        model=model,
        args=_training_arguments(args),
        train_dataset=task.encode(train_raw, tokenizer, args.max_length),
        eval_dataset=task.encode(eval_raw, tokenizer, args.max_length),
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=task.compute_metrics_fn(eval_raw),
        callbacks=callbacks,
    )
    return TrainerBundle(trainer=trainer, task=task, tokenizer=tokenizer, eval_split=eval_split, eval_raw=eval_raw,
                         telemetry=telemetry, counts=counts)


def finetune(
    model_name_or_path: str,
    task,
    *,
    family: str | None = None,
    resume_from_checkpoint: str | bool | None = None,
    checksum: bool = False,
    save_model: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    **keywords,
) -> dict:
    """Fine-tune `model_name_or_path` (dense, or upcycled into `family`) on `task`; evaluate on its dev split.

    task: a task name (`hf_moe.tasks.TASKS`; unknown names raise ValueError listing the valid ones). family: an hf-moe
    model type (`topk_moe`, `hypermoe`, `hyperrouter`, `mh_moe`, `dynamic_moe`) or None for the dense baseline.
    Every other keyword is a field of `FinetuneArguments` (data_dir, output_dir, max_train_samples, epochs or
    max_steps, lr, batch_size, max_length, seed, peft="lora", telemetry, training_args, ...) or of `MoeArguments`
    (num_experts, top_k, router_top_p, moe_layers, ...), and any other keyword (`norm_topk_prob=True`,
    `moe_layer_frequency=2`, `router_jitter_noise=0.01`, ...) goes to the family config; see `finetune_arguments`.
    callbacks: more `TrainerCallback`s. save_model: save the trained model and its tokenizer into `output_dir`
    (reloads with the Auto class; a LoRA run saves its adapter).

    Returns a dict: the task's metric keys (e.g. "accuracy"), "main_metric", "eval_loss", "train_time_s",
    "eval_time_s", "train_loss", "global_step", "total_params", "expert_params", "active_params" (dynamic top-p:
    from the measured mean experts per token), "experts_per_token" (MoE), "trainable_params", and with
    `checksum=True` "param_sha256". An MoE model's result also has its routing: "experts_per_token_start" and
    "_end" (the first and last logging window of training) and `RoutingProbe`'s figures over the evaluation
    ("eval_experts_per_token", "eval_token_expert_fraction", "eval_sequence_expert_fraction", HyperMoE's
    "eval_hyper_expert_share"); `eval_top_k=(1, 4)` adds the main metric evaluated at those k ("accuracy@k1", ...)."""
    from .telemetry import RoutingProbe

    args, moe = finetune_arguments(model_name_or_path, task, family=family, **keywords)
    bundle = build_trainer(args, moe, callbacks=callbacks)
    trainer = bundle.trainer
    start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    train_time = time.perf_counter() - start
    moe_model = hasattr(_base_model(trainer.model), "moe_blocks")
    start = time.perf_counter()
    with RoutingProbe(trainer.model) if moe_model else contextlib.nullcontext() as probe:
        metrics = trainer.evaluate()
    eval_time = time.perf_counter() - start

    task = bundle.task
    result: dict[str, Any] = {"task": task.name, "family": family or "dense", "main_metric": task.main_metric}
    for key in task.metric_keys:
        result[key] = metrics.get(f"eval_{key}", math.nan)
    result.update(
        eval_loss=metrics.get("eval_loss", math.nan),
        eval_split=bundle.eval_split,
        eval_samples=len(bundle.eval_raw),
        train_samples=len(trainer.train_dataset),
        train_loss=train_output.training_loss,
        global_step=train_output.global_step,
        train_time_s=train_time,
        eval_time_s=eval_time,
    )
    result.update(_parameter_figures(bundle))
    if moe_model:
        result.update(_routing_figures(trainer, probe))
    for k in args.eval_top_k:
        result[f"{task.main_metric}@k{k}"] = _evaluate_at_top_k(trainer, k)[f"eval_{task.main_metric}"]
    if checksum:
        result["param_sha256"] = parameter_checksum(trainer.model)
    if save_model:
        trainer.save_model()  # into output_dir; the main process writes under DDP
    return result


def _routing_figures(trainer, probe) -> dict[str, float]:
    """What the routers did: experts per token in the first and last logging window of training (from the
    telemetry's log history) and `RoutingProbe`'s figures over the evaluation, prefixed "eval_"."""
    figures = {}
    key = "router/experts_per_token"
    windows = [log[key] for log in trainer.state.log_history if key in log]
    if windows:
        figures.update(experts_per_token_start=windows[0], experts_per_token_end=windows[-1])
    figures.update({f"eval_{name}": value for name, value in probe.figures().items()})
    return figures


def _evaluate_at_top_k(trainer, k: int) -> dict[str, float]:
    """`trainer.evaluate()` with every MoE layer routing to k experts; the config's k is restored afterwards."""
    config = _base_model(trainer.model).config
    trained_k = config.num_experts_per_tok
    config.num_experts_per_tok = k
    try:
        return trainer.evaluate(metric_key_prefix="eval")
    finally:
        config.num_experts_per_tok = trained_k


def _parameter_figures(bundle: TrainerBundle) -> dict[str, float]:
    """Parameter counts after training, with the measured mean experts per token of an MoE model, from which its
    active parameters are counted (k for top-k; data-dependent for top-p)."""
    figures: dict[str, float] = {}
    experts_per_token = bundle.telemetry.mean_experts_per_token() if bundle.telemetry is not None else None
    counts = bundle.counts
    if experts_per_token is not None:
        figures["experts_per_token"] = experts_per_token
        counts = parameter_counts(bundle.trainer.model, experts_per_token=experts_per_token)
    figures.update(counts)
    figures["trainable_params"] = sum(p.numel() for p in bundle.trainer.model.parameters() if p.requires_grad)
    return figures
