"""Datasets: any hub id, saved folder or data file; held-out rows; TRL's standard and conversational formats; the
tokenizer the data goes through, checked against it; the prompts of an RL loop (tokens, order, padding)."""

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from rlhf_utils.cli import fail
from rlhf_utils.models import add_pad_token, context_length
from rlhf_utils.speed import round_up

HOLD_OUT_EVERY = 10  # with no test split, the last training row and every 10th row before it are held out


def load_any_dataset(name: str, config: Optional[str] = None) -> dict:
    """Every split of a hub id (or a folder of data files), a `save_to_disk` folder (DatasetDict or Dataset), or a
    json/jsonl/parquet/csv/tsv file, as {split: Dataset}; a file or a single saved Dataset has no splits:
    {None: data}. config: a hub dataset's configuration name (TRL's --dataset-config)."""
    from datasets import Dataset, load_dataset, load_from_disk

    if os.path.isdir(name) and any(os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")):
        data = load_from_disk(name)
        return {None: data} if isinstance(data, Dataset) else dict(data)
    if os.path.isfile(name):
        extension = name.lower().rsplit(".", 1)[-1]
        kind = {"parquet": "parquet", "csv": "csv", "tsv": "csv"}.get(extension, "json")
        options = {"delimiter": "\t"} if extension == "tsv" else {}
        return {None: load_dataset(kind, data_files=name, split="train", **options)}
    return dict(load_dataset(name, config))


def load_splits(args, check) -> tuple:
    """The train and test splits of --dataset-name, each non-empty and checked by check(data, where), which returns
    the split's format, the rows to keep and a line saying what it dropped (or None); the two splits must have one
    format. With no test split, rows of the train split are held out (hold_out). Returns (train, test, the format,
    the lines saying what was dropped and which rows are evaluated, joined by "; ")."""
    try:
        splits = load_any_dataset(args.dataset_name, getattr(args, "dataset_config", None))
    except Exception as e:  # the datasets library has many failure types; all mean the same thing to the user
        fail("dataset_name", f"could not load {args.dataset_name!r} (is it empty, or not a dataset?): {e}")
    picked = list(pick_splits(splits, args.dataset_name, args.dataset_train_split, args.dataset_test_split))
    formats, notes = set(), []
    for i, split in enumerate((args.dataset_train_split, args.dataset_test_split)):
        where = repr(args.dataset_name) if None in splits else f"split {split!r} of {args.dataset_name!r}"
        if picked[i] is None:
            continue
        if len(picked[i]) == 0:
            fail("dataset_name", f"{where} is empty")
        kind, picked[i], note = check(picked[i], where)
        formats.add(kind)
        notes += [note] if note else []
    if len(formats) > 1:
        fail(
            "dataset_name",
            f"the train and test splits of {args.dataset_name!r} have different formats: "
            f"{', '.join(map(str, sorted(formats)))}",
        )
    train, test = picked
    note = f"evaluating on split {args.dataset_test_split!r}"
    if test is None:
        train, test, note = hold_out(train, args.dataset_name, args.dataset_train_split, args.dataset_test_split)
    return train, test, formats.pop(), "; ".join(notes + [note])


def pick_splits(splits: dict, name: str, train_split: str, test_split: str) -> tuple:
    """The train split and the test split (None if there is none) of load_any_dataset's splits."""
    if None in splits:
        return splits[None], None
    if train_split not in splits:
        fail("dataset_train_split", f"{name!r} has no split {train_split!r}; it has {sorted(splits)}")
    return splits[train_split], splits.get(test_split)


def hold_out(train, name: str, train_split: str, test_split: str) -> tuple:
    """The one rule of every script when there is no test split (always so for a file or a single saved Dataset): the
    last row and every 10th row before it (10%, rounded up; the same whatever the seed) are held out for evaluation.
    Returns the rest, the held-out rows and the line that says so in the log."""
    held = list(range(len(train) - 1, -1, -HOLD_OUT_EVERY))[::-1]
    note = f"held out {len(held)} of {len(train)} rows of {train_split!r} for evaluation (no {test_split!r} split)"
    if len(held) >= len(train):
        fail(
            "dataset_test_split",
            f"{name!r} has no split {test_split!r}, so it {note[: note.index(' (')]}, which "
            "leaves none to train on; add rows, or name an existing split",
        )
    kept = sorted(set(range(len(train))) - set(held))
    return train.select(kept), train.select(held), note


def column_kind(data, column: str, where: str, allow_empty: bool = False, argument: str = "dataset_name") -> tuple:
    """Check every row of a text column before any model loads. Each must be a string (`text`) or a list of
    {"role", "content"} messages with string contents (`conversation`, TRL's conversational format), one kind per
    column. Returns the kind and the empty rows (blank text, no message, or a blank last message), which are an
    error unless allow_empty. Errors name `argument`."""
    first, empty = {}, []
    for i, value in enumerate(data[column]):
        if isinstance(value, str):
            kind, blank = "text", not value.strip()
        elif isinstance(value, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        ):
            kind, blank = "conversation", not value or not value[-1]["content"].strip()
        else:
            fail(
                argument,
                f"row {i} of {where}: `{column}` is {repr(value)[:80]}; it must be a string or a list of "
                "{'role': ..., 'content': ...} messages with string contents; fix or drop that row",
            )
        first.setdefault(kind, i)
        if blank:
            empty.append(i)
    if len(first) > 1:
        fail(
            argument,
            f"{where}: `{column}` mixes strings (row {first['text']}) and conversations (row "
            f"{first['conversation']}); use one format per column",
        )
    if empty and not allow_empty:
        fail(
            argument,
            f"row {empty[0]} of {where}: `{column}` is empty ({len(empty)} such rows of {len(data)}); "
            "fill or drop those rows",
        )
    return next(iter(first), "text"), empty


def render_chat(tokenizer, messages: list, add_generation_prompt: bool) -> list:
    """Token ids of messages through the tokenizer's chat template (which writes any BOS itself)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def require_assistant(data, column: str, where: str, last: bool = False, argument: str = "dataset_name") -> None:
    """Every conversation of a column needs an assistant message (`last`: at its end) to learn from or to score."""
    for i, messages in enumerate(data[column]):
        roles = [m["role"] for m in messages]
        if messages and ((roles[-1] != "assistant") if last else ("assistant" not in roles)):
            fail(
                argument,
                f"row {i} of {where}: `{column}` has no assistant message{' at its end' if last else ''} "
                f"(roles {roles}); add the assistant's answer or drop that row",
            )


def tokenize_conversation(tokenizer, messages: list, first_trained: int) -> dict:
    """A conversation through the chat template; labels keep the assistant turns from message `first_trained` on.
    A turn's tokens are the difference between the rendering up to it with the assistant cue
    (add_generation_prompt=True) and the rendering with it, cut after the first EOS; the sequence ends with the last
    trained turn and with EOS (appended if the template writes none), so the model learns to stop. A template that
    tokenises a prefix differently inside the whole conversation is an error: the masks would be shifted."""
    ids = render_chat(tokenizer, messages, add_generation_prompt=False)
    labels, end, eos = [-100] * len(ids), None, tokenizer.eos_token_id
    for i in range(first_trained, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if upto[: len(before)] != before or ids[: len(upto)] != upto:
            raise ValueError(
                f"the chat template renders message {i} so that the tokens before it change when it is "
                "added; the assistant tokens cannot be told apart"
            )
        turn = upto[len(before) :]
        end = len(before) + (turn.index(eos) + 1 if eos in turn else len(turn))
        labels[len(before) : end] = ids[len(before) : end]
    if end is None:
        raise ValueError(f"no assistant message from message {first_trained} on, so nothing to learn or score")
    ids, labels = ids[:end], labels[:end]
    if ids[-1] != eos:
        ids, labels = ids + [eos], labels + [eos]
    return {"input_ids": ids, "labels": labels}


def load_tokenizer(args, kind: str, columns: str) -> tuple:
    """The model's config and the tokenizer (--tokenizer-name-or-path, else the model's), given a dedicated [PAD] if
    it has no pad distinct from EOS (add_pad_token), checked against the data: --max-length within the model's
    context, and a chat template for conversations (`kind`; `columns` names the data's columns in the message).
    Returns (config, tokenizer, the line to log for an added pad, or None)."""
    from transformers import AutoConfig, AutoTokenizer

    revision = getattr(args, "model_revision", None)  # TRL's --model-revision: the model's, not another tokenizer's
    config = AutoConfig.from_pretrained(
        args.model_name_or_path, trust_remote_code=args.trust_remote_code, revision=revision
    )
    tokenizer_path = args.tokenizer_name_or_path or args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_path,
        trust_remote_code=args.trust_remote_code,
        revision=revision if args.tokenizer_name_or_path is None else None,
    )
    added_pad = add_pad_token(tokenizer)
    context = context_length(config)
    if context is not None and args.max_length > context:
        fail(
            "max_length",
            f"{args.max_length} is longer than the model's context of {context} tokens "
            "(max_position_embeddings); lower it",
        )
    if kind != "text" and not tokenizer.chat_template:
        fail(
            "tokenizer_name_or_path",
            f"{tokenizer_path!r} has no chat template, which conversational data needs; "
            "use an instruct model's tokenizer, set tokenizer.chat_template and save it, "
            f"or give {columns} as strings",
        )
    return config, tokenizer, added_pad


# ---------------------------------------------------------------------------------------------------------------
# Prompts of an RL loop: their tokens, their order and their padding


def prompt_token_ids(tokenizer, prompts: list) -> list:
    """Token ids of a column of prompts: strings as they are, without special tokens (as TRL's PPO did), and
    conversations through the chat template with the assistant cue (add_generation_prompt=True)."""
    if all(isinstance(p, str) for p in prompts):
        return tokenizer(prompts, add_special_tokens=False)["input_ids"]
    return [render_chat(tokenizer, p, add_generation_prompt=True) for p in prompts]


def prompt_order(num_prompts: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of one pass over the prompts: a function of (seed, epoch) only, identical on every process,
    so a resumed run draws exactly the prompts the uninterrupted run would."""
    return torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def prompts_for_update(
    train_ids: list, update: int, seed: int, batch_size: int, local_batch_size: int, process_index: int
) -> list:
    """This process's prompts for an update (1-based) of batch_size prompts over all processes. The loader repeats
    forever, reshuffling each pass; the position in the data is a function of the update number, so resuming needs no
    loader state."""
    per_pass = len(train_ids) // batch_size
    if per_pass:
        epoch, index = divmod(update - 1, per_pass)
        order = prompt_order(len(train_ids), seed, epoch)[index * batch_size : (index + 1) * batch_size]
    else:  # fewer prompts than one global batch: a fresh shuffle per update, repeated to fill it
        repeats = math.ceil(batch_size / len(train_ids))
        order = prompt_order(len(train_ids), seed, update).repeat(repeats)[:batch_size]
    mine = order[process_index * local_batch_size : (process_index + 1) * local_batch_size]
    return [train_ids[i] for i in mine.tolist()]


def left_pad(sequences: list, pad_token_id: int, multiple: int = 1) -> tuple:
    """Left-pad token-id lists into (input_ids, attention_mask), to a width that is a multiple of `multiple`."""
    tensors = [torch.tensor(s, dtype=torch.long) for s in sequences]
    input_ids = pad_sequence(tensors, batch_first=True, padding_value=pad_token_id, padding_side="left")
    width = round_up(input_ids.shape[1], multiple)
    input_ids = F.pad(input_ids, (width - input_ids.shape[1], 0), value=pad_token_id)
    attention_mask = torch.arange(width)[None, :] >= torch.tensor([width - len(s) for s in sequences])[:, None]
    return input_ids, attention_mask.long()


def right_pad_cat(chunks: list, width: int, fill: int) -> torch.Tensor:
    """Row chunks of different widths (generation stops at different steps) right-padded to `width` and stacked."""
    return torch.cat([F.pad(c, (0, width - c.shape[1]), value=fill) for c in chunks])


def load_final_split(name: str, split: str, fallback, check, config: Optional[str] = None) -> tuple:
    """Split `split` of the dataset `name` for a final evaluation, every row checked (check(rows, where), as in
    load_splits), and a note for the log; a dataset without that split gives `fallback` (the evaluation rows)."""
    rows = load_any_dataset(name, config).get(split)
    if rows is None:  # the same rule as for evaluation: the held-out rows
        return fallback, f"; the final evaluation uses them too (no {split!r} split)"
    if len(rows) == 0:
        fail("dataset_name", f"split {split!r} of {name!r} is empty")
    check(rows, f"split {split!r} of {name!r}")
    return rows, ""
