"""What differs between the transformers releases attnopt supports.

transformers 5.24 renamed the KV-cache argument of every model's `forward` (and of `generate`)
from `past_key_values` to `cache`; 5.23 and earlier take `past_key_values`, and 5.24 still
accepts that name with a deprecation warning on every call. attnopt passes a cache under the
name the model's own forward declares, so it works with both and warns with neither.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

# The new name first: a forward that declares both is a 5.24 one keeping the old for a while.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(model: Callable) -> str | None:
    """The name under which `model` (a transformers model, or its forward) takes its KV cache:
    "cache" (transformers >= 5.24), "past_key_values" (earlier), or None if it takes none."""
    forward = getattr(model, "forward", model)
    parameters = inspect.signature(forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


def with_cache(model: Callable, cache: object) -> dict[str, object]:
    """`{name: cache}` for `model(**inputs, **with_cache(model, cache))` and for `generate`,
    under the name this model takes (`cache_argument`)."""
    name = cache_argument(model)
    if name is None:
        raise TypeError(f"{type(model).__name__}.forward takes no KV cache (neither of "
                        f"{', '.join(CACHE_ARGUMENTS)})")
    return {name: cache}
