"""Learning curves and a final-values table of PPO runs, from their local metrics files (no W&B needed).

    python benchmark/plot.py --runs "ours=models/ppo_s1,models/ppo_s2" "trl=runs/trl_s1/results.json" \
        --output benchmark/plots/ppo.png
    python benchmark/plot.py --run "ours=models/ppo_tldr/seed_*" --run trl=runs/trl_s1/results.json --smoothing 10

A run is an output_dir of ppo_rlhf.py / ppo_rlhf_tldr.py (its `metrics.jsonl`, one JSON row per logged update or
evaluation), a `metrics.jsonl` file, or the `--results-json` of benchmark/trl_ppo_runner.py (its `metrics_history`
is the list of TRL's logged dicts, same metric names). Runs are grouped by label; the seeds of a label are
interpolated onto a common episode grid and drawn as their mean line with a min-max (or +-std) band.

`metrics.jsonl` interleaves training and evaluation rows; they are told apart by their keys. Training rows carry the
17 metrics (`objective/kl`, ...) with `episode` and `update`; evaluation rows (every --eval-steps updates) carry only
`eval/*` (`eval/score`, `eval/kl`, `eval/eos_rate`, `eval/response_length`) with `episode` and `update`;
ppo_rlhf_tldr.py adds one `initial_eval/*` and one `final_eval/*` row. Here each panel takes the rows that have its
metric. To read one yourself:

    import pandas as pd
    rows = pd.read_json("models/ppo_tiny/metrics.jsonl", lines=True)
    train, evals = rows[rows["objective/kl"].notna()], rows[rows["eval/score"].notna()]

Writes a PNG grid (one panel per metric, x axis `episode`) and a markdown table of the final values (per label:
mean +- std over seeds of each seed's last logged value; std with ddof=0, as openrlbenchmark's tables), printed and
saved next to the PNG with the `.md` suffix. Metrics a run does not log are skipped.
"""

import glob
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

# The 17 metrics of PPO_REFERENCE.md / TRL's PPOTrainer; `episode` is the x axis of every panel.
METRICS = [
    "eps",
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/scores",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "policy/entropy_avg",
    "val/ratio",
    "val/ratio_var",
    "val/num_eos_tokens",
    "lr",
    "episode",
]


@dataclass
class Args:
    runs: List[str] = field(default_factory=list)
    """run groups `LABEL=PATH[,PATH...]`; a PATH is a run dir, a metrics.jsonl, a TRL results .json, or a glob"""
    run: tyro.conf.UseAppendAction[List[str]] = field(default_factory=list)
    """one run group `LABEL=PATH[,PATH...]` per flag; a label given several times collects all its paths"""
    output: str = "benchmark/plots/ppo.png"
    """the PNG to write; the table goes next to it with the .md suffix"""
    smoothing: int = 1
    """trailing moving-average window over each seed's logged training points, before averaging seeds (1 = off)"""
    band: Literal["minmax", "std"] = "minmax"
    """the shaded band around the mean over seeds: min-max, or mean +- std"""
    num_points: int = 500
    """at most this many points of the common episode grid of each label"""


def fail(message: str) -> None:
    sys.exit(f"error: {message}")


def parse_groups(specs: List[str]) -> Dict[str, List[str]]:
    """`LABEL=PATH[,PATH...]` specs -> {label: [paths]}, glob patterns expanded, labels in order of appearance."""
    groups: Dict[str, List[str]] = {}
    for spec in specs:
        label, sep, paths = spec.partition("=")
        if not sep or not label or not paths:
            fail(f"run group {spec!r} is not of the form LABEL=PATH[,PATH...] (e.g. ours=models/ppo_s1,models/ppo_s2)")
        for pattern in filter(None, paths.split(",")):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not matches:
                fail(f"no run matches the pattern {pattern!r} (label {label!r})")
            groups.setdefault(label, [])
            groups[label] += [m for m in matches if m not in groups[label]]
    return groups


