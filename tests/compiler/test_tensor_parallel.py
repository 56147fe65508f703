"""Tensor-parallel models compile with attnopt: two ranks (torchrun, gloo on localhost, CPU) run
a transformers Llama loaded with tp_plan="auto" and a hand-written block sharded with DTensor's
parallelize_module. On each rank every attention is rewritten, the collectives stay as they
were (the report says so), and the output equals the unsharded model's. The pipeline itself
refuses any pass that removes, adds or reorders a collective."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx

from attnopt.compiler.options import Options
from attnopt.compiler.pipeline import collectives_note, run_pipeline

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("tp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    pytest.importorskip("accelerate")  # transformers' tp_plan loading needs it
    out = tmp_path_factory.mktemp("tp")
    # Loopback only: the rendezvous (--standalone) and gloo's own sockets.
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    # The workers import attnopt from this checkout, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(WORKER), str(out)],
                          timeout=600, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize(("case", "attention", "collectives"), [
    ("llama", 2, "12 collectives kept as they were, in order: all_reduce x5, wait_tensor x6, "
               "all_gather_into_tensor x1"),
    ("block", 1, "2 collectives kept as they were, in order: all_reduce x1, wait_tensor x1"),
])
def test_every_rank_rewrites_attention_and_keeps_the_collectives(ranks, case, attention,
                                                                 collectives):
    for rank in ranks:
        result = rank[case]
        assert result["error"] < 1e-5
        assert result["attention"] == attention and not result["failed"]
        assert any(collectives in note for note in result["notes"]), result["notes"]


def test_a_pass_that_drops_a_collective_is_rolled_back():
    graph = fx.Graph()
    x = graph.placeholder("x")
    reduced = graph.call_function(torch.ops._c10d_functional.all_reduce.default, (x, "sum", "0"))
    waited = graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (reduced,))
    graph.output(graph.call_function(torch.ops.aten.relu.default, (waited,)))
    gm = fx.GraphModule(torch.nn.Module(), graph)

    class DropsTheReduction:
        name, counts_as, needs_frozen_weights = "drop", "softmax", False

        def not_applicable(self, options):
            return None

        def apply(self, gm, ctx):
            waited.replace_all_uses_with(x)
            gm.graph.erase_node(waited)
            gm.graph.erase_node(reduced)
            return 1

    (record,) = run_pipeline(gm, [DropsTheReduction()], Options(), training=False, frozen=True)
    assert record.rewrites == 0 and "reordered a collective" in record.error
    assert collectives_note(gm.graph) == ("2 collectives kept as they were, in order: "
                                          "all_reduce x1, wait_tensor x1")
