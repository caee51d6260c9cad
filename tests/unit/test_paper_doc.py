"""docs/paper.md, the paper reference the code cites: every `docs/paper.md §N` in the repository
names a section that exists, and the page holds every registry variant with the numbers the
registry quotes (lab/model/variants.py)."""

import re
from pathlib import Path

import pytest

from lab.model.variants import VARIANTS, Variant

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "docs" / "paper.md"
# The one citation form docs/paper.md §1 defines: the path, a space, the section sign, a number.
SIGN = "\u00a7"  # written as an escape where a test spells a bad reference, which the scan skips
REFERENCE = re.compile(r"docs/paper\.md " + SIGN + r"(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^(##|###) (\d+(?:\.\d+)?)\.? ", re.MULTILINE)
SCANNED = ("lab", "tests", "docs", "ablations", "README.md")
SCANNED_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml"}
MINUS = "\u2212"  # the page writes negative numbers with a real minus sign


def paper_text() -> str:
    return PAPER.read_text(encoding="utf-8")


def section_numbers(text: str) -> list[str]:
    return [number for _, number in HEADING.findall(text)]


def dangling_references(text: str, sections: set[str]) -> list[str]:
    """The section numbers `text` cites in the docs/paper.md form that `sections` lacks."""
    return [number for number in REFERENCE.findall(text) if number not in sections]


def scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        else:
            files += [p for p in path.rglob("*") if p.is_file() and p.suffix in SCANNED_SUFFIXES
                      and "__pycache__" not in p.parts]
    return sorted(files)


def section_body(text: str, number: str) -> str:
    """The text of section `number`, up to the next heading of the same or a higher level."""
    level = "##" if "." not in number else "###"
    start = re.search(rf"^{level} {re.escape(number)}\.? .*$", text, re.MULTILINE)
    assert start, f"docs/paper.md has no section {number}"
    stop = "^## " if level == "##" else "^##"
    end = re.compile(stop, re.MULTILINE).search(text, start.end())
    return text[start.end():end.start() if end else len(text)]


def table_rows(body: str) -> list[list[str]]:
    """The cells of every markdown table row in `body` (header and rule rows included)."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in body.splitlines() if line.startswith("|")]


def table_section(text: str, table: int) -> str:
    """The number of the §9 subsection that holds the paper's Table `table`."""
    match = re.search(rf"^### (9\.\d+) Table {table}:", text, re.MULTILINE)
    assert match, f"docs/paper.md §9 has no subsection for Table {table}"
    return match.group(1)


def number_cell(value: float | None, digits: int | None = 3) -> str:
    """How the page writes a registry number: fixed digits (PPL, scores) or as short as
    possible (parameters in millions, M-Act); a real minus sign; blank for none."""
    if value is None:
        return ""
    text = f"{value:.{digits}f}" if digits is not None else f"{value:g}"
    return text.replace("-", MINUS)


# --- sections and references ----------------------------------------------------------

def test_sections_are_numbered_once_and_in_order():
    numbers = section_numbers(paper_text())
    top = [int(n) for n in numbers if "." not in n]
    assert top == list(range(1, len(top) + 1)) and len(top) >= 13
    assert len(numbers) == len(set(numbers))
    for parent in top:
        subs = [int(n.split(".")[1]) for n in numbers if n.startswith(f"{parent}.")]
        assert subs == list(range(1, len(subs) + 1)), f"§{parent}: subsections {subs}"


def test_every_reference_in_the_repository_names_a_section():
    sections = set(section_numbers(paper_text()))
    found, dangling = 0, []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        found += len(REFERENCE.findall(text))
        dangling += [f"{path.relative_to(ROOT)}: docs/paper.md §{n}"
                     for n in dangling_references(text, sections)]
    assert not dangling, "references to sections docs/paper.md does not have:\n" + "\n".join(dangling)
    # docs/paper-citations.md alone points every citation in lab/ at a section, so a scan
    # that finds fewer has stopped reading the files it should.
    assert found >= 100


