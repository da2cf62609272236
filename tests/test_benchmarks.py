"""Tests of benchmark/speed_compare.py, benchmark/learning_compare.py and benchmark/step_ablation.py.

Fast tests check the bookkeeping on synthetic runs (warm-up exclusion, medians, paired ratios, the table, the
targets line) and the peak-memory measurement itself (a child that holds a known amount of memory, through
/usr/bin/time and through the getrusage fallback). Slow tests run the scripts as a user would with tiny settings:
ours alone when the TRL interpreter is missing, ours and TRL when it is there (skipped cleanly otherwise), the tldr
shape (skipped when ../shared is absent), the scaling table, the learning comparison and the step ablation."""

import json
import math
import os
import re
import sys

import pytest
from helpers import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import common  # noqa: E402
import speed_compare  # noqa: E402

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Two updates (the first is warm-up) of 4 episodes, 8-token responses, one PPO epoch.
TINY = [
    "--repeats",
    "1",
    "--num-updates",
    "2",
    "--per-device-train-batch-size",
    "4",
    "--gradient-accumulation-steps",
    "1",
    "--local-rollout-forward-batch-size",
    "4",
    "--response-length",
    "8",
    "--num-ppo-epochs",
    "1",
    "--max-prompts",
    "64",
]
TRL_OK, TRL_WHY = speed_compare.trl_available(speed_compare.default_trl_python())
needs_trl = pytest.mark.skipif(not TRL_OK, reason=f"TRL reference not available: {TRL_WHY}")
needs_shared = pytest.mark.skipif(not os.path.isfile(speed_compare.TLDR_PROMPTS), reason="../shared/data is absent")


# ---------------------------------------------------------------------------------------------------------------
# Bookkeeping on synthetic runs


def fake_updates(update_s: list, split=(0.25, 0.25, 0.4)) -> list:
    return [
        {
            "update": i + 1,
            "update_s": t,
            "generation_s": split[0] * t,
            "rollout_forwards_s": split[1] * t,
            "training_s": split[2] * t,
            "other_s": (1 - sum(split)) * t,
        }
        for i, t in enumerate(update_s)
    ]


def fake_run(impl: str, repeat: int, update_s: list, rss: float) -> dict:
    return {
        "impl": impl,
        "tag": f"tiny_{impl}_r{repeat}",
        "repeat": repeat,
        "peak_rss_mib": rss,
        "load_average_1min_before": 1.0,
        "rss_method": "/usr/bin/time -v",
        "summary": speed_compare.summarize_updates(fake_updates(update_s), batch_size=8),
    }


def test_summary_excludes_the_warm_up_update():
    s = speed_compare.summarize_updates(fake_updates([100.0, 1.0, 3.0]), batch_size=8)
    assert s["updates_counted"] == 2
    assert s["episodes_per_s"] == pytest.approx(8 * 2 / 4.0)
    assert s["update_s"] == pytest.approx(2.0)
    assert s["training_s"] == pytest.approx(0.8) and s["other_s"] == pytest.approx(0.2)
    assert speed_compare.summarize_updates(fake_updates([1.0]), batch_size=8) is None


def test_medians_and_paired_ratios():
    runs = [
        fake_run("ours", 0, [9, 1, 1], 100),
        fake_run("trl", 0, [9, 4, 4], 400),
        fake_run("trl", 1, [9, 2, 2], 300),
        fake_run("ours", 1, [9, 1, 1], 150),  # ABBA order
        fake_run("ours", 2, [9, 2, 2], 200),
        fake_run("trl", 2, [9, 10, 10], 1000),
    ]
    agg = speed_compare.aggregate(runs, ["ours", "trl"])
    assert agg["medians"]["ours"]["episodes_per_s"] == pytest.approx(8.0)  # 8, 8, 4 episodes/s
    assert agg["medians"]["trl"]["peak_rss_mib"] == 400
    speedup = agg["ratios_vs_ours"]["trl"]["episodes_per_s"]
    assert speedup["per_repeat"] == pytest.approx([4.0, 2.0, 5.0])  # repeat i of ours over repeat i of TRL
    assert speedup["median"] == pytest.approx(4.0)
    assert agg["ratios_vs_ours"]["trl"]["peak_rss_mib"]["median"] == pytest.approx(0.25)

    results = {
        "settings": {**vars(speed_compare.resolve(speed_compare.Args(shape="tldr"))), "repeats": 3},
        "machine": {
            "date": "today",
            "nproc": 2,
            "cpu_model": "cpu",
            "torch": "2",
            "transformers": "5",
            "commit": "abc",
            "ppo_rlhf_py_uncommitted_changes": False,
            "load_average_at_start": (1, 1, 1),
        },
        "task": {"prompts": "p"},
        "trl_version": "1.12.0",
        "aggregate": agg,
        "runs": runs,
    }
    table = speed_compare.speed_markdown(results)
    assert "| **ours / TRL 1.12.0 PPOTrainer** | **4x** |" in table
    assert "episodes/s >= 5x TRL: **not met** (4.00x)" in table and "1/3 of TRL: **met** (0.25x)" in table
    assert table.count("| tiny_") == 6


