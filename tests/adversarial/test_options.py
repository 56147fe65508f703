"""Every bad option is a ValueError that names the key, up front from Options.parse and at the
first call of a compiled model (wrapped by Dynamo, as the README says); a bad option never
reaches a pass, where it would be rolled back and leave the model silently unrewritten."""

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

import attnopt

BAD = {
    "group_size float": ({"quantize": "w4a16", "group_size": 128.0}, "'group_size' must be an int"),
    "group_size bool": ({"group_size": True}, "'group_size' must be an int"),
    "group_size other": ({"group_size": 96}, "'group_size' got 96"),
    "passes int": ({"passes": 5}, "'passes' must be a list of pass names"),
    "passes unknown": ({"passes": ["attention", "flash"]}, "unknown pass 'flash'"),
    "skip None": ({"skip": None}, "'skip' must be a list of module-name globs"),
    "skip ints": ({"skip": [1, 2]}, "'skip' must be a list of module-name globs"),
    "inner int": ({"inner": 1}, "'inner' got 1"),
    "kernels typo": ({"kernels": "Triton"}, "'kernels' got 'Triton'"),
    "quantize bool": ({"quantize": True}, "'quantize' got True"),
    "verify int": ({"verify": 1}, "'verify' must be True or False"),
    "report_dir int": ({"report_dir": 3}, "'report_dir' must be a path"),
    "unknown key": ({"quantise": "w4a16"}, "unknown option 'quantise'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_options_are_value_errors_naming_the_key(case):
    options, message = BAD[case]
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        attnopt.Options.parse(options)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        attnopt.Options(**options) if "quantise" not in options else attnopt.Options.parse(
            options)


def test_at_the_first_call_the_value_error_comes_wrapped_by_dynamo():
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="attnopt",
                             options={"group_size": 128.0})
    with pytest.raises(BackendCompilerFailed, match="backend='attnopt' raised:\nValueError: "
                       "attnopt: option 'group_size'") as info:
        compiled(torch.randn(2, 4))
    assert isinstance(info.value.inner_exception, ValueError)


@pytest.mark.parametrize(("options", "parsed"), [
    ({"passes": "attention"}, {"passes": ("attention",)}),
    ({"skip": "lm_*"}, {"skip": ("lm_*",)}),
    ({"skip": []}, {"skip": ()}),
    ({"passes": None, "group_size": 64}, {"passes": None, "group_size": 64}),
])
def test_good_options_are_normalised(options, parsed):
    opts = attnopt.Options.parse(options)
    assert {k: getattr(opts, k) for k in parsed} == parsed
