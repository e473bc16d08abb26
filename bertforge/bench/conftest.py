"""Shared by every benchmark suite: the CUDA device fixture and the per-group ratio report.

Run on a GPU:  pytest bertforge/bench/bench_kernels.py --benchmark-enable
(pytest.ini passes --benchmark-disable by default, so a plain `pytest` only checks that the suites collect.)
"""

import os

import pytest
import torch

from bertforge.bench.ratios import ratio_table

_GROUPS = pytest.StashKey[list]()


def pytest_addoption(parser):
    group = parser.getgroup("bertforge methods", "the method experiments of bench_methods.py")
    group.addoption("--methods-scale", default="small", choices=["small", "tiny"],
                    help="small: the README's CPU-sized experiments; tiny: seconds, to check the harness")
    group.addoption("--methods-out", default=None, help="folder for the experiments' reports and plots")


@pytest.fixture
def cuda_device():
    """torch.device("cuda"); GPU-only cases skip without one, or when Triton's interpreter is switched on."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The kernel tests' conftest sets it: Triton kernels would then run on the host, so timings mean nothing.
        pytest.skip("TRITON_INTERPRET=1 runs Triton on the host; run the benchmarks on their own")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def cpu_reference_kernels():
    """CPU suites time bertforge on its reference ops (what it runs on a CPU), never on Triton's interpreter, even
    when a test run switched it on."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BERTFORGE_KERNELS", "reference")
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_benchmark_group_stats(config, benchmarks, group_by):
    outcome = yield
    config.stash[_GROUPS] = outcome.get_result()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """After pytest-benchmark's tables: each group's providers with their time as a ratio to bertforge's."""
    table = ratio_table(config.stash.get(_GROUPS, []))
    if table:
        terminalreporter.write_sep("-", "ratios against bertforge, same run")
        terminalreporter.write_line(table)
