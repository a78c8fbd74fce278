"""Dataset readers, the input pipeline and the demo-data generator."""
