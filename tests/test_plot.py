"""Tests of benchmark/plot.py on synthetic runs whose final values are known: 2 labels x 2 seeds of metrics.jsonl
files plus one TRL runner results .json, plotted in-process and once as a user would from the command line."""

import json
import struct

import numpy as np
import pytest
from helpers import run_script

from benchmark import plot

UPDATES = 5  # every synthetic run logs 5 updates of 64 episodes; its value at update u is final * u / UPDATES
FINAL_SCORES = {"ours_s1": 1.0, "ours_s2": 2.0, "base_s1": 0.25, "base_s2": 0.75, "trl": -0.5}
FINAL_EVAL = {"ours_s1": 0.8, "ours_s2": 1.0, "base_s1": 0.1, "base_s2": 0.3}
NOT_LOGGED = "val/ratio_var"  # logged by no run: no panel, no table row
PARTLY_LOGGED = "loss/value_avg"  # missing from base_s2 only


def rows_of(name: str) -> list:
    rows = []
    for u in range(1, UPDATES + 1):
        row = {m: 0.1 * i * u for i, m in enumerate(plot.METRICS) if m not in ("episode", NOT_LOGGED)}
        row.update(
            {
                "objective/scores": FINAL_SCORES[name] * u / UPDATES,
                "episode": 64 * u,
                "update": u,
                "time/update": 1.5,
                "objective/response_length": 20.0,
            }
        )
        if name == "base_s2":
            del row[PARTLY_LOGGED]
        rows.append(row)
        if name in FINAL_EVAL and u in (3, 5):  # evaluation rows, as ppo_rlhf.py logs them
            rows.append({"eval/score": FINAL_EVAL[name] * u / UPDATES, "eval/kl": 0.0, "episode": 64 * u, "update": u})
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name in FINAL_SCORES:
        if name == "trl":  # the shape benchmark/trl_ppo_runner.py writes: TRL's logged dicts in metrics_history
            history = [{**row, "epoch": 0.1 * i} for i, row in enumerate(rows_of(name))]
            history.append({"train_runtime": 12.0, "train_loss": 0.0})  # a summary row without episode: ignored
            (root / "trl_results.json").write_text(json.dumps({"framework": "trl", "metrics_history": history}))
        else:
            (root / name).mkdir()
            (root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_of(name)))
    return root


@pytest.fixture(scope="module")
def plotted(runs, tmp_path_factory):
    """One in-process plot of all three labels; returns (png path, table, printed output)."""
    output = tmp_path_factory.mktemp("out") / "plots" / "ppo.png"
    args = plot.Args(
        runs=[f"ours={runs}/ours_s1,{runs}/ours_s2", f"trl={runs}/trl_results.json"],
        run=[f"base={runs}/base_s*"],
        output=str(output),
        smoothing=2,
    )
    table = plot.plot(args)
    return output, table


def cells(table: str, metric: str) -> list:
    for line in table.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if parts[0] == metric:
            return parts[1:]
    return None


def assert_valid_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width > 800 and height > 600 and len(data) > 30_000


def test_png_and_table_written(plotted):
    output, table = plotted
    assert_valid_png(output)
    md = output.with_suffix(".md").read_text()
    assert table in md and "![learning curves](ppo.png)" in md
    assert table.splitlines()[0] == "| metric | ours (2 seeds) | trl (1 seed) | base (2 seeds) |"


def test_table_means_and_stds_over_seeds(plotted):
    _, table = plotted
    # final objective/scores: ours 1.0 and 2.0 -> 1.5 ± 0.5; trl one seed -0.5; base 0.25 and 0.75 -> 0.5 ± 0.25
    assert cells(table, "objective/scores") == ["1.5 ± 0.5", "-0.5 ± 0", "0.5 ± 0.25"]
    # evaluation rows: ours 0.8, 1.0 -> 0.9 ± 0.1; base 0.1, 0.3 -> 0.2 ± 0.1; TRL logged none
    assert cells(table, "eval/score") == ["0.9 ± 0.1", "n/a", "0.2 ± 0.1"]
    # kl is index 1 of METRICS: 0.1 * 1 * 5 = 0.5 in every run; episode 320 everywhere
    assert cells(table, "objective/kl") == ["0.5 ± 0", "0.5 ± 0", "0.5 ± 0"]
    assert cells(table, "episode") == ["320 ± 0"] * 3


def test_missing_metrics_are_skipped(plotted, capsys):
    _, table = plotted
    assert cells(table, NOT_LOGGED) is None
    index = plot.METRICS.index(PARTLY_LOGGED)  # base_s2 lacks it: base's cell is base_s1's value alone
    assert cells(table, PARTLY_LOGGED)[2] == f"{0.1 * index * UPDATES:.4g} ± 0 (1/2 seeds)"


def test_command_line_matches_function(runs, plotted, tmp_path):
    output = tmp_path / "cli.png"
    proc = run_script(
        "benchmark/plot.py",
        "--runs",
        f"ours={runs}/ours_s1,{runs}/ours_s2",
        f"trl={runs}/trl_results.json",
        "--run",
        f"base={runs}/base_s*",
        "--output",
        str(output),
        "--smoothing",
        "2",
        timeout=120,
    )
    assert_valid_png(output)
    assert plotted[1] in output.with_suffix(".md").read_text()
    assert f"skipped (logged by no run): {NOT_LOGGED}" in proc.stdout


def test_missing_metrics_file_names_the_path(runs, tmp_path):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(SystemExit, match=f"no metrics file at {empty / 'metrics.jsonl'}"):
        plot.plot(plot.Args(run=[f"ours={runs}/ours_s1", f"ours={empty}"], output=str(tmp_path / "x.png")))
    with pytest.raises(SystemExit, match="no TRL results file at"):
        plot.plot(plot.Args(run=[f"trl={tmp_path}/missing.json"], output=str(tmp_path / "x.png")))
    with pytest.raises(SystemExit, match="no run matches the pattern"):
        plot.plot(plot.Args(run=[f"ours={tmp_path}/nothing_*"], output=str(tmp_path / "x.png")))
    with pytest.raises(SystemExit, match="LABEL=PATH"):
        plot.plot(plot.Args(runs=[str(runs / "ours_s1")], output=str(tmp_path / "x.png")))


def test_smooth_is_a_trailing_moving_average():
    values = np.array([1.0, 3.0, 2.0, 8.0, 4.0])
    expected = [np.mean(values[max(0, i - 2) : i + 1]) for i in range(len(values))]
    assert plot.smooth(values, 3) == pytest.approx(expected)
    assert plot.smooth(values, 1) is values


def test_aggregate_interpolates_seeds_onto_one_grid():
    a = (np.array([0.0, 10.0]), np.array([0.0, 10.0]))  # y = x, logged at 0 and 10
    b = (np.array([0.0, 5.0, 10.0]), np.array([2.0, 7.0, 12.0]))  # y = x + 2, logged at other episodes
    grid, mean, low, high = plot.aggregate([a, b], "minmax", num_points=3)
    assert grid == pytest.approx([0, 5, 10]) and mean == pytest.approx(grid + 1)
    assert low == pytest.approx(grid) and high == pytest.approx(grid + 2)
    _, _, low, high = plot.aggregate([a, b], "std", num_points=3)
    assert low == pytest.approx(grid) and high == pytest.approx(grid + 2)  # std of {x, x+2} is 1
    short = (np.array([0.0, 5.0]), np.array([4.0, 9.0]))  # a seed that stopped early drops out after its end
    grid, mean, _, _ = plot.aggregate([a, short], "minmax", num_points=3)
    assert mean == pytest.approx([2.0, 7.0, 10.0])
