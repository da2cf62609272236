"""Supervised fine-tuning on `prompt`/`completion` data: the first stage of RLHF.

    python sft.py                                   # the embedded tiny TL;DR task, offline, a few minutes on a CPU
    accelerate launch sft.py --model-name-or-path EleutherAI/pythia-1b-deduped --dataset-name trl-lib/tldr \
        --learning-rate 3e-5 --num-train-epochs 1 --output-dir models/sft_tldr

The loss is the next-token cross-entropy on completion tokens only (prompt and padding positions are masked),
and the completion ends with EOS so that the policy learns to stop.
"""

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
    output_dir: str = "models/sft_tiny"
    """where the model and tokenizer are saved (written atomically at the end)"""
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
    model_name_or_path: str = "embedded/base_model"
    """the base model: a hub id or a local folder"""
    tokenizer_name_or_path: Optional[str] = None
    """the tokenizer (default: model_name_or_path); it needs a pad token distinct from EOS"""
    dataset_name: str = "embedded/sft_data"
    """hub id, a save_to_disk folder, or a json/jsonl/parquet file with `prompt` and `completion` columns"""
    dataset_train_split: str = "train"
    """the split to train on"""
    dataset_test_split: str = "validation"
    """the held-out split for the eval loss and sample completions"""
    max_length: int = 256
    """examples whose prompt + completion is longer (in tokens) are dropped and counted"""

    # optimisation
    learning_rate: float = 3e-3
    """peak learning rate (tiny models trained from scratch like it high; ~3e-5 for Pythia-1B)"""
    num_train_epochs: int = 3
    """passes over the training split"""
    per_device_train_batch_size: int = 32
    """examples per forward pass on each process"""
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
    """bf16 autocast (about 2x matmul speed on CPUs with avx512_bf16, and on GPUs)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    logging_steps: int = 20
    """print/log the train loss every this many optimizer steps"""
    num_sample_completions: int = 6
    """validation prompts shown with the model's greedy completion at the end"""
    sample_max_new_tokens: int = 53
    """generation length of the sample completions"""

    # LoRA (PEFT)
    use_peft: bool = False
    """train a LoRA adapter instead of the model's weights; output_dir then holds the adapter"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)"""
    lora_dropout: float = 0.0
    """dropout on the adapter's input (0, like every dropout in the RLHF pipeline)"""
    lora_target_modules: Optional[list[str]] = None
    """modules that get an adapter (default: PEFT's choice for the architecture; `all-linear` for every linear layer)"""
    merge_adapter_on_save: bool = False
    """also save the adapter merged into the base weights, in output_dir/merged (a plain model, e.g. for
    reward_modeling.py)"""


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


