"""The spec: what the user asked for, validated, frozen, and nothing derived.

Every model is frozen and rejects unknown keys. Field-level rules (types, ranges, enumerations) live here;
rules that relate several fields live in ``moec.spec.checks`` so each error can name the right field.
The vocabulary covers every MoE block in Hugging Face transformers (see HF_MOE_SEMANTICS.md §4):

* router: score function, top-k on scores or logits, selection bias, group-limited routing, sum / p-norm
  renormalisation, routed scaling, router bias, logit softcap and multiplier, zero (identity) experts,
  switch top-1 with capacity, sparsemixer, expert choice;
* experts: GLU forms (standard, clamped, gpt-oss, soft-capped) or plain MLPs, biases, routing weight on the
  expert input or output, latent projections, several groups per layer differing in width, activation and
  precision; shared experts with an optional sigmoid gate, summed or averaged.
"""

from __future__ import annotations

import keyword
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

Activation = Literal["silu", "gelu", "gelu_tanh", "relu", "relu2", "sigmoid"]
GluForm = Literal["standard", "clamp_then_act", "act_then_clamp", "gpt_oss", "softcap_sigmoid"]
WeightDtype = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4"]
ActDtype = Literal["fp32", "bf16", "fp16"]

# Sizes: large enough for any model in sight, small enough to catch a typo (an extra zero or two).
MAX_HIDDEN = 1 << 17
MAX_FFN = 1 << 18
MAX_EXPERTS = 1 << 14


def _identifier(value: str) -> str:
    if not value.isidentifier() or not value.isascii() or keyword.iskeyword(value):
        raise ValueError("must be a Python identifier (letters, digits, _; not a keyword)")
    if value.startswith("__"):
        raise ValueError("must not start with '__'")
    return value


