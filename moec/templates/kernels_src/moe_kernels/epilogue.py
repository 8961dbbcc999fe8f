"""Elementwise pieces of the grouped GEMMs: activations, the GLU forms applied in the up GEMM's
epilogue, and the conversion of stored (quantised) weight tiles to the activations' dtype.

Each is a ``@triton.jit`` function inlined into the kernels of ``grouped_gemm``; the plain-torch
definitions they must match are in ``reference`` (``reference.glu``).
"""

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def act(x, ACT: tl.constexpr):
    if ACT == "silu":
        return x * tl.sigmoid(x)
    elif ACT == "gelu":
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACT == "relu":
        return tl.maximum(x, 0.0)
    elif ACT == "relu2":
        r = tl.maximum(x, 0.0)
        return r * r
    else:  # sigmoid
        return tl.sigmoid(x)


@triton.jit
def glu(g, u, limit, alpha, gate_cap, up_cap, ACT: tl.constexpr, FORM: tl.constexpr):
    if FORM == "none":
        return act(g, ACT)
    elif FORM == "standard":
        return act(g, ACT) * u
    elif FORM == "clamp_then_act":
        return act(tl.minimum(g, limit), ACT) * tl.minimum(tl.maximum(u, -limit), limit)
    elif FORM == "act_then_clamp":
        return tl.minimum(act(g, ACT), limit) * tl.minimum(tl.maximum(u, -limit), limit)
    elif FORM == "gpt_oss":
        g = tl.minimum(g, limit)
        return (tl.minimum(tl.maximum(u, -limit), limit) + 1.0) * g * tl.sigmoid(alpha * g)
    else:  # softcap_sigmoid
        return gate_cap * tanh(g / gate_cap) * tl.sigmoid(g) * up_cap * tanh(u / up_cap)


# --------------------------------------------------------------------------------------------------
# Weight tiles
# --------------------------------------------------------------------------------------------------
@triton.jit
def weight_tile(b, dtype, W_INT4: tl.constexpr):
    """A loaded weight tile in the activations' dtype. int4: ``b`` is [BLOCK_K // 2, BLOCK_N] bytes
    holding two values each along K (low nibble = even k, value = nibble - 8); int8 / fp8 e4m3 /
    float: converted as is (int8, int4 and e4m3 values are exact in bf16 / fp16).

    A nibble n becomes a float32 without an int-to-float conversion: the bits 0x4B000000 | n are
    the float 2^23 + n, so one integer OR and one subtraction of 2^23 + 8 give n - 8 (15-20% faster
    int4 layers at T <= 256 on an H200 than converting int8 values; bench/RESULTS.md, 2026-12-01).
    """
    if W_INT4:
        low = (b & 0xF).to(tl.int32) | 0x4B000000
        high = (b >> 4).to(tl.int32) | 0x4B000000
        pairs = tl.permute(tl.join(low, high), (0, 2, 1))  # [BLOCK_K // 2, 2, BLOCK_N]
        bits = tl.reshape(pairs, (2 * b.shape[0], b.shape[1]))
        b = bits.to(tl.float32, bitcast=True) - 8388616.0  # 8388616 = 2^23 + 8
    return b.to(dtype)  # one return: Triton 3.6 rejects a constexpr branch returning another shape
