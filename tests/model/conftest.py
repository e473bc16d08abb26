"""Model tests run on the plain-PyTorch kernels (fast on CPU); a test marked `triton_interpreter` runs the
Triton kernels under TRITON_INTERPRET=1 instead."""

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "triton_interpreter: runs bertforge's Triton kernels in Triton's interpreter")


@pytest.fixture(autouse=True)
def model_kernels(request, monkeypatch):
    if request.node.get_closest_marker("triton_interpreter"):
        monkeypatch.delenv("BERTFORGE_KERNELS", raising=False)
    else:
        request.getfixturevalue("reference_kernels")
