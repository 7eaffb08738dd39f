"""Run by tests/test_distributed.py under torchrun (2 processes, gloo): for each saved family checkpoint, loaded with
a `DistributedConfig`, writes per rank its logits on a padded batch, the local shapes and bytes of its parameters,
and its full weights after one SGD step on its share of a global batch; and saves the loaded model under
`<output>.saved`."""

import json
import os
import sys

import torch
import torch.distributed as dist
from distributed_data import LR, global_batch, padded_batch
from transformers.distributed import DistributedConfig

import hf_moe


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _data_parallel_rank(model) -> tuple[int, int]:
    """(rank, size) of this process among those holding different batches (1 process without data parallelism)."""
    config = model.config.distributed_config
    if config.dp_size <= 1:
        return 0, 1
    mesh = model._mesh_manager.get_mesh("fsdp")
    return mesh.get_local_rank(), mesh.size()


def run(folder: str, layout: dict, save_to: str) -> dict:
    model_class = getattr(hf_moe, json.loads(open(f"{folder}/config.json").read())["architectures"][0])
    model = model_class.from_pretrained(folder, distributed_config=DistributedConfig(**layout)).eval()
    model.save_pretrained(f"{save_to}/{os.path.basename(folder)}")
    dist.barrier()
    with torch.no_grad():
        logits = _full(model(**padded_batch()).logits)
    result = {
        "logits": logits.tolist(),
        "shapes": {name: list(_local(param).shape) for name, param in model.named_parameters()},
        "bytes": sum(_local(param).nbytes for param in model.parameters()),
    }
    rank, size = _data_parallel_rank(model)
    input_ids = global_batch().chunk(size)[rank]
    model.train()
    output = model(input_ids=input_ids, labels=input_ids)
    output.loss.backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    result["aux_loss"] = output.aux_loss.item()
    result["weights"] = {name: _full(param.detach()).tolist() for name, param in model.named_parameters()}
    return result


def main(folders: list[str], layout: dict, output: str):
    results = {folder: run(folder, layout, f"{output}.saved") for folder in folders}
    with open(f"{output}.rank{dist.get_rank()}", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1].split(","), json.loads(sys.argv[2]), sys.argv[3])