def test_shape_defaults_and_validation():
    tiny = speed_compare.resolve(speed_compare.Args())
    assert (tiny.per_device_train_batch_size, tiny.gradient_accumulation_steps, tiny.response_length) == (16, 4, 53)
    tldr = speed_compare.resolve(speed_compare.Args(shape="tldr", response_length=16))
    assert (tldr.per_device_train_batch_size, tldr.num_ppo_epochs, tldr.num_threads, tldr.response_length) == (
        8,
        4,
        1,
        16,
    )
    with pytest.raises(SystemExit, match="at least 2"):
        speed_compare.resolve(speed_compare.Args(num_updates=1))
    with pytest.raises(SystemExit, match="--shape tldr"):
        speed_compare.resolve(speed_compare.Args(scaling=True))


def test_default_trl_python_is_the_repositorys_own_venv_only(monkeypatch, tmp_path):
    """No machine-specific fallback: without the repository's .venv-trl the default names it (and TRL is skipped)."""
    monkeypatch.setattr(common, "ROOT", str(tmp_path))
    assert speed_compare.default_trl_python() == os.path.join(str(tmp_path), ".venv-trl", "bin", "python")
    assert (
        "trl-venv"
        not in open(speed_compare.__file__).read()
        + open(os.path.join(ROOT, "benchmark", "learning_compare.py")).read()
    )


def test_both_commands_come_from_one_set_of_settings():
    """common.FLAGS spells each setting for ppo_rlhf.py and for TRL's runner: every setting both take has the same
    value on both command lines; booleans and None follow each command line's own spelling."""

    def flags(cmd):
        out, i = {}, 2
        while i < len(cmd):
            takes_value = i + 1 < len(cmd) and not cmd[i + 1].startswith("--")
            out[cmd[i]] = cmd[i + 1] if takes_value else True
            i += 2 if takes_value else 1
        return out

    args = speed_compare.resolve(speed_compare.Args(shape="tldr", missing_eos_penalty=None, seed=7))
    args.ours_snapshot, args.trl_python = "ppo_rlhf.py", "python"
    task = {"sft": "/sft", "reward": "/rm", "tokenizer": "/tok", "prompts": "/prompts"}
    ours = flags(speed_compare.ours_command(args, task, "/out"))
    trl = flags(speed_compare.trl_command(args, task, "/out", gc_freeze=False))
    both = [(o, t) for _, o, t in common.FLAGS if o and t and (o in ours or t in trl)]
    both = [(o, t) for o, t in both if o not in ("--bf16", "--missing-eos-penalty")]  # spelled apart, below
    assert len(both) == 17 and [ours.get(o) for o, t in both] == [trl.get(t) for o, t in both]
    assert ours["--seed"] == "7" and ours["--total-episodes"] == str(args.num_updates * 8)
    assert ours["--no-bf16"] and "--bf16" not in trl  # off: tyro's --no- switch; the runner's default
    assert ours["--missing-eos-penalty"] == "None" and "--missing-eos-penalty" not in trl
    assert trl["--num-threads"] == "1" and trl["--results-json"] == "/out/trl_results.json" and trl["--quiet"]
    assert ours["--eval-strategy"] == "no" and ours["--save-steps"] == "0" and "--eval-strategy" not in trl
    with pytest.raises(KeyError, match="kl_coeff"):
        common.command("ours", [], {"kl_coeff": 0.1})


def test_trl_missing_is_reported_not_raised(tmp_path):
    ok, why = speed_compare.trl_available(str(tmp_path / "no" / "python"))
    assert not ok and "no TRL python" in why
    import importlib.util

    if importlib.util.find_spec("trl") is None:  # the project's own venv normally has no trl
        ok, why = speed_compare.trl_available(sys.executable)
        assert not ok and "not installed" in why


