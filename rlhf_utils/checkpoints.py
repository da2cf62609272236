"""Resumable checkpoints: written and sealed by a rename, found through `latest`, checked (its arguments too) before a
resume, loaded; random states."""

import json
import os
import random
import shutil
import sys
from dataclasses import asdict
from typing import Optional

import numpy as np
import torch

from rlhf_utils.cli import fail


def seal_checkpoint(tmp: str, folder: str, keep: Optional[int]) -> None:
    """Make a fully written `checkpoint-N.tmp` resumable: a manifest of its files' sizes, written last, is what
    resuming verifies; the folder is renamed into place; then `checkpoints/latest` names it (written aside and
    renamed, so it always names a complete checkpoint), and the checkpoints beyond --save-total-limit go: the
    oldest by number among those before this one, and any numbered after it (left by a run it was resumed from
    before them, so older than this one)."""
    sizes = {
        os.path.relpath(os.path.join(d, f), tmp): os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(tmp)
        for f in files
    }
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(sizes, f, indent=0, sort_keys=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    parent, name = os.path.split(folder)
    with open(os.path.join(parent, "latest.tmp"), "w") as f:
        f.write(name)
    os.replace(os.path.join(parent, "latest.tmp"), os.path.join(parent, "latest"))
    number = int(name[len("checkpoint-") :])
    others = [int(n[11:]) for n in os.listdir(parent) if n.startswith("checkpoint-") and n[11:].isdigit()]
    before = sorted(n for n in others if n < number)
    remove = [n for n in others if n > number] + (before[: max(len(before) - keep + 1, 0)] if keep else [])
    for n in remove:
        shutil.rmtree(os.path.join(parent, f"checkpoint-{n}"))


def checkpoint_problem(folder: str) -> Optional[str]:
    """Why a checkpoint cannot be resumed (a file missing or of another size than its manifest says), or None."""
    if not os.path.isfile(os.path.join(folder, "state.pt")):
        return "is not a checkpoint folder (no state.pt)" if os.path.isdir(folder) else "does not exist"
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            sizes = json.load(f)
    except FileNotFoundError:
        return None  # written before checkpoints had manifests: nothing to verify against
    except (OSError, ValueError) as e:
        return f"is damaged: its manifest.json is unreadable ({e})"
    for name, size in sizes.items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            return f"is damaged: {name} is missing"
        if os.path.getsize(file) != size:
            return f"is damaged: {name} has {os.path.getsize(file)} bytes, {size} when written"
    return None


def latest_checkpoint(output_dir: str) -> tuple:
    """The checkpoint that `--resume-from-checkpoint latest` continues: the one `checkpoints/latest` names, or if it
    is damaged the newest intact one. Returns (its path or None, a note on each damaged one skipped)."""
    folder = os.path.join(output_dir, "checkpoints")
    names = (
        sorted(
            (n for n in os.listdir(folder) if n.startswith("checkpoint-") and n[11:].isdigit()),
            key=lambda n: -int(n[11:]),
        )
        if os.path.isdir(folder)
        else []
    )
    if os.path.isfile(os.path.join(folder, "latest")):
        with open(os.path.join(folder, "latest")) as f:
            pointed = f.read().strip()
        names = [pointed] + [n for n in names if n != pointed]
    skipped = []
    for name in names:
        problem = checkpoint_problem(os.path.join(folder, name))
        if problem is None:
            return os.path.join(folder, name), skipped
        skipped.append(f"{name} {problem}")
    return None, skipped


def resolve_resume(resume: Optional[str], output_dir: str) -> Optional[str]:
    """--resume-from-checkpoint as a checkpoint folder: `latest` skips damaged checkpoints, saying so; a damaged
    checkpoint passed by path is an error."""
    if resume is None:
        return None
    where = os.path.join(output_dir, "checkpoints")
    if resume == "latest":
        found, skipped = latest_checkpoint(output_dir)
        if found is None:
            fail(
                "resume_from_checkpoint",
                f"no {'intact ' if skipped else ''}checkpoint in {where!r}"
                f"{' (' + '; '.join(skipped) + ')' if skipped else ''}; start without "
                "--resume-from-checkpoint",
            )
        for note in skipped:
            print(
                f"warning: {note}: resuming from {os.path.basename(found)}, the newest intact checkpoint",
                file=sys.stderr,
            )
        return found
    problem = checkpoint_problem(resume)
    if problem:
        fail("resume_from_checkpoint", f"{resume!r} {problem}; pass another of {where}/checkpoint-* or `latest`")
    return resume


def changed_arguments(saved_args: str, args, may_change, may_grow=(), grow_problem: Optional[str] = None) -> list:
    """The arguments of a resumed run that differ from those its checkpoint was written with (`--name saved (now
    current)`), but for those in may_change, and those in may_grow (the budget) that grew while grow_problem is None
    (else it is said after the argument: why growing it would change the training so far)."""
    saved, now = json.loads(saved_args), json.loads(json.dumps(asdict(args)))  # as saved: lists, not tuples
    # A flag newer than the checkpoint was not there to set: that run had today's default.
    saved = {**json.loads(json.dumps(asdict(type(args)()))), **saved}
    changed = []
    for k, v in now.items():
        if k in may_change or saved.get(k) == v:
            continue
        grew = k in may_grow and v is not None and saved.get(k) is not None and v > saved[k]
        if grew and grow_problem is None:
            continue
        changed.append(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {v!r}{': ' + grow_problem if grew else ''})")
    return changed


def check_resume(resume_dir: Optional[str], args, may_change, script: str, may_grow=()) -> Optional[dict]:
    """The state.pt of the checkpoint to resume (None for a fresh run), checked to come from `script` with the same
    arguments, except those in may_change, and the budget arguments in may_grow, which may grow when that leaves the
    training so far unchanged (budget_growth_problem): anything else would silently train a different model."""
    if resume_dir is None:
        return None
    resume_state = load_resume_state(resume_dir)
    if resume_state.get("script", script) != script:
        fail(
            "resume_from_checkpoint",
            f"{resume_dir!r} was written by {resume_state['script']}; pass a checkpoint of {script}",
        )
    problem = budget_growth_problem(args) if may_grow else None
    changed = changed_arguments(resume_state.get("args", "{}"), args, may_change, may_grow, problem)
    if changed:
        fail(
            "resume_from_checkpoint",
            f"{resume_dir!r} was written by a run with {', '.join(changed)}; resume "
            "with the same values, or start a new run",
        )
    return resume_state


def write_checkpoint(
    args,
    number: int,
    state: dict,
    accelerator,
    model,
    optimizer,
    scheduler,
    zero_stage,
    write_models=None,
    sampling_generator=None,
) -> None:
    """checkpoint-`number` in output_dir/checkpoints: the weights, the optimizer, the scheduler, `state` (the
    script's counters and name), the arguments, the launch layout and every process's RNG states (with the sampling
    generator's), written to checkpoint-N.tmp and sealed into place: a kill at any moment leaves the earlier
    checkpoints intact and never a half-written one under a final name. The main process writes the weights with
    write_models(folder, state_dict) (default: the model as from_pretrained loads it, in model/). Under DeepSpeed the
    optimizer state is partitioned: every process writes its own part with the engine's save_checkpoint."""
    folder = os.path.join(args.output_dir, "checkpoints", f"checkpoint-{number}")
    tmp = folder + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # on every process: ZeRO-3 gathers the shards
    if zero_stage is not None:
        model.save_checkpoint(tmp, tag="deepspeed", save_latest=False)
    error = None
    try:  # a full disk (or a quota) must cost this checkpoint only, with a message, not the earlier ones
        torch.save(rng_state(sampling_generator), os.path.join(tmp, f"rng_rank{accelerator.process_index}.pt"))
        if accelerator.is_main_process:
            if write_models is None:
                accelerator.unwrap_model(model).save_pretrained(os.path.join(tmp, "model"), state_dict=state_dict)
            else:
                write_models(tmp, state_dict)
            if zero_stage is None:
                torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            layout = {"world_size": accelerator.num_processes, "zero_stage": zero_stage}
            full_state = {"scheduler": scheduler.state_dict(), **state, "args": json.dumps(asdict(args)), **layout}
            torch.save(full_state, os.path.join(tmp, "state.pt"))
    except Exception as e:  # torch and safetensors report a full disk as their own error types
        error = f"{type(e).__name__}: {e}"
    failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum").item()
    if accelerator.is_main_process and not failed:
        try:
            seal_checkpoint(tmp, folder, args.save_total_limit)
        except OSError as e:
            error, failed = f"{type(e).__name__}: {e}", 1
    if failed:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(
            f"error: could not write checkpoint-{number} ({error or 'on another process'}); the run stops "
            "here, its earlier checkpoints are intact: make room and resume with --resume-from-checkpoint latest"
        )
    accelerator.wait_for_everyone()


def load_checkpoint(
    resume_dir: str, resume_state: dict, accelerator, model, optimizer, scheduler, zero_stage, sampling_generator=None
) -> None:
    """What a resumed run takes from its checkpoint besides the weights (loaded with the models) and the counters
    (in resume_state): the optimizer, the schedule and this process's RNG states (and the sampling generator's)."""
    if zero_stage is not None:
        model.load_checkpoint(resume_dir, tag="deepspeed", load_optimizer_states=True, load_lr_scheduler_states=False)
    elif "optimizer" in resume_state:  # written before the optimizer state had a file of its own
        optimizer.load_state_dict(resume_state["optimizer"])
    else:
        optimizer.load_state_dict(torch.load(os.path.join(resume_dir, "optimizer.pt"), weights_only=True))
    scheduler.load_state_dict(resume_state["scheduler"])
    rng_file = os.path.join(resume_dir, f"rng_rank{accelerator.process_index}.pt")
    set_rng_state(torch.load(rng_file, weights_only=True), sampling_generator)


def load_resume_state(resume_dir: str) -> dict:
    """The checkpoint's state.pt (counters, args, launch layout), or a clear error if it cannot be read."""
    try:
        return torch.load(os.path.join(resume_dir, "state.pt"), weights_only=True)
    except Exception as e:  # truncated or overwritten: torch raises several types
        fail(
            "resume_from_checkpoint",
            f"{os.path.join(resume_dir, 'state.pt')!r} cannot be read ({e}); pass another checkpoint",
        )


def rng_state(sampling_generator: Optional[torch.Generator] = None) -> dict:
    """Every random state of this process (and of the sampling generator, if any), as tensors and ints so that
    torch.load(weights_only=True) reads it."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": [np_state[0], np_state[2], np_state[3], np_state[4]],
        "torch": torch.get_rng_state(),
        **({"sampling": sampling_generator.get_state()} if sampling_generator is not None else {}),
    }


def set_rng_state(state: dict, sampling_generator: Optional[torch.Generator] = None) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.tolist()), gauss))
    name, pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state((name, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if sampling_generator is not None:
        sampling_generator.set_state(state["sampling"])


def budget_growth_problem(args) -> Optional[str]:
    """Why a larger budget (--total-episodes, --num-train-epochs) would change the updates a checkpoint already made,
    or None when it leaves them as they were: a linear or cosine learning rate decays over the whole budget, and PPO's
    sample tables, spaced over the whole budget, draw from the sampling generator."""
    if args.lr_scheduler_type != "constant":
        return (
            f"the {args.lr_scheduler_type} learning-rate schedule spans the whole budget, so a larger one changes the "
            "steps already taken; extend only runs trained with --lr-scheduler-type constant"
        )
    if getattr(args, "num_sample_generations", 0):
        return (
            "the sample tables are spaced over the whole budget and draw from the sampling generator; extend only "
            "runs trained with --num-sample-generations 0"
        )
    return None
