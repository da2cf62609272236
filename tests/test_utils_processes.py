"""rlhf_utils.processes: the launch a script runs in (accelerate, torchrun), checked before any model loads; the
DeepSpeed settings a training loop relies on, whatever the launcher's config file says, and the frozen models without
DeepSpeed. The launches themselves, end to end: tests/test_ppo_rlhf.py, tests/test_distributed.py and
docs/scale_out.md."""

import os
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch
from helpers import OFFLINE_ENV, ONE_THREAD, ROOT

from rlhf_utils.processes import configure_deepspeed, launcher_asked_processes, prepare_frozen

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


def deepspeed_accelerator(config: dict, processes: int = 2):
    plugin = SimpleNamespace(deepspeed_config=config)
    return SimpleNamespace(num_processes=processes, state=SimpleNamespace(deepspeed_plugin=plugin))


def test_configure_deepspeed_overrides_the_config_files_batch_sizes_and_clipping():
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 16,
        "zero_optimization": {"stage": 2},
    }
    assert configure_deepspeed(deepspeed_accelerator(config), 4, 8, 1.0) == 2
    assert config == {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 8,
        "gradient_clipping": 1.0,
        "train_batch_size": 64,  # 4 x 8 x 2 processes
        "zero_optimization": {"stage": 2},
    }


def test_configure_deepspeed_under_zero3_gathers_weights_to_save_and_none_clips_nothing():
    config = {"zero_optimization": {"stage": 3}}
    assert configure_deepspeed(deepspeed_accelerator(config, processes=1), 2, 1, None) == 3
    assert config["gradient_clipping"] == 0.0
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_prepare_frozen_without_deepspeed_is_the_model_itself_on_the_device():
    model = torch.nn.Linear(2, 2)
    assert prepare_frozen(model, SimpleNamespace(device=torch.device("cpu")), 4, False, None) is model
