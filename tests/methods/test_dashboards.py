"""Feature dashboards on a real run: a tiny random Gemma 3, a tiny SAE, and this package's own writers
(TVC cleaning, steering heatmap, circuit discovery with faithfulness, example store, dashboards).

The precomputed numbers are checked against direct computations (logit lens = (norm(W_dec) - norm(0)) @ W_U^T,
decoder cosines, densities, token-type masses); the pages over HTTP show every panel and escape what the run holds.
"""

from __future__ import annotations

import http.client
import re
import threading
from urllib.parse import quote

import pytest
import torch

from icl_circuits.methods.dashboards import DashboardConfig, DashboardStore, build_dashboards, decoder_neighbours, logit_lens
from icl_circuits.viz.viewer import RunData, make_server

from tests.helpers import DASHBOARD_LAYER as LAYER
from tests.helpers import EVIL_TASK, SAE_NAME, fired_latent, steered_latent, direct_lens, real_run


@pytest.fixture(scope="module")
def run():
    return real_run()


@pytest.fixture(scope="module")
def server(run):
    srv = make_server(run["root"], "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def get(server, path: str) -> tuple[int, str, dict]:
    con = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=20)
    con.request("GET", path)
    r = con.getresponse()
    body = r.read().decode("utf-8", "replace")
    con.close()
    return r.status, body, dict(r.getheaders())


# -- the precomputed data against direct computations ------------------------------------------------
def test_logit_lens_equals_direct_computation(run):
    lm, sae = run["lm"], run["sae"]
    store = DashboardStore(run["root"] / "dashboards.sqlite")
    logits = direct_lens(lm, sae)
    for latent in range(sae.d_sae):
        d = store.feature(SAE_NAME, latent)
        top, bot = logits[latent].topk(6), (-logits[latent]).topk(6)
        assert [t.token_id for t in d.logit_pos] == top.indices.tolist()
        assert [t.token_id for t in d.logit_neg] == bot.indices.tolist()
        assert [t.value for t in d.logit_pos] == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-4)
        assert [t.value for t in d.logit_neg] == pytest.approx((-bot.values).tolist(), rel=1e-4, abs=1e-4)
        assert [t.text for t in d.logit_pos] == [lm.tokenizer.decode([i]) for i in top.indices.tolist()]
    assert d.final_norm
    # without the norm it is plain W_dec @ W_U^T; blocks of 5 latents give the same as one block
    plain = direct_lens(lm, sae, through_norm=False)
    for chunk in (5, 0):
        tv, ti, bv, bi = logit_lens(lm, sae.W_dec.detach() / sae.cfg.output_scale, 4, final_norm=False, chunk=chunk)
        assert torch.equal(ti, plain.topk(4, dim=1).indices) and torch.equal(bi, (-plain).topk(4, dim=1).indices)
        torch.testing.assert_close(tv, plain.topk(4, dim=1).values, rtol=1e-4, atol=1e-4)


def test_neighbours_density_and_masses_equal_direct_computation(run):
    from icl_circuits.methods.masses import MASS_TYPES, token_type_masses
    from icl_circuits.data.prompts import TYPE_ID, icl_prompts
    from icl_circuits.core.sites import Site

    lm, sae = run["lm"], run["sae"]
    store = DashboardStore(run["root"] / "dashboards.sqlite")
    W = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1)
    cos = W @ W.T
    cos.fill_diagonal_(-2)
    vals, idx = decoder_neighbours(sae.W_dec.detach(), 5, chunk=7)
    assert torch.equal(idx, cos.topk(5, dim=1).indices)
    # density, histogram and masses from one direct pass over the same prompts
    acts, fired, tokens, masses = [], torch.zeros(sae.d_sae), 0, {}
    for task in run["tasks"]:
        b = icl_prompts(lm.tokenizer, task, 3, 4, seed=0)
        x = lm.activations(b.input_ids, [Site(LAYER, "resid_pre")], attention_mask=b.attention_mask)[Site(LAYER, "resid_pre")]
        lat = sae.encode(x).detach()
        keep = b.attention_mask.bool() & (b.token_types != TYPE_ID["bos"])
        lat = lat * keep[..., None]
        tokens += int(keep.sum())
        fired += (lat > 0).flatten(0, 1).sum(0)
        acts.append(lat.flatten(0, 1))
        masses[task.name] = token_type_masses(lat, b.token_types)
    for latent in range(sae.d_sae):
        d = store.feature(SAE_NAME, latent)
        assert [j for j, _ in d.neighbours] == idx[latent].tolist()
        assert [c for _, c in d.neighbours] == pytest.approx(vals[latent].tolist(), abs=1e-4)
        assert d.n_tokens == tokens and d.n_fired == int(fired[latent]) and d.density == pytest.approx(float(fired[latent]) / tokens)
        assert sum(d.hist) == d.n_fired
        assert d.max_act == pytest.approx(float(torch.cat(acts)[:, latent].max()), rel=1e-5)
        for t in d.tasks:
            assert [t.masses[ty] for ty in MASS_TYPES] == pytest.approx(masses[t.task][latent].tolist(), rel=1e-4, abs=1e-5)
        assert {t.task for t in d.tasks} == {n for n, m in masses.items() if float(m[latent].sum()) > 0}
    rows = store.features(SAE_NAME, sort="density", descending=True, limit=100)
    assert [r["density"] for r in rows] == sorted((r["density"] for r in rows), reverse=True) and len(rows) == sae.d_sae
    with pytest.raises(ValueError, match="sort must be one of"):
        store.features(SAE_NAME, sort="density; DROP TABLE features")


