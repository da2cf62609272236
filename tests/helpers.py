"""What the test files share: the offline environment, the repository root on sys.path, one way to run a script as a
user runs it (in the foreground, or in the background from a pool of worker threads), one kill-and-resume check, the
harness that runs a script's input checks in this process, and small pieces (files under a folder, a free port, chat
messages and a chat template). Imported as `from helpers import ...` (the fixtures
stay in conftest.py)."""

import atexit
import json
import os
import random
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
EMBEDDED = os.path.join(ROOT, "embedded")
sys.path.insert(0, ROOT)

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
os.environ.update(OFFLINE_ENV)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # shared CPUs: one uncontended thread per process


# ---------------------------------------------------------------------------------------------------------------
# running a script as a user runs it


def run_script(
    script: str, *args: str, cwd: str = ROOT, timeout: int = 600, env: dict = None, check: bool = True, **popen
) -> subprocess.CompletedProcess:
    """Run `python <script> <args>` from the repository root, exactly as a user would. `popen`: more keyword
    arguments for subprocess.run (e.g. preexec_fn)."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
        )
    return proc


class Finished:
    """One finished background command: its exit status and output, what the test passed along (`info`: its output
    folder `out`, ...), and the rows of out/metrics.jsonl."""

    def __init__(self, cmd, cwd, returncode, stdout, stderr, **info):
        self.cmd, self.cwd, self.info = cmd, cwd, info
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    def check(self):
        assert self.returncode == 0, (
            f"{' '.join(self.cmd)} exited {self.returncode}\nSTDOUT:\n{self.stdout[-4000:]}"
            f"\nSTDERR:\n{self.stderr[-5000:]}"
        )
        return self

    @property
    def out(self):
        return self.info["out"]

    @property
    def rows(self):
        with open(os.path.join(self.out, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    @property
    def train_rows(self):
        return [r for r in self.rows if "objective/kl" in r]

    @property
    def eval_rows(self):
        return [r for r in self.rows if any(k.startswith("eval/") for k in r)]


class Background:
    """Runs commands from a pool of worker threads, each command in its own process group (a launcher or pipeline.py
    starts children), its output in root/<name>.out and .err; at the end of the module the groups it started that
    still run are killed, by their ids. `env`: what the commands' environment adds to this process's and the offline
    one (by default one thread and a datasets cache under root). `finished`: the class of the results."""

    def __init__(self, root, workers=2, env=None, finished=Finished):
        self.root, self.lock, self.groups, self.closed, self.finished = root, threading.Lock(), set(), False, finished
        self.executor = ThreadPoolExecutor(max_workers=workers)
        if env is None:
            env = {**ONE_THREAD, "HF_DATASETS_CACHE": os.path.join(root, "hf_cache")}
        self.env = {**os.environ, **OFFLINE_ENV, **env}

    def start(self, name, cmd, cwd=ROOT, env=None) -> subprocess.Popen:
        with (
            open(os.path.join(self.root, f"{name}.out"), "w") as out,
            open(os.path.join(self.root, f"{name}.err"), "w") as err,
            self.lock,
        ):
            if self.closed:
                raise RuntimeError("the module's runs were cancelled")
            proc = subprocess.Popen(
                cmd, cwd=cwd, env={**self.env, **(env or {})}, stdout=out, stderr=err, start_new_session=True
            )
            self.groups.add(proc.pid)
        return proc

    def wait(self, proc, name, cmd, cwd=ROOT, timeout=900, **info) -> Finished:
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            with self.lock:
                self.groups.discard(proc.pid)
        with (
            open(os.path.join(self.root, f"{name}.out")) as out,
            open(os.path.join(self.root, f"{name}.err")) as err,
        ):
            return self.finished(cmd, cwd, proc.returncode, out.read(), err.read(), **info)

    def run(self, name, cmd, cwd=ROOT, env=None, timeout=900, **info) -> Finished:
        return self.wait(self.start(name, cmd, cwd, env), name, cmd, cwd, timeout, **info)

    def close(self):
        self.executor.shutdown(wait=False, cancel_futures=True)
        with self.lock:
            self.closed = True
            running = list(self.groups)
        for pgid in running:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def needs(*names):
    """Declare the background runs a test reads; the module fixture starts only the runs of the selected tests."""

    def mark(fn):
        fn.background_runs = names
        return fn

    return mark


def wanted_runs(request) -> set:
    """The background runs that the selected tests of the fixture's module declared with `needs`."""
    return {
        name
        for item in request.session.items
        if item.module is request.module
        for name in getattr(getattr(item, "function", None), "background_runs", ())
    }


def start_wanted_runs(request, bg, plan) -> dict:
    """Start in bg's worker threads the runs of `plan` (name: prepare; prepare() builds the run's inputs in this
    thread, as importing transformers/datasets from two threads at once is not safe, and returns the job) that the
    selected tests of the module declared with `needs`. Returns name: wait for that run's result."""
    wanted = wanted_runs(request)
    try:
        futures = {name: bg.executor.submit(prepare()) for name, prepare in plan.items() if name in wanted}
    except BaseException:
        bg.close()
        raise
    return {name: (lambda f=f: f.result(timeout=2400)) for name, f in futures.items()}


