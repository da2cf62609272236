"""Two-process runs of the scripts, launched as a user launches them (`accelerate launch --config_file
benchmark/accelerate_configs/...`, or torchrun), on gloo: DDP, DeepSpeed ZeRO-2 and ZeRO-3 (every parameter sharded),
ZeRO-3 generation on sharded weights, exact resume under ZeRO-3 and DDP (of sft.py and reward_modeling.py too), and
LoRA (frozen base, trained adapter, no reference copy, the SFT adapter as the reference). The launch commands are the
ones docs/scale_out.md documents.

The runs are shared between tests: a module fixture starts them all in a pool of two worker threads (each run is two
single-threaded processes) and each test waits for the runs it reads; the resume runs of sft.py and reward_modeling.py
have their own fixture. About 6 minutes on two shared CPU cores."""

import json
import math
import os
import shutil
import sys

import pytest
import torch
from helpers import ROOT, Background, Finished, free_port

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

EMBEDDED = os.path.join(ROOT, "embedded")
CONFIGS = os.path.join(ROOT, "benchmark", "accelerate_configs")
DDP = ["--config_file", os.path.join(CONFIGS, "multi_gpu.yaml"), "--num_processes", "2"]
ZERO2 = ["--config_file", os.path.join(CONFIGS, "deepspeed_zero2.yaml"), "--num_processes", "2"]
ZERO3 = ["--config_file", os.path.join(CONFIGS, "deepspeed_zero3_cpu.yaml"), "--num_processes", "2"]
TORCHRUN = "torchrun"

# 32 episodes in 2 updates of 16 (2 processes x 4 x 2 micro-batches), 32-token responses (long enough that the
# two processes finish generating at different steps), evaluation after update 2.
TINY = [
    "--total-episodes",
    "32",
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
    "7",
    "--response-length",
    "32",
]
NUM_UPDATES, BATCH, PER_PROCESS = 2, 16, 8
LORA = ["--use-peft", "--lora-r", "8", "--lora-alpha", "16", "--learning-rate", "1e-3", "--merge-adapter-on-save"]
# Metrics of update 1 computed from the rollout, before any optimizer step: the same under every launch mode.
ROLLOUT_METRICS = [
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/scores",
    "objective/response_length",
    "val/num_eos_tokens",
]


class Run(Finished):
    def check(self):
        super().check()
        assert "terminate called" not in self.stderr  # the gloo abort at exit
        return self


class Runner(Background):
    """Launches two-process runs in a pool of worker threads; kills (by process group) the ones still running when
    the module ends."""

    def __init__(self, root):
        super().__init__(root, finished=Run)

    def launch(self, name, launcher, script, args, timeout=600) -> Run:
        out = os.path.join(self.root, name)
        port = str(free_port())
        if launcher == TORCHRUN:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--main_process_port", port]
        cmd += [os.path.join(ROOT, script), *args, "--output-dir", out]
        return self.run(name, cmd, env={"MASTER_PORT": port}, timeout=timeout, out=out)

    def submit(self, *args, **kwargs):
        return self.executor.submit(self.launch, *args, **kwargs)

    def resume(self, first, name, launcher, args):
        """Resume from checkpoint 1 of a finished run, in a copy of its output folder."""

        def job():
            done = first.result().check()
            out = os.path.join(self.root, name)
            shutil.copytree(done.out, out)
            shutil.rmtree(os.path.join(out, "checkpoints", f"checkpoint-{NUM_UPDATES}"))
            return self.launch(name, launcher, "ppo_rlhf.py", [*args, "--resume-from-checkpoint", "latest"])

        return self.executor.submit(job)


