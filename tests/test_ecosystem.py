"""The ecosystem's habits, in the four scripts: TRL's `--flag True/False`, AdamW's flags, the progress bar (a terminal
only), --push-to-hub (checked before training, the saved folder uploaded as written), the model card's Hub metadata and
LoRA's all-linear. The rlhf_utils functions behind them, called directly: tests/test_utils_cli.py, test_utils_runs.py,
test_utils_hub.py."""

import json
import os
import pty
import runpy
import subprocess
import sys
import threading

import pytest
import torch
import tyro
import yaml
from helpers import ROOT, ReachedTraining, run_in_process, run_script

SCRIPTS = ["sft.py", "reward_modeling.py", "ppo_rlhf.py", "ppo_rlhf_tldr.py"]
EMBEDDED = os.path.join(ROOT, "embedded")
PPO_TINY = [
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
    "--eval-strategy",
    "no",
    "--response-length",
    "16",
    "--num-ppo-epochs",
    "1",
]


@pytest.fixture(scope="module")
def modules():
    """Each script's module-level functions (its __main__ block does not run)."""
    return {s: runpy.run_path(os.path.join(ROOT, s), run_name="ecosystem_test") for s in SCRIPTS}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Tiny SFT and preference data, so that a whole run of sft.py / reward_modeling.py takes seconds."""
    from datasets import DatasetDict, load_from_disk

    root = tmp_path_factory.mktemp("data")
    sft = load_from_disk(os.path.join(EMBEDDED, "sft_data"))
    DatasetDict(train=sft["train"].select(range(32)), validation=sft["validation"].select(range(8))).save_to_disk(
        str(root / "sft")
    )
    load_from_disk(os.path.join(EMBEDDED, "preference_data"))["train"].select(range(36)).to_json(
        str(root / "pref.jsonl")
    )
    return {"sft": str(root / "sft"), "pref": str(root / "pref.jsonl")}


def tiny_args(script: str, data: dict, out: str) -> list:
    if script == "sft.py":
        return [
            "--dataset-name",
            data["sft"],
            "--model-name-or-path",
            os.path.join(EMBEDDED, "base_model"),
            "--num-train-epochs",
            "1",
            "--per-device-train-batch-size",
            "16",
            "--logging-steps",
            "1",
            "--num-sample-completions",
            "0",
            "--output-dir",
            out,
        ]
    if script == "reward_modeling.py":
        return [
            "--dataset-name",
            data["pref"],
            "--model-name-or-path",
            os.path.join(EMBEDDED, "sft_model"),
            "--normalize-dataset-name",
            data["sft"],
            "--normalize-num-examples",
            "8",
            "--per-device-train-batch-size",
            "16",
            "--logging-steps",
            "1",
            "--output-dir",
            out,
        ]
    extra = ["--dataset-final-eval-split", "None"] if script == "ppo_rlhf_tldr.py" else []  # its final test-split eval
    return [*PPO_TINY, *extra, "--output-dir", out]


# ---------------------------------------------------------------------------------------------------------------
# --flag True / --flag False


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--bf16", "True"], True),
        (["--bf16", "False"], False),
        (["--bf16"], True),
        (["--no-bf16"], False),
        (["--bf16=true"], True),
        (["--bf16", "0"], False),
    ],
)
def test_boolean_flags_accept_trl_and_tyro_forms(script, argv, expected, tmp_path, monkeypatch, small_data):
    """Through the script's own command line, up to the end of its validation (the Accelerator is a tripwire)."""
    parsed = []
    real_cli = tyro.cli
    monkeypatch.setattr(tyro, "cli", lambda *a, **k: parsed.append(real_cli(*a, **k)) or parsed[-1])
    # --gradient_checkpointing False: TRL's underscore spelling, next to the flag under test.
    outcome = run_in_process(
        script,
        [*tiny_args(script, small_data, str(tmp_path / "out")), *argv, "--gradient_checkpointing", "False"],
        tmp_path,
        monkeypatch,
    )
    assert isinstance(outcome, ReachedTraining), outcome
    assert parsed[-1].bf16 is expected and parsed[-1].gradient_checkpointing is False


# ---------------------------------------------------------------------------------------------------------------
# AdamW's flags


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    "flag,value,word",
    [
        ("--adam-epsilon", "0", "positive"),
        ("--adam-beta2", "1.0", "[0, 1)"),
        ("--weight-decay", "-0.1", ">= 0"),
        ("--max-grad-norm", "0", "positive"),
    ],
)
def test_bad_optimizer_flags_stop_before_training(script, flag, value, word, tmp_path, monkeypatch, small_data):
    outcome = run_in_process(
        script, [*tiny_args(script, small_data, str(tmp_path / "out")), flag, value], tmp_path, monkeypatch
    )
    assert (
        isinstance(outcome, SystemExit)
        and str(outcome.code).startswith(f"error: {flag}:")
        and word in str(outcome.code)
    )


