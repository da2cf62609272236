"""rlhf_utils.outputs: one run at a time in an output folder (the lock), and the final save all or nothing
(publish_output, finish_interrupted_save), however the run is stopped. The scripts' use of them, end to end:
tests/test_faults.py."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
from helpers import EMBEDDED, OFFLINE_ENV, ONE_THREAD, ROOT, files_under

from rlhf_utils.outputs import (
    finish_interrupted_save,
    lock_output_dir,
    publish_output,
    save_policy,
    split_state_dict,
    write_jsonl,
)

# ---------------------------------------------------------------------------------------------------------------
# the lock


@pytest.fixture
def at_exit(monkeypatch):
    """What lock_output_dir registers to run at exit, to be run by the test (pytest's own exit is too late)."""
    import atexit

    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    return registered


def test_the_lock_refuses_a_second_run_and_goes_at_exit_with_the_folders_it_made(tmp_path, at_exit):
    out = tmp_path / "new" / "nested" / "out"
    lock_output_dir(str(out))
    lock = tmp_path / "new" / "nested" / "out.lock"
    assert lock.read_text().startswith(f"{os.getpid()} on ")  # who holds it, for the second run's message
    with pytest.raises(SystemExit) as info:
        lock_output_dir(str(out))  # a second open file: flock refuses it as it would another process
    assert info.value.code.startswith(f"error: --output-dir: '{out}' is in use by another run (process {os.getpid()}")
    (release,) = at_exit
    release()
    assert not lock.exists() and not (tmp_path / "new").exists()  # the run wrote nothing: no empty folder left
    lock_output_dir(str(out))  # free again
    at_exit[-1]()


def test_the_lock_keeps_a_folder_that_has_files_and_refuses_a_file(tmp_path, at_exit):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"w")
    lock_output_dir(str(tmp_path / "out"))
    at_exit[0]()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["model.safetensors"]
    with pytest.raises(SystemExit) as info:
        lock_output_dir(str(tmp_path / "out" / "model.safetensors"))
    assert "is a file, not a folder" in info.value.code


# ---------------------------------------------------------------------------------------------------------------
# the final save is all or nothing


def test_atomic_save_replaces_the_folder_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    publish_output(str(out) + "/", lambda path: open(os.path.join(path, "new.txt"), "w").close())
    assert sorted(os.listdir(out)) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


class Killed(BaseException):
    """Stands for SIGKILL at one point of the save: nothing after it runs."""


@pytest.mark.parametrize("exchange", [True, False], ids=["one-step-swap", "two-renames"])
def test_a_final_save_stopped_after_any_step_leaves_the_old_or_the_new_output(tmp_path, monkeypatch, exchange):
    """Every point between two file-system operations of publish_output, in turn: what from_pretrained would see is
    the old output or the new one, and the next start (finish_interrupted_save) leaves one of them, whole, with the
    run's checkpoints and no leftover; a LoRA adapter of the old output never survives into the new one. With the
    one-step swap (Linux renameat2) the output folder is never missing, even between the old and the new one; with
    two renames (elsewhere) it may be missing until the next start."""
    from rlhf_utils import outputs

    if exchange and not outputs.swap_folders(str(tmp_path), str(tmp_path)):
        pytest.skip("this file system cannot swap two folders in one step")
    out = tmp_path / "out"
    old = {"adapter_config.json": b"old adapter", "adapter_model.safetensors": b"old", "README.md": b"old card"}
    new = {
        "model.safetensors": b"new policy",
        os.path.join("value_model", "model.safetensors"): b"new value",
        "README.md": b"new card",
    }
    checkpoint = {os.path.join("checkpoints", "checkpoint-4", "state.pt"): b"state"}
    real_replace, real_rmtree = os.replace, shutil.rmtree
    steps, kill_at = [0], [None]

    def step():
        steps[0] += 1
        if steps[0] == kill_at[0]:
            raise Killed

    def write(path):
        for name, content in new.items():
            step()
            os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
            with open(os.path.join(path, name), "wb") as f:
                f.write(content)

    real_swap = outputs.swap_folders
    monkeypatch.setattr(os, "replace", lambda *a: (step(), real_replace(*a)))
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: (step(), real_rmtree(*a, **k)))
    monkeypatch.setattr(outputs, "swap_folders", lambda *a: step() or (exchange and real_swap(*a)))
    outcomes = []
    for kill in range(1, 100):
        real_rmtree(tmp_path, ignore_errors=True)
        for name, content in {**old, **checkpoint}.items():
            os.makedirs(os.path.dirname(out / name), exist_ok=True)
            (out / name).write_bytes(content)
        steps[0], kill_at[0] = 0, kill
        try:
            publish_output(str(out), write)
            outcomes.append("finished")
            break
        except Killed:
            pass
        seen = {k: v for k, v in files_under(out).items() if not k.startswith("checkpoints")} if out.exists() else None
        assert seen in (old, new) or (seen is None and files_under(str(out) + ".new") == {**new, **checkpoint}), kill
        assert seen is not None or not exchange, kill
        kill_at[0] = None
        finish_interrupted_save(str(out))  # what the next start of any script does first
        after = files_under(out)
        assert after in ({**old, **checkpoint}, {**new, **checkpoint}), (kill, sorted(after))
        assert sorted(os.listdir(tmp_path)) == ["out"], (kill, os.listdir(tmp_path))
        outcomes.append("old" if after == {**old, **checkpoint} else "new")
    assert outcomes[-1] == "finished" and files_under(out) == {**new, **checkpoint}
    # the old output until the new one is complete (renamed to .new), the new one from then on
    assert outcomes[:-1] == sorted(outcomes[:-1], key=lambda o: o == "new") and {"old", "new"} <= set(outcomes)