# ---------------------------------------------------------------------------------------------------------------
# exact resume after SIGKILL


def checkpoints_in(out) -> list:
    folder = os.path.join(out, "checkpoints")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def kill_after_a_checkpoint_then_resume(runner, name, script, args, num_steps, max_delay, timeout=600) -> dict:
    """Run `python <script> <args>` in the background (args name the output folder root/<name> and a checkpoint
    every step), SIGKILL it a random moment (0 to max_delay s) after checkpoint-k appears, k random in 1..num_steps-1,
    then rerun it with --resume-from-checkpoint latest. RESUME_TEST_SEED=<seed> replays a failure's k and delay.
    Returns the seed, k, delay, the killed run, the checkpoints at the kill, the resumed run and `where` (all that, in
    words, for the failure messages)."""
    seed = int(os.environ.get("RESUME_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    k, delay = rng.randint(1, num_steps - 1), rng.uniform(0.0, max_delay)
    out = os.path.join(runner.root, name)
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    proc = runner.start("killed", cmd)
    target, deadline = os.path.join(out, "checkpoints", f"checkpoint-{k}"), time.time() + timeout
    while not os.path.isdir(target) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    killed = runner.wait(proc, "killed", cmd, timeout=timeout, out=out)
    at_kill = checkpoints_in(out)
    where = (
        f"killed {delay * 1000:.0f} ms after checkpoint-{k} appeared (RESUME_TEST_SEED={seed}); "
        f"checkpoints then: {at_kill}"
    )
    resumed = runner.run(name, [*cmd, "--resume-from-checkpoint", "latest"], timeout=timeout, out=out)
    return {
        "seed": seed,
        "k": k,
        "delay": delay,
        "killed": killed,
        "checkpoints_at_kill": at_kill,
        "resumed": resumed,
        "where": where,
    }


def assert_exact_resume(script, args, tmp_path, num_steps=10) -> list:
    """sft.py / reward_modeling.py: the uninterrupted run (alongside) and a run SIGKILLed after a random checkpoint
    then resumed (kill_after_a_checkpoint_then_resume) end with bitwise-identical weights and metrics.jsonl, every
    step logged once, the newest two checkpoints kept and no temporary left. Returns the metrics lines."""
    env = {"OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    base, resumed_dir = tmp_path / "base", tmp_path / "resumed"
    runner = Background(str(tmp_path), workers=1, env=env)
    base_cmd = [sys.executable, os.path.join(ROOT, script), *args, "--output-dir", str(base), "--save-steps", "1"]
    try:
        # the uninterrupted run, alongside
        job = runner.executor.submit(lambda: runner.run("base", base_cmd, timeout=600, out=str(base)).check())
        result = kill_after_a_checkpoint_then_resume(
            runner,
            "resumed",
            script,
            [*args, "--output-dir", str(resumed_dir), "--save-steps", "1"],
            num_steps,
            max_delay=0.05,
        )
        job.result()
    finally:
        runner.close()
    where, killed_returncode, resumed = result["where"], result["killed"].returncode, result["resumed"]
    assert killed_returncode == -signal.SIGKILL, where
    assert resumed.returncode == 0, (where, resumed.stderr[-3000:])
    assert "resumed from" in resumed.stdout, (where, resumed.stdout[-2000:])
    assert (resumed_dir / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes(), where
    rows = (resumed_dir / "metrics.jsonl").read_text().splitlines()
    assert rows == (base / "metrics.jsonl").read_text().splitlines(), where
    assert [json.loads(r)["step"] for r in rows if "train/loss" in r] == list(range(1, num_steps + 1)), where
    last, before = f"checkpoint-{num_steps}", f"checkpoint-{num_steps - 1}"
    for out in (base, resumed_dir):  # --save-total-limit 2 (the default)
        assert sorted(os.listdir(out / "checkpoints")) == [last, before, "latest"], where
        assert (out / "checkpoints" / "latest").read_text() == last  # the pointer names the newest checkpoint
        assert set(os.listdir(out / "checkpoints" / last)) == {
            "model",
            "optimizer.pt",
            "rng_rank0.pt",
            "state.pt",
            "manifest.json",
        }
        for leftover in (".tmp", ".partial", ".new", ".old", ".lock"):  # no temporary, the lock released at exit
            assert not os.path.exists(str(out) + leftover), leftover
    return rows


# ---------------------------------------------------------------------------------------------------------------
# input checks, run in this process


class ReachedTraining(Exception):
    """Raised in place of building the Accelerator: the script got past its input checks."""


def refuse_accelerator(*args, **kwargs):
    raise ReachedTraining("validation passed: the script went on to build the Accelerator")


def run_in_process(script, argv, tmp_path, monkeypatch):
    """Run the script's __main__ here, sharing this process's imports (a subprocess costs ~5 s of imports per
    case); the Accelerator, built right after validation, is replaced by a tripwire. What the script registers to
    run at exit (releasing its output-folder lock) runs when it stops, and its signal handlers are undone, as if its
    process had ended."""
    import accelerate
    import datasets

    at_exit = []
    monkeypatch.setattr(accelerate, "Accelerator", refuse_accelerator)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.setattr(atexit, "register", lambda fn, *a, **kw: at_exit.append((fn, a, kw)))
    monkeypatch.chdir(ROOT)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises((SystemExit, ReachedTraining)) as info:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        for fn, a, kw in reversed(at_exit):
            fn(*a, **kw)
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return info.value


def fake_checkpoint(tmp_path, args_cls, good_args: dict, **changes) -> dict:
    """A checkpoint folder whose state.pt says it was written by a run of `args_cls` with the good arguments (as
    command-line flags), changed by `changes`: what resume validation reads (args and launch layout), nothing else."""
    import dataclasses

    import torch

    good = {k[2:].replace("-", "_"): v for k, v in good_args.items()}
    path = tmp_path / "checkpoints_elsewhere" / "checkpoint-3"
    path.mkdir(parents=True)
    torch.save(
        {"args": json.dumps(dataclasses.asdict(args_cls(**{**good, **changes}))), "world_size": 1, "zero_stage": None},
        path / "state.pt",
    )
    return {"--resume-from-checkpoint": str(path)}


def not_a_checkpoint(tmp_path) -> dict:
    (tmp_path / "some_folder").mkdir()
    (tmp_path / "some_folder" / "model.safetensors").write_bytes(b"")
    return {"--resume-from-checkpoint": str(tmp_path / "some_folder")}


def resume_bad_inputs(checkpoint_of) -> dict:
    """The bad-input cases of --save-steps / --save-total-limit / --resume-from-checkpoint that sft.py and
    reward_modeling.py share: case -> (changes to the good arguments, the argument named, a word of the message)."""
    return {
        "negative save steps": (lambda t: {"--save-steps": "-1"}, "--save-steps", ">= 0"),
        "save total limit 0": (lambda t: {"--save-total-limit": "0"}, "--save-total-limit", ">= 1"),
        "resume from a missing path": (
            lambda t: {"--resume-from-checkpoint": str(t / "nope")},
            "--resume-from-checkpoint",
            "does not exist",
        ),
        "resume from a non-checkpoint": (not_a_checkpoint, "--resume-from-checkpoint", "not a checkpoint"),
        "resume latest without checkpoints": (
            lambda t: {"--resume-from-checkpoint": "latest"},
            "--resume-from-checkpoint",
            "no checkpoint",
        ),
        "resume with another seed": (
            lambda t: checkpoint_of(t, seed=2),
            "--resume-from-checkpoint",
            "--seed 2 (now 1)",
        ),
    }


def assert_bad_input_stops_before_training(script, case, make, argument, word, good_args, tmp_path, monkeypatch):
    """sft.py / reward_modeling.py: the good arguments changed by make(tmp_path) stop the script before training with
    a one-line error that names `argument` and says `word`, and nothing is written (a non-empty output folder kept)."""
    args = {**good_args, **make(tmp_path)}
    out = args["--output-dir"]
    if case == "non-empty output dir":
        os.makedirs(out)
        with open(os.path.join(out, "keep.txt"), "w") as f:
            f.write("precious")
    error = run_in_process(script, [x for kv in args.items() for x in kv], tmp_path, monkeypatch)
    assert isinstance(error, SystemExit), f"{case}: the script went on to training"
    assert isinstance(error.code, str), error.code  # sys.exit("message"): status 1, the message on stderr
    assert error.code.startswith(f"error: {argument}:"), error.code
    assert word in error.code
    if case == "non-empty output dir":
        assert os.listdir(out) == ["keep.txt"]
    else:
        assert not os.path.exists(out)
    assert not os.path.exists(out + ".tmp")


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def copy_model_with_pad(tmp_path, pad) -> str:
    """A copy of embedded/sft_model whose tokenizer is re-saved with no pad token (pad=None) or pad == EOS."""
    from transformers import AutoTokenizer

    path = str(tmp_path / "model_bad_tokenizer")
    shutil.copytree(os.path.join(EMBEDDED, "sft_model"), path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.eos_token if pad == "eos" else None
    tok.save_pretrained(path)
    reloaded = AutoTokenizer.from_pretrained(path)
    assert reloaded.pad_token_id == (reloaded.eos_token_id if pad == "eos" else None)  # the case is what it claims
    return path


def files_under(path) -> dict:
    """{relative path: content} of every file under path."""
    out = {}
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), path)] = f.read()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# chat formats

# Each assistant turn ends with EOS and a newline: the newline is the template's, after EOS, and never trained on.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def labelled_spans(labels):
    """The [start, end) runs of positions whose label is not -100."""
    spans, start = [], None
    for i, label in enumerate(labels + [-100]):
        if label != -100 and start is None:
            start = i
        if label == -100 and start is not None:
            spans.append((start, i))
            start = None
    return spans
