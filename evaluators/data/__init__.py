"""Dataset sources (one module per kind), the dataset spec, and the streaming input pipeline.

`evaluators.datasets` is the entry point (`load`, `load_dataset`, `check_dataset`, `Dataset`).
"""
