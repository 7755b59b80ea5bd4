"""Shared by the benchmark suites: the machine record every results file carries (GPU, torch,
triton, commit; and the ceilings, copy_gbps and matmul_tflops, when a suite measured them), the
`ceilings` fixture and a GPU-only skip."""

import dataclasses
import os
import subprocess

import pytest
import torch
import triton
from common import Ceilings, measure_ceilings

CEILINGS_KEY = pytest.StashKey[Ceilings]()


def _commit() -> str:
    if os.environ.get("KDA_OPS_COMMIT"):
        return os.environ["KDA_OPS_COMMIT"]  # set by runs on machines without the .git folder
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["cuda"] = torch.version.cuda
    machine_info["kda_ops_commit"] = _commit()
    if CEILINGS_KEY in config.stash:
        machine_info.update(dataclasses.asdict(config.stash[CEILINGS_KEY]))


@pytest.fixture(scope="session")
def ceilings(pytestconfig) -> Ceilings:
    """Copy bandwidth and matmul rate measured once per run, before the first test that asks."""
    measured = measure_ceilings()
    pytestconfig.stash[CEILINGS_KEY] = measured
    return measured


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA device")
    for item in items:
        item.add_marker(skip)
