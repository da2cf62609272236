"""The datasets users bring, in all four scripts: TRL's standard and conversational formats, json/jsonl/parquet/csv/tsv
files, held-out rows, and bad rows stopped before any model loads with a one-line error that names the dataset, the
column, the row and the fix. Reading files, the hold-out rule and conversations through a chat template, called
directly: tests/test_utils_data.py.

The chat template is a tiny Jinja one set on the embedded tokenizer (which has none), saved with a copy of a model."""

import os
import re
import shutil

import pytest
import torch
from helpers import (
    ROOT,
    TEMPLATE,
    ReachedTraining,
    assistant,
    labelled_spans,
    run_in_process,
    run_script,
    user,
    write_jsonl,
)

import ppo_rlhf  # noqa: E402
import ppo_rlhf_tldr  # noqa: E402
import reward_modeling  # noqa: E402
import sft  # noqa: E402
from rlhf_utils.data import load_any_dataset, render_chat

EMBEDDED = os.path.join(ROOT, "embedded")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
PROMPT = "SUBREDDIT: r/x\n\nTITLE: t\n\nPOST: p\n\nTL;DR:"


def chat_model(tmp_path, model="sft_model", template=TEMPLATE) -> str:
    """A copy of an embedded model whose tokenizer has a chat template."""
    from transformers import AutoTokenizer

    path = str(tmp_path / f"{model}_chat")
    shutil.copytree(os.path.join(EMBEDDED, model), path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = template
    tok.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# tokenisation of every format in the scripts: the masks cover exactly the completion / assistant tokens
# (rlhf_utils.data's tokenize_conversation: tests/test_utils_data.py)


def test_such_a_template_stops_the_script_with_one_line_and_writes_nothing(tmp_path):
    model = chat_model(
        tmp_path,
        "base_model",
        template="{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}",
    )
    data = write_jsonl(tmp_path / "d.jsonl", sft_conversation_rows("messages"))
    proc = run_script("sft.py", *sft_args(tmp_path, data, model), check=False, env=ONE_THREAD)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --tokenizer-name-or-path: row 0: the chat template")
    assert not os.path.exists(tmp_path / "out")


def test_sft_every_format_masks_all_but_the_completion(tokenizer, chat_tokenizer):
    text = sft.tokenize_row(tokenizer, {"prompt": PROMPT, "completion": " We ate."}, "text")
    ((start, end),) = labelled_spans(text["labels"])
    assert text["input_ids"][:start] == tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(text["input_ids"][start:end]) == " We ate.<|endoftext|>"
    prompt, completion = [user("Sum up: we ate.")], [assistant(" We ate.")]
    conversational = sft.tokenize_row(chat_tokenizer, {"prompt": prompt, "completion": completion}, "conversation")
    messages = sft.tokenize_row(chat_tokenizer, {"messages": prompt + completion}, "messages")
    assert conversational == messages  # the same conversation in TRL's two conversational formats
    ((start, end),) = labelled_spans(messages["labels"])
    assert messages["input_ids"][:start] == render_chat(chat_tokenizer, prompt, add_generation_prompt=True)
    assert chat_tokenizer.decode(messages["input_ids"][start:end]) == " We ate.<|endoftext|>"
    assert end == len(messages["input_ids"])


def test_reward_model_scores_every_format_at_the_eos_after_the_completion(tokenizer, chat_tokenizer):
    encode, eos = reward_modeling.encode_completion, tokenizer.eos_token_id
    explicit = encode(tokenizer, PROMPT, " We ate.")
    assert explicit == tokenizer(PROMPT + " We ate.", add_special_tokens=False)["input_ids"] + [eos]
    assert encode(tokenizer, None, PROMPT + " We ate.") == explicit  # implicit prompt: the same sequence
    prompt, chosen = [user("Sum up: we ate.")], [assistant(" We ate.")]
    conversation = encode(chat_tokenizer, prompt, chosen)
    assert encode(chat_tokenizer, None, prompt + chosen) == conversation
    cue = render_chat(chat_tokenizer, prompt, add_generation_prompt=True)
    # the scored sequence: the prompt with the assistant cue, the assistant's tokens, and EOS (where the score is read)
    assert conversation[: len(cue)] == cue
    assert chat_tokenizer.decode(conversation[len(cue) :]) == " We ate.<|endoftext|>" and conversation[-1] == eos


def test_ppo_prompts_plain_as_they_are_and_conversations_with_the_assistant_cue(tokenizer, chat_tokenizer):
    for module in (ppo_rlhf, ppo_rlhf_tldr):
        assert module.prompt_token_ids(chat_tokenizer, [PROMPT]) == [
            tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        ]
        (ids,) = module.prompt_token_ids(chat_tokenizer, [[user("Sum up: we ate.")]])
        assert chat_tokenizer.decode(ids) == "<|user|>Sum up: we ate.\n<|assistant|>"


# ---------------------------------------------------------------------------------------------------------------
# every format passes validation; every bad row stops the script before any model loads, naming row and column


def ppo_args(tmp_path, data, model=None):
    return [
        "--dataset-name",
        data,
        "--output-dir",
        str(tmp_path / "out"),
        "--total-episodes",
        "8",
        "--per-device-train-batch-size",
        "4",
        "--gradient-accumulation-steps",
        "2",
        *(["--model-name-or-path", model] if model else []),
    ]


def sft_args(tmp_path, data, model=None):
    return [
        "--dataset-name",
        data,
        "--output-dir",
        str(tmp_path / "out"),
        *(["--model-name-or-path", model] if model else []),
    ]


def rm_args(tmp_path, data, model=None, normalize=None):
    return [
        "--dataset-name",
        data,
        "--output-dir",
        str(tmp_path / "out"),
        *(["--model-name-or-path", model] if model else []),
        *(["--normalize-dataset-name", normalize] if normalize else ["--no-normalize-reward"]),
    ]


def ppo_rows(n=20, prompt=lambda i: PROMPT.replace(" p", f" p{i}")):
    return [{"prompt": prompt(i), "completion": f" c{i}."} for i in range(n)]


def sft_conversation_rows(kind, n=20):
    if kind == "messages":
        return [{"messages": [user(f"Say {i}."), assistant(f" It is {i}.")]} for i in range(n)]
    return [{"prompt": [user(f"Say {i}.")], "completion": [assistant(f" It is {i}.")]} for i in range(n)]


def rm_rows(kind, explicit, n=20):
    rows = []
    for i in range(n):
        prompt = PROMPT.replace(" p", f" p{i}") if kind == "text" else [user(f"Say {i}.")]
        chosen, rejected = (
            (f" yes {i}.", f" no {i}.") if kind == "text" else ([assistant(f" yes {i}.")], [assistant(f" no {i}.")])
        )
        rows.append(
            {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            if explicit
            else {"chosen": prompt + chosen, "rejected": prompt + rejected}
        )
    return rows


GOOD_FORMATS = {
    # case: (script, rows, uses a chat template)
    "ppo plain prompts": ("ppo_rlhf.py", ppo_rows(), False),
    "ppo conversational prompts": ("ppo_rlhf.py", [{"prompt": [user(f"Say {i}.")]} for i in range(20)], True),
    "ppo tldr plain prompts": ("ppo_rlhf_tldr.py", ppo_rows(), False),
    "sft prompt/completion": ("sft.py", ppo_rows(), False),
    "sft messages": ("sft.py", sft_conversation_rows("messages"), True),
    "sft conversational prompt/completion": ("sft.py", sft_conversation_rows("conversation"), True),
    "rm explicit plain": ("reward_modeling.py", rm_rows("text", True), False),
    "rm implicit plain": ("reward_modeling.py", rm_rows("text", False), False),
    "rm explicit conversational": ("reward_modeling.py", rm_rows("conversation", True), True),
    "rm implicit conversational": ("reward_modeling.py", rm_rows("conversation", False), True),
}
ARGS = {"ppo_rlhf.py": ppo_args, "ppo_rlhf_tldr.py": ppo_args, "sft.py": sft_args, "reward_modeling.py": rm_args}


@pytest.mark.parametrize("case", list(GOOD_FORMATS))
def test_every_format_passes_validation(case, tmp_path, monkeypatch):
    script, rows, chat = GOOD_FORMATS[case]
    model = chat_model(tmp_path) if chat else None
    argv = ARGS[script](tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), model)
    assert isinstance(run_in_process(script, argv, tmp_path, monkeypatch), ReachedTraining)


def with_row(rows, index, **changes):
    rows = [dict(r) for r in rows]
    rows[index].update(changes)
    return rows


BAD_ROWS = {
    # case: (script, rows, the argument named, words the message must hold)
    "ppo None prompt": (
        "ppo_rlhf.py",
        with_row(ppo_rows(), 3, prompt=None),
        "--dataset-name",
        ["row 3 of", "`prompt` is None", "fix or drop that row"],
    ),
    "ppo number prompt": (
        "ppo_rlhf.py",
        with_row(ppo_rows(), 5, prompt=7),
        "--dataset-name",
        ["row 5 of", "`prompt` is 7"],
    ),
    "ppo empty prompt": (
        "ppo_rlhf.py",
        with_row(ppo_rows(), 4, prompt=""),
        "--dataset-name",
        ["row 4 of", "`prompt` is empty (1 such rows of 20)"],
    ),
    "ppo all prompts empty": (
        "ppo_rlhf.py",
        ppo_rows(prompt=lambda i: ""),
        "--dataset-name",
        ["row 0 of", "empty (20 such rows of 20)"],
    ),
    "ppo message without content": (
        "ppo_rlhf.py",
        [{"prompt": [{"role": "user"}]} for _ in range(20)],
        "--dataset-name",
        ["row 0 of", "`prompt` is [{'role': 'user'", "string contents"],
    ),
    "ppo mixed prompts": (
        "ppo_rlhf.py",
        [{"prompt": [user("hi")]}] * 10 + [{"prompt": "hi"}] * 10,
        "--dataset-name",
        ["mixes strings (row 10) and conversations (row 0)"],
    ),
    "ppo conversations without a chat template": (
        "ppo_rlhf.py",
        [{"prompt": [user(f"Say {i}.")]} for i in range(20)],
        "--model-name-or-path",
        ["no chat template"],
    ),
    "tldr None prompt": (
        "ppo_rlhf_tldr.py",
        with_row(ppo_rows(), 3, prompt=None),
        "--dataset-name",
        ["row 3 of", "`prompt` is None"],
    ),
    "tldr conversational prompts": (
        "ppo_rlhf_tldr.py",
        [{"prompt": [user(f"Say {i}.")], "completion": " c."} for i in range(20)],
        "--dataset-name",
        ["conversational prompts", "use ppo_rlhf.py"],
    ),
    "sft None completion": (
        "sft.py",
        with_row(ppo_rows(), 6, completion=None),
        "--dataset-name",
        ["row 6 of", "`completion` is None"],
    ),
    "sft empty completion": (
        "sft.py",
        with_row(ppo_rows(), 2, completion=" "),
        "--dataset-name",
        ["row 2 of", "`completion` is empty"],
    ),
    "sft messages as strings": ("sft.py", [{"messages": "hi"}] * 20, "--dataset-name", ["`messages` must hold lists"]),
    "sft messages without a chat template": (
        "sft.py",
        sft_conversation_rows("messages"),
        "--tokenizer-name-or-path",
        ["no chat template"],
    ),
    "sft messages without an assistant turn": (
        "sft.py",
        with_row(sft_conversation_rows("messages"), 4, messages=[user("hi"), user("anyone?")]),
        "--dataset-name",
        ["row 4 of", "no assistant message", "'user', 'user'"],
    ),
    "sft conversational completion from the user": (
        "sft.py",
        with_row(sft_conversation_rows("conversation"), 0, completion=[user("hi")]),
        "--dataset-name",
        ["row 0 of", "`completion` has no assistant message"],
    ),
    "sft one row, no test split": (
        "sft.py",
        ppo_rows(1),
        "--dataset-test-split",
        ["held out 1 of 1 rows of 'train' for evaluation, which leaves none to train on"],
    ),
    "sft no known columns": (
        "sft.py",
        [{"content": "hi"}] * 20,  # (a `text` column is the language-modelling format)
        "--dataset-name",
        ["`prompt` and `completion`", "`messages`"],
    ),
    "rm None chosen": (
        "reward_modeling.py",
        with_row(rm_rows("text", True), 1, chosen=None),
        "--dataset-name",
        ["row 1 of", "`chosen` is None"],
    ),
    "rm chosen equals rejected in most pairs": (
        "reward_modeling.py",
        [dict(r, rejected=r["chosen"]) if i < 11 else r for i, r in enumerate(rm_rows("text", True))],
        "--dataset-name",
        ["11 of 20 pairs", "chosen == rejected", "(e.g. row 0)"],
    ),
    "rm empty pairs in most rows": (
        "reward_modeling.py",
        [
            dict(r, chosen="") if i % 2 else dict(r, rejected=" ") if i % 4 == 0 else r
            for i, r in enumerate(rm_rows("text", True))
        ],
        "--dataset-name",
        ["15 of 20 pairs", "an empty side"],
    ),
    "rm implicit conversation ending with the user": (
        "reward_modeling.py",
        with_row(rm_rows("conversation", False), 2, rejected=[user("Say 2."), assistant(" no."), user("really?")]),
        "--dataset-name",
        ["row 2 of", "`rejected` has no assistant message at its end"],
    ),
    "rm conversations without a chat template": (
        "reward_modeling.py",
        rm_rows("conversation", False),
        "--tokenizer-name-or-path",
        ["no chat template"],
    ),
    "rm prompt as text, pairs as conversations": (
        "reward_modeling.py",
        [dict(r, prompt="hi") for r in rm_rows("conversation", True)],
        "--dataset-name",
        ["must all be strings or all conversations"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_stop_before_any_model_loads_with_one_line(case, tmp_path, monkeypatch):
    script, rows, argument, words = BAD_ROWS[case]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    error = run_in_process(script, ARGS[script](tmp_path, data), tmp_path, monkeypatch)
    assert isinstance(error, SystemExit), f"{case}: the script went on to training"
    message = error.code
    assert isinstance(message, str) and message.startswith(f"error: {argument}: ") and "\n" not in message, message
    for word in words:
        assert word in message, (word, message)
    if argument == "--dataset-name" and "row" in words[0]:
        assert repr(data) in message  # names the dataset
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("script", ["ppo_rlhf.py", "ppo_rlhf_tldr.py"])
def test_too_few_prompts_after_the_hold_out_says_what_was_held_out(script, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", ppo_rows(8))
    error = run_in_process(script, ppo_args(tmp_path, data), tmp_path, monkeypatch)
    assert error.code.startswith(
        "error: --dataset-train-split: 7 prompts cannot fill one per-process batch of 8 "
        "(held out 1 of 8 rows of 'train' for evaluation (no 'validation' split)"
    )
    if script == "ppo_rlhf_tldr.py":
        assert error.code.endswith("; the final evaluation uses them too (no 'test' split))")
    assert not os.path.exists(tmp_path / "out")


def test_normalisation_data_in_the_wrong_format_or_without_an_answer_is_refused(tmp_path, monkeypatch):
    model = chat_model(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", rm_rows("conversation", True))
    for rows, words in (
        ([{"prompt": "Say 1.", "completion": " It is 1."}], "must be in the format of --dataset-name"),
        ([{"prompt": [user("Say 1.")], "completion": [user("?")]}], "has no assistant message"),
    ):
        argv = rm_args(tmp_path, data, model, write_jsonl(tmp_path / "n.jsonl", rows))
        error = run_in_process("reward_modeling.py", argv, tmp_path, monkeypatch)
        assert isinstance(error, SystemExit) and error.code.startswith("error: --normalize-dataset-name: "), error
        assert words in error.code


def test_a_few_useless_pairs_are_dropped_with_a_count(tmp_path, monkeypatch):
    """Fewer than half: dropped, not refused (the count is printed once the run starts: see the end-to-end run)."""
    rows = [dict(r, rejected=r["chosen"]) if i in (3, 8) else r for i, r in enumerate(rm_rows("text", True))]
    rows[5]["rejected"] = ""
    argv = rm_args(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows))
    assert isinstance(run_in_process("reward_modeling.py", argv, tmp_path, monkeypatch), ReachedTraining)
    data = load_any_dataset(str(tmp_path / "d.jsonl"))[None]
    assert reward_modeling.preference_format(data, "d")[2] == [3, 5, 8]


# ---------------------------------------------------------------------------------------------------------------
# end to end: a conversational run of each script, as a user would (a few seconds each)


def test_sft_trains_on_messages_and_shows_rendered_samples(tmp_path):
    model = chat_model(tmp_path, "base_model")
    data = write_jsonl(tmp_path / "d.jsonl", sft_conversation_rows("messages", 40))
    proc = run_script(
        "sft.py",
        "--model-name-or-path",
        model,
        "--dataset-name",
        data,
        "--output-dir",
        str(tmp_path / "out"),
        "--num-train-epochs",
        "1",
        "--num-sample-completions",
        "2",
        "--sample-max-new-tokens",
        "4",
        env=ONE_THREAD,
    )
    assert "36 train / 4 eval examples (messages format)" in proc.stdout, proc.stdout[-2000:]
    assert "<|user|>Say 9." in proc.stdout and "<|assistant|>" in proc.stdout  # sample queries, through the template
    assert "note: the tokenizer has a chat template" not in proc.stdout


def test_reward_modeling_on_implicit_conversations_drops_useless_pairs(tmp_path):
    model = chat_model(tmp_path)
    rows = rm_rows("conversation", False, 40)
    rows[7]["rejected"] = rows[7]["chosen"]
    normalize = write_jsonl(tmp_path / "n.jsonl", sft_conversation_rows("conversation", 8))
    proc = run_script(
        "reward_modeling.py",
        *rm_args(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), model, normalize),
        "--per-device-train-batch-size",
        "8",
        env=ONE_THREAD,
    )
    assert "dropped 1 of 40 pairs" in proc.stdout and "(e.g. row 7)" in proc.stdout, proc.stdout[-2000:]
    assert "held out 4 of 39 rows of 'train'" in proc.stdout
    assert "35 train / 4 eval pairs (conversation format, implicit prompt)" in proc.stdout
    assert os.path.exists(tmp_path / "out" / "model.safetensors")


def test_reward_modeling_on_conversations_normalises_on_their_held_out_preferred_completions(tmp_path):
    """Without --normalize-dataset-name, a user's data is normalised on its own held-out pairs' preferred
    completions (in its format, here conversations), which the saved model then scores 0 on average; the log and
    the model card say on what, how many and by how much."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = chat_model(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", rm_rows("conversation", True, 30))  # rows 9, 19, 29 held out
    out = tmp_path / "out"
    argv = [*"--per-device-train-batch-size 9 --normalize-num-examples 2".split(), "--output-dir", str(out)]
    proc = run_script(
        "reward_modeling.py", "--model-name-or-path", model, "--dataset-name", data, *argv, env=ONE_THREAD
    )
    said = re.search(
        rf"reward normalisation: 2 reference completions \(the preferred completions of the held-out pairs of "
        rf"{re.escape(repr(data))}\) scored (\S+) on average; every score is shifted by (\S+) ",
        proc.stdout,
    )
    assert said and float(said[1]) == -float(said[2]), proc.stdout[-2000:]
    assert said[0][len("reward normalisation: ") :] in open(out / "README.md").read()
    saved, tok = AutoModelForSequenceClassification.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    scores = []
    for row in rm_rows("conversation", True, 30)[9:20:10]:
        ids = reward_modeling.encode_completion(tok, row["prompt"], row["chosen"])
        with torch.no_grad():
            scores.append(saved(input_ids=torch.tensor([ids])).logits[0, 0].item())
    assert abs(sum(scores) / 2) < 1e-3, scores


@pytest.mark.parametrize("kind", ["conversational", "plain"])
def test_ppo_with_a_chat_template_tokenizer(kind, tmp_path):
    """Conversational prompts go through the template; plain ones are used as they are, and the log says so once."""
    model = chat_model(tmp_path)
    rows = [
        {"prompt": [user(f"Say {i}.")]} if kind == "conversational" else {"prompt": f"Say {i}."} for i in range(20)
    ]
    proc = run_script(
        "ppo_rlhf.py",
        *ppo_args(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows), model),
        "--num-sample-generations",
        "0",
        "--response-length",
        "4",
        "--local-rollout-forward-batch-size",
        "8",
        env=ONE_THREAD,
    )
    assert "held out 2 of 20 rows of 'train' for evaluation (no 'validation' split)" in proc.stdout, proc.stdout[
        -2000:
    ]
    assert "18 train / 2 eval prompts" in proc.stdout
    assert proc.stdout.count("note: the tokenizer has a chat template") == (kind == "plain")
    assert os.path.exists(tmp_path / "out" / "model.safetensors")
