"""Figures: one colour per estimator, whatever else a figure shows."""

import colorsys

from gradest.estimators import REGISTRY
from gradest.figures import NO_ESTIMATOR_COLOUR, estimator_colour, estimator_styles


def test_an_estimator_has_one_colour_in_every_figure():
    """The colour depends on the estimator alone, not on which others a figure holds or their order; every
    estimator's differs from every other's and from the grey of labels that name none; variants are shades of
    their estimator's colour."""
    names = sorted(REGISTRY)
    alone = {name: estimator_styles([name])[name]["color"] for name in names}
    together = estimator_styles(list(reversed(names)) + ["dense"])
    assert all(together[name]["color"] == alone[name] for name in names)
    assert len(set(alone.values())) == len(names) and NO_ESTIMATOR_COLOUR not in alone.values()
    assert together["dense"]["color"] == NO_ESTIMATOR_COLOUR
    for label in ("reinforce(baseline=mean)", "sparsemixer(mask=none)", "switch + omega", "st(tau=0.5)"):
        base, shade = estimator_colour(label.split("(")[0].split(" ")[0]), estimator_colour(label)
        assert shade != base and all(s >= b for s, b in zip(shade, base))  # lighter, same hue family
    assert estimator_colour("reinforce(baseline=zero)") != estimator_colour("reinforce(baseline=mean)")
    # routers drawn in one panel of a training study are told apart at a glance: hues at least 60 degrees apart
    for panel in (("switch", "sparsemixer", "densemixer", "default-moe"), ("topk", "sparsemixer-v2", "sparsemixer-v2*")):
        hues = [360 * colorsys.rgb_to_hsv(*estimator_colour(name))[0] for name in panel]
        assert all(min(abs(a - b), 360 - abs(a - b)) >= 60
                   for i, a in enumerate(hues) for b in hues[i + 1:]), panel


def test_a_ratios_bar_names_its_group_when_labels_recur():
    """Grouped by preset, `switch` and `sparsemixer` occur once per group: each bar names its group, every panel
    has a row per run (a metric a run lacks leaves its row empty), and the names are on the first panel only."""
    import numpy as np
    import pandas as pd
    from gradest.figures import ratios_figure
    summary = pd.DataFrame({"label": ["switch", "sparsemixer"] * 2,
                            "val_loss_diff": [0.0, -0.05, 0.0, 0.01], "time_ratio": [1.0, 1.1, 1.0, np.nan]})
    for metric in ("val_loss_diff", "time_ratio"):
        summary[f"{metric}_lo"], summary[f"{metric}_hi"] = summary[metric] - 0.01, summary[metric] + 0.01
    fig = ratios_figure(summary, "switch", ["val_loss_diff", "time_ratio"], ["none", "none", "ref", "ref"], "preset")
    names, time = fig.axes
    assert [t.get_text() for t in names.get_yticklabels()] == ["switch (none)", "sparsemixer (none)",
                                                               "switch (ref)", "sparsemixer (ref)"]
    assert [bar.get_y() + bar.get_height() / 2 for bar in time.patches] == [0, 1, 2]  # the missing row left empty
    assert "preset" in fig._suptitle.get_text()
    ungrouped = ratios_figure(summary.iloc[:2], "switch", ["val_loss_diff"])
    assert [t.get_text() for t in ungrouped.axes[0].get_yticklabels()] == ["switch", "sparsemixer"]
