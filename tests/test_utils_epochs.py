"""Tests of rlhf_utils/epochs.py: the optimizer steps of whole and fractional epochs, the clipped optimizer step that
stops on a non-finite gradient norm, and the start of a fresh run that drops an earlier run's checkpoints."""

import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch

from rlhf_utils import epochs


@dataclasses.dataclass
class Args(epochs.EpochArgs):
    learning_rate: float = 0.1
    num_train_epochs: float = 1
    output_dir: str = "out"


class OneProcess:
    """What the helpers ask of an Accelerator on one process, without building one."""

    num_processes, is_main_process, sync_gradients = 1, True, True

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


@pytest.mark.parametrize("epochs_, expected", [(1, 5), (2, 10), (0.5, 3), (1.5, 8), (0.1, 1)])
def test_update_steps_of_whole_and_fractional_epochs(epochs_, expected):
    """10 batches, 2 per step: 5 steps an epoch; a fraction of an epoch is that share of them, rounded up."""
    args = Args(num_train_epochs=epochs_, gradient_accumulation_steps=2, warmup_ratio=0.0)
    model = torch.nn.Linear(2, 1)
    optimizer, scheduler, num_update_steps = epochs.adamw_and_schedule(args, model, range(10), OneProcess())
    assert num_update_steps == expected
    assert [g["lr"] for g in optimizer.param_groups] == [0.1]


def test_optimizer_step_stops_before_a_non_finite_gradient_reaches_the_weights():
    args = Args()
    model = torch.nn.Linear(2, 1)
    optimizer, scheduler, _ = epochs.adamw_and_schedule(args, model, range(4), OneProcess())
    before = model.weight.detach().clone()
    (model(torch.tensor([[float("inf"), 1.0]])).sum()).backward()
    with pytest.raises(SystemExit, match="non-finite gradient norm at optimizer step 4"):
        epochs.optimizer_step(args, OneProcess(), model, optimizer, scheduler, 3)
    assert torch.equal(model.weight, before)


def test_a_fresh_run_drops_the_checkpoints_of_the_run_it_replaces(tmp_path):
    args = Args(output_dir=str(tmp_path))
    os.makedirs(tmp_path / "checkpoints" / "checkpoint-3")
    accelerator = SimpleNamespace(is_main_process=True)
    assert epochs.resume_position(args, None, None, None, accelerator, None, None, None, None) == ([], 0, 0, 0)
    assert not os.path.exists(tmp_path / "checkpoints")
