"""rlhf_utils.runs: a signal asks the run to stop at the end of an update, end_run leaves a finished run without the
interpreter's teardown (two processes on gloo), the progress bar (a terminal only) and the W&B names. Signals and
progress in whole runs: tests/test_faults.py and tests/test_ecosystem.py."""

import os
import pty
import signal
import subprocess
import sys

import pytest
from helpers import ROOT, free_port

from rlhf_utils import runs
from rlhf_utils.runs import (
    append_metrics,
    end_run,
    progress_bar,
    reduce_stats,
    stop_on_signals,
    stop_requested,
    wandb_row,
)

# ---------------------------------------------------------------------------------------------------------------
# stopping and ending


class OneProcess:
    """What stop_requested and end_run use of an Accelerator in a one-process run."""

    num_processes = 1

    def __init__(self):
        self.calls = []

    def wait_for_everyone(self):
        self.calls.append("wait_for_everyone")

    def end_training(self):
        self.calls.append("end_training")


def test_a_signal_asks_for_a_stop_at_the_update_end(monkeypatch):
    monkeypatch.setitem(runs.STOP, "signal", None)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop_on_signals()
        assert stop_requested(OneProcess()) is None
        os.kill(os.getpid(), signal.SIGTERM)  # handled: this process goes on
        assert runs.STOP["signal"] == signal.SIGTERM and stop_requested(OneProcess()) == signal.SIGTERM
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_end_run_of_one_process_waits_ends_training_and_exits_with_the_code():
    accelerator = OneProcess()
    with pytest.raises(SystemExit) as info:
        end_run(accelerator, 3)
    assert info.value.code == 3 and accelerator.calls == ["wait_for_everyone", "end_training"]


EXIT_PROGRAM = """
import atexit, os, sys
import torch
sys.path.insert(0, {root!r})
from accelerate import Accelerator
from rlhf_utils.runs import end_run

accelerator = Accelerator(cpu=True)
keep = [torch.distributed.group.WORLD]  # DeepSpeed's globals hold the groups like this
for _ in range(50):
    out = [torch.empty(1000) for _ in range(accelerator.num_processes)]
    torch.distributed.all_gather(out, torch.full((1000,), float(accelerator.process_index)))
marker = os.path.join({folder!r}, f"atexit_ran_{{accelerator.process_index}}")
atexit.register(lambda: open(marker, "w").close())
{ending}
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_finished_two_process_run_exits_0_not_with_gloos_teardown_abort(tmp_path):
    """end_run against the abort at interpreter teardown (gloo's threads releasing their last collectives' tensors
    after finalization began): this program aborted in 8 of 8 runs when it ended with accelerator.end_training()
    alone (EXIT_TEST_ENDING="accelerator.end_training()" shows it). The atexit handlers (the output folder's lock
    release) still run."""
    ending = os.environ.get("EXIT_TEST_ENDING", "end_run(accelerator)")  # to show the abort without end_run
    failures = []
    for i in range(4):
        folder = tmp_path / str(i)
        folder.mkdir()
        program = folder / "program.py"
        program.write_text(EXIT_PROGRAM.format(root=ROOT, folder=str(folder), ending=ending))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
        ]
        proc = subprocess.run(
            [*cmd, str(program)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if proc.returncode != 0 or "terminate called" in proc.stderr:
            failures.append(f"run {i}: exit {proc.returncode}\n{proc.stderr[-1500:]}")
        elif sorted(os.listdir(folder)) != ["atexit_ran_0", "atexit_ran_1", "program.py"]:
            failures.append(f"run {i}: the atexit handlers did not run: {os.listdir(folder)}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------------------------
# progress and logging


def test_progress_bar_only_on_a_terminal_of_the_main_process(monkeypatch):
    """The bar's decision; what a whole run writes on a real terminal is in tests/test_ecosystem.py."""
    make = progress_bar
    master, slave = pty.openpty()
    read_end, write_end = os.pipe()
    try:
        with open(slave, "w", closefd=False) as tty, open(write_end, "w", closefd=False) as pipe:
            monkeypatch.setattr(sys, "stderr", tty)
            bar = make(10, "episode", True, initial=2)
            bar.update(3)
            assert "5/10" in str(bar) and "episode/s" in str(bar)  # position, rate and time left
            bar.close()
            assert make(10, "episode", False) is None  # other processes never draw
            monkeypatch.setattr(sys, "stderr", pipe)
            assert make(10, "episode", True) is None  # piped logs keep one line per update
    finally:
        for fd in (master, slave, read_end, write_end):
            os.close(fd)


def test_wandb_names_follow_one_convention():
    row = wandb_row({"train/loss": 1.0, "lr": 1e-3, "epoch": 0, "step": 4, "eval/loss": 2.0})
    assert row == {
        "train/loss": 1.0,
        "train/learning_rate": 1e-3,
        "train/epoch": 0,
        "train/global_step": 4,
        "eval/loss": 2.0,
    }


def test_reduce_stats_reduces_every_statistic_in_one_call_and_keeps_the_names():
    import torch

    class TwoSameProcesses:
        calls = 0

        def reduce(self, tensor, op):
            self.calls += 1
            return tensor * 2 if op == "sum" else tensor

    accelerator = TwoSameProcesses()
    out = reduce_stats(accelerator, {"a": torch.tensor(1.0), "b": torch.tensor(3.0)}, "sum")
    assert list(out) == ["a", "b"] and out["a"].item() == 2.0 and out["b"].item() == 6.0
    assert accelerator.calls == 1


def test_append_metrics_adds_one_json_line_per_row(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    append_metrics(path, {"loss": 1.0}, track=False)
    append_metrics(path, {"eval/score": 2.0}, track=False)
    with open(path) as f:
        assert f.read() == '{"loss": 1.0}\n{"eval/score": 2.0}\n'
