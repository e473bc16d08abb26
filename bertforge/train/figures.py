"""Figures of the reports and benchmarks, drawn with matplotlib on its file-only backend."""

import contextlib


@contextlib.contextmanager
def saved_figure(path, nrows: int = 1, ncols: int = 1, **subplots):
    """`plt.subplots(nrows, ncols, **subplots)` as (fig, axes); the figure is laid out and saved to `path` (PNG,
    120 dpi) when the block ends without an error, and closed in any case (pyplot keeps open figures alive)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: these run on servers and in CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=120, bbox_inches="tight")  # long tick labels and titles are not cut off
    finally:
        plt.close(fig)
