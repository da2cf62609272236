"""Command line: TRL-style boolean flags, TRL's flags (accepted with their meaning, or refused with what to use instead),
argument errors that name the argument, remote-code errors explained."""

import os
import sys
from dataclasses import dataclass
from typing import Optional


def fail(argument: str, message: str) -> None:
    """Stop before any expensive work, naming the argument and the fix."""
    sys.exit(f"error: --{argument.replace('_', '-')}: {message}")


def check_paths(paths: dict, hint: str) -> None:
    """Each {argument: path} (None: unset) names a hub id or a local folder; a local one that does not exist stops
    the run, with `hint` on how to get it. A hub id is `name` or `org/name`: anything else is local, and so is
    every path under HF_HUB_OFFLINE=1."""
    for argument, path in paths.items():
        if path is None:
            continue
        looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
        if not os.path.exists(path) and (looks_local or os.environ.get("HF_HUB_OFFLINE") == "1"):
            fail(argument, f"{path!r} does not exist; {hint}")


def bool_flags_as_switches(argv: list, args_cls) -> list:
    """TRL's command-line habit (HfArgumentParser): `--bf16 True`, `--gradient_checkpointing False`, `--bf16=true`
    become tyro's `--bf16` / `--no-gradient-checkpointing` for the boolean fields of args_cls; other tokens pass as
    is."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(args_cls)
    switches = {f.name for f in dataclasses.fields(args_cls) if hints[f.name] is bool}
    words = {
        "true": True,
        "yes": True,
        "t": True,
        "y": True,
        "1": True,
        "false": False,
        "no": False,
        "f": False,
        "n": False,
        "0": False,
    }
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


def explain_remote_code_errors() -> None:
    """transformers refuses a model or tokenizer whose code lives in its repository unless it is trusted, with a
    traceback: print that refusal as one line naming the flag instead."""
    default = sys.excepthook

    def hook(kind, error, traceback):
        if issubclass(kind, ValueError) and "trust_remote_code=True" in str(error):
            print(
                f"error: --trust-remote-code: {str(error).splitlines()[0].strip()} Pass --trust-remote-code if you "
                "trust that code.",
                file=sys.stderr,
            )
        else:
            default(kind, error, traceback)

    sys.excepthook = hook


def check_ranges(args, ranges: dict) -> None:
    """The range of each numeric argument, from a table {name: (rule, *bounds[, note])}: (">", 0) reads "must be
    positive", (">=", b) "must be >= b", ("[]", lo, hi) "must be in [lo, hi]", ("[)", lo, hi) "must be in [lo, hi)";
    a note (what the value means) follows in parentheses. None passes (an Optional argument's "off"), nan never does."""
    for name, (rule, *bounds) in ranges.items():
        note = f" ({bounds.pop()})" if isinstance(bounds[-1], str) else ""
        value = getattr(args, name)
        if value is None:
            continue
        if rule == ">":
            ok, wanted = value > bounds[0], "positive" if bounds[0] == 0 else f"> {bounds[0]}"
        elif rule == ">=":
            ok, wanted = value >= bounds[0], f">= {bounds[0]}"
        else:
            low, high = bounds
            ok = low <= value and (value <= high if rule == "[]" else value < high)
            wanted = f"in [{low}, {shown(high)}{rule[1]}"
        if not ok:  # `not ok` rather than a reversed comparison: nan fails every comparison
            fail(name, f"must be {wanted}{note}, got {value}")


def shown(bound) -> str:
    """A bound as a message writes it: 4294967295 as 2**32 - 1."""
    if isinstance(bound, int) and bound > 2**16 and bound & (bound + 1) == 0:
        return f"2**{bound.bit_length()} - 1"
    return str(bound)


# The ranges of the training flags every script has (transformers' TrainingArguments names), for check_ranges.
TRAINING_RANGES = {
    "learning_rate": (">", 0),
    "per_device_train_batch_size": (">", 0),
    "gradient_accumulation_steps": (">", 0),
    "warmup_ratio": ("[]", 0, 1, "a fraction of the training steps"),
    "adam_epsilon": (">", 0),
    "adam_beta1": ("[)", 0, 1),
    "adam_beta2": ("[)", 0, 1),
    "weight_decay": (">=", 0),
    "max_grad_norm": (">", 0, "None: no clipping"),
    "seed": ("[]", 0, 2**32 - 1, "numpy's seed range"),
    "save_steps": (">=", 0, "0: no checkpoints"),
    "save_total_limit": (">=", 1, "or None: keep every checkpoint"),
}


# TRL flags that cannot mean here what they mean in TRL, each with the one line saying what to use instead.
REFUSED_TRL_FLAGS = {
    "fp16": "fp16 mixed precision is not supported here; use --bf16 (bf16 autocast)",
    "half_precision_backend": "fp16 mixed precision is not supported here; use --bf16 (bf16 autocast)",
    "deepspeed": "DeepSpeed is set up by the launcher here, not the script: "
    "accelerate launch --config_file benchmark/accelerate_configs/deepspeed_zero2.yaml <script> ...",
    "fsdp": "FSDP is not supported; shard with DeepSpeed ZeRO-3: "
    "accelerate launch --config_file benchmark/accelerate_configs/deepspeed_zero3.yaml <script> ...",
    "fsdp_config": "FSDP is not supported; shard with DeepSpeed ZeRO-3: "
    "accelerate launch --config_file benchmark/accelerate_configs/deepspeed_zero3.yaml <script> ...",
    "use_vllm": "vLLM is not supported; generation runs in the policy's own generate() (drop --use-vllm)",
    "torch_compile": "torch.compile is not supported here (drop --torch-compile)",
    "local_rank": "processes come from the launcher: accelerate launch --num_processes N <script> ...",
}

# The values TRL's flags take here (others would mean something this code does not do).
TRL_CHOICES = {
    "report_to": ("wandb", "none", "all"),
    "optim": ("adamw_torch", "adamw_torch_fused"),
    "save_strategy": ("steps", "no"),
    "torch_dtype": ("auto", "float32", "bfloat16", "float16"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
}


def unknown_flag_message(name: str, known) -> str:
    """The one line for a flag args_cls does not have: what to use instead for TRL's flags that mean nothing here,
    else the nearest known flag name."""
    if name in REFUSED_TRL_FLAGS:
        return REFUSED_TRL_FLAGS[name]
    import difflib

    near = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if near:
        return f"is not a flag of this script; did you mean --{near[0].replace('_', '-')}?"
    return "is not a flag of this script (--help lists them; flags marked TRL: are TRL's)"


def parse_args(args_cls, argv: Optional[list] = None, description: Optional[str] = None):
    """The script's Args from the command line (default sys.argv[1:]): TRL's `--flag True` booleans as switches
    (bool_flags_as_switches), and an unknown flag stopped with one line (unknown_flag_message) before tyro sees it.
    When stderr is not a terminal, the libraries' progress bars are turned off for this process."""
    import dataclasses

    import tyro

    argv = sys.argv[1:] if argv is None else argv
    known = {f.name for f in dataclasses.fields(args_cls)}
    kept, i = [], 0
    while i < len(argv):
        token = argv[i]
        flag, eq, value = token.partition("=")
        name = flag[2:].replace("-", "_") if token.startswith("--") and len(token) > 2 else None
        if name is None or name in known or name == "help" or (name.startswith("no_") and name[3:] in known):
            kept.append(token)
            i += 1
            continue
        # `--fp16 False` (TRL's way of saying off) asks for what happens here anyway: dropped, not refused.
        value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        if name in REFUSED_TRL_FLAGS and value.lower() in ("false", "no", "f", "n", "0"):
            i += 1 if eq else 2
            continue
        fail(name, unknown_flag_message(name, known))
    if not sys.stderr.isatty():
        # Piped logs keep one line per event: the libraries' bars (loading weights, writing shards, dataset maps) would
        # add carriage-return redraws. tqdm takes TQDM_* variables as its defaults; our own bar passes its own.
        os.environ.setdefault("TQDM_DISABLE", "1")
    return tyro.cli(args_cls, args=bool_flags_as_switches(kept, args_cls), description=description)


def check_trl_flags(args) -> None:
    """TRL's flags (the `# TRL's flags` block of each Args) checked and folded into this script's own settings:
    --report-to wandb/all is --track, --save-strategy no is --save-steps 0; a value that means something this code
    does not do stops the run naming the supported ones."""
    for name, choices in TRL_CHOICES.items():
        value = getattr(args, name, None)
        if value is not None and value not in choices:
            fail(name, f"{value!r} is not supported here; use one of {', '.join(choices)}")
    if args.torch_dtype is not None and args.dtype is not None and args.torch_dtype != args.dtype:
        fail("dtype", f"--torch-dtype {args.torch_dtype} and --dtype {args.dtype} disagree; pass one of them")
    if args.report_to == "none" and args.track:
        fail("report_to", "none turns tracking off, --track turns it on; drop one")
    if args.report_to in ("wandb", "all"):
        args.track = True  # `all`: W&B is the only tracker here
    if args.save_strategy == "no":
        args.save_steps = 0
    if args.warmup_steps < 0:
        fail("warmup_steps", f"must be >= 0, got {args.warmup_steps}")


def warmup_steps(args, total_steps: int) -> int:
    """Warmup steps of the schedule: --warmup-steps when > 0 (it overrides --warmup-ratio, as in transformers; below 1
    it is a fraction of the total, as transformers 5 reads it), else warmup_ratio x the total."""
    if 0 < args.warmup_steps < 1:
        return int(args.warmup_steps * total_steps)
    return int(args.warmup_steps) if args.warmup_steps > 0 else int(args.warmup_ratio * total_steps)


@dataclass
class TRLFlags:
    """The flags of TRL's trainers that mean the same in every script here (README: "TRL's flags"), mapped onto the
    scripts' own settings by check_trl_flags; each script's Args inherits them."""

    report_to: Optional[str] = None
    """TRL: where to log: wandb or all (= --track; W&B is the only tracker here), none; None: --track decides"""
    run_name: Optional[str] = None
    """TRL: the W&B run's name; None: exp_name__seed__time"""
    warmup_steps: float = 0
    """TRL: warmup steps of the schedule (below 1: a fraction of them); > 0 overrides --warmup-ratio (transformers)"""
    torch_dtype: Optional[str] = None
    """TRL: the dtype the models' weights load in (auto, float32, bfloat16, float16), apart from --bf16 autocast"""
    dtype: Optional[str] = None
    """TRL: the newer name of --torch-dtype (either may be given)"""
    attn_implementation: Optional[str] = None
    """TRL: the attention kernel the models load with (eager, sdpa, ...); None: transformers' choice"""
    model_revision: Optional[str] = None
    """TRL: the hub revision (branch, tag or commit) of the models and tokenizer; None: main"""
    dataset_config: Optional[str] = None
    """TRL: the configuration name of a hub dataset (load_dataset's second argument)"""
    logging_first_step: bool = False
    """TRL: also log the first optimizer step"""
    save_strategy: str = "steps"
    """TRL: steps (a checkpoint every --save-steps) or no (no checkpoints)"""