Identifier = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_identifier)]
PosInt = Annotated[int, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class Strict(BaseModel):
    """Frozen, unknown keys rejected, no silent coercion of strings to numbers or bools."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, validate_default=True)


class MLP(Strict):
    """One feed-forward network: ``down(glu(gate x, up x))`` or ``down(act(up x))``."""

    ffn: Annotated[int, Field(gt=0, le=MAX_FFN)]
    kind: Literal["glu", "mlp"] = "glu"
    activation: Activation = "silu"
    glu: GluForm = "standard"
    limit: PosFloat | None = None  # clamp limit L of the clamped GLU forms
    alpha: PosFloat | None = None  # gpt-oss sigmoid slope
    gate_softcap: PosFloat | None = None
    up_softcap: PosFloat | None = None
    bias: bool = False
    dtype: WeightDtype | None = None  # how the weights are stored; None: the layer's dtype


class ExpertGroup(MLP):
    """``count`` routed experts that share a shape, an activation and a precision."""

    name: Identifier = "routed"
    count: Annotated[int, Field(gt=0, le=MAX_EXPERTS)]


class Shared(MLP):
    """Shared expert(s), as one MLP (n shared experts of width F are one MLP of width n·F)."""

    gate: Literal["sigmoid_linear"] | None = None  # sigmoid(w·x) [1,H] scales the shared output
    combine: Literal["sum", "average"] = "sum"


class Groups(Strict):
    """Group-limited routing: keep the ``keep`` best of ``count`` expert groups, mask the rest."""

    count: PosInt
    keep: PosInt
    score: Literal["top2_sum", "max"] = "top2_sum"
    masked: Literal["-inf", "0"] = "-inf"
    weights_from: Literal["unmasked", "masked"] = "unmasked"


class Normalize(Strict):
    """Renormalisation of the k routing weights.

    ``sum``: ``w / (max(sum(w), clamp_min) + eps)``; ``pnorm``: ``w / ||w||_p``.
    """

    kind: Literal["none", "sum", "pnorm"] = "none"
    eps: NonNegFloat = 0.0
    clamp_min: NonNegFloat | None = None
    p: PosFloat | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data):
        return {"kind": data} if isinstance(data, str) else data


class Router(Strict):
    """How tokens pick experts and how the routing weights are computed."""

    kind: Literal["token_choice", "expert_choice", "switch", "sparsemixer"] = "token_choice"
    score: Literal["softmax", "sigmoid", "sqrtsoftplus"] = "softmax"
    top_k: Annotated[int, Field(gt=0, le=256)] = 2
    topk_on: Literal["scores", "logits"] = "scores"
    normalize: Normalize = Normalize()
    scale: PosFloat = 1.0  # routed scaling factor, applied after renormalisation
    selection_bias: Literal["none", "scores", "logits"] = "none"
    groups: Groups | None = None
    linear_bias: bool = False
    softcap: PosFloat | None = None  # logits = c * tanh(logits / c)
    logit_multiplier: PosFloat = 1.0
    sparsemixer_eps: PosFloat | None = None
    dtype: Literal["fp32", "input"] = "fp32"  # precision of the router GEMM and scores


class Capacity(Strict):
    """Expert capacity. ``factor: null`` and ``tokens: null`` mean dropless.

    capacity = ceil(factor * tokens_in_scope * top_k / experts), or ``tokens`` when given.
    ``drop: position`` keeps the first tokens in order (Switch); ``probs`` keeps the highest weights.
    """

    factor: PosFloat | None = None
    tokens: PosInt | None = None
    scope: Literal["batch", "sequence"] = "batch"
    drop: Literal["position", "probs"] = "position"
    pad: bool = False


class Balance(Strict):
    """Balancing losses (coefficients; 0 disables) and aux-loss-free bias updates."""

    aux_loss: NonNegFloat = 0.0
    aux_loss_type: Literal["standard", "switch"] = "standard"
    # k of the standard loss's top-k count; null: router.top_k (PhiMoE's HF loss counts
    # num_experts_per_tok slots while its sparsemixer always routes two)
    aux_loss_top_k: Annotated[int, Field(gt=0, le=256)] | None = None
    seq_aux_loss: NonNegFloat = 0.0
    z_loss: NonNegFloat = 0.0
    bias_update_rate: NonNegFloat = 0.0


class Layers(Strict):
    """Which decoder layers are MoE when a whole model is described: every ``every``-th from ``first``."""

    count: Annotated[int, Field(gt=0, le=4096)] = 1
    first: Annotated[int, Field(ge=0)] = 0
    every: PosInt = 1


class Parallel(Strict):
    dp: PosInt = 1
    tp: PosInt = 1
    ep: PosInt = 1
    pp: PosInt = 1
    expert_tp: PosInt = 1


class Link(Strict):
    gbps: PosFloat  # GB/s per direction per GPU
    latency_us: NonNegFloat


class Links(Strict):
    """Link classes; ``null`` takes the GPU profile's measured defaults (moec/plan/cost.py)."""

    intra: Link | None = None  # within a node (NVLink)
    inter: Link | None = None  # across nodes (InfiniBand / RoCE)


class GpuProfile(Strict):
    """Explicit accelerator numbers, when no named profile fits."""

    name: Identifier
    tflops_bf16: PosFloat
    hbm_gbps: PosFloat
    memory_gb: PosFloat


class Cluster(Strict):
    nodes: Annotated[int, Field(gt=0, le=65536)] = 1
    gpus_per_node: Annotated[int, Field(gt=0, le=64)] = 1
    gpu: Literal["h100", "h200", "a100", "b200", "cpu"] | GpuProfile = "h100"
    links: Links = Links()


class Placement(Strict):
    strategy: Literal["uniform", "balanced", "replicate", "affinity", "optimal"] = "balanced"
    trace: str | None = None  # path of a routing trace JSON, relative to the spec file
    redundant: Annotated[int, Field(ge=0)] = 0


class Comm(Strict):
    dispatch: Literal["auto", "all_to_all", "hierarchical", "all_gather"] = "auto"
    # token chunks of the all-to-all pipeline; each chunk pays the latency and re-reads weights
    chunks: Literal["auto"] | Annotated[int, Field(gt=0, le=64)] = "auto"
    # the dtype of the routed rows on the wire (dispatch and combine); None: the layer's dtype
    wire_dtype: Literal["bf16", "fp16", "fp32", "fp8"] | None = None


class Workload(Strict):
    tokens_per_rank: PosInt = 8192
    mode: Literal["train", "serve"] = "train"


class Kernels(Strict):
    """The Triton backend: a tile table measured by ``moec tune`` (path relative to the spec file)."""

    tuning: str | None = None


class Latent(Strict):
    """Experts run in a latent space: ``x_L = w_in x``, and the routed sum goes through ``w_out``."""

    dim: PosInt
    bias: bool = False


class Checkpoint(Strict):
    """How ``load_hf_state_dict`` finds each tensor: a named layout, optionally with key overrides.

    ``keys`` maps a canonical tensor name (``router.weight``, ``experts.w_gate``, ...) to a source
    ``{key, stack, ops}`` as in HF_MOE_SEMANTICS.md §4.
    """

    layout: Literal[
        "hf_fused", "gpt_oss", "llama4", "dbrx", "jetmoe", "granite", "switch", "hunyuan", "ernie"
    ] = "hf_fused"
    router_key: str | None = (
        None  # module prefix of the router Linear, e.g. "gate" or "router.layer"
    )
    shared_key: str | None = None  # module prefix of the shared MLP, e.g. "shared_expert"
    bias_key: str | None = None  # state-dict key of the selection bias


class Source(Strict):
    """Provenance, documentation only (never changes the generated computation)."""

    hf_model_type: str | None = None
    hf_block: str | None = None
    note: str | None = None


class Spec(Strict):
    """A whole MoE spec. Global expert ids run over the groups in order: group 0 first."""

    name: Identifier
    hidden: Annotated[int, Field(gt=0, le=MAX_HIDDEN)]
    dtype: ActDtype = "bf16"  # activations and default parameter dtype of the generated layer
    experts: Annotated[tuple[ExpertGroup, ...], Field(min_length=1, max_length=16)]
    zero_experts: Annotated[int, Field(ge=0, le=MAX_EXPERTS)] = 0
    shared: Shared | None = None
    router: Router = Router()
    weight_on: Literal["output", "input"] = "output"
    latent: Latent | None = None
    routed_scale: PosFloat = 1.0  # multiplies the summed routed output
    output_bias: bool = False
    capacity: Capacity = Capacity()
    balance: Balance = Balance()
    layers: Layers = Layers()
    parallel: Parallel = Parallel()
    cluster: Cluster = Cluster()
    placement: Placement = Placement()
    comm: Comm = Comm()
    workload: Workload = Workload()
    kernels: Kernels = Kernels()
    checkpoint: Checkpoint = Checkpoint()
    source: Source = Source()

    @model_validator(mode="before")
    @classmethod
    def _layer_dtype_by_default(cls, data):
        """A group or shared expert without a ``dtype`` stores its weights in the layer's, and
        rows go on the wire in it unless ``comm.wire_dtype`` says otherwise."""
        if not isinstance(data, dict):
            return data
        layer = data.get("dtype", cls.model_fields["dtype"].default)
        if layer not in get_args(ActDtype):  # the layer's own error says what is wrong
            return data

        def filled(mlp):
            if isinstance(mlp, dict) and mlp.get("dtype") is None:
                return {**mlp, "dtype": layer}
            if isinstance(mlp, MLP) and mlp.dtype is None:
                return mlp.model_copy(update={"dtype": layer})
            return mlp

        data = dict(data)
        if isinstance(data.get("experts"), list | tuple):
            data["experts"] = type(data["experts"])(filled(g) for g in data["experts"])
        if data.get("shared") is not None:
            data["shared"] = filled(data["shared"])
        comm = data.get("comm")
        if comm is None or (isinstance(comm, dict) and comm.get("wire_dtype") is None):
            data["comm"] = {**(comm or {}), "wire_dtype": layer}
        elif isinstance(comm, Comm) and comm.wire_dtype is None:
            data["comm"] = comm.model_copy(update={"wire_dtype": layer})
        return data

    @property
    def num_experts(self) -> int:
        """Routed experts that have weights (excludes zero experts)."""
        return sum(g.count for g in self.experts)
