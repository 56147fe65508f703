"""What `quantize_model` did, layer by layer: the numbers to judge a quantized checkpoint by."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerSummary:
    name: str  # module path, e.g. encoder.layer.0.attention.self.query
    in_features: int
    out_features: int
    weight_error: float  # ‖W − Ŵ‖ / ‖W‖, Ŵ the effective weight (input_scale folded back in)
    transposed_source: bool = False  # the float layer stored its weight [in, out] (Conv1D)
    # AWQ: ‖ΔY‖ / ‖Y‖ on the calibration rows, plain RTN vs the chosen scale, and its α.
    rtn_output_error: float | None = None
    awq_output_error: float | None = None
    alpha: float | None = None
    output_error: float | None = None  # GPTQ: ‖ΔY‖ / ‖Y‖ of the layer made, same rows
    note: str = ""  # why a layer differs from the rest (not called during calibration, say)


@dataclass
class QuantizationSummary:
    method: str  # "rtn", "awq", "gptq" or "gptq+awq"
    group_size: int
    skip: tuple[str, ...]
    layers: list[LayerSummary] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module, glob that kept it)

    def table(self) -> list[tuple[str, ...]]:
        """Rows for printing, the first one the header: one row per quantized layer."""
        header = ("layer", "shape", "weight err")
        if self.method != "rtn":
            header += ("RTN out err",)
        if "awq" in self.method:
            header += ("AWQ out err",)
        if "gptq" in self.method:
            header += (f"{self.method.upper()} out err",)
        if self.method != "rtn":
            header += ("alpha",) if "awq" in self.method else ("note",)
        rows = [header]
        for layer in self.layers:
            row = (layer.name, f"{layer.out_features}x{layer.in_features}",
                   f"{layer.weight_error:.4f}")
            if self.method != "rtn":
                row += (_number(layer.rtn_output_error),)
            if "awq" in self.method:
                row += (_number(layer.awq_output_error),)
            if "gptq" in self.method:
                row += (_number(layer.output_error),)
            if self.method != "rtn":
                row += (layer.note or (_number(layer.alpha, ".2f") if "awq" in self.method
                                       else "-"),)
            rows.append(row)
        return rows


def _number(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)
