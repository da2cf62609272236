"""The life of a run: stopping on signals at an update's end, ending processes cleanly, progress, W&B rows, timers,
the stop on non-finite numbers, statistics reduced over processes and the metrics file."""

import atexit
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from typing import Optional

import torch

STOP = {"signal": None}  # set by the handler below; the training loop reads it once per update


def stop_on_signals() -> None:
    """SIGINT (Ctrl-C) and SIGTERM (what clusters send before pre-empting a job) ask the run to stop after the
    current update, with a checkpoint; a second signal stops it at once."""

    def handler(signum, frame):
        if STOP["signal"] is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        STOP["signal"] = signum
        print(
            f"{signal.Signals(signum).name} received: stopping after the current update with a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def stop_requested(accelerator) -> Optional[int]:
    """The signal that asked the run to stop, agreed by every process (one may get it before the others)."""
    asked = STOP["signal"] is not None
    if accelerator.num_processes > 1:
        asked = accelerator.reduce(torch.tensor(float(asked), device=accelerator.device), "sum").item() > 0
    return (STOP["signal"] or signal.SIGTERM) if asked else None


def stop_run(accelerator, stop: int, where: str, checkpoint: int) -> None:
    """End a run that signal `stop` asked to stop, once checkpoint-N is written after `where` (e.g. "optimizer step
    12"): with the signal's exit status, saying how to continue."""
    accelerator.print(
        f"stopped by {signal.Signals(stop).name} after {where}, with checkpoint-{checkpoint}: continue with "
        "--resume-from-checkpoint latest",
        file=sys.stderr,
    )
    end_run(accelerator, 128 + stop)


def end_run(accelerator, code: int = 0) -> None:
    """Leave once everything is saved. Several processes leave without the interpreter's teardown: gloo's worker
    threads can still be releasing the tensors of the last collectives then, and one that needs the GIL after
    finalization has begun aborts the process ("terminate called without an active exception", exit -6) after a
    complete run. destroy_process_group() does not stop those threads while something (DeepSpeed) still holds the
    groups; tests/test_distributed.py shows the abort. What a normal exit does first (flush, the atexit handlers such
    as the output folder's lock release and wandb's finish) is done here."""
    accelerator.wait_for_everyone()
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    accelerator.end_training()
    if not distributed:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def progress_bar(total: int, unit: str, main_process: bool, initial: int = 0):
    """A bar with the rate and the time left, on the main process when stderr is a terminal; None otherwise, so piped
    logs keep their one line per update instead of carriage-return redraws."""
    if not (main_process and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    # The size once, at the start (COLUMNS/LINES, else the terminal's, else 80x24): tqdm draws nothing on a terminal
    # that reports 0 rows or columns (a fresh pseudo-terminal, some CI runners).
    size = shutil.get_terminal_size()
    return tqdm(
        total=total,
        initial=initial,
        unit=unit,
        file=sys.stderr,
        ncols=max(size.columns, 60),
        nrows=max(size.lines, 2),
        disable=False,  # shown on a terminal whatever TQDM_DISABLE says (parse_args sets it for piped logs)
    )


def wandb_row(row: dict) -> dict:
    """One W&B convention in every script, the names TRL's trainers log: train/* and eval/*, the optimizer step as
    train/global_step (every chart's x-axis, defined at wandb.init). metrics.jsonl keeps the short names."""
    names = {"lr": "train/learning_rate", "epoch": "train/epoch", "step": "train/global_step"}
    return {names.get(k, k if k.startswith(("train/", "eval/")) else "train/" + k): v for k, v in row.items()}


class Timer(dict):
    """Seconds per named phase of an update, summed over its blocks: `with timer("generation"): ...`."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.time()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.time() - start


def stop_if_not_finite(what: str, values: list, where: str, advice: str) -> None:
    """Stop the run when any of values (tensors or numbers) is inf or nan: one such number spreads to every weight at
    the next optimizer step, so stopping first keeps the last checkpoint usable."""
    if not all(torch.isfinite(torch.as_tensor(v)).all() for v in values):
        sys.exit(f"error: non-finite {what} at {where}; the run stops here{advice}")


def show_samples(title: str, columns: list, rows: list, track: bool, widths: dict) -> None:
    """Sample completions as a table on the terminal (numbers to 3 decimals, each column in `widths` cut to its last
    that many characters: the end of a long prompt is what the response follows), and whole in W&B's `samples` table
    under --track."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=True)
    for column in columns:
        table.add_column(column)
    for row in rows:
        cells = []
        for column, value in zip(columns, row):
            text = f"{value:.3f}" if isinstance(value, float) else str(value)
            cells.append(text[-widths[column] :] if column in widths else text)
        table.add_row(*cells)
    Console().print(table)
    if track:
        import wandb

        wandb.log({"samples": wandb.Table(columns=list(columns), data=[list(row) for row in rows])})


def reduce_stats(accelerator, stats: dict, op: str) -> dict:
    """Named statistics (0-d tensors) summed or averaged over processes, in one all-reduce."""
    return dict(zip(stats, accelerator.reduce(torch.stack(list(stats.values())), op)))


def append_metrics(metrics_path: str, row: dict, track: bool) -> None:
    """One logged row: a line of metrics.jsonl, and under --track a W&B step (eval/* as they are, the rest as
    train/*)."""
    with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if track:
        import wandb

        wandb.log({("train/" + k if not k.startswith("eval/") else k): v for k, v in row.items()})
