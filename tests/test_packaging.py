"""The installed package: kernels/ and meta/ live under kda_ops, importing registers the ops and
does nothing else."""

import subprocess
import sys
import textwrap


def _run_outside_tree(code: str, tmp_path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_subpackages_are_installed_under_kda_ops(tmp_path):
    out = _run_outside_tree(
        """
        import importlib.util
        import kda_ops, kda_ops.kernels, kda_ops.meta
        print(importlib.util.find_spec("kernels") is None or "kda_ops" not in (importlib.util.find_spec("kernels").origin or ""))
        print(importlib.util.find_spec("meta") is None)
        """,
        tmp_path,
    )
    assert out.split() == ["True", "True"]


def test_import_registers_ops_and_prints_nothing(tmp_path):
    out = _run_outside_tree(
        """
        import torch
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config
        before = (dynamo_config.get_config_copy(), inductor_config.get_config_copy())
        import kda_ops
        for name in ("chunk_kda_fwd", "chunk_kda_bwd", "kda_decode", "mla_decode"):
            assert hasattr(torch.ops.kda, name), name
        assert (dynamo_config.get_config_copy(), inductor_config.get_config_copy()) == before
        """,
        tmp_path,
    )
    assert out == ""
