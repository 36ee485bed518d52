"""Range checks of command-line values: one rule table per command, one error line per bad value."""

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from src.core.errors import UserError

MAX_SEED = 2**32 - 1  # numpy and Lightning seeds


@dataclass(frozen=True)
class Rule:
    """`flag` (an attribute name, e.g. batch_size) must satisfy `ok`; `expected` says what a good value is."""

    name: str
    ok: Callable[[Any], bool]
    expected: str
    flag: str | None = None  # the flag's spelling when it is not --<name with dashes> (e.g. --classes)


def flag_name(name: str) -> str:
    """batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def check_ranges(values: Any, rules: Iterable[Rule]) -> None:
    """A one-line UserError for the first value of `values` (an object with the rules' names as attributes,
    e.g. parsed flags or a config) that breaks its rule; None values (not given) are not checked."""
    for rule in rules:
        value = getattr(values, rule.name, None)
        if value is not None and not rule.ok(value):
            raise UserError(f"{rule.flag or flag_name(rule.name)} {value}: must be {rule.expected}")


def at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: v >= low


def positive_finite(v: float) -> bool:
    return 0 < v < math.inf


def non_negative_finite(v: float) -> bool:
    return 0 <= v < math.inf


SEED_RULE = Rule("seed", lambda v: 0 <= v <= MAX_SEED, f"a whole number from 0 to {MAX_SEED}")
# the retrieval refinement's flags (train, predict, serve)
REFINE_RULES = [Rule("refine_k", at_least(1), "a number of gallery neighbours >= 1 (e.g. 10)"),
                Rule("refine_gate", lambda v: 0 <= v <= 1, "a cumulative probability in [0, 1] (1: the whole gallery)")]
