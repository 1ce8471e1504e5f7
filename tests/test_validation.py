"""The committed calibration is reproducible and meets its out-of-sample targets.

This runs the same fit as `servesim validate seed004` (about a minute and a half on two
cores), without rewriting the committed profile, and checks both.
"""

from __future__ import annotations

import pytest

from calibration.validate import validate
from sim.profile import load_profile


@pytest.mark.parametrize("split", ["seed004"])
def test_validation_meets_targets_and_reproduces_the_committed_profile(split, tmp_path):
    res = validate(split, progress=False, write_profile=False, out_dir=tmp_path)
    assert res.ok, res.failures
    held = res.predictions[~res.predictions.train]
    assert not set(held.row_id) & set(res.split.train)
    committed = load_profile(res.split.profile)
    assert committed.hardware == res.fitter.hardware_
    for k, v in res.fitter.coeffs_.as_dict().items():
        assert getattr(committed.coeffs, k) == pytest.approx(v, rel=1e-3), k
    assert (tmp_path / "report.md").exists() and (tmp_path / "mean_ttft_ms.png").exists()
