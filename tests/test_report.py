"""Figures: one colour per estimator, whatever else a figure shows."""

from gradest.estimators import REGISTRY
from gradest.report import NO_ESTIMATOR_COLOUR, estimator_colour, estimator_styles


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
