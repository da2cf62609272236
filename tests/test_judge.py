"""Tests of judge.py: win-rate math, the gold judge with an injected scorer, and the LLM judge against a real
HTTP server on 127.0.0.1 that misbehaves on purpose (bad answers, 429, 500, slow responses)."""

import json
import math
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import run_script, write_jsonl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import judge  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# win rate and confidence interval


def test_win_rate_ci_matches_published_wilson_interval():
    rate, lo, hi = judge.win_rate_ci(8, 2, 0)  # 8/10: Wilson 95% interval is [0.4902, 0.9433]
    assert rate == 0.8
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)


def test_win_rate_ci_all_wins_and_all_ties():
    rate, lo, hi = judge.win_rate_ci(10, 0, 0)
    assert rate == 1.0 and hi == pytest.approx(1.0) and lo == pytest.approx(10 / (10 + 1.959964**2))
    rate, lo, hi = judge.win_rate_ci(0, 0, 10)  # ties count half: same point and interval as 5 wins, 5 losses
    assert rate == 0.5 and (lo, hi) == pytest.approx(judge.win_rate_ci(5, 5, 0)[1:])
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    rate, lo, hi = judge.win_rate_ci(0, 10, 0)
    assert rate == 0.0 and lo == pytest.approx(0.0) and hi == pytest.approx(1 - 10 / (10 + 1.959964**2))


def test_win_rate_ci_ties_half_and_symmetry_and_empty():
    assert judge.win_rate_ci(2, 0, 2) == judge.win_rate_ci(3, 1, 0)
    _, lo, hi = judge.win_rate_ci(7, 3, 0)
    _, lo2, hi2 = judge.win_rate_ci(3, 7, 0)
    assert (lo, hi) == pytest.approx((1 - hi2, 1 - lo2))
    rate, lo, hi = judge.win_rate_ci(0, 0, 0)
    assert math.isnan(rate) and (lo, hi) == (0.0, 1.0)
    assert judge.win_rate_ci(600, 400, 0)[2] - judge.win_rate_ci(600, 400, 0)[1] < 0.07  # narrows with n


# ---------------------------------------------------------------------------------------------------------------
# loading and matching


def query(i):
    return f"SUBREDDIT: r/test\n\nTITLE: post {i}\n\nPOST: story number {i}\n\nTL;DR:"


def test_load_completions_jsonl_and_datasets_folder(tmp_path):
    rows = [{"query": query(i), "response": f"r{i}", "reference": f"ref{i}", "score": 0.5} for i in range(3)]
    assert judge.load_completions(write_jsonl(tmp_path / "a.jsonl", rows)) == rows
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert judge.load_completions(str(tmp_path / "ds")) == rows


def test_load_completions_errors_name_the_problem(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"query": "q", "response": "r"}])
    with pytest.raises(judge.JudgeError, match=r"lacks column\(s\) \['reference'\]"):
        judge.load_completions(path, ("query", "response", "reference"))
    (tmp_path / "bad.jsonl").write_text('{"query": "q", "response": "r"}\n{"query": \n')
    with pytest.raises(judge.JudgeError, match="line 2 is not valid JSON"):
        judge.load_completions(str(tmp_path / "bad.jsonl"))


def test_match_rows_pairs_by_query_and_rejects_different_prompts():
    rows_a = [{"query": "q1", "response": "a1"}, {"query": "q2", "response": "a2"}, {"query": "q1", "response": "a1'"}]
    rows_b = [{"query": "q2", "response": "b2"}, {"query": "q1", "response": "b1"}, {"query": "q1", "response": "b1'"}]
    assert judge.match_rows(rows_a, rows_b) == [("q1", "a1", "b1"), ("q2", "a2", "b2"), ("q1", "a1'", "b1'")]
    assert judge.match_rows(rows_a, rows_b, max_examples=1) == [("q1", "a1", "b1")]
    with pytest.raises(judge.JudgeError, match="1 queries only in A.*'q2'.*1 only in B.*'q3'"):
        judge.match_rows(rows_a, [{"query": "q3", "response": "x"}] + rows_b[1:])


# ---------------------------------------------------------------------------------------------------------------
# gold judge


