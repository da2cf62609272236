"""rlhf_utils.data: reading any dataset (hub id, saved folder, data file), the train and test splits, the one
hold-out rule, the check of a text column, and conversations through a chat template with the assistant turns
labelled; the prompts of an RL loop (order, padding). What each script makes of its rows, end to end, is in tests/test_datasets.py."""

import json
import os

import pytest
import torch
from datasets import Dataset
from helpers import EMBEDDED, assistant, labelled_spans, user, write_jsonl

from rlhf_utils.data import (
    column_kind,
    hold_out,
    left_pad,
    load_any_dataset,
    load_final_split,
    pick_splits,
    prompt_order,
    prompts_for_update,
    require_assistant,
    right_pad_cat,
    tokenize_conversation,
)

# ---------------------------------------------------------------------------------------------------------------
# files, folders and splits


def test_load_any_dataset_file_and_folders(tmp_path, monkeypatch):
    import datasets
    from datasets import Dataset, DatasetDict

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))

    rows = [{"prompt": "SUBREDDIT: r/x\n\nTITLE: t\n\nPOST: p\n\nTL;DR:", "completion": f" c{i}."} for i in range(3)]
    with open(tmp_path / "d.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert {k: v.to_list() for k, v in load_any_dataset(str(tmp_path / "d.jsonl")).items()} == {
        None: rows
    }  # no splits
    DatasetDict(train=Dataset.from_list(rows), validation=Dataset.from_list(rows[:1])).save_to_disk(
        str(tmp_path / "dd")
    )
    assert load_any_dataset(str(tmp_path / "dd"))["validation"].to_list() == rows[:1]
    Dataset.from_list(rows[1:]).save_to_disk(str(tmp_path / "ds"))
    assert load_any_dataset(str(tmp_path / "ds"))[None].to_list() == rows[1:]


