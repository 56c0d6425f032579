"""Every method's line in the comparison plots has its own (colour, marker)."""

from __future__ import annotations

import matplotlib.colors as mcolors
import matplotlib.markers as mmarkers

from smartfed.benchmark.report import METHOD_STYLES, method_style
from smartfed.methods import METHODS, load_builtin_methods


def test_every_registered_method_has_its_own_colour_and_marker() -> None:
    load_builtin_methods()
    names = sorted(METHODS)
    styles = {name: method_style(name) for name in names}
    assert set(names) <= set(METHOD_STYLES), "a registered method has no fixed plot style"
    assert len(set(styles.values())) == len(names)
    # distinct one by one too, so no two methods differ only in colour or only in marker
    assert len({c for c, _ in styles.values()}) == len(names)
    assert len({m for _, m in styles.values()}) == len(names)
    for colour, marker in styles.values():
        assert mcolors.is_color_like(colour) and marker in mmarkers.MarkerStyle.markers


def test_unknown_names_get_a_deterministic_style_distinct_on_one_plot() -> None:
    labels = ["smartfed [gamma=1]", "my_method", "fedit", "smartfed", "other [x=2]"]
    taken: list[tuple[str, str]] = []
    for label in labels:
        taken.append(method_style(label, taken))
    assert len(set(taken)) == len(labels)
    assert method_style("my_method") == method_style("my_method")
    assert method_style("my_method") not in METHOD_STYLES.values()
    for colour, marker in taken:
        assert mcolors.is_color_like(colour) and marker in mmarkers.MarkerStyle.markers