# -- the pages over HTTP -------------------------------------------------------------------------------
def test_feature_page_shows_every_panel(run, server):
    for latent in {fired_latent(run), steered_latent(run)}:
        status, body, headers = get(server, f"/feature/{SAE_NAME}/{latent}")
        assert status == 200
        for panel in ("logit-lens", "density", "icl-prompts", "neighbours"):
            assert f"id='{panel}'" in body, panel
        assert "<svg" in body and "class='chart histogram'" in body
        assert "<script" not in body.lower() and "script-src 'none'" in headers["Content-Security-Policy"]
    status, body, _ = get(server, f"/feature/{SAE_NAME}/{steered_latent(run)}")
    assert "id='steering'" in body and "class='chart steering'" in body  # measured by the heatmap
    assert f"href='/feature/{SAE_NAME}/" in body.split("id='neighbours'")[1]  # neighbours link to feature pages


def test_task_circuit_and_list_pages(run, server):
    status, body, _ = get(server, "/task/antonyms")
    assert status == 200 and "id='task-weights'" in body and "id='tvc-curves'" in body
    assert "class='chart tvc-l0'" in body and "class='chart tvc-loss'" in body and "<polyline" in body
    status, body, _ = get(server, "/circuit/0")
    assert status == 200 and "id='circuit-graph'" in body and "id='faithfulness-curve'" in body and "id='circuit-filter'" in body
    assert re.search(r"<title>resid\.[01]/\d+@\w+ — token type: \w+ — effect: ", body)  # hover text: node, token type, effect
    n_all = body.count("class='node'")
    status, body, _ = get(server, "/circuit/0?type=arrow")
    assert status == 200 and 0 < body.count("class='node'") <= n_all and "@output" not in body.split("id='circuit-graph'")[1].split("</svg>")[0]
    status, body, _ = get(server, f"/sae/{SAE_NAME}?sort=max_act&order=asc")
    assert status == 200 and "id='feature-list'" in body
    rows = re.findall(r"<tr><td><a href='/feature/resid_1/(\d+)'>.*?</td><td>[^<]*</td><td>[^<]*</td><td>([^<]*)</td>", body)
    assert len(rows) == run["sae"].d_sae
    maxes = [float(m) for _, m in rows]
    assert maxes == sorted(maxes)
    assert get(server, f"/sae/{SAE_NAME}?sort=nope")[0] == 404


def test_search_redirects_to_the_feature(server):
    status, _, headers = get(server, f"/goto?sae={SAE_NAME}&latent=3")
    assert status == 303 and headers["Location"] == f"/feature/{SAE_NAME}/3" and "Content-Security-Policy" in headers
    assert get(server, f"/goto?sae={SAE_NAME}&latent=abc")[0] == 400
    assert get(server, "/goto?sae=nope&latent=3")[0] == 400


def test_markup_in_tokens_and_task_names_is_escaped(run, server):
    latent = fired_latent(run)
    status, body, _ = get(server, f"/feature/{SAE_NAME}/{latent}")
    assert "&lt;b&gt;x&lt;/b&gt;" in body and "<b>x</b>" not in body  # the token, in the ICL prompts
    assert "&lt;img src=x onerror=alert(2)&gt;" in body and "<img src=x" not in body  # the task name
    for path in ("/", "/tasks", "/task/" + quote(EVIL_TASK, safe=""), "/circuit/0", f"/sae/{SAE_NAME}"):
        status, body, _ = get(server, path)
        assert status == 200, path
        assert "<img src=x" not in body and "<b>x</b>" not in body and "<script" not in body.lower(), path


def test_data_layer_reads_the_dashboards_typed(run):
    data = RunData(run["root"])
    assert data.dashboard_for(SAE_NAME) is not None and SAE_NAME in data.sae_names()
    fd = data.feature(SAE_NAME, steered_latent(run))
    assert fd["dashboard"].latent == steered_latent(run) and fd["heatmap_rows"]
    assert data.feature(SAE_NAME, 10_000)["dashboard"] is None  # a latent the file does not hold


@pytest.mark.bundled
def test_build_on_the_bundled_model(bundled, tmp_path):
    """Gemma 3 270M (vocab 262k): the logit lens runs in latent blocks and matches the direct product."""
    from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig
    from icl_circuits.data.tasks import load_tasks

    lm, n = bundled, 300
    g = torch.Generator().manual_seed(0)
    W = torch.nn.functional.normalize(torch.randn(n, lm.d_model, generator=g), dim=1)
    cfg = SAEConfig(d_in=lm.d_model, d_sae=n, site="resid_pre.6", layer=6, model=lm.name)
    sae = JumpReLUSAE(cfg, dict(W_enc=W.T * 0.05, b_enc=torch.zeros(n), W_dec=W, b_dec=torch.zeros(lm.d_model), threshold=torch.full((n,), 0.5)))
    path = build_dashboards(lm, {"resid_6": sae}, tmp_path, load_tasks(["antonyms", "country_capital"]),
                            DashboardConfig(n_prompts=2, n_shots=4, chunk=128), progress=False)  # fmt: skip
    store = DashboardStore(path)
    norm = lm._base.norm
    logits = (norm(W[:3]) - norm(torch.zeros(1, lm.d_model))).float() @ lm.model.get_output_embeddings().weight.float().T
    for i in range(3):
        d = store.feature("resid_6", i)
        assert [t.token_id for t in d.logit_pos] == logits[i].topk(10).indices.tolist() and d.final_norm
    assert store.count("resid_6") == n and store.feature("resid_6", 0).n_tokens > 0
