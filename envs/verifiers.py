"""Verifiers: the reward of a model's answer against a dataset's reference answer.

A verifier is a function ``(completion: str, answer) -> float`` named in a dataset environment's ``verifier``
kwarg (``envs.dataset.DatasetEnv``):

* ``exact``: 1.0 when the completion, stripped, equals the answer as a string;
* ``numeric``: 1.0 when the last number in the completion equals the answer as a number (``1,234``, ``-3``,
  ``2.50`` and ``5/2`` are numbers; equal within 1e-6 relative);
* ``math``: the ``math-verify`` package (LaTeX and expression equivalence; install ``pip install math-verify``,
  or the project's ``tasks`` extra);
* ``package.module:function``: any function of that signature, imported like a custom environment.

``resolve_verifier(name)`` raises EnvError naming the problem, so a bad name fails at start-up.
"""

from __future__ import annotations

import importlib
import math
import re
from fractions import Fraction
from typing import Any, Callable

from envs import EnvError

Verifier = Callable[[str, Any], float]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def parse_number(text: str) -> Fraction | None:
    """The number a string spells (``1,234``, ``-3``, ``2.50``, ``5/2``), exactly, or None."""
    s = text.strip().replace(",", "")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> Fraction | None:
    """The last number written in ``text`` (see :func:`parse_number`), or None if there is none."""
    found = _NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def exact(completion: str, answer: Any) -> float:
    return 1.0 if completion.strip() == str(answer).strip() else 0.0


def numeric(completion: str, answer: Any) -> float:
    got, want = last_number(completion), parse_number(str(answer))
    if got is None or want is None:
        return 0.0
    return 1.0 if math.isclose(float(got), float(want), rel_tol=1e-6, abs_tol=1e-9) else 0.0


def math_verify(completion: str, answer: Any) -> float:
    from math_verify import parse, verify

    gold = parse(str(answer) if str(answer).startswith("$") else f"${answer}$")
    return 1.0 if verify(gold, parse(completion)) else 0.0


BUILTIN_VERIFIERS: dict[str, Verifier] = {"exact": exact, "numeric": numeric, "math": math_verify}


def resolve_verifier(name: str) -> Verifier:
    """A built-in verifier or ``package.module:function``; EnvError naming the problem otherwise."""
    if name == "math":
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise EnvError("verifier 'math' needs the math-verify package: pip install math-verify "
                           "(or the project's 'tasks' extra)") from None
    if name in BUILTIN_VERIFIERS:
        return BUILTIN_VERIFIERS[name]
    if ":" not in name:
        raise EnvError(f"verifier {name!r}: not a built-in ({', '.join(BUILTIN_VERIFIERS)}) and not an import "
                       "path 'package.module:function'")
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr, None)
    except ImportError as e:
        raise EnvError(f"verifier {name!r}: cannot import module {module_name!r}: {e}") from None
    if not callable(fn):
        raise EnvError(f"verifier {name!r}: module {module_name!r} has no function {attr!r}")
    return fn
