"""
nanoGPT-style configuration: a script keeps its settings as plain globals, then calls

    configure(globals())

which applies, in order, any config files named on the command line (python files of plain
assignments, e.g. config/world.py) and any --key=value (or --key value) overrides; a bare
--flag sets a boolean to True. A key the script does not
define, or a value of another type, stops the program with one line naming it.
"""

import sys
from ast import literal_eval


def die(msg: str):
    """One clear line on stderr, no traceback, exit code 2."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def require_int(name: str, value, least: int, most: int | None = None, why: str = ""):
    """A setting that must be an int in [least, most], or one line saying so."""
    if not isinstance(value, int) or value < least or (most is not None and value > most):
        die(f"{name} must be an int >= {least}{'' if most is None else f' and <= {most}'}{why}, not {value!r}")


def configure(g: dict, argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    keys = {k for k, v in g.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, list, dict, type(None)))}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):  # a config file
            try:
                src = open(arg).read()
            except OSError as e:
                die(f"cannot read config file {arg}: {e.strerror}")
            new: dict = {}
            exec(compile(src, arg, "exec"), {}, new)
            for k, v in new.items():
                if k.startswith("_") or callable(v) or type(v).__name__ == "module":
                    continue
                set_key(g, keys, k, v, arg)
            continue
        if "=" in arg:  # --key=value
            k, raw = arg[2:].split("=", 1)
        elif isinstance(g.get(arg[2:]), bool):  # --flag means True
            k, raw = arg[2:], "True"
        elif args:  # --key value
            k, raw = arg[2:], args.pop(0)
        else:
            die(f"{arg} needs a value")
        try:
            v = literal_eval(raw)
        except (ValueError, SyntaxError):
            v = raw  # a bare string
        if isinstance(g.get(k), str) and not isinstance(v, str):
            v = raw  # --prompt 42 is the text "42"
        set_key(g, keys, k, v, arg)
    return {k: g[k] for k in sorted(keys)}


def set_key(g: dict, keys: set, k: str, v, where: str):
    if k not in keys:
        die(f"unknown config key '{k}' (from {where})")
    old = g[k]
    if old is not None and v is not None and type(v) is not type(old):
        if isinstance(old, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)  # --lr=1 means 1.0
        elif isinstance(old, tuple) and isinstance(v, list):
            v = tuple(v)
        else:
            die(f"config key '{k}' expects {type(old).__name__}, got {type(v).__name__} {v!r} (from {where})")
    g[k] = v