def test_a_reference_to_a_missing_section_is_caught():
    sections = set(section_numbers(paper_text()))
    text = f"see docs/paper.md {SIGN}4.2 and docs/paper.md {SIGN}4.9, then docs/paper.md {SIGN}14."
    assert dangling_references(text, sections) == ["4.9", "14"]
    assert "4.2" in sections


def test_every_citation_in_the_citation_list_points_somewhere():
    """Each row of docs/paper-citations.md has at least one target in the checked form."""
    rows = [row for row in table_rows((ROOT / "docs" / "paper-citations.md").read_text("utf-8"))
            if row[0].startswith("`")]
    assert len(rows) >= 80
    untargeted = [row[0] for row in rows if not REFERENCE.search(row[2])]
    assert not untargeted


# --- the registry in the page ---------------------------------------------------------

@pytest.mark.parametrize("slug", list(VARIANTS))
def test_every_registry_variant_is_in_the_page(slug):
    assert f"`{slug}`" in paper_text()


def registry_rows() -> dict[str, list[str]]:
    rows = {}
    for row in table_rows(section_body(paper_text(), "5")):
        slug = row[0].strip("`")
        if row[0].startswith("`"):
            assert slug not in rows, f"{slug} listed twice in §5"
            rows[slug] = row
    return rows


@pytest.mark.parametrize("slug", list(VARIANTS))
def test_section_5_row_quotes_the_registry(slug):
    """slug | paper | computes | PPL | ΔPPL | added (M), as `Variant` holds them."""
    variant: Variant = VARIANTS[slug]
    row = registry_rows().get(slug)
    assert row is not None, f"{slug} has no row in the tables of docs/paper.md §5"
    _, paper, computes, ppl, delta, added = row
    assert paper == variant.paper
    assert computes
    assert ppl == number_cell(variant.paper_ppl)
    assert delta == number_cell(variant.paper_delta_ppl)
    assert added == number_cell(variant.paper_added_m, digits=None)


def test_section_5_lists_nothing_the_registry_lacks():
    assert set(registry_rows()) == set(VARIANTS)


PAPER_ROW = re.compile(r"^T(\d)-(\d+)$")


@pytest.mark.parametrize("slug", [s for s, v in VARIANTS.items() if PAPER_ROW.match(v.paper)])
def test_paper_table_row_holds_the_registry_numbers(slug):
    """The registry's `paper` row ("T4-6") is that row of the page's copy of the table, with
    the variant's slug (the dense Table 2 names models, not slugs) and its PPL."""
    variant = VARIANTS[slug]
    table, row_number = PAPER_ROW.match(variant.paper).groups()
    text = paper_text()
    rows = {row[0]: row for row in table_rows(section_body(text, table_section(text, int(table))))}
    row = rows.get(row_number)
    assert row is not None, f"Table {table} has no row {row_number} in docs/paper.md"
    if table != "2":
        assert row[1] == f"`{slug}`"
    assert number_cell(variant.paper_ppl) in row


@pytest.mark.parametrize("table", [1, 3, 4, 6])
def test_moe_table_rows_agree_with_the_registry(table):
    """Every slug-named row of the MoE tables carries that variant's PPL (the same model
    appears in several tables); Table 4's rows also its gate mean, M-Act and F-Attn."""
    text = paper_text()
    body = section_body(text, table_section(text, table))
    header, *rows = [row for row in table_rows(body) if not set(row[0]) <= {"-"}]
    named = [row for row in rows if row[1].startswith("`")]
    assert named
    for row in named:
        variant = VARIANTS[row[1].strip("`")]
        assert row[header.index("PPL")] == number_cell(variant.paper_ppl), row
        if table == 4:
            assert row[header.index("gate mean")] == number_cell(variant.paper_gate_mean)
            assert row[header.index("M-Act")] == number_cell(variant.paper_max_activation, None)
            assert row[header.index("F-Attn")] == number_cell(variant.paper_first_token_attn)