def test_csv_and_tsv_files_are_read_as_such(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rows = [{"prompt": "a, b", "completion": " c."}, {"prompt": 'd "e"', "completion": " f."}]
    (tmp_path / "d.csv").write_text('prompt,completion\n"a, b", c.\n"d ""e""", f.\n')
    (tmp_path / "d.tsv").write_text('prompt\tcompletion\na, b\t c.\nd "e"\t f.\n')
    for name in ("d.csv", "d.tsv"):
        splits = load_any_dataset(str(tmp_path / name))
        assert list(splits) == [None] and splits[None].to_list() == rows, name


def test_a_missing_train_split_is_an_error_naming_the_argument():
    splits = {"train": Dataset.from_list([{"prompt": "p"}]), "test": Dataset.from_list([{"prompt": "q"}])}
    with pytest.raises(SystemExit) as info:
        pick_splits(splits, "org/data", "training", "test")
    assert info.value.code == (
        "error: --dataset-train-split: 'org/data' has no split 'training'; it has ['test', 'train']"
    )
    train, test = pick_splits(splits, "org/data", "train", "validation")
    assert train is splits["train"] and test is None  # no such test split: the caller holds rows out


# ---------------------------------------------------------------------------------------------------------------
# the hold-out rule


def four_input_kinds(tmp_path, rows):
    """The same rows as a jsonl file, a saved Dataset, a saved DatasetDict without the test split, and a folder of
    data files (what load_dataset reads for a hub id) without the test split."""
    from datasets import Dataset, DatasetDict

    os.makedirs(tmp_path / "hub_like")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved_dataset"))
    DatasetDict(train=Dataset.from_list(rows)).save_to_disk(str(tmp_path / "saved_dict"))
    return {
        "file": write_jsonl(tmp_path / "d.jsonl", rows),
        "saved Dataset": str(tmp_path / "saved_dataset"),
        "DatasetDict": str(tmp_path / "saved_dict"),
        "hub": write_jsonl(tmp_path / "hub_like" / "train.jsonl", rows) and str(tmp_path / "hub_like"),
    }


def test_one_hold_out_rule_for_every_script_and_input_kind(tmp_path, monkeypatch):
    """Every script holds out with this function, so one rule for all four; here for each kind of input."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rows = [{"prompt": f"p{i}", "completion": f" c{i}."} for i in range(23)]
    for kind, name in four_input_kinds(tmp_path, rows).items():
        train, test = pick_splits(load_any_dataset(name), name, "train", "validation")
        assert test is None, kind
        train, test, note = hold_out(train, name, "train", "validation")
        # the last row and every 10th before it: 3 of 23, whatever the seed
        assert [r["prompt"] for r in test] == ["p2", "p12", "p22"], kind
        assert [r["prompt"] for r in train] == [f"p{i}" for i in range(23) if i not in (2, 12, 22)], kind
        assert note == "held out 3 of 23 rows of 'train' for evaluation (no 'validation' split)", kind
    # an existing test split is used as it is
    from datasets import Dataset, DatasetDict

    both = DatasetDict(train=Dataset.from_list(rows), validation=Dataset.from_list(rows[:2]))
    both.save_to_disk(str(tmp_path / "dd"))
    train, test = pick_splits(load_any_dataset(str(tmp_path / "dd")), "dd", "train", "validation")
    assert len(train) == 23 and test.to_list() == rows[:2]


def test_hold_out_takes_a_tenth_rounded_up_always_the_last_row():
    for n in (2, 9, 10, 11, 20, 21, 40):
        train, test, note = hold_out(Dataset.from_list([{"i": i} for i in range(n)]), "d", "train", "test")
        held = list(test["i"])
        assert len(held) == -(-n // 10) and held[-1] == n - 1, n
        assert all(b - a == 10 for a, b in zip(held, held[1:])), n
        assert list(train["i"]) == [i for i in range(n) if i not in held], n  # the rest, in order, is trained on
        assert note.startswith(f"held out {len(held)} of {n} rows"), note


def test_hold_out_that_takes_every_row_says_so():
    from datasets import Dataset

    with pytest.raises(SystemExit) as info:
        hold_out(Dataset.from_list([{"prompt": "p"}]), "one.jsonl", "train", "validation")
    assert info.value.code == (
        "error: --dataset-test-split: 'one.jsonl' has no split 'validation', so it held out 1 of "
        "1 rows of 'train' for evaluation, which leaves none to train on; add rows, or name an "
        "existing split"
    )


# ---------------------------------------------------------------------------------------------------------------
# the check of a text column


def test_column_kind_tells_text_from_conversations_and_finds_the_empty_rows():
    text = Dataset.from_list([{"prompt": "a"}, {"prompt": "  "}, {"prompt": "b"}])
    assert column_kind(text, "prompt", "d.jsonl", allow_empty=True) == ("text", [1])
    chats = Dataset.from_list([{"m": [user("hi"), assistant(" yes")]}, {"m": [user("hi"), assistant(" ")]}])
    assert column_kind(chats, "m", "d.jsonl", allow_empty=True) == ("conversation", [1])
    with pytest.raises(SystemExit) as info:
        column_kind(text, "prompt", "d.jsonl", argument="dataset_train_split")
    assert info.value.code == (
        "error: --dataset-train-split: row 1 of d.jsonl: `prompt` is empty (1 such rows of 3); fill or drop those rows"
    )


@pytest.mark.parametrize(
    "rows,message",
    [
        ([{"p": "a"}, {"p": 3}], "row 1 of d: `p` is 3; it must be a string or a list of"),
        ([{"p": [{"role": "user", "content": 1}]}], "row 0 of d: `p` is [{'role': 'user', 'content': 1}]; it must"),
        ([{"p": "a"}, {"p": [user("hi")]}], "d: `p` mixes strings (row 0) and conversations (row 1)"),
    ],
)
def test_column_kind_stops_at_a_row_of_another_type_or_a_mixed_column(rows, message):
    with pytest.raises(SystemExit) as info:
        column_kind({"p": [r["p"] for r in rows]}, "p", "d")
    assert info.value.code.startswith("error: --dataset-name: " + message), info.value.code


def test_require_assistant_wants_an_assistant_message_anywhere_or_last():
    data = {"m": [[user("hi"), assistant(" yes"), user("and?")]]}
    require_assistant(data, "m", "d")  # one assistant message: something to learn from
    with pytest.raises(SystemExit) as info:
        require_assistant(data, "m", "d", last=True)
    assert info.value.code == (
        "error: --dataset-name: row 0 of d: `m` has no assistant message at its end (roles ['user', 'assistant', "
        "'user']); add the assistant's answer or drop that row"
    )
    with pytest.raises(SystemExit, match="has no assistant message \\(roles"):
        require_assistant({"m": [[user("hi")]]}, "m", "d")


# ---------------------------------------------------------------------------------------------------------------
# conversations through a chat template: the labels cover exactly the assistant turns


def test_tokenize_conversation_labels_exactly_every_assistant_turn(chat_tokenizer):
    tok = chat_tokenizer
    messages = [user("Hi there."), assistant(" Hello you."), user("And then?"), assistant(" We ate cake.")]
    row = tokenize_conversation(tok, messages, 0)
    ids, labels = row["input_ids"], row["labels"]
    assert all(label in (-100, token) for label, token in zip(labels, ids)) and len(labels) == len(ids)
    spans = labelled_spans(labels)
    assert [tok.decode(ids[a:b]) for a, b in spans] == [" Hello you.<|endoftext|>", " We ate cake.<|endoftext|>"]
    # the rest is the template's: everything before each turn, the newline after its EOS; the sequence ends at EOS
    assert tok.decode(ids[: spans[0][0]]) == "<|user|>Hi there.\n<|assistant|>"
    assert tok.decode(ids[spans[0][1] : spans[1][0]]) == "\n<|user|>And then?\n<|assistant|>"
    assert spans[-1][1] == len(ids) and ids[-1] == tok.eos_token_id
    # from message 2 on: only the last turn is trained
    later = tokenize_conversation(tok, messages, 2)
    assert later["input_ids"] == ids and labelled_spans(later["labels"]) == spans[1:]


def test_tokenize_conversation_appends_eos_when_the_template_writes_none(tokenizer):
    tok = tokenizer.__class__.from_pretrained(os.path.join(EMBEDDED, "tokenizer"))
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    row = tokenize_conversation(tok, [user("Hi."), assistant(" Yes.")], 0)
    ((start, end),) = labelled_spans(row["labels"])
    assert tok.decode(row["input_ids"][start:end]) == " Yes.<|endoftext|>" and end == len(row["input_ids"])


def test_a_template_whose_prefix_tokenises_differently_is_an_error(tokenizer):
    tok = tokenizer.__class__.from_pretrained(os.path.join(EMBEDDED, "tokenizer"))
    # the assistant cue of add_generation_prompt is not what the template writes before an assistant message
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<bot>{% endif %}"
    )
    with pytest.raises(ValueError, match="tokens before it change"):
        tokenize_conversation(tok, [user("Hi."), assistant(" Yes.")], 0)


# ---------------------------------------------------------------------------------------------------------------
# the prompts of an RL loop: order and padding


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8], [9, 10]], pad_token_id=1)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8], [1, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == torch.long
    # a pad id that also appears inside a sequence is still attended there
    ids, mask = left_pad([[1, 2], [3]], pad_token_id=1)
    assert ids.tolist() == [[1, 2], [1, 3]] and mask.tolist() == [[1, 1], [0, 1]]
    # a width rounded up to a multiple: more left padding, unattended
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=1, multiple=4)
    assert ids.tolist() == [[1, 5, 6, 7], [1, 1, 1, 8]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]


def test_prompt_order_is_a_permutation_determined_by_seed_and_epoch():
    a = prompt_order(50, seed=42, epoch=3)
    assert sorted(a.tolist()) == list(range(50))
    torch.manual_seed(123)  # the global RNG state does not matter
    assert torch.equal(a, prompt_order(50, seed=42, epoch=3))
    torch.rand(10)
    assert torch.equal(a, prompt_order(50, seed=42, epoch=3))
    assert not torch.equal(a, prompt_order(50, seed=42, epoch=4))
    assert not torch.equal(a, prompt_order(50, seed=43, epoch=3))


def test_prompts_for_update_splits_each_pass_over_processes_and_reshuffles_the_next():
    prompts = [[i] for i in range(12)]

    def update(u, rank):
        return prompts_for_update(prompts, u, 7, batch_size=6, local_batch_size=3, process_index=rank)

    first_pass = [update(u, rank) for u in (1, 2) for rank in (0, 1)]
    assert sorted(p for chunk in first_pass for p in chunk) == prompts  # every prompt once per pass
    order = prompt_order(12, 7, 0).tolist()
    assert [p[0] for p in update(2, 1)] == order[9:12]
    assert [p[0] for p in update(3, 0)] == prompt_order(12, 7, 1).tolist()[:3]  # the second pass: a new shuffle
    # fewer prompts than a global batch: one shuffle of the update, repeated to fill it
    few = prompts_for_update(prompts[:4], 5, 7, batch_size=6, local_batch_size=3, process_index=1)
    assert [p[0] for p in few] == (prompt_order(4, 7, 5).tolist() * 2)[3:6]


def test_right_pad_cat():
    out = right_pad_cat([torch.tensor([[1, 2]]), torch.tensor([[3], [4]])], 3, 0)
    assert out.tolist() == [[1, 2, 0], [3, 0, 0], [4, 0, 0]]


def test_load_final_split_checks_its_rows_or_falls_back_to_the_evaluation_rows():
    prompts, checked = os.path.join(EMBEDDED, "prompts"), []
    rows, note = load_final_split(prompts, "test", "eval rows", lambda data, where: checked.append(where))
    assert len(rows) > 0 and "prompt" in rows.column_names and note == ""
    assert checked == [f"split 'test' of {prompts!r}"]
    rows, note = load_final_split(prompts, "final", "eval rows", lambda data, where: checked.append(where))
    assert rows == "eval rows" and "(no 'final' split)" in note and len(checked) == 1
