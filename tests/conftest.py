"""Shared pytest setup: the --update-golden switch and the Hypothesis profiles."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_configure(config):
    # On CPU runs (everything but `-m gpu`) Triton kernels execute under its interpreter. Triton
    # decides interpreter-or-GPU when a kernel is decorated, so this must be set before any test
    # module imports triton, and stay set for the whole run.
    if config.option.markexpr.strip() != "gpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="rewrite generated/ and tests/errors/*.expected from the current code",
    )
