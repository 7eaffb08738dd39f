"""Router telemetry for `Trainer`: logs what the routers do, drives HyperRouter's k schedule, and writes an
expert-usage heatmap and a JSON of the statistics at the end of training."""

import contextlib
import json
import os

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..modeling import MoeFeedForward, MoePreTrainedModel

# columns of the per-layer statistics of one forward: aux loss, router entropy, experts per token, then expert loads
AUX, ENTROPY, EXPERTS, LOAD = 0, 1, 2, slice(3, None)


def hyperrouter_k(step: int, max_steps: int, k_min: int, k_max: int) -> int:
    """HyperRouter's schedule (official `new_utils.calculate_gate_number`): k rises linearly from k_min to k_max."""
    k = round((k_max - k_min) * step / max(max_steps, 1)) + k_min
    return min(max(k, k_min), k_max)


class RouterTelemetryCallback(TrainerCallback):
    """Adds to every training log the summed aux loss, mean experts per token and the max/mean expert load of the
    most unbalanced MoE layer (the console line shows these three); the log history (`state.log_history`) also gets
    the mean router entropy and every layer's max/mean load. With `k_schedule=(k_min, k_max)` it sets
    `num_experts_per_tok` before every step.

    At the end of training it writes `router_stats.json` (per-layer mean expert load, entropy, experts per token over
    the whole run) and `expert_usage.png` (layers x experts heatmap) into `output_dir` (default: the Trainer's).
    Statistics come from the forward passes of training steps, padding excluded, averaged over forwards. Under
    distributed training they are summed over the processes first, so every process logs the global figures, and
    the main process alone writes the files.

    The statistics are read from what each training forward returns (`router_stats`), by a forward hook on the
    model that the callback holds from the start to the end of training.
    """

    def __init__(self, k_schedule: tuple[int, int] | None = None, output_dir: str | None = None):
        self.k_schedule = k_schedule
        self.output_dir = output_dir
        self._layer_names = None
        self._window, self._window_forwards = None, 0  # sums of [layers, 3 + experts] since the last log
        self._totals, self._forwards = None, 0  # the same over the whole run
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        moe_model = _moe_model(model)
        self._layer_names = [name for name, m in moe_model.named_modules() if isinstance(m, MoeFeedForward)]
        self._hook = moe_model.register_forward_hook(self._collect)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.k_schedule is not None:
            config = _moe_model(model).config
            config.num_experts_per_tok = hyperrouter_k(state.global_step, state.max_steps, *self.k_schedule)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self._window is None or logs is None or "loss" not in logs:
            return
        sums, forwards = _sum_over_processes(self._window, self._window_forwards, args.device)
        self._window, self._window_forwards = None, 0
        stats = _summarise(sums / forwards)
        logs.update({key: stats[key] for key in CONSOLE_KEYS})
        if state.log_history:
            state.log_history[-1].update(stats)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._totals is None:
            return
        self._totals, self._forwards = _sum_over_processes(self._totals, self._forwards, args.device)
        if not state.is_world_process_zero:
            return
        output_dir = self.output_dir or args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        mean = self._totals / self._forwards
        stats = {
            "forwards": self._forwards,
            "layers": self._layer_names,
            "expert_load": mean[:, LOAD].tolist(),
            "entropy": mean[:, ENTROPY].tolist(),
            "experts_per_token": mean[:, EXPERTS].tolist(),
        }
        with _replaced_when_complete(os.path.join(output_dir, "router_stats.json")) as path, open(path, "w") as f:
            json.dump(stats, f, indent=2)
        family = _moe_model(model).config.model_type
        figure = expert_usage_figure(mean[:, LOAD], self._layer_names, family, state.global_step)
        with _replaced_when_complete(os.path.join(output_dir, "expert_usage.png")) as path:
            figure.savefig(path, dpi=120, format="png")

    def mean_experts_per_token(self) -> float | None:
        """Experts per token over every training forward so far, averaged over MoE layers (None before training)."""
        if self._totals is None:
            return None
        return float(self._totals[:, EXPERTS].mean() / self._forwards)

    def _collect(self, model, args, output):
        """Forward hook: adds the per-layer statistics of one training forward (its MoE layers, in call order)."""
        stats = getattr(output, "router_stats", None)
        if not model.training or not stats:
            return
        rows = torch.stack([
            torch.cat([o.aux_loss.view(1), o.entropy_loss.view(1), o.mean_experts_per_token.view(1), o.expert_load])
            for o in stats
        ]).detach().double().cpu()  # [layers, 3 + experts]
        self._window = rows if self._window is None else self._window + rows
        self._totals = rows if self._totals is None else self._totals + rows
        self._window_forwards += 1
        self._forwards += 1


CONSOLE_KEYS = ("router/aux_loss", "router/experts_per_token", "router/load_max_over_mean")


def _summarise(mean) -> dict:
    """Log figures from the per-layer statistics averaged over forwards ([layers, 3 + experts])."""
    load = mean[:, LOAD]
    balance = load.max(1).values / load.mean(1)
    stats = {
        "router/aux_loss": mean[:, AUX].sum().item(),
        "router/entropy": mean[:, ENTROPY].mean().item(),
        "router/experts_per_token": mean[:, EXPERTS].mean().item(),
        "router/load_max_over_mean": balance.max().item(),
    }
    stats.update({f"router/layer_{layer}/load_max_over_mean": value.item() for layer, value in enumerate(balance)})
    return stats


