"""Every citation of the spec in the repository resolves to an id of docs/theory.md or docs/practice.md.

The checker (`check_text`, `check_repository`) scans the repository's own text files (git-tracked ones plus
untracked files that git does not ignore) and reports

* citations of an id that the docs do not define (a dangling id), and
* references to files outside the repository (the old external copies of the spec), or to theory.md /
  practice.md under any path other than the in-repo one.

What counts as a citation (each pattern is case-insensitive and reads whole numbers only, so "identity 1e-10"
or "S11_token" inside a longer word is no citation; lists may span line breaks):

====================  ===============================================================  ==================
pattern               examples                                                         id looked up
====================  ===============================================================  ==================
``P_SECTION``         "docs/theory.md section 4", "theory.md sections 3, 6, 7",          theory / practice
                      "practice.md sections 1-2", "theory section 2". "section N" is      ``## N.``
                      counted ONLY when attached to theory/practice, so "RTO section 5"
                      (the paper's own section) is no citation.
``P_DOC_ID``          "docs/theory.md S13", "theory.md's S11", "theory.md S12, S13",    ``| SN |`` row,
                      "docs/theory.md I9", "docs/practice.md INV13"                      ``### IN.``,
                                                                                         ``### INVN.``
``P_PREDICTION``      "prediction S13", "predictions S1, S2, S3", "predictions S12-S14"  ``| SN |`` row
``P_IDENTITY``        "identity 9", "Identity 5", "identities 1-10" (always theory)      ``### IN.``
``P_INVARIANT``       "invariant 13", "invariants 8 and 12", "invariants 1-18" (always   ``### INVN.``
                      practice)
``P_TEST_NAME``       ``test_inv13_whitening``, ``test_inv01_zero_kl`` (leading zeros     ``### INVN.``
                      dropped)
====================  ===============================================================  ==================

Lists: numbers (or S/I/INV ids, each with its prefix) joined by ",", "and" or a range "a-b" (expanded).
Files outside the repository: ``P_OUTSIDE`` matches "../shared", "/work/shared" and "shared/docs". Every
mention of ``theory.md`` / ``practice.md`` must name the in-repo file: either ``docs/theory.md`` (the
repository-root convention used in code and READMEs) or a relative path that resolves to it from the citing
file (a link ``(theory.md)`` inside ``docs/`` or ``(../docs/practice.md)`` in ``rto_llm/README.md``).

Not scanned: the two docs themselves, and this file (its fake citations are the checker's test data).
"""

from __future__ import annotations

import posixpath
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = {"theory": "docs/theory.md", "practice": "docs/practice.md"}
SCANNED_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".toml")
NOT_SCANNED = {*DOCS.values(), "tests/test_docs_ids.py"}

# --------------------------------------------------------------------------- ids the docs define
# theory.md and practice.md: "## 4. Title"; theory.md: "### I9. Title", table row "| S13 | ..."; practice.md:
# "### INV13. Title".
D_SECTION = re.compile(r"^## (\d+)\. ", re.M)
D_IDENTITY = re.compile(r"^### I(\d+)\. ", re.M)
D_PREDICTION = re.compile(r"^\| S(\d+) \|", re.M)
D_INVARIANT = re.compile(r"^### INV(\d+)\. ", re.M)


def defined_ids(theory: str, practice: str) -> dict[tuple[str, str], set[int]]:
    """The ids defined by the text of docs/theory.md and docs/practice.md, keyed by (doc, kind)."""
    def ints(rx, text):
        return {int(n) for n in rx.findall(text)}
    return {
        ("theory", "section"): ints(D_SECTION, theory),
        ("theory", "identity"): ints(D_IDENTITY, theory),
        ("theory", "prediction"): ints(D_PREDICTION, theory),
        ("practice", "section"): ints(D_SECTION, practice),
        ("practice", "invariant"): ints(D_INVARIANT, practice),
    }


# --------------------------------------------------------------------------- citations
SEP = r"\s*(?:,\s*and|,|and|-|\u2013)\s*"          # list separators: ",", ", and", "and", "-" (range), en dash
# A list of whole numbers ("7, 9, 10,\n13", "1 and 4", "1-18"): never part of "1e-10" or "2x"; after the
# first, at most two digits, so "section 2, 240 instances" cites section 2 only.
NUM_LIST = r"\d+(?!\w)(?:" + SEP + r"\d{1,2}(?!\w))*"
DOC = r"\b(?P<doc>theory|practice)(?:\.md)?(?:'s)?"  # "theory", "theory.md", "docs/theory.md's"


def _id_list(prefix: str) -> str:
    one = rf"{prefix}\d+(?![A-Za-z0-9])"             # "S13", "S11_token" (the check name starts with S11)
    return rf"{one}(?:{SEP}{one})*"                  # "S1-S5, S7": every element carries its prefix


