"""Rewards given as Python functions (--reward-funcs): each `path/to/file.py:function` or `package.module:function` is
imported and checked before any model loads, then called on every batch of completions, and what it returns is checked.
How the scores combine with a reward model's and enter PPO is in the scripts.

A reward function takes the prompts and the completions as text, and the dataset row's other columns as keyword
arguments (one list each, one entry per completion), and returns one float per completion:

    def length_reward(prompts, completions, **columns):
        return [-abs(len(c.split()) - 8) for c in completions]
"""

import hashlib
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf_utils.cli import fail

SPEC_FORMS = "`path/to/file.py:function` or `package.module:function`"


@dataclass
class RewardFunction:
    name: str  # logged as objective/scores/<name>
    spec: str  # as given to --reward-funcs
    func: Callable


def import_spec_module(spec: str, source: str):
    """The module of a spec: a Python file by its path, else a module importable from sys.path."""
    if source.endswith(".py") or os.sep in source or "/" in source:
        if not os.path.isfile(source):
            fail("reward_funcs", f"{spec!r}: there is no file {source!r}")
        # One module per file, run once however many of its functions are named; registered in sys.modules (under a
        # name of its own: a file called math.py must not replace the standard library's), which pickling, dataclasses
        # and typing inside it need.
        path = os.path.realpath(source)
        name = (
            f"reward_funcs.{os.path.splitext(os.path.basename(path))[0]}.{hashlib.sha1(path.encode()).hexdigest()[:8]}"
        )
        if name not in sys.modules:
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        return sys.modules[name]
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as e:
        if e.name is None or not (source == e.name or source.startswith(e.name + ".")):
            raise  # the module exists; something it imports does not
        fail(
            "reward_funcs",
            f"{spec!r}: no module named {e.name!r} (give a file as path/to/file.py:function, or add the module's "
            "folder to PYTHONPATH)",
        )


def load_reward_function(spec: str) -> RewardFunction:
    source, colon, name = spec.rpartition(":")
    if not colon or not source or not name:
        fail("reward_funcs", f"{spec!r} names no function; write {SPEC_FORMS}")
    func = import_spec_module(spec, source)
    for i, part in enumerate(name.split(".")):
        if not hasattr(func, part):
            where = source if i == 0 else f"{source}:{'.'.join(name.split('.')[:i])}"
            fail("reward_funcs", f"{spec!r}: {where} has no attribute {part!r}")
        func = getattr(func, part)
    if not callable(func):
        fail("reward_funcs", f"{spec!r} is a {type(func).__name__}, not a function")
    return RewardFunction(name=name.split(".")[-1], spec=spec, func=func)


def load_reward_funcs(specs: list, reserved: tuple = ()) -> list:
    """The --reward-funcs functions, in order, each imported and checked; their names (logged as
    objective/scores/<name>) must differ from each other and from `reserved` (the other reward sources' names)."""
    funcs = [load_reward_function(spec) for spec in specs]
    names = [*reserved, *(f.name for f in funcs)]
    for f in funcs:
        if names.count(f.name) > 1:
            fail(
                "reward_funcs",
                f"two reward sources are named {f.name!r} (the scores are logged by name, objective/scores/<name>); "
                "rename one function",
            )
    return funcs


def prompt_texts(rows: list, tokenizer) -> list:
    """The prompts as text: a text prompt as the dataset has it, a conversation as the chat template rendered it."""
    return [r["prompt"] if isinstance(r["prompt"], str) else tokenizer.decode(r["input_ids"]) for r in rows]


def call_reward_function(f: RewardFunction, prompts: list, completions: list, columns: dict, where: str) -> list:
    """f's scores of the completions, one finite float each, or a stop naming the function and the row."""
    out = f.func(prompts=prompts, completions=completions, **columns)
    if hasattr(out, "tolist"):  # a tensor or numpy array
        out = out.tolist()
    n = len(completions)
    if not isinstance(out, (list, tuple)) or len(out) != n:
        got = f"{len(out)} values" if isinstance(out, (list, tuple)) else f"a {type(out).__name__}"
        fail("reward_funcs", f"{f.spec} returned {got} for {n} completions ({where}); return one float per completion")
    scores = []
    for i, value in enumerate(out):
        try:
            score = None if isinstance(value, (str, bytes)) else float(value)
        except (TypeError, ValueError):
            score = None
        if score is None or not math.isfinite(score):
            fail(
                "reward_funcs",
                f"{f.spec} returned {value!r} for row {i} of {n} ({where}; prompt ...{prompts[i][-60:]!r}, "
                f"completion {completions[i][:60]!r}); return a finite float for every completion",
            )
        scores.append(score)
    return scores


def call_reward_funcs(funcs: list, rows: list, completions: list, tokenizer, where: str) -> dict:
    """{name: scores} of each function on the completions of these dataset rows (each row: its columns and the prompt's
    input_ids), each function called once on the whole batch."""
    prompts = prompt_texts(rows, tokenizer)
    columns = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt", "input_ids")}
    return {f.name: call_reward_function(f, prompts, completions, columns, where) for f in funcs}


def weighted_sum(scores: dict, weights: list) -> torch.Tensor:
    """sum_i weights[i] * scores_i over the reward sources, in the order of --reward-weights."""
    if len(scores) != len(weights):
        raise ValueError(f"{len(weights)} weights for {len(scores)} reward sources")
    total = 0
    for weight, score in zip(weights, scores.values()):
        total = total + weight * score
    return total
