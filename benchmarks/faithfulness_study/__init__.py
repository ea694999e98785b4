"""The jobs of benchmarks/faithfulness.py, one module each (see its docstring)."""