P_SECTION = re.compile(rf"{DOC}\s+sections?\s+(?P<nums>{NUM_LIST})", re.I)
P_DOC_ID = re.compile(rf"{DOC}\s+(?P<ids>{_id_list('INV')}|{_id_list('S')}|{_id_list('I')})", re.I)
P_PREDICTION = re.compile(rf"\bpredictions?\s+(?P<ids>{_id_list('S')})", re.I)
P_IDENTITY = re.compile(rf"\bidentit(?:y|ies)\s+(?P<nums>{NUM_LIST})", re.I)
P_INVARIANT = re.compile(rf"\binvariants?\s+(?P<nums>{NUM_LIST})", re.I)
P_TEST_NAME = re.compile(r"\btest_inv0*(?P<num>\d+)_")
P_OUTSIDE = re.compile(r"(?:\.\./)+shared\b|/work/shared\b|\bshared/docs\b")
P_DOC_FILE = re.compile(r"(?P<path>[\w./-]*?)\b(?P<name>theory|practice)\.md\b")

ID_KIND = {"S": "prediction", "I": "identity", "INV": "invariant"}


@dataclass(frozen=True)
class Citation:
    doc: str      # "theory" | "practice"
    kind: str     # "section" | "identity" | "prediction" | "invariant"
    number: int
    line: int
    text: str     # the matched text, for the report


def expand(items: str) -> list[int]:
    """'7, 9, 10' -> [7, 9, 10]; 'S1-S5, S7' -> [1, 2, 3, 4, 5, 7]; '1 and 4' -> [1, 4]; a backward range
    'b-a' (b > a) gives both ends only."""
    out: list[int] = []
    for part in re.split(r"\s*(?:,\s*and|,|\band\b)\s*", items):
        ends = [int(n) for n in re.findall(r"\d+", part)]
        if len(ends) == 2 and ends[0] <= ends[1]:
            out.extend(range(ends[0], ends[1] + 1))
        else:
            out.extend(ends)
    return out


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def find_citations(text: str) -> list[Citation]:
    """Every spec citation in `text` (see the module docstring for the patterns)."""
    found: list[Citation] = []

    def add(doc: str, kind: str, numbers: list[int], m: re.Match) -> None:
        snippet = " ".join(m.group(0).split())
        found.extend(Citation(doc, kind, n, _line(text, m.start()), snippet) for n in numbers)

    for m in P_SECTION.finditer(text):
        add(m["doc"].lower(), "section", expand(m["nums"]), m)
    for m in P_DOC_ID.finditer(text):
        # the id is looked up in the file it is attached to: "practice.md S3" is reported as a dangling
        # practice prediction, since S ids live in theory.md only
        add(m["doc"].lower(), ID_KIND[re.match(r"[A-Za-z]+", m["ids"])[0].upper()], expand(m["ids"]), m)
    for m in P_PREDICTION.finditer(text):
        add("theory", "prediction", expand(m["ids"]), m)
    for m in P_IDENTITY.finditer(text):
        add("theory", "identity", expand(m["nums"]), m)
    for m in P_INVARIANT.finditer(text):
        add("practice", "invariant", expand(m["nums"]), m)
    for m in P_TEST_NAME.finditer(text):
        add("practice", "invariant", [int(m["num"])], m)
    return found


def check_text(text: str, ids: dict[tuple[str, str], set[int]], path: str = "README.md") -> list[str]:
    """Problems in one file's text: dangling ids, references outside the repository, and theory.md /
    practice.md named under a path that is not the in-repo file. `path` is the file's repository path."""
    problems = []
    for c in find_citations(text):
        if c.number not in ids.get((c.doc, c.kind), set()):
            problems.append(f"{path}:{c.line}: {c.doc} {c.kind} {c.number} is not defined in "
                            f"{DOCS[c.doc]} ({c.text!r})")
    for m in P_OUTSIDE.finditer(text):
        problems.append(f"{path}:{_line(text, m.start())}: reference outside the repository ({m.group(0)!r})")
    for m in P_DOC_FILE.finditer(text):
        target = DOCS[m["name"].lower()]
        relative = posixpath.normpath(posixpath.join(posixpath.dirname(path), m["path"] + target.split("/")[1]))
        if m["path"] != "docs/" and relative != target:
            problems.append(f"{path}:{_line(text, m.start())}: {m.group(0)!r} does not name the in-repo "
                            f"{target}")
    return problems


def repository_files(root: Path = REPO) -> list[str]:
    """Tracked files plus untracked, non-ignored ones (repository-relative, posix), scanned suffixes only."""
    names: set[str] = set()
    for extra in ([], ["--others", "--exclude-standard"]):
        out = subprocess.run(["git", "ls-files", *extra], cwd=root, capture_output=True, text=True, check=True)
        names.update(out.stdout.splitlines())
    return sorted(n for n in names if n.endswith(SCANNED_SUFFIXES) and n not in NOT_SCANNED
                  and (root / n).is_file())


def check_repository(root: Path = REPO) -> list[str]:
    ids = defined_ids(*((root / DOCS[d]).read_text(encoding="utf-8") for d in ("theory", "practice")))
    problems = []
    for name in repository_files(root):
        problems += check_text((root / name).read_text(encoding="utf-8", errors="replace"), ids, name)
    return problems