KILL_HARNESS = r"""
import json, os, random, signal, sys, time
sys.path.insert(0, ROOT)
import torch
from rlhf_utils.outputs import finish_interrupted_save, publish_output
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.utils import logging

logging.disable_progress_bar()  # tqdm's lock is shared across fork: a child killed holding it blocks the parent

out, kills, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
policy = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "embedded", "sft_model"))
value = AutoModelForSequenceClassification.from_pretrained(os.path.join(ROOT, "embedded", "reward_model"))
versions = [({k: v + i for k, v in policy.state_dict().items()}, {k: v + i for k, v in value.state_dict().items()})
            for i in range(2)]

def write(path, i):
    policy.save_pretrained(path, state_dict=versions[i][0])
    value.save_pretrained(os.path.join(path, "value_model"), state_dict=versions[i][1])

write(out, 0)
with open(os.path.join(out, "adapter_config.json"), "w") as f:  # an earlier run's LoRA adapter
    json.dump({"peft_type": "LORA", "base_model_name_or_path": "x", "r": 8, "target_modules": ["query_key_value"]}, f)
os.makedirs(os.path.join(out, "checkpoints", "checkpoint-9"))
rng, results = random.Random(seed), []
for _ in range(kills):
    pid = os.fork()
    if pid == 0:  # the child saves version 1, 0, 1, ... until it is killed
        i = 1
        while True:
            publish_output(out, lambda path: write(path, i))
            i = 1 - i
    time.sleep(rng.uniform(0.05, 0.5))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    leftovers = sorted(n for n in os.listdir(os.path.dirname(out)) if n != os.path.basename(out))
    found_before_repair = os.path.isdir(out)
    finish_interrupted_save(out)  # what the next start does
    loaded_policy = AutoModelForCausalLM.from_pretrained(out).state_dict()
    loaded_value = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "value_model")).state_dict()
    which = [i for i in range(2) if all(torch.equal(loaded_policy[k], v) for k, v in versions[i][0].items())
             and all(torch.equal(loaded_value[k], v) for k, v in versions[i][1].items())]
    results.append({"leftovers": leftovers, "found_before_repair": found_before_repair, "version": which, "files": sorted(os.listdir(out)),
                    "siblings": sorted(os.listdir(os.path.dirname(out)))})
print(json.dumps(results))
"""


