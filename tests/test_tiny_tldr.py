"""Tests of tiny_tldr.py: the exact TL;DR prompt format, determinism of the generated task, the saved tokenizer
and base model, and the gold judge on hand-made summaries whose score is known in advance."""

import glob
import os
import random
import re
import statistics

import pytest
import torch
from helpers import ROOT, run_script

import tiny_tldr  # noqa: E402

EMBEDDED = os.path.join(ROOT, "embedded")
PROMPT_RE = re.compile(r"SUBREDDIT: r/(\w+)\n\nTITLE: (\S[^\n]*\S)\n\nPOST: (\S[^\n]*\S)\n\nTL;DR:")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def check_prompt(prompt: str) -> re.Match:
    m = PROMPT_RE.fullmatch(prompt)
    assert m is not None, f"prompt not in the TL;DR format: {prompt!r}"
    assert m.group(1) in tiny_tldr.SUBREDDITS
    # Byte-exact: the template with the parsed fields gives the same string back, no trailing space after TL;DR:
    assert tiny_tldr.PROMPT_TEMPLATE.format(subreddit=m.group(1), title=m.group(2), post=m.group(3)) == prompt
    assert prompt.endswith("\n\nTL;DR:")
    return m


# ---------------------------------------------------------------------------------------------------------------
# prompt format and determinism


def test_prompt_format_is_byte_exact_for_many_seeds():
    for seed in range(300):
        p = tiny_tldr.make_post(random.Random(seed))
        post = check_prompt(p["prompt"]).group(3)
        # The three key facts and the question are in the post, so the ideal summary is achievable.
        assert f"my {p['person']} {p['event']}." in post
        assert p["feeling"] in post
        assert post.endswith(p["question"][0].upper() + p["question"][1:].replace(" i ", " I "))


def test_completions_start_with_a_space():
    for seed in range(200):
        rng = random.Random(seed)
        p = tiny_tldr.make_post(rng)
        for summary in (tiny_tldr.ideal_summary(p), tiny_tldr.human_summary(p, rng)):
            assert summary.startswith(" ") and not summary.startswith("  "), repr(summary)
            assert (p["prompt"] + summary).count("TL;DR: ") == 1


def test_embedded_datasets_follow_the_format():
    from datasets import load_from_disk

    sft, pref, prompts = (
        load_from_disk(os.path.join(EMBEDDED, n)) for n in ("sft_data", "preference_data", "prompts")
    )
    assert {k: v.column_names for k, v in sft.items()} == {
        "train": ["prompt", "completion"],
        "validation": ["prompt", "completion"],
    }
    assert set(pref) == {"train", "test"} and set(prompts) == {"train", "validation", "test"}
    assert pref["train"].column_names == ["prompt", "chosen", "rejected", "gold_chosen_is_better"]
    assert (len(sft["validation"]), len(pref["test"]), len(prompts["validation"]), len(prompts["test"])) == (
        300,
        500,
        200,
        200,
    )
    for data, columns in (
        (sft["validation"], ("completion",)),
        (sft["train"].select(range(500)), ("completion",)),
        (pref["test"], ("chosen", "rejected")),
        (prompts["test"], ("completion",)),
    ):
        for row in data:
            check_prompt(row["prompt"])
            for c in columns:
                assert row[c].startswith(" ") and not row[c].startswith("  "), repr(row[c])


def test_same_seed_gives_identical_rows_and_other_seeds_differ():
    def rows(seed, n=50):
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            p = tiny_tldr.make_post(rng)
            out.append((p, tiny_tldr.human_summary(p, rng), tiny_tldr.preference_pair(rng, 0.35)))
        return out

    assert rows(7) == rows(7)
    assert rows(8) != rows(7)
    assert len({r[0]["prompt"] for r in rows(7)}) == 50  # the grammar is rich enough not to repeat itself


