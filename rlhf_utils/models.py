"""Tokenizer and model plumbing shared by the scripts: pad tokens, context lengths, dropout off, loading, parameter
counts, the logit transforms of architectures whose forward changes head(hidden), and the checks that every model
reads the policy tokenizer's ids."""

import contextlib
import os
from typing import Optional

import torch
import torch.nn as nn


def add_pad_token(tokenizer) -> Optional[str]:
    """A tokenizer without a pad token (Pythia, Llama, Mistral) or whose pad is EOS (GPT-2 setups, Qwen2 base) gets a
    dedicated `[PAD]` special token, as TRL's example did: padding with EOS would make every real EOS look like padding
    in the masks. Returns the line to log when one was added, else None."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return None
    before = tokenizer.pad_token
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return (
        f"the tokenizer's pad token was {before!r} (EOS {tokenizer.eos_token!r}): added a dedicated pad token "
        f"{tokenizer.pad_token!r} (id {tokenizer.pad_token_id}), saved with the output"
    )


def context_length(config) -> Optional[int]:
    """The longest sequence the model covers: its position table (absolute positions index past it) or its rotary
    training length (beyond it rotary models extrapolate); None when the config states neither."""
    config = config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def is_dropout_setting(name: str, value) -> bool:
    """A dropout probability among a config's or a module's attributes (attention_dropout, hidden_dropout, resid_pdrop,
    classifier_dropout, OPT's layerdrop, ...)."""
    return "drop" in name and isinstance(value, (int, float)) and not isinstance(value, bool)


def disable_dropout_in_config(config) -> None:
    """Zero every dropout setting of a config and of its sub-configs (text_config, ...), before the model is built."""
    for name, value in list(vars(config).items()):
        if is_dropout_setting(name, value):
            setattr(config, name, 0.0)
        elif hasattr(value, "to_dict") and hasattr(value, "get_text_config"):
            disable_dropout_in_config(value)


def disable_dropout(model: nn.Module) -> None:
    """nn.Dropout modules, and the float rates that transformers 5's attention modules keep as attributes and use in
    train mode only (attention_dropout): any dropout makes the training log-probs differ from the rollout's."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if is_dropout_setting(name, value):
                setattr(module, name, 0.0)


def load_model(cls, path: str, tokenizer, trust_remote_code: bool, options: Optional[dict] = None) -> nn.Module:
    """A model with dropout off (it would make the rollout and training log-probs disagree); a sequence classifier
    gets one label. options: from_pretrained's dtype / attn_implementation / revision (load_options)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    options = options or {}
    revision = {"revision": options["revision"]} if "revision" in options else {}
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **revision)
    disable_dropout_in_config(config)
    if cls is AutoModelForSequenceClassification:
        config.num_labels, config.id2label, config.label2id = 1, {0: "LABEL_0"}, {"LABEL_0": 0}
        config.pad_token_id = tokenizer.pad_token_id
    model = cls.from_pretrained(path, config=config, trust_remote_code=trust_remote_code, **options)
    disable_dropout(model)
    return model


def num_params(m: Optional[nn.Module], trainable: bool = False) -> int:
    """ZeRO-3 may already hold only a shard of each parameter: full sizes are counted."""
    if m is None:
        return 0
    return sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters() if p.requires_grad or not trainable)


def logit_transform(config) -> tuple:
    """(scale, softcap): what the causal LM's own forward does to head(hidden) before it returns the logits,
    logits = softcap * tanh(scale * x / softcap) (scale * x without softcap). Gemma-2/3 cap the logits with tanh,
    Granite divides them by logits_scaling, Cohere multiplies them by logit_scale (MiniCPM3, HyperCLOVA X and Falcon-H1
    scale them too); skipping this would sample, score and KL-penalise another distribution than the model's."""
    text = config.get_text_config()
    model_type = getattr(text, "model_type", None) or ""
    factor, divide = None, False
    if model_type.startswith("granite") or model_type == "minicpm3":  # MiniCPM3 divides the hidden states instead
        factor, divide = getattr(text, "logits_scaling", None), True
    elif model_type.startswith("cohere"):
        factor = getattr(text, "logit_scale", None)
    elif model_type == "hyperclovax":
        factor = getattr(text, "logits_scaling", None)
    elif model_type == "falcon_h1":
        factor = getattr(text, "lm_head_multiplier", None)
    # A scale the config leaves unset (None, as Cohere Compass's text config does) is not applied by the model either.
    scale = 1.0 if factor is None else (1.0 / factor if divide else factor)
    return scale, getattr(text, "final_logit_softcapping", None)


