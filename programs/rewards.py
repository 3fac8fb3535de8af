"""Reward functions of `ft-prog run grpo`: built-in verifiable rewards and a user's own, as plain functions.

Every reward function has the signature ``score(prompts, completions, **columns) -> list[float | None]``:
``prompts`` and ``completions`` are lists of strings (one per completion; a prompt repeats for each completion of
its group), ``columns`` the other columns of each completion's data row (lists as long as ``completions``).
``None`` means no reward for that completion (it gets no advantage unless another function scores it).

Built-ins (chosen in the config by name, with their arguments from ``[reward]``):

- ``exact_match``: 1.0 if the stripped completion equals the stripped reference (``reward.reference_column``).
- ``contains``: 1.0 if the completion contains the stripped reference.
- ``regex``: 1.0 if the stripped completion matches ``reward.pattern`` in full (dot matches newlines): a format.
- ``numeric``: 1.0 if the completion's answer (its last ``\\boxed{...}`` if it has one, else its last number)
  equals the reference number within ``reward.tolerance``; None when the reference is not a number.
- ``length``: ``-max(0, characters - reward.target_length) / reward.target_length``: a penalty past a target.

A user's function is named ``"path/to/file.py:function"``: the config names the file explicitly and the program
prints that it runs it; nothing else in a config ever imports code.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import numbers
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .run_guard import RunError

RewardFn = Callable[..., list]
BUILTIN = ("exact_match", "contains", "regex", "numeric", "length")


def exact_match(prompts, completions, *, reference: Sequence[str], **_) -> list[float]:
    return [float(c.strip() == str(r).strip()) for c, r in zip(completions, reference)]


def contains(prompts, completions, *, reference: Sequence[str], **_) -> list[float]:
    return [float(str(r).strip() in c) for c, r in zip(completions, reference)]


def regex(prompts, completions, *, pattern: str, **_) -> list[float]:
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def answer_number(completion: str) -> float | None:
    """The completion's answer: the last ``\\boxed{...}`` (if it holds a number), else its last number."""
    boxed = _BOXED.findall(completion)
    if boxed:
        value = _as_number(boxed[-1])
        if value is not None:
            return value
    numbers = _NUMBER.findall(completion)
    return _as_number(numbers[-1]) if numbers else None


def numeric(prompts, completions, *, reference: Sequence[str], tolerance: float = 1e-6, **_) -> list[float | None]:
    out: list[float | None] = []
    for c, r in zip(completions, reference):
        want = _as_number(str(r)) if not isinstance(r, (int, float)) else float(r)
        if want is None:
            want = answer_number(str(r))  # GSM8K's answers end with "#### 42"
        got = answer_number(c)
        out.append(None if want is None else float(got is not None and math.isclose(got, want, rel_tol=0,
                                                                                     abs_tol=tolerance)))
    return out


def length(prompts, completions, *, target_length: int, **_) -> list[float]:
    return [-max(0, len(c) - target_length) / target_length for c in completions]


_BUILTINS = {"exact_match": exact_match, "contains": contains, "regex": regex, "numeric": numeric, "length": length}


def load_user_function(spec: str) -> RewardFn:
    """The function ``name`` of the Python file ``path`` in ``"path:name"`` (RunError naming what is wrong)."""
    path, _, name = spec.rpartition(":")
    file = Path(path)
    if not path or not name or file.suffix != ".py":
        raise RunError(f"reward.functions: {spec!r} is neither a built-in ({', '.join(BUILTIN)}) nor "
                       "'path/to/file.py:function'")
    if not file.is_file():
        raise RunError(f"reward.functions: {spec!r}: no such file {file}")
    module_spec = importlib.util.spec_from_file_location(f"ftprog_user_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: any error in it is theirs to see
        raise RunError(f"reward.functions: importing {file} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RunError(f"reward.functions: {file} has no function {name!r}")
    try:
        inspect.signature(fn).bind(["p"], ["c"])
    except TypeError:
        raise RunError(f"reward.functions: {spec}: the function must take (prompts, completions, **columns); "
                       f"its signature is {name}{inspect.signature(fn)}") from None
    return fn


def build(functions: Sequence[str], reward_cfg: Any, say=print) -> list[tuple[str, RewardFn]]:
    """``[(name, function)]`` of the configured reward functions, built-in arguments bound from ``reward_cfg``."""
    out = []
    for spec in functions:
        if spec in _BUILTINS:
            fn = _BUILTINS[spec]
            kwargs = {"pattern": reward_cfg.pattern, "tolerance": reward_cfg.tolerance,
                      "target_length": reward_cfg.target_length}
            if spec == "regex" and not reward_cfg.pattern:
                raise RunError("reward.functions: 'regex' needs reward.pattern (the format a completion must match)")
            out.append((spec, _bound(fn, kwargs, reward_cfg.reference_column)))
        else:
            say(f"reward: running {spec} (a Python file named in the config)", flush=True)
            out.append((spec, load_user_function(spec)))
    return out


def _bound(fn: RewardFn, kwargs: dict, reference_column: str) -> RewardFn:
    def scored(prompts, completions, **columns):
        if fn in (exact_match, contains, numeric) and reference_column not in columns:
            raise RunError(f"reward {fn.__name__}: the data has no column {reference_column!r} "
                           f"(reward.reference_column); columns: {', '.join(sorted(columns)) or 'none'}")
        return fn(prompts, completions, reference=columns.get(reference_column), **kwargs)

    scored.__name__ = fn.__name__
    return scored


def score(functions: list[tuple[str, RewardFn]], prompts: list[str], completions: list[str],
          columns: dict[str, list], where: list[str]) -> list[list[float]]:
    """``[function][completion]`` rewards (NaN for None). A function that raises, returns the wrong number of
    values or a non-number is a RunError naming it and the row (``where``: each completion's ``file:line``)."""
    out = []
    for name, fn in functions:
        try:
            values = fn(list(prompts), list(completions), **columns)
        except RunError:
            raise
        except Exception as e:
            raise RunError(f"reward function {name} raised {type(e).__name__}: {e} (on the rows "
                           f"{', '.join(dict.fromkeys(where))})") from e
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise RunError(f"reward function {name} returned {got} values for {len(completions)} completions "
                           f"(rows {', '.join(dict.fromkeys(where))})")
        row = []
        for value, at in zip(values, where):
            if value is None:
                row.append(float("nan"))
            elif isinstance(value, numbers.Real):
                row.append(float(value))
            else:
                raise RunError(f"reward function {name} returned {value!r} for the completion of {at}: expected a "
                               "number or None")
        out.append(row)
    return out