def _sum_over_processes(sums: torch.Tensor, count: int, device) -> tuple[torch.Tensor, int]:
    """(sums, count) added over the processes of a distributed run; as given in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums, count
    packed = torch.cat([sums.flatten(), sums.new_tensor([count])]).to(device)
    dist.all_reduce(packed)
    packed = packed.cpu()
    return packed[:-1].view_as(sums), int(packed[-1].item())


@contextlib.contextmanager
def _replaced_when_complete(path):
    """Yields a temporary path next to `path`, renamed onto `path` once the block completes (removed if it fails)."""
    partial = f"{path}.partial"
    try:
        yield partial
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _moe_model(model) -> MoePreTrainedModel:
    """The hf-moe model under PEFT/DDP wrappers."""
    while not isinstance(model, MoePreTrainedModel):
        model = getattr(model, "module", None) or model.get_base_model()
    return model


def expert_usage_figure(load, layer_names, family: str, step: int):
    """Heatmap of the fraction of tokens each expert received per MoE layer ([layers, experts]), coloured around the
    balanced level (every row sums to the experts per token, so a balanced expert receives that sum / experts)."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    load = torch.as_tensor(load, dtype=torch.float64)
    layers, experts = load.shape
    balanced = load.sum(1).mean().item() / experts
    fig = Figure(figsize=(max(5, 0.5 * experts + 3), max(3, 0.35 * layers + 1.5)))
    ax = fig.subplots()
    norm = TwoSlopeNorm(vmin=0.0, vcenter=balanced, vmax=max(load.max().item(), 2 * balanced))
    image = ax.imshow(load.numpy(), aspect="auto", cmap="RdBu_r", norm=norm)  # white = balanced, red = overloaded
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(experts))
    ax.set_yticks(range(layers), [_short(name) for name in layer_names])
    ax.set_title(f"{family}: expert load at step {step}")
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label(f"fraction of tokens routed to the expert\n(line: balanced load {balanced:.3g})")
    colorbar.ax.axhline(balanced, color="black", linewidth=1.5)
    fig.tight_layout()
    return fig


def _short(module_name: str) -> str:
    parts = [p for p in module_name.split(".") if p.isdigit()]
    stack = "dec" if ".decoder." in module_name else "enc" if ".encoder." in module_name else ""
    return f"{stack}{parts[0]}" if parts else module_name


class RoutingProbe:
    """While held (`with RoutingProbe(model) as probe:`), measures what the MoE layers of `model` select in every
    forward, padding excluded: `probe.figures()` returns experts per token (MH-MoE: the distinct experts of a token's
    sub-tokens), those as a fraction of the experts, the fraction of experts a sequence activates (any of its tokens
    selects them; mean over sequences and layers), and for HyperMoE the HyperExpert's share, the RMS of its output
    over the RMS of the selected experts' output. These are the quantities the papers' claims are about
    (docs/evaluation.md §3)."""

    def __init__(self, model):
        self.layers = [block.moe for block in _moe_model(model).moe_blocks()]
        self._hooks = []
        self._sums = dict.fromkeys(("token_experts", "tokens", "sequence_fraction", "sequences"), 0.0)
        self._squares = dict.fromkeys(("hyper", "experts"), 0.0)

    def __enter__(self):
        self._hooks = [layer.register_forward_hook(self._collect) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @torch.no_grad()
    def _collect(self, layer, args, output):
        hidden_states, padding_mask = args[0], (args[1] if len(args) > 1 else None)
        tokens = hidden_states.shape[:-1].numel()
        sequences = hidden_states.shape[:-2].numel() if hidden_states.dim() > 2 else 1
        index = output.expert_index.view(sequences, tokens // sequences, -1)  # [B, S, h*k]: a token's sub-tokens
        chosen = torch.zeros(*index.shape[:2], layer.num_experts + 1, dtype=torch.bool, device=index.device)
        chosen.scatter_(-1, index, True)
        chosen = chosen[..., : layer.num_experts]  # [B, S, E]; the sentinel E (no expert) dropped
        real = torch.ones(index.shape[:2], dtype=torch.bool, device=index.device)
        if padding_mask is not None:
            real = padding_mask.reshape(real.shape).bool()
        chosen = chosen & real[..., None]
        self._sums["token_experts"] += chosen.sum().item()
        self._sums["tokens"] += real.sum().item()
        has_tokens = real.any(-1)  # [B]
        per_sequence = chosen.any(1).sum(-1) / layer.num_experts  # [B]
        self._sums["sequence_fraction"] += per_sequence[has_tokens].sum().item()
        self._sums["sequences"] += has_tokens.sum().item()
        if hasattr(layer, "hyper_expert"):
            x = hidden_states.reshape(-1, layer.hidden_size)
            hyper = layer.hyper_expert(x, output.expert_index)  # [T, d]
            experts = output.hidden_states.reshape(-1, layer.hidden_size) - hyper
            keep = real.reshape(-1)
            self._squares["hyper"] += hyper[keep].double().square().sum().item()
            self._squares["experts"] += experts[keep].double().square().sum().item()

    def figures(self) -> dict[str, float]:
        """The figures over every forward so far ({} before any)."""
        sums = self._sums
        if not sums["tokens"]:
            return {}
        experts = self.layers[0].num_experts
        per_token = sums["token_experts"] / sums["tokens"]
        figures = {
            "experts_per_token": per_token,
            "token_expert_fraction": per_token / experts,
            "sequence_expert_fraction": sums["sequence_fraction"] / sums["sequences"],
        }
        if self._squares["experts"]:
            figures["hyper_expert_share"] = (self._squares["hyper"] / self._squares["experts"]) ** 0.5
        return figures