@pytest.mark.parametrize("method", ["gnu_time", "rusage_wrapper"])
def test_peak_rss_of_a_child(tmp_path, monkeypatch, method):
    if method == "gnu_time" and not os.path.exists("/usr/bin/time"):
        pytest.skip("/usr/bin/time is not installed")
    if method == "rusage_wrapper":
        monkeypatch.setattr(speed_compare.shutil, "which", lambda *a, **k: None)
    hold = "b = bytearray(300 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])"  # touch every page: 300 MiB resident
    rec = speed_compare.run_measured([sys.executable, "-c", hold], dict(os.environ), str(tmp_path / "m.log"), 60)
    assert rec["returncode"] == 0
    assert 300 <= rec["peak_rss_mib"] < 400, rec
    assert 0 < rec["cpu_s"] < 60 and rec["cpu_share"] > 0
    small = speed_compare.run_measured([sys.executable, "-c", "pass"], dict(os.environ), str(tmp_path / "s.log"), 60)
    assert small["peak_rss_mib"] < 100  # a fresh measurement: not the maximum over earlier children


# ---------------------------------------------------------------------------------------------------------------
# The scripts, end to end


def check_speed_results(results_dir, stem: str, impls: list, num_updates: int = 2):
    with open(os.path.join(results_dir, stem + ".json")) as f:
        results = json.load(f)
    assert results["implementations"] == impls
    assert results["machine"]["nproc"] >= 1 and results["machine"]["torch"].startswith("2.")
    assert results["machine"]["ours_script_sha256"]
    for rec in results["runs"]:
        assert len(rec["per_update"]) == num_updates, rec["impl"]
        s = rec["summary"]
        assert s["updates_counted"] == num_updates - 1
        assert 0 < s["episodes_per_s"] < 1e4 and 0 < s["update_s"] < 600
        assert min(s[f"{p}_s"] for p in ("generation", "rollout_forwards", "training")) > 0
        parts = s["generation_s"] + s["rollout_forwards_s"] + s["training_s"] + s["other_s"]
        assert parts == pytest.approx(s["update_s"]) and s["other_s"] > -1e-3
        assert 200 < rec["peak_rss_mib"] < 20000  # a python process with torch loaded
        assert rec["returncode"] == 0
    table = open(os.path.join(results_dir, stem + ".md")).read()
    assert "| ours (ppo_rlhf.py) |" in table and results["machine"]["cpu_model"] in table
    return results, table


@pytest.mark.slow
def test_speed_compare_tiny_ours_only_when_trl_is_missing(tmp_path):
    proc = run_script(
        "benchmark/speed_compare.py",
        "--shape",
        "tiny",
        *TINY,
        "--trl-python",
        str(tmp_path / "none"),
        "--work-dir",
        str(tmp_path / "work"),
        "--results-dir",
        str(tmp_path / "results"),
        env=ONE_THREAD,
    )
    assert "TRL SKIPPED" in proc.stdout
    results, table = check_speed_results(tmp_path / "results", "speed_tiny", ["ours"])
    assert "ours / " not in table and results["aggregate"]["ratios_vs_ours"] == {}
    assert not os.path.exists(tmp_path / "work" / "tiny_ours_r0")  # run folders are removed once parsed
    assert os.path.exists(tmp_path / "work" / "logs" / "tiny_ours_r0.log")


@pytest.mark.slow
@needs_trl
def test_speed_compare_tiny_against_trl(tmp_path):
    run_script(
        "benchmark/speed_compare.py",
        "--shape",
        "tiny",
        *TINY,
        "--work-dir",
        str(tmp_path / "work"),
        "--results-dir",
        str(tmp_path / "results"),
        env=ONE_THREAD,
    )
    results, table = check_speed_results(tmp_path / "results", "speed_tiny", ["ours", "trl"])
    ratios = results["aggregate"]["ratios_vs_ours"]["trl"]
    assert ratios["episodes_per_s"]["median"] > 0 and ratios["peak_rss_mib"]["median"] > 0
    assert "| **ours / TRL 1.12.0 PPOTrainer** |" in table and "Issue 8 target" in table
    trl_run = next(r for r in results["runs"] if r["impl"] == "trl")
    assert trl_run["trl"]["versions"]["trl"] == "1.12.0"
    # Same settings on both sides: the batch TRL derived is ours.
    assert trl_run["trl"]["derived"]["batch_size"] == 4
    assert "--num-threads 1" in trl_run["command"] and "--missing-eos-penalty 1.0" in trl_run["command"]