def make_sft_adapter(path):
    """A LoRA adapter on the SFT model whose B matrices are not zero, so that it differs from the bare SFT model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(os.path.join(EMBEDDED, "sft_model")),
        LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["query_key_value"]),
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(path)


def small_datasets(root):
    from datasets import DatasetDict, load_from_disk

    sft = load_from_disk(os.path.join(EMBEDDED, "sft_data"))
    # 17 and 30 held-out examples: with 16 per process per batch, accelerate pads the last batch with duplicates
    DatasetDict(train=sft["train"].select(range(128)), validation=sft["validation"].select(range(17))).save_to_disk(
        os.path.join(root, "sft_data")
    )
    pref = load_from_disk(os.path.join(EMBEDDED, "preference_data"))
    DatasetDict(train=pref["train"].select(range(128)), test=pref["test"].select(range(30))).save_to_disk(
        os.path.join(root, "pref_data")
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("distributed"))
    make_sft_adapter(os.path.join(root, "sft_adapter"))
    small_datasets(root)
    runner = Runner(root)
    ppo = "ppo_rlhf.py"
    save = ["--save-steps", "1"]
    lora_ref = [
        *TINY,
        *LORA,
        "--sft-model-path",
        os.path.join(root, "sft_adapter"),
        "--model-adapter-name",
        "policy",
        "--ref-adapter-name",
        "reference",
        *save,
    ]
    sft_args = [
        "--dataset-name",
        os.path.join(root, "sft_data"),
        "--model-name-or-path",
        os.path.join(EMBEDDED, "base_model"),
        "--num-train-epochs",
        "1",
        "--per-device-train-batch-size",
        "16",
        "--logging-steps",
        "2",
        "--num-sample-completions",
        "2",
        "--sample-max-new-tokens",
        "12",
    ]
    rm_args = [
        "--dataset-name",
        os.path.join(root, "pref_data"),
        "--model-name-or-path",
        os.path.join(EMBEDDED, "sft_model"),
        "--normalize-num-examples",
        "33",
        "--per-device-train-batch-size",
        "16",
        "--logging-steps",
        "2",
    ]
    jobs = {}
    # ZeRO-3 first: on a fresh machine the first DeepSpeed run also compiles its shared-memory comm op (~30 s).
    # A resume is submitted after other runs, so that its worker does not sit waiting for the run it resumes.
    jobs["zero3"] = runner.submit("zero3", ZERO3, ppo, [*TINY, *save])
    jobs["zero3_sharded_lora"] = runner.submit(
        "zero3_sharded_lora", ZERO3, ppo, [*TINY, "--no-ds3-gather-for-generation", *LORA]
    )
    jobs["ddp_lora_ref_adapter"] = runner.submit("ddp_lora_ref_adapter", TORCHRUN, ppo, lora_ref)
    jobs["ddp"] = runner.submit("ddp", DDP, ppo, TINY)
    jobs["zero2"] = runner.submit("zero2", ZERO2, ppo, TINY)
    jobs["zero3_resumed"] = runner.resume(jobs["zero3"], "zero3_resumed", ZERO3, [*TINY, *save])
    jobs["sft_ddp_lora"] = runner.submit(
        "sft_ddp_lora", DDP, "sft.py", [*sft_args, "--use-peft", "--learning-rate", "3e-2", "--merge-adapter-on-save"]
    )
    jobs["rm_ddp"] = runner.submit("rm_ddp", DDP, "reward_modeling.py", rm_args)
    jobs["ddp_lora_ref_adapter_resumed"] = runner.resume(
        jobs["ddp_lora_ref_adapter"], "ddp_lora_ref_adapter_resumed", TORCHRUN, lora_ref
    )
    jobs["rm_zero3"] = runner.submit("rm_zero3", ZERO3, "reward_modeling.py", rm_args)
    yield {"root": root, "jobs": jobs}
    runner.close()


def get(runs, name) -> Run:
    return runs["jobs"][name].result().check()


def assert_finite(row):
    for k, v in row.items():
        if isinstance(v, float):
            assert math.isfinite(v), (k, v)


def loads_and_was_trained(out):
    """Policy and value model load with plain from_pretrained, every weight present, and differ from their start."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    value, info = AutoModelForSequenceClassification.from_pretrained(
        os.path.join(out, "value_model"), output_loading_info=True
    )
    assert not any(info.values()), info
    sft = AutoModelForCausalLM.from_pretrained(os.path.join(EMBEDDED, "sft_model")).state_dict()
    rm = AutoModelForSequenceClassification.from_pretrained(os.path.join(EMBEDDED, "reward_model")).state_dict()
    for trained, start in ((policy.state_dict(), sft), (value.state_dict(), rm)):
        assert trained.keys() == start.keys()
        assert all(trained[k].shape == start[k].shape for k in start)
        assert any(not torch.equal(trained[k], start[k]) for k in start)


