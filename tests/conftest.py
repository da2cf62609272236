"""Shared test setup: offline everywhere, the repository root importable, and a helper to run a script as a user."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
os.environ.update(OFFLINE_ENV)


def run_script(
    script: str, *args: str, cwd: str = ROOT, timeout: int = 600, env: dict = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `python <script> <args>` from the repository root, exactly as a user would."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def one_torch_thread():
    """The CPUs are shared with other jobs; one thread is several times faster than two contended ones. Test files
    that compute in this process use it for all their tests (pytestmark)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    """Keep W&B offline files inside the test's temporary folder."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    return tmp_path


class ReachedTraining(Exception):
    """Raised in place of building the Accelerator: the script got past its input checks."""


def refuse_accelerator(*args, **kwargs):
    raise ReachedTraining("validation passed: the script went on to build the Accelerator")


def run_in_process(script, argv, tmp_path, monkeypatch):
    """Run the script's __main__ here, sharing this process's imports (a subprocess costs ~5 s of imports per
    case); the Accelerator, built right after validation, is replaced by a tripwire. What the script registers to
    run at exit (releasing its output-folder lock) runs when it stops, and its signal handlers are undone, as if its
    process had ended."""
    import atexit
    import runpy
    import signal

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


def kill_after_a_checkpoint_then_resume(script, args, out, num_steps, log_dir, env=None, timeout=600):
    """The exact-resume check of sft.py and reward_modeling.py: run `python <script> <args> --output-dir out
    --save-steps 1`, SIGKILL it a random moment (0-50 ms) after checkpoint-k appears, k random in 1..num_steps-1,
    then rerun it with --resume-from-checkpoint latest. RESUME_TEST_SEED=<seed> replays a failure's k and delay.
    Returns (a description of where it was killed, the killed run's return code, the resumed run)."""
    import random
    import signal
    import time

    seed = int(os.environ.get("RESUME_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    k, delay = rng.randint(1, num_steps - 1), rng.uniform(0.0, 0.05)
    full_args = [*args, "--output-dir", str(out), "--save-steps", "1"]
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    with (
        open(os.path.join(log_dir, "killed.out"), "w") as f_out,
        open(os.path.join(log_dir, "killed.err"), "w") as f_err,
    ):
        proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, script), *full_args],
            cwd=ROOT,
            env=full_env,
            stdout=f_out,
            stderr=f_err,
        )
    try:
        target, deadline = os.path.join(out, "checkpoints", f"checkpoint-{k}"), time.time() + timeout
        while not os.path.isdir(target) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    at_kill = (
        sorted(os.listdir(os.path.join(out, "checkpoints"))) if os.path.isdir(os.path.join(out, "checkpoints")) else []
    )
    where = (
        f"killed {delay * 1000:.0f} ms after checkpoint-{k} appeared (RESUME_TEST_SEED={seed}); "
        f"checkpoints then: {at_kill}"
    )
    resumed = run_script(
        script, *full_args, "--resume-from-checkpoint", "latest", env=env, timeout=timeout, check=False
    )
    return where, proc.returncode, resumed


def assert_exact_resume(script, args, tmp_path, num_steps=10) -> list:
    """sft.py / reward_modeling.py: the uninterrupted run (alongside) and a run SIGKILLed after a random checkpoint
    then resumed (kill_after_a_checkpoint_then_resume) end with bitwise-identical weights and metrics.jsonl, every
    step logged once, the newest two checkpoints kept and no temporary left. Returns the metrics lines."""
    import json
    import signal
    from concurrent.futures import ThreadPoolExecutor

    env = {"OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    base, resumed_dir = tmp_path / "base", tmp_path / "resumed"
    with ThreadPoolExecutor(1) as pool:  # the uninterrupted run, alongside
        job = pool.submit(run_script, script, *args, "--output-dir", str(base), "--save-steps", "1", env=env)
        where, killed_returncode, resumed = kill_after_a_checkpoint_then_resume(
            script, args, resumed_dir, num_steps, str(tmp_path), env=env
        )
        job.result()
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


def fake_checkpoint(tmp_path, args_cls, good_args: dict, **changes) -> dict:
    """A checkpoint folder whose state.pt says it was written by a run of `args_cls` with the good arguments (as
    command-line flags), changed by `changes`: what resume validation reads (args and launch layout), nothing else."""
    import dataclasses
    import json

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