def check_tokenizer_and_base_model(task_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for folder in ("tokenizer", "base_model"):
        tok = AutoTokenizer.from_pretrained(os.path.join(task_dir, folder))
        assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
        assert tok.pad_token == "[PAD]" and tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
        assert tok.padding_side == "left"
        enc = tok(["TL;DR:", "a much longer text than the other one"], padding=True, add_special_tokens=False)
        assert enc["input_ids"][0][0] == tok.pad_token_id and enc["attention_mask"][0][0] == 0  # padded on the left
        assert enc["input_ids"][1][0] != tok.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(os.path.join(task_dir, "base_model"))
    assert model.config.model_type == "gpt_neox"
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert model.config.vocab_size == len(tok)
    ids = tok(tiny_tldr.make_post(random.Random(0))["prompt"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tok)) and torch.isfinite(logits).all()


def test_embedded_tokenizer_and_base_model():
    check_tokenizer_and_base_model(EMBEDDED)


@pytest.mark.slow
def test_building_twice_gives_byte_identical_datasets(tmp_path):
    """Once through the command line as a user would, once by calling build(): same seed, same bytes."""
    a, b = tmp_path / "a", tmp_path / "b"
    sizes = dict(num_sft=24, num_preference=16, num_prompts=8)
    run_script(
        "tiny_tldr.py",
        "--output-dir",
        str(a),
        *[x for k, v in sizes.items() for x in (f"--{k.replace('_', '-')}", str(v))],
        env={"OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    tiny_tldr.build(tiny_tldr.Args(output_dir=str(b), **sizes))
    arrows = sorted(os.path.relpath(f, a) for f in glob.glob(str(a / "*" / "*" / "*.arrow")))
    assert len(arrows) == 7  # sft train/validation, preference train/test, prompts train/validation/test
    assert arrows == sorted(os.path.relpath(f, b) for f in glob.glob(str(b / "*" / "*" / "*.arrow")))
    for rel in arrows + ["tokenizer/tokenizer.json", "base_model/model.safetensors"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs between two builds with the same seed"

    from datasets import load_from_disk

    sft, pref, prompts = (load_from_disk(str(a / n)) for n in ("sft_data", "preference_data", "prompts"))
    assert (len(sft["train"]), len(pref["train"]), len(prompts["train"])) == (24, 16, 8)
    # The rows are the ones the grammar gives for seed 1, in order.
    rng = random.Random(1)
    first = tiny_tldr.make_post(rng)
    assert sft["train"][0] == {"prompt": first["prompt"], "completion": tiny_tldr.human_summary(first, rng)}
    check_tokenizer_and_base_model(str(a))

    tiny_tldr.build(tiny_tldr.Args(output_dir=str(b), seed=2, **sizes))
    assert (a / arrows[0]).read_bytes() != (b / arrows[0]).read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# gold judge on hand-made cases

PROMPT = tiny_tldr.PROMPT_TEMPLATE.format(
    subreddit="roommates",
    title="My roommate ate my leftovers",
    post="I (22F) need advice about my roommate (24M). Sorry for the formatting, I am on mobile. Yesterday my "
    "roommate ate my leftovers. I feel angry about it. What should I do?",
)
IDEAL = " my roommate ate my leftovers and i feel angry. what should i do?"


@pytest.mark.parametrize(
    "completion,expected",
    [
        (IDEAL, 4.0),
        (" my roommate ate my leftovers. what should i do?", 3.0),  # no feeling
        (" someone ate my leftovers and i feel angry. what should i do?", 3.0),  # no person
        (" my roommate did something and i feel angry. what should i do?", 3.0),  # no event
        (
            " my roommate ate my leftovers and i feel sad. what should i do?",
            2.0,
        ),  # wrong feeling: -1 missing, -1 invented
        (" my roommate ate my leftovers and i feel angry and sad. what should i do?", 3.0),  # invented feeling
        (" my roommate and my boss ate my leftovers and i feel angry. what should i do?", 3.0),  # invented person
        (" my roommate ate my leftovers and read my diary and i feel angry. what should i do?", 3.0),  # invented event
        (" my roommate ate my leftovers and i feel angry, on mobile. what should i do?", 3.0),  # filler
        (" throwaway, my roommate ate my leftovers and i feel angry. what should i do?", 3.0),  # filler
        (
            " throwaway, my roommate ate my leftovers and i feel angry, on mobile. what should i do?",
            3.0,
        ),  # filler once
        (" my roommate ate my leftovers and i feel angry.", 3.5),  # no question
        (
            " my roommate ate my leftovers and i feel angry. am i overreacting?",
            3.5,
        ),  # a question the post does not ask
        (
            " my roommate ate my leftovers and i feel angry. what should",
            2.0,
        ),  # cut off: -1 instead of +0.5, no question
        (" my roommate ate my leftovers and i feel angry", 2.0),  # no final punctuation: 1.5 below the same with "."
        (" my roommate ate my leftovers and i feel angry!", 3.5),
    ],
)
def test_gold_score_hand_made_cases(completion, expected):
    assert tiny_tldr.gold_score(PROMPT, completion) == pytest.approx(expected, abs=1e-9)


def test_gold_score_length_penalty_is_a_tenth_per_word_beyond_18():
    assert len(re.findall(r"[a-z']+", IDEAL)) == 13
    for extra in range(0, 15):
        text = IDEAL.replace("i feel angry", "i feel " + "very " * extra + "angry")
        expected = 4.0 - 0.1 * max(0, 13 + extra - 18)
        assert tiny_tldr.gold_score(PROMPT, text) == pytest.approx(expected, abs=1e-9), extra


def test_ideal_scores_4_and_sloppy_human_summaries_score_lower():
    ideal, human = [], []
    for seed in range(300):
        rng = random.Random(seed)
        p = tiny_tldr.make_post(rng)
        ideal.append(tiny_tldr.gold_score(p["prompt"], tiny_tldr.ideal_summary(p)))
        human.append(tiny_tldr.gold_score(p["prompt"], tiny_tldr.human_summary(p, rng)))
    assert set(ideal) == {4.0}
    assert max(human) <= 4.0
    assert statistics.mean(human) < 3.25
    assert sum(h < 4.0 for h in human) > 0.6 * len(human)


def test_preference_labels_agree_with_gold_for_most_pairs_but_not_all():
    import json

    from datasets import load_from_disk

    train = load_from_disk(os.path.join(EMBEDDED, "preference_data"))["train"]
    for row in train.select(range(400)):
        gc, gr = (
            tiny_tldr.gold_score(row["prompt"], row["chosen"]),
            tiny_tldr.gold_score(row["prompt"], row["rejected"]),
        )
        assert gc != gr  # tied pairs are left out: there is nothing to learn from them
        assert row["gold_chosen_is_better"] == (gc > gr)
    agreement = sum(train["gold_chosen_is_better"]) / len(train)
    assert 0.75 < agreement < 0.97, agreement  # label noise exists, but labels are mostly right
    with open(os.path.join(EMBEDDED, "task_stats.json")) as f:
        assert json.load(f)["label_agreement_with_gold"] == pytest.approx(agreement)
