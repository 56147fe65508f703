"""The passes, in the order the pipeline runs them (a flat, named list).

Order matters: attention must run before softmax (which would otherwise take the softmax inside
every attention) and moe (whose router holds a softmax); kv_cache rewrites the attention ops
that read a KV cache, so it follows attention; linear fusion packs the int4 linears that
quantization made.
"""

from __future__ import annotations

from attnopt.passes.attention import attention_pass
from attnopt.passes.kv_cache import kv_cache_pass
from attnopt.passes.linear import linear_fusion_pass
from attnopt.passes.mla import mla_pass
from attnopt.passes.moe import moe_pass
from attnopt.passes.quantize import quantize_pass
from attnopt.passes.softmax import softmax_pass

PIPELINE = (attention_pass, mla_pass, kv_cache_pass, softmax_pass, moe_pass, quantize_pass,
            linear_fusion_pass)
PASS_NAMES = tuple(p.name for p in PIPELINE)
