"""The MONAI bundle command line, made to fail well.

``python -m monai.bundle run ...`` prints every error as a 60-line traceback ending in MONAI's wrapper
(``RuntimeError: Failed to evaluate ConfigExpression ...``) and silently ignores a misspelt override
(``--max_epoch 2``). When the bundle's code is first imported by such a command (``$import scripts`` runs in
every config), :func:`install` puts two checks in place:

* unknown override keys stop the command before anything is built, naming the closest known config id;
* an error that escapes the command ends the output with one line ``error: <the cause>`` and exit status 1;
  ``MASKSAM_DEBUG=1`` prints the full traceback above that line.

Nothing changes for other programs that import ``scripts`` (tests, MONAI Label, notebooks).
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
import sys
import traceback
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

__all__ = ["install", "root_cause", "describe_error", "format_error", "unknown_overrides", "is_bundle_cli"]

DEBUG_ENV = "MASKSAM_DEBUG"
# messages of MONAI's wrappers around the error that matters (config expression, component, Compose)
_WRAPPERS = ("Failed to evaluate ", "Failed to instantiate component ", "applying transform ")
# errors whose message says everything (our checks raise these); other types are named in the error line
_SELF_EXPLAINING = (ValueError, KeyError, OSError, MemoryError, RuntimeError)
# settings of `--tracking mlflow` that MONAI reads from the overrides (monai.bundle.scripts.run)
_TRACKING_KEYS = ("tracking_uri", "experiment_name", "run_name", "save_execute_config", "execute_config")
_installed = False


def is_bundle_cli(argv: Optional[Sequence[str]] = None) -> bool:
    """True when this process is ``python -m monai.bundle ...`` (directly or under torchrun)."""
    argv = sys.argv if argv is None else argv
    return bool(argv) and os.path.normpath(str(argv[0])).endswith(os.path.join("monai", "bundle", "__main__.py"))


# ----------------------------------------------------------------------------------------------- errors
def root_cause(error: BaseException) -> Tuple[BaseException, Optional[str]]:
    """The innermost error below MONAI's wrappers, and the component being built when it happened."""
    component = None
    while error.__cause__ is not None and str(error).startswith(_WRAPPERS):
        text = str(error)
        if text.startswith("Failed to instantiate component "):
            component = text.split("'")[1] if "'" in text else component
        error = error.__cause__
    return error, component


def describe_error(error: BaseException) -> str:
    """``Type: message`` of the error that matters (see :func:`root_cause`)."""
    error, _ = root_cause(error)
    return f"{type(error).__name__}: {error}"


