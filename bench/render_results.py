"""Renders benchmark results (pytest-benchmark JSON with DESIGN.md's extra_info) into README tables
and PNG plots.

    python bench/render_results.py bench/results/h100 [--readme README.md] [--plots-dir DIR]

Every JSON file under the results folder that holds "benchmarks" becomes one table per op, headed
by the file's GPU, torch, triton and commit (and the copy bandwidth and matmul rate measured in
that run, where recorded); rows are shapes, columns providers (and modes), a cell the median time
with its derived figure and, where the entry has one, its share of the floor (floor_ms / ms). The
first calls of every op (ops named *_first_call) share one table per file. Entries of the
hybrid-vs-all-MLA suite (extra_info "model") get their own side-by-side table; the synthetic-task
training runs (synthetic/*.json, from bench/synthetic/train.py) one table of final accuracies per
gate kind. The tables replace what stands between README_BEGIN
and README_END in the README. PNG plots (matplotlib's Agg canvas through its object API, no
pyplot state) go to the plots folder (default: the results folder): speed against sequence length
or batch over a log2 axis, one line per provider and remaining shape.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

README_BEGIN = "<!-- results:begin -->"
README_END = "<!-- results:end -->"
DERIVED = (("tflops", "TFLOP/s", 1.0, ".3g"), ("gbps", "TB/s", 1e-3, ".3g"), ("tokens_per_s", "tok/s", 1.0, ",.0f"))
# op -> (x shape key, y extra_info key, y axis label)
PLOTS = {
    "chunk_kda_fwd": ("T", "tflops", "TFLOP/s"),
    "chunk_kda_fwdbwd": ("T", "tflops", "TFLOP/s"),
    "kda_decode": ("B", "gbps", "GB/s"),
    "mla_decode": ("B", "gbps", "GB/s"),
    "model_decode": ("L", "ms_per_token", "ms per output token"),
}


def load_results(folder: Path) -> list[dict]:
    """[{"file", "machine", "entries"}] for each pytest-benchmark JSON file, sorted by name."""
    runs = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if "benchmarks" not in data:
            continue
        runs.append({"file": path.name, "machine": data["machine_info"], "entries": [b["extra_info"] for b in data["benchmarks"]]})
    return runs


def hardware_line(run: dict) -> str:
    m = run["machine"]
    line = f"{m.get('gpu')}, torch {m.get('torch')}, triton {m.get('triton')}, commit {m.get('kda_ops_commit')} (`{run['file']}`)"
    if "copy_gbps" in m:
        line += f"; measured in the run: copy {m['copy_gbps'] * 1e-3:.3g} TB/s, bf16 matmul {m['matmul_tflops']:.3g} TFLOP/s"
    return line


def format_ms(ms: float) -> str:
    if ms < 1:
        return f"{ms * 1e3:.1f} µs"
    if ms < 1000:
        return f"{ms:.2f} ms"
    return f"{ms / 1e3:.2f} s"


def format_cell(entry: dict) -> str:
    """The median time, then in brackets the entry's first derived figure and its share of the floor."""
    derived = next((f"{entry[key] * scale:{spec}} {unit}" for key, unit, scale, spec in DERIVED if key in entry), None)
    floor = f"{entry['of_floor'] * 100:.3g}% of floor" if "of_floor" in entry else None
    figures = ", ".join(f for f in (derived, floor) if f)
    return format_ms(entry["ms"]) + (f" ({figures})" if figures else "")


def format_tokens(n: int) -> str:
    return f"{n // 2**20}M" if n % 2**20 == 0 else f"{n // 2**10}k" if n % 2**10 == 0 else str(n)


def variant(entry: dict) -> str:
    return " ".join(str(entry[key]) for key in ("provider", "mode") if key in entry)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def op_table(entries: list[dict]) -> str:
    """Rows: the shape keys that vary (the constant ones go into a caption); columns: variants."""
    keys = list(dict.fromkeys(k for e in entries for k in e["shape"]))
    constant = {k: entries[0]["shape"].get(k) for k in keys if len({str(e["shape"].get(k)) for e in entries}) == 1}
    varying = [k for k in keys if k not in constant]
    variants = list(dict.fromkeys(variant(e) for e in entries))
    cells = defaultdict(dict)
    for e in entries:
        cells[tuple(str(e["shape"].get(k)) for k in varying)][variant(e)] = format_cell(e)
    rows = [list(shape) + [by_variant.get(v, "–") for v in variants] for shape, by_variant in cells.items()]
    caption = ", ".join(f"{k} = {v}" for k, v in constant.items())
    return (caption + "\n\n" if caption else "") + markdown_table(varying + variants, rows)


