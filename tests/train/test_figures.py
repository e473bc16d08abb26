"""The report figures' context manager: a PNG on success, nothing on an error, no figure left open either way."""

import pytest

from bertforge.train.figures import saved_figure


def test_a_figure_is_saved_as_png_and_closed(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    open_before = len(plt.get_fignums())
    with saved_figure(tmp_path / "two.png", 1, 2, figsize=(4, 2)) as (fig, axes):
        assert len(axes) == 2
        axes[0].plot([0, 1], [1, 0])
    assert (tmp_path / "two.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(plt.get_fignums()) == open_before


def test_an_error_while_drawing_writes_nothing_and_closes_the_figure(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    open_before = len(plt.get_fignums())
    with pytest.raises(KeyError):
        with saved_figure(tmp_path / "broken.png") as (fig, ax):
            ax.plot([0, 1], [0, 1])
            {}["missing"]
    assert not (tmp_path / "broken.png").exists()
    assert len(plt.get_fignums()) == open_before
