"""Compression: quantization (quantize.py, nf4.py, smoothquant.py) as in-place module transforms."""
