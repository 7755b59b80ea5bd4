"""`python -m kda_ops demo` on the CPU (micro preset, compiled with aot_eager): it runs end to end,
prints a row per decode mode, and exits 0; greedy agreement with eager is reported per mode."""

import subprocess
import sys

from kda_ops.__main__ import _agreement


def test_demo_runs_every_cpu_mode_and_reports_tokens_equal_to_eager(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "kda_ops", "demo", "--device", "cpu", "--max-new-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.split()[:1] in (["eager"], ["compiled"])}
    assert set(rows) == {"eager", "compiled"}, done.stdout
    # fp32 on the CPU: the compiled step (aot_eager) computes what eager does
    assert all(row.endswith("yes") for row in rows.values()), done.stdout


def test_agreement_names_the_earliest_differing_new_token():
    reference = [[1, 2, 3], [4, 5, 6]]
    assert _agreement([[1, 2, 3], [4, 5, 6]], reference) == "yes"
    assert _agreement([[1, 2, 9], [4, 0, 6]], reference) == "no: from new token 1"
