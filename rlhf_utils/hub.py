"""Hugging Face Hub: model cards, checking --push-to-hub before training, uploading the output folder."""

import json
import os
import sys
from dataclasses import asdict
from typing import Optional

from rlhf_utils.cli import fail


def model_card(
    title: str, base_model: str, datasets: list, tags: list, body: str, usage: Optional[dict] = None
) -> str:
    """README.md of a saved model: the Hub's YAML metadata (what it indexes and filters by), then the text. Only
    hub ids go into the metadata (the Hub cannot resolve a local folder); the body names local ones. With `usage`
    ({"location": hub id or folder, "model_class": transformers' Auto class, "adapter": bool}), the card also has
    TRL's tags, the library an adapter needs (peft), a snippet that loads the model, and the framework versions."""
    from huggingface_hub import ModelCardData

    def hub_id(name):
        local = os.path.exists(name) or name.count("/") > 1 or name.startswith((".", "~"))
        return None if not name or local else name

    hub_datasets = [d for d in datasets if hub_id(d)]
    library = "peft" if usage and usage.get("adapter") else "transformers"
    if usage:  # the tags TRL's trainers put on their cards, so Hub filters written for them find these models
        tags = list(dict.fromkeys([*tags, "trl", "generated_from_trainer"]))
    meta = ModelCardData(library_name=library, tags=tags, base_model=hub_id(base_model), datasets=hub_datasets or None)
    if usage:
        body = body.rstrip("\n") + "\n\n" + usage_section(**usage)
    return f"---\n{meta.to_yaml()}\n---\n\n# {title}\n\n{body}"


def usage_section(location: str, model_class: str, adapter: bool = False) -> str:
    """How to load the saved model, and the versions it was trained with."""
    import importlib.metadata

    where = json.dumps(location)
    if adapter:  # a LoRA adapter: PEFT loads the base named in adapter_config.json, then the adapter
        model_class, module = model_class.replace("AutoModel", "AutoPeftModel"), "peft"
    else:
        module = "transformers"
    code = (
        f"from {module} import {model_class}\nfrom transformers import AutoTokenizer\n\n"
        f"model = {model_class}.from_pretrained({where})\ntokenizer = AutoTokenizer.from_pretrained({where})\n"
    )
    packages = ["torch", "transformers", "accelerate", "datasets"] + (["peft"] if adapter else [])
    versions = "".join(f"- {name}: {importlib.metadata.version(name)}\n" for name in packages)
    return f"## Usage\n\n```python\n{code}```\n\n## Framework versions\n\n{versions}"


def check_push_to_hub(repo_id: str) -> None:
    """--push-to-hub fails here, before any model loads, rather than after the training: offline mode, the repo id,
    the token and whether the Hub accepts it."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"):
        fail("push_to_hub", "HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it or drop --push-to-hub")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        fail(
            "hub_model_id", f"{repo_id!r} is not a valid Hub repository id ({e}); pass --hub-model-id name or org/name"
        )
    if get_token() is None:
        fail("push_to_hub", "no Hugging Face token; run `hf auth login` or set HF_TOKEN, or drop --push-to-hub")
    try:
        HfApi().whoami()
    except Exception as e:  # unreachable Hub or a rejected token: both are found out now, not after training
        fail(
            "push_to_hub",
            f"the Hub did not answer or refused the token ({type(e).__name__}: {e}); fix that or drop --push-to-hub",
        )


def push_folder_to_hub(folder: str, repo_id: str) -> str:
    """Upload the saved output folder as written (models, subfolders, card, metrics.jsonl, args.json), without the
    resumable checkpoints; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(
        folder_path=folder,
        repo_id=repo_id,
        ignore_patterns=["checkpoints/**", ".*"],
        commit_message=f"upload {os.path.basename(os.path.abspath(folder))}",
    )


def run_model_card(
    args, summary: str, base_model: str, tags: list, rows: list, footer: str = "", usage: Optional[dict] = None
) -> str:
    """A trained model's card: the summary, the command, the arguments, each metric's last logged value in `rows`
    (the metrics.jsonl rows) and the footer."""
    final = {k: v for row in rows for k, v in row.items()}  # each metric's last logged value
    metrics = "".join(f"| {k} | {v:.4g} |\n" for k, v in final.items() if isinstance(v, (int, float)))
    body = (
        f"{summary}\n\n"
        f"## Command\n\n```\npython {' '.join(sys.argv)}\n```\n\n"
        f"## Arguments\n\n```json\n{json.dumps(asdict(args), indent=2)}\n```\n\n"
        f"## Final metrics\n\n| metric | value |\n|---|---|\n{metrics}{footer}"
    )
    name = os.path.basename(os.path.abspath(args.output_dir))
    return model_card(name, base_model, [args.dataset_name], tags, body, usage)