UNSUPPORTED_LOGIT_TRANSFORMS = ("inkling", "recurrent_gemma")
"""Model types whose forward changes the logits in a way logit_transform does not reproduce (from transformers 5.23's
modelling code: Inkling divides by logits_mup_width_multiplier, RecurrentGemma caps with logits_soft_cap; neither is
tested here); the scripts refuse them before loading weights rather than train on another distribution."""


def transform_logits(logits: torch.Tensor, scale: float, softcap: Optional[float]) -> torch.Tensor:
    """The model's own logits from head(hidden) (see logit_transform)."""
    logits = logits * scale if scale != 1.0 else logits
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def model_config(model: nn.Module):
    """The transformers config of a model, also inside a DeepSpeed inference engine (whose own `.config` is
    DeepSpeed's)."""
    return getattr(model, "module", model).config


def backbone_and_head(causal_lm: nn.Module) -> tuple:
    """The transformer body and the LM head of a causal LM. For a PEFT model, `.base_model` is the LoRA wrapper, not
    the body: unwrap it first (the LoRA layers sit inside the body, so they still apply)."""
    model = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    return model.base_model, model.get_output_embeddings()


def saved_tokenizer(path: str, trust_remote_code: bool):
    """The tokenizer saved with a model (a local folder or a hub id), or None if it has none."""
    from transformers import AutoTokenizer

    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in files):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def vocabulary_mismatch(tokenizer, embedding_rows: int, model_tokenizer=None) -> Optional[str]:
    """Why a model with `embedding_rows` input rows (and `model_tokenizer`, the tokenizer saved with it, if any) cannot
    read the policy tokenizer's ids, or None. Fewer rows crash mid-run on an id past them; another tokenizer of the same
    size scores other words. The pad tokens are left out: a pad is only ever read where the attention mask is 0."""
    if len(tokenizer) > embedding_rows:
        return (
            f"has {embedding_rows} embedding rows, fewer than the {len(tokenizer)} tokens of the policy's tokenizer "
            f"(pad {tokenizer.pad_token!r} is id {tokenizer.pad_token_id})"
        )
    if model_tokenizer is None:
        return None
    ours, theirs = tokenizer.get_vocab(), model_tokenizer.get_vocab()
    pads = {tokenizer.pad_token, model_tokenizer.pad_token}
    differ = sorted(t for t in ours.keys() | theirs.keys() if t not in pads and ours.get(t) != theirs.get(t))
    if differ:
        examples = ", ".join(f"{t!r}: {ours.get(t)} vs {theirs.get(t)}" for t in differ[:3])
        return f"was saved with another tokenizer: {len(differ)} tokens have other ids (policy vs its own: {examples})"
    if model_tokenizer.eos_token_id is not None and model_tokenizer.eos_token_id != tokenizer.eos_token_id:
        return (
            f"was saved with EOS {model_tokenizer.eos_token!r} (id {model_tokenizer.eos_token_id}), the policy's "
            f"tokenizer has {tokenizer.eos_token!r} (id {tokenizer.eos_token_id})"
        )
    return None


def checked_config(
    arg: str, path: str, config_path: str, tokenizer, tokenizer_path: str, trust_remote_code: bool, scalar: bool
):
    """The config at config_path (for a LoRA adapter folder: its base model's) of the model given as --arg path,
    checked before any weights load: a trained classifier that must output a scalar (a reward or value model) has one
    label, and the model reads the policy tokenizer's ids (a model saved at tokenizer_path, where that tokenizer comes
    from, is not compared with itself)."""
    from transformers import AutoConfig

    from rlhf_utils.cli import fail

    config = AutoConfig.from_pretrained(config_path, trust_remote_code=trust_remote_code)
    # A trained classifier must have one label; a plain LM (TRL's get-started uses Pythia itself) gets a new
    # one-output head, as TRL did.
    is_classifier = any("ForSequenceClassification" in a for a in config.architectures or [])
    if scalar and is_classifier and config.num_labels != 1:
        fail(arg, f"{path!r} has {config.num_labels} labels; a reward/value model outputs one scalar (num_labels=1)")
    model_tokenizer = saved_tokenizer(path, trust_remote_code) if path != tokenizer_path else None
    problem = vocabulary_mismatch(tokenizer, config.get_text_config().vocab_size, model_tokenizer)
    if problem:
        fail(
            arg,
            f"{path!r} {problem}; every model must be trained with the tokenizer of --model-name-or-path "
            "(sft.py and reward_modeling.py save it, adding [PAD] and resizing the embeddings if needed)",
        )
    return config


