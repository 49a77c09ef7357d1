"""L1, bytes: safetensors headers and ranged reads, the slab pipeline, atomic outputs, the
streaming kernels, GPU copies, progress bars and device choice. Nothing here knows models."""
