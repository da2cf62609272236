"""rlhf_utils.checkpoints: a checkpoint sealed by a rename with a manifest of its files, `latest` and the fallback to
the newest intact one, the checks before a resume, and every random state of a process through
torch.load(weights_only=True). Resuming the scripts end to end: tests/test_faults.py and each script's tests."""

import json
import os
import random

import numpy as np
import pytest
import torch

from rlhf_utils.checkpoints import (
    checkpoint_problem,
    latest_checkpoint,
    load_resume_state,
    resolve_resume,
    rng_state,
    seal_checkpoint,
    set_rng_state,
)


def sealed(folder, n, files=None) -> str:
    """checkpoint-n under folder, sealed as the scripts seal theirs: a state.pt and `files` ({name: bytes})."""
    tmp = folder / f"checkpoint-{n}.tmp"
    tmp.mkdir(parents=True)
    torch.save({"step": n}, tmp / "state.pt")
    for name, content in (files or {}).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(content)
    seal_checkpoint(str(tmp), str(folder / f"checkpoint-{n}"), None)
    return str(folder / f"checkpoint-{n}")


# ---------------------------------------------------------------------------------------------------------------
# sealing, `latest`, and what a damaged checkpoint is


def test_a_new_runs_checkpoint_is_latest_and_an_older_runs_higher_numbers_go(tmp_path):
    folder = tmp_path / "checkpoints"
    for n in (3, 4, 1):  # 3 and 4 from an earlier run (or a later point that a resume went back from), then 1
        (folder / f"checkpoint-{n}.tmp").mkdir(parents=True)
        torch.save({"step": n}, folder / f"checkpoint-{n}.tmp" / "state.pt")
        seal_checkpoint(str(folder / f"checkpoint-{n}.tmp"), str(folder / f"checkpoint-{n}"), 2)
    assert sorted(os.listdir(folder)) == ["checkpoint-1", "latest"]
    assert latest_checkpoint(str(tmp_path)) == (str(folder / "checkpoint-1"), [])
    for n in (2, 3):
        (folder / f"checkpoint-{n}.tmp").mkdir()
        torch.save({"step": n}, folder / f"checkpoint-{n}.tmp" / "state.pt")
        seal_checkpoint(str(folder / f"checkpoint-{n}.tmp"), str(folder / f"checkpoint-{n}"), 2)
    assert sorted(os.listdir(folder)) == ["checkpoint-2", "checkpoint-3", "latest"]  # --save-total-limit 2
    assert json.loads((folder / "checkpoint-3" / "manifest.json").read_text()) == {
        "state.pt": os.path.getsize(folder / "checkpoint-3" / "state.pt")
    }


def test_latest_checkpoint_ignores_tmp_folders_and_sorts_numerically(tmp_path):
    assert latest_checkpoint(str(tmp_path)) == (None, [])
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert latest_checkpoint(str(tmp_path)) == (None, [])
    (folder / "checkpoint-11.tmp").mkdir()
    (folder / "checkpoint-11.tmp" / "state.pt").write_bytes(b"")
    assert latest_checkpoint(str(tmp_path)) == (None, [])
    for n in (2, 9, 10):
        (folder / f"checkpoint-{n}").mkdir()
        (folder / f"checkpoint-{n}" / "state.pt").write_bytes(b"")
    (folder / "checkpoint-12.tmp").mkdir()
    assert latest_checkpoint(str(tmp_path)) == (str(folder / "checkpoint-10"), [])
    # the pointer, written once a checkpoint is complete, wins over the numbers (a new run's checkpoint-2 is newer
    # than an earlier run's checkpoint-10); if what it names is gone, the highest intact number is used
    (folder / "latest").write_text("checkpoint-2")
    assert latest_checkpoint(str(tmp_path)) == (str(folder / "checkpoint-2"), [])
    (folder / "latest").write_text("checkpoint-3")
    assert latest_checkpoint(str(tmp_path)) == (
        str(folder / "checkpoint-10"),
        ["checkpoint-3 does not exist"],
    )