def tokenize_example(tokenizer, prompt: str, completion: str) -> dict:
    """Prompt and completion tokenised separately (no chat template), EOS appended; labels mask the prompt."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + completion_ids, "labels": [-100] * len(prompt_ids) + completion_ids}


def collate(batch: list, pad_token_id: int) -> dict:
    """Right padding: padded positions get label -100 and attention 0."""
    width = max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        input_ids[i, :n], attention_mask[i, :n], labels[i, :n] = torch.tensor(b["input_ids"]), 1, torch.tensor(b["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def completion_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy on positions whose label is not -100 (the completion tokens)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction=reduction)


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

    # Validate everything cheap before loading a model: a typo should cost a second, not a model load.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_scheduler

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
                      "resume_from_checkpoint", "logging_steps", "gradient_checkpointing", "num_sample_completions",
                      "sample_max_new_tokens", "merge_adapter_on_save"}
        saved, now = json.loads(resume_state["args"]), json.loads(json.dumps(asdict(args)))  # as saved: lists, not tuples
        changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {v!r})" for k, v in now.items()
                   if k not in may_change and saved.get(k) != v]
        if changed:
            fail("resume_from_checkpoint", f"{resume_dir!r} was written by a run with {', '.join(changed)}; resume "
                                           "with the same values, or start a new run")
    if args.push_to_hub:
        check_push_to_hub(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)))
    if args.merge_adapter_on_save and not args.use_peft:
        fail("merge_adapter_on_save", "merges a LoRA adapter into the model; add --use-peft")
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
            fail(arg, f"{path!r} does not exist; build the embedded task with `python tiny_tldr.py` or pass a path/hub id")
    try:
        train_data = load_any_dataset(args.dataset_name, args.dataset_train_split)
        eval_data = load_any_dataset(args.dataset_name, args.dataset_test_split)
    except Exception as e:  # the datasets library has many failure types; all mean the same thing to the user
        fail("dataset_name", f"could not load {args.dataset_name!r} splits {args.dataset_train_split!r}/"
                             f"{args.dataset_test_split!r} (is it empty, or missing that split?): {e}")
    if os.path.isfile(args.dataset_name) and len(train_data) > 1:  # one file has no splits: hold out its last 10%
        cut = len(train_data) - max(1, len(train_data) // 10)
        train_data, eval_data = train_data.select(range(cut)), train_data.select(range(cut, len(train_data)))
    for split_name, data in (("dataset_train_split", train_data), ("dataset_test_split", eval_data)):
        missing = {"prompt", "completion"} - set(data.column_names)
        if missing:
            fail("dataset_name", f"split {getattr(args, split_name)!r} lacks columns {sorted(missing)} "
                                 f"(has {data.column_names}); SFT needs `prompt` and `completion` strings")
        if len(data) == 0:
            fail(split_name, f"split {getattr(args, split_name)!r} of {args.dataset_name!r} is empty")
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

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.track and accelerator.is_main_process:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args), name=run_name)
        wandb.define_metric("train/global_step")
        wandb.define_metric("*", step_metric="train/global_step")

    # Data: tokenise, drop (and count) over-long examples.
    def tokenize_split(data):
        rows = [tokenize_example(tokenizer, p, c) for p, c in zip(data["prompt"], data["completion"])]
        kept = [r for r in rows if len(r["input_ids"]) <= args.max_length]
        return kept, len(rows) - len(kept)

    train_rows, dropped_train = tokenize_split(train_data)
    eval_rows, dropped_eval = tokenize_split(eval_data)
    accelerator.print(f"{len(train_rows)} train / {len(eval_rows)} eval examples; dropped as longer than "
                      f"--max-length {args.max_length}: {dropped_train} train, {dropped_eval} eval")
    if not train_rows:
        fail("max_length", f"every training example is longer than {args.max_length} tokens")
    pad = tokenizer.pad_token_id
    shuffle_generator = torch.Generator().manual_seed(args.seed)  # its state at each epoch's start goes in checkpoints
    train_loader = torch.utils.data.DataLoader(train_rows, batch_size=args.per_device_train_batch_size, shuffle=True,
                                               collate_fn=lambda b: collate(b, pad), generator=shuffle_generator)
    eval_loader = torch.utils.data.DataLoader(eval_rows, batch_size=args.per_device_train_batch_size,
                                              collate_fn=lambda b: collate(b, pad))

    # Model: dropout off, as in the whole RLHF pipeline (the N+ recipe).
    config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    for key in ("hidden_dropout", "attention_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    # A resumed run takes the trained weights (with LoRA: the trained adapter) from the checkpoint.
    trained_path = os.path.join(resume_dir, "model") if resume_dir else None
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path if args.use_peft or not resume_dir else trained_path,
                                                 config=config, trust_remote_code=args.trust_remote_code)
    if args.use_peft:
        from peft import LoraConfig, PeftModel, get_peft_model

        if resume_dir:
            model = PeftModel.from_pretrained(model, trained_path, is_trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha,
                                                     lora_dropout=args.lora_dropout, target_modules=args.lora_target_modules))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  eps=args.adam_epsilon,
                                  betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay)
    # The schedule counts this process's optimizer steps (accelerate gives each process ceil(batches / processes)
    # batches) and is stepped by hand once per optimizer step, so it is not prepared: accelerate's wrapper would step
    # it once per process instead, which overshoots the schedule when the batches do not split evenly.
    batches_per_process = math.ceil(len(train_loader) / accelerator.num_processes)
    num_update_steps = math.ceil(batches_per_process / args.gradient_accumulation_steps) * args.num_train_epochs
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=int(args.warmup_ratio * num_update_steps),
                              num_training_steps=num_update_steps)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    @torch.no_grad()
    def evaluate() -> float:
        """Mean completion-token loss over the held-out split (summed over tokens, gathered over processes)."""
        model.eval()
        total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
        for batch in eval_loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += completion_loss(logits, batch["labels"], reduction="sum")
            count += (batch["labels"][:, 1:] != -100).sum()
        model.train()
        return (accelerator.reduce(total, "sum") / accelerator.reduce(count, "sum")).item()

    # TRY NOT TO MODIFY: checkpoints (--save-steps) and resuming (--resume-from-checkpoint)
    def save_checkpoint(epoch: int, batches_done: int, shuffle_state: torch.Tensor) -> None:
        """The weights (safetensors; with LoRA the adapter), optimizer, scheduler, data position, metrics so far, args
        and every process's RNG states, written to checkpoint-N.tmp and renamed into place: a kill at any moment
        leaves the earlier checkpoints intact and never a half-written one under a final name. Under DeepSpeed the
        optimizer state is partitioned: every process writes its own part with the engine's save_checkpoint."""
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
            accelerator.unwrap_model(model).save_pretrained(os.path.join(tmp, "model"), state_dict=state_dict)
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
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = completion_loss(logits, batch["labels"])
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
                           "lr": scheduler.get_last_lr()[0], "epoch": epoch, "step": step}
                    metrics_log.append(row)
                    (bar.write if bar is not None else accelerator.print)(
                        f"step {step}/{num_update_steps} loss {row['train/loss']:.4f} lr {row['lr']:.2e}")
                    if args.track and accelerator.is_main_process:
                        wandb.log(wandb_row(row))
                if args.save_steps and step % args.save_steps == 0:
                    save_checkpoint(epoch, batch_index + 1, shuffle_state)
        skip_batches = 0
        eval_loss = evaluate()
        row = {"eval/loss": eval_loss, "epoch": epoch, "step": step}
        metrics_log.append(row)
        (bar.write if bar is not None else accelerator.print)(
            f"epoch {epoch}: eval loss {eval_loss:.4f} ({time.time() - start:.0f}s)")
        if args.track and accelerator.is_main_process:
            wandb.log(wandb_row(row))

    if bar is not None:
        bar.close()

    # Sample completions (greedy) on held-out prompts, next to the dataset's reference. Every process generates
    # (under ZeRO-3 each forward is collective, and synced_gpus keeps them stepping together); the main one prints.
    unwrapped = accelerator.unwrap_model(model)
    if args.num_sample_completions > 0:
        from rich.console import Console
        from rich.table import Table

        prompts = eval_data["prompt"][: args.num_sample_completions]
        enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
        unwrapped.eval()
        with torch.no_grad():
            out = unwrapped.generate(**enc.to(accelerator.device), max_new_tokens=args.sample_max_new_tokens,
                                     do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                     synced_gpus=zero_stage == 3)
        responses = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        if accelerator.is_main_process:
            table = Table(title="sample completions", show_lines=True)
            for column in ("query", "model response", "reference"):
                table.add_column(column)
            for p, r, ref in zip(prompts, responses, eval_data["completion"][: args.num_sample_completions]):
                table.add_row(p[-300:], r, ref)
            Console().print(table)
            if args.track:
                wandb.log({"samples": wandb.Table(columns=["query", "model response", "reference"],
                                                  data=[[p, r, c] for p, r, c in zip(prompts, responses, eval_data["completion"])])})

    # Save atomically: a crash mid-save never leaves a half-written output_dir.
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        def write(path):
            unwrapped.save_pretrained(path, state_dict=state_dict, safe_serialization=True)  # with LoRA: the adapter
            tokenizer.save_pretrained(path)
            if args.merge_adapter_on_save:
                # A fresh copy of the base on this process only: transformers must not load it with ZeRO-3's zero.Init
                # (a collective), so its DeepSpeed config is unset meanwhile.
                from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

                unset_hf_deepspeed_config()
                base = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
                if accelerator.distributed_type == DistributedType.DEEPSPEED:
                    set_hf_deepspeed_config(accelerator.state.deepspeed_plugin.dschf)
                PeftModel.from_pretrained(base, path).merge_and_unload().save_pretrained(os.path.join(path, "merged"))
                tokenizer.save_pretrained(os.path.join(path, "merged"))
            with open(os.path.join(path, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in metrics_log)
            with open(os.path.join(path, "args.json"), "w") as f:
                json.dump(asdict(args), f, indent=2)
            with open(os.path.join(path, "README.md"), "w") as f:
                f.write(model_card(
                    os.path.basename(os.path.abspath(args.output_dir)), args.model_name_or_path, [args.dataset_name],
                    ["sft", "rlhf"] + (["lora"] if args.use_peft else []),
                    f"Supervised fine-tuning of `{args.model_name_or_path}` on `{args.dataset_name}` with `sft.py`"
                    + (" (a LoRA adapter; `merged/` holds it merged into the base)" if args.merge_adapter_on_save else
                       " (a LoRA adapter)" if args.use_peft else "") + ".\n\n## Command\n\n```\npython "
                    + " ".join(sys.argv) + "\n```\n\nEvery logged row is in `metrics.jsonl`, the arguments in "
                    "`args.json`.\n"))

        atomic_save(args.output_dir, write)
        accelerator.print(f"saved to {args.output_dir} after {time.time() - start:.0f}s")
        if args.push_to_hub:
            url = push_folder_to_hub(args.output_dir,
                                     args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)))
            accelerator.print(f"uploaded {args.output_dir} to {url}")
    accelerator.wait_for_everyone()
    del model, optimizer  # before the process group goes: avoids gloo's abort at exit
    accelerator.end_training()