def test_judge_gold_with_injected_score_fn():
    rows_a = [{"query": query(i), "response": "x" * n} for i, n in enumerate([5, 3, 4, 1])]
    rows_b = [{"query": query(i), "response": "x" * n} for i, n in reversed(list(enumerate([2, 3, 1, 6])))]
    seen = []

    def score_fn(prompt, completion):
        seen.append(prompt)
        return float(len(completion))

    result = judge.judge_gold(rows_a, rows_b, score_fn)
    assert (result["n"], result["wins"], result["losses"], result["ties"], result["invalid"]) == (4, 2, 1, 1, 0)
    assert [e["outcome"] for e in result["examples"]] == ["win", "tie", "win", "loss"]
    assert result["win_rate"] == pytest.approx(2.5 / 4)
    assert result["ci_low"] < 2.5 / 4 < result["ci_high"]
    assert (result["mean_score_a"], result["mean_score_b"]) == (13 / 4, 12 / 4)
    assert set(seen) == {query(i) for i in range(4)}  # the scorer gets the prompt, not just the completion
    assert "Wilson" in result["ci_method"] and "ties count as half" in result["ci_method"]


def test_judge_gold_against_reference():
    rows = [{"query": query(i), "response": "good", "reference": "bad"} for i in range(3)]
    result = judge.judge_gold(rows, judge.reference_rows(rows), lambda p, c: float(c == "good"))
    assert (result["wins"], result["losses"], result["mean_score_a"], result["mean_score_b"]) == (3, 0, 1.0, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# LLM judge against a real local HTTP server


def chat_body(content):
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


def marker_answer(prompt):
    """A deterministic 'judge': prefers whichever shown summary contains GOOD."""
    return "The second one is tighter.\nPreferred: B" if "GOOD" in prompt.split("Summary B:")[1] else "Preferred: A"


class JudgeServer:
    """behaviour(prompt, attempt) -> (status, headers, body, sleep_seconds); attempt counts earlier requests
    with the same prompt, so a test can script 'fail first, then succeed' per example."""

    def __init__(self, behaviour):
        self.behaviour, self.requests, self.lock, self.attempts = behaviour, [], threading.Lock(), {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                with server.lock:
                    server.requests.append((self.path, dict(self.headers), body))
                    attempt = server.attempts.get(prompt, 0)
                    server.attempts[prompt] = attempt + 1
                status, headers, payload, sleep = server.behaviour(prompt, attempt)
                time.sleep(sleep)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload.encode())
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def calls(self):
        return len(self.requests)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def ok(prompt, attempt=0):
    return 200, {"Content-Type": "application/json"}, chat_body(marker_answer(prompt)), 0


@pytest.fixture
def serve():
    servers = []

    def start(behaviour=ok):
        servers.append(JudgeServer(behaviour))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def make_rows(n, good_in_a):
    rows_a = [{"query": query(i), "response": f"summary {i} from A" + " GOOD" * (i in good_in_a)} for i in range(n)]
    rows_b = [
        {"query": query(i), "response": f"summary {i} from B" + " GOOD" * (i not in good_in_a)} for i in range(n)
    ]
    return rows_a, rows_b


FAST = dict(base_delay=0.001, max_delay=0.05, timeout=5.0)


def test_llm_order_is_randomised_and_mapped_back(serve):
    server = serve()
    good_in_a = {0, 1, 2, 4, 7, 8, 11, 13, 14, 15}
    rows_a, rows_b = make_rows(16, good_in_a)
    result = judge.judge_llm(rows_a, rows_b, server.base_url, "judge-model", "sk-test", concurrency=4, seed=3, **FAST)
    assert (result["wins"], result["losses"], result["ties"], result["invalid"]) == (10, 6, 0, 0)
    assert [e["outcome"] == "win" for e in result["examples"]] == [i in good_in_a for i in range(16)]
    assert result["win_rate"] == 10 / 16 and result["api_calls"] == server.calls == 16

    # both orders were shown, and each example's order is the seeded one
    prompts = [body["messages"][0]["content"] for _, _, body in server.requests]
    a_shown_second = ["from A" in prompt.split("Summary B:")[1] for prompt in prompts]
    assert 0 < sum(a_shown_second) < 16
    assert sorted(e["swapped"] for e in result["examples"]) == sorted(a_shown_second)
    assert [e["swapped"] for e in result["examples"]] == [judge.is_swapped(query(i), 3) for i in range(16)]

    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] > 0
    assert "TL;DR:" not in body["messages"][0]["content"] and "story number" in body["messages"][0]["content"]


def test_is_swapped_is_seeded_per_query():
    first = [judge.is_swapped(query(i), 0) for i in range(200)]
    assert first == [judge.is_swapped(query(i), 0) for i in range(200)]
    assert 70 < sum(first) < 130
    assert first != [judge.is_swapped(query(i), 1) for i in range(200)]


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Summary A keeps the facts.\nPreferred: A", "A"),
        ("preferred: **B**", "B"),
        ("Comparison: ...\n**Preferred:** Summary B.", "B"),
        ("Preferred: a", "A"),
        ("Preferred: A (more concise)", "A"),
        ("Summary A is better because it is shorter.", "A"),
        ("I would choose summary B.", "B"),
        ("B", "B"),
        ("Preferred: A\n...on reflection...\nPreferred: B", "B"),
        ("Summary A is better on facts but Summary B is better on length.", None),
        ("Preferred: a tie", None),
        ("Both are fine.", None),
        ("", None),
    ],
)
def test_parse_preference(answer, expected):
    assert judge.parse_preference(answer) == expected


