"""`lora-lens` command line. Each sibling module is one sub-command (NAME, HELP, add_arguments, run)
and may offer a `demo(ctx)` step for `lora-lens demo`; they are discovered, not listed here.

A module is named after its command, so a call names the one module it needs: only that one is
imported, and the torch device is resolved only for commands that use it (USES_DEVICE, default True).
`lora-lens list` and extracting lossless .loradb entries therefore never import torch."""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from ..errors import LensError


def command_names() -> list[str]:
    return [i.name for i in pkgutil.iter_modules(__path__) if not i.name.startswith("_")]


def command_modules(only: str | None = None):
    mods = []
    for name in command_names() if only is None else [only]:
        if only is None or name == only:
            mod = importlib.import_module(f".{name}", __name__)
            if hasattr(mod, "NAME") and hasattr(mod, "run"):
                mods.append(mod)
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 50), m.NAME))


def command_listing() -> list[tuple[str, str]]:
    """(NAME, HELP) of every command in menu order, read from the modules' literal constants without importing
    them (each imports the engine and torch: ~1 s for `lora-lens --help`); a module whose constants are not
    plain literals is imported instead."""
    import ast
    rows = []
    for name in command_names():
        path = os.path.join(os.path.dirname(__file__), name + ".py")
        consts = {}
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in tree.body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                        and node.targets[0].id in ("NAME", "HELP", "ORDER") and isinstance(node.value, ast.Constant):
                    consts[node.targets[0].id] = node.value.value
        except (OSError, SyntaxError):
            pass
        if "NAME" not in consts or "HELP" not in consts:
            for mod in command_modules(name):
                rows.append((getattr(mod, "ORDER", 50), mod.NAME, mod.HELP))
            continue
        rows.append((consts.get("ORDER", 50), consts["NAME"], consts["HELP"]))
    return [(n, h) for _, n, h in sorted(rows)]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show a traceback on errors")
    common.add_argument("--device", default="auto", help="torch device: auto (GPU when present), cpu, cuda, ...")
    parser = argparse.ArgumentParser(prog="lora-lens", description="Look inside, shrink, blend and pack LoRA files.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if only is None:   # no command named (`lora-lens --help`, a typo): the menu only, nothing imported
        for name, text in command_listing():
            sub.add_parser(name, help=text)
        return parser
    for mod in command_modules(only):
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           parents=[common])
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _device=getattr(mod, "USES_DEVICE", True))
    return parser


def resolve_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LensError(f"Unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LensError(f"--device {name}: this torch has no CUDA device here; use --device cpu (or auto).")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LensError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s).")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise LensError(f"--device {name}: MPS is not available here; use --device cpu (or auto).")
    return dev


def _named_command(argv: list[str]) -> str | None:
    """The sub-command an argument list names (its first non-option word), if it is one of ours.
    A plain `<name>.py` next to this file is found without listing the package (pkgutil's listing
    imports `inspect`, ~3 ms of a fast command's start)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    if first and first.isidentifier() and not first.startswith("_") \
            and os.path.isfile(os.path.join(os.path.dirname(__file__), first + ".py")):
        return first
    return first if first in command_names() else None


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse a command line; positionals may come on both sides of options (`extract DB -o DIR ENTRY`,
    `pack A.safetensors -o OUT.loradb B.safetensors`), which plain argparse refuses for a list positional
    that follows another positional or an option ("unrecognized arguments")."""
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) in argv:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        cmd = sub.choices.get(args.command) if sub is not None else None
        if cmd is not None:
            return cmd.parse_intermixed_args(argv[argv.index(args.command) + 1:],
                                             argparse.Namespace(command=args.command))
    return parser.parse_args(argv)   # (no extras: parsed as before; other extras: argparse's own error)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [*argv]   # (`list` here is the sub-command module)
    parser = build_parser(_named_command(argv))
    args = _parse(parser, argv)
    try:
        if args._device:
            args.device = resolve_device(args.device)
        return int(args._run(args) or 0)
    except LensError as e:
        if args.debug:
            raise
        print(f"lora-lens: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-lens: cancelled.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # the system refused a read or write (disk full, permissions, a vanished folder)
        if args.debug:
            raise
        name = str(e.filename or "")
        if os.path.basename(name).startswith(".lens-"):   # our temporary file: the user knows its folder
            name = os.path.dirname(name) or "."
        where = f" ({name})" if name else ""
        print(f"lora-lens: {e.strerror or e}{where}; nothing was left half-written.", file=sys.stderr)
        return 1
    except Exception as e:  # a bug or an environment problem: still one sentence unless --debug
        if args.debug:
            raise
        print(f"lora-lens: unexpected error ({type(e).__name__}: {e}); run again with --debug for details.",
              file=sys.stderr)
        return 1


def _keep_freed_memory() -> None:
    """glibc only: keep freed blocks up to 64 MiB in the process (and trim its heap only beyond 512 MiB free)
    instead of handing each back to the kernel. Per-module work allocates and frees many such temporaries on
    worker threads; with glibc's defaults each new one is fresh pages the kernel must fault in and zero
    (measured: `lora-lens quantize` on an SDXL rank-128 file 10 % faster, +11 % peak memory; prune and the
    conflict scan unchanged). A no-op where there is no glibc `mallopt`."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)    # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)   # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def entry() -> None:
    """The `lora-lens` program (console script and `python -m lens_ops`): `main`, then a quick exit.

    When a command returns, its outputs are written, closed and renamed into place (every write is
    atomic inside the command) and its temporary files are gone; what the interpreter's teardown would
    still do is free memory and unload torch, which takes about half a second — more than many commands'
    own work. So the program flushes its output and leaves with os._exit."""
    _keep_freed_memory()
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
