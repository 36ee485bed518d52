"""Range checks of command-line values: one rule table per command, one error line per bad value."""

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from src.core.choices import REFINE_METHODS
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

# what --refine knn does where a checkpoint is read (predict, serve)
KNN_AT_PREDICTION = ("the point from the k nearest locations of the checkpoint's gallery (embedding cosine similarity) "
                     "within its most likely classes")


def add_refine_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                         defaults: tuple[str, int, float] | None = None, knn: str = KNN_AT_PREDICTION) -> None:
    """--refine, --refine-k and --refine-gate (train, predict, serve), checked by REFINE_RULES: `defaults`
    (method, k, gate) for a new run, None for a checkpoint's own settings ("as trained"); `knn` says what
    --refine knn does in the command."""
    method, k, gate = defaults or (None, None, None)
    shown = [f"{value:g}" if isinstance(value, float) else str(value) for value in (method, k, gate)] if defaults \
        else ["as trained"] * 3
    parser.add_argument("--refine", choices=REFINE_METHODS, default=method,
                        help=f"knn: {knn}; none: the head's point (default: {shown[0]})")
    parser.add_argument("--refine-k", type=int, default=k,
                        help="--refine knn: gallery neighbours whose geometric median is the point "
                             f"(default: {shown[1]})")
    parser.add_argument("--refine-gate", type=float, default=gate, metavar="P",
                        help="--refine knn: search the most likely classes up to a cumulative probability of P; 1 for "
                             f"the whole gallery; regression always searches it all (default: {shown[2]})")
