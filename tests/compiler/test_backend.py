"""The backend as a user meets it: entry point, options, inner compilers, frozen weights,
rollback of a failing pass, reports, verify, training."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import attnopt
from attnopt.compiler import backend as backend_module
from attnopt.compiler.options import Options
from attnopt.testing import assert_matches_eager


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x, mask):
        scores = self.proj(x) @ x.transpose(-1, -2) * 0.25
        # The factor after the softmax keeps this a plain softmax for the softmax pass, not
        # attention (which the attention pass would take whole).
        return (torch.softmax(scores.masked_fill(mask, float("-inf")), -1) * 2.0) @ x


def inputs():
    x = torch.randn(2, 8, 16)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, :, -2:] = True
    return x, mask


def test_backend_found_through_entry_point_without_importing_attnopt():
    code = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Linear(4, 4)
        with torch.no_grad():
            y = torch.compile(lambda x: torch.softmax(m(x), -1), backend="attnopt",
                              options={"inner": "eager"})(torch.randn(2, 4))
        assert "attnopt" in sys.modules  # loaded by Dynamo through the entry point
        import attnopt
        (r,) = attnopt.reports()
        print(r.counts["softmax"], r.frozen_weights, tuple(y.shape))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "2", "(2,", "4)"]


def test_backend_listed_through_the_entry_point_only():
    # Registered by the entry point, never by a register_backend call that would collide with it.
    from pathlib import Path

    package = Path(attnopt.__file__).parent
    assert not any("register_backend(" in f.read_text() for f in package.rglob("*.py"))
    assert "attnopt" in torch._dynamo.list_backends(exclude_tags=())


@pytest.mark.parametrize("bad, match", [
    ({"colour": "red"}, "unknown option 'colour'.*quantize.*group_size.*strict"),
    ({"inner": "tvm"}, "option 'inner' got 'tvm'; valid values are 'inductor', 'eager'"),
    ({"kernels": "cuda"}, "option 'kernels' got 'cuda'"),
    ({"quantize": "int8"}, "option 'quantize' got 'int8'"),
    ({"group_size": 100}, "option 'group_size' got 100"),
    ({"passes": ["softmax", "fuse_everything"]}, "unknown pass 'fuse_everything'.*softmax"),
    ({"verify": "yes"}, "option 'verify' must be True or False"),
])
def test_bad_options_raise_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        Options.parse(bad)
    with pytest.raises(Exception, match=match):
        torch.compile(Net(), backend="attnopt", options=bad)(*inputs())


def test_options_defaults_and_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNOPT_REPORT_DIR", str(tmp_path))
    o = Options.parse(None)
    assert (o.inner, o.kernels, o.group_size, o.skip, o.report_dir) == (
        "inductor", "auto", 128, ("lm_head",), str(tmp_path))
    assert Options.parse({"passes": "softmax"}).passes == ("softmax",)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_inference_graph_freezes_weights_and_matches_eager(inner):
    with torch.no_grad():
        (report,) = assert_matches_eager(Net().eval(), inputs(), options={"inner": inner})
    assert report.frozen_weights == 2 and not report.training
    assert report.counts == {"attention": 0, "softmax": 1, "moe": 0, "w4a16_linear": 0,
                             "linear_fusion": 0, "kv_cache": 0}
    assert "constant(_frozen_weight_" in "\n".join(report.passes[0].before)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_new_lengths_recompile_once_with_dynamic_shapes(inner):
    net = Net().eval()
    compiled = torch.compile(net, backend="attnopt", options={"inner": inner})
    with torch.no_grad():
        for length in (6, 9, 13):
            x = torch.randn(2, length, 16)
            mask = torch.rand(2, length, length) > 0.8
            mask[..., 0] = False
            torch.testing.assert_close(compiled(x, mask), net(x, mask))
    reports = attnopt.reports()
    assert len(reports) == 2  # static first graph, then one dynamic graph serves every length
    assert [r.counts["softmax"] for r in reports] == [1, 1] and not reports[1].notes


def test_frozen_weights_follow_in_place_updates():
    net = Net().eval()
    with torch.no_grad():
        compiled = torch.compile(net, backend="attnopt", options={"inner": "eager"})
        x, mask = inputs()
        compiled(x, mask)
        net.proj.weight.mul_(3)
        torch.testing.assert_close(compiled(x, mask), net(x, mask))


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_training_gradients_match_eager(inner):
    torch.manual_seed(0)
    net, ref = Net(), Net()
    ref.load_state_dict(net.state_dict())
    x, mask = inputs()
    compiled = torch.compile(net, backend="attnopt", options={"inner": inner})
    compiled(x, mask).square().sum().backward()
    ref(x, mask).square().sum().backward()
    (report,) = attnopt.reports()
    assert report.training and report.frozen_weights == 0
    assert report.counts["softmax"] == 1  # the forward's softmax, its output saved for backward
    for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


class Explodes:
    name, counts_as, needs_frozen_weights = "explodes", "attention", False

    def not_applicable(self, options):
        return None

    def apply(self, gm, ctx):
        # Damage the graph, then fail: the pipeline must restore the snapshot.
        for n in list(gm.graph.nodes):
            if n.op == "call_function":
                n.target = torch.ops.aten.neg.default
        gm.register_buffer("_junk", torch.zeros(1))
        raise RuntimeError("deliberate failure")


@pytest.fixture
def exploding_pipeline(monkeypatch):
    from attnopt.passes import attention_pass, softmax_pass

    monkeypatch.setattr(backend_module, "PIPELINE", (Explodes(), attention_pass, softmax_pass))


def test_failing_pass_is_rolled_back_and_recorded(exploding_pipeline):
    with torch.no_grad():
        (report,) = assert_matches_eager(Net().eval(), inputs(), options={"inner": "eager"})
    failed, _attention, softmax = report.passes
    assert failed.error.startswith("RuntimeError: deliberate failure") and failed.rewrites == 0
    assert failed.before == failed.after  # the snapshot was restored
    assert softmax.rewrites == 1 and report.counts["softmax"] == 1
    assert "FAILED (RuntimeError: deliberate failure)" in report.summary()


def test_strict_reraises(exploding_pipeline):
    with torch.no_grad(), pytest.raises(Exception, match="deliberate failure"):
        torch.compile(Net().eval(), backend="attnopt",
                      options={"inner": "eager", "strict": True})(*inputs())


def test_report_diff_html_and_report_dir(tmp_path):
    with torch.no_grad():
        compiled = torch.compile(Net().eval(), backend="attnopt",
                                 options={"inner": "eager", "report_dir": str(tmp_path)})
        compiled(*inputs())
    (report,) = attnopt.reports()
    whole, per_pass = report.diff(), report.diff("softmax")
    body = lambda d: d.split("\n", 2)[2]  # past the ---/+++ header lines
    assert body(whole) == body(per_pass) and "+softmax_default = attnopt.softmax(" in whole
    assert "-_softmax = aten._softmax(masked_fill, -1, False)" in whole
    with pytest.raises(KeyError, match="no pass 'no_such_pass'"):
        report.diff("no_such_pass")

    page = (tmp_path / f"graph{report.graph_id}.html").read_text()
    assert "<h2>pass softmax: 1 rewrites</h2>" in page
    assert '<span class="del">_softmax = aten._softmax(masked_fill, -1, False)' in page
    assert '<span class="add">softmax_default = attnopt.softmax(' in page
    assert "<script" not in page and "http" not in page.split("<style>")[0]  # self-contained
    summary = json.loads((tmp_path / f"graph{report.graph_id}.json").read_text())
    assert summary["counts"]["softmax"] == 1
    (softmax,) = [p for p in summary["passes"] if p["name"] == "softmax"]
    assert softmax["rewrites"] == 1 and softmax["error"] is None


def test_html_lists_rejected_candidates(tmp_path):
    def near_miss(s):
        e = torch.exp(s - s.amax(-1, keepdim=True))
        return e / e.sum(1, keepdim=True)

    compiled = torch.compile(near_miss, backend="attnopt", options={"inner": "eager"})
    compiled(torch.randn(3, 4, 5))  # (for 2-D input, dim 1 *is* dim -1)
    (report,) = attnopt.reports()
    assert report.rejected == ["div: amax over [-1] but sum over [1]: not a softmax over one dim"]
    report.write_html(tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "Rejected candidates" in page and "amax over [-1] but sum over [1]" in page


def test_verify_records_error_and_catches_a_wrong_rewrite(monkeypatch):
    with torch.no_grad():
        (report,) = assert_matches_eager(Net().eval(), inputs(),
                                         options={"inner": "eager", "verify": True})
    assert report.verify_max_abs_error is not None and report.verify_max_abs_error < 1e-5

    import attnopt.passes.softmax as softmax_module

    wrong = softmax_module.rewrite
    monkeypatch.setattr(softmax_module.softmax_pass.rules[0], "rewrite",
                        lambda m, g, ctx: wrong(m, g, ctx).update_arg(2, 1.0) or
                        next(n for n in reversed(g.nodes) if "attnopt" in str(n.target)))
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="differs from eager"):
        torch.compile(Net().eval(), backend="attnopt",
                      options={"inner": "eager", "verify": True, "strict": True})(*inputs())


def test_graph_reused_for_another_layer_gets_that_layers_weights():
    """Dynamo reuses one compiled graph for every module with the same code and shapes and
    passes that module's parameters: frozen weights must not leak from the first module."""

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)

        def forward(self, x):
            x = self.proj(x)
            torch._dynamo.graph_break()
            return torch.softmax(x, -1)

    model = nn.Sequential(Layer(), Layer(), Layer()).eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert_matches_eager(model, x, options={"inner": "eager"})
        weights = [r.frozen_weights for r in attnopt.reports()]
    assert weights.count(2) == 3  # one variant of the projection graph per layer
