"""The work behind `mighty quantize`: quantize a loaded float model by method name (calibrating first where the
method measures activations: SmoothQuant) and measure how far the outputs moved on the probe text, so that the
cost is printed, not assumed. The verb itself only checks --out, loads, calls this and writes."""

from __future__ import annotations

import torch

from mightylm.compress import DEFAULT_TARGETS, QuantizationError
from mightylm.compress.quantize import METHODS, model_bytes, quantize_


def check_request(method: str, *, calib: str | None, head: bool) -> None:
    """Refuse a request that cannot work, before any model is loaded."""
    if method not in METHODS:
        raise QuantizationError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    if head and not METHODS[method].weight_only:
        raise QuantizationError(f"--head applies to the weight-only methods "
                                f"({', '.join(m for m in METHODS if METHODS[m].weight_only)}); {method} quantizes "
                                "the projections only")
    if not METHODS[method].weight_only and not calib:
        raise QuantizationError(f"{method} needs --calib: text to measure activation ranges on")


@torch.no_grad()
def quantize_model(net, tokenizer, method: str, *, calib: str | None = None, calib_windows: int = 8,
                   head: bool = False, **settings) -> dict:
    """Quantize `net` in place with `method`; `settings` may hold every method's options (each method takes its
    own from METHODS). Returns {"modules", "bytes_before", "bytes_after", "change"}."""
    from mightylm.compress.probe import output_change, probe_ids

    check_request(method, calib=calib, head=head)
    if net.quantization:
        raise QuantizationError(f"the model is already quantized ({net.quantization['method']}); "
                                "quantize the float model instead")
    probe = probe_ids(tokenizer)
    before = model_bytes(net)
    reference = net(probe)
    params = {k: v for k, v in settings.items() if k in METHODS[method].options}
    if not METHODS[method].weight_only:  # SmoothQuant: activation ranges measured on the calibration text first
        from mightylm.compress.calibration import calibration_batches
        from mightylm.compress.smoothquant import smooth_quantize_

        names = smooth_quantize_(net, calibration_batches(calib, tokenizer, calib_windows), **params)
    else:
        names = quantize_(net, method, targets=DEFAULT_TARGETS + (("lm_head",) if head else ()), **params)
    return {"modules": names, "bytes_before": before, "bytes_after": model_bytes(net),
            "change": output_change(net(probe), reference)}