def first_call_table(entries: list[dict]) -> str:
    """Rows: op and shape; columns: providers."""
    providers = list(dict.fromkeys(e["provider"] for e in entries))
    cells = defaultdict(dict)
    for e in entries:
        shape = ", ".join(f"{k} = {v}" for k, v in e["shape"].items())
        cells[(e["op"].removesuffix("_first_call"), shape)][e["provider"]] = format_ms(e["ms"])
    rows = [[op, shape] + [by_provider.get(p, "–") for p in providers] for (op, shape), by_provider in cells.items()]
    return "Fresh process, empty Triton cache: one call including JIT compilation.\n\n" + markdown_table(["op", "shape"] + providers, rows)


def table_of(entry: dict) -> str:
    """The table an entry goes into: its op, or one of the two that gather several ops."""
    if "model" in entry:
        return "hybrid_vs_mla"
    return "first_call" if entry["op"].endswith("_first_call") else entry["op"]


def hybrid_tables(entries: list[dict]) -> str:
    """Hybrid vs all-MLA side by side: decode per (L, batch), prefill per T, computed bytes."""
    by_model = {name: [e for e in entries if e["model"] == name] for name in ("hybrid", "all_mla")}
    decode = defaultdict(dict)
    prefill = defaultdict(dict)
    for name, model_entries in by_model.items():
        for e in model_entries:
            if e["op"] == "model_decode":
                batch = "1" if e["shape"]["B"] == 1 else "largest"
                decode[(e["shape"]["L"], batch)][name] = e
            else:
                prefill[e["shape"]["T"]][name] = e
    out = []
    memory = [
        [name, str(m[0]["latent_bytes_per_token"]), f"{m[0]['kda_state_bytes_per_sequence'] / 2**20:.1f} MiB", f"{m[0]['longest_context_at_batch_1']:,}"]
        for name, m in by_model.items()
        if m and "latent_bytes_per_token" in m[0]
    ]
    if memory:
        out.append("Computed from shapes: cached bytes per token, fixed KDA state per sequence, longest context at batch 1 in the free memory.\n")
        out.append(markdown_table(["model", "bytes/token", "KDA state/sequence", "longest context (B = 1)"], memory))
    rows = []
    for (L, batch), pair in sorted(decode.items()):
        row = [format_tokens(L), batch]
        for name in ("hybrid", "all_mla"):
            e = pair.get(name)
            row += ["–"] * 3 if e is None else [str(e["shape"]["B"]), format_ms(e["ms"]), format_ms(e["ms_per_token"])]
        both = len(pair) == 2
        row.append(f"{pair['all_mla']['ms_per_token'] / pair['hybrid']['ms_per_token']:.2f}×" if both else "–")
        rows.append(row)
    if rows:
        out.append("\nMeasured decode (CUDA graph, context declared in the cache; B: batch, computed largest where 'largest'):\n")
        header = ["L", "batch", "hybrid B", "hybrid step", "hybrid per token", "all-MLA B", "all-MLA step", "all-MLA per token", "all-MLA / hybrid"]
        out.append(markdown_table(header, rows))
    rows = []
    for T, pair in sorted(prefill.items()):
        times = [format_cell(pair[name]) if name in pair else "–" for name in ("hybrid", "all_mla")]
        ratio = f"{pair['all_mla']['ms'] / pair['hybrid']['ms']:.2f}×" if len(pair) == 2 else "–"
        rows.append([str(T)] + times + [ratio])
    if rows:
        out.append("\nMeasured prefill, batch 1, eager:\n")
        out.append(markdown_table(["T", "hybrid", "all-MLA", "all-MLA / hybrid"], rows))
    return "\n".join(out)


def render_markdown(runs: list[dict]) -> str:
    sections = []
    for run in runs:
        by_table = defaultdict(list)
        for e in run["entries"]:
            by_table[table_of(e)].append(e)
        for table, entries in by_table.items():
            render = {"hybrid_vs_mla": hybrid_tables, "first_call": first_call_table}.get(table, op_table)
            sections.append(f"`{table}` — {hardware_line(run)}\n\n{render(entries)}")
    return "\n\n".join(sections)


