"""Jupyter integration: the `%%fabric` and `%fabric` magics."""

from nbfabric.notebook.magics import FabricMagics


def load_ipython_extension(ipython) -> None:
    """`%load_ext nbfabric` registers the magics."""
    ipython.register_magics(FabricMagics)
