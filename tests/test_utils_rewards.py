"""rlhf_utils.rewards: reward functions loaded by file path or module (bad specs stop naming --reward-funcs), called
with the prompts, the completions and the rows' other columns, their output checked (a wrong count, None, a string,
nan or inf stops naming the function and the row), and the weighted sum of the reward sources. Through the script's
command line: tests/test_ppo_rlhf.py (bad specs before any model loads, and a slow run that PPO improves)."""

import math
import os
import textwrap

import pytest
import torch

from rlhf_utils.rewards import (
    RewardFunction,
    call_reward_funcs,
    load_reward_function,
    load_reward_funcs,
    weighted_sum,
)

FUNCS = """
    calls = []


    def length(prompts, completions, **columns):
        calls.append(len(completions))
        return [float(len(c.split())) for c in completions]


    def matches(prompts, completions, completion, **columns):
        return [float(c.strip() == r.strip()) for c, r in zip(completions, completion)]


    def echo_prompt_length(prompts, completions, **columns):
        return [len(p) for p in prompts]


    def as_tensor(prompts, completions, **columns):
        import torch

        return torch.ones(len(completions))


    class Scorer:
        @staticmethod
        def score(prompts, completions, **columns):
            return [0.5] * len(completions)


    not_callable = 3
    """


@pytest.fixture
def funcs_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent(FUNCS))
    return str(path)


def stop_message(excinfo) -> str:
    return str(excinfo.value.code)


# ---------------------------------------------------------------------------------------------------------------
# loading


def test_a_function_loads_from_a_file_path_and_from_a_module(funcs_file):
    f = load_reward_function(f"{funcs_file}:length")
    assert (f.name, f.spec) == ("length", f"{funcs_file}:length")
    assert f.func(prompts=["p"], completions=["a b c"]) == [3.0]
    f = load_reward_function("math:hypot")  # any importable module
    assert f.func is math.hypot and f.name == "hypot"
    f = load_reward_function(f"{funcs_file}:Scorer.score")  # an attribute path after the colon
    assert f.name == "score" and f.func(prompts=[], completions=["x"]) == [0.5]


@pytest.mark.parametrize(
    "spec,words",
    [
        ("{dir}/missing.py:length", "no file"),
        ("{file}:nope", "no attribute 'nope'"),
        ("{file}:Scorer.nope", "no attribute 'nope'"),
        ("{file}:not_callable", "not a function"),
        ("{file}", "names no function"),
        ("{file}:", "names no function"),
        ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
    ],
)
def test_a_bad_spec_stops_naming_the_flag_and_the_spec(funcs_file, tmp_path, spec, words):
    spec = spec.format(dir=tmp_path, file=funcs_file)
    with pytest.raises(SystemExit) as excinfo:
        load_reward_function(spec)
    message = stop_message(excinfo)
    assert message.startswith("error: --reward-funcs:"), message
    assert words in message and spec in message, message


