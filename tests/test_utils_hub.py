"""rlhf_utils.hub: the model card's Hub metadata, --push-to-hub checked before any model loads, and the upload of the
saved folder as written. Whole runs that upload to a fake Hub: tests/test_ecosystem.py."""

import huggingface_hub
import pytest
import yaml

from rlhf_utils.hub import check_push_to_hub, model_card, push_folder_to_hub, run_model_card


def test_model_card_metadata_names_hub_ids():
    card = model_card(
        "run", "EleutherAI/pythia-1b-deduped", ["trl-lib/tldr", "embedded/prompts"], ["ppo", "rlhf"], "text\n"
    )
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta == {
        "library_name": "transformers",
        "tags": ["ppo", "rlhf"],
        "base_model": "EleutherAI/pythia-1b-deduped",
        "datasets": ["trl-lib/tldr"],
    }
    assert card.split("---\n", 2)[2] == "\n# run\n\ntext\n"


def test_model_card_of_local_folders_has_no_base_model_or_datasets(tmp_path):
    local = str(tmp_path / "sft_model")
    card = model_card("run", local, ["./data.jsonl", "~/d", "a/b/c", ""], ["sft"], f"Fine-tuned from {local}.\n")
    assert card == f"---\nlibrary_name: transformers\ntags:\n- sft\n---\n\n# run\n\nFine-tuned from {local}.\n"


@pytest.mark.parametrize(
    "offline,repo_id,argument,words",
    [
        ("1", "me/model", "--push-to-hub", "HF_HUB_OFFLINE is set"),
        ("0", "me/my model", "--hub-model-id", "'me/my model' is not a valid Hub repository id"),
        ("0", "me/model", "--push-to-hub", "no Hugging Face token"),
    ],
)
def test_push_to_hub_stops_before_any_model_loads(offline, repo_id, argument, words, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no stored token either
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(SystemExit) as info:
        check_push_to_hub(repo_id)
    assert info.value.code.startswith(f"error: {argument}: {words}"), info.value.code


def test_the_upload_is_the_folder_as_written_without_checkpoints(monkeypatch, tmp_path):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **options):
            calls.append(("create_repo", repo_id, options))

        def upload_folder(self, **options):
            calls.append(("upload_folder", options))
            return "https://hub/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_folder_to_hub(str(tmp_path / "out") + "/", "me/model") == "https://hub/commit/1"
    assert calls == [
        ("create_repo", "me/model", {"exist_ok": True}),
        (
            "upload_folder",
            {
                "folder_path": str(tmp_path / "out") + "/",
                "repo_id": "me/model",
                "ignore_patterns": ["checkpoints/**", ".*"],
                "commit_message": "upload out",
            },
        ),
    ]


@pytest.mark.parametrize("adapter", [False, True], ids=["model", "lora-adapter"])
def test_the_cards_usage_snippet_loads_the_saved_model_and_its_yaml_says_the_library(adapter, tmp_path):
    """The card of a saved run carries TRL's tags, `library_name: peft` for an adapter, the framework versions and a
    snippet that, run as it is, loads the model and its tokenizer."""
    import os
    import shutil

    from helpers import EMBEDDED

    folder = str(tmp_path / "run")
    shutil.copytree(os.path.join(EMBEDDED, "sft_model"), folder)
    shutil.copytree(os.path.join(EMBEDDED, "tokenizer"), folder, dirs_exist_ok=True)
    if adapter:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(os.path.join(EMBEDDED, "sft_model"))
        get_peft_model(base, LoraConfig(r=2, target_modules=["query_key_value"])).save_pretrained(folder)
    usage = dict(location=folder, model_class="AutoModelForCausalLM", adapter=adapter)
    card = model_card("run", "EleutherAI/pythia-160m", [], ["sft"], "text\n", usage)
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == ("peft" if adapter else "transformers")
    assert {"sft", "trl"} <= set(meta["tags"]) and meta["base_model"] == "EleutherAI/pythia-160m"
    assert "## Framework versions" in card and "- transformers: " in card and ("- peft: " in card) == adapter
    snippet = card.split("```python\n")[1].split("```")[0]
    scope = {}
    exec(snippet, scope)
    assert type(scope["model"]).__name__ == ("PeftModelForCausalLM" if adapter else "GPTNeoXForCausalLM")
    assert scope["tokenizer"]("TL;DR:")["input_ids"]


def test_run_model_card_has_the_command_the_arguments_and_each_metrics_last_value(monkeypatch, tmp_path):
    import dataclasses
    import sys

    @dataclasses.dataclass
    class Args:
        output_dir: str = str(tmp_path / "my_run")
        dataset_name: str = "trl-lib/tldr"
        learning_rate: float = 0.25

    monkeypatch.setattr(sys, "argv", ["ppo_rlhf.py", "--learning-rate", "0.25"])
    rows = [{"loss": 2.0, "note": "text"}, {"loss": 1.5}]
    card = run_model_card(Args(), "A policy.", "EleutherAI/pythia-1b-deduped", ["ppo"], rows, "\nThe end.\n")
    assert "# my_run\n\nA policy.\n" in card and "python ppo_rlhf.py --learning-rate 0.25" in card
    assert '"learning_rate": 0.25' in card
    assert "| loss | 1.5 |" in card and "| note |" not in card and card.endswith("|\n\nThe end.\n")
    assert "base_model: EleutherAI/pythia-1b-deduped" in card and "trl-lib/tldr" in card