def test_llm_malformed_answers_are_asked_again(serve):
    def behaviour(prompt, attempt):
        ambiguous = "Summary A is better here but Summary B is better there."
        answers = ["I cannot decide.", ambiguous, marker_answer(prompt).replace(": ", ": **") + "**"]
        return 200, {}, chat_body(answers[min(attempt, 2)]), 0

    server = serve(behaviour)
    rows_a, rows_b = make_rows(4, {0, 1})
    result = judge.judge_llm(rows_a, rows_b, server.base_url, "m", concurrency=2, max_retries=2, **FAST)
    assert (result["wins"], result["losses"], result["invalid"]) == (2, 2, 0)
    assert server.calls == 12


def test_llm_non_json_body_is_treated_as_unparseable(serve):
    server = serve(lambda prompt, attempt: (200, {}, "<html>gateway</html>", 0) if attempt == 0 else ok(prompt))
    result = judge.judge_llm(*make_rows(2, {0}), server.base_url, "m", **FAST)
    assert (result["wins"], result["losses"], result["invalid"], server.calls) == (1, 1, 0, 4)


def test_llm_429_honours_retry_after_and_500_is_retried(serve):
    def behaviour(prompt, attempt):
        if "story number 0" in prompt and attempt == 0:
            return 429, {"Retry-After": "0"}, '{"error": "rate limited"}', 0
        if "story number 1" in prompt and attempt < 2:
            return 500, {}, "oops", 0
        return ok(prompt)

    server = serve(behaviour)
    rows_a, rows_b = make_rows(3, {0, 1, 2})
    result = judge.judge_llm(rows_a, rows_b, server.base_url, "m", concurrency=3, **FAST)
    assert (result["wins"], result["invalid"], server.calls) == (3, 0, 2 + 3 + 1)

    # with a 30 s backoff, only honouring Retry-After: 0 keeps the 429 retry fast
    server = serve(behaviour)
    start = time.time()
    result = judge.judge_llm(rows_a[:1], rows_b[:1], server.base_url, "m", base_delay=30.0, max_delay=30.0)
    assert (result["wins"], server.calls) == (1, 2) and time.time() - start < 3


def test_retry_after_parsing():
    assert judge.retry_after_seconds("0", 60) == 0.0
    assert judge.retry_after_seconds("2.5", 60) == 2.5
    assert judge.retry_after_seconds("3600", 60) == 60
    assert judge.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 60) == 0.0  # a date in the past
    assert judge.retry_after_seconds(None, 60) is None and judge.retry_after_seconds("soon", 60) is None


def test_llm_timeout_then_success(serve):
    server = serve(lambda prompt, attempt: ok(prompt)[:3] + (1.0 if attempt == 0 else 0,))
    start = time.time()
    result = judge.judge_llm(*make_rows(2, {1}), server.base_url, "m", concurrency=2, timeout=0.3, base_delay=0.001)
    assert (result["wins"], result["losses"], result["invalid"], server.calls) == (1, 1, 0, 4)
    assert time.time() - start < 2.5


def test_llm_persistent_failures_are_invalid_and_not_cached(serve, tmp_path):
    server = serve(lambda prompt, attempt: (503, {}, "down", 0))
    cache = str(tmp_path / "cache.jsonl")
    result = judge.judge_llm(*make_rows(3, {0}), server.base_url, "m", max_retries=2, cache_path=cache, **FAST)
    assert (result["n"], result["invalid"], result["failed_requests"], server.calls) == (3, 3, 3, 9)
    assert math.isnan(result["win_rate"]) and "HTTP 503 after 3 attempts" in result["examples"][0]["reason"]
    judge.judge_llm(*make_rows(3, {0}), server.base_url, "m", max_retries=2, cache_path=cache, **FAST)
    assert server.calls == 18  # failures were not cached, so a rerun asks again

    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    result = judge.judge_llm(*make_rows(2, {0}), dead, "m", max_retries=1, **FAST)
    assert result["invalid"] == 2 and "after 2 attempts" in result["examples"][0]["reason"]


