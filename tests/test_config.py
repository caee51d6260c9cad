"""lab/config.py: what makes a grid cell's identity."""

import hashlib
import json

from lab.config import ANALYSIS_FIELDS, resolve


def test_fields_added_later_keep_old_cell_identities_at_their_default():
    plain = resolve("baseline", "tiny")
    assert "residual_init_scale" in plain.to_dict()["model"]
    # The identity a store recorded before the field existed: the same dict without it.
    raw = plain.to_dict()
    raw["train"] = {k: v for k, v in raw["train"].items() if k not in ANALYSIS_FIELDS}
    del raw["model"]["residual_init_scale"]
    old = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert plain.hash() == old
    assert resolve("baseline", "tiny", ["model.residual_init_scale=0.5"]).hash() != old


def test_analysis_fields_do_not_change_the_identity():
    plain = resolve("baseline", "tiny")
    more = resolve("baseline", "tiny", ["train.analysis_windows=3"])
    assert plain.hash() == more.hash()
    assert resolve("baseline", "tiny", ["train.lr=1e-3"]).hash() != plain.hash()
