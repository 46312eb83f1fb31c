"""Inference: sampling (`sampling`), KV-cache decoding (`decoding`), int8 weights (`quantization`),
and the CPU kernels' view of a model for decoding (`cpu`)."""
