"""Per-process memory and step time of an hf-moe model on transformers' distributed engine, 1 vs 2 processes.

    python -m benchmarks.distributed            # TopKMoe over llama, d=256, 4 layers, 8 experts (~2 min)
    python -m benchmarks.distributed --quick    # d=64, 2 layers (~40 s)

For each layout (one process; then 2 processes with tp_size=2, ep_size=2 + fsdp_size=2, fsdp_size=2) a torchrun job
loads the same saved checkpoint and reports, per rank: parameter bytes held (local shards), activation bytes (every
tensor autograd saves for backward in one forward, counted through `saved_tensors_hooks`) and the median time of a
training step (forward, backward, SGD) on a batch of its own. On 2 CPU cores the times are for reference only
(2 processes share the cores); memory is the figure that matters. CPU only for now.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._common import RESULTS, machine_info

LAYOUTS = {
    "1 process": None,
    "tp_size=2": {"tp_size": 2},
    "ep_size=2, fsdp_size=2": {"ep_size": 2, "fsdp_size": 2},
    "fsdp_size=2": {"fsdp_size": 2},
}


def save_model(folder: Path, hidden: int, layers: int, experts: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    import hf_moe  # noqa: F401

    text_config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=4 * hidden,
                              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    config = AutoConfig.for_model("topk_moe", text_config=text_config, num_experts=experts, num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def worker(folder: str, layout: str, rounds: int, batch: int, seq: int, output: str):
    """One rank: memory and step time of the model in `folder` loaded with `layout` (JSON sizes or "null")."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import hf_moe  # noqa: F401

    torch.set_num_threads(1)
    sizes = json.loads(layout)
    kwargs = {"distributed_config": DistributedConfig(**sizes)} if sizes else {}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    param_bytes = sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters())
    input_ids = torch.randint(0, 1024, (batch, seq), generator=torch.Generator().manual_seed(rank))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.zero_grad()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    result = {"param_bytes": param_bytes, "activation_bytes": sum(saved), "step_s": statistics.median(times)}
    Path(f"{output}.rank{rank}").write_text(json.dumps(result))


def run_layout(folder: Path, sizes, rounds: int, batch: int, seq: int, scratch: Path) -> list[dict]:
    output = scratch / f"result-{len(list(scratch.iterdir()))}"
    arguments = ["-m", "benchmarks.distributed", "--worker", str(folder), json.dumps(sizes), str(rounds), str(batch),
                 str(seq), str(output)]
    if sizes:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
                   *arguments]
    else:
        command = [sys.executable, *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True)
    return [json.loads(Path(f"{output}.rank{rank}").read_text()) for rank in range(2 if sizes else 1)]


def markdown(results: dict, setting: str) -> str:
    lines = [f"Per-process memory and step time, {setting}.", "",
             "| layout | rank | parameters (MiB) | activations (MiB) | step (ms) |", "|---|---:|---:|---:|---:|"]
    for layout, ranks in results.items():
        for rank, r in enumerate(ranks):
            lines.append(f"| {layout} | {rank} | {r['param_bytes'] / 2**20:.2f} | {r['activation_bytes'] / 2**20:.2f} "
                         f"| {r['step_s'] * 1000:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (d=64, 2 layers)")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        folder, layout, rounds, batch, seq, output = args.worker
        worker(folder, layout, int(rounds), int(batch), int(seq), output)
        return 0
    hidden, layers, experts, rounds, batch, seq = (64, 2, 4, 3, 4, 32) if args.quick else (256, 4, 8, 10, 8, 128)
    setting = (f"TopKMoe over llama, d={hidden}, {layers} layers, {experts} experts, top-2, fp32, batch {batch} x "
               f"{seq} tokens per process, median of {rounds} steps")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        save_model(folder, hidden, layers, experts)
        runs = Path(scratch) / "runs"
        runs.mkdir()
        results = {layout: run_layout(folder, sizes, rounds, batch, seq, runs) for layout, sizes in LAYOUTS.items()}
    name = "distributed_quick" if args.quick else "distributed"
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine_info(), "setting": setting,
                                                      "results": results}, indent=2))
    table = markdown(results, setting)
    (RESULTS / f"{name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
