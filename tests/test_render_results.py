"""bench/render_results.py on the committed H100 results and on a hybrid-vs-all-MLA results file:
the README tables between the markers (figures with their hardware), the PNG plots, nothing
outside the markers touched."""

import json
import subprocess
import sys
from pathlib import Path

from matplotlib.image import imread

ROOT = Path(__file__).resolve().parents[1]
RENDER = ROOT / "bench" / "render_results.py"
sys.path.insert(0, str(RENDER.parent))
from render_results import PLOTS, line_plot, load_results, plot_series  # noqa: E402
README = "# title\n\n## Results\n\nintro\n\n<!-- results:begin -->\nstale\n<!-- results:end -->\n\n## After\n"
MACHINE = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0", "kda_ops_commit": "abc1234"}


def render(results: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, str]:
    readme = tmp_path / "README.md"
    readme.write_text(README)
    plots = tmp_path / "plots"
    plots.mkdir()
    run = subprocess.run(
        [sys.executable, str(RENDER), str(results), "--readme", str(readme), "--plots-dir", str(plots)],
        capture_output=True, text=True,
    )
    return run, readme.read_text()


def plotted_lines(results: Path, op: str) -> dict[str, list]:
    """label -> x values of each line in op's plot, drawn from the results as render_results does."""
    x_key, y_key, y_label = PLOTS[op]
    entries = [e for run in load_results(results) for e in run["entries"] if e["op"] == op]
    axes = line_plot(plot_series(entries, x_key, y_key), x_key, y_label, op).axes[0]
    return {line.get_label(): list(line.get_xdata()) for line in axes.get_lines()}


def write_results(folder: Path, name: str, entries: list[dict], machine: dict = MACHINE) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps({"machine_info": machine, "benchmarks": [{"extra_info": e} for e in entries]}))


def test_committed_h100_results(tmp_path):
    run, text = render(ROOT / "bench" / "results" / "h100", tmp_path)
    assert run.returncode == 0, run.stderr
    before, inside = text.split("<!-- results:begin -->")
    inside, after = inside.split("<!-- results:end -->")
    assert before == README.split("<!-- results:begin -->")[0] and after == "\n\n## After\n"
    assert "stale" not in inside
    assert "`kda_decode` — NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0, commit 0c329ad" in inside
    assert "| 64 | 102.1 µs (2.63 TB/s) | 100.8 µs (2.66 TB/s) |" in inside
    assert "| 128 | 32768 | 32 | 1.69 ms (2.86 TB/s, 95.3% of floor) | 20.68 ms (0.234 TB/s, 7.8% of floor) |" in inside
    assert "| 1 | 32768 | 32 | 20.04 ms (19.9 TFLOP/s, 7.6% of floor) | 23.38 ms (17.1 TFLOP/s, 6.52% of floor) |" in inside
    assert "| chunk_kda_fwdbwd | B = 1, T = 8192, H = 16, K = 128, V = 128 | 17.61 s |" in inside
    assert "| 1 | 14.54 ms (69 tok/s) | 502.7 µs (1,989 tok/s) | 930.3 µs (1,075 tok/s) |" in inside
    assert "| mqar | 256 | 100.0% / 100.0% | 300 | 46.8% / 51.4% | – |" in inside
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["chunk_kda_fwd.png", "chunk_kda_fwdbwd.png", "kda_decode.png", "mla_decode.png", "model_decode.png"]
    image = imread(tmp_path / "plots" / "kda_decode.png")
    assert image.shape[:2] == (480, 900) and image.std() > 0  # 9 x 4.8 in at 100 dpi, not blank
    assert sorted(plotted_lines(ROOT / "bench" / "results" / "h100", "kda_decode")) == ["fla T1 H32 K128 V128", "kda_ops T1 H32 K128 V128"]


def decode_entry(model, B, L, ms):
    return {
        "op": "model_decode", "provider": "kda_ops", "mode": "cuda_graph", "model": model,
        "shape": {"B": B, "L": L}, "ms": ms, "ms_per_token": ms / B, "tokens_per_s": B / ms * 1e3,
        "latent_bytes_per_token": 8064 if model == "hybrid" else 31104,
        "kda_state_bytes_per_sequence": 43417600 if model == "hybrid" else 0,
        "longest_context_at_batch_1": 8_000_000 if model == "hybrid" else 2_000_000,
    }


