"""Reward modelling on `prompt`/`chosen`/`rejected` pairs: the second stage of RLHF.

    python reward_modeling.py                       # the embedded tiny TL;DR task, offline, a few minutes on a CPU
    accelerate launch reward_modeling.py --model-name-or-path models/sft_tldr \
        --dataset-name trl-lib/tldr-preference --learning-rate 3e-6 --output-dir models/rm_tldr

A scalar head on the SFT model scores `prompt + completion + EOS` at its last non-pad token, trained with the
pairwise loss -log sigmoid(r_chosen - r_rejected). After training the scores are shifted so that the dataset's
reference completions score 0 on average (the N+ normalisation), and the shift is stored in the weights, so a
plain `AutoModelForSequenceClassification.from_pretrained` gives normalised scores.
"""

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    # common settings
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (W&B run names start with it)"""
    seed: int = 1
    """seed of python, numpy and torch"""
    track: bool = False
    """log to Weights and Biases"""
    wandb_project_name: str = "rlhf"
    """the W&B project"""
    wandb_entity: Optional[str] = None
    """the W&B entity (team)"""
    output_dir: str = "models/rm_tiny"
    """where the reward model and tokenizer are saved (written atomically at the end)"""
    overwrite_output_dir: bool = False
    """replace an existing non-empty output_dir"""
    save_steps: int = 0
    """write a resumable checkpoint every this many optimizer steps (0: never)"""
    save_total_limit: Optional[int] = 2
    """keep only the newest this many checkpoints (None: keep all)"""
    resume_from_checkpoint: Optional[str] = None
    """a checkpoint folder, or `latest` for the newest one in output_dir/checkpoints; the run continues exactly"""
    push_to_hub: bool = False
    """upload the saved model and tokenizer to the Hugging Face hub"""
    hub_model_id: Optional[str] = None
    """the hub repository for --push-to-hub (default: the output_dir's name)"""
    trust_remote_code: bool = False
    """allow models and tokenizers that run code from their repository"""

    # data and model
    model_name_or_path: str = "embedded/sft_model"
    """the SFT model the reward model starts from: a hub id or a local folder"""
    tokenizer_name_or_path: Optional[str] = None
    """the tokenizer (default: model_name_or_path); it needs a pad token distinct from EOS"""
    dataset_name: str = "embedded/preference_data"
    """hub id, a save_to_disk folder, or a json/jsonl/parquet file with `prompt`, `chosen`, `rejected` columns"""
    dataset_train_split: str = "train"
    """the split to train on"""
    dataset_test_split: str = "test"
    """the held-out split for accuracy (and accuracy against gold labels if it has `gold_chosen_is_better`)"""
    max_length: int = 256
    """pairs whose prompt + completion is longer (in tokens) are dropped and counted"""
    normalize_reward: bool = True
    """shift the scores so that the reference completions score 0 on average (N+ normalisation)"""
    normalize_dataset_name: str = "embedded/sft_data"
    """dataset with `prompt`/`completion` reference pairs used for the normalisation"""
    normalize_split: str = "validation"
    """its split"""
    normalize_num_examples: int = 256
    """how many reference completions are scored for the normalisation"""

    # optimisation
    learning_rate: float = 1e-3
    """peak learning rate (~3e-6 for Pythia-1B)"""
    num_train_epochs: int = 1
    """passes over the training split (the N+ recipe uses one)"""
    per_device_train_batch_size: int = 32
    """pairs per forward pass on each process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    """learning-rate schedule after warmup"""
    warmup_ratio: float = 0.05
    """fraction of the optimizer steps spent warming up linearly"""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay"""
    adam_epsilon: float = 1e-5
    """AdamW's epsilon"""
    adam_beta1: float = 0.9
    """AdamW's beta1"""
    adam_beta2: float = 0.999
    """AdamW's beta2"""
    max_grad_norm: Optional[float] = 1.0
    """gradient clipping norm; None: no clipping"""
    bf16: bool = False
    """bf16 autocast"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    logging_steps: int = 20
    """print/log the train loss and accuracy every this many optimizer steps"""


def fail(argument: str, message: str) -> None:
    """Stop before any expensive work, naming the argument and the fix."""
    sys.exit(f"error: --{argument.replace('_', '-')}: {message}")


def bool_flags_as_switches(argv: list, args_cls) -> list:
    """TRL's command-line habit (HfArgumentParser): `--bf16 True`, `--gradient_checkpointing False`, `--bf16=true`
    become tyro's `--bf16` / `--no-gradient-checkpointing` for the boolean fields of args_cls; other tokens pass as
    is."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(args_cls)
    switches = {f.name for f in dataclasses.fields(args_cls) if hints[f.name] is bool}
    words = {"true": True, "yes": True, "t": True, "y": True, "1": True,
             "false": False, "no": False, "f": False, "n": False, "0": False}
    out, i = [], 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        name = flag[2:].replace("-", "_") if flag.startswith("--") else None
        if name in switches and not eq and i + 1 < len(argv) and argv[i + 1].lower() in words:
            eq, value, i = "=", argv[i + 1], i + 1  # a boolean switch takes no value, so this word is its value
        if name in switches and eq and value.lower() in words:
            out.append(("--" if words[value.lower()] else "--no-") + name.replace("_", "-"))
        else:
            out.append(argv[i])
        i += 1
    return out


def progress_bar(total: int, unit: str, main_process: bool, initial: int = 0):
    """A bar with the rate and the time left, on the main process when stderr is a terminal; None otherwise, so piped
    logs keep their one line per update instead of carriage-return redraws."""
    if not (main_process and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    # The size once, at the start (COLUMNS/LINES, else the terminal's, else 80x24): tqdm draws nothing on a terminal
    # that reports 0 rows or columns (a fresh pseudo-terminal, some CI runners).
    size = shutil.get_terminal_size()
    return tqdm(total=total, initial=initial, unit=unit, file=sys.stderr, ncols=max(size.columns, 60),
                nrows=max(size.lines, 2))


def model_card(title: str, base_model: str, datasets: list, tags: list, body: str) -> str:
    """README.md of a saved model: the Hub's YAML metadata (what it indexes and filters by), then the text. Only
    hub ids go into the metadata (the Hub cannot resolve a local folder); the body names local ones."""
    import yaml

    def hub_id(name):
        local = os.path.exists(name) or name.count("/") > 1 or name.startswith((".", "~"))
        return None if not name or local else name

    meta = {"library_name": "transformers", "tags": tags}
    if hub_id(base_model):
        meta["base_model"] = base_model
    if [d for d in datasets if hub_id(d)]:
        meta["datasets"] = [d for d in datasets if hub_id(d)]
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# {title}\n\n{body}"


def wandb_row(row: dict) -> dict:
    """One W&B convention in every script, the names TRL's trainers log: train/* and eval/*, the optimizer step as
    train/global_step (every chart's x-axis, defined at wandb.init). metrics.jsonl keeps the short names."""
    names = {"lr": "train/learning_rate", "epoch": "train/epoch", "step": "train/global_step"}
    return {names.get(k, k if k.startswith(("train/", "eval/")) else "train/" + k): v for k, v in row.items()}


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
        fail("hub_model_id", f"{repo_id!r} is not a valid Hub repository id ({e}); pass --hub-model-id name or "
                             "org/name")
    if get_token() is None:
        fail("push_to_hub", "no Hugging Face token; run `hf auth login` or set HF_TOKEN, or drop --push-to-hub")
    try:
        HfApi().whoami()
    except Exception as e:  # unreachable Hub or a rejected token: both are found out now, not after training
        fail("push_to_hub", f"the Hub did not answer or refused the token ({type(e).__name__}: {e}); fix that or "
                            "drop --push-to-hub")


def push_folder_to_hub(folder: str, repo_id: str) -> str:
    """Upload the saved output folder as written (models, subfolders, card, metrics.jsonl, args.json), without the
    resumable checkpoints; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(folder_path=folder, repo_id=repo_id, ignore_patterns=["checkpoints/**", ".*"],
                             commit_message=f"upload {os.path.basename(os.path.abspath(folder))}")


def load_any_dataset(name: str, split: str):
    """A hub id, a `save_to_disk` folder (DatasetDict or Dataset), or a json/jsonl/parquet file."""
    from datasets import Dataset, load_dataset, load_from_disk

    if os.path.isdir(name) and any(os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")):
        data = load_from_disk(name)
        return data if isinstance(data, Dataset) else data[split]
    if os.path.isfile(name):
        kind = "parquet" if name.endswith(".parquet") else "json"
        return load_dataset(kind, data_files=name, split="train")
    return load_dataset(name, split=split)


def pad_batch(sequences: list, pad_token_id: int, side: str = "right") -> tuple:
    """Pad token-id lists into (input_ids, attention_mask)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        input_ids[i, cols], attention_mask[i, cols] = torch.tensor(s), 1
    return input_ids, attention_mask


def get_reward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar score at the last attended token, for left or right padding. Position ids count real tokens
    only, so a left-padded sequence gets the same score as the unpadded one. It goes through the model's own forward
    (which reads the last non-pad token: the same one, as pad only pads), so that a DDP or DeepSpeed wrapper sees the
    call: DDP syncs no gradient of a backward whose forward bypassed it."""
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits.squeeze(-1)


def pairwise_loss_and_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple:
    """Bradley-Terry loss -log sigmoid(r_c - r_r) and the fraction of pairs ranked right (ties count wrong)."""
    return -F.logsigmoid(chosen - rejected).mean(), (chosen > rejected).float().mean()


def final_norm(model):
    """The norm whose output feeds the score head (GPT-NeoX: final_layer_norm; Llama-style: norm), or None."""
    return getattr(model.base_model, "final_layer_norm", None) or getattr(model.base_model, "norm", None)


def shift_scores(model, delta: float) -> None:
    """Add `delta` to every score by moving the bias of the final norm that feeds the linear head along the
    head's weight: score = w . (norm(h) + b), so b += delta * w / |w|^2 shifts it exactly. The architecture
    stays stock, so plain `from_pretrained` reproduces the normalised scores."""
    w = model.score.weight.data[0].float()
    norm = final_norm(model)
    if norm is None or getattr(norm, "bias", None) is None:
        raise ValueError("reward normalisation needs a final norm with a bias before the score head; "
                         "pass --no-normalize-reward for this architecture")
    norm.bias.data += (delta * w / w.dot(w)).to(norm.bias.dtype)


def atomic_save(output_dir: str, write) -> None:
    """`write(tmp_dir)` fills a temporary folder, which then replaces output_dir in one rename. The run's
    checkpoints (output_dir/checkpoints) are moved over, not lost."""
    tmp = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if os.path.exists(output_dir):
        if os.path.isdir(os.path.join(output_dir, "checkpoints")):
            os.replace(os.path.join(output_dir, "checkpoints"), os.path.join(tmp, "checkpoints"))
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete checkpoint (incomplete ones are still named *.tmp and never match)."""
    folder = os.path.join(output_dir, "checkpoints")
    names = [n for n in os.listdir(folder) if n.startswith("checkpoint-") and n[11:].isdigit()] \
        if os.path.isdir(folder) else []
    return os.path.join(folder, max(names, key=lambda n: int(n[11:]))) if names else None


def rng_state() -> dict:
    """Every random state of this process, as tensors and ints so that torch.load(weights_only=True) reads it."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    return {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
            "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_rest": [np_state[0], np_state[2], np_state[3], np_state[4]], "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.tolist()), gauss))
    name, pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state((name, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


if __name__ == "__main__":
    args = tyro.cli(Args, args=bool_flags_as_switches(sys.argv[1:], Args))

    # Validate everything cheap before loading a model.
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

    resume_dir = args.resume_from_checkpoint
    if resume_dir == "latest":
        resume_dir = latest_checkpoint(args.output_dir)
        if resume_dir is None:
            fail("resume_from_checkpoint", f"no checkpoint in {os.path.join(args.output_dir, 'checkpoints')!r}; "
                                           "start without --resume-from-checkpoint")
    elif resume_dir is not None and not os.path.isfile(os.path.join(resume_dir, "state.pt")):
        problem = "is not a checkpoint folder (no state.pt)" if os.path.isdir(resume_dir) else "does not exist"
        fail("resume_from_checkpoint", f"{resume_dir!r} {problem}; pass one of "
                                       f"{os.path.join(args.output_dir, 'checkpoints', 'checkpoint-*')} or `latest`")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not (args.overwrite_output_dir or resume_dir):
        fail("output_dir", f"{args.output_dir!r} exists and is not empty; pass --overwrite-output-dir, "
                           "--resume-from-checkpoint latest, or another path")
    if args.save_steps < 0:
        fail("save_steps", f"must be >= 0 (0: no checkpoints), got {args.save_steps}")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        fail("save_total_limit", f"must be >= 1 (or None: keep every checkpoint), got {args.save_total_limit}")
    # state.pt is small (the optimizer has its own file), so reading it here costs nothing.
    resume_state = torch.load(os.path.join(resume_dir, "state.pt"), weights_only=True) if resume_dir else None
    if resume_state is not None:
        # Resuming continues the checkpoint's run: only where and how often things are written, tracking and memory
        # savers may differ; anything else would silently train a different model.
        may_change = {"exp_name", "track", "wandb_project_name", "wandb_entity", "output_dir", "overwrite_output_dir",
                      "push_to_hub", "hub_model_id", "trust_remote_code", "save_steps", "save_total_limit",
                      "resume_from_checkpoint", "logging_steps", "gradient_checkpointing"}
        saved, now = json.loads(resume_state["args"]), json.loads(json.dumps(asdict(args)))  # as saved: lists, not tuples
        changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {v!r})" for k, v in now.items()
                   if k not in may_change and saved.get(k) != v]
        if changed:
            fail("resume_from_checkpoint", f"{resume_dir!r} was written by a run with {', '.join(changed)}; resume "
                                           "with the same values, or start a new run")
    if args.push_to_hub:
        check_push_to_hub(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)))
    for name in ("learning_rate", "per_device_train_batch_size", "num_train_epochs", "gradient_accumulation_steps",
                 "max_length"):
        if getattr(args, name) <= 0:
            fail(name, f"must be positive, got {getattr(args, name)}")
    for name in ("adam_epsilon", "max_grad_norm"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            fail(name, f"must be positive, got {getattr(args, name)}"
                       + (" (None: no clipping)" if name == "max_grad_norm" else ""))
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            fail(name, f"must be in [0, 1), got {getattr(args, name)}")
    if not args.weight_decay >= 0:
        fail("weight_decay", f"must be >= 0, got {args.weight_decay}")
    tokenizer_path = args.tokenizer_name_or_path or args.model_name_or_path
    for arg, path in (("model_name_or_path", args.model_name_or_path), ("tokenizer_name_or_path", tokenizer_path)):
        # A hub id is `name` or `org/name`; anything else that does not exist is a missing local folder.
        looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
        if not os.path.exists(path) and (looks_local or os.environ.get("HF_HUB_OFFLINE") == "1"):
            fail(arg, f"{path!r} does not exist; train it with `python sft.py` or pass a path/hub id")
    splits = {}
    for arg, name, split, columns in (
            ("dataset_train_split", args.dataset_name, args.dataset_train_split, {"prompt", "chosen", "rejected"}),
            ("dataset_test_split", args.dataset_name, args.dataset_test_split, {"prompt", "chosen", "rejected"}),
            ("normalize_split", args.normalize_dataset_name, args.normalize_split, {"prompt", "completion"})):
        if arg == "normalize_split" and not args.normalize_reward:
            continue
        dataset_arg = "normalize_dataset_name" if arg == "normalize_split" else "dataset_name"
        try:
            splits[arg] = load_any_dataset(name, split)
        except Exception as e:
            fail(dataset_arg, f"could not load split {split!r} of {name!r} (is it empty, or missing that split?): {e}")
        missing = columns - set(splits[arg].column_names)
        if missing:
            fail(dataset_arg, f"split {split!r} of {name!r} lacks columns {sorted(missing)} (has "
                              f"{splits[arg].column_names}); it needs {sorted(columns)}")
        if len(splits[arg]) == 0:
            fail(arg, f"split {split!r} of {name!r} is empty")
    if os.path.isfile(args.dataset_name) and len(splits["dataset_train_split"]) > 1:
        # One file has no splits: hold out its last 10% as the test pairs.
        data = splits["dataset_train_split"]
        cut = len(data) - max(1, len(data) // 10)
        splits["dataset_train_split"], splits["dataset_test_split"] = data.select(range(cut)), data.select(range(cut, len(data)))
    config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    if getattr(config, "num_labels", 1) != 1 and any("ForSequenceClassification" in a for a in config.architectures or []):
        fail("model_name_or_path", f"{args.model_name_or_path!r} is a classifier with {config.num_labels} labels; "
                                   "a reward model has one (start from the SFT model instead)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        fail("tokenizer_name_or_path", f"{tokenizer_path!r} has pad token {tokenizer.pad_token!r} (EOS is "
                                       f"{tokenizer.eos_token!r}); add a distinct one, e.g. "
                                       "tokenizer.add_special_tokens({'pad_token': '[PAD]'}), and save it")

    # TRY NOT TO MODIFY: seeding, processes, tracking
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    # On a CPU-only host the processes talk over gloo: cpu=True joins the process group that torchrun (or `accelerate
    # launch --multi_gpu`) set up, where a plain Accelerator() would run independent copies; accelerate ignores
    # DeepSpeed under cpu=True, and DeepSpeed needs the backend named or each rank sees one process. GPUs: NCCL.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = not torch.cuda.is_available()
    deepspeed_launch = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(cpu=on_cpu and not deepspeed_launch, gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision="bf16" if args.bf16 else "no",
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if on_cpu and world_size > 1 else [])
    if accelerator.num_processes != world_size:
        fail("num_processes", f"WORLD_SIZE says {world_size} processes but accelerate runs {accelerator.num_processes}")
    is_deepspeed, zero_stage = accelerator.distributed_type == DistributedType.DEEPSPEED, 0
    if is_deepspeed:
        # Clip at --max-grad-norm whatever the config file says; ZeRO-3 gathers full weights to save a loadable model.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["gradient_clipping"] = args.max_grad_norm or 0.0  # 0: off
        zero_stage = ds_config["zero_optimization"]["stage"]
        if zero_stage == 3:
            ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if resume_state is not None:
        # Each process's data position and RNG state, and DeepSpeed's optimizer shards, belong to one launch layout.
        if resume_state["world_size"] != world_size:
            fail("resume_from_checkpoint", f"the checkpoint was written by {resume_state['world_size']} processes; "
                                           f"resume it with the same number, not {world_size}")
        if resume_state["zero_stage"] != (zero_stage if is_deepspeed else None):
            fail("resume_from_checkpoint", f"the checkpoint was written with DeepSpeed ZeRO stage "
                                           f"{resume_state['zero_stage']}, this launch has "
                                           f"{zero_stage if is_deepspeed else None} (None: no DeepSpeed); resume it the same way")

    def gathered(params: list):
        """Under ZeRO-3 the models are loaded as shards: gather these parameters to change them (on the main process,
        then re-partitioned); otherwise a no-op."""
        if zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.track and accelerator.is_main_process:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args), name=run_name)
        wandb.define_metric("train/global_step")
        wandb.define_metric("*", step_metric="train/global_step")

    # Data: prompt + completion + EOS, so that the score is read at EOS, as in PPO where responses end with it.
    def encode(prompt: str, completion: str) -> list:
        return tokenizer(prompt + completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def tokenize_pairs(data):
        has_gold = "gold_chosen_is_better" in data.column_names
        rows = []
        for i, row in enumerate(data):
            c, r = encode(row["prompt"], row["chosen"]), encode(row["prompt"], row["rejected"])
            if max(len(c), len(r)) <= args.max_length:
                rows.append({"chosen": c, "rejected": r, "gold": int(row["gold_chosen_is_better"]) if has_gold else -1})
        return rows, len(data) - len(rows)

    train_rows, dropped_train = tokenize_pairs(splits["dataset_train_split"])
    eval_rows, dropped_eval = tokenize_pairs(splits["dataset_test_split"])
    accelerator.print(f"{len(train_rows)} train / {len(eval_rows)} eval pairs; dropped as longer than --max-length "
                      f"{args.max_length}: {dropped_train} train, {dropped_eval} eval")
    if not train_rows:
        fail("max_length", f"every training pair is longer than {args.max_length} tokens")
    pad = tokenizer.pad_token_id

    def collate(batch):
        # Chosen and rejected go through the model in one forward: first half chosen, second half rejected.
        input_ids, attention_mask = pad_batch([b["chosen"] for b in batch] + [b["rejected"] for b in batch], pad)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "gold": torch.tensor([b["gold"] for b in batch])}

    shuffle_generator = torch.Generator().manual_seed(args.seed)  # its state at each epoch's start goes in checkpoints
    train_loader = torch.utils.data.DataLoader(train_rows, batch_size=args.per_device_train_batch_size, shuffle=True,
                                               collate_fn=collate, generator=shuffle_generator)
    eval_loader = torch.utils.data.DataLoader(eval_rows, batch_size=args.per_device_train_batch_size, collate_fn=collate)

    # Model: the SFT backbone with a fresh one-output head, N(0, 1/sqrt(d_model + 1)) as in the N+ recipe.
    for key in ("hidden_dropout", "attention_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    config.num_labels, config.id2label, config.label2id = 1, {0: "LABEL_0"}, {"LABEL_0": 0}
    config.pad_token_id = pad
    # A resumed run takes the trained weights, head included, from the checkpoint.
    model = AutoModelForSequenceClassification.from_pretrained(os.path.join(resume_dir, "model") if resume_dir else
                                                               args.model_name_or_path, config=config,
                                                               trust_remote_code=args.trust_remote_code)
    if not resume_dir:
        with gathered([model.score.weight]):
            torch.nn.init.normal_(model.score.weight, std=1 / math.sqrt(config.hidden_size + 1))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, eps=args.adam_epsilon,
                                  betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay)
    # The schedule counts this process's optimizer steps (accelerate gives each process ceil(batches / processes)
    # batches) and is stepped by hand once per optimizer step, so it is not prepared: accelerate's wrapper would step
    # it once per process instead, which overshoots the schedule when the batches do not split evenly.
    batches_per_process = math.ceil(len(train_loader) / accelerator.num_processes)
    num_update_steps = math.ceil(batches_per_process / args.gradient_accumulation_steps) * args.num_train_epochs
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=int(args.warmup_ratio * num_update_steps),
                              num_training_steps=num_update_steps)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    unwrapped = accelerator.unwrap_model(model)

    @torch.no_grad()
    def evaluate() -> dict:
        """Held-out loss, accuracy against the dataset's labels, and against gold labels where they exist."""
        model.eval()
        stats = torch.zeros(5, device=accelerator.device)  # loss sum, correct, count, gold correct, gold count
        for batch in eval_loader:
            rewards = get_reward(unwrapped, batch["input_ids"], batch["attention_mask"])
            chosen, rejected = rewards.chunk(2)
            stats[0] += -F.logsigmoid(chosen - rejected).sum()
            stats[1] += (chosen > rejected).sum()
            stats[2] += len(chosen)
            has_gold = batch["gold"] >= 0
            stats[3] += ((chosen > rejected) == (batch["gold"] == 1))[has_gold].sum()
            stats[4] += has_gold.sum()
        stats = accelerator.reduce(stats, "sum")
        model.train()
        out = {"eval/loss": (stats[0] / stats[2]).item(), "eval/accuracy": (stats[1] / stats[2]).item()}
        if stats[4] > 0:
            out["eval/gold_accuracy"] = (stats[3] / stats[4]).item()
        return out

    # TRY NOT TO MODIFY: checkpoints (--save-steps) and resuming (--resume-from-checkpoint)
    def save_checkpoint(epoch: int, batches_done: int, shuffle_state: torch.Tensor) -> None:
        """The weights (safetensors), optimizer, scheduler, data position, metrics so far, args and every process's
        RNG states, written to checkpoint-N.tmp and renamed into place: a kill at any moment leaves the earlier
        checkpoints intact and never a half-written one under a final name. Under DeepSpeed the optimizer state is
        partitioned: every process writes its own part with the engine's save_checkpoint."""
        folder = os.path.join(args.output_dir, "checkpoints", f"checkpoint-{step}")
        tmp = folder + ".tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(model)  # on every process: ZeRO-3 gathers the shards
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{accelerator.process_index}.pt"))
        if is_deepspeed:
            model.save_checkpoint(tmp, tag="deepspeed", save_latest=False)
        if accelerator.is_main_process:
            unwrapped.save_pretrained(os.path.join(tmp, "model"), state_dict=state_dict)
            if not is_deepspeed:
                torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            torch.save({"scheduler": scheduler.state_dict(), "step": step, "epoch": epoch, "batches_done": batches_done,
                        "shuffle": shuffle_state, "metrics": json.dumps(metrics_log), "args": json.dumps(asdict(args)),
                        "world_size": world_size, "zero_stage": zero_stage if is_deepspeed else None},
                       os.path.join(tmp, "state.pt"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
            done = sorted((n for n in os.listdir(os.path.dirname(folder)) if n[11:].isdigit()), key=lambda n: int(n[11:]))
            for old in done[: -args.save_total_limit] if args.save_total_limit else []:
                shutil.rmtree(os.path.join(args.output_dir, "checkpoints", old))
        accelerator.wait_for_everyone()

    metrics_log, step, first_epoch, skip_batches, start = [], 0, 0, 0, time.time()
    if resume_dir:
        # The weights came with the model above; the optimizer, schedule, data position, metrics and RNG come here.
        if is_deepspeed:
            model.load_checkpoint(resume_dir, tag="deepspeed", load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            optimizer.load_state_dict(torch.load(os.path.join(resume_dir, "optimizer.pt"), weights_only=True))
        scheduler.load_state_dict(resume_state["scheduler"])
        step, first_epoch, skip_batches = resume_state["step"], resume_state["epoch"], resume_state["batches_done"]
        shuffle_generator.set_state(resume_state["shuffle"])
        metrics_log = json.loads(resume_state["metrics"])
        set_rng_state(torch.load(os.path.join(resume_dir, f"rng_rank{accelerator.process_index}.pt"), weights_only=True))
        accelerator.print(f"resumed from {resume_dir}: continuing after optimizer step {step} (epoch {first_epoch}, "
                          f"{skip_batches} batches in)")
    elif accelerator.is_main_process:
        # A fresh run: the checkpoints of a run that --overwrite-output-dir replaces must not mix with its own.
        shutil.rmtree(os.path.join(args.output_dir, "checkpoints"), ignore_errors=True)

    # ALGO LOGIC: the training loop
    model.train()
    bar = progress_bar(num_update_steps, "step", accelerator.is_main_process, initial=step)
    for epoch in range(first_epoch, args.num_train_epochs):
        # The epoch's shuffle is drawn from this generator state: checkpoints keep it, so a resumed run draws the same
        # shuffle and skips the batches already trained on.
        shuffle_state = shuffle_generator.get_state()
        batches = accelerator.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
        for batch_index, batch in enumerate(batches, start=skip_batches):
            with accelerator.accumulate(model):
                chosen, rejected = get_reward(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
                loss, accuracy = pairwise_loss_and_accuracy(chosen, rejected)
                if not torch.isfinite(loss):
                    sys.exit(f"error: non-finite loss {loss.item()} at optimizer step {step}; lower --learning-rate")
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                if bar is not None:
                    bar.update(1)
                if step % args.logging_steps == 0:
                    row = {"train/loss": accelerator.reduce(loss.detach(), "mean").item(),
                           "train/accuracy": accelerator.reduce(accuracy, "mean").item(),
                           "lr": scheduler.get_last_lr()[0], "epoch": epoch, "step": step}
                    metrics_log.append(row)
                    (bar.write if bar is not None else accelerator.print)(
                        f"step {step}/{num_update_steps} loss {row['train/loss']:.4f} "
                        f"accuracy {row['train/accuracy']:.3f}")
                    if args.track and accelerator.is_main_process:
                        wandb.log(wandb_row(row))
                if args.save_steps and step % args.save_steps == 0:
                    save_checkpoint(epoch, batch_index + 1, shuffle_state)
        skip_batches = 0
        row = {**evaluate(), "epoch": epoch, "step": step}
        metrics_log.append(row)
        (bar.write if bar is not None else accelerator.print)(f"epoch {epoch}: {row} ({time.time() - start:.0f}s)")
        if args.track and accelerator.is_main_process:
            wandb.log(wandb_row(row))

    if bar is not None:
        bar.close()

    # N+ normalisation: score the reference completions and shift so that their mean is 0.
    if args.normalize_reward:
        refs = splits["normalize_split"].select(range(min(args.normalize_num_examples, len(splits["normalize_split"]))))
        sequences = [s for s in (encode(p, c) for p, c in zip(refs["prompt"], refs["completion"])) if len(s) <= args.max_length]
        # An equal share per process, the short one padded with weight-0 repeats: under ZeRO-3 forwards are collective.
        share = math.ceil(len(sequences) / accelerator.num_processes)
        mine = sequences[accelerator.process_index * share: (accelerator.process_index + 1) * share]
        weights = torch.tensor([1.0] * len(mine) + [0.0] * (share - len(mine)), device=accelerator.device)
        mine += sequences[:1] * (share - len(mine))
        total = torch.zeros(2, device=accelerator.device)
        model.eval()
        with torch.no_grad():
            for i in range(0, len(mine), args.per_device_train_batch_size):
                input_ids, attention_mask = pad_batch(mine[i: i + args.per_device_train_batch_size], pad)
                rewards = get_reward(unwrapped, input_ids.to(accelerator.device), attention_mask.to(accelerator.device))
                w = weights[i: i + args.per_device_train_batch_size]
                total += torch.stack([(rewards * w).sum(), w.sum()])
            total = accelerator.reduce(total, "sum")
            mean_before = (total[0] / total[1]).item()
            norm = final_norm(unwrapped)
            with gathered([unwrapped.score.weight] + (list(norm.parameters()) if norm is not None else [])):
                shift_scores(unwrapped, -mean_before)
        accelerator.print(f"reward normalisation: reference completions scored {mean_before:.4f} on average; "
                          "shifted to 0")
        metrics_log.append({"normalization/reference_mean_before": mean_before, "step": step})

    # Save atomically; the config keeps num_labels=1 and the pad id, so the HF forward reads the same token.
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        def write(path):
            unwrapped.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(path)
            with open(os.path.join(path, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in metrics_log)
            with open(os.path.join(path, "args.json"), "w") as f:
                json.dump(asdict(args), f, indent=2)
            with open(os.path.join(path, "README.md"), "w") as f:
                f.write(model_card(
                    os.path.basename(os.path.abspath(args.output_dir)), args.model_name_or_path,
                    [args.dataset_name] + ([args.normalize_dataset_name] if args.normalize_reward else []),
                    ["reward-model", "rlhf"],
                    f"A reward model (one score per sequence, read at its last token) trained with `reward_modeling.py` "
                    f"from `{args.model_name_or_path}` on the preference pairs of `{args.dataset_name}`.\n\n## Command"
                    "\n\n```\npython " + " ".join(sys.argv) + "\n```\n\nEvery logged row is in `metrics.jsonl`, the "
                    "arguments in `args.json`.\n"))

        atomic_save(args.output_dir, write)
        accelerator.print(f"saved to {args.output_dir} after {time.time() - start:.0f}s")
        if args.push_to_hub:
            url = push_folder_to_hub(args.output_dir,
                                     args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)))
            accelerator.print(f"uploaded {args.output_dir} to {url}")
    accelerator.wait_for_everyone()
    del model, optimizer  # before the process group goes: avoids gloo's abort at exit
    accelerator.end_training()
