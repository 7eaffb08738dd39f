"""Conversion benchmark: streaming `hf_moe.conversion.upcycle` of a generated dense fp32 Llama checkpoint (>= 4 GB in
full mode) into `topk_moe` with 8 experts, against copying and writing the same number of output bytes.

    python -m benchmarks.conversion            # full: 4.4 GB source, 21 GB output, 2 rounds (~7 min, 30 GB disk)
    python -m benchmarks.conversion --quick    # ~60 MB source, 10 interleaved rounds (< 1 min)

Steps (all under a temporary folder in /tmp, deleted at the end, also on error):
1. check free disk space (`shutil.disk_usage`); in full mode the layer count shrinks if the disk is short (reported);
2. build a random LlamaForCausalLM on the meta device, materialise it, fill it N(0, 0.02), `save_pretrained` with
   1 GB shards (the source);
3. per round, each in a fresh subprocess that times its own work (after its imports) up to the end of an `os.sync()`
   (so page-cache writeback is charged to the operation that dirtied it); peak RSS is the child's ru_maxrss from
   `os.wait4` (the parent never imports torch, so the forked child's pre-exec RSS stays small). Full mode runs the
   three children once per round, round after round; --quick runs each child once with all rounds inside:
   - convert: `upcycle(source, out, "topk_moe", num_experts=8, num_experts_per_tok=2, max_shard_size=1 GB)`;
   - copy: `shutil.copyfile` of every output file to a sibling folder, each copy deleted right after it is made
     (deletion not timed) so the disk never holds a second full output;
   - write: the same number of bytes per output file written from one reused 64 MB buffer, no computation (the I/O
     floor), deleted the same way.
Targets: peak RSS of the conversion <= 3 x the largest output shard; conversion time <= 3 x the plain copy.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._common import fmt_ratio, load_average, machine_info, machine_markdown, md_table, write_results

GB = 1024**3

# Each child imports once, then runs `repeats` rounds, timing each from start to the end of an `os.sync()`.
CONVERT = """
import os, shutil, sys, time, logging, resource
import torch
torch.set_num_threads(2)
logging.disable(logging.WARNING)
from hf_moe.conversion import upcycle
source, out, shard, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
print("BASELINE_RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
for r in range(repeats):
    if os.path.exists(out):
        shutil.rmtree(out)
    os.sync()
    t0 = time.perf_counter()
    upcycle(source, out, "topk_moe", num_experts=8, num_experts_per_tok=2, max_shard_size=shard, progress=False)
    t1 = time.perf_counter()
    os.sync()
    print("SECONDS", time.perf_counter() - t0, "CALL_SECONDS", t1 - t0, flush=True)
"""

COPY = """
import os, shutil, sys, time
src, dst, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs(dst)
for r in range(repeats):
    total = 0.0
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path):
            t0 = time.perf_counter()
            shutil.copyfile(path, os.path.join(dst, name))
            os.sync()
            total += time.perf_counter() - t0
            os.remove(os.path.join(dst, name))  # never a second full output on disk (not timed)
    print("SECONDS", total, flush=True)
"""

WRITE = """
import os, sys, json, time
sizes, dst, repeats = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
os.makedirs(dst)
buffer = bytearray(64 * 1024 * 1024)
for r in range(repeats):
    total = 0.0
    for name, size in sizes.items():
        path = os.path.join(dst, name)
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, len(buffer))
                f.write(memoryview(buffer)[:n])
                left -= n
        os.sync()
        total += time.perf_counter() - t0
        os.remove(path)
    print("SECONDS", total, flush=True)
"""

GENERATE = """
import sys, json, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(2)
config = LlamaConfig(**json.loads(sys.argv[1]))
with torch.device("meta"):
    model = LlamaForCausalLM(config)
model.to_empty(device="cpu")
generator = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)
model.save_pretrained(sys.argv[2], max_shard_size=int(sys.argv[3]))
"""


def llama_config(layers, quick) -> dict:
    if quick:
        return dict(vocab_size=4000, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    return dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)


def sizes_for(layers, quick):
    """(source bytes, output bytes) of a fp32 Llama with `layers` layers, upcycled to 8 experts."""
    c = llama_config(layers, quick)
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    attn, ffn, norms = 4 * h * h, 3 * h * i, 2 * h
    dense = 4 * (layers * (attn + ffn + norms) + 2 * v * h + h)
    moe = 4 * (layers * (attn + 8 * ffn + 8 * h + norms) + 2 * v * h + h)
    return dense, moe


def run_child(code, *argv):
    """Run `python -c code argv...`; return (wall seconds incl. interpreter start, peak RSS bytes, {key: value}).

    The parent never imports torch, so the forked child's pre-exec RSS (counted in ru_maxrss) stays small."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], stdout=subprocess.PIPE, text=True)
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = proc.stdout.read()
    proc.stdout.close()
    os.sync()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"child failed with exit code {proc.returncode}: {stdout[-2000:]}")
    values = {}
    words = stdout.split()
    for key, value in zip(words, words[1:]):
        if key.isupper():
            values.setdefault(key, []).append(float(value))
    return seconds, rusage.ru_maxrss * 1024, values  # Linux reports ru_maxrss in KiB


