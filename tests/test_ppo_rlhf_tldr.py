"""Tests of ppo_rlhf_tldr.py and pipeline.py, run as a user runs them (subprocesses with flags, tiny settings):

- the TL;DR data path: the prompt-format check, the `completion` column, the --max-prompt-length filter and its log
  line (N computed here with the tokenizer), every prompt dropped, a prompt ending with EOS;
- the saved evaluation generations (output_dir/eval_generations/{initial,final}.jsonl: one row per kept test prompt,
  in order, with the dataset's reference and a finite score that the logged metric averages), skipped with
  --dataset-final-eval-split None, and judge.py (gold) reading them;
- that `diff ppo_rlhf.py ppo_rlhf_tldr.py` stays "the TL;DR data and evaluation": identical helpers, a small diff;
- pipeline.py end to end with tiny settings, and with --use-shipped-models.

The successful runs are started together by a module fixture in two worker threads (one single-threaded subprocess
each: the two shared CPUs are both busy while the main process runs the quick failing-input tests); each test waits
for the runs it reads. Everything is written under pytest's tmp folders."""

import ast
import difflib
import json
import math
import os
import re
import shutil
import sys

import pytest
from helpers import ONE_THREAD, ROOT, Background, needs, run_script, start_wanted_runs

EMBEDDED = os.path.join(ROOT, "embedded")
PROMPTS = os.path.join(EMBEDDED, "prompts")
SFT = os.path.join(EMBEDDED, "sft_model")

# 16 episodes in 2 updates of 8 (4 x 2 micro-batches), 24-token responses, evaluation on 8 prompts after update 2.
TINY = [
    "--total-episodes",
    "16",
    "--per-device-train-batch-size",
    "4",
    "--gradient-accumulation-steps",
    "2",
    "--local-rollout-forward-batch-size",
    "8",
    "--num-sample-generations",
    "0",
    "--eval-steps",
    "2",
    "--num-eval-prompts",
    "8",
    "--response-length",
    "24",
]
LOCAL_BATCH = 8
PIPELINE_TINY = [
    "--task-args=--num-sft 300 --num-preference 300 --num-prompts 200",
    "--sft-args=--num-train-epochs 1",
    "--rm-args=--per-device-train-batch-size 32",
]
PIPELINE_PPO = (
    "--ppo-args=--total-episodes 32 --num-sample-generations 0 --per-device-train-batch-size 16 "
    "--gradient-accumulation-steps 1 --num-eval-prompts 16 --response-length 24"
)
GENERATION_KEYS = {"query", "response", "reference", "score"}


# ---------------------------------------------------------------------------------------------------------------
# tiny TL;DR datasets


def embedded_split(split):
    from datasets import load_from_disk

    return load_from_disk(PROMPTS)[split]


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SFT, padding_side="left")


def token_lengths(prompts):
    tok = tokenizer()
    return [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]


def save_tldr(path, splits):
    """A DatasetDict save_to_disk folder from {split: list of rows}."""
    from datasets import Dataset, DatasetDict

    DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(str(path))
    return str(path)


def rows_of(split, n):
    data = embedded_split(split)[:n]
    return [{"prompt": p, "completion": c} for p, c in zip(data["prompt"], data["completion"])]


def good_splits():
    return {"train": rows_of("train", 16), "validation": rows_of("validation", 8), "test": rows_of("test", 8)}


def mixed(split, n_short, n_long, max_len, pattern):
    """n_short prompts of at most max_len tokens and n_long longer ones from the embedded split, interleaved by
    pattern (a string of s and l), so that the dropped prompts sit between kept ones."""
    data = embedded_split(split)[:300]
    prompts, completions = data["prompt"], data["completion"]
    lengths = token_lengths(prompts)
    short = [i for i, n in enumerate(lengths) if n <= max_len][:n_short]
    long = [i for i, n in enumerate(lengths) if n > max_len][:n_long]
    assert len(short) == n_short and len(long) == n_long and sorted(pattern) == sorted("s" * n_short + "l" * n_long)
    queue = {"s": iter(short), "l": iter(long)}
    return [{"prompt": prompts[i], "completion": completions[i]} for i in (next(queue[c]) for c in pattern)]


