"""Typed keyword checks and their documentation, shared by the training config and `sample.py`'s options.

A config section forwarded to a constructor (a network, a datamodule, the evaluation callback) is checked against
that constructor's signature and annotations, and `--help` lists its keys with the docstrings' `Args:` entries.
"""

from __future__ import annotations

import ast
import collections.abc
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value; the message names it."""


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass, by field name."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: inspect.cleandoc(b.value.value) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def format_default(value: Any) -> str:
    """A default as it is written on the command line: null, true/false, [a, b], {k: v}, or the value."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_default(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_default(v)}" for k, v in value.items()) + "}"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def arg_docs(cls: type) -> dict[str, str]:
    """The `Args:` entries of the `__init__` docstrings of `cls` and its bases, by name, each on one line; an entry
    "a, b: ..." documents both a and b."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        text = inspect.cleandoc(klass.__dict__["__init__"].__doc__ or "") if "__init__" in klass.__dict__ else ""
        names: list[str] = []
        for line in text.split("Args:", 1)[-1].splitlines() if "Args:" in text else ():
            head, sep, rest = line.strip().partition(": ")
            heads = head.split(", ")
            entry = line.startswith("    ") and not line.startswith("     ") and sep
            if entry and all(h.isidentifier() for h in heads):
                names = heads
                docs.update({h: rest.strip() for h in heads})
            elif names and line.startswith("        "):
                docs.update({h: docs[h] + " " + line.strip() for h in names})
            else:
                names = []
    return docs


def constructor_keys(section: str, target: type, skip: typing.Container[str] = ()) -> list[tuple[str, str, str]]:
    """(key, default, doc) rows for the keyword arguments of a constructor forwarded from config section `section`."""
    docs = arg_docs(target)
    return [(f"{section}.{name}", "required" if p.default is p.empty else format_default(p.default), docs.get(name, ""))
            for name, p in signature_params(target).items() if name not in skip]


def key_docs(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, documentation on one line) of every field of a dataclass schema, sections expanded."""
    docs = field_docs(cls)
    rows: list[tuple[str, str, str]] = []
    for f in fields(cls):
        default = f.default_factory() if f.default is MISSING else f.default
        if is_dataclass(default):
            rows += key_docs(type(default), f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, format_default(default), " ".join(docs.get(f.name, "").split())))
    return rows


def did_you_mean(value: str, valid: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `valid` (in the order given), or '' when none is close."""
    close = difflib.get_close_matches(value, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def suggest(key: str, valid: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid key, or the list of valid keys when none is close."""
    valid = sorted(valid)
    return did_you_mean(key, valid) or f" (valid keys: {', '.join(valid)})"


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def matches_type(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a constructor annotation (ints pass as floats; unknown hints pass)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    if isinstance(hint, type) and issubclass(hint, Path):
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence, typing.Sequence):
        item = args[0] if args and (origin is not tuple or len(args) == 2 and args[1] is Ellipsis) else Any
        return isinstance(value, (list, tuple)) and all(matches_type(v, item) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def signature_params(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword parameters of `cls.__init__`, following `**kwargs` up the base classes."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        sig = inspect.signature(init)
        hints = typing.get_type_hints(init)
        forwards = False
        for name, p in list(sig.parameters.items())[1:]:
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            elif p.kind is not p.VAR_POSITIONAL and name not in params:
                params[name] = p.replace(annotation=hints.get(name, p.annotation))
        if not forwards:
            break
    return params


def check_kwargs(section: str, target: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Raise ConfigError for a key of `kwargs` that `target`'s constructor does not take or a value of the wrong type."""
    params = signature_params(target)
    for key, value in kwargs.items():
        if key not in params:
            raise ConfigError(f"unknown key {section}.{key} for {target.__name__}{suggest(key, params)}")
        hint = params[key].annotation
        if not matches_type(value, hint):
            raise ConfigError(
                f"{section}.{key}={value!r} has type {type(value).__name__}, {target.__name__} expects {_type_name(hint)}"
            )