def test_llm_persistent_unparseable_is_invalid_and_cached(serve, tmp_path):
    server = serve(lambda prompt, attempt: (200, {}, chat_body("Both are fine."), 0))
    cache = str(tmp_path / "cache.jsonl")
    result = judge.judge_llm(*make_rows(2, {0}), server.base_url, "m", max_retries=2, cache_path=cache, **FAST)
    assert (result["invalid"], result["failed_requests"], server.calls) == (2, 0, 6)
    assert result["examples"][0]["reason"] == "unparseable answer"
    judge.judge_llm(*make_rows(2, {0}), server.base_url, "m", max_retries=2, cache_path=cache, **FAST)
    assert server.calls == 6


def test_llm_non_retryable_4xx_is_a_clear_error(serve):
    server = serve(lambda prompt, attempt: (401, {}, '{"error": "invalid api key"}', 0))
    with pytest.raises(judge.JudgeError, match="HTTP 401.*invalid api key"):
        judge.judge_llm(*make_rows(3, {0}), server.base_url, "m", **FAST)
    assert server.calls <= 3  # one try per example at most, no retries


def test_llm_cache_second_run_makes_no_calls(serve, tmp_path):
    server = serve()
    rows_a, rows_b = make_rows(6, {0, 3})
    cache = str(tmp_path / "sub" / "cache.jsonl")
    first = judge.judge_llm(rows_a, rows_b, server.base_url, "m", cache_path=cache, **FAST)
    assert server.calls == 6
    second = judge.judge_llm(rows_a, rows_b, server.base_url, "m", cache_path=cache, **FAST)
    assert server.calls == 6 and second["api_calls"] == 0 and second["cached"] == 6
    assert second["examples"] == first["examples"]
    judge.judge_llm(rows_a, rows_b, server.base_url, "other-model", cache_path=cache, **FAST)
    assert server.calls == 12  # the key includes the model


def test_llm_cache_resumes_interrupted_run(serve, tmp_path):
    server = serve()
    rows_a, rows_b = make_rows(6, {1, 2, 5})
    cache = tmp_path / "cache.jsonl"
    judge.judge_llm(rows_a, rows_b, server.base_url, "m", cache_path=str(cache), max_examples=3, **FAST)
    assert server.calls == 3
    result = judge.judge_llm(rows_a, rows_b, server.base_url, "m", cache_path=str(cache), **FAST)
    assert server.calls == 6 and (result["cached"], result["wins"], result["losses"]) == (3, 3, 3)

    # killed mid-write: the last line is cut short; that one example is judged again, the rest are reused
    cache.write_text(cache.read_text()[:-20])
    result = judge.judge_llm(rows_a, rows_b, server.base_url, "m", cache_path=str(cache), **FAST)
    assert server.calls == 7 and (result["cached"], result["wins"], result["losses"]) == (5, 3, 3)
    # the new record started on a fresh line, so a third run needs nothing
    judge.judge_llm(rows_a, rows_b, server.base_url, "m", cache_path=str(cache), **FAST)
    assert server.calls == 7
    assert sum(1 for line in cache.read_text().splitlines() if line.endswith("}")) == 6


def test_llm_cache_is_written_as_judgments_finish(serve, tmp_path):
    cache = tmp_path / "cache.jsonl"
    lines_seen = []

    def behaviour(prompt, attempt):  # what a run killed at this moment would leave behind
        lines_seen.append(len(cache.read_text().splitlines()))
        return ok(prompt)

    server = serve(behaviour)
    judge.judge_llm(*make_rows(4, {0}), server.base_url, "m", concurrency=1, cache_path=str(cache), **FAST)
    assert lines_seen == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------
# the CLI, as a user runs it


