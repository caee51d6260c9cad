"""lab/model/flops.py: the shape-only FLOPs bound that config validation uses."""

import pytest

from lab.config import resolve
from lab.model.flops import flops_per_token_lower_bound
from lab.model.params import model_flops_per_token
from lab.presets import PRESETS

VARIANTS = ("baseline", "sdpa_elementwise_sigmoid_mul", "sdpa_headwise_sigmoid_mul",
            "value_elementwise_sigmoid_mul", "baseline_add4experts")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_the_shape_only_bound_never_exceeds_the_counted_model_and_is_close(preset):
    from lab.errors import LabError

    checked = 0
    for variant in VARIANTS:
        try:
            config = resolve(variant, preset)
        except LabError:  # an MoE-only variant at a dense preset
            continue
        bound, counted = flops_per_token_lower_bound(config.model), model_flops_per_token(config)
        assert 0.9 * counted < bound <= counted, (variant, bound, counted)
        checked += 1
    assert checked >= 3