def saved_weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("script", ["ppo_rlhf.py"])  # sft.py passes too (21 s more of suite time; left out)
def test_adam_epsilon_changes_the_first_optimizer_step(script, tmp_path, small_data):
    """One optimizer step with AdamW's epsilon at 1e-5 and at 1e-2 (large next to the first step's sqrt(v) = |g|):
    the saved weights differ (runs with equal flags save equal weights: tests/test_*.py's exact-resume checks).
    Piped, the runs print their per-step lines and no bar of ours."""
    one_step = {
        "sft.py": ["--gradient-accumulation-steps", "2"],  # 32 examples, 2 batches of 16
        "ppo_rlhf.py": ["--total-episodes", "8", "--num-mini-batches", "1"],
    }[script]
    env = {"OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    weights = {}
    for eps in ("1e-5", "1e-2"):
        out = str(tmp_path / eps)
        args = [*tiny_args(script, small_data, out), *one_step, "--adam-epsilon", eps, "--seed", "3"]
        proc = run_script(script, *args, env=env, timeout=600)
        assert "step/s" not in proc.stderr and "episode/s" not in proc.stderr  # (transformers' own bars say it/s)
        assert "step 1/1 " in proc.stdout or "update 1/1 " in proc.stdout
        weights[eps] = saved_weights(out)
    assert weights["1e-5"].keys() == weights["1e-2"].keys()
    assert any(not torch.equal(weights["1e-5"][k], weights["1e-2"][k]) for k in weights["1e-5"])


# ---------------------------------------------------------------------------------------------------------------
# --push-to-hub checks, before any model loads


def hub_env(monkeypatch, tmp_path, token="hf_test"):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_file"))
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", ["offline", "repo_id", "token", "unreachable", "good"])
def test_push_to_hub_is_checked_before_training(script, case, tmp_path, monkeypatch, small_data):
    from huggingface_hub import HfApi

    calls = []

    def whoami(self, *a, **k):  # the only network call of the check
        calls.append("whoami")
        if case == "unreachable":
            raise ConnectionError("no route to host")
        return {"name": "tester"}

    monkeypatch.setattr(HfApi, "whoami", whoami)
    if case != "offline":
        hub_env(monkeypatch, tmp_path, token=None if case == "token" else "hf_test")
    argv = [*tiny_args(script, small_data, str(tmp_path / "out")), "--push-to-hub"]
    if case == "repo_id":
        argv += ["--hub-model-id", "me/bad//name"]
    outcome = run_in_process(script, argv, tmp_path, monkeypatch)
    if case == "good":
        assert isinstance(outcome, ReachedTraining), outcome
        assert calls == ["whoami"]
        return
    flag, word = {
        "offline": ("--push-to-hub", "HF_HUB_OFFLINE"),
        "repo_id": ("--hub-model-id", "not a valid"),
        "token": ("--push-to-hub", "no Hugging Face token"),
        "unreachable": ("--push-to-hub", "no route to host"),
    }[case]
    assert isinstance(outcome, SystemExit), outcome
    assert (
        str(outcome.code).startswith(f"error: {flag}:") and word in str(outcome.code) and "\n" not in str(outcome.code)
    )


# ---------------------------------------------------------------------------------------------------------------
# A whole run on a terminal with --push-to-hub against a fake Hub API: progress bar, upload, card

FAKE_HUB = """
import json, os
from huggingface_hub import HfApi

def _record(**row):
    with open(os.environ["FAKE_HUB_LOG"], "a") as f:
        f.write(json.dumps(row) + "\\n")

def whoami(self, *a, **k):
    return {"name": "tester"}

def create_repo(self, repo_id, **k):
    _record(call="create_repo", repo_id=repo_id)
    return "https://huggingface.co/" + repo_id

def create_commit(self, repo_id, operations, **k):
    # The network call of upload_folder: everything before it (which files, under which names) ran for real.
    _record(call="create_commit", repo_id=repo_id, files=sorted(op.path_in_repo for op in operations))
    return "https://huggingface.co/" + repo_id + "/commit/0"

def validate_yaml(self, content, **k):
    # The Hub checks a README's metadata server-side before the upload; here it must at least parse.
    import yaml
    _record(call="validate_yaml", metadata=yaml.safe_load(content.split("---\\n")[1]))

def pipelined_upload(api, repo_id, add_operations, delete_operations, **k):
    # upload_folder's network part when hf_xet is installed (create_commit otherwise)
    return create_commit(api, repo_id, list(delete_operations) + list(add_operations))

HfApi.whoami, HfApi.create_repo, HfApi.create_commit = whoami, create_repo, create_commit
import huggingface_hub._upload_pipeline
huggingface_hub._upload_pipeline.pipelined_upload = pipelined_upload
HfApi._validate_yaml = validate_yaml
"""


def run_on_a_terminal(cmd, env, timeout=600) -> str:
    """Run cmd with stdin, stdout and stderr on a pseudo-terminal; returns everything it wrote there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []

    def read():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    rc = proc.wait(timeout=timeout)
    reader.join(timeout=10)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert rc == 0, text[-3000:]
    return text


def files_under(folder):
    return sorted(
        os.path.relpath(os.path.join(d, f), folder)
        for d, _, fs in os.walk(folder)
        for f in fs
        if "checkpoints" not in os.path.relpath(d, folder).split(os.sep)
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,unit,tags",
    [
        ("sft.py", "step", {"sft"}),
        ("reward_modeling.py", "step", {"reward-model"}),
        ("ppo_rlhf.py", "episode", {"ppo", "rlhf"}),
        ("ppo_rlhf_tldr.py", "episode", {"ppo", "rlhf"}),
    ],
)
def test_run_on_a_terminal_shows_progress_and_uploads_the_saved_folder(script, unit, tags, tmp_path, small_data):
    (tmp_path / "fake_hub").mkdir()
    (tmp_path / "fake_hub" / "sitecustomize.py").write_text(FAKE_HUB)
    log = tmp_path / "hub.jsonl"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": "hf_test",
        "FAKE_HUB_LOG": str(log),
        "COLUMNS": "120",
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake_hub"), os.environ.get("PYTHONPATH", "")]),
    }
    out = str(tmp_path / "out")
    launch = [sys.executable, os.path.join(ROOT, script)]
    if script == "ppo_rlhf.py":  # through pipeline.py's stage runner: its stages draw their bars on its terminal
        launch = [
            sys.executable,
            "-c",
            "import sys, pipeline; pipeline.run_stage('ppo', 'ppo_rlhf.py', sys.argv[1:], {})",
        ]
    text = run_on_a_terminal(
        [
            *launch,
            *tiny_args(script, small_data, out),
            "--push-to-hub",
            "--hub-model-id",
            "me/tiny",
            "--save-steps",
            "1",
        ],
        env,
    )
    assert script != "ppo_rlhf.py" or "=== ppo (0 s into the pipeline)" in text
    # tqdm's bar: a carriage-return redraw with the rate and the time left, per step or episode
    assert "\r" in text and f"{unit}/s" in text and "100%" in text, text[-2000:]

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["call"] for c in calls] == ["create_repo", "validate_yaml", "create_commit"]
    assert calls[0]["repo_id"] == calls[2]["repo_id"] == "me/tiny"
    saved = files_under(out)
    assert calls[2]["files"] == saved  # the folder as written, resumable checkpoints aside
    assert {"README.md", "metrics.jsonl", "args.json", "config.json", "model.safetensors"} <= set(saved)
    if script.startswith("ppo"):
        assert "value_model/model.safetensors" in saved
    assert os.path.isdir(os.path.join(out, "checkpoints"))  # there, and not uploaded

    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "transformers" and tags <= set(meta["tags"])
    assert "base_model" not in meta  # a local folder is no hub id; the body names it
    assert "embedded/" in card.split("---\n", 2)[2]


# ---------------------------------------------------------------------------------------------------------------
# LoRA


@pytest.mark.parametrize("script", ["sft.py", "ppo_rlhf.py", "ppo_rlhf_tldr.py"])
def test_lora_all_linear_puts_an_adapter_on_every_linear_layer_but_the_head(script, modules):
    """`--lora-target-modules all-linear` (TRL's usual flag) reaches PEFT as its keyword, not as a module name."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    module = modules[script]
    model_flag = "--model-name-or-path" if script == "sft.py" else "--sft-model-path"
    argv = ["--use-peft", "--lora-target-modules", "all-linear", model_flag, os.path.join(EMBEDDED, "sft_model")]
    args = tyro.cli(module["Args"], args=argv)
    assert args.lora_target_modules == ["all-linear"]  # what tyro hands the script
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(EMBEDDED, "tokenizer"))
    if script == "sft.py":
        config = AutoConfig.from_pretrained(os.path.join(EMBEDDED, "sft_model"))
        model = module["load_model"](args, config, tokenizer, None, None)
    else:
        model = module["load_policy"](args, tokenizer, None)[0]
    plain = AutoModelForCausalLM.from_pretrained(os.path.join(EMBEDDED, "sft_model"))
    head = {n for n, m in plain.named_modules() if m is plain.get_output_embeddings()}
    linear = {n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)} - head
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert linear and adapted == linear
