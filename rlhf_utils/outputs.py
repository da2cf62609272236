"""The output folder: one run at a time (a lock), claimed and prepared for a fresh or resumed run, and a final save
that a reader never sees half-written, then uploaded."""

import atexit
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict
from typing import Optional

import torch

from rlhf_utils.checkpoints import resolve_resume
from rlhf_utils.cli import fail
from rlhf_utils.hub import push_folder_to_hub


def lock_output_dir(output_dir: str) -> None:
    """Hold `<output_dir>.lock` for the whole run, so that a second run into the same folder stops instead of
    mixing its files with this one's. The kernel drops the lock when its process dies, however it dies: a lock
    left by a killed run is taken over. Creating it is also the check that the folder can be written, done before
    any model loads. At exit the lock goes, and so do the folders this run created and left empty."""
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        fail("output_dir", f"{output_dir!r} is a file, not a folder; pass a folder path")
    created, folder = [], path  # the folders this run makes, deepest first: removed at exit if it left them empty
    while not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                fail(
                    "output_dir",
                    f"{output_dir!r} is in use by another run (process {owner}); wait for it to end or "
                    "pick another --output-dir",
                )
            if os.path.exists(path + ".lock") and os.stat(path + ".lock").st_ino == os.fstat(fd).st_ino:
                break  # else the previous holder removed the file while we waited for it: lock the new one
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} on {socket.gethostname()}".encode())
        if os.path.isdir(path):  # the folder itself must take new files too (checkpoints, metrics)
            os.close(os.open(os.path.join(path, ".write_test"), os.O_WRONLY | os.O_CREAT, 0o644))
            os.remove(os.path.join(path, ".write_test"))
    except OSError as e:
        fail("output_dir", f"cannot write {output_dir!r} ({e.strerror}); pass a folder you can write")

    def release():
        with contextlib.suppress(OSError):
            os.remove(path + ".lock")
        os.close(fd)
        for made in created:
            with contextlib.suppress(OSError):
                os.rmdir(made)  # only if empty

    atexit.register(release)


RENAME_EXCHANGE = 2  # renameat2's flag (linux/fs.h): swap two existing paths in one step


