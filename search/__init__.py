"""recscale search."""
