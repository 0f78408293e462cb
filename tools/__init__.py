"""Utilities on saved runs: pictures of reconstructions, TensorBoard logs of finished runs, publishing a model on the
Hub. Run them from the repository root as modules, e.g. `python -m tools.visualize`."""
