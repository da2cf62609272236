"""The seed's commands, typed as TRL users type them (underscore flags, verbatim), with local stand-ins for the hub
ids and a smaller --total_episodes for this CPU:

(a) "get started": python ppo_rlhf.py --dataset_name <stand-in for trl-internal-testing/descriptiveness-sentiment-
    trl-style> --dataset_train_split descriptiveness ... --missing_eos_penalty 1.0
(b) the TL;DR benchmark: accelerate launch --config_file benchmark/accelerate_configs/deepspeed_zero2.yaml
    <CPU launcher flags> ppo_rlhf_tldr.py --dataset_name embedded/prompts --dataset_test_split validation ...

Both run from a temporary working directory (so models/minimal/... is written there), started together by a module
fixture in two worker threads so that the two shared CPUs are both busy."""

import json
import math
import os
import socket
import sys

import pytest
from helpers import ROOT, Background, needs, start_wanted_runs

EMBEDDED = os.path.join(ROOT, "embedded")
SFT, RM = os.path.join(EMBEDDED, "sft_model"), os.path.join(EMBEDDED, "reward_model")
ZERO2 = os.path.join(ROOT, "benchmark", "accelerate_configs", "deepspeed_zero2.yaml")

GET_STARTED = [
    "--dataset_name",
    "<standin>",
    "--dataset_train_split",
    "descriptiveness",
    "--learning_rate",
    "3e-6",
    "--num_ppo_epochs",
    "1",
    "--num_mini_batches",
    "1",
    "--output_dir",
    "models/minimal/ppo",
    "--per_device_train_batch_size",
    "64",
    "--gradient_accumulation_steps",
    "1",
    "--total_episodes",
    "128",
    "--model_name_or_path",
    SFT,
    "--sft_model_path",
    SFT,
    "--reward_model_path",
    RM,
    "--missing_eos_penalty",
    "1.0",
    # Nothing else differs from the seed command: 128 episodes (2 updates of 64) take about 30 s here, sample tables
    # and the final evaluation on the 100 held-out prompts included.
]

