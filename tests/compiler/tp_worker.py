"""One rank of the tensor-parallel test (`test_tensor_parallel.py` starts two with torchrun, gloo
on localhost): a transformers Llama loaded with tp_plan="auto" and a hand-written attention
block sharded with DTensor's parallelize_module, each compiled with attnopt and compared with
the unsharded model. Writes rank<N>.json into the directory given as argv[1]."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

import attnopt


class Block(torch.nn.Module):
    def __init__(self, dim: int = 32, head_dim: int = 8):
        super().__init__()
        self.head_dim = head_dim
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim, bias=False)
                                          for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.head_dim).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        p = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim**-0.5, -1)
        return self.o((p @ v).transpose(1, 2).reshape(b, n, -1))


def compiled_run(model, *args, **kwargs) -> tuple[torch.Tensor, list]:
    attnopt.clear_reports()
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="attnopt", options={"inner": "eager"})(*args, **kwargs)
    return out, attnopt.reports()


def summary(want, got, reports) -> dict:
    return {"error": (want - got).abs().max().item(),
            "attention": sum(r.counts["attention"] for r in reports),
            "notes": [n for r in reports for n in r.notes],
            "failed": [p.name for r in reports for p in r.passes if p.error]}


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    torch.manual_seed(0)
    full = transformers.LlamaForCausalLM(config).eval()
    if rank == 0:
        full.save_pretrained(out_dir / "llama")
    dist.barrier()
    sharded = transformers.LlamaForCausalLM.from_pretrained(out_dir / "llama",
                                                            tp_plan="auto").eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = full(ids, use_cache=False).logits
    got, reports = compiled_run(sharded, ids, use_cache=False)
    result["llama"] = summary(want, got.logits, reports)

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    block = Block().eval()
    torch.manual_seed(0)
    parallel = parallelize_module(Block().eval(), mesh, {
        "q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(),
        "o": RowwiseParallel()})
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = block(x)
    got, reports = compiled_run(parallel, x)
    result["block"] = summary(want, got, reports)

    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
