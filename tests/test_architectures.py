"""The models users bring: every architecture of tests/tiny_archs.MATRIX through the whole pipeline (sft.py ->
reward_modeling.py with its defaults, normalisation on -> ppo_rlhf.py for two updates), tokenizers without a pad token
(the real GPT-NeoX-20B tokenizer, as Pythia ships it), and the checks on reward/value models and context lengths.

The scripts run in this process (runpy, as `python script.py ...` would, with the imports shared), so that each
architecture costs a few seconds rather than three interpreter starts."""

import json
import os
import runpy
import sys

import pytest
import torch
from helpers import ROOT, SHARED, run_in_process
from tiny_archs import MATRIX, save_tiny_causal_lm

EMBEDDED = os.path.join(ROOT, "embedded")
NEOX_TOKENIZER = os.path.join(SHARED, "data", "tokenizers", "gpt-neox-20b_tokenizer.json")


def run_inline(script, argv, tmp_path, monkeypatch, capsys) -> str:
    """Run `python <script> <argv>` in this process; returns its stdout, or fails the test with its error."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(sys, "argv", [script, *argv])
    capsys.readouterr()
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            pytest.fail(f"{script} {' '.join(argv)} exited: {e.code}\n{capsys.readouterr().out[-3000:]}")
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A few rows of each embedded dataset, so that each script spends its time on the model, not the data."""
    from datasets import DatasetDict, load_from_disk

    root = tmp_path_factory.mktemp("data")
    sft, pref, prompts = (
        load_from_disk(os.path.join(EMBEDDED, n)) for n in ("sft_data", "preference_data", "prompts")
    )
    DatasetDict(train=sft["train"].select(range(32)), validation=sft["validation"].select(range(8))).save_to_disk(
        str(root / "sft")
    )
    DatasetDict(train=pref["train"].select(range(32)), test=pref["test"].select(range(8))).save_to_disk(
        str(root / "pref")
    )
    DatasetDict(
        train=prompts["train"].select(range(16)), validation=prompts["validation"].select(range(4))
    ).save_to_disk(str(root / "prompts"))
    return {name: str(root / name) for name in ("sft", "pref", "prompts")}


