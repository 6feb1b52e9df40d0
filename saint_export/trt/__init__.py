"""TensorRT: the similarity top-k plugin (plugin.py) and engine building (engine.py)."""
