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


@triton.jit
def act_grad(x, ACT: tl.constexpr):
    """d act(x) / dx (at a kink, the side PyTorch's autograd takes: relu'(0) = 0)."""
    if ACT == "silu":
        s = tl.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    elif ACT == "gelu":  # Φ(x) + x φ(x)
        return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(
            -0.5 * x * x
        )
    elif ACT == "gelu_tanh":
        t = tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        dt = (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
        return 0.5 * (1.0 + t) + 0.5 * x * dt
    elif ACT == "relu":
        return tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == "relu2":
        return 2.0 * tl.maximum(x, 0.0)
    else:  # sigmoid
        s = tl.sigmoid(x)
        return s * (1.0 - s)


@triton.jit
def glu_vjp(g, u, dh, limit, alpha, gate_cap, up_cap, ACT: tl.constexpr, FORM: tl.constexpr):
    """(dg, du): the vector-Jacobian product of ``glu`` at (g, u) with dh (du = 0 for "none").
    Clamps pass the gradient where the input is inside the bounds, ends included (as
    ``torch.clamp``'s backward)."""
    if FORM == "none":
        return dh * act_grad(g, ACT), 0.0 * u
    elif FORM == "standard":
        return dh * u * act_grad(g, ACT), dh * act(g, ACT)
    elif FORM == "clamp_then_act":
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        g_in = tl.where(g <= limit, 1.0, 0.0)
        u_in = tl.where((u >= -limit) & (u <= limit), 1.0, 0.0)
        return dh * uc * act_grad(gc, ACT) * g_in, dh * act(gc, ACT) * u_in
    elif FORM == "act_then_clamp":
        a = act(g, ACT)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        a_in = tl.where(a <= limit, 1.0, 0.0)
        u_in = tl.where((u >= -limit) & (u <= limit), 1.0, 0.0)
        return dh * uc * act_grad(g, ACT) * a_in, dh * tl.minimum(a, limit) * u_in
    elif FORM == "gpt_oss":
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        s = tl.sigmoid(alpha * gc)
        g_in = tl.where(g <= limit, 1.0, 0.0)
        u_in = tl.where((u >= -limit) & (u <= limit), 1.0, 0.0)
        d_glu = s + alpha * gc * s * (1.0 - s)
        return dh * (uc + 1.0) * d_glu * g_in, dh * gc * s * u_in
    else:  # softcap_sigmoid: A(g) B(u), A = gc tanh(g / gc) sigmoid(g), B = uc tanh(u / uc)
        tg = tanh(g / gate_cap)
        tu = tanh(u / up_cap)
        s = tl.sigmoid(g)
        a = gate_cap * tg * s
        da = (1.0 - tg * tg) * s + a * (1.0 - s)
        return dh * up_cap * tu * da, dh * a * (1.0 - tu * tu)


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
