"""Print the shape measures the style guide compares for the four scripts: lines, characters, median width of
non-blank lines, main-block lines before the training loop, and functions defined inside the main block.

The training loop is the longest `for`/`while` statement directly in the `if __name__ == "__main__":` block.
Usage: python benchmark/readability.py [files...]"""

import ast
import statistics
import sys

SCRIPTS = ("ppo_rlhf.py", "ppo_rlhf_tldr.py", "sft.py", "reward_modeling.py")


def measure(path: str) -> dict:
    text = open(path).read()
    lines = text.splitlines()
    widths = [len(line) for line in lines if line.strip()]
    tree = ast.parse(text)
    main = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and "__main__" in ast.get_source_segment(text, node.test)
    )
    loops = [node for node in main.body if isinstance(node, (ast.For, ast.While))]
    loop = max(loops, key=lambda node: node.end_lineno - node.lineno)
    nested = [node for node in ast.walk(main) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return {
        "lines": len(lines),
        "characters": len(text),
        "median width": statistics.median(widths),
        "main before loop": loop.lineno - main.lineno,
        "loop lines": loop.end_lineno - loop.lineno + 1,
        "nested functions in main": len(nested),
    }


if __name__ == "__main__":
    paths = sys.argv[1:] or SCRIPTS
    rows = {path: measure(path) for path in paths}
    keys = list(next(iter(rows.values())))
    print("| file | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for path, row in rows.items():
        print(f"| {path} | " + " | ".join(f"{row[key]:,}" for key in keys) + " |")