@pytest.mark.slow
@needs_shared
def test_speed_compare_tldr_shape_and_scaling(tmp_path):
    build = tmp_path / "build"
    common = [
        "--shape",
        "tldr",
        "--build-dir",
        str(build),
        "--work-dir",
        str(tmp_path / "work"),
        "--results-dir",
        str(tmp_path / "results"),
        "--max-prompt-tokens",
        "300",
    ]
    impls = ["ours", "trl"] if TRL_OK else ["ours"]
    run_script("benchmark/speed_compare.py", *common, *TINY, *([] if TRL_OK else ["--skip-trl"]), env=ONE_THREAD)
    results, _ = check_speed_results(tmp_path / "results", "speed_tldr", impls)
    task = results["task"]
    assert task["vocab_size"] == 50304 and task["max_tokens"] <= 300 and task["prompts_kept"] == 64
    assert task["model"]["hidden_size"] == 128 and task["model"]["num_hidden_layers"] == 4

    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(build / "tokenizer"))
    assert (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.eos_token_id) == ("[PAD]", 50277, 0)
    assert tokenizer.padding_side == "left"
    rm = AutoConfig.from_pretrained(str(build / "reward_model"))
    assert rm.num_labels == 1 and rm.pad_token_id == 50277

    # Scaling reuses the cached build: ours only, one row per (batch, response length).
    run_script(
        "benchmark/speed_compare.py",
        *common,
        "--scaling",
        "--num-updates",
        "2",
        "--num-ppo-epochs",
        "1",
        "--max-prompts",
        "64",
        "--per-device-train-batch-size",
        "2",
        "--scaling-response-lengths",
        "2",
        "4",
        "--scaling-batch-sizes",
        "1",
        "2",
        "--response-length",
        "4",
        "--repeats",
        "1",
        env=ONE_THREAD,
    )
    with open(tmp_path / "results" / "scaling_tldr.json") as f:
        scaling = json.load(f)
    assert [(r["batch_size"], r["response_length"]) for r in scaling["table"]] == [(2, 2), (2, 4), (1, 4)]
    assert [r["tag"] for r in scaling["runs"]] == ["scaling_b2_r2_r0", "scaling_b2_r4_r0", "scaling_b1_r4_r0"]
    assert all(r["impl"] == "ours" and r["summary"]["update_s"] > 0 for r in scaling["runs"])
    assert all(row["update_s"] > 0 and row["repeats"] == 1 and 0 < row["cpu_share"] for row in scaling["table"])
    assert all(row["median_update_s"] == row["update_s"] for row in scaling["table"])  # one repeat: its own median
    assert "ms per response token" in open(tmp_path / "results" / "scaling_tldr.md").read()


@pytest.mark.slow
def test_learning_compare_tiny_budget(tmp_path):
    args = [
        "--total-episodes",
        "16",
        "--per-device-train-batch-size",
        "8",
        "--gradient-accumulation-steps",
        "1",
        "--local-rollout-forward-batch-size",
        "8",
        "--response-length",
        "8",
        "--num-ppo-epochs",
        "1",
        "--max-prompts",
        "64",
        "--num-eval-prompts",
        "12",
        "--eval-response-length",
        "8",
        "--jobs",
        "2",
        "--work-dir",
        str(tmp_path / "work"),
        "--results-dir",
        str(tmp_path / "results"),
    ]
    if not TRL_OK:
        args.append("--skip-trl")
    run_script("benchmark/learning_compare.py", *args, env=ONE_THREAD)
    with open(tmp_path / "results" / "learning_embedded.json") as f:
        results = json.load(f)
    impls = ["ours", "trl"] if TRL_OK else ["ours"]
    assert results["implementations"] == impls
    (seed,) = results["per_seed"]
    for name in ["sft", *impls]:
        assert math.isfinite(seed["gold"][name]) and seed["gold"][name] <= 4.0
    for impl in impls:
        w = seed["win_vs_sft"][impl]
        assert 0 <= w["ci_low"] <= w["win_rate"] <= w["ci_high"] <= 1 and w["wins"] + w["ties"] + w["losses"] == 12
        assert seed["train"][impl]["episodes"] == 16
        assert os.path.exists(tmp_path / "work" / "completions" / f"{impl}_s1.jsonl")
    if TRL_OK:
        assert os.path.isfile(tmp_path / "work" / "trl_s1" / "policy" / "config.json")
        assert "ours_vs_trl" in seed
    table = open(tmp_path / "results" / "learning_embedded.md").read()
    assert "| SFT policy (start) |" in table and "| ours (ppo_rlhf.py) |" in table