def test_checkpoint_problem_says_what_is_missing_or_of_another_size(tmp_path):
    assert checkpoint_problem(str(tmp_path / "nope")) == "does not exist"
    assert checkpoint_problem(str(tmp_path)) == "is not a checkpoint folder (no state.pt)"
    folder = sealed(tmp_path / "checkpoints", 1, {"model/model.safetensors": b"w" * 10, "optimizer.pt": b"o"})
    assert checkpoint_problem(folder) is None
    with open(os.path.join(folder, "model", "model.safetensors"), "r+b") as f:
        f.truncate(4)
    assert checkpoint_problem(folder) == "is damaged: model/model.safetensors has 4 bytes, 10 when written"
    with open(os.path.join(folder, "model", "model.safetensors"), "wb") as f:
        f.write(b"w" * 10)
    os.remove(os.path.join(folder, "optimizer.pt"))
    assert checkpoint_problem(folder) == "is damaged: optimizer.pt is missing"
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        f.write("{not json")
    assert checkpoint_problem(folder).startswith("is damaged: its manifest.json is unreadable (")
    os.remove(os.path.join(folder, "manifest.json"))
    assert checkpoint_problem(folder) is None  # a checkpoint older than manifests: nothing to check against


def test_resolve_resume_skips_damaged_checkpoints_for_latest_but_not_by_path(tmp_path, capsys):
    assert resolve_resume(None, str(tmp_path)) is None
    with pytest.raises(SystemExit) as info:
        resolve_resume("latest", str(tmp_path))
    assert info.value.code == (
        f"error: --resume-from-checkpoint: no checkpoint in {str(tmp_path / 'checkpoints')!r}; start without "
        "--resume-from-checkpoint"
    )
    good = sealed(tmp_path / "checkpoints", 1)
    damaged = sealed(tmp_path / "checkpoints", 2, {"model.safetensors": b"weights"})
    os.remove(os.path.join(damaged, "model.safetensors"))
    assert resolve_resume("latest", str(tmp_path)) == good
    assert capsys.readouterr().err == (
        "warning: checkpoint-2 is damaged: model.safetensors is missing: resuming from checkpoint-1, the newest "
        "intact checkpoint\n"
    )
    assert resolve_resume(good, str(tmp_path)) == good
    with pytest.raises(SystemExit) as info:
        resolve_resume(damaged, str(tmp_path))
    assert info.value.code.startswith(f"error: --resume-from-checkpoint: {damaged!r} is damaged: model.safetensors")


def test_an_unreadable_state_pt_is_an_error_naming_the_resume_argument(tmp_path):
    folder = sealed(tmp_path / "checkpoints", 3)
    assert load_resume_state(folder) == {"step": 3}
    with open(os.path.join(folder, "state.pt"), "wb") as f:
        f.write(b"PK\x03\x04 not a zip")
    with pytest.raises(SystemExit) as info:
        load_resume_state(folder)
    assert info.value.code.startswith("error: --resume-from-checkpoint: ") and "state.pt' cannot be read (" in str(
        info.value.code
    )


# ---------------------------------------------------------------------------------------------------------------
# random states


def draws(generator):
    return (
        random.random(),
        float(np.random.rand()),
        np.random.randint(0, 1 << 30),
        torch.rand(3).tolist(),
        torch.rand(3, generator=generator).tolist(),
        random.gauss(0, 1),
    )


def test_rng_state_round_trips_through_torch_save_weights_only(tmp_path):
    generator = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()  # and in numpy's
    torch.save(rng_state(generator), tmp_path / "rng.pt")
    expected = draws(generator)
    random.seed(100), np.random.seed(100), torch.manual_seed(100), generator.manual_seed(100)
    other = draws(generator)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), generator)
    assert draws(generator) == expected != other


def test_rng_state_without_a_sampling_generator_round_trips_too(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    assert "sampling" not in state
    torch.save(state, tmp_path / "rng.pt")
    expected = draws(None)
    random.seed(100), np.random.seed(100), torch.manual_seed(100)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws(None) == expected
