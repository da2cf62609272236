"""rlhf_utils.processes: the launch a script runs in (accelerate, torchrun), checked before any model loads."""

import os
import shutil
import subprocess

import pytest

from helpers import OFFLINE_ENV, ONE_THREAD, ROOT
from rlhf_utils.processes import launcher_asked_processes

ACCELERATE = ["/usr/bin/python3", "/usr/local/bin/accelerate", "launch"]


@pytest.mark.parametrize(
    "words, asked",
    [
        (ACCELERATE + ["--num_processes", "2", "ppo_rlhf.py"], 2),
        (ACCELERATE + ["--num-processes=4", "sft.py", "--seed", "3"], 4),
        (ACCELERATE + ["--cpu", "--num_processes", "3", "-m", "x"], 3),
        (ACCELERATE + ["sft.py", "--num_processes", "2"], 1),  # after the script: the script's own argument
        (ACCELERATE + ["--num_processes", "1", "sft.py"], 1),
        (ACCELERATE + ["ppo_rlhf.py"], 1),
        (["/usr/bin/python3", "-m", "torch.distributed.run", "--nproc_per_node", "2", "sft.py"], 1),
        (["bash", "launch", "--num_processes", "2"], 1),  # not accelerate
    ],
)
def test_the_launchers_process_count_is_read_from_its_command_line(words, asked):
    assert launcher_asked_processes(words) == asked


@pytest.mark.slow
def test_accelerate_asked_for_two_processes_that_starts_one_stops_before_any_model_loads(tmp_path):
    """`accelerate launch --num_processes 2` on a host without GPUs and without a config file starts ONE process,
    which would train with half the batch per update and twice the updates; the script stops, naming the launch
    lines that do start two processes."""
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not on PATH")
    proc = subprocess.run(
        [
            accelerate,
            "launch",
            "--num_processes",
            "2",
            os.path.join(ROOT, "sft.py"),
            "--output-dir",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        env={**os.environ, **OFFLINE_ENV, **ONE_THREAD, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode == 0 or "WORLD_SIZE" in proc.stderr:
        pytest.skip("this host started two processes (it has GPUs or an accelerate config)")
    assert "error: --num-processes: accelerate launch was asked for 2 processes but started one" in proc.stderr
    assert "torchrun --nproc_per_node 2" in proc.stderr
    assert not (tmp_path / "o" / "model.safetensors").exists()