def run_cli(*args, env=None):
    proc = run_script("judge.py", *args, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_llm_against_reference(serve, tmp_path):
    server = serve()
    rows = [
        dict(query=query(i), response=f"A {i}" + " GOOD" * (i < 3), reference=f"ref {i}" + " GOOD" * (i >= 3))
        for i in range(4)
    ]
    out = tmp_path / "out.json"
    proc = run_cli(
        "--a", write_jsonl(tmp_path / "a.jsonl", rows), "--b", "reference", "--judge", "llm",
        "--base-url", server.base_url,
        "--model", "m", "--api-key-env", "MY_KEY", "--concurrency", "2", "--cache_path", str(tmp_path / "c.jsonl"),
        "--output", str(out), env={"MY_KEY": "sk-cli"},
    )  # fmt: skip
    summary = json.loads(out.read_text())
    assert (summary["n"], summary["wins"], summary["losses"], summary["invalid"]) == (4, 3, 1, 0)
    assert summary["win_rate"] == 0.75 and summary["b"] == "reference"
    assert server.requests[0][1]["Authorization"] == "Bearer sk-cli"
    assert "0.750" in proc.stdout and "Wilson" in proc.stdout


def test_cli_killed_mid_run_resumes_from_cache(serve, tmp_path):
    hangs = serve(lambda prompt, attempt: ok(prompt)[:3] + ((30 if "story number 3" in prompt else 0),))
    rows_a, rows_b = make_rows(6, {0, 2, 3})
    cache, out = tmp_path / "cache.jsonl", tmp_path / "out.json"
    cmd = [sys.executable, str(REPO / "judge.py"), "--judge", "llm", "--concurrency", "1", "--cache-path", str(cache)]
    cmd += ["--a", write_jsonl(tmp_path / "a.jsonl", rows_a), "--b", write_jsonl(tmp_path / "b.jsonl", rows_b)]
    cmd += ["--output", str(out)]
    proc = subprocess.Popen(cmd + ["--base-url", hangs.base_url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 15
    while hangs.calls < 4 and time.time() < deadline:  # examples 0-2 answered, stuck on example 3
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert hangs.calls == 4 and len(cache.read_text().splitlines()) == 3

    server = serve()
    run_cli(*cmd[2:], "--base-url", server.base_url)
    summary = json.loads(out.read_text())
    assert (summary["api_calls"], summary["cached"], server.calls) == (3, 3, 3)
    assert (summary["wins"], summary["losses"]) == (3, 3)


def test_cli_reports_mismatched_prompts_without_traceback(tmp_path):
    path_a = write_jsonl(tmp_path / "a.jsonl", [{"query": query(i), "response": "x"} for i in range(3)])
    path_b = write_jsonl(tmp_path / "b.jsonl", [{"query": query(i), "response": "y"} for i in range(1, 4)])
    proc = run_script("judge.py", "--a", path_a, "--b", path_b, "--judge", "llm", timeout=60, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "same prompts: 1 queries only in A" in proc.stderr


def test_cli_gold(tmp_path):
    tiny_tldr = pytest.importorskip("tiny_tldr")
    post = (
        "SUBREDDIT: r/relationships\n\nTITLE: help\n\nPOST: My boyfriend forgot my birthday and I feel hurt.\n\nTL;DR:"
    )
    answers_a = ["my boyfriend forgot my birthday and i feel hurt.", "boyfriend forgot my birthday", "my landlord"]
    answers_b = [answers_a[0], "my boss lied about money and", "my boyfriend forgot my birthday."]
    queries = [post.replace("help", f"help {i}") for i in range(3)]
    path_a = write_jsonl(tmp_path / "a.jsonl", [{"query": q, "response": r} for q, r in zip(queries, answers_a)])
    path_b = write_jsonl(tmp_path / "b.jsonl", [{"query": q, "response": r} for q, r in zip(queries, answers_b)])
    out = tmp_path / "out.json"
    run_cli("--a", path_a, "--b", path_b, "--judge", "gold", "--output", str(out))
    summary = json.loads(out.read_text())
    expected = judge.judge_gold(judge.load_completions(path_a), judge.load_completions(path_b), tiny_tldr.gold_score)
    for key in ("n", "wins", "losses", "ties", "invalid", "mean_score_a", "mean_score_b"):
        assert summary[key] == expected[key], key
    assert summary["n"] == 3 and summary["ties"] >= 1  # identical first answers tie


@pytest.mark.parametrize(
    "case", ["missing file", "empty file", "null response", "row not an object", "negative max examples"]
)
def test_cli_user_errors_are_one_line_messages(case, tmp_path):
    """Each of these once gave a traceback or a `nan` win rate."""
    good = write_jsonl(tmp_path / "good.jsonl", [{"query": query(i), "response": "x"} for i in range(3)])
    a, extra, word = good, [], None
    if case == "missing file":
        a, word = str(tmp_path / "nope.jsonl"), "does not exist"
    elif case == "empty file":
        a, word = write_jsonl(tmp_path / "empty.jsonl", []), "no completions"
    elif case == "null response":
        a, word = write_jsonl(tmp_path / "null.jsonl", [{"query": query(0), "response": None}]), "not a string"
    elif case == "row not an object":
        (tmp_path / "list.jsonl").write_text("[1, 2]\n")
        a, word = str(tmp_path / "list.jsonl"), "not an object"
    else:
        extra, word = ["--max-examples", "-1"], "--max-examples must be >= 1"
    proc = run_script("judge.py", "--a", a, "--b", good, "--judge", "gold", *extra, timeout=120, check=False)
    assert proc.returncode == 1, proc.stdout[-1000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert word in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
