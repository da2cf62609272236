"""What the benchmark scripts share: the repository's paths, the environment of the runs they start, one run timed
(with its peak memory) and logged, the machine a result was measured on, the TRL interpreter, the flags of
ppo_rlhf.py and of TRL's runner for the same settings, and the results files.

Imported as `import common` by the scripts in benchmark/ (Python puts a script's own folder on sys.path); importing it
puts the repository root on sys.path too, for `import ppo_rlhf`, `judge` and `tiny_tldr`."""

import hashlib
import json
import os
import platform
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED = os.path.join(ROOT, "embedded")
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
TLDR_PROMPTS = os.path.join(SHARED_DATA, "tldr", "tldr_valid_subset_prompt_completion.jsonl")
NEOX_TOKENIZER = os.path.join(SHARED_DATA, "tokenizers", "gpt-neox-20b_tokenizer.json")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def fail(message: str) -> None:
    sys.exit(f"error: {message}")


def run_env(num_threads: int, work_dir: Optional[str] = None, **extra: str) -> dict:
    """The environment of a run: this one's, offline, `num_threads` threads (OMP and MKL), W&B files in work_dir."""
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(num_threads), "MKL_NUM_THREADS": str(num_threads)}
    if work_dir:
        env["WANDB_DIR"] = os.path.abspath(work_dir)
    return {**env, **extra}


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# ----------------------------------------------------------------------------------------------------------------
# Running a command


def run_logged(cmd: List[str], env: dict, log_path: str, timeout: int, shown: Optional[List[str]] = None) -> tuple:
    """Run cmd from the repository root, its output to log_path after a `$ command` line (of `shown`, if given: the
    command a wrapper runs). Returns (the exit status, or "timeout"; wall seconds)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(shown or cmd) + "\n")
        log.flush()
        try:
            rc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, time.perf_counter() - start


def log_tail(log_path: str, chars: int = 3000) -> str:
    with open(log_path) as f:
        return f.read()[-chars:]


# Used when /usr/bin/time is missing: a fresh process whose only child is the run, so the children's ru_maxrss is
# the run's own peak (ru_maxrss of children is the maximum over all waited-for descendants).
RUSAGE_WRAPPER = (
    "import resource, subprocess, sys, json\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "json.dump({'rc': rc, 'max_rss_kib': ru.ru_maxrss, 'cpu_s': ru.ru_utime + ru.ru_stime}, "
    "open(sys.argv[1], 'w'))\nsys.exit(rc)\n"
)


def run_measured(cmd: List[str], env: dict, log_path: str, timeout: int) -> dict:
    """run_logged, also measuring the peak resident memory of the whole process and its CPU seconds (user + system;
    CPU seconds / wall seconds below the thread count means the run waited for a core)."""
    rss_file = log_path + ".rss"
    if os.path.exists(rss_file):
        os.remove(rss_file)
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    wrapped = (
        [gnu_time, "-v", "-o", rss_file, *cmd] if gnu_time else [sys.executable, "-c", RUSAGE_WRAPPER, rss_file, *cmd]
    )
    load = os.getloadavg()[0]
    rc, wall = run_logged(wrapped, env, log_path, timeout, shown=cmd)
    max_rss_kib = cpu_s = None
    if os.path.exists(rss_file):
        with open(rss_file) as f:
            text = f.read()
        if gnu_time:
            fields = dict(line.strip().rsplit(": ", 1) for line in text.splitlines() if ": " in line)
            max_rss_kib = int(fields["Maximum resident set size (kbytes)"])
            cpu_s = float(fields["User time (seconds)"]) + float(fields["System time (seconds)"])
        else:
            measured = json.loads(text)
            max_rss_kib, cpu_s = measured["max_rss_kib"], measured["cpu_s"]
    return {
        "returncode": rc,
        "wall_s": wall,
        "peak_rss_mib": max_rss_kib / 1024 if max_rss_kib else None,
        "cpu_s": cpu_s,
        "cpu_share": cpu_s / wall if cpu_s is not None else None,
        "rss_method": "/usr/bin/time -v" if gnu_time else "getrusage(RUSAGE_CHILDREN) in a fresh wrapper",
        "load_average_1min_before": load,
        "log": log_path,
    }


def peak_rss_mib() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------------------
# The machine and the code measured


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_state() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    with open(os.path.join(ROOT, "ppo_rlhf.py"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {
        "commit": git("rev-parse", "HEAD"),
        "ppo_rlhf_py_uncommitted_changes": bool(git("status", "--porcelain", "ppo_rlhf.py")),
        "ppo_rlhf_py_sha256": digest,
    }


def machine_info() -> dict:
    import torch
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_at_start": os.getloadavg(),
        **git_state(),
    }


def commit_note(machine: dict) -> str:
    """The commit measured, as the tables name it."""
    dirty = " + uncommitted ppo_rlhf.py changes" if machine["ppo_rlhf_py_uncommitted_changes"] else ""
    return f"{(machine['commit'] or '?')[:10]}{dirty}"


def snapshot_script(script: str, work_dir: str) -> tuple:
    """Copy the script under test to work_dir/snapshot/ (same file name), with the rlhf_utils package it imports
    beside it (the copy runs with its own folder first on sys.path), and return (copy, sha256 of the script)."""
    source = script if os.path.isabs(script) else os.path.join(ROOT, script)
    if not os.path.isfile(source):
        fail(f"--ours-script {script!r} does not exist")
    folder = os.path.join(os.path.abspath(work_dir), "snapshot")
    copy = os.path.join(folder, os.path.basename(source))
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(source, copy)
    shutil.rmtree(os.path.join(folder, "rlhf_utils"), ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(os.path.join(ROOT, "rlhf_utils"), os.path.join(folder, "rlhf_utils"), ignore=ignore)
    with open(copy, "rb") as f:
        return copy, hashlib.sha256(f.read()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# TRL: its interpreter, and one table of the flags both implementations take


def default_trl_python() -> str:
    """The repository's own TRL venv (git-ignored); any other python is passed with --trl-python."""
    return os.path.join(ROOT, ".venv-trl", "bin", "python")


