"""recscale analysis."""
