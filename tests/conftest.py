"""The fixtures the test files share. What they import (the script runners, the offline environment, the repository
root on sys.path) is in helpers.py, imported here first so that it holds for every test file."""

import os

import helpers  # noqa: F401  (sets the offline environment and puts the repository root on sys.path)
import pytest
from helpers import EMBEDDED, TEMPLATE


@pytest.fixture(scope="module")
def one_torch_thread():
    """The CPUs are shared with other jobs; one thread is several times faster than two contended ones. Test files
    that compute in this process use it for all their tests (pytestmark)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    """Keep W&B offline files inside the test's temporary folder."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    return tmp_path


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded tokenizer (no chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(EMBEDDED, "tokenizer"))


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The embedded tokenizer with helpers.TEMPLATE as its chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(EMBEDDED, "tokenizer"))
    tok.chat_template = TEMPLATE
    return tok