# What a CPU needs on top of the config file (../shared/docs/PLATFORM.md): two real processes on one machine (the
# file says 8 GPUs), no mixed precision (fp16 is unusable on this CPU) and no dynamo, and a free rendezvous port so
# that concurrent runs do not collide. The scripts pick gloo themselves when CUDA is absent.
CPU_LAUNCH = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
TLDR_BENCHMARK = [
    "--dataset_name",
    os.path.join(EMBEDDED, "prompts"),
    "--dataset_test_split",
    "validation",
    "--output_dir",
    "models/minimal/ppo_tldr",
    "--learning_rate",
    "3e-6",
    "--per_device_train_batch_size",
    "4",
    "--gradient_accumulation_steps",
    "4",
    "--total_episodes",
    "32",
    "--model_name_or_path",
    SFT,
    "--sft_model_path",
    SFT,
    "--reward_model_path",
    RM,
    "--local_rollout_forward_batch_size",
    "16",
    "--missing_eos_penalty",
    "1.0",
    "--stop_token",
    "eos",
    "--eval_strategy",
    "steps",
    "--eval_steps",
    "100",
    # For this CPU: the published batch is 16 per device and ~1M episodes; here 4 x 4 x 2 processes = 32 episodes,
    # one PPO update. The periodic evaluation (at the last update, as eval_steps 100 > 1) uses 16 validation prompts
    # instead of 200; the final evaluation keeps the whole test split (200 prompts), whose saved generations are
    # checked below.
    "--num_eval_prompts",
    "16",
    # Not for speed: a checkpoint after the update is the artifact that shows ZeRO-2 really ran (DeepSpeed writes
    # one optimizer-state partition per rank).
    "--save_steps",
    "1",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def accelerate_launch():
    """`accelerate launch` of this interpreter's environment."""
    cli = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return [cli, "launch"] if os.path.isfile(cli) else [sys.executable, "-m", "accelerate.commands.launch"]


def descriptiveness_standin(path):
    """A local stand-in for trl-internal-testing/descriptiveness-sentiment-trl-style: splits `descriptiveness` and
    `sentiment`, columns `prompt`, `chosen`, `rejected` (from the embedded preference data)."""
    from datasets import DatasetDict, load_from_disk

    train = load_from_disk(os.path.join(EMBEDDED, "preference_data"))["train"].select_columns(
        ["prompt", "chosen", "rejected"]
    )
    DatasetDict(descriptiveness=train.select(range(300)), sentiment=train.select(range(300, 400))).save_to_disk(path)
    return path


def plan(bg):
    """name: prepare. prepare() builds the inputs in the main thread and returns the job for a worker."""

    def get_started():
        cwd = os.path.join(bg.root, "get_started")
        os.makedirs(cwd)
        standin = descriptiveness_standin(os.path.join(cwd, "descriptiveness-sentiment-trl-style"))
        cmd = [
            sys.executable,
            os.path.join(ROOT, "ppo_rlhf.py"),
            *[standin if a == "<standin>" else a for a in GET_STARTED],
        ]
        return lambda: bg.run("get_started", cmd, cwd)

    def tldr_deepspeed():
        if not os.path.isfile(ZERO2):
            return lambda: None
        cwd = os.path.join(bg.root, "tldr_deepspeed")
        os.makedirs(cwd)
        return lambda: bg.run(
            "tldr_deepspeed",
            [
                *accelerate_launch(),
                "--config_file",
                ZERO2,
                *CPU_LAUNCH,
                "--main_process_port",
                free_port(),
                os.path.join(ROOT, "ppo_rlhf_tldr.py"),
                *TLDR_BENCHMARK,
            ],
            cwd,
        )

    return {"tldr_deepspeed": tldr_deepspeed, "get_started": get_started}


@pytest.fixture(scope="module", autouse=True)
def runs(request, tmp_path_factory):
    bg = Background(str(tmp_path_factory.mktemp("command_runs")))
    yield start_wanted_runs(request, bg, plan(bg))
    bg.close()


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_saved_models(out, sft_path, rm_path):
    """The policy (+ tokenizer) in out and the value model in out/value_model load, and training changed both."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    policy, sft = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(sft_path)
    value, rm = (
        AutoModelForSequenceClassification.from_pretrained(p) for p in (os.path.join(out, "value_model"), rm_path)
    )
    assert value.config.num_labels == 1
    for trained, start in ((policy, sft), (value, rm)):
        a, b = trained.state_dict(), start.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point())
        assert any(not torch.equal(a[k], b[k]) for k in a), f"{type(trained).__name__}: no weight changed"
    with torch.no_grad():  # the saved policy generates
        ids = tokenizer(
            "SUBREDDIT: r/tifu\n\nTITLE: t\n\nPOST: p\n\nTL;DR:", return_tensors="pt", add_special_tokens=False
        )
        assert torch.isfinite(policy(**ids).logits).all()


@pytest.mark.slow
@needs("get_started")
def test_get_started_command(runs):
    run = runs["get_started"]().check()
    out = os.path.join(run.cwd, "models", "minimal", "ppo")
    check_saved_models(out, SFT, RM)
    # the underscore flags reached the script (TRL's spelling; the script's own is --dataset-train-split)
    with open(os.path.join(out, "args.json")) as f:
        args = json.load(f)
    for key, value in (
        ("dataset_train_split", "descriptiveness"),
        ("learning_rate", 3e-6),
        ("num_ppo_epochs", 1),
        ("num_mini_batches", 1),
        ("per_device_train_batch_size", 64),
        ("gradient_accumulation_steps", 1),
        ("total_episodes", 128),
        ("missing_eos_penalty", 1.0),
        ("output_dir", "models/minimal/ppo"),
    ):
        assert args[key] == value, (key, args[key])
    # no test split in the stand-in: the rule of every script holds out every 10th row (TRL's example held out 100)
    assert "held out 30 of 300 rows of 'descriptiveness' for evaluation (no 'validation' split)" in run.stdout
    assert "270 train / 30 eval prompts; 2 updates of 64 episodes" in run.stdout, run.stdout[-2000:]
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    train = [r for r in rows if "objective/kl" in r]
    assert [(r["update"], r["episode"], r["optimizer_steps"]) for r in train] == [(1, 64, 1), (2, 128, 2)]
    for r in train:
        assert all(math.isfinite(r[k]) for k in ("objective/scores", "objective/kl", "loss/policy_avg", "val/ratio"))
    assert [r["update"] for r in rows if "eval/score" in r] == [2]  # the evaluation at the last update


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(
    not os.path.isfile(ZERO2),
    reason="benchmark/accelerate_configs/deepspeed_zero2.yaml does not "
    "exist yet (being written with docs/scale_out.md)",
)
@needs("tldr_deepspeed")
def test_tldr_benchmark_command_under_deepspeed_zero2(runs):
    run = runs["tldr_deepspeed"]()
    run.check()
    out = os.path.join(run.cwd, "models", "minimal", "ppo_tldr")
    assert "1 updates of 32 episodes (2 processes x 16)" in run.stdout, run.stdout[-3000:]
    check_saved_models(out, SFT, RM)
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    train = [r for r in rows if "objective/kl" in r]
    assert [(r["update"], r["episode"]) for r in train] == [(1, 32)]
    assert all(math.isfinite(v) for v in train[0].values() if isinstance(v, float))
    assert [r["update"] for r in rows if "eval/score" in r] == [1]
    # ZeRO-2 ran on two ranks: DeepSpeed's checkpoint holds one optimizer-state partition per rank
    ds = os.path.join(out, "checkpoints", "checkpoint-1", "deepspeed")
    assert os.path.isdir(ds), os.listdir(out)
    for rank in (0, 1):
        assert os.path.isfile(os.path.join(ds, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")), os.listdir(ds)
    # the final evaluation's generations, gathered from both ranks in the test split's order
    from datasets import load_from_disk

    test = load_from_disk(os.path.join(EMBEDDED, "prompts"))["test"]
    for name in ("initial", "final"):
        gens = read_jsonl(os.path.join(out, "eval_generations", f"{name}.jsonl"))
        assert [g["query"] for g in gens] == list(test["prompt"]), name
        assert [g["reference"] for g in gens] == list(test["completion"]), name
        assert all(math.isfinite(g["score"]) for g in gens), name
