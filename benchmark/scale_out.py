"""Wall time and peak memory per process of ppo_rlhf.py in each launch mode of docs/scale_out.md, on this machine.

    python benchmark/scale_out.py                              # embedded tiny models (~0.5M parameters each)
    python benchmark/scale_out.py --size wide                  # random GPT-NeoX, hidden 512 x 8 layers (~26M each)
    python benchmark/scale_out.py --modes ddp zero3 --repeats 2

Every mode trains the same global batch (64 rollouts per update, micro-batches of 16, for `tiny`; 16 rollouts of
micro-batch 4 for `wide`) from the same seed. Each worker process runs under this file's wrapper (`scale_out.py
--worker SCRIPT ARGS...`), which runs the script with runpy and appends its own getrusage(RUSAGE_SELF).ru_maxrss at
exit: the peak resident memory of each process, not of the launcher. Wall time is the whole launch, start-up
(imports, process group, DeepSpeed engines) included; `s/update` is the median of the script's own `time/update`.

Results: a markdown table printed and written, with a JSON of every run, to benchmark/results/scale_out_<size>.md/.json.
The `wide` models (random weights, the embedded tokenizer) are built once in models/scale_out_wide (ignored by git).
"""

import argparse
import json
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import time

import common
from common import ROOT

CONFIGS = os.path.join(ROOT, "benchmark", "accelerate_configs")


def launcher(kind):
    if kind == "python":
        return []
    config = {"ddp": "multi_gpu.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3_cpu.yaml"}[kind]
    return ["-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIGS, config), "--num_processes", "2"]


# name: (launcher, processes, extra ppo_rlhf.py flags)
MODES = {
    "single": ("python", 1, []),
    "ddp": ("ddp", 2, []),
    "zero2": ("zero2", 2, []),
    "zero3": ("zero3", 2, []),
    "zero3_sharded_generation": ("zero3", 2, ["--no-ds3-gather-for-generation"]),
    "lora_single": ("python", 1, ["--use-peft"]),
    "lora_ddp": ("ddp", 2, ["--use-peft"]),
    "lora_zero3": ("zero3", 2, ["--use-peft"]),
}


def build_wide(folder):
    """A random GPT-NeoX policy and reward model, hidden 512 x 8 layers, on the embedded tokenizer."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    if os.path.exists(os.path.join(folder, "reward_model", "config.json")):
        return
    import torch

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "embedded", "sft_model"))
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        intermediate_size=2048,
        max_position_embeddings=512,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    for name, cls, extra in (
        ("sft_model", GPTNeoXForCausalLM, {}),
        ("reward_model", GPTNeoXForSequenceClassification, {"num_labels": 1}),
    ):
        fields = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
        model = cls(GPTNeoXConfig(**fields, **extra))
        model.save_pretrained(os.path.join(folder, name))
        tokenizer.save_pretrained(os.path.join(folder, name))


def run_mode(name, size, out_root, repeat):
    kind, processes, extra = MODES[name]
    out = os.path.join(out_root, f"{name}_{repeat}")
    rss_file = out + ".rss.jsonl"
    shutil.rmtree(out, ignore_errors=True)
    if os.path.exists(rss_file):
        os.remove(rss_file)
    if size == "tiny":
        batch = [
            "--total-episodes",
            "256",
            "--per-device-train-batch-size",
            "16",
            "--gradient-accumulation-steps",
            str(4 // processes),
            "--local-rollout-forward-batch-size",
            "64",
        ]
    else:
        wide = os.path.join(ROOT, "models", "scale_out_wide")
        batch = [
            "--total-episodes",
            "32",
            "--per-device-train-batch-size",
            "4",
            "--gradient-accumulation-steps",
            str(4 // processes),
            "--local-rollout-forward-batch-size",
            "16",
            "--response-length",
            "32",
            "--sft-model-path",
            os.path.join(wide, "sft_model"),
            "--model-name-or-path",
            os.path.join(wide, "sft_model"),
            "--reward-model-path",
            os.path.join(wide, "reward_model"),
        ]
    cmd = [sys.executable, *launcher(kind)]
    if kind != "python":
        cmd += ["--main_process_port", common.free_port()]
    cmd += [
        os.path.abspath(__file__),
        "--worker",
        os.path.join(ROOT, "ppo_rlhf.py"),
        *batch,
        *extra,
        "--num-sample-generations",
        "0",
        "--eval-strategy",
        "no",
        "--output-dir",
        out,
    ]
    env = common.run_env(1, SCALE_OUT_RSS_FILE=rss_file)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rss = sorted(common.read_jsonl(rss_file), key=lambda r: r["rank"])
    rows = [r for r in common.read_jsonl(os.path.join(out, "metrics.jsonl")) if "objective/kl" in r]
    params = next(line for line in proc.stdout.splitlines() if line.startswith("parameters:"))
    return {
        "mode": name,
        "processes": processes,
        "wall_s": wall,
        "peak_rss_mb": [r["maxrss_mb"] for r in rss],
        "s_per_update": statistics.median(r["time/update"] for r in rows),
        "episodes": rows[-1]["episode"],
        "parameters": params,
        "command": " ".join(cmd),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["tiny", "wide"], default="tiny")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--results-dir", default=os.path.join(ROOT, "benchmark", "results"))
    parser.add_argument("--results-name", default=None, help="file name stem (default: scale_out_<size>)")
    args = parser.parse_args()
    if args.size == "wide":
        build_wide(os.path.join(ROOT, "models", "scale_out_wide"))
    out_root = os.path.join(ROOT, "models", f"scale_out_runs_{args.size}")
    runs = []
    for repeat in range(args.repeats):
        for name in args.modes:
            runs.append(run_mode(name, args.size, out_root, repeat))
            r = runs[-1]
            print(
                f"{name}: {r['wall_s']:.0f}s wall, {r['s_per_update']:.2f} s/update, peak RSS per process "
                f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mb'])} MB",
                flush=True,
            )
    lines = ["| mode | processes | wall time (s) | s/update | peak RSS per process (MB) |", "|---|---|---|---|---|"]
    for name in args.modes:
        mine = [r for r in runs if r["mode"] == name]
        lines.append(
            f"| {name} | {mine[0]['processes']} | {statistics.median(r['wall_s'] for r in mine):.0f} | "
            f"{statistics.median(r['s_per_update'] for r in mine):.2f} | "
            + " / ".join(
                f"{statistics.median(r['peak_rss_mb'][i] for r in mine):.0f}" for i in range(mine[0]["processes"])
            )
            + " |"
        )
    results = {"load_average_at_end": os.getloadavg(), "runs": runs}
    stem = args.results_name or f"scale_out_{args.size}"
    common.write_results(args.results_dir, stem, results, "\n".join(lines) + "\n", "scale_out")


def worker():
    """Run SCRIPT ARGS... as __main__ and record this process's peak resident memory at exit."""
    import atexit

    def record():
        with open(os.environ["SCALE_OUT_RSS_FILE"], "a") as f:
            f.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "maxrss_mb": common.peak_rss_mib()}) + "\n")

    atexit.register(record)
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    worker() if len(sys.argv) > 1 and sys.argv[1] == "--worker" else main()
