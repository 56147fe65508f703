"""The offline int4 path: quantize a model once (RTN or AWQ), save it, load it many times.

    summary = quantize_model(model, method="awq", calibration=[tokenizer(text, ...) ...])
    save_quantized(model, "minilm-int4", summary)
    model = load_quantized(AutoModel.from_config(config), "minilm-int4")
"""

from attnopt.quantization.checkpoint import load_quantized, save_quantized
from attnopt.quantization.model import quantize_model
from attnopt.quantization.modules import Int4Linear
from attnopt.quantization.summary import LayerSummary, QuantizationSummary

__all__ = ["Int4Linear", "LayerSummary", "QuantizationSummary", "load_quantized",
           "quantize_model", "save_quantized"]
