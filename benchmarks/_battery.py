"""What the two bad-input batteries (`bad_inputs_llm.py`, `bad_inputs_sim.py`) share: the outcome kinds and
the printed / markdown report."""

from __future__ import annotations

import time
from collections import Counter

GOOD = ("clear error", "recovered")
BAD = ("traceback", "silently accepted", "data lost", "unclear error", "other")


def stderr_outcome(stderr: str, lost: str | None) -> tuple[list[str], tuple[str, str] | None]:
    """(the non-empty stderr lines, the outcome if it is already decided): a traceback anywhere, then data lost
    (`lost`: why, from the input's post-check) outrank everything else."""
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    last = lines[-1] if lines else ""
    if "Traceback (most recent call last)" in stderr:
        return lines, ("traceback", last)
    if lost:
        return lines, ("data lost", lost)
    return lines, None


def report(kinds: list[str], rows: list[tuple], t0: float, out: str, title: str, setting: str,
           columns: tuple[str, ...]) -> int:
    """Print the count of each outcome; with `out`, write `rows` (one tuple of cell texts per input, in the
    order of `columns`) as a markdown table under `title`. Returns 1 if any outcome is bad, else 0."""
    counts = Counter(kinds)
    print(f"\n{len(kinds)} bad inputs in {time.time() - t0:.0f} s:")
    for kind in (*GOOD, *BAD):
        print(f"  {kind:17s} {counts.get(kind, 0)}")
    if out:
        with open(out, "w") as f:
            f.write(f"# {title}\n\n")
            f.write(f"{len(kinds)} inputs, {setting}, {time.time() - t0:.0f} s. Counts: "
                    + ", ".join(f"{k} {counts.get(k, 0)}" for k in (*GOOD, *BAD)) + ".\n\n")
            f.write("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
            for row in rows:
                f.write("| " + " | ".join(str(c).replace("|", "/")[:300] for c in row) + " |\n")
    return 1 if any(counts.get(k) for k in BAD) else 0
