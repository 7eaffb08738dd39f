"""Router telemetry for `Trainer`: logs what the routers do, drives HyperRouter's k schedule, and writes an
expert-usage heatmap and a JSON of the statistics at the end of training."""

import json
import os

import torch
from transformers import TrainerCallback

from ..modeling import MoeFeedForward


def hyperrouter_k(step: int, max_steps: int, k_min: int, k_max: int) -> int:
    """HyperRouter's schedule (official `new_utils.calculate_gate_number`): k rises linearly from k_min to k_max."""
    k = round((k_max - k_min) * step / max(max_steps, 1)) + k_min
    return min(max(k, k_min), k_max)


class RouterTelemetryCallback(TrainerCallback):
    """Adds to every log: the summed aux loss, mean router entropy, mean experts per token and, per MoE layer, the
    max/min expert load ratio; with `k_schedule=(k_min, k_max)` sets `num_experts_per_tok` before every step.

    At the end of training it writes `router_stats.json` (per-layer mean expert load, entropy, experts per token over
    the whole run) and `expert_usage.png` (layers x experts heatmap) into `output_dir` (default: the Trainer's).
    Statistics come from the forward passes of training steps, padding excluded.
    """

    def __init__(self, k_schedule: tuple[int, int] | None = None, output_dir: str | None = None):
        self.k_schedule = k_schedule
        self.output_dir = output_dir
        self._window = []  # per forward: list over layers of (aux, entropy, experts/token, load [E])
        self._totals = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.k_schedule is not None:
            config = _moe_config(model)
            config.num_experts_per_tok = hyperrouter_k(state.global_step, state.max_steps, *self.k_schedule)

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        self._collect(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._collect(model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self._window or logs is None or "loss" not in logs:
            return
        stats = self._summarise(self._window)
        self._window = []
        logs.update(stats)
        if state.log_history:
            state.log_history[-1].update(stats)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._totals is None:
            return
        output_dir = self.output_dir or args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        count = self._totals["forwards"]
        per_layer = {
            "expert_load": (self._totals["load"] / count).tolist(),
            "entropy": (self._totals["entropy"] / count).tolist(),
            "experts_per_token": (self._totals["experts"] / count).tolist(),
        }
        with open(os.path.join(output_dir, "router_stats.json"), "w") as f:
            json.dump({"forwards": count, "layers": self._totals["names"], **per_layer}, f, indent=2)
        _write_heatmap(self._totals["load"] / count, self._totals["names"], os.path.join(output_dir, "expert_usage.png"))

    def mean_experts_per_token(self) -> float | None:
        """Experts per token over every training forward so far, averaged over MoE layers (None before training)."""
        if self._totals is None:
            return None
        return float(self._totals["experts"].mean() / self._totals["forwards"])

    def _collect(self, model):
        blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, MoeFeedForward)]
        outputs = [(name, b.layer_output) for name, b in blocks if b.layer_output is not None and b.training]
        if not outputs:
            return
        rows = [
            (o.aux_loss.item(), o.entropy_loss.item(), o.mean_experts_per_token.item(), o.expert_load.detach().float().cpu())
            for _, o in outputs
        ]
        for _, block in blocks:
            block.layer_output = None  # each forward is counted once
        self._window.append(rows)
        if self._totals is None:
            self._totals = {
                "names": [name for name, _ in outputs],
                "forwards": 0,
                "load": torch.zeros(len(rows), rows[0][3].numel()),
                "entropy": torch.zeros(len(rows)),
                "experts": torch.zeros(len(rows)),
            }
        self._totals["forwards"] += 1
        self._totals["load"] += torch.stack([row[3] for row in rows])
        self._totals["entropy"] += torch.tensor([row[1] for row in rows])
        self._totals["experts"] += torch.tensor([row[2] for row in rows])

    @staticmethod
    def _summarise(window) -> dict:
        layers = len(window[0])
        mean = lambda column: sum(row[column] for rows in window for row in rows) / len(window)  # noqa: E731
        stats = {
            "router/aux_loss": mean(0),
            "router/entropy": mean(1) / layers,
            "router/experts_per_token": mean(2) / layers,
        }
        for layer in range(layers):
            load = torch.stack([rows[layer][3] for rows in window]).mean(0)
            stats[f"router/layer_{layer}/load_max_over_mean"] = (load.max() / load.mean()).item()
        return stats


def _moe_config(model):
    """The hf-moe config under PEFT/DDP wrappers."""
    while not hasattr(model, "moe_blocks"):
        model = getattr(model, "module", None) or model.get_base_model()
    return model.config


def _write_heatmap(load, names, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, experts = load.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * experts + 2), max(3, 0.35 * layers + 1.5)))
    image = ax.imshow(load.numpy(), aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(experts))
    ax.set_yticks(range(layers), [_short(name) for name in names])
    ax.set_title("fraction of tokens routed to each expert")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _short(module_name: str) -> str:
    parts = [p for p in module_name.split(".") if p.isdigit()]
    stack = "dec" if ".decoder." in module_name else "enc" if ".encoder." in module_name else ""
    return f"{stack}{parts[0]}" if parts else module_name
