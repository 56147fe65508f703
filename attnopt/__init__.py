"""attnopt: a graph-rewriting torch.compile backend for transformer inference.

    model = torch.compile(model, backend="attnopt")            # nothing to import
    attnopt.reports()[-1].diff()                               # what was rewritten, and why not
"""

from attnopt.backends import ops  # registers torch.ops.attnopt.*
from attnopt.compiler.options import Options
from attnopt.compiler.report import CompileReport, PassRecord, clear_reports, reports
from attnopt.quantization import load_quantized, quantize_model, save_quantized

__all__ = ["CompileReport", "Options", "PassRecord", "clear_reports", "ops", "reports"]
__all__ += ["load_quantized", "quantize_model", "save_quantized"]
__version__ = "0.1.0"
