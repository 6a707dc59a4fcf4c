"""recscale trainers."""