def synthetic_table(runs: list[dict]) -> str:
    """Rows: task and training length; per gate kind: final held-out token accuracy at the training
    length and at twice it, and the first evaluated step at 99%."""
    gates = list(dict.fromkeys(run["gate"] for run in runs))
    cells = defaultdict(dict)
    for run in runs:
        final = run["curve"][-1]["eval"]
        accuracy = [f"{final[str(L)]['accuracy'] * 100:.1f}%" for L in run["eval_lengths"]]
        steps = run["steps_to_converge"]
        cells[(run["task"], run["seq_len"])][run["gate"]] = [" / ".join(accuracy), "–" if steps is None else str(steps)]
    rows = [[task, str(T)] + [c for g in gates for c in by_gate.get(g, ["–", "–"])] for (task, T), by_gate in sorted(cells.items())]
    header = ["task", "T"] + [h for g in gates for h in (f"{g} gate: accuracy at T / 2T", f"{g} gate: steps to 99%")]
    settings = ", ".join(sorted({f"T={r['seq_len']}: {r['args']['steps']} steps of batch {r['args']['batch_size']}" for r in runs}))
    return f"{settings}; {'+'.join(runs[0]['layers'])} layers, {runs[0]['args']['heads']} heads of dim {runs[0]['args']['head_dim']}, bf16, compiled.\n\n" + markdown_table(header, rows)


def load_synthetic(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(folder.glob("synthetic/*.json"))]


def replace_between_markers(text: str, content: str) -> str:
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"README needs {README_BEGIN} followed by {README_END}")
    return text[: begin + len(README_BEGIN)] + "\n" + content + "\n" + text[end:]


def line_plot(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, title: str) -> Figure:
    """One line with markers per series over a log2 x axis ticked at the data's x values, y from 0,
    the legend right of the axes."""
    figure = Figure(figsize=(9, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, points in sorted(series.items()):
        xs, ys = zip(*sorted(points))
        axes.plot(xs, ys, marker="o", label=label)
    xs = sorted({x for points in series.values() for x, _ in points})
    axes.set_xscale("log", base=2)
    axes.set_xticks(xs, [f"{x:g}" for x in xs])
    axes.minorticks_off()
    axes.set_ylim(bottom=0)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return figure


def plot_series(entries: list[dict], x_key: str, y_key: str) -> dict[str, list[tuple[float, float]]]:
    """One series per variant (and model) and per value of the other shape keys."""
    series = defaultdict(list)
    for e in entries:
        if x_key not in e["shape"] or y_key not in e:
            continue
        if "model" in e:  # the hybrid suite: its largest batch differs per model and context
            rest = ["B1" if e["shape"]["B"] == 1 else "largest batch"]
        else:
            rest = [f"{k}{v}" for k, v in e["shape"].items() if k != x_key]
        label = " ".join([e.get("model", ""), variant(e)] + rest).strip()
        series[label].append((e["shape"][x_key], e[y_key]))
    return dict(series)


def write_plots(runs: list[dict], folder: Path) -> list[Path]:
    written = []
    for op, (x_key, y_key, y_label) in PLOTS.items():
        entries = [e for run in runs for e in run["entries"] if e["op"] == op]
        series = plot_series(entries, x_key, y_key)
        if not series:
            continue
        machine = next(run["machine"] for run in runs if any(e["op"] == op for e in run["entries"]))
        title = f"{op} — {machine.get('gpu')}, torch {machine.get('torch')}, triton {machine.get('triton')}"
        path = folder / f"{op}.png"
        line_plot(series, x_key, y_label, title).savefig(path, dpi=100)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="bench/results/<gpu> folder of pytest-benchmark JSON files")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    parser.add_argument("--plots-dir", type=Path, help="where the PNG plots go (default: the results folder)")
    args = parser.parse_args()
    runs = load_results(args.results)
    markdown = render_markdown(runs)
    synthetic = load_synthetic(args.results)
    if synthetic:
        machine = synthetic[0]["machine"]
        markdown += (f"\n\nSynthetic tasks (training) — {machine['device']}, torch {machine['torch']}, triton {machine['triton']}, "
                     f"commit {machine['kda_ops_commit']} (`synthetic/`)\n\n{synthetic_table(synthetic)}")
    args.readme.write_text(replace_between_markers(args.readme.read_text(), markdown))
    for path in write_plots(runs, args.plots_dir or args.results):
        print(path)


if __name__ == "__main__":
    main()