def folder_bytes(folder):
    return {p.name: p.stat().st_size for p in sorted(Path(folder).iterdir()) if p.is_file()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layers", type=int, default=None, help="Llama layers (default 18 full / 2 quick)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 1 full / 10 quick)")
    parser.add_argument("--tmp", default="/tmp", help="where the temporary folder goes")
    args = parser.parse_args()
    info = machine_info()
    info["torch_threads"] = 2  # set in every child
    quick = args.quick
    layers = args.layers or (2 if quick else 19)  # 19 layers: 4.41e9 bytes (4.1 GiB) of fp32 weights
    repeats = args.repeats or (10 if quick else 2)  # full: ~3 min per round (convert, copy, write ~20 GB each)
    shard = 16 * 1024**2 if quick else GB
    free = shutil.disk_usage(args.tmp).free
    note = None
    dense_bytes, moe_bytes = sizes_for(layers, quick)
    # source + output + one copied shard + margin
    while dense_bytes + moe_bytes + 2 * shard + 2 * GB > free and layers > 1:
        layers -= 1
        dense_bytes, moe_bytes = sizes_for(layers, quick)
        note = f"disk short ({free / GB:.1f} GB free): reduced to {layers} layers"
    if note:
        print(note)
    print(f"free disk {free / GB:.1f} GB; planned source {dense_bytes / GB:.2f} GB, output {moe_bytes / GB:.2f} GB")
    config = llama_config(layers, quick)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="hf_moe_conversion_bench_", dir=args.tmp) as tmp:
        source = Path(tmp) / "dense"
        generate_s, _, _ = run_child(GENERATE, json.dumps(config), source, shard)
        source_files = folder_bytes(source)
        source_total = sum(v for k, v in source_files.items() if k.endswith(".safetensors"))
        print(f"source written: {source_total / GB:.2f} GB in {generate_s:.0f} s")
        out = Path(tmp) / "moe"
        # full mode: one child of each kind per round, rounds interleaved; quick: each child runs all rounds
        outer, inner = (1, repeats) if quick else (repeats, 1)
        convert, copy, write, convert_rss, copy_rss, write_rss, command_s = {}, {}, {}, 0, 0, 0, 0.0
        for r in range(outer):
            seconds, rss, values = run_child(CONVERT, source, out, shard, inner)
            command_s, convert_rss = command_s + seconds, max(convert_rss, rss)
            output_files = folder_bytes(out)
            _, rss2, values2 = run_child(COPY, out, Path(tmp) / f"copy{r}", inner)
            _, rss3, values3 = run_child(WRITE, json.dumps(output_files), Path(tmp) / f"write{r}", inner)
            copy_rss, write_rss = max(copy_rss, rss2), max(write_rss, rss3)
            for target, new in ((convert, values), (copy, values2), (write, values3)):
                for key, value in new.items():
                    target.setdefault(key, []).extend(value)
            if r + 1 < outer:
                shutil.rmtree(out)
            print(f"round {r + 1}/{outer}: convert {values['SECONDS']} s (RSS {rss / GB:.2f} GB), copy "
                  f"{values2['SECONDS']} s, write {values3['SECONDS']} s, load {load_average()}", flush=True)
        rounds = [{"convert_s": convert["SECONDS"][r], "upcycle_call_s": convert["CALL_SECONDS"][r],
                   "copy_s": copy["SECONDS"][r], "write_s": write["SECONDS"][r]} for r in range(repeats)]
    info["load_average_end"] = load_average()
    shards = {k: v for k, v in output_files.items() if k.endswith(".safetensors")}
    largest = max(shards.values())
    output_total = sum(shards.values())

    def stat(key):
        values = [r[key] for r in rounds]
        return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}

    def ratio(a, b):
        values = [r[a] / r[b] for r in rounds]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    result = {
        "layers": layers, "note": note, "config": config, "source_bytes": source_total,
        "source_shards": len([k for k in source_files if k.endswith(".safetensors")]),
        "output_bytes": output_total, "output_shards": len(shards), "largest_output_shard": largest,
        "max_shard_size": shard, "generate_source_s": generate_s, "rounds": rounds,
        "convert_s": stat("convert_s"), "upcycle_call_s": stat("upcycle_call_s"), "convert_command_s": command_s,
        "baseline_rss": convert["BASELINE_RSS"][0], "convert_peak_rss": convert_rss, "copy_s": stat("copy_s"),
        "write_s": stat("write_s"), "copy_peak_rss": copy_rss, "write_peak_rss": write_rss,
        "convert_vs_copy": ratio("convert_s", "copy_s"), "convert_vs_write": ratio("convert_s", "write_s"),
        "rss_vs_largest_shard": convert_rss / largest,
        "rss_above_imports_vs_largest_shard": (convert_rss - convert["BASELINE_RSS"][0]) / largest,
    }
    result["targets"] = [
        {"target": "peak RSS <= 3 x largest output shard", "value": result["rss_vs_largest_shard"], "bound": 3.0,
         "pass": None if quick else result["rss_vs_largest_shard"] <= 3.0},
        {"target": "(info) peak RSS above the imports' RSS <= 3 x largest output shard",
         "value": result["rss_above_imports_vs_largest_shard"], "bound": 3.0,
         "pass": result["rss_above_imports_vs_largest_shard"] <= 3.0},
        {"target": "time <= 3 x plain copy of the output bytes", "value": result["convert_vs_copy"]["median"],
         "bound": 3.0, "pass": result["convert_vs_copy"]["median"] <= 3.0},
        {"target": "(info, stricter) time <= 3 x writing the output bytes",
         "value": result["convert_vs_write"]["median"], "bound": 3.0,
         "pass": result["convert_vs_write"]["median"] <= 3.0},
    ]
    payload = {"benchmark": "conversion", "machine": info, "quick": quick, "result": result}
    write_results("conversion", payload, markdown(result, info, quick), quick)