def test_sigkill_at_random_points_of_real_final_saves_leaves_a_whole_model(tmp_path):
    """The same on real saves: save_pretrained of a policy and a value model, SIGKILLed at random moments (a forked
    child saving over and over), then the next start's repair: from_pretrained loads one version, the same for the
    policy and the value model, never the earlier run's LoRA adapter, and the checkpoints stay; where folders can be
    swapped in one step, the output folder exists at every kill, before any repair."""
    from rlhf_utils import outputs

    seed = int(os.environ.get("KILL_TEST_SEED", random.randrange(1 << 30)))
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", f"ROOT = {ROOT!r}\n" + KILL_HARNESS, str(out), "12", str(seed)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **OFFLINE_ENV, **ONE_THREAD},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in results:
        assert len(r["version"]) == 1, (seed, r)  # policy and value model of the same save, bit for bit
        assert "adapter_config.json" not in r["files"] and "checkpoints" in r["files"], (seed, r)
        assert r["siblings"] == ["out"], (seed, r)
        # renameat2 swaps the old and new output in one step: the folder is there even when the kill fell between
        assert r["found_before_repair"] or not outputs.swap_folders(str(out), str(out)), (seed, r)
    assert len(results) == 12


def test_a_full_disk_during_the_final_save_keeps_the_previous_output(tmp_path):
    """The final save failing half-way (a full disk) leaves the previous output whole, with a message."""
    out = tmp_path / "out"
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"previous")

    def write(path):
        (tmp_path / "out.partial" / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(SystemExit) as info:
        publish_output(str(out), write)
    assert str(info.value.code).startswith("error: could not write the final output (OSError: [Errno 28] No space")
    assert files_under(out) == {"model.safetensors": b"previous"} and sorted(os.listdir(tmp_path)) == ["out"]
    assert os.listdir(out / "checkpoints") == ["checkpoint-2"]


# ---------------------------------------------------------------------------------------------------------------
# what the PPO scripts save: each model's part of a joint state dict, the policy or its adapter, JSON lines


def test_split_state_dict_gives_each_model_its_own_keys():
    state_dict = {"policy.a.weight": 1, "policy.b": 2, "value_model.score.weight": 3, "policyx.c": 4}
    assert split_state_dict(state_dict, ("policy", "value_model")) == {
        "policy": {"a.weight": 1, "b": 2},
        "value_model": {"score.weight": 3},
    }


def test_write_jsonl_writes_every_row_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "new_folder" / "rows.jsonl"
    write_jsonl(str(path), [{"a": 1}, {"b": "x"}])
    assert path.read_text() == '{"a": 1}\n{"b": "x"}\n'
    assert os.listdir(path.parent) == ["rows.jsonl"]


def test_save_policy_writes_the_weights_or_the_adapter_and_its_merge(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft = os.path.join(EMBEDDED, "sft_model")
    model = AutoModelForCausalLM.from_pretrained(sft)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    save_policy(model, str(tmp_path / "plain"), model.state_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in expected.items())

    lora = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["query_key_value"]))
    tokenizer = AutoTokenizer.from_pretrained(sft)
    save_policy(lora, str(tmp_path / "lora"), lora.state_dict(), "default", sft, tokenizer)
    assert {"adapter_model.safetensors", "adapter_config.json", "merged"} <= set(os.listdir(tmp_path / "lora"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "merged").state_dict()
    assert all(torch.equal(merged[k], v) for k, v in expected.items())  # LoRA's B starts at 0: the base itself
    assert os.path.isfile(tmp_path / "lora" / "merged" / "tokenizer_config.json")


def test_a_resumed_run_keeps_the_metrics_rows_up_to_its_checkpoint_but_not_a_final_evaluation(tmp_path):
    """A final evaluation is logged after the last checkpoint; resuming from that checkpoint (to train longer) must not
    keep it, or the extended run would log two."""
    import json

    from rlhf_utils.outputs import prepare_output_dir

    rows = [{"update": 1}, {"update": 2}, {"final_eval/score": 1.0, "update": 2}, {"update": 3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"update": 4, "half')
    path = prepare_output_dir(str(tmp_path), {"update": 2}, True)
    assert [json.loads(line) for line in open(path)] == [{"update": 1}, {"update": 2}]
    assert prepare_output_dir(str(tmp_path), None, True) and open(path).read() == ""  # a fresh run starts empty