def swap_folders(a: str, b: str) -> bool:
    """Exchange two folders in one step (Linux renameat2 with RENAME_EXCHANGE), so a reader of either path finds one
    whole folder at every moment. False where the system, its C library or the file system cannot do it."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    at_cwd = -100  # AT_FDCWD: both paths as given
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False  # not supported here: the caller renames in two steps instead
    raise OSError(code, os.strerror(code), f"{a} <-> {b}")


def finish_interrupted_save(output_dir: str) -> Optional[str]:
    """Complete or undo a final save that was killed (see publish_output): an unfinished `.partial` is deleted, a
    finished `.new` replaces the output. Returns what was done, if anything."""
    path = os.path.abspath(output_dir)
    partial, new, old, swap = path + ".partial", path + ".new", path + ".old", path + ".swap"
    done = None
    if os.path.isdir(partial):
        shutil.rmtree(partial)
        done = f"removed {partial}, the unfinished final save of a killed run ({output_dir!r} is as before it)"
    # `.swap` holds the identity (inode) of the new output while it is swapped in: if output_dir already has it, the
    # swap happened and `.new` is the previous output, to be deleted, not swapped back.
    swapped = False
    if os.path.isfile(swap) and os.path.isdir(path):
        with open(swap) as f:
            swapped = f.read() == str(os.stat(path).st_ino)
    if os.path.isdir(new) and not swapped:
        if os.path.isdir(os.path.join(path, "checkpoints")):
            os.replace(os.path.join(path, "checkpoints"), os.path.join(new, "checkpoints"))
        if os.path.isdir(path):
            with open(swap, "w") as f:
                f.write(str(os.stat(new).st_ino))
            swapped = swap_folders(new, path)
        if not swapped:  # two renames: between them output_dir is missing, and the next start completes the save
            if os.path.isdir(path):
                shutil.rmtree(old, ignore_errors=True)  # the rest of a swap that had finished
                os.replace(path, old)
            os.replace(new, path)
        done = f"completed the final save of a killed run into {output_dir!r}"
    if swapped:
        shutil.rmtree(new, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(swap)
    shutil.rmtree(old, ignore_errors=True)
    return done


def publish_output(output_dir: str, write) -> None:
    """The final save, all or nothing: `write(folder)` fills `<output_dir>.partial`, which is renamed `.new` once
    complete; the run's checkpoints move into it, then the old output becomes `.old`, `.new` becomes output_dir and
    `.old` is deleted. Nothing of the old output but its checkpoints is kept, so no earlier file can change what
    from_pretrained(output_dir) loads. A kill at any moment leaves the old output or the new one (between the two
    renames: `.old` and `.new`, which the next start of any script into output_dir turns into the new one). On
    Linux the two renames are one exchange (swap_folders), so output_dir is never missing."""
    path = os.path.abspath(output_dir)
    finish_interrupted_save(output_dir)
    os.makedirs(path + ".partial")
    try:
        write(path + ".partial")
    except Exception as e:  # e.g. a full disk: torch and safetensors report it as their own error types
        shutil.rmtree(path + ".partial", ignore_errors=True)
        sys.exit(
            f"error: could not write the final output ({type(e).__name__}: {e}); {output_dir!r} holds what it "
            "held before, with this run's checkpoints"
        )
    os.replace(path + ".partial", path + ".new")
    finish_interrupted_save(output_dir)


def claim_output_dir(output_dir: str, resume: Optional[str], overwrite: bool) -> Optional[str]:
    """Lock output_dir for this run (the main process) and finish a final save that a kill interrupted; a fresh run
    needs the folder empty (or --overwrite-output-dir). Returns the checkpoint folder to resume, or None."""
    if int(os.environ.get("RANK", "0")) == 0:
        lock_output_dir(output_dir)
        repaired = finish_interrupted_save(output_dir)
        if repaired:
            print(repaired)
    resume_dir = resolve_resume(resume, output_dir)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not (overwrite or resume_dir):
        fail(
            "output_dir",
            f"{output_dir!r} exists and is not empty; pass --overwrite-output-dir, "
            "--resume-from-checkpoint latest, or another path",
        )
    return resume_dir


def prepare_output_dir(output_dir: str, resume_state: Optional[dict], main_process: bool) -> str:
    """Create output_dir (only now, with every input checked, is anything written there); a fresh run drops an
    earlier run's checkpoints, a resumed one the metrics rows logged after its checkpoint (later updates, a final
    evaluation). Returns the path
    of metrics.jsonl, which the run appends to."""
    os.makedirs(output_dir, exist_ok=True)
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    if main_process and resume_state is None:
        # A fresh run (e.g. --overwrite-output-dir): an earlier run's checkpoints must not mix with its own.
        shutil.rmtree(os.path.join(output_dir, "checkpoints"), ignore_errors=True)
    if main_process and os.path.exists(metrics_path):
        # Resuming keeps the rows up to the checkpoint (a killed run may have logged later updates, or half a line).
        kept = []
        if resume_state is not None:
            with open(metrics_path) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    # A final evaluation is logged after the last checkpoint: the resumed run logs its own at its end.
                    final = any(k.startswith("final_eval/") for k in row)
                    if row.get("update", 0) <= resume_state["update"] and not final:
                        kept.append(line if line.endswith("\n") else line + "\n")
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics_path + ".tmp", metrics_path)
    return metrics_path


def write_run_files(folder: str, args, metrics: list, card: str) -> None:
    """What goes next to the saved model: metrics.jsonl (a row a line), args.json and the model card, README.md."""
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in metrics)
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(card)


def save_output(args, accelerator, model, write, start_time: float, what: str = "") -> None:
    """The final save, of finite weights only: write(folder, state_dict) fills the folder on the main process, which
    publish_output makes output_dir all or nothing (a kill mid-save leaves the previous output or this one, never a
    mix); then the upload, with --push-to-hub."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # on every process: ZeRO-3 gathers the shards
    nonfinite = []
    if accelerator.is_main_process:
        nonfinite = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if accelerator.reduce(torch.tensor(float(len(nonfinite)), device=accelerator.device), "sum").item():
        sys.exit(
            f"error: the trained weights are not finite ({', '.join(nonfinite[:3])}...); nothing was saved "
            "(lower --learning-rate)"
        )
    if accelerator.is_main_process:
        publish_output(args.output_dir, lambda folder: write(folder, state_dict))
        accelerator.print(f"saved {what}to {args.output_dir} after {time.time() - start_time:.0f}s")
        if args.push_to_hub:
            url = push_folder_to_hub(
                args.output_dir, args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            )
            accelerator.print(f"uploaded {args.output_dir} to {url}")
    accelerator.wait_for_everyone()


def split_state_dict(state_dict: dict, names: tuple) -> dict:
    """The state dict of a module holding several models as attributes: {name: that model's state dict, as the model
    itself saves it}."""
    return {name: {k[len(name) + 1 :]: v for k, v in state_dict.items() if k.startswith(name + ".")} for name in names}


def save_policy(
    policy,
    path: str,
    state_dict: dict,
    adapter_name: Optional[str] = None,
    merge_base: Optional[str] = None,
    tokenizer=None,
    trust_remote_code: bool = False,
    deepspeed=None,
) -> None:
    """A causal LM as from_pretrained loads it: its weights or, with a LoRA adapter_name, the trained adapter only (and
    with merge_base, the adapter merged into a plain copy of that base model, with the tokenizer, in path/merged).
    deepspeed: the transformers DeepSpeed config to restore after the merge, or None."""
    if adapter_name is None:
        policy.save_pretrained(path, state_dict=state_dict)
        return
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    adapter = get_peft_model_state_dict(policy, state_dict, adapter_name)
    save_file({k: v.contiguous() for k, v in adapter.items()}, os.path.join(path, "adapter_model.safetensors"))
    policy.peft_config[adapter_name].save_pretrained(path)
    if merge_base:
        # A fresh copy of the base on this process only: under ZeRO-3 the live weights are shards, and transformers
        # must not load it with zero.Init (a collective), so its DeepSpeed config is unset meanwhile.
        from transformers import AutoModelForCausalLM
        from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        base = AutoModelForCausalLM.from_pretrained(merge_base, trust_remote_code=trust_remote_code)
        if deepspeed is not None:
            set_hf_deepspeed_config(deepspeed)
        PeftModel.from_pretrained(base, path).merge_and_unload().save_pretrained(os.path.join(path, "merged"))
        tokenizer.save_pretrained(os.path.join(path, "merged"))


def write_jsonl(path: str, rows: list) -> None:
    """rows as JSON lines at path (and its folder, if new), all or nothing (written beside it, then renamed)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(path + ".tmp", path)
