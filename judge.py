"""Win rate of completions A over completions B on the same prompts, judged by the offline gold
scorer of the embedded task or by an LLM behind any OpenAI-compatible chat completions endpoint.

    python judge.py --a ppo/eval.jsonl --b reference --judge gold
    python judge.py --a ppo/eval.jsonl --b sft/eval.jsonl --judge llm --base-url http://127.0.0.1:8000/v1 --model NAME
"""

import hashlib
import http.client
import json
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Callable, Literal, Optional

import tyro
from rich.console import Console
from rich.progress import track
from rich.table import Table


@dataclass
class Args:
    # what to compare
    a: str
    """completions A: a jsonl file or a `datasets` save_to_disk folder with `query` and `response` columns"""
    b: str
    """completions B: a path like --a, or the word `reference` to judge A against A's own `reference` column"""
    judge: Literal["gold", "llm"] = "gold"
    """`gold`: the embedded task's offline gold scorer (tiny_tldr.gold_score); `llm`: an LLM judge over HTTP"""
    max_examples: Optional[int] = None
    """judge only the first N prompts (in A's order); None judges all"""
    seed: int = 0
    """seed of the per-example A/B order shown to the LLM judge"""
    output: Optional[str] = None
    """if set, write the summary and per-example judgments to this JSON file"""

    # LLM judge
    base_url: str = "https://api.openai.com/v1"
    """OpenAI-compatible endpoint; requests go to {base_url}/chat/completions"""
    model: str = "gpt-4o-mini"
    """judge model name sent in the request body"""
    api_key_env: str = "OPENAI_API_KEY"
    """name of the environment variable holding the API key (sent as `Authorization: Bearer ...`)"""
    concurrency: int = 8
    """number of requests in flight at once"""
    max_retries: int = 5
    """retries per request (429, 5xx, timeouts, connection errors) and per example for unparseable answers"""
    timeout: float = 30.0
    """seconds to wait for one HTTP response"""
    cache_path: Optional[str] = None
    """append-only jsonl cache of judgments; rerunning with the same file resumes without repeating calls"""


class JudgeError(RuntimeError):
    pass


def load_completions(path: str, columns: tuple[str, ...] = ("query", "response")) -> list[dict]:
    if not os.path.exists(path):
        raise JudgeError(f"{path} does not exist; pass a jsonl file or a save_to_disk folder of completions")
    if os.path.isdir(path):
        import datasets  # imported here: it is slow to import and jsonl files do not need it

        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            raise JudgeError(f"{path} holds a DatasetDict with splits {list(ds)}: pass one split's folder")
        rows = ds.to_list()
    else:
        rows = []
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise JudgeError(f"{path} line {i} is not valid JSON: {e}") from None
    if not rows:
        raise JudgeError(f"{path} holds no completions: a win rate over none is undefined")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise JudgeError(f"{path} row {i} is {row!r:.60}, not an object with columns {list(columns)}")
        missing = [c for c in columns if c not in row]
        if missing:
            raise JudgeError(f"{path} row {i} lacks column(s) {missing}; it has {sorted(row)}")
        not_text = [c for c in columns if not isinstance(row[c], str)]
        if not_text:
            raise JudgeError(f"{path} row {i}: {not_text[0]} is {row[not_text[0]]!r:.60}, not a string")
    return rows


def reference_rows(rows: list[dict]) -> list[dict]:
    """B = the dataset's reference summaries of A's own prompts (`--b reference`)."""
    return [{"query": r["query"], "response": r["reference"]} for r in rows]


