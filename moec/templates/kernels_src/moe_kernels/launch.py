"""Kernel launches with less host time than ``kernel[grid](...)``.

``kernel[grid](...)`` binds the arguments, derives Triton's specialisation of them, builds a cache
key and looks the compiled kernel up on every call: 35-36 µs a launch on the H200 machine's host
with triton 3.6, against 9.7-9.9 µs for the compiled kernel's own launcher (bench/RESULTS.md,
2026-12-02). An eager expert path at decode sizes makes five launches and is bound by that host
time, not by the GPU. ``launch`` keeps the compiled kernel of each key of its own and calls its
launcher directly from the second call on.

The key holds what Triton 3.6 specialises a compilation on for NVIDIA GPUs, or more: each
tensor's dtype and whether its address is 16-byte aligned; each integer's size class, whether it
is 1 and whether it is a multiple of 16; bools; the constexpr values, the warps and stages, and the
device. A finer key only compiles (once) where Triton would not have needed to, so no kernel is
reused for arguments Triton would have compiled differently. Anything else in the arguments (or
a launch hook installed, as profilers do) takes the ordinary path.

The compiled launcher's calling convention is Triton's internal one: it is used only with the
Triton versions it was checked against (``CHECKED``) on NVIDIA GPUs, never under the interpreter,
and ``MOEC_FAST_LAUNCH=0`` turns it off.
"""

import os

import torch
import triton

from .configs import INTERPRETED

# The Triton releases whose CompiledKernel.run(grid x, y, z, stream, function, packed metadata,
# launch metadata, enter hook, exit hook, *every parameter in order) this was checked with, on
# NVIDIA GPUs (AMD's backend may specialise on more than the key below holds).
CHECKED = ("3.6.",)
ENABLED = (
    not INTERPRETED
    and torch.version.hip is None
    and triton.__version__.startswith(CHECKED)
    and os.environ.get("MOEC_FAST_LAUNCH", "1") != "0"
)

_COMPILED: dict[tuple, tuple] = {}  # key -> (compiled kernel, the constexpr values, in order)
_INT32 = range(-(2**31), 2**31)


def _spec(arg):
    """What of ``arg`` a compilation may depend on (None: unknown, take the ordinary path)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):
        return arg
    if isinstance(arg, int):
        return arg in _INT32, arg >= 2**63, arg == 1, arg % 16 == 0
    if isinstance(arg, float):
        return float
    return None


def _hooked() -> bool:
    """A launch hook is installed (a profiler): the ordinary path calls it. Triton keeps the hooks
    in ``knobs.runtime`` as None or as a chain (``HookChain``) whose ``calls`` may be empty."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:
        return True
    hooks = (runtime.launch_enter_hook, runtime.launch_exit_hook)
    return any(h is not None and bool(getattr(h, "calls", True)) for h in hooks)


def launch(kernel, grid: tuple, *args, num_warps: int, num_stages: int | None = None, **constexprs):
    """``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)``: ``args`` the runtime
    parameters in order, ``constexprs`` every remaining parameter by name."""
    options = {"num_warps": num_warps} | ({} if num_stages is None else {"num_stages": num_stages})
    specs = tuple(map(_spec, args)) if ENABLED else (None,)
    if None in specs or _hooked():
        kernel[grid](*args, **constexprs, **options)
        return
    device = torch.cuda.current_device()
    key = (kernel, device, specs, tuple(constexprs.items()), num_warps, num_stages)
    known = _COMPILED.get(key)
    if known is None:
        compiled = kernel[grid](*args, **constexprs, **options)
        names = kernel.arg_names[len(args) :]
        if compiled is not None and set(names) == set(constexprs):
            _COMPILED[key] = compiled, tuple(constexprs[n] for n in names)
        return
    compiled, tail = known
    x, y, z = (*grid, 1, 1)[:3]
    stream = triton.runtime.driver.active.get_current_stream(device)
    compiled.run(
        x, y, z, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *tail
    )
