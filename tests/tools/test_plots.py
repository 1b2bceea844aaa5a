from pgolf.tools.plots import plot_bars, plot_lines


def test_png_files_are_written(tmp_path):
    p = tmp_path / "curve.png"
    plot_lines(p, {"train": ([0, 1, 2], [3.0, 2.0, 1.5]), "val": ([0, 2], [3.1, 1.7])},
               "loss", "step", "nats", logx=True)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    b = tmp_path / "bars.png"
    plot_bars(b, ["a", "b"], [1.0, 2.0], "err", "mse")
    assert b.read_bytes()[:4] == b"\x89PNG"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bars.png", "curve.png"]
