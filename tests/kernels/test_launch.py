"""``moe_kernels.launch``: when a launch reuses a compiled kernel and when it takes Triton's own path.

The direct launcher only runs on a GPU with a checked Triton (tests/gpu covers it for real); here a
stand-in kernel records which path each call took and what the compiled launcher was given.
"""

import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "moec/templates/kernels_src"))

from moe_kernels import launch as launch_mod  # noqa: E402

PARAMS = ["x_ptr", "n", "scale", "MODE", "BLOCK"]  # the stand-in kernel's parameters


class FakeKernel:
    """A ``@triton.jit`` kernel's interface: ``arg_names``, ``kernel[grid](...)`` -> compiled."""

    def __init__(self, arg_names=PARAMS):
        self.arg_names = arg_names
        self.jit_calls, self.runs = [], []

    def __getitem__(self, grid):
        def jit(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            return SimpleNamespace(
                run=lambda *a: self.runs.append(a), function="fn", packed_metadata="meta"
            )

        return jit


@pytest.fixture
def fast(monkeypatch):
    """The direct path switched on as on a GPU: current device 0, stream 7, no hooks."""
    monkeypatch.setattr(launch_mod, "ENABLED", True)
    monkeypatch.setattr(launch_mod, "_COMPILED", {})
    monkeypatch.setattr(launch_mod, "_hooked", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    driver = SimpleNamespace(active=SimpleNamespace(get_current_stream=lambda device: 7))
    monkeypatch.setattr(launch_mod.triton.runtime, "driver", driver)


def call(kernel, x, n, scale=0.5, grid=(3,), **options):
    """Launch the stand-in (x_ptr, n, scale; MODE "a", BLOCK 16, 4 warps unless ``options``)."""
    options = dict(BLOCK=16, MODE="a", num_warps=4) | options
    launch_mod.launch(kernel, grid, x, n, scale, **options)


def test_second_call_runs_the_compiled_kernel_with_every_parameter_in_order(fast):
    kernel = FakeKernel()
    x = torch.zeros(64)
    call(kernel, x, 32)
    assert len(kernel.jit_calls) == 1 and not kernel.runs
    call(kernel, x, 48, grid=(5, 2))  # another grid and size of the same specialisation
    assert len(kernel.jit_calls) == 1
    (run,) = kernel.runs
    # grid x, y, z; stream; function; metadata; no launch metadata or hooks; the parameters in
    # declaration order, constexprs included (MODE comes before BLOCK there)
    assert run == (5, 2, 1, 7, "fn", "meta", None, None, None, x, 48, 0.5, "a", 16)


@pytest.mark.parametrize(
    "second",
    [
        dict(n=32),  # a multiple of 16 (17 is not)
        dict(n=1),  # Triton makes a 1 a constant
        dict(n=2**40 + 1),  # a 64-bit integer
        dict(x=torch.zeros(65)[1:]),  # a 4-byte offset: no 16-byte alignment
        dict(x=torch.zeros(64, dtype=torch.float64)),
        dict(num_stages=3),
        dict(BLOCK=32),
    ],
)
def test_what_triton_specialises_on_compiles_again(fast, second):
    kernel = FakeKernel()
    first = dict(x=torch.zeros(64), n=17)
    call(kernel, **first)
    call(kernel, **(first | second))
    assert len(kernel.jit_calls) == 2 and not kernel.runs


def test_numbers_triton_does_not_tell_apart_share_a_kernel(fast):
    kernel = FakeKernel()
    x = torch.zeros(64)
    for n in (17, 33, 1000):
        call(kernel, x, n, scale=float(n))
    assert len(kernel.jit_calls) == 1 and len(kernel.runs) == 2


def test_other_arguments_hooks_and_unchecked_tritons_take_the_ordinary_path(fast, monkeypatch):
    kernel = FakeKernel()
    x = torch.zeros(64)
    for _ in range(2):  # an argument the key does not know (a string): never cached
        call(kernel, x, "n")
    # a parameter left to its default is not in the call: the compiled kernel is not kept
    partial = FakeKernel([*PARAMS, "EXTRA"])
    for _ in range(2):
        call(partial, x, 32)
    monkeypatch.setattr(launch_mod, "_hooked", lambda: True)
    for _ in range(2):
        call(kernel, x, 32)
    monkeypatch.setattr(launch_mod, "_hooked", lambda: False)
    monkeypatch.setattr(launch_mod, "ENABLED", False)
    for _ in range(2):
        call(kernel, x, 32)
    assert len(kernel.jit_calls) == 6 and len(partial.jit_calls) == 2
    assert not kernel.runs and not partial.runs


def test_hooks_count_only_when_something_is_hooked(monkeypatch):
    """Triton's hooks are None or a chain of calls (empty unless a profiler added one)."""
    runtime = launch_mod.triton.knobs.runtime
    for empty in (None, SimpleNamespace(calls=[])):
        monkeypatch.setattr(runtime, "launch_enter_hook", empty)
        monkeypatch.setattr(runtime, "launch_exit_hook", empty)
        assert not launch_mod._hooked()
    monkeypatch.setattr(runtime, "launch_exit_hook", SimpleNamespace(calls=[print]))
    assert launch_mod._hooked()
    monkeypatch.setattr(runtime, "launch_exit_hook", print)
    assert launch_mod._hooked()


def test_off_under_the_interpreter_and_for_unchecked_tritons():
    assert not launch_mod.ENABLED  # this CPU run interprets the kernels
    assert all(v.endswith(".") for v in launch_mod.CHECKED)  # "3.6." does not match "3.60"
