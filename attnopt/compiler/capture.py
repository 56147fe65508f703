"""Dynamo graph -> ATen graph, through AOTAutograd.

Dynamo hands over a torch-level graph whose parameters are inputs. AOTAutograd functionalises it
into ATen ops. For an inference graph (grad disabled, or nothing requiring grad) every parameter
input is frozen: its placeholder in the ATen graph becomes a constant holding the parameter's
tensor (shared, not copied), so weight rewrites happen once, at compile time, and the compiled
function drops those arguments.

Frozen weights are a promise: the compiled function keeps reading the tensors it was compiled
with. Dynamo, though, reuses one compiled graph for every module with the same code and shapes —
it guards parameters by identity only under Inductor's own freezing — so the function returned
here checks which parameters it is called with and compiles a variant for each new set
(`per_parameter_set`): decoder layers split by graph breaks each get their own. In-place
updates (load_state_dict) are seen; what a weight rewrite derived (int4 codes, say) is not.
Graphs that need gradients keep parameters as inputs and get no weight rewrites.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_module_simplified

# (aten graph, its example args, training?, number of frozen weights) -> boxed callable
ForwardCompiler = Callable[[fx.GraphModule, list, bool, int], Callable]
BackwardCompiler = Callable[[fx.GraphModule, list], Callable]


def needs_grad(example_inputs: Sequence[Any]) -> bool:
    """AOTAutograd's own test: it builds a joint forward/backward graph exactly when this holds."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


def capture(
    gm: fx.GraphModule,
    example_inputs: list,
    compile_forward: ForwardCompiler,
    compile_backward: BackwardCompiler,
) -> Callable:
    training = needs_grad(example_inputs)
    weights = {} if training else {
        i: t.detach() for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter)}
    names = [parameter_name(n) for n in gm.graph.nodes if n.op == "placeholder"]

    def forward_compiler(aten: fx.GraphModule, args: list) -> Callable:
        placeholders = [n for n in aten.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):  # AOTAutograd changed the calling convention
            return compile_forward(aten, args, training, 0)
        for i, tensor in weights.items():
            _freeze(aten, placeholders[i], f"_frozen_weight_{i}", tensor, names[i])
        aten.recompile()
        keep = [i for i in range(len(args)) if i not in weights]
        compiled = compile_forward(aten, [args[i] for i in keep], training, len(weights))
        return _drop_args(compiled, keep) if weights else compiled

    return aot_module_simplified(
        gm, example_inputs, fw_compiler=forward_compiler, bw_compiler=compile_backward,
        decompositions={}, keep_inference_input_mutations=True,
    )


def per_parameter_set(compile_for: Callable[[list], Callable], example_inputs: list) -> Callable:
    """`compile_for(inputs)` once per set of parameter objects the graph is called with."""
    positions = [i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter)]
    first = compile_for(example_inputs)
    if not positions or needs_grad(example_inputs):
        return first
    # Keyed by identity; the key's objects are kept alive so that an id is never reused.
    variants = {tuple(id(example_inputs[i]) for i in positions):
                ([example_inputs[i] for i in positions], first)}

    def run(*args: Any) -> Any:
        key = tuple(id(args[i]) for i in positions)
        if key not in variants:
            variants[key] = ([args[i] for i in positions], compile_for(list(args)))
        return variants[key][1](*args)

    return run


def parameter_name(placeholder: fx.Node) -> str | None:
    """`model.layers.0.q_proj.weight` for the Dynamo input that reads that parameter (what the
    `skip` globs and the report name layers by); None for other inputs."""
    source = getattr(placeholder.meta.get("grapharg"), "source", None)
    path = re.findall(r"\.(?:_modules|_parameters|_buffers)\['([^']+)'\]", source.name) \
        if source is not None else []
    return ".".join(path) or None


def _freeze(gm: fx.GraphModule, placeholder: fx.Node, name: str, tensor: torch.Tensor,
            parameter: str | None) -> None:
    gm.register_buffer(name, tensor, persistent=False)
    with gm.graph.inserting_before(placeholder):
        const = gm.graph.get_attr(name)
    const.meta = dict(placeholder.meta)
    const.meta["attnopt_parameter"] = parameter
    placeholder.replace_all_uses_with(const)
    gm.graph.erase_node(placeholder)


def _drop_args(compiled: Callable, keep: list[int]) -> Callable:
    def run(args: list) -> Any:
        kept = [args[i] for i in keep]
        args.clear()  # boxed calling convention: free the inputs as early as possible
        return compiled(kept)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run
