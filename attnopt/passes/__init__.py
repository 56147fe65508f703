"""The passes, in the order the pipeline runs them (a flat, named list).

Order matters: attention must run before softmax (which would otherwise take the softmax inside
every attention), and quantization after linear fusion.
"""

from __future__ import annotations

from attnopt.passes.attention import attention_pass
from attnopt.passes.softmax import softmax_pass

PIPELINE = (attention_pass, softmax_pass)
PASS_NAMES = tuple(p.name for p in PIPELINE)