def test_a_module_whose_own_import_fails_shows_that_error(tmp_path, monkeypatch):
    """Only a missing module named by the spec is a spec error; a missing dependency of it is the user's traceback."""
    (tmp_path / "needs_missing.py").write_text("import no_such_dependency_xyz\n\ndef f(prompts, completions): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        load_reward_function("needs_missing:f")


def test_names_must_differ_from_each_other_and_from_the_reward_model(funcs_file, tmp_path):
    other = tmp_path / "other.py"
    other.write_text("def length(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    assert [f.name for f in load_reward_funcs([f"{funcs_file}:length", f"{funcs_file}:matches"])] == [
        "length",
        "matches",
    ]
    for specs, reserved in (([f"{funcs_file}:length", f"{other}:length"], ()), ([f"{other}:length"], ("length",))):
        with pytest.raises(SystemExit) as excinfo:
            load_reward_funcs(specs, reserved)
        assert "error: --reward-funcs:" in stop_message(excinfo) and "'length'" in stop_message(excinfo)


# ---------------------------------------------------------------------------------------------------------------
# calling


ROWS = [
    {"prompt": "Say hi.", "input_ids": [1, 2], "completion": "hi there", "id": 7},
    {"prompt": "Say bye.", "input_ids": [3, 4], "completion": "bye", "id": 8},
]


def test_functions_get_texts_and_the_rows_other_columns_once_per_batch(funcs_file):
    funcs = load_reward_funcs([f"{funcs_file}:length", f"{funcs_file}:matches", f"{funcs_file}:echo_prompt_length"])
    seen = {}

    def spy(prompts, completions, **columns):
        seen.update(prompts=prompts, completions=completions, columns=columns)
        return [0.0] * len(completions)

    funcs.append(RewardFunction("spy", "spy", spy))
    scores = call_reward_funcs(funcs, ROWS, ["hi there", "so long"], tokenizer=None, where="update 1")
    assert scores == {"length": [2.0, 2.0], "matches": [1.0, 0.0], "echo_prompt_length": [7.0, 8.0], "spy": [0, 0]}
    # the prompts as the dataset has them; every other column but the token ids, one entry per completion
    assert seen == {
        "prompts": ["Say hi.", "Say bye."],
        "completions": ["hi there", "so long"],
        "columns": {"completion": ["hi there", "bye"], "id": [7, 8]},
    }
    assert funcs[0].func.__globals__["calls"] == [2]  # one call for the batch, the file run once for its functions


def test_a_conversation_prompt_is_given_as_the_text_the_chat_template_rendered(chat_tokenizer):
    from rlhf_utils.data import render_chat

    chat = [{"role": "user", "content": "Say hi."}]
    ids = render_chat(chat_tokenizer, chat, add_generation_prompt=True)
    seen = []
    f = RewardFunction("f", "f", lambda prompts, completions, **c: seen.extend(prompts) or [0.0] * len(completions))
    call_reward_funcs([f], [{"prompt": chat, "input_ids": ids}], ["hi"], chat_tokenizer, "update 1")
    assert seen == [chat_tokenizer.decode(ids)] and "Say hi." in seen[0]


def test_tensors_and_numpy_arrays_are_accepted(funcs_file):
    import numpy as np

    f = load_reward_function(f"{funcs_file}:as_tensor")
    assert call_reward_funcs([f], ROWS, ["a", "b"], None, "update 1") == {"as_tensor": [1.0, 1.0]}
    g = RewardFunction("g", "g", lambda prompts, completions, **c: np.array([1, 2], dtype=np.int64))
    assert call_reward_funcs([g], ROWS, ["a", "b"], None, "update 1") == {"g": [1.0, 2.0]}


@pytest.mark.parametrize(
    "returned,words",
    [
        ([1.0], "returned 1 values for 2 completions"),
        ([1.0, 2.0, 3.0], "returned 3 values for 2 completions"),
        (None, "returned a NoneType for 2 completions"),
        (1.0, "returned a float for 2 completions"),
        ([1.0, None], "returned None for row 1 of 2"),
        ([float("nan"), 1.0], "returned nan for row 0 of 2"),
        ([1.0, float("inf")], "returned inf for row 1 of 2"),
        ([1.0, "0.5"], "returned '0.5' for row 1 of 2"),
        ([1.0, [0.5]], "returned [0.5] for row 1 of 2"),
    ],
)
def test_bad_output_stops_naming_the_function_the_row_and_where(returned, words):
    f = RewardFunction("bad", "my_file.py:bad", lambda prompts, completions, **columns: returned)
    with pytest.raises(SystemExit) as excinfo:
        call_reward_funcs([f], ROWS, ["hi there", "so long"], None, "update 3")
    message = stop_message(excinfo)
    assert message.startswith("error: --reward-funcs: my_file.py:bad "), message
    assert words in message and "update 3" in message, message
    if "row 1" in words:  # the row is shown: its prompt's end and its completion
        assert "'Say bye.'" in message and "'so long'" in message, message


# ---------------------------------------------------------------------------------------------------------------
# the weighted sum


def test_weighted_sum_weighs_each_source_in_order():
    scores = {"reward_model": torch.tensor([1.0, -2.0]), "length": torch.tensor([3.0, 4.0])}
    torch.testing.assert_close(weighted_sum(scores, [0.5, -1.0]), torch.tensor([-2.5, -5.0]))
    torch.testing.assert_close(weighted_sum(scores, [0.0, 1.0]), torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match="1 weights for 2 reward sources"):
        weighted_sum(scores, [1.0])


def test_one_source_with_weight_one_is_its_scores_bit_for_bit():
    """The default run (the reward model alone, weight 1.0) must train exactly as before reward functions existed."""
    s = torch.randn(64) * 1e3
    assert torch.equal(weighted_sum({"reward_model": s}, [1.0]), s)


def test_files_with_the_same_stem_do_not_replace_each_other(tmp_path):
    for folder, value in (("a", 1.0), ("b", 2.0)):
        os.makedirs(tmp_path / folder)
        (tmp_path / folder / "rewards.py").write_text(
            f"def score_{folder}(prompts, completions, **kw):\n    return [{value}] * len(completions)\n"
        )
    fa = load_reward_function(f"{tmp_path}/a/rewards.py:score_a")
    fb = load_reward_function(f"{tmp_path}/b/rewards.py:score_b")
    assert fa.func([], ["x"]) == [1.0] and fb.func([], ["x"]) == [2.0]
