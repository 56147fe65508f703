"""attnopt: a graph-rewriting torch.compile backend for transformer inference.

    model = torch.compile(model, backend="attnopt")            # nothing to import
    attnopt.reports()[-1].diff()                               # what was rewritten, and why not
    attnopt.export_onnx(model, "model.onnx", kwargs=inputs)   # offline: torch.export + passes
"""

from attnopt.backends import ops  # registers torch.ops.attnopt.*
from attnopt.compiler.export import export_onnx
from attnopt.compiler.offline import Rewritten, rewrite_model
from attnopt.compiler.options import Options
from attnopt.compiler.report import CompileReport, PassRecord, clear_reports, reports
from attnopt.quantization import load_quantized, quantize_model, save_quantized

__all__ = ["CompileReport", "Options", "PassRecord", "clear_reports", "ops", "reports"]
__all__ += ["load_quantized", "quantize_model", "save_quantized"]
__all__ += ["Rewritten", "export_onnx", "rewrite_model"]
__version__ = "0.1.0"
