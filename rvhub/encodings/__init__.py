"""Encodings of a vector's tensors: ``lora`` (SVD factors as a PEFT adapter) and ``sparse``.

Each module holds pure functions over tensors and folders; ``docs/lora.md`` describes the layout.
"""
