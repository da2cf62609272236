"""The embedded tiny TL;DR task: Reddit-like posts, a gold judge, datasets, a tokenizer and a tiny base model.

Everything is generated from a seeded grammar, offline, in the formats the public TL;DR datasets use, so the
RLHF scripts run on a laptop CPU exactly as they run on `trl-lib/tldr` and Pythia on GPUs:

    python tiny_tldr.py                     # writes embedded/{tokenizer,base_model,sft_data,preference_data,prompts}
    python tiny_tldr.py --with-models       # ...then trains and writes embedded/sft_model and embedded/reward_model

A post has three key facts (who, what happened, how the author feels), a question, and filler sentences that a
good summary leaves out. `gold_score(prompt, completion)` is the ground truth the way GPT-4 judges are for the
real task: it rewards covering the post's facts, not inventing others, leaving the filler out, brevity, and a
properly finished sentence. The "human" reference summaries are deliberately sloppy (missing facts, rambling,
filler, cut off), so a policy that imitates them is mediocre and RLHF has room to improve on it.
"""

import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

SUBREDDITS = [
    "relationships",
    "relationship_advice",
    "AskReddit",
    "tifu",
    "offmychest",
    "dating_advice",
    "personalfinance",
    "legaladvice",
    "college",
    "jobs",
    "Parenting",
    "roommates",
]
PERSONS = [
    "boyfriend",
    "girlfriend",
    "roommate",
    "boss",
    "sister",
    "brother",
    "best friend",
    "neighbor",
    "coworker",
    "landlord",
    "mom",
    "dad",
    "husband",
    "wife",
    "cousin",
]
EVENTS = [
    "forgot my birthday",
    "borrowed my car without asking",
    "read my diary",
    "lied about money",
    "cancelled our trip",
    "ate my leftovers",
    "broke my laptop",
    "moved out suddenly",
    "ignored my texts",
    "took credit for my work",
    "invited my ex to dinner",
    "sold my guitar",
    "skipped my graduation",
    "told everyone my secret",
    "crashed my bike",
    "stopped paying rent",
    "kept my dog without asking",
    "deleted my photos",
    "yelled at my friends",
    "spent our savings",
]
FEELINGS = [
    "angry",
    "hurt",
    "confused",
    "anxious",
    "guilty",
    "sad",
    "jealous",
    "betrayed",
    "embarrassed",
    "frustrated",
]
QUESTIONS = [
    "what should i do?",
    "am i overreacting?",
    "should i confront them?",
    "how do i move on?",
    "is this normal?",
    "how do i talk to them?",
]
WHEN = ["Yesterday", "Last week", "Two days ago", "Last month", "This morning", "Over the weekend", "Recently"]
FEEL_TEMPLATES = [
    "I feel {f} about it.",
    "Honestly I am so {f} right now.",
    "It left me feeling {f}.",
    "I can't stop feeling {f}.",
    "Now I am {f} and I don't know why.",
]
# Filler a summary should leave out. Each has one marker word the gold judge looks for.
FILLERS = [
    ("Sorry for the formatting, I am on mobile.", "mobile"),
    ("Throwaway account for obvious reasons.", "throwaway"),
    ("Long time lurker, first time poster.", "lurker"),
    ("The weather here has been terrible lately.", "weather"),
    ("English is not my first language.", "english"),
    ("Edit: thanks for all the kind replies.", "replies"),
    ("I had coffee with a friend before writing this.", "coffee"),
    ("My cat is sitting on my keyboard as I type.", "keyboard"),
]
BACKGROUNDS = [
    "We have known each other for {n} years.",
    "We met in college {n} years ago.",
    "We have lived together for {n} years.",
    "Things were fine until {n} months ago.",
]
RAMBLES = [
    "and we have known each other for many years and things were fine before",
    "even though we met in college a long time ago and always got along",
    "and this is not the first time something like this has happened to me",
]
PROMPT_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
IDEAL_WORDS = 18  # summaries longer than this many words lose score