def _message(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and len(error.args) == 1 else str(error)
    marker = "Original Traceback (most recent call last):"  # DataLoader workers re-raise with the traceback as text
    if marker in text:
        lines = [line for line in text.split(marker, 1)[1].splitlines() if line.strip()]
        text = lines[-1].split(": ", 1)[-1] if lines else text
    return text.strip() or type(error).__name__


def format_error(error: BaseException) -> List[str]:
    """Lines to print for ``error``: a multi-line message in full first, then ``error: <cause>`` last."""
    cause, component = root_cause(error)
    lines = _message(cause).splitlines()
    head = lines[0].rstrip(":")
    if not isinstance(cause, _SELF_EXPLAINING):  # e.g. TypeError, AttributeError: the type says something
        head = f"{type(cause).__name__}: {head}"
    if component and isinstance(cause, TypeError):
        head += f" (building {component})"
    details = [line for line in lines if line.strip()] if len(lines) > 1 else []
    if details:
        head += " (details above)"
    return details + [f"error: {head}"]


def _excepthook(exc_type, exc, tb) -> None:
    sys.stdout.flush()
    if issubclass(exc_type, KeyboardInterrupt):
        print("\nerror: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exception(exc_type, exc, tb)
    else:
        print(f"MaskSAM stopped ({DEBUG_ENV}=1 prints the full traceback):", file=sys.stderr)
    print("\n".join(format_error(exc)), file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------- overrides
def _parse_flags(args: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """Positional arguments and ``--key value`` / ``--key=value`` flags, as python-fire reads them."""
    positional, flags = [], {}
    i = 0
    while i < len(args):
        arg = str(args[i])
        if arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg[2:].partition("=")
            if not eq:
                nxt = args[i + 1] if i + 1 < len(args) else None
                if nxt is not None and not str(nxt).startswith("--"):
                    value, i = str(nxt), i + 1
                else:
                    value = "True"
            flags[key] = value
        else:
            positional.append(arg)
        i += 1
    return positional, flags


def _as_file_list(value) -> List[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(v) for v in ast.literal_eval(text)]
        except (ValueError, SyntaxError):
            pass
    return [v.strip() for v in text.split(",")] if "," in text else [text]


def _config_ids(config, prefix: str = "") -> Dict[str, object]:
    """Every id of a merged config (``a``, ``a#b``, ``a#0``...) mapped to its raw content."""
    ids: Dict[str, object] = {}
    items: Iterable = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        key_id = f"{prefix}{key}"
        ids[key_id] = value
        ids.update(_config_ids(value, key_id + "#"))
    return ids


def unknown_overrides(overrides: Iterable[str], config: dict) -> List[str]:
    """One message per override key that names no config id (closest known id suggested).

    A new key below an existing dict (``--network_def#some_arg``) is accepted: it adds an argument."""
    ids = _config_ids(config)
    messages = []
    for key in overrides:
        norm = key.replace("::", "#")
        if norm in ids or norm.startswith("_meta_"):
            continue
        parent = norm.rsplit("#", 1)[0] if "#" in norm else None
        if parent is not None and isinstance(ids.get(parent), dict):
            continue
        pool = [i for i in ids if i.count("#") == norm.count("#")] or list(ids)
        close = difflib.get_close_matches(norm, pool, n=1, cutoff=0.6)
        hint = f"; did you mean --{close[0]}?" if close else ""
        messages.append(f"unknown override --{key}: no config id {norm!r}{hint}")
    return messages


def check_command_line(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Messages for the override keys of a ``monai.bundle`` command line that no config file defines."""
    from monai.bundle import ConfigParser
    from monai.bundle import scripts as bundle_scripts

    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2:
        return []
    command = getattr(bundle_scripts, argv[1], None)
    if command is None or not callable(command):
        return []
    params = {name for name, p in inspect.signature(command).parameters.items() if p.kind != p.VAR_KEYWORD}
    positional, flags = _parse_flags(argv[2:])
    if "args_file" in flags:  # defaults (config_file, overrides) may come from a file
        try:
            flags = {**{str(k): v for k, v in ConfigParser.load_config_file(flags["args_file"]).items()}, **flags}
        except Exception:
            return []
    flags = {k.replace("-", "_") if k.replace("-", "_") in params else k: v for k, v in flags.items()}
    overrides = [k for k in flags if k not in params]
    # `run show --show "$expr"`: the id being run may be defined on the command line itself
    run_id = flags.get("run_id", positional[0] if positional and argv[1] == "run" else None)
    overrides = [k for k in overrides if k != run_id]
    if "tracking" in flags:  # MONAI's experiment tracking takes its settings as overrides too
        overrides = [k for k in overrides if k not in _TRACKING_KEYS]
    if not overrides or "config_file" not in flags:
        return []
    try:
        config = ConfigParser.load_config_files(_as_file_list(flags["config_file"]))
    except Exception:
        return []  # MONAI reports unreadable config files itself
    return unknown_overrides(overrides, dict(config))


def install() -> None:
    """On a ``monai.bundle`` command line: check the override keys (exit 2 naming the closest id) and install
    the one-line error report. Idempotent; does nothing in other programs."""
    global _installed
    if _installed or not is_bundle_cli():
        return
    _installed = True
    sys.excepthook = _excepthook
    problems = check_command_line()
    if problems:
        sys.stdout.flush()
        for line in problems[:-1]:
            print(f"error: {line}", file=sys.stderr)
        print(f"error: {problems[-1]}", file=sys.stderr, flush=True)
        raise SystemExit(2)
