"""Numbers for people, never in scientific notation: `hsplit plan`'s table and notes, `hsplit whatif`'s
table and plots.

    seconds(39220)      # '39,220 s (10.9 h)'
    num(86300.4, 4)     # '86,300'          num(0.0000123, 3) -> '0.0000123'

"""
from __future__ import annotations

import math


def num(x: float, digits: int) -> str:
    """`digits` significant digits, thousands separated, never in scientific notation (39,220 not 3.922e+04;
    0.0000123 not 1.23e-05)."""
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    if x == 0 or abs(x) >= 10 ** -4:
        text = f"{x:,.{digits}g}"
        if "e" not in text:
            return text
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:,.{decimals}f}".rstrip("0").rstrip(".")


def seconds(x: float) -> str:
    """Seconds with the unit: `25.58 s`, `1,234 s (20.6 min)`, `39,220 s (10.9 h)`."""
    if abs(x) < 1000:
        return f"{num(x, 4)} s"
    if abs(x) < 3600:
        return f"{x:,.0f} s ({x / 60:.1f} min)"
    return f"{x:,.0f} s ({x / 3600:.1f} h)"