@contextlib.contextmanager
def gathered_for_generation(engine, module: nn.Module, gather: bool):
    """With gather (ZeRO-3): gather module's shards (not the rest of the engine's) once per generation, and lift
    DeepSpeed's per-module hooks meanwhile: they would partition the gathered weights again after every layer and
    all-gather them at every token (as deepspeed.runtime.zero.unwrap_model_for_generation does, for module only)."""
    if not gather:
        yield
        return
    import deepspeed

    hooks = engine.optimizer.parameter_offload  # owns ZeRO-3's fetch/release hooks of the trained modules
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        for hook in hooks.forward_hooks + hooks.backward_hooks:
            hook.remove()
        hooks.forward_hooks, hooks.backward_hooks = [], []
        try:
            yield
        finally:
            hooks._register_deepspeed_module(hooks.module)


def unsupported_logit_transform(config) -> Optional[str]:
    """The model type of a config (read from its text model, as a multimodal config nests it: Inkling's is
    `inkling_text`) whose forward transforms the logits in a way logit_transform does not reproduce; None if
    supported."""
    model_type = getattr(config.get_text_config(), "model_type", None) or ""
    family = model_type.removesuffix("_text")
    return model_type if family in UNSUPPORTED_LOGIT_TRANSFORMS else None


def eos_token_ids(model_path: str, tokenizer, trust_remote_code: bool) -> list:
    """The ids that end a generation for transformers' generate(): the model's generation config's eos_token_id (one
    id or several), else its config's, else the tokenizer's EOS."""
    from transformers import AutoConfig, GenerationConfig

    try:
        ids = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json
        ids = None
    if ids is None:
        ids = (
            AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).get_text_config().eos_token_id
        )
    if ids is None:
        ids = tokenizer.eos_token_id
    return sorted(set(ids)) if isinstance(ids, (list, tuple)) else [ids]


def load_options(args) -> dict:
    """from_pretrained's options from TRL's model flags: --torch-dtype/--dtype (the dtype the weights load in;
    --bf16 autocast is separate), --attn-implementation and --model-revision; unset flags are left out."""
    options = {}
    dtype = args.dtype or args.torch_dtype
    if dtype is not None:
        options["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
    if args.attn_implementation is not None:
        options["attn_implementation"] = args.attn_implementation
    if args.model_revision is not None:
        options["revision"] = args.model_revision
    return options


def checked_configs(models: dict, tokenizer, tokenizer_path: str, trust_remote_code: bool, response_length: int):
    """models: {argument: (path or None, scalar)}, the policy first (scalar: a reward or value model, one output). Every
    config checked by checked_config before any weights load (a policy given as a LoRA adapter folder: its base model's);
    prompt + response_length must fit the smallest context, and the policy must not transform its logits in a way the
    scripts do not reproduce. Returns ({argument: config}, the smallest context or None)."""
    import json

    from rlhf_utils.cli import fail

    configs, config_paths = {}, {}
    for arg, (path, scalar) in models.items():
        if path is None:  # a model the run goes without
            continue
        config_paths[arg] = path
        if is_adapter_folder(path):  # e.g. the value model starting from an SFT adapter's base
            with open(os.path.join(path, "adapter_config.json")) as f:
                config_paths[arg] = json.load(f)["base_model_name_or_path"]
        configs[arg] = checked_config(
            arg, path, config_paths[arg], tokenizer, tokenizer_path, trust_remote_code, scalar
        )
    context = min((c for c in map(context_length, configs.values()) if c), default=None)
    if context is not None and response_length >= context:
        fail(
            "response_length",
            f"{response_length} tokens leave no room for a prompt in the models' context of "
            f"{context} tokens (max_position_embeddings); lower it",
        )
    policy = next(iter(models))
    model_type = unsupported_logit_transform(configs[policy])
    if model_type is not None:
        fail(
            policy,
            f"{config_paths[policy]!r} is a {model_type} model, whose forward transforms its logits in a way "
            "this script does not reproduce (it would train on another distribution than the "
            "model's); use another architecture",
        )
    return configs, context