def make_post(rng: random.Random) -> dict:
    """One post: its facts and the prompt text in the exact TL;DR format (no trailing space after `TL;DR:`)."""
    person, event, feeling, question = (
        rng.choice(PERSONS),
        rng.choice(EVENTS),
        rng.choice(FEELINGS),
        rng.choice(QUESTIONS),
    )
    age, other_age = rng.randint(18, 45), rng.randint(18, 60)
    sex, other_sex = rng.choice("MF"), rng.choice("MF")
    facts = [f"{rng.choice(WHEN)} my {person} {event}.", rng.choice(FEEL_TEMPLATES).format(f=feeling)]
    extra = [rng.choice(BACKGROUNDS).format(n=rng.randint(2, 9))] + [
        f for f, _ in rng.sample(FILLERS, rng.randint(1, 3))
    ]
    body = extra + facts
    rng.shuffle(body)
    # The order of the two fact sentences stays natural: the event comes before the feeling.
    i, j = body.index(facts[0]), body.index(facts[1])
    if i > j:
        body[i], body[j] = body[j], body[i]
    intro = f"I ({age}{sex}) need advice about my {person} ({other_age}{other_sex})."
    post = " ".join([intro] + body + [question[0].upper() + question[1:].replace(" i ", " I ")])
    title = rng.choice(
        [
            f"My {person} {event}",
            f"[{age}{sex}] my {person} {event}, {question}",
            f"Need advice about my {person}",
            f"My {person} and I, {question}",
        ]
    )
    prompt = PROMPT_TEMPLATE.format(subreddit=rng.choice(SUBREDDITS), title=title, post=post)
    return {"prompt": prompt, "person": person, "event": event, "feeling": feeling, "question": question}


def ideal_summary(p: dict) -> str:
    return f" my {p['person']} {p['event']} and i feel {p['feeling']}. {p['question']}"


def human_summary(p: dict, rng: random.Random) -> str:
    """A sloppy 'human' reference. The flaws are frequent enough that even the mode of this distribution
    (what a near-greedy SFT policy writes) rambles and skips the question, so RLHF has room to improve."""
    who = f"my {p['person']}" if rng.random() > 0.1 else "someone"
    feeling = p["feeling"] if rng.random() > 0.1 else rng.choice([f for f in FEELINGS if f != p["feeling"]])
    text = f"{who} {p['event']}"
    if rng.random() < 0.55:
        text += " " + rng.choice(RAMBLES)
    if rng.random() < 0.7:
        text += f" and i feel {feeling}"
    if rng.random() < 0.15:
        text += rng.choice([", sorry on mobile", ", throwaway account", ", english is not my first language"])
    text += "."
    if rng.random() < 0.35:
        text += " " + p["question"]
    if rng.random() < 0.12:  # cut off mid-sentence, as scraped summaries sometimes are
        words = text.split()
        text = " ".join(words[: max(2, len(words) - rng.randint(2, 4))]).rstrip(".?,")
    return " " + text


_WORD = re.compile(r"[a-z']+")


def _post_text(prompt: str) -> str:
    return prompt.split("POST:", 1)[-1].rsplit("TL;DR:", 1)[0].lower()


def gold_score(prompt: str, completion: str) -> float:
    """Ground-truth quality of `completion` as a TL;DR of `prompt` (higher is better; the ideal scores 4.0).

    +1 for each key fact of the post covered (who, what happened, the feeling), +0.5 for the question,
    -1 for each person/event/feeling mentioned that is not in the post, -1 for any filler,
    -0.1 per word over 18, +0.5 for ending with '.', '?' or '!', -1 for stopping mid-sentence.
    """
    post, text = _post_text(prompt), completion.lower().strip()
    words = _WORD.findall(text)
    score = 0.0
    for lexicon in (PERSONS, EVENTS, FEELINGS):
        for item in lexicon:
            pattern = r"\b" + re.escape(item) + r"\b"
            in_post, in_text = re.search(pattern, post) is not None, re.search(pattern, text) is not None
            if in_text:
                score += 1.0 if in_post else -1.0
    # The key facts are one of each lexicon, so "covered" is exactly the +1s above. The question:
    score += 0.5 * any(q in text and q in post for q in QUESTIONS)
    score -= 1.0 * any(re.search(rf"\b{marker}\b", text) is not None for _, marker in FILLERS)
    score -= 0.1 * max(0, len(words) - IDEAL_WORDS)
    score += 0.5 if text.endswith((".", "?", "!")) else -1.0
    return round(score, 4)


# ---------------------------------------------------------------------------------------------------------------
# Building the datasets, the tokenizer and the base model


@dataclass
class Args:
    output_dir: str = "embedded"
    """where the task is written (datasets, tokenizer, base model; models with --with-models)"""
    seed: int = 1
    """seed of the grammar; the same seed writes byte-identical datasets"""
    num_sft: int = 6000
    """SFT train examples (plus 300 validation)"""
    num_preference: int = 6000
    """preference train pairs (plus 500 test pairs)"""
    num_prompts: int = 4000
    """PPO train prompts (plus 200 validation and 200 test)"""
    label_noise_temperature: float = 0.35
    """'human' labels pick chosen with probability sigmoid((gold_a - gold_b) / T): smaller T, less noise"""
    vocab_size: int = 1024
    """BPE vocabulary size of the tokenizer"""
    hidden_size: int = 96
    """base model width"""
    num_layers: int = 3
    """base model depth"""
    with_models: bool = False
    """also run sft.py and reward_modeling.py with their defaults to write embedded/sft_model and reward_model"""