def markdown(res, info, quick):
    def t(s):
        return f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})" if s["n"] > 1 else f"{s['median']:.1f}"

    def gb(x):
        return f"{x / GB:.2f} GiB"

    c = res["config"]
    parts = [
        "# Conversion benchmark", "", machine_markdown(info), "",
        f"Command: `python -m benchmarks.conversion{' --quick' if quick else ''}`. Source: random fp32 Llama "
        f"(hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, {res['layers']} layers, vocab "
        f"{c['vocab_size']}), {gb(res['source_bytes'])} in {res['source_shards']} shards; output `topk_moe`, "
        f"8 experts, top-2, max_shard_size {gb(res['max_shard_size'])}: {gb(res['output_bytes'])} in "
        f"{res['output_shards']} shards, largest {gb(res['largest_output_shard'])}. {len(res['rounds'])} round(s); "
        "every operation runs in its own subprocess and is timed there up to and including `os.sync()`; peak RSS is "
        "the child's ru_maxrss."
        + (f" Note: {res['note']}." if res["note"] else ""), "",
        md_table(["operation", "seconds", "peak RSS", "vs plain copy", "vs pure write"], [
            ["upcycle() call + sync (in the child, after imports)", t(res["convert_s"]),
             f"{gb(res['convert_peak_rss'])} ({gb(res['baseline_rss'])} after imports)",
             fmt_ratio(res["convert_vs_copy"]), fmt_ratio(res["convert_vs_write"])],
            ["  the upcycle() call alone (before sync)", t(res["upcycle_call_s"]), "", "", ""],
            ["plain copy of the output files (shutil.copyfile + sync)", t(res["copy_s"]), gb(res["copy_peak_rss"]),
             "1.00", ""],
            ["writing the output bytes, no computation (+ sync)", t(res["write_s"]), gb(res["write_peak_rss"]), "",
             "1.00"],
        ]), "",
        f"Throughput of the conversion: {res['output_bytes'] / GB / res['convert_s']['median']:.2f} GiB/s written "
        f"({res['source_bytes'] / GB / res['convert_s']['median']:.2f} GiB/s of source read); source "
        f"{res['source_bytes'] / 1e9:.2f} GB = {res['source_bytes'] / GB:.2f} GiB. Generating the source took "
        f"{res['generate_source_s']:.0f} s; the conversion child, interpreter start and imports included, "
        f"{res['convert_command_s']:.0f} s for {len(res['rounds'])} round(s)."
        + (" In --quick mode the RSS target is not meaningful: the interpreter with torch and transformers imported "
           "already holds ~0.4 GB, far more than 3 x a 16 MB shard." if quick else ""), "",
        md_table(["target", "measured", "bound", "result"], [
            [
                x["target"],
                f"{x['value']:.2f}",
                x["bound"],
                "n/a (quick)" if x["pass"] is None else "pass" if x["pass"] else "**miss**",
            ]
            for x in res["targets"]
        ]), "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
