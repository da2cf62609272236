"""The output folder: one run at a time (a lock), and a final save that a reader never sees half-written."""

import atexit
import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import socket
import sys
from typing import Optional

from rlhf_utils.cli import fail


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