def test_hybrid_vs_all_mla_tables(tmp_path):
    entries = [
        decode_entry("hybrid", 1, 1048576, 12.0),
        decode_entry("hybrid", 8, 1048576, 40.0),
        decode_entry("all_mla", 1, 1048576, 30.0),
        decode_entry("all_mla", 2, 1048576, 60.0),
        {"op": "model_prefill", "provider": "kda_ops", "mode": "eager", "model": "hybrid", "shape": {"B": 1, "T": 32768}, "ms": 1500.0, "tokens_per_s": 21845.3},
        {"op": "model_prefill", "provider": "kda_ops", "mode": "eager", "model": "all_mla", "shape": {"B": 1, "T": 32768}, "ms": 3000.0, "tokens_per_s": 10922.7},
    ]
    write_results(tmp_path / "results", "hybrid_vs_mla.json", entries)
    run, text = render(tmp_path / "results", tmp_path)
    assert run.returncode == 0, run.stderr
    assert "`hybrid_vs_mla` — NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0, commit abc1234" in text
    assert "| hybrid | 8064 | 41.4 MiB | 8,000,000 |" in text
    assert "| 1M | 1 | 1 | 12.00 ms | 12.00 ms | 1 | 30.00 ms | 30.00 ms | 2.50× |" in text
    assert "| 1M | largest | 8 | 40.00 ms | 5.00 ms | 2 | 60.00 ms | 30.00 ms | 6.00× |" in text
    assert "| 32768 | 1.50 s (21,845 tok/s) | 3.00 s (10,923 tok/s) | 2.00× |" in text
    assert (tmp_path / "plots" / "model_decode.png").stat().st_size > 0
    assert len(plotted_lines(tmp_path / "results", "model_decode")) == 4  # two models × (B = 1, largest)


def test_readme_without_markers_is_an_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    run = subprocess.run([sys.executable, str(RENDER), str(ROOT / "bench" / "results" / "h100"), "--readme", str(readme)], capture_output=True, text=True)
    assert run.returncode != 0 and "results:begin" in run.stderr
    assert readme.read_text() == "# no markers\n"


def chunk_entry(provider, B, T, H, ms):
    """A chunk_kda_fwd entry as bench_chunk_kda.py writes it, with its floor at 50 µs per 2048 tokens."""
    floor_ms = 0.05 * B * T / 2048
    return {
        "op": "chunk_kda_fwd", "provider": provider, "shape": {"B": B, "T": T, "H": H, "K": 128, "V": 128},
        "ms": ms, "tflops": 10.0, "floor_ms": floor_ms, "of_floor": floor_ms / ms,
    }


def test_floors_sweep_and_first_calls(tmp_path):
    entries = [chunk_entry(provider, 1, T, 16, ms * T / 2048) for T in (2048, 4096, 8192) for provider, ms in (("kda_ops", 1.0), ("fla", 0.5))]
    entries.append(chunk_entry("kda_ops", 8, 4096, 32, 8.0))
    write_results(tmp_path / "results", "chunk_kda.json", entries, {**MACHINE, "copy_gbps": 2950.0, "matmul_tflops": 745.0})
    first_calls = [
        {"op": "chunk_kda_fwdbwd_first_call", "provider": "kda_ops", "shape": {"B": 1, "T": 8192, "H": 16}, "ms": 21500.0},
        {"op": "mla_decode_first_call", "provider": "kda_ops", "shape": {"B": 1, "L": 4096, "H": 32}, "ms": 3250.0},
    ]
    write_results(tmp_path / "results", "first_call.json", first_calls)
    run, text = render(tmp_path / "results", tmp_path)
    assert run.returncode == 0, run.stderr
    header = "`chunk_kda_fwd` — NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0, commit abc1234 (`chunk_kda.json`)"
    assert header + "; measured in the run: copy 2.95 TB/s, bf16 matmul 745 TFLOP/s\n" in text
    assert "| 1 | 2048 | 16 | 1.00 ms (10 TFLOP/s, 5% of floor) | 500.0 µs (10 TFLOP/s, 10% of floor) |" in text
    assert "| 8 | 4096 | 32 | 8.00 ms (10 TFLOP/s, 10% of floor) | – |" in text
    assert "`first_call` — NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0, commit abc1234 (`first_call.json`)\n" in text
    assert "| chunk_kda_fwdbwd | B = 1, T = 8192, H = 16 | 21.50 s |" in text
    assert "| mla_decode | B = 1, L = 4096, H = 32 | 3.25 s |" in text
    assert (tmp_path / "plots" / "chunk_kda_fwd.png").stat().st_size > 0
    lines = plotted_lines(tmp_path / "results", "chunk_kda_fwd")
    assert sorted(len(xs) for xs in lines.values()) == [1, 3, 3]  # the B1 H16 sweep per provider, one B8 H32 point
    assert "kda_ops B1 H16 K128 V128" in lines and "fla B1 H16 K128 V128" in lines
