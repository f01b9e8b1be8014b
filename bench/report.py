"""The comparison table: one row per workload, a group of columns per server, and ratios."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loadgen import RunSummary

OURS = "pensieve"
RATIO_BASELINES = ("llama-server", "llama-cpp-python")


@dataclass(frozen=True, slots=True)
class Table:
    """Header cells (may hold a newline) and rows of already formatted cells."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str]


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pair(low: float | None, high: float | None) -> str:
    return f"{_num(low)}/{_num(high)}"


def _throughput(summary: RunSummary) -> str:
    flag = "*" if summary.num_failed or summary.num_short else ""
    return f"{summary.output_tok_s:.1f}{flag}"


SERVER_COLUMNS: tuple[tuple[str, Callable[[RunSummary], str]], ...] = (
    ("out tok/s", _throughput),
    ("TTFT p50/p99 ms", lambda s: _pair(s.ttft_p50_ms, s.ttft_p99_ms)),
    ("TPOT p50 ms", lambda s: _num(s.tpot_p50_ms, 1)),
    ("ITL p50/p99 ms", lambda s: _pair(s.itl_p50_ms, s.itl_p99_ms)),
)


def _ratio(results: dict[str, dict[int, RunSummary]], baseline: str, concurrency: int) -> str:
    ours = results.get(OURS, {}).get(concurrency)
    theirs = results.get(baseline, {}).get(concurrency)
    if ours is None or theirs is None or theirs.output_tok_s <= 0:
        return "-"
    return f"{ours.output_tok_s / theirs.output_tok_s:.2f}x"


def _share(summary: RunSummary | None, ceiling: float | None) -> str:
    if summary is None or not ceiling:
        return "-"
    return f"{summary.output_tok_s / ceiling:.2f}"


def _workload_cell(concurrency: int, results: dict[str, dict[int, RunSummary]]) -> str:
    counts = {s[concurrency].num_requests for s in results.values() if concurrency in s}
    return f"c={concurrency} n={'/'.join(str(n) for n in sorted(counts))}"


def _notes(results: dict[str, dict[int, RunSummary]], skipped: dict[str, str]) -> list[str]:
    notes = []
    for server, runs in results.items():
        for concurrency, s in sorted(runs.items()):
            if s.num_failed or s.num_short:
                error = f" ({s.first_error})" if s.first_error else ""
                notes.append(
                    f"* {server} c={concurrency}: {s.num_failed} failed, "
                    f"{s.num_short} shorter than max_tokens{error}"
                )
    notes += [f"{server}: skipped - {reason}" for server, reason in skipped.items()]
    return notes


def build_table(
    title: str,
    results: dict[str, dict[int, RunSummary]],
    concurrencies: list[int],
    skipped: dict[str, str],
    extra_notes: list[str] | None = None,
    ceilings: dict[int, float] | None = None,
) -> Table:
    """Lay the results out; servers without results get no columns. `ceilings`: llama.cpp's
    own output tok/s on each workload's shape (ceilings.workload_ceiling), with each server's
    share of it."""
    servers = [name for name in results if results[name]]
    headers = ["workload"] + [
        f"{server}\n{label}" for server in servers for label, _ in SERVER_COLUMNS
    ]
    baselines = [b for b in RATIO_BASELINES if OURS in servers and b in servers]
    headers += [f"{OURS}/\n{b}\nout tok/s" for b in baselines]
    if ceilings:
        headers += ["llama.cpp\nceiling\nout tok/s"]
        headers += [f"{server}/\nceiling" for server in servers]
    rows = []
    for c in concurrencies:
        row = [_workload_cell(c, results)]
        for server in servers:
            summary = results[server].get(c)
            row += [render(summary) if summary else "-" for _, render in SERVER_COLUMNS]
        row += [_ratio(results, b, c) for b in baselines]
        if ceilings:
            ceiling = ceilings.get(c)
            row.append(_num(ceiling, 1))
            row += [_share(results[server].get(c), ceiling) for server in servers]
        rows.append(row)
    return Table(title, headers, rows, _notes(results, skipped) + (extra_notes or []))


def render_plain(table: Table) -> str:
    """Fixed-width text, header cells split over two lines."""
    header_lines = [h.split("\n") for h in table.headers]
    depth = max(len(h) for h in header_lines)
    header_rows = [[h[i] if i < len(h) else "" for h in header_lines] for i in range(depth)]
    all_rows = header_rows + table.rows
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(table.headers))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    out = [table.title, *(line(r) for r in header_rows), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in table.rows]
    return "\n".join(out + table.notes)


def render_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table, for pasting into bench/README.md."""
    headers = [h.replace("/\n", "/").replace("\n", " ") for h in table.headers]
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(row) + " |" for row in table.rows]
    return "\n".join(out + [""] + [f"- {note}" for note in table.notes])


def print_table(table: Table) -> None:
    """Print with rich when it is installed, else as plain text."""
    try:
        from rich.console import Console
        from rich.table import Table as RichTable
    except ImportError:
        print(render_plain(table))
        return
    rich_table = RichTable(title=table.title)
    for index, header in enumerate(table.headers):
        rich_table.add_column(header, justify="left" if index == 0 else "right", overflow="fold")
    for row in table.rows:
        rich_table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped to a file: use the table's natural width
        console = Console(width=1000)
    console.print(rich_table)
    for note in table.notes:
        console.print(note, markup=False, highlight=False)