# ---------------------------------------------------------------------------------------------------------------
# full fine-tuning: DDP, ZeRO-2, ZeRO-3


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_two_process_run_logs_finite_metrics_over_all_processes(runs, name):
    run = get(runs, name)
    train = run.train_rows
    assert [r["update"] for r in train] == list(range(1, NUM_UPDATES + 1))
    for r in train:
        assert_finite(r)
        assert r["episode"] == r["update"] * BATCH  # both processes' episodes
        assert r["optimizer_steps"] == r["update"] * 4  # 4 PPO epochs x 1 mini-batch, counted once (engine steps)
        # One schedule step per update, not one per process: linear decay from 3e-5 over 2 updates.
        assert r["lr"] == pytest.approx(3e-5 * (1 - (r["update"] - 1) / NUM_UPDATES), rel=1e-6)
        assert 0 <= r["val/num_eos_tokens"] <= BATCH
    # EOS counts are summed over processes: more than one process's batch could hold.
    assert max(r["val/num_eos_tokens"] for r in train) > PER_PROCESS
    (evaluation,) = [r for r in run.rows if "eval/score" in r]
    assert_finite(evaluation)
    assert "2 updates of 16 episodes (2 processes x 8)" in run.stdout


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_two_process_run_saves_a_loadable_policy_and_value_model(runs, name):
    loads_and_was_trained(get(runs, name).out)


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_deepspeed_gives_the_ddp_metrics_with_the_same_seed(runs, name):
    """Same seed, same data order, same sampling per process, same accumulation and clipping: DeepSpeed's update 1
    matches DDP's, including the statistics of the PPO epochs (one optimizer step per mini-batch, same gradient)."""
    ddp, ds = get(runs, "ddp").train_rows[0], get(runs, name).train_rows[0]
    for k, v in ddp.items():
        if k.startswith(("time/", "eps")):
            continue
        assert ds[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_zero3_checkpoints_hold_every_process_optimizer_shard_and_resume_exactly(runs):
    first, resumed = get(runs, "zero3"), get(runs, "zero3_resumed")
    checkpoint = os.path.join(first.out, "checkpoints", "checkpoint-1")
    names = set(os.listdir(os.path.join(checkpoint, "deepspeed")))
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= names
    assert {"rng_rank0.pt", "rng_rank1.pt", "state.pt", "policy", "value_model"} <= set(os.listdir(checkpoint))
    assert "resumed from" in resumed.stdout and "continuing at update 2" in resumed.stdout
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time/", "eps"))} for r in rows]  # noqa: E731
    assert strip(resumed.rows) == strip(first.rows)


# ---------------------------------------------------------------------------------------------------------------
# LoRA, and generation on sharded ZeRO-3 weights


def test_zero3_sharded_generation_finishes_and_matches_the_gathered_rollout(runs):
    """Generation on shards runs one collective per layer per token: the processes must stop together although their
    rows finish at different steps (a hang would time out). The rollout of update 1 happens before any optimizer
    step and the adapter starts at zero, so it equals the full model's rollout with the policy gathered."""
    sharded = get(runs, "zero3_sharded_lora")
    rows = sharded.train_rows
    assert [r["update"] for r in rows] == list(range(1, NUM_UPDATES + 1))
    for r in rows:
        assert_finite(r)
        assert r["episode"] == r["update"] * BATCH and r["optimizer_steps"] == r["update"] * 4
    gathered = get(runs, "zero3").train_rows[0]
    for k in ROLLOUT_METRICS:
        assert rows[0][k] == pytest.approx(gathered[k], rel=1e-4, abs=1e-6), k


def parameter_line(run):
    (line,) = [ln for ln in run.stdout.splitlines() if ln.startswith("parameters:")]
    return line


def assert_frozen_base_trained_adapter(out, base_dir, adapter_start=None):
    """The merged model differs from the frozen base only in the adapted layers, by exactly the saved adapter's
    update; the adapter itself moved away from its start (zero B, or the SFT adapter)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged")).state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all("query_key_value" in k for k in changed), changed
    rebuilt = (
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).merge_and_unload().state_dict()
    )
    for k in base:
        assert torch.allclose(rebuilt[k], merged[k], atol=1e-6), k
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    start = load_file(os.path.join(adapter_start, "adapter_model.safetensors")) if adapter_start else None
    for k, v in adapter.items():
        if "lora_B" in k:
            assert not torch.equal(v, start[k] if start else torch.zeros_like(v)), k


def test_lora_under_zero3_trains_only_the_adapter_without_a_reference_copy(runs):
    run = get(runs, "zero3_sharded_lora")
    assert "reference 0 (the policy with its adapter disabled)" in parameter_line(run)
    assert {"adapter_config.json", "adapter_model.safetensors", "merged", "value_model"} <= set(os.listdir(run.out))
    assert_frozen_base_trained_adapter(run.out, os.path.join(EMBEDDED, "sft_model"))


def test_lora_with_the_sft_adapter_as_reference_under_ddp(runs):
    """--sft-model-path is a LoRA adapter: trained as `policy`, frozen as `reference`. The reference is that adapter,
    not the bare base model: the KL of update 1, before any step, is exactly 0."""
    run = get(runs, "ddp_lora_ref_adapter")
    line = parameter_line(run)
    assert "reference 0 (the policy with adapter 'reference')" in line
    total, trained = (int(x) for x in line.split("policy ")[1].split(" trained")[0].replace("(", "").split())
    assert trained == 3 * (96 * 4 + 4 * 288)  # r=4 on query_key_value (96 -> 288) in 3 layers: one adapter's worth
    first = run.train_rows[0]
    assert first["objective/kl"] == 0.0 and first["episode"] == BATCH
    adapter_dir = os.path.join(runs["root"], "sft_adapter")
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        base_dir = json.load(f)["base_model_name_or_path"]
    assert_frozen_base_trained_adapter(run.out, base_dir, adapter_start=adapter_dir)


def test_lora_resume_under_ddp_is_exact(runs):
    first, resumed = get(runs, "ddp_lora_ref_adapter"), get(runs, "ddp_lora_ref_adapter_resumed")
    assert "continuing at update 2" in resumed.stdout
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time/", "eps"))} for r in rows]  # noqa: E731
    assert strip(resumed.rows) == strip(first.rows)


# ---------------------------------------------------------------------------------------------------------------
# sft.py and reward_modeling.py


def test_sft_two_processes_with_lora_saves_an_adapter_and_a_merged_model(runs):
    from transformers import AutoModelForCausalLM

    run = get(runs, "sft_ddp_lora")
    assert "128 train / 17 eval examples" in run.stdout
    with open(os.path.join(run.out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    # 128 examples, 16 per process per step, 2 processes: 4 optimizer steps.
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert {"adapter_config.json", "adapter_model.safetensors", "merged"} <= set(os.listdir(run.out))
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(run.out, "merged"))
    base = AutoModelForCausalLM.from_pretrained(os.path.join(EMBEDDED, "base_model"))
    assert any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), base.state_dict().values()))


@pytest.mark.parametrize("name", ["rm_ddp", "rm_zero3"])
def test_reward_modeling_two_processes_saves_a_normalised_model(runs, name):
    from transformers import AutoModelForSequenceClassification

    run = get(runs, name)
    with open(os.path.join(run.out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    model, info = AutoModelForSequenceClassification.from_pretrained(run.out, output_loading_info=True)
    assert not any(info.values()), info
    assert model.score.weight.shape == (1, 96)


def test_held_out_metrics_of_two_processes_count_each_example_once(runs):
    """17 SFT and 30 preference held-out examples in batches of 16 per process: accelerate pads the second process's
    batch with duplicates of the first examples. The logged eval metrics equal the same metrics of the saved model
    computed in this one process, example by example."""
    import torch.nn.functional as F
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import reward_modeling
    import sft

    rows = lambda run: [json.loads(line) for line in open(os.path.join(run.out, "metrics.jsonl"))]  # noqa: E731
    run = get(runs, "sft_ddp_lora")
    (logged,) = [r["eval/loss"] for r in rows(run) if "eval/loss" in r]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(run.out, "merged")).eval()
    tokenizer = AutoTokenizer.from_pretrained(run.out)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in load_from_disk(os.path.join(runs["root"], "sft_data"))["validation"]:
            batch = sft.collate(
                [sft.tokenize_example(tokenizer, row["prompt"], row["completion"])], tokenizer.pad_token_id
            )
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += sft.completion_loss(logits, batch["labels"], reduction="sum").item()
            count += int((batch["labels"][:, 1:] != -100).sum())
    assert logged == pytest.approx(total / count, rel=1e-4)

    run = get(runs, "rm_ddp")
    assert "30 eval pairs" in run.stdout
    (logged,) = [r for r in rows(run) if "eval/loss" in r]
    model = AutoModelForSequenceClassification.from_pretrained(run.out).eval()
    tokenizer = AutoTokenizer.from_pretrained(run.out)
    losses, correct = [], []
    with torch.no_grad():
        for row in load_from_disk(os.path.join(runs["root"], "pref_data"))["test"]:
            ids = [
                tokenizer(row["prompt"] + row[k], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                for k in ("chosen", "rejected")
            ]
            chosen, rejected = (
                reward_modeling.get_reward(model, torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))
                for x in ids
            )
            losses.append(-F.logsigmoid(chosen - rejected).item())
            correct.append((chosen > rejected).item())
    assert logged["eval/loss"] == pytest.approx(sum(losses) / 30, rel=1e-4)
    assert logged["eval/accuracy"] == pytest.approx(sum(correct) / 30, abs=1e-6)


def test_reward_modeling_zero3_matches_ddp(runs):
    """The score head's initialisation and the normalising shift change sharded weights under ZeRO-3 (gathered, then
    re-partitioned): the metrics, the shift and the saved weights match the DDP run."""
    from transformers import AutoModelForSequenceClassification

    ddp, zero3 = get(runs, "rm_ddp"), get(runs, "rm_zero3")
    rows = lambda run: [json.loads(line) for line in open(os.path.join(run.out, "metrics.jsonl"))]  # noqa: E731
    for a, b in zip(rows(ddp), rows(zero3), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    a = AutoModelForSequenceClassification.from_pretrained(ddp.out).state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(zero3.out).state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k


# ---------------------------------------------------------------------------------------------------------------
# checkpoints of sft.py and reward_modeling.py with two processes


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """sft.py under DDP and reward_modeling.py under ZeRO-3 (4 optimizer steps of 2 processes x 8 x 2 micro-batches),
    run through with a checkpoint every step; then each again in a fresh output folder that holds only checkpoint-1
    and checkpoint-2 (mid-epoch), with --resume-from-checkpoint latest. Its own runs, so `-k` can select it alone."""
    root = str(tmp_path_factory.mktemp("distributed_resume"))
    small_datasets(root)
    runner = Runner(root)
    common = [
        "--per-device-train-batch-size",
        "8",
        "--gradient-accumulation-steps",
        "2",
        "--logging-steps",
        "1",
        "--save-steps",
        "1",
        "--save-total-limit",
        "None",
    ]
    sft_args = [
        "--dataset-name",
        os.path.join(root, "sft_data"),
        "--model-name-or-path",
        os.path.join(EMBEDDED, "base_model"),
        "--num-train-epochs",
        "1",
        "--num-sample-completions",
        "0",
        *common,
    ]
    rm_args = [
        "--dataset-name",
        os.path.join(root, "pref_data"),
        "--model-name-or-path",
        os.path.join(EMBEDDED, "sft_model"),
        "--normalize-dataset-name",
        os.path.join(EMBEDDED, "sft_data"),
        "--normalize-num-examples",
        "33",
        *common,
    ]

    def run_and_resume(name, launcher, script, args):
        first = runner.launch(name, launcher, script, args).check()
        resumed_out = os.path.join(root, name + "_resumed")
        for step in (1, 2):
            checkpoint = os.path.join("checkpoints", f"checkpoint-{step}")
            shutil.copytree(os.path.join(first.out, checkpoint), os.path.join(resumed_out, checkpoint))
        return first, runner.launch(name + "_resumed", launcher, script, [*args, "--resume-from-checkpoint", "latest"])

    jobs = {
        "sft_ddp": runner.executor.submit(run_and_resume, "sft_ddp", DDP, "sft.py", sft_args),
        "rm_zero3": runner.executor.submit(run_and_resume, "rm_zero3", ZERO3, "reward_modeling.py", rm_args),
    }
    yield jobs
    runner.close()


@pytest.mark.parametrize("name", ["sft_ddp", "rm_zero3"])
def test_sft_and_reward_modeling_resume_mid_epoch_with_two_processes_bitwise(resume_runs, name):
    first, resumed = resume_runs[name].result()
    resumed.check()
    assert "continuing after optimizer step 2 (epoch 0, 4 batches in)" in resumed.stdout
    checkpoint = os.path.join(first.out, "checkpoints", "checkpoint-2")
    assert {"model", "state.pt", "rng_rank0.pt", "rng_rank1.pt"} <= set(os.listdir(checkpoint))
    if name == "rm_zero3":  # each process's optimizer shard, written by the DeepSpeed engine
        names = set(os.listdir(os.path.join(checkpoint, "deepspeed")))
        assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= names
    else:
        assert "optimizer.pt" in os.listdir(checkpoint)
    with (
        open(os.path.join(first.out, "model.safetensors"), "rb") as a,
        open(os.path.join(resumed.out, "model.safetensors"), "rb") as b,
    ):
        assert a.read() == b.read()
    assert resumed.rows == first.rows
    assert [r["step"] for r in resumed.rows if "train/loss" in r] == [1, 2, 3, 4]
    # the schedule (cosine, no warm-up) decays over exactly this process's optimizer steps: it ends at 0 on the last
    # one, never before (accelerate's scheduler wrapper stepped it once per process: it overshot on uneven splits)
    lrs = [r["lr"] for r in first.rows if "train/loss" in r]
    assert lrs == sorted(lrs, reverse=True) and lrs[-2] > 0 and lrs[-1] == pytest.approx(0, abs=1e-12), lrs


# ---------------------------------------------------------------------------------------------------------------
# the gradient does not depend on the number of processes

# One PPO mini-batch as the main loop computes its gradient: micro-batches whose token sums are divided by
# ppo_rlhf.token_mean_divisors, each loss divided by the micro-batches per mini-batch (what accelerate does under
# gradient accumulation), gradients synchronised on the last micro-batch and averaged over the processes by DDP. The
# same 16 rollouts on 1 process, or 8 on each of 2 whose responses have very different lengths.
MINI_BATCH_PROGRAM = """
import contextlib, json, os, sys

