"""Faults an operator meets, through the scripts: damaged checkpoints, a second run into the same folder, a folder that
cannot be written, a full disk, non-finite gradients, Ctrl-C, a remote-code model; docs/faults.md has the table of
faults and what each does now. Each test's docstring says what the script did before.

The output-folder helpers live once, in rlhf_utils; kills during the final save and the checkpoint rules, called
directly, are in tests/test_utils_outputs.py and test_utils_checkpoints.py."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import OFFLINE_ENV, ROOT, ReachedTraining, files_under, run_in_process, run_script

import sft  # noqa: E402
from rlhf_utils.checkpoints import checkpoint_problem, seal_checkpoint

EMBEDDED = os.path.join(ROOT, "embedded")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SCRIPTS = ("sft.py", "reward_modeling.py", "ppo_rlhf.py", "ppo_rlhf_tldr.py")


@pytest.fixture
def release_locks(monkeypatch):
    """In-process runs register the lock's release with atexit, which runs only when pytest ends: run them here
    instead, so that the next in-process run may take the same folder."""
    import atexit

    released = []
    monkeypatch.setattr(atexit, "register", released.append)
    yield lambda: [release() for release in released] and released.clear()
    for release in released:
        release()


# ---------------------------------------------------------------------------------------------------------------
# a damaged checkpoint, resumed by a script


def sealed_checkpoint(out, n, **changes):
    """checkpoint-n of an sft.py run into `out` with the embedded defaults, as the script seals it."""
    import dataclasses

    folder = out / "checkpoints"
    tmp = folder / f"checkpoint-{n}.tmp"
    (tmp / "model").mkdir(parents=True)
    args = sft.Args(
        model_name_or_path=os.path.join(EMBEDDED, "base_model"),
        dataset_name=os.path.join(EMBEDDED, "sft_data"),
        output_dir=str(out),
        **changes,
    )
    torch.save(
        {
            "args": json.dumps(dataclasses.asdict(args)),
            "world_size": 1,
            "zero_stage": None,
            "step": n,
            "script": "sft.py",
        },
        tmp / "state.pt",
    )
    (tmp / "model" / "model.safetensors").write_bytes(b"weights" * 100)
    seal_checkpoint(str(tmp), str(folder / f"checkpoint-{n}"), None)
    return folder / f"checkpoint-{n}"


def sft_argv(out, *extra):
    return [
        "--model-name-or-path",
        os.path.join(EMBEDDED, "base_model"),
        "--dataset-name",
        os.path.join(EMBEDDED, "sft_data"),
        "--output-dir",
        str(out),
        *extra,
    ]


def test_a_truncated_latest_checkpoint_falls_back_to_the_newest_intact_one(
    tmp_path, monkeypatch, capsys, release_locks
):
    out = tmp_path / "out"
    sealed_checkpoint(out, 2)
    damaged = sealed_checkpoint(out, 3)
    with open(damaged / "model" / "model.safetensors", "r+b") as f:
        f.truncate(100)  # a kill or a full disk mid-write, after the checkpoint was complete
    # `latest` skips it, saying so, and resumes checkpoint-2 (validation passes)
    assert isinstance(
        run_in_process("sft.py", sft_argv(out, "--resume-from-checkpoint", "latest"), tmp_path, monkeypatch),
        ReachedTraining,
    )
    err = capsys.readouterr().err
    assert "checkpoint-3 is damaged: model/model.safetensors has 100 bytes, 700 when written" in err, err
    assert "resuming from checkpoint-2, the newest intact checkpoint" in err, err
    release_locks()
    # named by path, it is an error (the user asked for that one)
    error = run_in_process("sft.py", sft_argv(out, "--resume-from-checkpoint", str(damaged)), tmp_path, monkeypatch)
    assert isinstance(error, SystemExit) and error.code.startswith("error: --resume-from-checkpoint:"), error
    assert "is damaged: model/model.safetensors has 100 bytes" in error.code
    release_locks()
    # with every checkpoint damaged, a clear stop
    (out / "checkpoints" / "checkpoint-2" / "state.pt").write_bytes(b"")
    error = run_in_process("sft.py", sft_argv(out, "--resume-from-checkpoint", "latest"), tmp_path, monkeypatch)
    assert (
        isinstance(error, SystemExit)
        and "no intact checkpoint" in error.code
        and "checkpoint-2 is damaged" in error.code
    )


def test_an_unreadable_state_file_is_a_clear_error(tmp_path, monkeypatch, release_locks):
    folder = sealed_checkpoint(tmp_path / "out", 2)
    os.remove(folder / "manifest.json")  # a checkpoint of an older version: nothing to verify against
    (folder / "state.pt").write_bytes(b"PK\x03\x04 not a zip")
    error = run_in_process(
        "sft.py", sft_argv(tmp_path / "out", "--resume-from-checkpoint", str(folder)), tmp_path, monkeypatch
    )
    assert isinstance(error, SystemExit) and error.code.startswith("error: --resume-from-checkpoint:"), error
    assert "state.pt' cannot be read" in error.code


# ---------------------------------------------------------------------------------------------------------------
# the output folder is checked, and held, before any model loads


def test_a_second_run_into_the_same_folder_is_refused_until_the_first_one_dies(tmp_path, monkeypatch):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {ROOT!r}); from rlhf_utils.outputs import lock_output_dir; "
            f"lock_output_dir({str(out)!r}); print('locked', flush=True); import time; "
            "time.sleep(300)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **ONE_THREAD},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        error = run_in_process("sft.py", sft_argv(out), tmp_path, monkeypatch)
        assert isinstance(error, SystemExit), "a second run went on to training"
        assert (
            error.code.startswith("error: --output-dir:")
            and f"in use by another run (process {holder.pid} on" in error.code
        )
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock file stays
        holder.wait()
    assert os.path.exists(str(out) + ".lock")
    assert isinstance(run_in_process("sft.py", sft_argv(out), tmp_path, monkeypatch), ReachedTraining)


@pytest.mark.parametrize("case", ["read-only folder", "read-only file system", "output dir is a file"])
def test_an_output_dir_that_cannot_be_written_stops_before_any_model_loads(case, tmp_path, monkeypatch):
    out = tmp_path / "locked" / "out"
    if case == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        out.parent.mkdir()
        out.parent.chmod(0o555)
    elif case == "read-only file system":
        out = "/sys/rlhf_fault_test/out"  # sysfs takes no new folders, even from root
        try:
            os.mkdir("/sys/rlhf_fault_test")
        except OSError:
            pass
        else:
            os.rmdir("/sys/rlhf_fault_test")
            pytest.skip("/sys is writable here")
    else:
        out = tmp_path / "a_file"
        out.write_text("not a folder")
    error = run_in_process("sft.py", sft_argv(out), tmp_path, monkeypatch)
    assert isinstance(error, SystemExit), f"{case}: the script went on to training"
    assert error.code.startswith("error: --output-dir:") and (
        "cannot write" in error.code or "is a file" in error.code
    )


def test_a_failed_start_leaves_no_folder_and_no_lock(tmp_path):
    """PPO made output_dir before loading the models: a model that fails to load left an empty folder."""
    broken = tmp_path / "broken_sft"
    shutil.copytree(os.path.join(EMBEDDED, "sft_model"), broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    out = tmp_path / "new" / "nested" / "out"
    proc = run_script(
        "ppo_rlhf.py",
        "--sft-model-path",
        str(broken),
        "--output-dir",
        str(out),
        check=False,
        env={**ONE_THREAD, "HF_DATASETS_CACHE": str(tmp_path / "cache")},
        timeout=300,
    )
    assert proc.returncode != 0
    assert not (tmp_path / "new").exists(), files_under(tmp_path / "new").keys()


# ---------------------------------------------------------------------------------------------------------------
# non-finite gradients, Ctrl-C, full disks and remote code on real runs (sft.py, a few seconds each)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from datasets import DatasetDict, load_from_disk

    path = tmp_path_factory.mktemp("data") / "sft"
    full = load_from_disk(os.path.join(EMBEDDED, "sft_data"))
    DatasetDict(train=full["train"].select(range(64)), validation=full["validation"].select(range(8))).save_to_disk(
        str(path)
    )
    return str(path)


def small_sft(data, out, *extra, model=os.path.join(EMBEDDED, "base_model")):
    return [
        os.path.join(ROOT, "sft.py"),
        "--dataset-name",
        data,
        "--model-name-or-path",
        model,
        "--num-train-epochs",
        "1",
        "--per-device-train-batch-size",
        "8",
        "--logging-steps",
        "1",
        "--num-sample-completions",
        "0",
        "--output-dir",
        str(out),
        *extra,
    ]


def test_a_finite_loss_with_a_non_finite_gradient_norm_stops_before_the_step(tmp_path, small_data):
    """sft.py checked the loss only; the step went on with inf gradient norms and checkpointed the result."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(EMBEDDED, "base_model"))
    with torch.no_grad():
        model.gpt_neox.final_layer_norm.weight.fill_(1e30)  # finite logits and loss, gradient norm overflows
    model.save_pretrained(tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(EMBEDDED, "base_model", name), tmp_path / "model")
    out = tmp_path / "out"
    proc = run_script(
        *small_sft(small_data, out, "--save-steps", "1", model=str(tmp_path / "model")),
        timeout=300,
        env=ONE_THREAD,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "error: non-finite gradient norm at optimizer step 1" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() or not os.listdir(out / "checkpoints"), files_under(out).keys()


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_exits_with_one_line(tmp_path, small_data):
    """SIGINT printed a KeyboardInterrupt traceback and lost everything since the last checkpoint."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, *small_sft(small_data, out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **OFFLINE_ENV, **ONE_THREAD, "PYTHONUNBUFFERED": "1"},
    )
    try:
        for line in proc.stdout:
            if line.startswith("step 1/"):
                proc.send_signal(signal.SIGINT)
                break
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGINT after optimizer step") and "--resume-from-checkpoint latest" in last
    step = int(last.split("optimizer step ")[1].split(",")[0])
    assert 1 <= step < 8 and (out / "checkpoints" / "latest").read_text() == f"checkpoint-{step}"
    assert checkpoint_problem(str(out / "checkpoints" / f"checkpoint-{step}")) is None
    assert not os.path.exists(str(out) + ".lock")


def test_a_full_disk_during_a_checkpoint_stops_with_a_message_and_keeps_no_half_checkpoint(tmp_path, small_data):
    """A checkpoint that could not be written gave a traceback (here: files capped at 1 MB, the model is 2)."""
    out = tmp_path / "out"

    def cap_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    proc = run_script(
        *small_sft(small_data, out, "--save-steps", "1"),
        timeout=300,
        env=ONE_THREAD,
        check=False,
        preexec_fn=cap_file_size,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: could not write checkpoint-1 (" in proc.stderr and "File too large" in proc.stderr
    assert os.listdir(out / "checkpoints") == []  # no half-written checkpoint-1.tmp
    assert not os.path.exists(str(out) + ".lock")


def test_a_remote_code_model_without_the_flag_is_a_one_line_error(tmp_path, small_data):
    """transformers' refusal came with a traceback."""
    model = tmp_path / "custom"
    shutil.copytree(os.path.join(EMBEDDED, "base_model"), model)
    config = json.loads((model / "config.json").read_text())
    config.update(
        model_type="my_custom_arch",
        auto_map={
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomModel",
        },
    )
    (model / "config.json").write_text(json.dumps(config))
    proc = run_script(
        *small_sft(small_data, tmp_path / "out", model=str(model)), timeout=300, env=ONE_THREAD, check=False
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --trust-remote-code: The repository")
    assert sorted(os.listdir(tmp_path)) == ["custom"]  # no output folder, no lock
