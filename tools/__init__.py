"""Tools around the method (not the method itself): benchmarks, the small reproduction, pictures, TensorBoard
logs of finished runs, publishing on the Hub.
Run them from the repository root as modules, e.g. `python -m tools.bench`."""
