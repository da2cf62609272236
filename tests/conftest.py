"""Shared test setup: offline everywhere, the repository root importable, and a helper to run a script as a user."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}
os.environ.update(OFFLINE_ENV)


def run_script(script: str, *args: str, cwd: str = ROOT, timeout: int = 600, env: dict = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run `python <script> <args>` from the repository root, exactly as a user would."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    """Keep W&B offline files inside the test's temporary folder."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    return tmp_path
