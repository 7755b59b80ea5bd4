"""Plots the curves that train.py writes: one column per (task, training length), training loss on
top, held-out accuracy below (solid at the training length, dashed at the longer eval lengths), one
colour per model variant (gate kind and layer stack). matplotlib is optional: without it nothing is
drawn.

Usage: python bench/synthetic/plot_curves.py --out curves.png run1.json run2.json ...
"""

import argparse
import json
import os


def variant(run: dict) -> str:
    return f"{run['gate']} gate, {'+'.join(run['layers'])}"


def plot_runs(runs: list[dict], path: str | os.PathLike) -> bool:
    """Draws runs into the PNG at path; returns False (and draws nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    columns = sorted({(run["task"], run["seq_len"]) for run in runs})
    variants = sorted({variant(run) for run in runs})
    colours = {name: f"C{i}" for i, name in enumerate(variants)}
    fig, axes = plt.subplots(2, len(columns), figsize=(4.5 * len(columns), 7), squeeze=False)
    for column, (task, seq_len) in enumerate(columns):
        loss_ax, accuracy_ax = axes[0][column], axes[1][column]
        for run in (r for r in runs if (r["task"], r["seq_len"]) == (task, seq_len)):
            trained = [point for point in run["curve"] if point["train_loss"] is not None]
            colour = colours[variant(run)]
            loss_ax.plot([p["step"] for p in trained], [p["train_loss"] for p in trained], color=colour, label=variant(run))
            for length in run["eval_lengths"]:
                accuracy = [p["eval"][str(length)]["accuracy"] for p in run["curve"]]
                style = "-" if length == seq_len else "--"
                accuracy_ax.plot(
                    [p["step"] for p in run["curve"]], accuracy, style, color=colour, label=f"{variant(run)}, T={length}"
                )
        loss_ax.set(title=f"{task}, trained at T={seq_len}", ylabel="training loss", yscale="log")
        accuracy_ax.set(xlabel="step", ylabel="held-out token accuracy", ylim=(0, 1.02))
        loss_ax.legend(fontsize=7)
        accuracy_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("runs", nargs="+", help="JSON files written by train.py")
    args = parser.parse_args(argv)
    runs = []
    for name in args.runs:
        with open(name) as f:
            runs.append(json.load(f))
    if not plot_runs(runs, args.out):
        raise SystemExit("plot_curves: matplotlib is not installed; nothing drawn")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
