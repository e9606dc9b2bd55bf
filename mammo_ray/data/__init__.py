"""Data: decoding, transforms, inputs, split, the Ray Data pipeline and synthetic phantoms."""