def filtered_dataset(path):
    """Train, validation and test splits in which some prompts are longer than the returned --max-prompt-length."""
    max_len = sorted(token_lengths(embedded_split("train")[:300]["prompt"]))[150]  # the median train prompt
    splits = {
        "train": mixed("train", 12, 6, max_len, "sslssslsslsslsslsl"),
        "validation": mixed("validation", 5, 3, max_len, "lsslssls"),
        "test": mixed("test", 5, 3, max_len, "slsslsls"),
    }
    return save_tldr(path, splits), max_len


# ---------------------------------------------------------------------------------------------------------------
# running the scripts: successful runs in the background, shared between tests


def tldr_cmd(*args):
    return [sys.executable, os.path.join(ROOT, "ppo_rlhf_tldr.py"), *args]


def plan(bg):
    """Every background run a test may ask for, as name: prepare. prepare() builds the run's inputs in the main thread
    (importing transformers/datasets from two threads at once is not safe) and returns the job for a worker. The
    longest run comes first, so that the two workers finish at about the same time."""
    root = bg.root

    def filtered():
        dataset, max_len = filtered_dataset(os.path.join(root, "filtered_data"))
        out = os.path.join(root, "filtered")
        return lambda: bg.run(
            "filtered",
            tldr_cmd("--dataset-name", dataset, *TINY, "--max-prompt-length", str(max_len), "--output-dir", out),
            out=out,
            dataset=dataset,
            max_len=max_len,
        )

    def no_final_eval():
        dataset = save_tldr(os.path.join(root, "good_data"), good_splits())
        out = os.path.join(root, "no_final_eval")
        return lambda: bg.run(
            "no_final_eval",
            tldr_cmd("--dataset-name", dataset, *TINY, "--dataset-final-eval-split", "None", "--output-dir", out),
            out=out,
        )

    def pipeline(name, *flags):
        work = os.path.join(root, name)
        cmd = [sys.executable, os.path.join(ROOT, "pipeline.py"), "--work-dir", work, *flags, PIPELINE_PPO]
        return lambda: lambda: bg.run(name, cmd, timeout=1200, work=work)

    return {
        "pipeline": pipeline("pipeline", *PIPELINE_TINY),
        "filtered": filtered,
        "no_final_eval": no_final_eval,
        "pipeline_shipped": pipeline("pipeline_shipped", "--use-shipped-models"),
    }


@pytest.fixture(scope="module", autouse=True)
def runs(request, tmp_path_factory):
    bg = Background(str(tmp_path_factory.mktemp("tldr_runs")))
    yield start_wanted_runs(request, bg, plan(bg))
    bg.close()