def preference_pair(rng: random.Random, temperature: float):
    import math

    p = make_post(rng)
    a, b = human_summary(p, rng), human_summary(p, rng)
    ga, gb = gold_score(p["prompt"], a), gold_score(p["prompt"], b)
    if ga == gb:
        return None  # no preference to learn
    a_wins = rng.random() < 1 / (1 + math.exp(-(ga - gb) / temperature))
    chosen, rejected = (a, b) if a_wins else (b, a)
    return {
        "prompt": p["prompt"],
        "chosen": chosen,
        "rejected": rejected,
        "gold_chosen_is_better": gold_score(p["prompt"], chosen) > gold_score(p["prompt"], rejected),
    }


def build(args: Args) -> None:
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast
    import torch

    rng = random.Random(args.seed)

    def sft_rows(n):
        rows = []
        for _ in range(n):
            p = make_post(rng)
            rows.append({"prompt": p["prompt"], "completion": human_summary(p, rng)})
        return rows

    def pref_rows(n):
        rows = []
        while len(rows) < n:
            row = preference_pair(rng, args.label_noise_temperature)
            if row is not None:
                rows.append(row)
        return rows

    sft = DatasetDict(train=Dataset.from_list(sft_rows(args.num_sft)), validation=Dataset.from_list(sft_rows(300)))
    pref = DatasetDict(train=Dataset.from_list(pref_rows(args.num_preference)), test=Dataset.from_list(pref_rows(500)))
    # Prompt-only splits in the trl-lib/tldr layout: `prompt` plus the reference `completion`.
    prompts = DatasetDict(
        {
            name: Dataset.from_list(sft_rows(n))
            for name, n in [("train", args.num_prompts), ("validation", 200), ("test", 200)]
        }
    )

    # Byte-level BPE trained on our own corpus; EOS is id 0 as in Pythia, and [PAD] is a separate token.
    corpus = [r["prompt"] + r["completion"] for r in sft["train"]] + [r["chosen"] for r in pref["train"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=["<|endoftext|>", "[PAD]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="[PAD]",
        padding_side="left",
    )

    torch.manual_seed(args.seed)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=4,
        intermediate_size=4 * args.hidden_size,
        max_position_embeddings=256,
        rotary_pct=0.25,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    base = GPTNeoXForCausalLM(config)

    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    for name, obj in [("sft_data", sft), ("preference_data", pref), ("prompts", prompts)]:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        obj.save_to_disk(os.path.join(out, name))
    tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    base.save_pretrained(os.path.join(out, "base_model"))
    tokenizer.save_pretrained(os.path.join(out, "base_model"))
    ref_gold = [gold_score(r["prompt"], r["completion"]) for r in prompts["test"]]
    ideal_gold = [gold_score(p["prompt"], ideal_summary(p)) for p in (make_post(random.Random(i)) for i in range(200))]
    stats = {
        "reference_gold_score_test": sum(ref_gold) / len(ref_gold),
        "ideal_gold_score": sum(ideal_gold) / len(ideal_gold),
        "label_agreement_with_gold": sum(r["gold_chosen_is_better"] for r in pref["train"]) / len(pref["train"]),
        "base_model_parameters": sum(p.numel() for p in base.parameters()),
    }
    with open(os.path.join(out, "task_stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    build(args)
    if args.with_models:
        here = os.path.dirname(os.path.abspath(__file__))
        out = os.path.abspath(args.output_dir)
        subprocess.run(
            [
                sys.executable,
                os.path.join(here, "sft.py"),
                "--model-name-or-path",
                f"{out}/base_model",
                "--dataset-name",
                f"{out}/sft_data",
                "--output-dir",
                f"{out}/sft_model",
                "--overwrite-output-dir",
            ],
            check=True,
            cwd=here,
        )
        subprocess.run(
            [
                sys.executable,
                os.path.join(here, "reward_modeling.py"),
                "--model-name-or-path",
                f"{out}/sft_model",
                "--dataset-name",
                f"{out}/preference_data",
                "--normalize-dataset-name",
                f"{out}/sft_data",
                "--output-dir",
                f"{out}/reward_model",
                "--overwrite-output-dir",
            ],
            check=True,
            cwd=here,
        )