# =========================================================================== tests
@pytest.fixture(scope="module")
def ids():
    return defined_ids(*((REPO / DOCS[d]).read_text(encoding="utf-8") for d in ("theory", "practice")))


def test_docs_define_the_numbered_ids(ids):
    """Every id from 1 up to the largest is defined (no gaps), and at least the ids that existed when this test was
    written (new ids are appended by other work, so the upper ends only grow)."""
    least = {("theory", "section"): 11, ("theory", "identity"): 10, ("theory", "prediction"): 19,
             ("practice", "section"): 5, ("practice", "invariant"): 18}
    for key, n in least.items():
        assert ids[key] == set(range(1, max(ids[key]) + 1)), (key, sorted(ids[key]))
        assert max(ids[key]) >= n, (key, sorted(ids[key]))


def test_repository_citations_resolve():
    problems = check_repository()
    assert not problems, "dangling spec citations:\n" + "\n".join(problems)


def test_the_scan_sees_the_citing_files():
    files = repository_files()
    for name in ("README.md", "rto_sim/identities.py", "tests/rto_llm/ppo/test_invariants.py",
                 "tests/rto_sim/core/test_core.py"):
        assert name in files
    assert not NOT_SCANNED & set(files)


@pytest.mark.parametrize("text, dangling", [
    ("see docs/theory.md S99 for details", "theory prediction 99"),
    ("pinned by docs/practice.md invariant 42", "practice invariant 42"),
    ("docs/theory.md section 12", "theory section 12"),
    ("docs/practice.md sections 1-6", "practice section 6"),
    ("as identity 91 says", "theory identity 91"),
    ("identities 90-92", "theory identity 92"),
    ("prediction S95 (not yet defined)", "theory prediction 95"),
    ("predictions S92-S96", "theory prediction 96"),
    ("docs/theory.md I0", "theory identity 0"),
    ("docs/practice.md INV19", "practice invariant 19"),
    ("invariants 7, 9, 10,\n 13, 16, 19", "practice invariant 19"),
    ("def test_inv19_extra_check():", "practice invariant 19"),
    ("def test_inv0_zero():", "practice invariant 0"),
])
def test_dangling_ids_are_reported(ids, text, dangling):
    problems = check_text(text, ids)
    assert any(dangling in p for p in problems), problems


@pytest.mark.parametrize("text", [
    "the spec is in ../shared/docs/theory.md",
    "copied from /work/shared/docs/practice.md",
    "see shared/docs for the spec",
])
def test_references_outside_the_repository_are_reported(ids, text):
    problems = check_text(text, ids)
    assert any("outside the repository" in p for p in problems), problems


@pytest.mark.parametrize("path, text, ok", [
    ("rto_sim/mdp.py", "The token MDP (theory.md section 1).", False),     # bare name outside docs/
    ("rto_sim/mdp.py", "The token MDP (docs/theory.md section 1).", True),
    ("README.md", "[theory](docs/theory.md)", True),
    ("rto_llm/README.md", "[practice](../docs/practice.md)", True),
    ("rto_llm/README.md", "[practice](../practice.md)", False),
    ("docs/sim_x.md", "[theory](theory.md)", True),                        # relative link inside docs/
    ("docs/sim_x.md", "see docs/theory.md S4", True),
])
def test_doc_files_must_be_the_in_repo_ones(ids, path, text, ok):
    problems = check_text(text, ids, path)
    assert (not problems) == ok, problems


def test_lists_and_ranges_are_expanded():
    got = {(c.doc, c.kind, c.number) for c in find_citations(
        "pins practice.md invariants 7, 9, 10,\n13, 16, 17; predictions S1-S3, S7 and theory.md sections 1 and 4; "
        "docs/theory.md S12, S13; identities 1-3; `test_inv01_zero_kl_at_init`")}
    assert got == {("practice", "invariant", n) for n in (7, 9, 10, 13, 16, 17, 1)} | {
        ("theory", "prediction", n) for n in (1, 2, 3, 7, 12, 13)} | {
        ("theory", "section", n) for n in (1, 4)} | {("theory", "identity", n) for n in (1, 2, 3)}


@pytest.mark.parametrize("text", [
    "RTO section 5 ablations",                      # the paper's own section
    "in practice, section 3 of the paper",
    "see Section 7 of Gao et al.",
    "the S1 and S12 rows",                          # bare prediction ids are not parsed
    "an ADS1115 chip, PS2 port, S11_token_paper_lower",
    "the identity matrix; identities of the MDP",
    "identity 1e-10 away",                          # not a whole number
    "invariant under padding; invariance 5",
    "test_invariants.py and test_inventory_1_x",
    "practice.md",                                  # a file name alone cites no id
])
def test_no_false_positives(text):
    assert find_citations(text) == []


def test_a_clean_text_passes(ids):
    text = ("docs/theory.md section 11, identity 9, identities 1-10, prediction S14, docs/theory.md I10; "
            "docs/practice.md section 5, invariants 1-18, docs/practice.md INV13, test_inv18_resume_bitwise")
    assert check_text(text, ids) == []