def run_tldr(tmp_path, dataset, *extra):
    """A run expected to stop early; returns (process, output_dir)."""
    out = tmp_path / "out"
    proc = run_script(
        "ppo_rlhf_tldr.py",
        "--dataset-name",
        dataset,
        *TINY,
        *extra,
        "--output-dir",
        str(out),
        check=False,
        timeout=600,
        env={**ONE_THREAD, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")},
    )
    return proc, out


def files_under(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_clean_error(proc, argument, *fragments):
    """A non-zero exit with a one-line `error: --argument: ...` message (no traceback) holding the fragments."""
    assert proc.returncode != 0, f"the run did not stop:\n{proc.stdout[-3000:]}"
    assert f"error: {argument}:" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr[proc.stderr.index(f"error: {argument}:") :]
    for fragment in fragments:
        assert fragment in message, (fragment, message[:2000])


# ---------------------------------------------------------------------------------------------------------------
# the TL;DR data path: bad input stops the run before any work, naming the flag


FORMAT_CASES = {
    # a prompt without the SUBREDDIT header, in the train split
    "no subreddit header": ("train", 3, lambda p: p[p.index("TITLE:") :]),
    # the common slip: a space after `TL;DR:`, in the final-evaluation split only
    "space after TL;DR:": ("test", 5, lambda p: p + " "),
}


@pytest.mark.parametrize("case", list(FORMAT_CASES))
def test_prompt_not_in_tldr_format_is_rejected_and_nothing_is_written(case, tmp_path):
    split, row, corrupt = FORMAT_CASES[case]
    splits = good_splits()
    splits[split][row]["prompt"] = corrupt(splits[split][row]["prompt"])
    proc, out = run_tldr(tmp_path, save_tldr(tmp_path / "data", splits))
    assert_clean_error(proc, "--dataset-name", "TL;DR format", f"1 of {len(splits[split])} prompts in split {split!r}")
    assert not out.exists(), files_under(out)


def test_missing_completion_column_is_rejected(tmp_path):
    splits = good_splits()
    splits["validation"] = [{"prompt": r["prompt"]} for r in splits["validation"]]
    proc, out = run_tldr(tmp_path, save_tldr(tmp_path / "data", splits))
    assert_clean_error(proc, "--dataset-name", "completion", "'validation'")
    assert not out.exists(), files_under(out)


def test_prompt_ending_with_the_eos_text_is_rejected(tmp_path):
    """`<|endoftext|>` at the end of a prompt: rejected before training, and the message shows it. (The TL;DR format
    check runs first and catches it, since such a prompt no longer ends with `TL;DR:`.)"""
    splits = good_splits()
    splits["train"][2]["prompt"] += "<|endoftext|>"
    proc, out = run_tldr(tmp_path, save_tldr(tmp_path / "data", splits))
    assert_clean_error(proc, "--dataset-name", "<|endoftext|>", "'train'")
    assert not out.exists(), files_under(out)


def test_prompt_whose_last_token_is_eos_is_rejected_by_the_token_check(tmp_path):
    """The token-level EOS check itself: with a tokenizer whose EOS is `:`, every TL;DR prompt (ending `TL;DR:`)
    passes the format check but ends with the EOS token."""
    tok = tokenizer()
    tok.eos_token = ":"
    models = {}
    for name in ("sft_model", "reward_model"):  # the models must carry the same tokenizer (the vocabulary check)
        shutil.copytree(os.path.join(ROOT, "embedded", name), tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        models[name] = str(tmp_path / name)
    proc, out = run_tldr(
        tmp_path,
        save_tldr(tmp_path / "data", good_splits()),
        "--model-name-or-path",
        models["sft_model"],
        "--sft-model-path",
        models["sft_model"],
        "--reward-model-path",
        models["reward_model"],
    )
    assert_clean_error(proc, "--dataset-name", "end with the EOS token", "'train'")
    assert not out.exists() or not files_under(out)


def test_every_prompt_too_long_is_an_error_naming_max_prompt_length(tmp_path):
    proc, out = run_tldr(tmp_path, save_tldr(tmp_path / "data", good_splits()), "--max-prompt-length", "10")
    assert_clean_error(proc, "--max-prompt-length", "split 'train'", "10 tokens")
    assert "dropped 16 of 16 prompts" in proc.stdout, proc.stdout[-2000:]
    assert not out.exists() or not files_under(out)


# ---------------------------------------------------------------------------------------------------------------
# the length filter and the saved evaluation generations (one run, shared)


def kept_rows(dataset, split, max_len, first=None):
    from datasets import load_from_disk

    data = load_from_disk(dataset)[split]
    rows = data.to_list()[:first]
    lengths = token_lengths([r["prompt"] for r in rows])
    return rows, [r for r, n in zip(rows, lengths) if 0 < n <= max_len]


@pytest.mark.slow
@needs("filtered")
def test_length_filter_counts_the_dropped_prompts_of_every_split(runs):
    run = runs["filtered"]().check()
    dataset, max_len = run.info["dataset"], run.info["max_len"]
    for split, first in (("train", None), ("validation", 8), ("test", None)):  # --num-eval-prompts 8 selects first
        rows, kept = kept_rows(dataset, split, max_len, first)
        dropped = len(rows) - len(kept)
        assert 0 < dropped < len(rows), (split, dropped)  # the dataset was built so that the filter bites
        line = f"split {split!r}: dropped {dropped} of {len(rows)} prompts longer than --max-prompt-length {max_len}"
        assert line in run.stdout, (line, re.findall(r"split .*dropped.*", run.stdout))
    _, kept_train = kept_rows(dataset, "train", max_len)
    assert f"{len(kept_train)} train / " in run.stdout


@pytest.mark.slow
@needs("filtered")
def test_saved_generations_are_the_kept_test_prompts_in_order_with_references_and_scores(runs):
    run = runs["filtered"]().check()
    _, kept = kept_rows(run.info["dataset"], "test", run.info["max_len"])
    metrics = read_jsonl(os.path.join(run.info["out"], "metrics.jsonl"))
    for name in ("initial", "final"):
        rows = read_jsonl(os.path.join(run.info["out"], "eval_generations", f"{name}.jsonl"))
        assert len(rows) == len(kept), name
        for row in rows:
            assert set(row) == GENERATION_KEYS, (name, sorted(row))
            assert isinstance(row["response"], str)
            assert isinstance(row["score"], float) and math.isfinite(row["score"]), (name, row["score"])
        assert [r["query"] for r in rows] == [r["prompt"] for r in kept], name
        assert [r["reference"] for r in rows] == [r["completion"] for r in kept], name
        # the logged mean score of this evaluation is the mean of the saved rows: the file holds what was evaluated
        (logged,) = [m[f"{name}_eval/score"] for m in metrics if f"{name}_eval/score" in m]
        assert logged == pytest.approx(sum(r["score"] for r in rows) / len(rows), abs=1e-4), name
    assert not os.path.exists(os.path.join(run.info["out"], "eval_generations", "final.jsonl.tmp"))


@pytest.mark.slow
@needs("filtered")
def test_judge_gold_reads_the_saved_generations(runs, tmp_path):
    from judge import judge_gold, load_completions
    from tiny_tldr import gold_score

    run = runs["filtered"]().check()
    folder = os.path.join(run.info["out"], "eval_generations")
    final, initial = os.path.join(folder, "final.jsonl"), os.path.join(folder, "initial.jsonl")
    n = len(read_jsonl(final))
    for b, name in ((initial, "final_vs_initial"), ("reference", "final_vs_reference")):
        output = tmp_path / f"{name}.json"
        proc = run_script(
            "judge.py", "--a", final, "--b", b, "--judge", "gold", "--output", str(output), timeout=300, env=ONE_THREAD
        )
        assert "win rate" in proc.stdout, proc.stdout[-2000:]
        result = json.loads(output.read_text())
        assert result["n"] == n and result["wins"] + result["ties"] + result["losses"] == n
        assert 0.0 <= result["ci_low"] <= result["win_rate"] <= result["ci_high"] <= 1.0
        assert f"{result['win_rate']:.3f}" in proc.stdout
    expected = judge_gold(load_completions(final), load_completions(initial), gold_score)
    assert json.loads((tmp_path / "final_vs_initial.json").read_text())["win_rate"] == expected["win_rate"]


@pytest.mark.slow
@needs("no_final_eval")
def test_final_eval_split_none_skips_the_saved_generations(runs):
    run = runs["no_final_eval"]().check()
    out = run.info["out"]
    assert not os.path.exists(os.path.join(out, "eval_generations")), files_under(out)
    assert "split 'test'" not in run.stdout  # the test split is not even loaded
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert not [k for r in rows for k in r if k.startswith(("initial_eval/", "final_eval/"))]
    assert [r["update"] for r in rows if "objective/kl" in r] == [1, 2]  # training itself ran as usual
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# `diff ppo_rlhf.py ppo_rlhf_tldr.py` is the TL;DR data and evaluation, nothing else

TLDR_ONLY_ARGS = {"dataset_final_eval_split", "max_prompt_length", "eval_initial_policy"}
MAX_DIFF_LINES = 150  # the TL;DR changes are 148 changed lines at the time of writing


def source(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def top_level_definitions(text):
    tree = ast.parse(text)
    return {
        node.name: node
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }


def args_fields(text, node):
    """Args' fields as {name: (annotation, default)} source text."""
    return {
        stmt.target.id: (
            ast.get_source_segment(text, stmt.annotation),
            ast.get_source_segment(text, stmt.value) if stmt.value is not None else None,
        )
        for stmt in node.body
        if isinstance(stmt, ast.AnnAssign)
    }


# The TL;DR part lives in these: the arguments, loading and tokenising its data format, and saving its generations.
TLDR_FUNCTIONS = {"Args", "prompt_format", "load_prompts", "tokenize_prompts", "write_output"}


def test_every_helper_of_ppo_rlhf_is_in_the_tldr_variant_unchanged():
    ppo_text, tldr_text = source("ppo_rlhf.py"), source("ppo_rlhf_tldr.py")
    ppo, tldr = top_level_definitions(ppo_text), top_level_definitions(tldr_text)
    assert len(ppo) > 10  # the parse found the helpers
    missing = [name for name in ppo if name not in tldr]
    changed = [
        name
        for name in ppo
        if name in tldr
        and name not in TLDR_FUNCTIONS
        and ast.get_source_segment(ppo_text, ppo[name]) != ast.get_source_segment(tldr_text, tldr[name])
    ]
    assert not missing and not changed, f"only in ppo_rlhf.py: {missing}; different in ppo_rlhf_tldr.py: {changed}"
    # Args: every knob of ppo_rlhf.py with the same type and default; the only new ones are the TL;DR data/eval knobs
    ppo_fields, tldr_fields = args_fields(ppo_text, ppo["Args"]), args_fields(tldr_text, tldr["Args"])
    assert {k: v for k, v in tldr_fields.items() if k in ppo_fields} == ppo_fields
    assert set(tldr_fields) - set(ppo_fields) == TLDR_ONLY_ARGS


def test_the_diff_between_ppo_rlhf_and_the_tldr_variant_stays_small():
    diff = difflib.unified_diff(source("ppo_rlhf.py").splitlines(), source("ppo_rlhf_tldr.py").splitlines(), n=0)
    changed = [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len(changed) < MAX_DIFF_LINES, f"{len(changed)} changed lines:\n" + "\n".join(changed[:80])


# ---------------------------------------------------------------------------------------------------------------
# pipeline.py, the one-command embedded pipeline


def check_summary(run, stages):
    run.check()
    for row in (
        "SFT gold score",
        "PPO gold score",
        "PPO win rate vs SFT",
        "RM accuracy vs gold labels",
        "PPO KL to SFT",
        "time: total",
    ):
        assert row in run.stdout, (row, run.stdout[-3000:])
    with open(os.path.join(run.info["work"], "summary.json")) as f:
        summary = json.load(f)
    for key in ("sft_gold_score", "ppo_gold_score", "ppo_kl_to_sft", "ppo_rm_score"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), (key, summary[key])
    assert 0.0 <= summary["ci_low"] <= summary["ppo_win_rate_vs_sft"] <= summary["ci_high"] <= 1.0, summary
    assert summary["wins"] + summary["ties"] + summary["losses"] == summary["n"] > 0
    assert list(summary["times_s"]) == stages
    assert all(math.isfinite(t) and t >= 0 for t in summary["times_s"].values()), summary["times_s"]
    # the gold scores are those of the saved generations of the whole test split
    from tiny_tldr import gold_score

    folder = os.path.join(run.info["work"], "ppo", "eval_generations")
    for name, key in (("final", "ppo_gold_score"), ("initial", "sft_gold_score")):
        rows = read_jsonl(os.path.join(folder, f"{name}.jsonl"))
        assert len(rows) == summary["n"]
        assert summary[key] == pytest.approx(
            sum(gold_score(r["query"], r["response"]) for r in rows) / len(rows), abs=1e-6
        )
    return summary


@pytest.mark.slow
@needs("pipeline")
def test_pipeline_tiny_end_to_end(runs):
    run = runs["pipeline"]()
    summary = check_summary(run, ["task", "sft", "reward model", "ppo", "judge"])
    assert isinstance(summary["rm_gold_accuracy"], float) and 0.5 < summary["rm_gold_accuracy"] <= 1.0, summary
    assert f"{summary['rm_gold_accuracy']:.1%}" in run.stdout
    assert summary["n"] == len(task_test_split(os.path.join(run.info["work"], "task", "prompts")))
    for stage in ("task", "sft_model", "reward_model", "ppo"):
        assert os.path.isdir(os.path.join(run.info["work"], stage)), stage


@pytest.mark.slow
@needs("pipeline_shipped")
def test_pipeline_with_shipped_models(runs):
    run = runs["pipeline_shipped"]()
    summary = check_summary(run, ["ppo", "judge"])
    assert summary["rm_gold_accuracy"] is None and "shipped model" in run.stdout
    assert summary["n"] == len(embedded_split("test"))
    assert sorted(os.listdir(run.info["work"])) == ["ppo", "summary.json"]  # nothing rebuilt, embedded/ untouched


def task_test_split(path):
    from datasets import load_from_disk

    return load_from_disk(path)["test"]