import torch

sys.path.insert(0, {root!r})
from ppo_rlhf import token_mean_divisors

data, micro_size, out = torch.load(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
world = int(os.environ.get("WORLD_SIZE", "1"))
model = torch.nn.Linear(data["x"].shape[-1], 2)
model.load_state_dict(data["init"])
wrapped, rank = model, 0
if world > 1:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
rows = torch.arange(len(data["x"])).chunk(world)[rank]
micro_per_mini = len(rows) // micro_size
n_pg, n_vf = token_mean_divisors(data["valid_pg"][rows], data["valid_vf"][rows], micro_per_mini, world)
for k, micro in enumerate(rows.split(micro_size)):
    last = k == micro_per_mini - 1
    with contextlib.nullcontext() if world == 1 or last else wrapped.no_sync():
        out_pg, out_vf = wrapped(data["x"][micro]).unbind(-1)
        pg_losses = -data["advantages"][micro] * torch.exp(out_pg)
        vf_losses = (out_vf - data["returns"][micro]) ** 2
        pg_loss = (pg_losses * data["valid_pg"][micro]).sum() / n_pg
        vf_loss = 0.5 * (vf_losses * data["valid_vf"][micro]).sum() / n_vf
        ((pg_loss + 0.1 * vf_loss) / micro_per_mini).backward()
if rank == 0:
    with open(out, "w") as f:
        json.dump({{name: p.grad.flatten().tolist() for name, p in model.named_parameters()}}, f)
if world > 1:  # leave as the scripts do (rlhf_utils.runs.end_run): gloo's threads can abort the interpreter's teardown
    torch.distributed.barrier()
    os._exit(0)
"""


def mini_batch_rollouts(path):
    """16 rollouts of 12 response tokens: the first 8 (process 0's) end after 1 to 3 tokens, the last 8 after 9 to
    12, so that the two processes hold very different numbers of valid tokens."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.cat([torch.randint(1, 4, (8,), generator=g), torch.randint(9, 13, (8,), generator=g)])
    positions = torch.arange(12)[None, :]
    torch.manual_seed(0)
    torch.save(
        {
            "x": torch.randn(16, 12, 5, generator=g),
            "advantages": torch.randn(16, 12, generator=g),
            "returns": torch.randn(16, 12, generator=g),
            "valid_pg": positions < lengths[:, None],
            "valid_vf": positions < lengths[:, None] + 1,
            "init": torch.nn.Linear(5, 2).state_dict(),
        },
        path,
    )


def test_the_same_rollouts_on_one_or_two_processes_give_the_same_gradient(tmp_path):
    """Each process dividing by its own token count (and DDP averaging the processes) gave the short-response process's
    tokens 3-10 times the weight of the other's: checked to fail that way with token_mean_divisors reverted."""
    import subprocess

    program, data = tmp_path / "mini_batch.py", tmp_path / "rollouts.pt"
    program.write_text(MINI_BATCH_PROGRAM.format(root=ROOT))
    mini_batch_rollouts(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    one = [sys.executable, str(program), str(data), "4", str(tmp_path / "one.json")]
    port = str(free_port())
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    two += [str(program), str(data), "4", str(tmp_path / "two.json")]
    for cmd in (one, two):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "one.json") as f, open(tmp_path / "two.json") as g:
        one, two = json.load(f), json.load(g)
    assert one.keys() == two.keys() == {"weight", "bias"}
    for name in one:
        assert max(abs(a) for a in one[name]) > 1e-3  # a real gradient
        torch.testing.assert_close(torch.tensor(two[name]), torch.tensor(one[name]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the exit of a finished multi-process run
