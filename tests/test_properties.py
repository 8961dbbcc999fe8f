"""Properties over Hypothesis-generated specs: valid specs build, deterministically, black-stable, with the
planner's invariants holding and a layer that runs; mutated specs never produce a traceback."""

from __future__ import annotations

import ast

import black
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from moec.cli import main
from moec.codegen import generate
from moec.codegen.render import BLACK_MODE
from moec.errors import SpecError
from moec.plan import run_passes
from moec.spec import parse_spec
from moec.spec.loader import SourceMap

ACTS = ["silu", "gelu", "gelu_tanh", "relu", "relu2", "sigmoid"]


@st.composite
def mlps(draw, **extra):
    kind = draw(st.sampled_from(["glu", "mlp"]))
    m = {
        "ffn": draw(st.integers(1, 24)) * 2,
        "kind": kind,
        "activation": draw(st.sampled_from(ACTS)),
    }
    if kind == "glu":
        form = draw(
            st.sampled_from(
                ["standard", "clamp_then_act", "act_then_clamp", "gpt_oss", "softcap_sigmoid"]
            )
        )
        m["glu"] = form
        if form in ("clamp_then_act", "act_then_clamp", "gpt_oss"):
            m["limit"] = draw(st.sampled_from([1.5, 7.0]))
        if form == "gpt_oss":
            m["alpha"] = 1.702
        if form == "softcap_sigmoid":
            m["gate_softcap"], m["up_softcap"] = 3.0, 5.0
    m["bias"] = draw(st.booleans())
    return m | extra


@st.composite
def specs(draw):
    hidden = draw(st.integers(2, 20)) * 2
    n_groups = draw(st.integers(1, 3))
    groups = []
    for i in range(n_groups):
        dtype = draw(st.sampled_from(["fp32", "bf16", "int8", "int4", "fp8"]))
        groups.append(draw(mlps(name=f"g{i}", count=draw(st.integers(1, 6)), dtype=dtype)))
    n = sum(g["count"] for g in groups)
    kind = draw(
        st.sampled_from(["token_choice", "token_choice", "expert_choice", "switch", "sparsemixer"])
    )
    router: dict = {"kind": kind}
    spec: dict = {"name": "prop", "hidden": hidden, "dtype": "fp32", "experts": groups}
    if kind == "token_choice":
        zero = draw(st.integers(0, 2))
        if zero:
            spec["zero_experts"] = zero
        router["top_k"] = draw(st.integers(1, min(4, n + zero)))
        router["score"] = draw(st.sampled_from(["softmax", "sigmoid", "sqrtsoftplus"]))
        router["topk_on"] = draw(st.sampled_from(["scores", "logits"]))
        router["selection_bias"] = draw(st.sampled_from(["none", "scores", "logits"]))
        norm = draw(st.sampled_from(["none", "sum", "pnorm"]))
        router["normalize"] = {"kind": norm, "p": 1.0} if norm == "pnorm" else norm
        router["scale"] = draw(st.sampled_from([1.0, 2.5]))
        divisors = [d for d in range(2, n + 1) if n % d == 0 and n // d >= 2]
        if not zero and divisors and draw(st.booleans()):
            count = draw(st.sampled_from(divisors))
            per = n // count
            keep = draw(st.integers(-(-router["top_k"] // per), count))
            router["groups"] = {
                "count": count,
                "keep": keep,
                "score": draw(st.sampled_from(["top2_sum", "max"])),
                "masked": draw(st.sampled_from(["-inf", "0"])),
            }
        if draw(st.booleans()):
            spec["capacity"] = {
                "factor": draw(st.sampled_from([0.5, 1.0, 2.0])),
                "drop": draw(st.sampled_from(["position", "probs"])),
                "scope": draw(st.sampled_from(["batch", "sequence"])),
            }
    elif kind == "expert_choice":
        router["top_k"] = draw(st.integers(1, n))
        spec["capacity"] = {"factor": 1.0}
    elif kind == "switch":
        router["top_k"] = 1
        spec["capacity"] = {"tokens": draw(st.integers(1, 4)), "scope": "sequence"}
    else:
        router["top_k"] = 2
        router["sparsemixer_eps"] = draw(st.sampled_from([0.01, 0.5]))
        if n < 2:
            spec["experts"][0]["count"] = 2
    router["linear_bias"] = draw(st.booleans())
    spec["router"] = router
    if draw(st.booleans()):
        spec["shared"] = draw(mlps(gate=draw(st.sampled_from([None, "sigmoid_linear"]))))
    if draw(st.booleans()):
        spec["balance"] = {
            "aux_loss": 0.01,
            "z_loss": 0.001,
            "seq_aux_loss": draw(st.sampled_from([0.0, 0.001])),
        }
    if draw(st.booleans()):
        spec["weight_on"] = "input"
    if draw(st.booleans()):
        spec["latent"] = {"dim": hidden // 2 + hidden // 2 % 2, "bias": draw(st.booleans())}
    ep = draw(st.sampled_from([1, 2, 4]))
    if ep <= n:
        spec["parallel"] = {"dp": ep, "ep": ep}
        spec["cluster"] = {"gpus_per_node": ep}
    return spec


def _parse(data: dict):
    return parse_spec(yaml.safe_load(yaml.safe_dump(data)), SourceMap("<prop>"))


@given(specs())
def test_valid_specs_build_deterministically_and_black_stable(data):
    spec = _parse(data)
    plan = run_passes(spec)  # checks the planner's invariants after every pass
    placed = sorted(e for ids in plan.placement.layers[0].ranks for e in ids)
    assert placed == list(range(plan.dims.experts))
    a, b = generate(spec), generate(spec)
    assert a == b
    for path, data_ in a.items():
        if path.endswith(".py"):
            text = data_.decode()
            assert black.format_str(text, mode=BLACK_MODE) == text, path
            ast.parse(text)
            assert "@generated by moec" in text.splitlines()[0]


@settings(max_examples=12)
@given(specs())
def test_generated_layer_runs(data):
    torch = pytest.importorskip("torch")
    from tests.genutil import build_package

    spec = _parse(data)
    pkg = build_package(spec)
    torch.manual_seed(0)
    layer = pkg.MoELayer()
    x = torch.randn(2, 5, spec.hidden, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@st.composite
def mutated(draw):
    data = draw(specs())
    for _ in range(draw(st.integers(1, 4))):
        node, key = data, None
        while True:  # walk down to a random leaf or container
            keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            if isinstance(node[key], (dict, list)) and draw(st.booleans()):
                node, key = node[key], None  # an empty container ends the walk with no key
                continue
            break
        action = draw(st.sampled_from(["delete", "junk", "unknown"]))
        if key is None or action == "unknown":
            if isinstance(node, dict):
                node[draw(st.text(min_size=1, max_size=8))] = draw(JUNK)
        elif action == "delete":
            del node[key]
        else:
            node[key] = draw(JUNK)
    return data


@given(mutated())
def test_mutated_specs_never_traceback(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "spec.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["build", str(path), "-o", str(path.parent / "out"), "--check"])
    assert code in (0, 1, 2), err.getvalue()
    assert "Traceback" not in err.getvalue()
    if code == 2:
        with pytest.raises(SpecError):
            _parse(data)
