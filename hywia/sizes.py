"""Sizes and counts typed on a command line: one convention for every flag of hywia.

`hywia serve` passes some sizes on to vLLM and reads others itself, on one command line, so a size
must mean what vLLM's own flags make of it (vLLM's `human_readable_int`):
- a two-letter unit says its base, in any case: 2GB = 2·10⁹ bytes, 2GiB = 2·2³⁰ bytes;
- a one-letter unit is read as vLLM reads it, case-sensitive: lowercase k/m/g/t are decimal
  (2g = 2·10⁹), uppercase K/M/G/T binary (2G = 2·2³⁰), and a binary letter takes whole numbers only;
- a plain integer is bytes.
Parameter counts are always decimal (7B = 7·10⁹ parameters), whatever the case.
"""

from __future__ import annotations

import argparse
import re

from hywia.errors import HywiaError

SIZE_HELP = ("2GiB = 2·2^30 bytes, 2GB = 2·10^9; one letter as vLLM reads it: 2G = 2GiB, 2g = 2GB; "
             "a plain integer is bytes")
COUNT_HELP = "decimal: 3.5B = 3.5·10^9, 350M, 7e9 or a plain integer"

_TWO_LETTER_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                     "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_DECIMAL_LETTERS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY_LETTERS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_COUNT_LETTERS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}


class UnreadableNumber(HywiaError, argparse.ArgumentTypeError, ValueError):
    """A HywiaError that argparse also shows as the flag's own error (with the fix), not a traceback."""


def parse_size(text: str) -> int:
    """'6GiB' → 6442450944, '24GB' → 24·10⁹, '2G' → 2·2³⁰, '2g' → 2·10⁹, '1000' → 1000 (bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if match:
        number, unit = match.groups()
        if unit in _DECIMAL_LETTERS:
            return int(float(number) * _DECIMAL_LETTERS[unit])
        if unit in _BINARY_LETTERS and "." not in number:  # vLLM refuses fractions of binary letters
            return int(number) * _BINARY_LETTERS[unit]
        if unit == "" and "." not in number:
            return int(number)
        if unit.lower() in _TWO_LETTER_UNITS and unit != "":
            return int(float(number) * _TWO_LETTER_UNITS[unit.lower()])
    raise UnreadableNumber(f"cannot read the memory size {text!r}",
                           f"write a number with a unit, e.g. 6GiB, 24GB, 512MiB ({SIZE_HELP})")


def parse_count(text: str) -> int:
    """'3.5B' → 3500000000; also '350M', '7e9', '1200000'."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]?)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _COUNT_LETTERS:
        raise UnreadableNumber(f"cannot read the parameter count {text!r}", "write e.g. 3.5B, 350M or 7e9")
    return int(float(match.group(1)) * _COUNT_LETTERS[unit])
