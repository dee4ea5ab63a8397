"""IE quality: single-node ablations against the attribution estimates, and their correlations."""

from __future__ import annotations

import pytest

from icl_circuits.methods.circuits import ERROR, NODE_TYPES, SplicedModel, ie_correlations, ie_quality, node_effects, pearson, spearman

from tests.helpers import setup


def test_ie_quality_rows_and_correlations():
    lm, cfg, saes, batch = setup()
    eff = node_effects(lm, batch, saes, cfg)
    sp = SplicedModel(lm, batch, saes, cfg)
    rows = ie_quality(sp, eff, max_per_sae=3, chunk=4)
    assert rows and all(r["token_type"] in ("input", "output", "arrow") and r["estimate"] != 0 for r in rows)
    r0 = rows[0]
    assert r0["actual"] == pytest.approx(sp.full - sp.metric(sp.ablation([r0["node"]])), abs=1e-6)
    errors = [r for r in rows if r["feature"] == ERROR]
    nonzero_errors = sum(int(eff.effects[k][NODE_TYPES.index(t), -1] != 0) for k in saes.keys for t in ("input", "output", "arrow"))
    assert len(errors) == nonzero_errors > 0  # every non-zero error node, beyond the feature sample
    assert all(sum(r["key"] == k and r["token_type"] == t and r["feature"] != ERROR for r in rows) <= 3
               for k in saes.keys for t in ("input", "output", "arrow"))  # fmt: skip
    per_layer = ie_correlations(rows)
    assert {r["layer"] for r in per_layer} == {0, 1}
    # the headline is the authors' metric: feature nodes only; error nodes are the separate diagnostic
    (pooled,) = ie_correlations(rows, ())
    feats = [r for r in rows if r["feature"] != ERROR]
    assert pooled["n"] == len(feats) and pooled["n_errors"] == len(errors)
    assert pooled["r"] == pytest.approx(pearson([r["estimate"] for r in feats], [r["actual"] for r in feats]))
    assert pooled["r_with_errors"] == pytest.approx(pearson([r["estimate"] for r in rows], [r["actual"] for r in rows]))
    # by default every non-zero feature node is ablated (no sample)
    every = ie_quality(sp, eff, token_types=("arrow",), chunk=8, all_errors=False)
    assert len(every) == sum(int((eff.effects[k][NODE_TYPES.index("arrow"), :-1] != 0).sum()) for k in saes.keys)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0) and pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0) and spearman([1, 2, 3], [3, 1, 2]) == pytest.approx(-0.5)