def reference_sequences(tokenizer, data_dir, n=8, max_length=256):
    """What reward_modeling.py scores for its normalisation: prompt + completion + EOS of the first n references."""
    from datasets import load_from_disk

    refs = load_from_disk(data_dir)["validation"].select(range(n))
    seqs = [
        tokenizer(p + c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for p, c in zip(refs["prompt"], refs["completion"])
    ]
    return [s for s in seqs if len(s) <= max_length]


def stock_scores(path, sequences):
    """Scores of a saved reward model as a stock from_pretrained reads them, plus config.reward_shift if any."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import reward_modeling as rm

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    pad = AutoTokenizer.from_pretrained(path).pad_token_id
    with torch.no_grad():
        scores = rm.get_reward(model, *rm.pad_batch(sequences, pad))
    return scores, getattr(model.config, "reward_shift", 0.0)


def pipeline(base, data, out, tmp_path, monkeypatch, capsys, ppo_extra=()) -> dict:
    """sft.py -> reward_modeling.py (defaults: normalisation on) -> ppo_rlhf.py, two updates of 4 rollouts, one PPO epoch
    and one mini-batch each (so update 1's val/ratio is the first mini-batch's). Returns the logs and paths."""
    sft_out, rm_out, ppo_out = (os.path.join(out, n) for n in ("sft", "rm", "ppo"))
    logs = {}
    logs["sft"] = run_inline(
        "sft.py",
        [
            "--model-name-or-path",
            base,
            "--dataset-name",
            data["sft"],
            "--output-dir",
            sft_out,
            "--num-train-epochs",
            "1",
            "--per-device-train-batch-size",
            "16",
            "--num-sample-completions",
            "0",
            "--logging-steps",
            "1",
        ],
        tmp_path,
        monkeypatch,
        capsys,
    )
    logs["rm"] = run_inline(
        "reward_modeling.py",
        [
            "--model-name-or-path",
            sft_out,
            "--dataset-name",
            data["pref"],
            "--output-dir",
            rm_out,
            "--normalize-dataset-name",
            data["sft"],
            "--normalize-num-examples",
            "8",
            "--per-device-train-batch-size",
            "16",
            "--logging-steps",
            "1",
        ],
        tmp_path,
        monkeypatch,
        capsys,
    )
    logs["ppo"] = run_inline(
        "ppo_rlhf.py",
        [
            "--model-name-or-path",
            sft_out,
            "--sft-model-path",
            sft_out,
            "--reward-model-path",
            rm_out,
            "--dataset-name",
            data["prompts"],
            "--output-dir",
            ppo_out,
            "--total-episodes",
            "8",
            "--per-device-train-batch-size",
            "4",
            "--gradient-accumulation-steps",
            "1",
            "--num-ppo-epochs",
            "1",
            "--local-rollout-forward-batch-size",
            "4",
            "--response-length",
            "8",
            "--num-sample-generations",
            "0",
            "--eval-strategy",
            "no",
            *ppo_extra,
        ],
        tmp_path,
        monkeypatch,
        capsys,
    )
    with open(os.path.join(ppo_out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {"logs": logs, "rows": rows, "sft": sft_out, "rm": rm_out, "ppo": ppo_out}


@pytest.fixture(scope="module")
def embedded_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(EMBEDDED, "sft_model"))


@pytest.mark.slow
@pytest.mark.parametrize("arch", MATRIX)
def test_every_architecture_runs_the_pipeline(arch, small_data, embedded_tokenizer, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    base = save_tiny_causal_lm(arch, tmp_path / "base", tokenizer=embedded_tokenizer)
    run = pipeline(base, small_data, str(tmp_path / "out"), tmp_path, monkeypatch, capsys)
    updates = [r for r in run["rows"] if "val/ratio" in r]
    assert [r["update"] for r in updates] == [1, 2], run["rows"]
    assert abs(updates[0]["val/ratio"] - 1.0) < 1e-5, updates[0]  # fp32, first mini-batch: the rollout's own policy
    # The normalisation: the references score 0 on average, as a stock from_pretrained (+ config.reward_shift) reads
    # them; the shift sits in a norm bias exactly where the architecture has one before the head.
    # (The tokenizer as saved with the model: in transformers 5 a model folder's model_type picks the tokenizer class,
    # and Qwen2's tokenises the same tokenizer.json differently from the embedded one.)
    saved_tokenizer = AutoTokenizer.from_pretrained(run["rm"])
    scores, shift = stock_scores(run["rm"], reference_sequences(saved_tokenizer, small_data["sft"]))
    assert abs((scores + shift).mean().item()) < 1e-4, (scores, shift)
    in_bias = arch in ("gpt_neox", "gpt2", "opt")
    assert (shift == 0.0) == in_bias, shift
    assert ("the final norm's bias" if in_bias else "config.reward_shift") in run["logs"]["rm"]


@pytest.mark.slow
def test_attention_dropout_in_the_config_still_runs(small_data, embedded_tokenizer, tmp_path, monkeypatch, capsys):
    base = save_tiny_causal_lm("llama", tmp_path / "base", tokenizer=embedded_tokenizer, attention_dropout=0.3)
    run = pipeline(base, small_data, str(tmp_path / "out"), tmp_path, monkeypatch, capsys)
    assert [r["update"] for r in run["rows"] if "val/ratio" in r] == [1, 2]


def neox_tokenizer():
    """The real GPT-NeoX-20B tokenizer as Pythia ships it: EOS/BOS/UNK <|endoftext|>, no pad token."""
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(NEOX_TOKENIZER):
        pytest.skip(f"{NEOX_TOKENIZER} is absent")
    return PreTrainedTokenizerFast(
        tokenizer_file=NEOX_TOKENIZER, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


@pytest.mark.slow
def test_get_started_command_with_a_pythia_shaped_model_and_its_real_tokenizer(tmp_path, monkeypatch, capsys):
    """The seed's get-started command, verbatim but for the hub ids (a local Pythia-shaped folder: GPT-NeoX with
    Pythia's 50,304 embedding rows and the real tokenizer, which has no pad token) and fewer episodes."""
    from test_commands import GET_STARTED, descriptiveness_standin
    from transformers import AutoTokenizer

    tokenizer = neox_tokenizer()
    pythia = save_tiny_causal_lm(
        "gpt_neox", tmp_path / "pythia-1b-deduped", vocab_size=50304, tokenizer=tokenizer, max_position_embeddings=2048
    )
    assert AutoTokenizer.from_pretrained(pythia).pad_token is None  # the case is what it claims
    standin = descriptiveness_standin(str(tmp_path / "descriptiveness-sentiment-trl-style"))
    argv = [
        standin if a == "<standin>" else pythia if os.path.isabs(a) and "embedded" in a else a for a in GET_STARTED
    ]
    assert argv.count(pythia) == 3  # --model_name_or_path, --sft_model_path, --reward_model_path
    argv[argv.index("--total_episodes") + 1] = "64"  # one update of the command's 64 rollouts
    monkeypatch.chdir(tmp_path)
    log = run_inline("ppo_rlhf.py", argv, tmp_path, monkeypatch, capsys)
    assert "added a dedicated pad token '[PAD]' (id 50277)" in log, log[-2000:]
    for folder in ("models/minimal/ppo", "models/minimal/ppo/value_model"):
        saved = AutoTokenizer.from_pretrained(str(tmp_path / folder))
        assert saved.pad_token == "[PAD]" and saved.pad_token_id == 50277 != saved.eos_token_id, folder
    with open(tmp_path / "models/minimal/ppo/metrics.jsonl") as f:
        assert [json.loads(line)["update"] for line in f if "val/ratio" in line] == [1]


@pytest.mark.slow
def test_a_full_vocabulary_is_resized_once_by_sft_and_refused_by_ppo(small_data, tmp_path, monkeypatch, capsys):
    """A Llama-3-style model whose embedding has no spare row for the new [PAD]: sft.py resizes it (and saves the
    tokenizer with it), reward_modeling.py and ppo_rlhf.py then take both as they are; ppo_rlhf.py on the raw model
    refuses before loading any weights, naming the fix."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = neox_tokenizer()
    base = save_tiny_causal_lm("llama", tmp_path / "base", vocab_size=len(tokenizer), tokenizer=tokenizer)
    error = run_in_process(
        "ppo_rlhf.py",
        [
            "--model-name-or-path",
            base,
            "--sft-model-path",
            base,
            "--reward-model-path",
            base,
            "--dataset-name",
            small_data["prompts"],
            "--output-dir",
            str(tmp_path / "refused"),
            "--per-device-train-batch-size",
            "4",
            "--gradient-accumulation-steps",
            "1",
            "--total-episodes",
            "4",
        ],
        tmp_path,
        monkeypatch,
    )
    assert isinstance(error, SystemExit) and str(error.code).startswith("error: --sft-model-path:"), error
    assert "50277 embedding rows, fewer than the 50278 tokens" in error.code and "sft.py" in error.code
    assert not os.path.exists(tmp_path / "refused")
    monkeypatch.undo()
    run = pipeline(base, small_data, str(tmp_path / "out"), tmp_path, monkeypatch, capsys)
    assert "resized the embeddings from 50277 to 50278 rows" in run["logs"]["sft"]
    assert "resized" not in run["logs"]["rm"] and "added a dedicated" not in run["logs"]["ppo"]
    for folder in (run["sft"], run["rm"], run["ppo"]):
        assert AutoConfig.from_pretrained(folder).vocab_size == 50278
        assert AutoTokenizer.from_pretrained(folder).pad_token_id == 50277
    assert abs([r for r in run["rows"] if "val/ratio" in r][0]["val/ratio"] - 1.0) < 1e-5


@pytest.mark.parametrize("script", ["ppo_rlhf.py", "ppo_rlhf_tldr.py"])
def test_prompts_past_the_context_are_dropped_and_counted(
    script, small_data, embedded_tokenizer, tmp_path, monkeypatch, capsys
):
    """GPT-2 has an absolute position table: prompt + response past it would index out of the table. With a
    100-position table and 8-token responses, prompts longer than 92 tokens are dropped, and counted in the log."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    base = save_tiny_causal_lm("gpt2", tmp_path / "base", tokenizer=embedded_tokenizer, n_positions=100)
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = load_from_disk(small_data["prompts"])
    lengths = {s: [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in data[s]["prompt"]] for s in data}
    too_long = {s: sum(n > 92 for n in lengths[s]) for s in data}
    assert 0 < too_long["train"] <= 12, lengths  # the filter bites, and leaves a batch of 4
    argv = [
        "--model-name-or-path",
        base,
        "--sft-model-path",
        base,
        "--reward-model-path",
        base,
        "--dataset-name",
        small_data["prompts"],
        "--output-dir",
        str(tmp_path / "out"),
        "--total-episodes",
        "4",
        "--per-device-train-batch-size",
        "4",
        "--gradient-accumulation-steps",
        "1",
        "--num-ppo-epochs",
        "1",
        "--local-rollout-forward-batch-size",
        "4",
        "--response-length",
        "8",
        "--num-sample-generations",
        "0",
        "--eval-strategy",
        "no",
    ]
    if script == "ppo_rlhf_tldr.py":
        argv += ["--dataset-final-eval-split", "None"]
    log = run_inline(script, argv, tmp_path, monkeypatch, capsys)
    if script == "ppo_rlhf.py":
        assert (
            f"dropped {too_long['train']} of 16 train and {too_long['validation']} of 4 eval prompts longer than 92 "
            "tokens"
        ) in log, log[-2000:]
    else:
        for split in ("train", "validation"):
            assert (
                f"split {split!r}: dropped {too_long[split]} of {len(lengths[split])} prompts longer than 92 tokens "
                "(the models' context of 100"
            ) in log, log[-2000:]


def test_normalisation_falls_back_to_the_config_when_a_layer_follows_the_final_norm(
    small_data, embedded_tokenizer, tmp_path, monkeypatch, capsys
):
    """OPT with word_embed_proj_dim < hidden_size projects after its final norm: a shift of the norm's bias would not
    move every score by the same amount, which the script checks and then stores the shift in the config instead."""
    from transformers import AutoTokenizer

    base = save_tiny_causal_lm("opt", tmp_path / "base", tokenizer=embedded_tokenizer, word_embed_proj_dim=32)
    out = str(tmp_path / "rm")
    log = run_inline(
        "reward_modeling.py",
        [
            "--model-name-or-path",
            base,
            "--dataset-name",
            small_data["pref"],
            "--output-dir",
            out,
            "--normalize-dataset-name",
            small_data["sft"],
            "--normalize-num-examples",
            "8",
            "--per-device-train-batch-size",
            "16",
        ],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert "config.reward_shift" in log, log[-2000:]
    scores, shift = stock_scores(out, reference_sequences(AutoTokenizer.from_pretrained(out), small_data["sft"]))
    assert shift != 0.0 and abs((scores + shift).mean().item()) < 1e-4, (scores, shift)
