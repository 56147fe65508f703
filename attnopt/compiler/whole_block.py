"""Whole-block capture: each MoE block in one Dynamo graph, without the user setting Dynamo
flags, and only for code attnopt compiles.

Expert loops gather each expert's tokens with a data-dependent `where`. By default Dynamo breaks
the graph there (11 to 25 graphs for a small MoE model), so no graph holds a whole block. Two
things are needed while Dynamo traces:

1. Dynamo's `capture_dynamic_output_shape_ops` and `capture_scalar_outputs`: `where`,
   `nonzero` and `.tolist()` (JetMoE's expert sizes) then stay in the graph as values of
   data-dependent size.
2. transformers' `experts_implementation="eager"` loops over the experts that were *hit*
   (`for e in mask.sum(...).nonzero()`): a loop whose trip count is data, which no Dynamo
   setting can unroll (the count is unknown while tracing, so Dynamo breaks at the `for`).
   While attnopt-compiled code runs (Dynamo traces it then), that implementation is read as
   `all_experts_forward`: the same arithmetic as a loop over all E experts. An expert no token
   picked adds an empty `index_add_`, and the hit experts come in the same increasing order,
   so the result is bit-identical (`tests/compiler/test_whole_block.py` checks it per class).
   Only the classes in ALL_EXPERTS_CLASSES, checked that way, are read so; others keep their
   own forward.
   DBRX loops over the hit experts in a forward of its own: `DbrxExperts.forward` is swapped
   for the same kind of all-experts loop meanwhile (checked the same way). Both stand-ins are
   process-wide (a registry entry, a class attribute): another thread running these experts
   eagerly meanwhile runs the stand-in, which computes the same bits.

The mechanism is Dynamo's `backend_ctx_ctor`: a backend callable may carry a context
constructor that Dynamo enters around every call of the code it compiles (tracing included), so
the settings hold for attnopt-compiled code and nowhere else. `torch._dynamo.optimize` honours
it, but `torch.compile(backend=...)` wraps every backend but Inductor in `_TorchCompileWrapper`
(and that in `WrapBackendDebug`), which drop the attribute (torch 2.13). `forward_backend_context`
makes both wrappers hand the inner backend's context on — for every backend that has one, no
other — and is installed when attnopt's backend is imported, which `torch.compile(backend=
"attnopt")` does before it looks the attribute up. If a future torch moves these classes, the
settings are simply not applied (the graphs split as before) and
`tests/compiler/test_whole_block.py` fails.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

# The transformers experts classes whose eager forward `all_experts_forward` reproduces bit for
# bit (module, class name); checked by tests/compiler/test_whole_block.py.
ALL_EXPERTS_CLASSES = frozenset({
    ("transformers.models.mixtral.modeling_mixtral", "MixtralExperts"),
    ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeExperts"),
    ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeExperts"),
    ("transformers.models.olmoe.modeling_olmoe", "OlmoeExperts"),
    ("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssExperts"),
})

_depth = threading.local()
# The stand-ins are process-wide (a registry entry, a class attribute): installed by the first
# thread that enters, removed when the last one leaves.
_users = 0
_lock = threading.Lock()
_undo: list = []


@contextlib.contextmanager
def whole_block_capture() -> Iterator[None]:
    """The settings above, for the duration of one call of attnopt-compiled code (nested calls
    share the outermost one's)."""
    depth = getattr(_depth, "value", 0)
    _depth.value = depth + 1
    try:
        if depth:
            yield
            return
        _enter_stand_ins()
        try:
            with _dynamo_capture():
                yield
        finally:
            _leave_stand_ins()
    finally:
        _depth.value = depth


@contextlib.contextmanager
def _dynamo_capture() -> Iterator[None]:
    """Both Dynamo settings on, the caller's values restored after: what `config.patch` does,
    at a third of its cost (it is paid on every call of the compiled code: ~10 us in all)."""
    config = torch._dynamo.config
    keys = ("capture_dynamic_output_shape_ops", "capture_scalar_outputs")
    before = [getattr(config, k) for k in keys]
    for k in keys:
        setattr(config, k, True)
    try:
        yield
    finally:
        for k, v in zip(keys, before, strict=True):
            setattr(config, k, v)


def _enter_stand_ins() -> None:
    global _users
    with _lock:
        if _users == 0:
            _undo.extend(u for u in (_read_eager_experts_whole(), _read_dbrx_experts_whole())
                         if u is not None)
        _users += 1


def _leave_stand_ins() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users == 0:
            while _undo:
                _undo.pop()()


def _read_eager_experts_whole():
    """transformers' "eager" experts implementation read as `eager_experts`, if transformers is
    in use (it is never imported for this): an entry in the experts interface's mapping of its
    own (`ALL_EXPERTS_FUNCTIONS["eager"]`, which transformers looks up first), removed after."""
    moe = sys.modules.get("transformers.integrations.moe")
    interface = getattr(moe, "ALL_EXPERTS_FUNCTIONS", None)
    if interface is None:
        return None
    interface["eager"] = eager_experts
    return lambda: interface._local_mapping.pop("eager", None)


def _read_dbrx_experts_whole():
    """DBRX's experts loop over the experts that were hit in a forward of their own (not
    through transformers' experts interface): `DbrxExperts.forward` is
    `dbrx_all_experts_forward` meanwhile, restored after."""
    module = sys.modules.get("transformers.models.dbrx.modeling_dbrx")
    cls = getattr(module, "DbrxExperts", None)
    if cls is None or "forward" not in cls.__dict__:
        return None
    original = cls.__dict__["forward"]
    cls.forward = dbrx_all_experts_forward
    return lambda: setattr(cls, "forward", original)


def dbrx_all_experts_forward(self: torch.nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                             top_k_weights: Tensor) -> Tensor:
    """DBRX's experts over all E experts in order: its w1 (gate), v1 (up) and w2 (down, stored
    [I, H]) are [E·I, H] parameters read per expert as views [E, I, H][e], its expert MLP
    module (`self.mlp`) applies them, and each weighted output is added with `index_add_`, as
    its eager forward does for the experts that were hit."""
    batch = hidden_states.shape[0]
    rows = hidden_states.reshape(-1, self.hidden_size)
    out = torch.zeros_like(rows)
    with torch.no_grad():
        mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
        mask = mask.permute(2, 1, 0)
    per_expert = (-1, self.ffn_hidden_size, self.hidden_size)
    for e in range(self.num_experts):
        with torch.no_grad():
            slot, token = torch.where(mask[e])
        w1, v1, w2 = (w.view(per_expert)[e] for w in (self.mlp.w1, self.mlp.v1, self.mlp.w2))
        y = self.mlp(rows[token], w1, v1, w2).view(-1, self.hidden_size)
        out.index_add_(0, token, y * top_k_weights[token, slot, None])
    return out.view(batch, -1, self.hidden_size)


def eager_experts(self: torch.nn.Module, *args, **kwargs) -> Tensor:
    """What transformers' "eager" experts implementation dispatches to while attnopt traces."""
    cls = type(self)
    if (cls.__module__, cls.__name__) in ALL_EXPERTS_CLASSES and _plain(self):
        return all_experts_forward(self, *args, **kwargs)
    return cls.forward.__wrapped__(self, *args, **kwargs)  # the class's own eager forward


def _plain(experts: torch.nn.Module) -> bool:
    """Gated experts with no post-expert norm and no expert parallelism: what the eager forwards
    of ALL_EXPERTS_CLASSES compute."""
    return (getattr(experts, "has_gate", False) and not getattr(experts, "has_post_expert_norm",
                                                                   False)
            and not getattr(experts, "_is_expert_parallel", False))


def all_experts_forward(self: torch.nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                        top_k_weights: Tensor) -> Tensor:
    """out[t] = Σ_j w[t, j] · expert_e(x[t]), e = top_k_index[t, j], as the eager loop computes
    it — expert by expert in increasing order, each on the tokens routed to it, added with
    `index_add_` in x's dtype — but over every expert, so the trip count is E, not data. The
    one-hot keeps the eager forward's E + 1 classes (the last for expert parallelism's
    sentinel, never looped over)."""
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
        mask = mask.permute(2, 1, 0)
    for e in range(self.num_experts):
        slot, token = torch.where(mask[e])
        rows = hidden_states[token]
        gate_up = _project(self, rows, self.gate_up_proj[e],
                           self.gate_up_proj_bias[e] if self.has_bias else None)
        y = _project(self, self._apply_gate(gate_up), self.down_proj[e],
                     self.down_proj_bias[e] if self.has_bias else None)
        y = y * top_k_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def _project(experts: torch.nn.Module, rows: Tensor, weight: Tensor, bias: Tensor | None
             ) -> Tensor:
    """rows times one expert's matrix, stored [K, N] (`is_transposed`) or [N, K], plus its
    bias, spelled as the eager forwards spell it."""
    out = rows @ weight if experts.is_transposed else torch.nn.functional.linear(rows, weight)
    return out if bias is None else out + bias


def forward_backend_context() -> None:
    """Make `torch.compile(backend=...)` honour the backend's `backend_ctx_ctor`, as
    `torch._dynamo.optimize` does: the two wrappers torch.compile puts around a backend get a
    read-only `backend_ctx_ctor` that is the wrapped backend's (and is absent, as before, when
    it has none). Idempotent."""
    try:
        from torch import _TorchCompileWrapper
        from torch._dynamo.repro.after_dynamo import WrapBackendDebug
    except ImportError:  # a torch that moved them: the settings are not applied
        return
    for cls, inner in ((_TorchCompileWrapper, "compiler_fn"),
                       (WrapBackendDebug, "_torchdynamo_orig_backend")):
        if "backend_ctx_ctor" not in cls.__dict__:
            cls.backend_ctx_ctor = property(_inner_context(inner))


def _inner_context(attribute: str):
    def backend_ctx_ctor(self):
        inner = self.__dict__.get(attribute)
        context = getattr(inner, "backend_ctx_ctor", None)
        if context is None:
            raise AttributeError("backend_ctx_ctor")  # getattr(..., default) gives the default
        return context

    return backend_ctx_ctor