def load_rows(path: str) -> list:
    """The logged rows of one run: a TRL runner results .json (its metrics_history) or a metrics.jsonl."""
    if path.endswith(".json"):
        if not os.path.isfile(path):
            fail(f"no TRL results file at {path}")
        with open(path) as f:
            results = json.load(f)
        if "metrics_history" not in results:
            fail(f"{path} has no `metrics_history`: pass the --results-json of benchmark/trl_ppo_runner.py")
        return results["metrics_history"]
    metrics_path = path if path.endswith(".jsonl") else os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        fail(f"no metrics file at {metrics_path}: pass the output_dir of a ppo_rlhf.py run (or a TRL results .json)")
    with open(metrics_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_run(path: str) -> Dict[str, tuple]:
    """{metric: (episodes, values)} sorted by episode; a re-logged episode (resumed run) keeps its last value."""
    points: Dict[str, dict] = {}
    for row in load_rows(path):
        episode = row.get("episode")
        if not isinstance(episode, (int, float)):
            continue  # rows without an episode (e.g. a trainer's end-of-training summary) have no place on the x axis
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                points.setdefault(key, {})[float(episode)] = float(value)
    return {key: (np.array(sorted(p)), np.array([p[e] for e in sorted(p)])) for key, p in points.items()}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average; the first points average over what exists so far."""
    if window <= 1:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))  # sums[i] = sum of the first i values
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - window, 0)
    return (sums[end] - sums[start]) / (end - start)


def aggregate(series: list, band: str, num_points: int) -> tuple:
    """Seeds' (episodes, values) -> (grid, mean, low, high) on one grid: the episodes any seed logged (evenly spaced
    points if more than num_points). Each seed counts only inside its own episode range (no extrapolation), so a
    seed that stopped early drops out at its end."""
    grid = np.unique(np.concatenate([x for x, _ in series]))
    if len(grid) > num_points:
        grid = np.linspace(grid[0], grid[-1], num_points)
    stacked = np.stack([np.where((grid >= x[0]) & (grid <= x[-1]), np.interp(grid, x, y), np.nan) for x, y in series])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # grid points no seed covers are NaN on purpose
        mean = np.nanmean(stacked, 0)
        if band == "std":
            std = np.nanstd(stacked, 0)
            return grid, mean, mean - std, mean + std
        return grid, mean, np.nanmin(stacked, 0), np.nanmax(stacked, 0)


def describe(label: str, seeds: list) -> str:
    return f"{label} ({len(seeds)} seed{'s' * (len(seeds) != 1)})"


def final_values_table(runs: Dict[str, list], metrics: List[str]) -> str:
    """Markdown table: one row per metric, one column per label, `mean ± std` over seeds of the last logged value."""
    header = "| metric | " + " | ".join(describe(label, seeds) for label, seeds in runs.items())
    lines = [header + " |", "|---|" + "---|" * len(runs)]
    for metric in metrics:
        cells = []
        for seeds in runs.values():
            finals = np.array([run[metric][1][-1] for run in seeds if metric in run])
            if len(finals) == 0:
                cells.append("n/a")
                continue
            cell = f"{finals.mean():.4g} ± {finals.std():.2g}"
            cells.append(cell + (f" ({len(finals)}/{len(seeds)} seeds)" if len(finals) < len(seeds) else ""))
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(args: Args) -> str:
    """Write the PNG and the markdown table; return the table."""
    if args.smoothing < 1 or args.num_points < 2:
        fail("--smoothing must be >= 1 and --num-points >= 2")
    groups = parse_groups(args.runs + args.run)
    if not groups:
        fail('no runs given: pass --runs "LABEL=DIR[,DIR...]" ... or --run LABEL=DIR (repeatable)')
    runs = {label: [load_run(path) for path in paths] for label, paths in groups.items()}
    present = {key for seeds in runs.values() for run in seeds for key in run}
    evals = sorted(key for key in present if key.startswith("eval/"))
    panels = [m for m in METRICS if m != "episode" and m in present] + evals
    skipped = [m for m in METRICS if m not in present]
    if skipped:
        print(f"skipped (logged by no run): {', '.join(skipped)}")
    if not panels:
        fail(f"none of the runs logs any of the metrics {METRICS[:-1]} against `episode`")

    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, panels):
        for i, (label, seeds) in enumerate(runs.items()):
            window = 1 if metric.startswith("eval/") else args.smoothing  # evaluations: few points, fixed prompts
            series = [(run[metric][0], smooth(run[metric][1], window)) for run in seeds if metric in run]
            if not series:
                continue
            grid, mean, low, high = aggregate(series, args.band, args.num_points)
            ax.plot(
                grid,
                mean,
                color=f"C{i % 10}",
                lw=1.5,
                label=label,
                marker="o" if len(grid) <= 30 else None,
                markersize=3,
            )
            if len(series) > 1:
                ax.fill_between(grid, low, high, color=f"C{i % 10}", alpha=0.2, lw=0)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("episode", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.remove()
    handles = {}
    for ax in axes.flat[: len(panels)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    band = "min-max over seeds" if args.band == "minmax" else "mean ± std over seeds"
    fig.legend(
        list(handles.values()),
        [describe(label, runs[label]) for label in handles],
        loc="upper center",
        ncol=min(len(handles), 4),
        title=f"mean over seeds, band: {band}"
        + (f", smoothing window {args.smoothing}" if args.smoothing > 1 else ""),
    )
    legend_rows = math.ceil(len(handles) / 4)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.45 + 0.25 * legend_rows) / fig.get_figheight()))  # the top is the legend's
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    fig.savefig(args.output, dpi=100)
    plt.close(fig)

    table = final_values_table(runs, [m for m in METRICS if m in present] + evals)
    table_path = os.path.splitext(args.output)[0] + ".md"
    sources = "\n".join(f"- {label}: " + ", ".join(f"`{p}`" for p in paths) for label, paths in groups.items())
    with open(table_path, "w") as f:
        f.write(
            f"# Final values\n\n![learning curves]({os.path.basename(args.output)})\n\nMean ± std (ddof=0) over "
            f"seeds of each seed's last logged value (unsmoothed).\n\n{table}\nRuns:\n{sources}\n"
        )
    print(table)
    print(f"wrote {args.output} and {table_path}")
    return table


if __name__ == "__main__":
    plot(tyro.cli(Args))