def match_rows(
    rows_a: list[dict], rows_b: list[dict], max_examples: Optional[int] = None
) -> list[tuple[str, str, str]]:
    """(query, response A, response B) in A's order; a query repeated k times pairs its k-th copies."""
    count_a, count_b = Counter(r["query"] for r in rows_a), Counter(r["query"] for r in rows_b)
    if count_a != count_b:
        only_a, only_b = list(count_a - count_b), list(count_b - count_a)
        raise JudgeError(
            f"A and B must hold completions of the same prompts: {len(only_a)} queries only in A "
            f"(e.g. {only_a[:1]!r:.100}), {len(only_b)} only in B (e.g. {only_b[:1]!r:.100})"
        )
    by_query = defaultdict(deque)
    for r in rows_b:
        by_query[r["query"]].append(r["response"])
    pairs = [(r["query"], r["response"], by_query[r["query"]].popleft()) for r in rows_a]
    return pairs[:max_examples] if max_examples is not None else pairs


def win_rate_ci(wins: int, losses: int, ties: int, z: float = 1.959964) -> tuple[float, float, float]:
    """Win rate with ties counted as half a win and its Wilson score interval (95% for z=1.96).
    With ties the outcome variance is below the Bernoulli p(1-p), so the interval errs wide."""
    n = wins + losses + ties
    if n == 0:
        return float("nan"), 0.0, 1.0
    p = (wins + 0.5 * ties) / n
    denom = 1 + z**2 / n
    center = (p + z**2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return p, max(0.0, center - half), min(1.0, center + half)


def summarize(judge: str, outcomes: list[str], examples: list[dict], **extra) -> dict:
    c = Counter(outcomes)
    rate, lo, hi = win_rate_ci(c["win"], c["loss"], c["tie"])
    ci_method = "Wilson score interval, 95%, ties count as half a win, invalid judgments excluded"
    return dict(
        judge=judge, n=len(outcomes), wins=c["win"], losses=c["loss"], ties=c["tie"], invalid=c["invalid"],
        win_rate=rate, ci_low=lo, ci_high=hi, ci_method=ci_method, **extra, examples=examples,
    )  # fmt: skip


def judge_gold(
    rows_a: list[dict], rows_b: list[dict], score_fn: Callable[[str, str], float], max_examples: Optional[int] = None
) -> dict:
    examples = []
    for query, resp_a, resp_b in match_rows(rows_a, rows_b, max_examples):
        score_a, score_b = float(score_fn(query, resp_a)), float(score_fn(query, resp_b))
        outcome = "win" if score_a > score_b else "loss" if score_a < score_b else "tie"
        examples.append(dict(query=query, outcome=outcome, score_a=score_a, score_b=score_b))
    mean_a, mean_b = (sum(e[k] for e in examples) / max(1, len(examples)) for k in ("score_a", "score_b"))
    return summarize("gold", [e["outcome"] for e in examples], examples, mean_score_a=mean_a, mean_score_b=mean_b)


# The published TL;DR judging prompt (Rafailov et al. 2023, DPO, appendix C), in our own words.
JUDGE_PROMPT = """Two summaries of the same forum post follow. Decide which one summarizes the post better: \
a good summary captures the points that matter most, is precise about them, and stays concise, leaving \
out unimportant or irrelevant details.

Post:
{post}

Summary A:
{first}

Summary B:
{second}

First, in one sentence, compare the two summaries. Then, on a final line of its own, write \
"Preferred: A" or "Preferred: B" and nothing else."""


def build_prompt(query: str, first: str, second: str) -> str:
    # the query ends with the policy's "TL;DR:" cue, which means nothing to the judge
    post = query.strip().removesuffix("TL;DR:").strip()
    return JUDGE_PROMPT.format(post=post, first=first.strip(), second=second.strip())


def is_swapped(query: str, seed: int) -> bool:
    """Show B first for about half the examples (LLM judges favour one position); seeded from (seed, query)
    rather than from the example's index so reruns, subsets and reorderings show the same order."""
    digest = hashlib.sha256(f"{seed}\n{query}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).random() < 0.5


def parse_preference(answer: str) -> Optional[str]:
    """'A', 'B' or None (ambiguous / unparseable). The last `Preferred:` line wins; else phrases like
    'Summary A is better' count only when they all name the same summary."""
    text = re.sub(r"[*_`#]", "", answer)  # markdown emphasis: "Preferred: **B**"
    final = re.findall(r"preferred\s*:?\s*(?:summary\s*)?\(?([AB])\)?(?=\s*(?:$|[.,;:(\-]))", text, re.I | re.M)
    if final:
        return final[-1].upper()
    phrases = (
        r"summary\s+([AB])\s+is\s+(?:the\s+)?(?:better|preferred|superior)|(?:prefer|choose|pick)\s+summary\s+([AB])\b"
    )
    named = {a.upper() or b.upper() for a, b in re.findall(phrases, text, re.I)}
    if len(named) == 1:
        return named.pop()
    bare = text.strip().rstrip(".").strip().upper()
    return bare if bare in ("A", "B") else None


def retry_after_seconds(value: Optional[str], cap: float) -> Optional[float]:
    """Retry-After as delta-seconds or an HTTP date, capped so a hostile header cannot stall the run."""
    if not value:
        return None
    try:
        return min(cap, max(0.0, float(value)))
    except ValueError:
        try:
            return min(cap, max(0.0, parsedate_to_datetime(value).timestamp() - time.time()))
        except (TypeError, ValueError):
            return None


def chat_completion(
    url, model, prompt, api_key, timeout, max_tokens, max_retries, base_delay, max_delay, calls
) -> str:
    messages = [{"role": "user", "content": prompt}]
    body = json.dumps({"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    for attempt in range(max_retries + 1):
        retry_after = None
        try:
            calls.append(1)  # list.append is atomic, so worker threads can count requests with it
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read().decode("utf-8", errors="replace")
            try:
                return json.loads(raw)["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                return raw  # a malformed body is treated like an unparseable answer, i.e. asked again
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500:
                detail = e.read().decode("utf-8", errors="replace")[:300]
                hint = "not retried; check --base-url, --model and the key in --api-key-env"
                raise JudgeError(f"{url} answered HTTP {e.code} ({hint}): {detail}") from None
            error, retry_after = f"HTTP {e.code}", retry_after_seconds(e.headers.get("Retry-After"), max_delay)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # timeouts, refused/reset sockets
            error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if attempt == max_retries:
            raise ConnectionError(f"{url}: {error} after {max_retries + 1} attempts")
        # exponential backoff with jitter, so concurrent workers do not retry in lockstep
        backoff = min(max_delay, base_delay * 2**attempt * random.uniform(0.5, 1.5))
        time.sleep(retry_after if retry_after is not None else backoff)


def read_cache(path: str) -> tuple[dict[str, dict], bool]:
    """Records by key, and whether the file ends cleanly (empty or with a newline)."""
    cache, text = {}, ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    for line in text.splitlines():
        try:
            record = json.loads(line)
            cache[record["key"]] = record
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short when a previous run was killed: that example is judged again
    return cache, text.endswith("\n") or not text


def judge_llm(
    rows_a: list[dict], rows_b: list[dict], base_url: str, model: str, api_key: Optional[str] = None, concurrency: int = 8,
    max_retries: int = 5, timeout: float = 30.0, cache_path: Optional[str] = None, seed: int = 0,
    max_examples: Optional[int] = None, max_tokens: int = 256, base_delay: float = 1.0, max_delay: float = 60.0,
) -> dict:  # fmt: skip
    url = base_url.rstrip("/") + "/chat/completions"
    pairs = match_rows(rows_a, rows_b, max_examples)
    cache, ends_cleanly = read_cache(cache_path) if cache_path else ({}, True)
    cache_file, lock, calls, cached = None, threading.Lock(), [], []
    if cache_path:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        cache_file = open(cache_path, "a")
        if not ends_cleanly:
            cache_file.write("\n")  # end a truncated last line so the next record starts on its own line

    def judge_one(query: str, resp_a: str, resp_b: str) -> dict:
        swapped = is_swapped(query, seed)
        prompt = build_prompt(query, resp_b, resp_a) if swapped else build_prompt(query, resp_a, resp_b)
        key = hashlib.sha256(json.dumps([model, prompt, seed]).encode()).hexdigest()
        record = cache.get(key)
        if record is None:
            try:
                for _ in range(max_retries + 1):
                    answer = chat_completion(
                        url, model, prompt, api_key, timeout, max_tokens, max_retries, base_delay, max_delay, calls
                    )
                    if (preferred := parse_preference(answer)) is not None:
                        break
                record = dict(key=key, model=model, seed=seed, preferred=preferred, answer=answer)
            except ConnectionError as e:
                # not cached: a rerun should ask again once the endpoint recovers
                return dict(query=query, outcome="invalid", swapped=swapped, reason=str(e))
            if cache_file:
                with lock:
                    cache_file.write(json.dumps(record) + "\n")
                    cache_file.flush()  # line by line, so a killed run keeps every finished judgment
        else:
            cached.append(1)
        # None = still unparseable after retries. That is cached too: at temperature 0 asking again would
        # most likely get the same answer (delete the cache file to insist).
        shown = record["preferred"]
        outcome = "invalid" if shown is None else "win" if (shown == "A") != swapped else "loss"  # undo the shuffle
        reason = "unparseable answer" if shown is None else None
        answer = record["answer"]
        return dict(query=query, outcome=outcome, swapped=swapped, preferred_shown=shown, reason=reason, answer=answer)

    try:
        # pool.map cancels the queued requests when one raises; the finished ones are already in the cache
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = pool.map(lambda pair: judge_one(*pair), pairs)
            examples = list(track(results, total=len(pairs), description="judging", transient=True))
    finally:
        if cache_file:
            cache_file.close()
    failed = sum(e["outcome"] == "invalid" and e["reason"] != "unparseable answer" for e in examples)
    return summarize(
        "llm", [e["outcome"] for e in examples], examples, model=model, seed=seed,
        api_calls=len(calls), cached=len(cached), failed_requests=failed,
    )  # fmt: skip


def print_summary(result: dict, name_a: str, name_b: str) -> None:
    title = f"win rate of A over B, {result['judge']} judge"
    table = Table("", "value", title=title, caption=f"A = {name_a}\nB = {name_b}")
    for key in ("n", "wins", "losses", "ties", "invalid"):
        table.add_row(key, str(result[key]))
    table.add_row("win rate (ties count half)", f"{result['win_rate']:.3f}")
    table.add_row("95% CI (Wilson, invalid excluded)", f"[{result['ci_low']:.3f}, {result['ci_high']:.3f}]")
    if result["judge"] == "gold":
        table.add_row("mean gold score A", f"{result['mean_score_a']:.4f}")
        table.add_row("mean gold score B", f"{result['mean_score_b']:.4f}")
    else:
        table.add_row("API calls (cached judgments)", f"{result['api_calls']} ({result['cached']})")
    console = Console()
    console.print(table)
    if n := result.get("failed_requests"):
        console.print(
            f"[yellow]{n} requests failed after retries (counted invalid); rerun with --cache-path to retry them"
        )


def main(args: Args) -> dict:
    if args.max_examples is not None and args.max_examples < 1:
        raise JudgeError(f"--max-examples must be >= 1 (or None: every prompt), got {args.max_examples}")
    against_reference = args.b == "reference"
    rows_a = load_completions(args.a, ("query", "response") + (("reference",) if against_reference else ()))
    rows_b = reference_rows(rows_a) if against_reference else load_completions(args.b)
    if args.judge == "gold":
        from tiny_tldr import gold_score  # the embedded task's scorer; only this judge needs it

        return judge_gold(rows_a, rows_b, gold_score, args.max_examples)
    return judge_llm(
        rows_a, rows_b, args.base_url, args.model, os.environ.get(args.api_key_env), args.concurrency,
        args.max_retries, args.timeout, args.cache_path, args.seed, args.max_examples,
    )  # fmt: skip


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        result = main(args)
    except JudgeError as e:
        raise SystemExit(f"judge.py: error: {e}")  # a message that says what to fix, not a traceback
    result = dict(result, a=args.a, b=args.b)
    print_summary(result, args.a, args.b)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