@pytest.mark.slow
def test_step_ablation_tiny(tmp_path):
    """benchmark/step_ablation.py times every variant and counts the positions each kind of forward computes."""
    proc = run_script(
        "benchmark/step_ablation.py",
        "--shape",
        "tiny",
        "--batch-size",
        "6",
        "--response-length",
        "12",
        "--repeats",
        "1",
        "--results-dir",
        str(tmp_path),
        env=ONE_THREAD,
    )
    table = open(tmp_path / "step_ablation_tiny.md").read()
    assert table.strip() in proc.stdout
    padded, grouped, real = (
        int(x) for x in re.search(r"(\d+) padded, (\d+) in length groups, (\d+) real", table).groups()
    )
    assert real <= grouped <= padded
    rows = dict(re.findall(r"^\| ([^|]+?) \| (\d+\.\d+) \|", table, flags=re.M))
    assert set(rows) == {
        "plain",
        "+ length groups",
        "+ chunked logprobs",
        "+ fused AdamW",
        "+ bf16 autocast",
        "generation: torch.multinomial",
        "generation: inverse-CDF sample_tokens",
    }
    assert all(float(s) > 0 for s in rows.values())


@pytest.mark.parametrize("arch", ["gpt_neox", "qwen2"])
def test_forward_flops_count_what_torch_counts(arch):
    """The equal-work ceiling's FLOP model (weight matmuls per position, LM head per head position) against torch's
    own FLOP counter on a real forward of a small model of each realistic shape's architecture. The counter does not
    count SDPA's attention on this CPU, so the comparison leaves the attention term out."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    fields = (
        dict(
            speed_compare.PYTHIA160M_MODEL,
            hidden_size=96,
            num_attention_heads=4,
            intermediate_size=200,
            num_hidden_layers=2,
        )
        if arch == "gpt_neox"
        else dict(speed_compare.QWEN05B_MODEL, hidden_size=112, intermediate_size=300, num_hidden_layers=2)
    )
    config = CONFIG_MAPPING[arch](**{**fields, "vocab_size": 1000})
    model = AutoModelForCausalLM.from_config(config).eval()
    dims = dict(speed_compare.model_dims(config.to_dict()), attention_width=0)
    tokens = torch.randint(0, 1000, (3, 40))
    mask = torch.ones_like(tokens)
    mask[0, :10] = 0  # padding is computed all the same
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        hidden = model.base_model(input_ids=tokens, attention_mask=mask).last_hidden_state
    assert counter.get_total_flops() == speed_compare.forward_flops(dims, [(3, 40)], 0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.get_output_embeddings()(hidden[:, -7:])
    assert counter.get_total_flops() == speed_compare.forward_flops(dims, [], 3 * 7)


def test_update_flops_and_ceiling():
    """TRL pays for padding and the LM head at prompt positions; ours for one more rollout forward (the policy's, for
    exact ratio-1 log-probs). Equal prompts and a one-column vocabulary leave ours only that extra forward; padding
    and a large vocabulary raise the ceiling."""
    dims = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 1, "matmul_params": 10_000, "attention_width": 64}

    def one_group(lengths):
        return [list(range(len(lengths)))]

    same = speed_compare.update_flops(dims, [100] * 8, 20, 4, one_group)
    assert same["trl"]["training"] == pytest.approx(same["ours"]["training"], rel=1e-3)
    assert same["trl"]["generation"] == same["ours"]["generation"]
    assert same["ours"]["rollout_forwards"] == pytest.approx(4 / 3 * same["trl"]["rollout_forwards"], rel=1e-3)
    lengths = [40, 60, 80, 100, 300, 320, 340, 500]
    groups = lambda ls: [[0, 1, 2, 3], [4, 5, 6], [7]]  # noqa: E731
    mixed = speed_compare.update_flops(dims, lengths, 20, 4, groups)
    assert mixed["ours"]["training"] < 0.6 * mixed["trl"]["training"]  # 8 x 520 padded vs 4x120 + 3x360 + 520
    big_vocab = speed_compare.update_flops(dict(dims, vocab_size=50_000), lengths, 20, 4, groups)
    ratio = lambda f: sum(f["trl"].values()) / sum(f["ours"].values())  # noqa: E731
    assert ratio(big_vocab) > ratio(mixed) > ratio(same)
    ceiling = speed_compare.equal_work_ceiling(dict(dims, vocab_size=50_000), lengths * 10, 8, 20, 4, samples=20)
    assert ceiling["ceiling"] == pytest.approx(ceiling["trl_total_tflop"] / ceiling["ours_total_tflop"])
    assert ceiling["ceiling"] > 1 and 0 < ceiling["head_share_per_position"] < 1