def trl_available(python: Optional[str]) -> tuple:
    """(True, version) if `python` exists and can import trl, else (False, why)."""
    if not python or not os.path.exists(python):
        return (
            False,
            f"no TRL python at {python!r} (make a venv with benchmark/requirements-trl.txt, pass --trl-python)",
        )
    try:
        proc = subprocess.run(
            [
                python,
                "-c",
                "import importlib.util, sys\nif importlib.util.find_spec('trl') is None: "
                "sys.exit(3)\nfrom importlib.metadata import version; print(version('trl'))",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{python} does not run: {e}"
    if proc.returncode != 0:
        return False, f"trl is not installed in {python}"
    return True, proc.stdout.strip()


TRL_RUNNER = os.path.join(ROOT, "benchmark", "trl_ppo_runner.py")
# One row per setting of a run: its key in the settings, ppo_rlhf.py's flag, benchmark/trl_ppo_runner.py's flag (None:
# that side has no such flag; ours takes its threads from OMP_NUM_THREADS, the runner evaluates nothing).
FLAGS = [
    ("output_dir", "--output-dir", "--output-dir"),
    ("sft_model_path", "--sft-model-path", "--sft-model-path"),
    ("reward_model_path", "--reward-model-path", "--reward-model-path"),
    ("tokenizer", "--model-name-or-path", "--tokenizer-path"),
    ("prompts", "--dataset-name", "--dataset-path"),
    ("train_split", "--dataset-train-split", "--dataset-split"),
    ("total_episodes", "--total-episodes", "--total-episodes"),
    ("per_device_train_batch_size", "--per-device-train-batch-size", "--per-device-train-batch-size"),
    ("gradient_accumulation_steps", "--gradient-accumulation-steps", "--gradient-accumulation-steps"),
    ("local_rollout_forward_batch_size", "--local-rollout-forward-batch-size", "--local-rollout-forward-batch-size"),
    ("num_ppo_epochs", "--num-ppo-epochs", "--num-ppo-epochs"),
    ("num_mini_batches", "--num-mini-batches", "--num-mini-batches"),
    ("response_length", "--response-length", "--response-length"),
    ("stop_token", "--stop-token", "--stop-token"),
    ("temperature", "--temperature", "--temperature"),
    ("learning_rate", "--learning-rate", "--learning-rate"),
    ("kl_coef", "--kl-coef", "--kl-coef"),
    ("missing_eos_penalty", "--missing-eos-penalty", "--missing-eos-penalty"),
    ("seed", "--seed", "--seed"),
    ("bf16", "--bf16", "--bf16"),
    ("num_threads", None, "--num-threads"),
    ("test_split", "--dataset-test-split", None),
    ("overwrite_output_dir", "--overwrite-output-dir", None),
    ("eval_strategy", "--eval-strategy", None),
    ("num_sample_generations", "--num-sample-generations", None),
    ("save_steps", "--save-steps", None),
    ("results_json", None, "--results-json"),
    ("save_policy", None, "--save-policy"),
    ("gc_freeze", None, "--gc-freeze"),
    ("quiet", None, "--quiet"),
]

# The PPO settings that the benchmarks' Args name as ppo_rlhf.py does and hand to both implementations as they are.
PPO_SETTINGS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "local_rollout_forward_batch_size",
    "num_ppo_epochs",
    "num_mini_batches",
    "response_length",
    "temperature",
    "learning_rate",
    "missing_eos_penalty",
    "num_threads",
)


def command(side: str, program: List[str], settings: dict) -> List[str]:
    """`program` followed by the flags of `side` ("ours" or "trl") for the settings, in FLAGS' order. A boolean is a
    switch (ours: `--no-...` when off; the runner's switches are off unless given); None is tyro's `None` for ours and
    the runner's default (None) for TRL."""
    unknown = set(settings) - {key for key, _, _ in FLAGS}
    if unknown:
        raise KeyError(f"settings without a row in FLAGS: {sorted(unknown)}")
    cmd = list(program)
    for key, ours, trl in FLAGS:
        flag = ours if side == "ours" else trl
        if flag is None or key not in settings:
            continue
        value = settings[key]
        if value is True:
            cmd.append(flag)
        elif side == "ours" and value is False:
            cmd.append("--no-" + flag[2:])
        elif side == "ours" and value is None:
            cmd += [flag, "None"]
        elif value is not False and value is not None:
            cmd += [flag, str(value)]
    return cmd


# ----------------------------------------------------------------------------------------------------------------
# Results


def read_jsonl(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_results(results_dir: str, stem: str, results: dict, markdown: str, tag: str) -> None:
    """results_dir/stem.json and .md, and the table on stdout."""
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, stem + ".json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    with open(os.path.join(results_dir, stem + ".md"), "w") as f:
        f.write(markdown)
    print(markdown)
    print(f"[{tag}] wrote {os.path.join(results_dir, stem)}.md and .json")
