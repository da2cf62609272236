"""Command line: TRL-style boolean flags, argument errors that name the argument, remote-code errors explained."""

import sys


def fail(argument: str, message: str) -> None:
    """Stop before any expensive work, naming the argument and the fix."""
    sys.exit(f"error: --{argument.replace('_', '-')}: {message}")


def bool_flags_as_switches(argv: list, args_cls) -> list:
    """TRL's command-line habit (HfArgumentParser): `--bf16 True`, `--gradient_checkpointing False`, `--bf16=true`
    become tyro's `--bf16` / `--no-gradient-checkpointing` for the boolean fields of args_cls; other tokens pass as
    is."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(args_cls)
    switches = {f.name for f in dataclasses.fields(args_cls) if hints[f.name] is bool}
    words = {
        "true": True,
        "yes": True,
        "t": True,
        "y": True,
        "1": True,
        "false": False,
        "no": False,
        "f": False,
        "n": False,
        "0": False,
    }
    out, i = [], 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        name = flag[2:].replace("-", "_") if flag.startswith("--") else None
        if name in switches and not eq and i + 1 < len(argv) and argv[i + 1].lower() in words:
            eq, value, i = "=", argv[i + 1], i + 1  # a boolean switch takes no value, so this word is its value
        if name in switches and eq and value.lower() in words:
            out.append(("--" if words[value.lower()] else "--no-") + name.replace("_", "-"))
        else:
            out.append(argv[i])
        i += 1
    return out


def explain_remote_code_errors() -> None:
    """transformers refuses a model or tokenizer whose code lives in its repository unless it is trusted, with a
    traceback: print that refusal as one line naming the flag instead."""
    default = sys.excepthook

    def hook(kind, error, traceback):
        if issubclass(kind, ValueError) and "trust_remote_code=True" in str(error):
            print(
                f"error: --trust-remote-code: {str(error).splitlines()[0].strip()} Pass --trust-remote-code if you "
                "trust that code.",
                file=sys.stderr,
            )
        else:
            default(kind, error, traceback)

    sys.excepthook = hook
