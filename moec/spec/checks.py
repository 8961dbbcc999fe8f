"""Rules that relate several fields of a spec.

Each rule yields ``(path, message, hint)``; ``moec.spec.load`` turns them into diagnostics that point at
the YAML. Rules are plain functions listed in ``RULES`` so each reads on its own.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from moec.spec.schema import MLP, Spec

Problem = tuple[tuple[str | int, ...], str, str | None]


def _mlp_rules(mlp: MLP, path: tuple) -> Iterator[Problem]:
    needs_limit = {"clamp_then_act", "act_then_clamp", "gpt_oss"}
    if mlp.kind == "mlp" and mlp.glu != "standard":
        yield path + (
            "glu",
        ), f"a plain MLP has no GLU form (got {mlp.glu!r})", "remove glu or set kind: glu"
    if mlp.glu in needs_limit and mlp.limit is None:
        yield path + ("limit",), f"glu {mlp.glu!r} needs a clamp limit", "e.g. limit: 7.0"
    if mlp.glu not in needs_limit and mlp.limit is not None:
        yield path + (
            "limit",
        ), f"limit is only used by the clamped GLU forms (glu is {mlp.glu!r})", None
    if mlp.glu == "gpt_oss" and mlp.alpha is None:
        yield path + ("alpha",), "glu 'gpt_oss' needs alpha", "gpt-oss uses alpha: 1.702"
    if mlp.glu != "gpt_oss" and mlp.alpha is not None:
        yield path + ("alpha",), "alpha is only used by glu 'gpt_oss'", None
    softcaps = (mlp.gate_softcap, mlp.up_softcap)
    if mlp.glu == "softcap_sigmoid" and None in softcaps:
        yield path + (
            "gate_softcap",
        ), "glu 'softcap_sigmoid' needs gate_softcap and up_softcap", None
    if mlp.glu != "softcap_sigmoid" and softcaps != (None, None):
        yield path + ("gate_softcap",), "softcaps are only used by glu 'softcap_sigmoid'", None
    if mlp.dtype == "int4" and mlp.ffn % 2:
        yield path + (
            "ffn",
        ), f"int4 weights pack two values a byte: ffn must be even (got {mlp.ffn})", None


def experts_rules(spec: Spec) -> Iterator[Problem]:
    seen: dict[str, int] = {}
    for i, group in enumerate(spec.experts):
        if group.name in seen:
            yield (
                "experts",
                i,
                "name",
            ), f"duplicate group name {group.name!r}", "give each group a unique name"
        seen[group.name] = i
        yield from _mlp_rules(group, ("experts", i))
        etp = spec.parallel.expert_tp
        if etp > 1 and group.ffn % etp:
            message = f"must be divisible by parallel.expert_tp={etp} (got {group.ffn})"
            yield ("experts", i, "ffn"), message, None
        elif etp > 1 and group.dtype == "int4" and (group.ffn // etp) % 2:
            message = (
                f"int4 weights pack two values a byte: each of the parallel.expert_tp={etp} "
                f"slices must be even (got {group.ffn} // {etp} = {group.ffn // etp})"
            )
            yield ("experts", i, "ffn"), message, None
    if spec.shared is not None:
        yield from _mlp_rules(spec.shared, ("shared",))
        if spec.shared.dtype != spec.dtype:
            message = (
                f"the shared expert's weights are kept in the layer's dtype ({spec.dtype}); "
                f"other precisions are for expert groups (got {spec.shared.dtype})"
            )
            yield ("shared", "dtype"), message, f"remove it or set it to {spec.dtype}"
    width, path = (
        (spec.latent.dim, ("latent", "dim")) if spec.latent else (spec.hidden, ("hidden",))
    )
    if any(g.dtype == "int4" for g in spec.experts) and width % 2:
        yield path, f"int4 experts pack two inputs a byte: must be even (got {width})", None


def router_rules(spec: Spec) -> Iterator[Problem]:
    r, n = spec.router, spec.num_experts
    candidates = n + spec.zero_experts
    if r.kind in ("token_choice", "expert_choice") and r.top_k > candidates:
        message = f"must be at most the number of experts ({candidates}) (got {r.top_k})"
        yield ("router", "top_k"), message, None
    if r.kind == "switch" and r.top_k != 1:
        yield ("router", "top_k"), f"switch routing is top-1 (got {r.top_k})", "set top_k: 1"
    if r.kind == "sparsemixer":
        if r.top_k != 2:
            yield (
                "router",
                "top_k",
            ), f"sparsemixer is always top-2 (got {r.top_k})", "set top_k: 2"
        if r.sparsemixer_eps is None:
            yield ("router", "sparsemixer_eps"), "sparsemixer needs its epsilon", "PhiMoE uses 0.01"
        if r.score != "softmax":
            yield ("router", "score"), f"sparsemixer scores with softmax (got {r.score!r})", None
    elif r.sparsemixer_eps is not None:
        yield ("router", "sparsemixer_eps"), "only used with kind: sparsemixer", None
    if r.kind in ("switch", "sparsemixer", "expert_choice") and spec.zero_experts:
        yield (
            "zero_experts",
        ), f"zero experts need token_choice routing (kind is {r.kind!r})", None
    if r.kind in ("switch", "sparsemixer", "expert_choice") and r.groups is not None:
        yield (
            "router",
            "groups",
        ), f"group-limited routing needs token_choice (kind is {r.kind!r})", None
    yield from _normalize_rules(spec)
    if r.groups is not None:
        yield from _group_rules(spec)


def _normalize_rules(spec: Spec) -> Iterator[Problem]:
    norm = spec.router.normalize
    path = ("router", "normalize")
    if norm.kind == "pnorm" and norm.p is None:
        yield path + ("p",), "p-norm renormalisation needs p", "DBRX uses p: 1.0"
    if norm.kind != "pnorm" and norm.p is not None:
        yield path + ("p",), f"p is only used by kind: pnorm (kind is {norm.kind!r})", None
    if norm.kind != "sum" and (norm.eps or norm.clamp_min is not None):
        yield path + (
            "eps",
        ), f"eps and clamp_min are only used by kind: sum (kind is {norm.kind!r})", None


def _group_rules(spec: Spec) -> Iterator[Problem]:
    g, n, k = spec.router.groups, spec.num_experts, spec.router.top_k
    path = ("router", "groups")
    if spec.zero_experts:
        yield path, "group-limited routing with zero experts is not supported", None
    if n % g.count:
        yield path + ("count",), f"must divide the number of experts ({n}) (got {g.count})", None
        return
    if g.keep > g.count:
        yield path + ("keep",), f"must be at most groups.count={g.count} (got {g.keep})", None
        return
    per_group = n // g.count
    if g.score == "top2_sum" and per_group < 2:
        yield path + (
            "score",
        ), f"top2_sum needs at least 2 experts per group (got {per_group})", None
    if k > g.keep * per_group:
        message = f"top_k={k} is more than the {g.keep * per_group} experts in the kept groups"
        yield path + ("keep",), message, f"keep at least {-(-k // per_group)} groups"


def capacity_rules(spec: Spec) -> Iterator[Problem]:
    cap, kind = spec.capacity, spec.router.kind
    if cap.factor is not None and cap.tokens is not None:
        yield (
            "capacity",
            "tokens",
        ), "give either capacity.factor or capacity.tokens, not both", None
    dropless = cap.factor is None and cap.tokens is None
    if kind in ("switch", "expert_choice") and dropless:
        message = f"{kind} routing needs a capacity (factor or tokens)"
        yield (
            "capacity",
        ), message, "Switch Transformers use tokens: 64; expert choice factor: 1.0"
    if kind == "expert_choice" and cap.scope != "batch":
        yield (
            "capacity",
            "scope",
        ), "expert choice picks tokens over the whole batch", "set scope: batch"


def balance_rules(spec: Spec) -> Iterator[Problem]:
    b = spec.balance
    if b.bias_update_rate > 0 and spec.router.selection_bias == "none":
        message = "aux-loss-free bias updates need a selection bias"
        yield ("balance", "bias_update_rate"), message, "set router.selection_bias: scores"
    if b.aux_loss_type == "switch" and spec.router.kind not in ("switch",) and b.aux_loss:
        yield ("balance", "aux_loss_type"), "the switch aux loss is for top-1 switch routing", None
    yield from _aux_top_k_rules(spec)


def _aux_top_k_rules(spec: Spec) -> Iterator[Problem]:
    b, r, path = spec.balance, spec.router, ("balance", "aux_loss_top_k")
    k = b.aux_loss_top_k
    if k is None:
        return
    if not b.aux_loss or b.aux_loss_type != "standard":
        yield path, "only the standard aux loss counts top-k slots", "set balance.aux_loss > 0"
    elif k != r.top_k and r.kind != "sparsemixer":
        # the generated router counts the loss with the K it selects with; sparsemixer selects two
        # experts by construction, so only there the loss may count another k
        message = f"may differ from router.top_k ({r.top_k}) only with kind: sparsemixer (got {k})"
        yield path, message, f"the standard loss counts the router's top-{r.top_k}: drop the key"
    elif k > spec.num_experts:
        yield path, f"must be at most the number of experts ({spec.num_experts}) (got {k})", None
    elif k != r.top_k and b.seq_aux_loss:
        message = f"the sequence-wise loss would count top-{k} too (router.top_k is {r.top_k})"
        yield path, message, None


def parallel_rules(spec: Spec) -> Iterator[Problem]:
    p, c = spec.parallel, spec.cluster
    world = c.nodes * c.gpus_per_node
    if p.dp * p.tp * p.pp != world:
        message = f"dp*tp*pp = {p.dp * p.tp * p.pp} must equal the cluster's GPUs, {world}"
        yield ("parallel",), message, "the world is cluster.nodes * cluster.gpus_per_node"
    stage = p.dp * p.tp
    if stage % (p.ep * p.expert_tp):
        message = f"ep*expert_tp = {p.ep * p.expert_tp} must divide dp*tp = {stage} (the ranks of a stage)"
        yield ("parallel", "ep"), message, None
    slots = spec.num_experts + spec.placement.redundant
    if p.ep > slots:
        message = f"more expert-parallel ranks ({p.ep}) than expert slots ({slots})"
        yield ("parallel", "ep"), message, "lower ep or add placement.redundant copies"
    if spec.layers.first >= spec.layers.count:
        message = f"must be below layers.count={spec.layers.count} (got {spec.layers.first})"
        yield ("layers", "first"), message, None
    if p.pp > spec.layers.count:
        message = f"at most layers.count = {spec.layers.count} pipeline stages (got {p.pp})"
        yield ("parallel", "pp"), message, "a stage holds at least one decoder layer"
    if spec.comm.dispatch == "hierarchical" and spec.cluster.nodes == 1:
        message = "hierarchical dispatch needs more than one node (cluster.nodes is 1)"
        yield ("comm", "dispatch"), message, "use all_to_all, or auto to let the plan pick"
    if spec.comm.wire_dtype == "fp8":
        message = "fp8 rows need per-row scales, which the generated runtime does not send yet"
        yield ("comm", "wire_dtype"), message, "use bf16 (or the layer's dtype: leave it out)"


def placement_rules(spec: Spec) -> Iterator[Problem]:
    pl = spec.placement
    if pl.redundant and pl.strategy != "replicate":
        message = f"redundant copies need strategy: replicate (got {pl.strategy!r})"
        yield ("placement", "redundant"), message, None
    if pl.redundant > spec.num_experts * (spec.parallel.ep - 1):
        message = f"at most experts*(ep-1) = {spec.num_experts * (spec.parallel.ep - 1)} copies fit"
        yield ("placement", "redundant"), message, "no rank holds two copies of one expert"
    if pl.strategy == "affinity" and spec.cluster.nodes == 1:
        yield ("placement", "strategy"), "affinity placement needs more than one node", None


# The generated package is imported by its name: one named after a module it (or its user) needs
# would hide that module, or be hidden by it. Python's own modules, and what the package imports.
SHADOWED = frozenset(sys.stdlib_module_names) | {"torch", "triton", "numpy", "safetensors"}


def name_rules(spec: Spec) -> Iterator[Problem]:
    if spec.name in SHADOWED:
        message = (
            f"must not be the name of a Python module the package would shadow (got {spec.name!r})"
        )
        yield ("name",), message, f"pick another name, e.g. {spec.name}_moe"


RULES = (
    name_rules,
    experts_rules,
    router_rules,
    capacity_rules,
    balance_rules,
    parallel_rules,
    placement_rules,
)


def problems(spec: Spec) -> list[Problem]:
    """Every cross-field problem of ``spec`` (empty when it is consistent)."""
    return [problem for rule in RULES for problem in rule(spec)]
