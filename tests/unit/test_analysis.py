"""lab/analysis/ (probes, metrics, perplexity, names, outputs): the paper's metrics (docs/paper.md
§8) against hand computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lab.analysis.metrics import analyze
from lab.analysis.names import layer_metric, long_context_metric
from lab.analysis.outputs import LAYER_TABLE, layer_metrics, layer_table, write_outputs
from lab.analysis.probes import ProbeRecorder, record
from lab.config import resolve
from lab.data.store import write_store
from lab.errors import LabError
from lab.model.config import ModelConfig
from lab.model.decoder import Decoder, RotaryEmbedding
from lab.model.gates import GateSpec

TINY = dict(vocab_size=32, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8,
            ffn_hidden=64, context=16)


def tiny_store(path, vocab=32, n=4000, seed=0):
    """Random tokens 1..vocab-1 with an end-of-text (0) opening a document every ~20 tokens."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split in ("train", "valid", "test"):
        tokens = rng.integers(1, vocab, size=n)
        tokens[rng.random(n) < 0.05] = 0
        tokens[0] = 0
        splits[split] = tokens
    return write_store(path, splits, vocab, eos_id=0, source="test", tokenizer_hash="test")


def rotate_by_hand(x, base=10000.0):
    """RoPE, rotate-half layout, written out: pair (i, i + D/2) turns by pos * base^(-2i/D)."""
    T, D = x.shape[1], x.shape[-1]
    half = D // 2
    angle = torch.arange(T)[:, None] * base ** (-torch.arange(half) * 2 / D)  # (T, D/2)
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    a, b = x[..., :half], x[..., half:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def test_first_token_attention_equals_hand_computation():
    torch.manual_seed(0)
    model = Decoder(ModelConfig(**{**TINY, "init_std": 0.3})).eval()
    tokens = torch.randint(0, 32, (3, 16))
    recorder = record(model, tokens, ProbeRecorder(2, None))

    # Layer 0 by hand: norm, projections, QK-norm, RoPE, GQA, causal softmax.
    H, G, D = 4, 2, 8
    attn = model.blocks[0].attn
    with torch.no_grad():
        h = model.blocks[0].attn_norm(model.embed(tokens))
        q, k = h @ attn.in_proj.weight[:H * D].T, h @ attn.in_proj.weight[H * D:(H + G) * D].T
        q = rotate_by_hand(attn.q_norm(q.view(3, 16, H, D)))
        k = rotate_by_hand(attn.k_norm(k.view(3, 16, G, D))).repeat_interleave(H // G, dim=2)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        logits = logits.masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(), -math.inf)
        probs = logits.softmax(dim=-1)
    expected = probs[:, :, 1:, 0].mean().item()  # query 0 excluded (lab/analysis/probes.py)
    assert recorder.mean("first_token_attn")[0] == pytest.approx(expected, rel=1e-5)
    received = probs[:, :, 1:, :].mean(dim=(0, 1, 2))
    assert recorder.top_key()[0][0] == int(received.argmax())
    # Per head (the sink's head share) and the largest logit (Wortsman et al.), by hand too.
    per_head = probs[:, :, 1:, 0].mean(dim=(0, 2))
    assert recorder.head_first_token_attn()[0] == pytest.approx(per_head.tolist(), rel=1e-5)
    assert recorder.logit_maxima()[0] == pytest.approx(logits.max().item(), rel=1e-5)


def forced_sink_model(layers=2) -> Decoder:
    """Every query's logit on the BOS token (id 0) is ~70, on every other key 0; values and
    outputs are zero, so the residual stream (and the sink) is the same in every layer."""
    cfg = ModelConfig(**{**TINY, "n_layers": layers, "qk_norm": False})
    model = Decoder(cfg).eval()
    H, G, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    slowest = D // 2 - 1  # the lowest RoPE frequency: rotation under 0.02 rad within 16 tokens
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.zero_()
        model.embed.weight[:, 1] = 1.0   # a constant feature: the query reads it
        model.embed.weight[0, 0] = 1.0   # a BOS-only feature: the key reads it
        for block in model.blocks:
            w = block.attn.in_proj.weight
            for head in range(H):
                w[head * D + slowest, 1] = 3.0
            for group in range(G):
                w[H * D + group * D + slowest, 0] = 3.0
    return model


def test_attention_forced_onto_position_zero_gives_first_token_attention_near_one():
    model = forced_sink_model()
    tokens = torch.randint(1, 32, (2, 16))
    tokens[:, 0] = 0
    recorder = record(model, tokens, ProbeRecorder(2, None))
    assert all(value > 0.99 for value in recorder.mean("first_token_attn"))
    assert recorder.top_key()[0] == [0, 0]
    assert all(value > 0.99 for layer in recorder.head_first_token_attn() for value in layer)
    # the BOS logit (~70, the docstring's), the same in both layers (same residual stream)
    first, second = recorder.logit_maxima()
    assert 60 < first < 80 and second == pytest.approx(first, rel=1e-5)


def test_sink_head_share_counts_heads_over_the_threshold(tmp_path):
    """All heads of the forced-sink model exceed any threshold below 1, none exceed 1; the
    short windows (the first 64 tokens, or fewer) give the same verdict."""
    store = tiny_store(tmp_path / "store")
    model = forced_sink_model()
    for threshold, share in ((0.3, 1.0), (0.999999, 0.0)):
        config = resolve("baseline", "tiny", {"model.vocab_size": "32", "model.context": "16",
                                              "model.qk_norm": "false",
                                              "train.sink_head_threshold": str(threshold),
                                              "train.sink_short_window": "8"})
        m = analyze(model, store, config, windows=4, factors=()).metrics
        assert m["sink/head_share"] == m["sink/head_share_short"] == share
        assert 0.3 < m["sink/first_token_attn_short"] <= 1  # other end-of-text tokens share it
        assert m["attn/logit_max"] == max(m[f"layers/attn/logit_max/layer_{i}"] for i in (0, 1))


def test_yarn_factor_one_equals_plain_rope():
    plain = RotaryEmbedding(16, 10000.0, 128)
    assert torch.equal(RotaryEmbedding(16, 10000.0, 128, yarn_factor=1.0).inv_freq, plain.inv_freq)
    torch.manual_seed(0)
    model = Decoder(ModelConfig(**TINY)).eval()
    tokens = torch.randint(0, 32, (2, 48))  # beyond the trained context, where YaRN matters
    before = model(tokens)
    model.set_yarn(1.0)
    assert torch.equal(model(tokens), before)
    model.set_yarn(4.0)
    assert not torch.allclose(model(tokens), before)


def test_yarn_follows_the_yarn_paper():
    """Peng et al. 2023: r = L / wavelength; keep theta where r > 32, theta / s where r < 1,
    a linear ramp between; logits scaled by (0.1 ln s + 1)^2 (HF/vLLM scale cos and sin)."""
    D, L, s = 64, 1024, 4.0  # both ends of the ramp occur at this context
    yarn = RotaryEmbedding(D, 10000.0, L, yarn_factor=s)
    theta = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    r = L / (2 * math.pi / theta)
    for i in range(D // 2):
        ramp = min(max((r[i].item() - 1) / 31, 0.0), 1.0)
        expected = (1 - ramp) * theta[i].item() / s + ramp * theta[i].item()
        assert yarn.inv_freq[i].item() == pytest.approx(expected, rel=1e-6)
    assert yarn.inv_freq[0].item() == pytest.approx(1.0)           # r > 32: kept
    assert yarn.inv_freq[-1].item() == pytest.approx(theta[-1].item() / s, rel=1e-6)  # r < 1
    assert yarn.attention_scale == pytest.approx((0.1 * math.log(s) + 1) ** 2)


def test_gate_statistics_and_sparsity_on_a_hand_made_tensor():
    recorder = ProbeRecorder(1, GateSpec())
    y = torch.tensor([0.5, 0.005, 0.0005, 2.0]).view(1, 1, 1, 4)   # (B, T, H, D)
    scores = torch.tensor([1.0, 1.0, 0.01, 0.001]).view(1, 1, 1, 4)
    recorder(0, "sdpa_out", y)
    recorder(0, "gate_scores", scores)
    recorder(0, "sdpa_out_gated", y * scores)  # [0.5, 0.005, 5e-6, 0.002]
    # before: 0.005 and 0.0005 are below 1e-2, only 0.0005 below 1e-3
    assert recorder.mean("sdpa_below_1e-2") == [0.5]
    assert recorder.mean("sdpa_below_1e-3") == [0.25]
    assert recorder.mean("sdpa_gated_below_1e-2") == [0.75]
    assert recorder.mean("sdpa_gated_below_1e-3") == [0.25]
    # average gate: y x 0.50275 = [0.25, 0.0025, 0.00025, 1.0]
    assert recorder.mean("sdpa_average_gate_below_1e-2") == [0.5]
    assert recorder.mean("sdpa_average_gate_below_1e-3") == [0.25]
    assert recorder.mean("sdpa_gated_abs_mean")[0] == pytest.approx((0.5 + 0.005 + 5e-6 + 0.002) / 4)
    stats = recorder.gate_layers()
    assert stats["gate_mean"][0] == pytest.approx(0.50275)
    assert stats["gate_std"][0] == pytest.approx(scores.flatten().std(unbiased=False).item(), rel=1e-5)
    assert (stats["gate_min"], stats["gate_max"]) == ([pytest.approx(0.001)], [1.0])


@pytest.mark.parametrize("variant", ["baseline", "sdpa_elementwise_sigmoid_mul"])
def test_metrics_of_gated_and_ungated_models_are_present_and_finite(tmp_path, variant):
    store = tiny_store(tmp_path / "store")
    config = resolve(variant, "tiny", {"model.vocab_size": "32", "model.context": "16",
                                       "train.long_context_factors": "1,2,4"})
    torch.manual_seed(0)
    model = Decoder(config.model)
    rope = model.rope
    result = analyze(model, store, config, windows=4)
    assert model.training and model.rope is rope  # left as it came
    m = result.metrics
    expected = ["sink/first_token_attn", "sink/first_token_attn_random", "sink/eos_attn_random",
                "sink/head_share", "sink/head_share_random", "sink/head_share_short",
                "sink/first_token_attn_short", "sink/head_share_short_random",
                "sink/first_token_attn_short_random", "attn/logit_max", "layers/attn/logit_max/layer_1",
                "act/max_mean", "act/ffn_output_max_mean", "sdpa/sparsity_1e-2",
                "layers/sink/first_token_attn/layer_1", "layers/act/max/layer_0"]
    expected += [long_context_metric(f, yarn) for f, yarn in
                 ((1, False), (2, False), (2, True), (4, False), (4, True))]
    gated = ["gate/mean", "gate/std", "gate/min", "gate/max", "sdpa/sparsity_1e-2_gated",
             "sdpa/sparsity_1e-3_average_gate", "layers/gate/mean/layer_1"]
    if variant == "baseline":
        assert not any(name in m for name in gated)
    else:
        expected += gated
        assert 0 < m["gate/min"] <= m["gate/mean"] <= m["gate/max"] < 1
    for name in expected:
        assert math.isfinite(m[name]), name
    assert 0 <= m["sink/first_token_attn"] <= 1
    # M-Act (spec 5): the mean over layers of the residual stream's max after each layer.
    assert m["act/max_mean"] == pytest.approx(np.mean(result.per_layer["max_ffn_residual"]))
    files = {p.name for p in write_outputs(result, tmp_path / "out")}
    pngs = {"first_token_attn.png", "max_activation.png", "attention_maps.png", "long_context.png"}
    assert pngs | {"analysis.json"} <= files
    assert ("gate_scores.png" in files) == (variant != "baseline")


def test_analysis_of_a_compiled_model_never_goes_through_its_compiled_call(tmp_path):
    """Every analysis forward is eager: through an in-place torch.compile, each long-context
    length was a new graph (about 90 s of recompiles per run at `small`, and Dynamo's
    recompile limit spent for the next cells of a grid worker). The backend here counts the
    graphs it is given."""
    compiled = []

    def counting(graph, example_inputs):
        compiled.append(graph)
        return graph.forward

    store = tiny_store(tmp_path / "store")
    config = resolve("sdpa_elementwise_sigmoid_mul", "tiny", {
        "model.vocab_size": "32", "model.context": "16", "train.long_context_factors": "1,2,4",
        "data.bos_prefix": "true"})
    torch.manual_seed(0)
    model = Decoder(config.model)
    model.compile(backend=counting)
    torch.compiler.reset()
    m = analyze(model, store, config, windows=4).metrics
    assert math.isfinite(m["long/ppl_4x"]) and math.isfinite(m["sink/ppl_without_bos"])
    assert compiled == []
    model(torch.zeros(1, 8, dtype=torch.long))
    assert compiled  # the compiled call does reach the backend
    torch.compiler.reset()


def test_analysis_settings_do_not_change_the_config_hash():
    config = resolve("baseline", "tiny")
    changed = resolve("baseline", "tiny", {"train.analysis_windows": "0",
                                           "train.long_context_factors": ""})
    assert changed.hash() == config.hash()
    with pytest.raises(LabError, match="train.long_context_factors"):
        resolve("baseline", "tiny", {"train.long_context_factors": "2,x"})


def test_non_finite_weights_are_skipped(tmp_path):
    store = tiny_store(tmp_path / "store")
    config = resolve("baseline", "tiny", {"model.vocab_size": "32", "model.context": "16"})
    model = Decoder(config.model)
    with torch.no_grad():
        model.blocks[0].attn.o_proj.weight[0, 0] = float("nan")
    assert analyze(model, store, config, windows=2).skipped == "non-finite weights"


@pytest.mark.slow
def test_training_run_records_the_metrics_and_analyze_writes_the_plots(tmp_path, monkeypatch):
    """Acceptance: a run carries sink/act/gate metrics; `gatelab analyze <run id>` logs plots."""
    from lab import records
    from lab.cli import main
    from lab.training.run import train_run

    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "mlruns"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tiny_store(tmp_path / "store")
    config = resolve("sdpa_elementwise_sigmoid_mul", "tiny", {
        "model.vocab_size": "32", "model.context": "16", "train.batch_size": "4",
        "train.val_every": "4", "train.val_batches": "1", "train.log_every": "2",
        "train.analysis_windows": "2", "train.analysis_every": "4",
        "train.long_context_factors": "1,2"}, data=str(tmp_path / "store"), tokens=4 * 16 * 8)
    result = train_run(config, quiet=True)
    mlflow_client = records.client(records.tracking_uri())
    run = mlflow_client.get_run(result.run_id)
    for name in ("sink/first_token_attn", "act/max_mean", "gate/mean", "long/ppl_2x_yarn",
                 "time/analysis_s"):
        assert math.isfinite(run.data.metrics[name]), name
    steps = [m.step for m in mlflow_client.get_metric_history(result.run_id, "gate/mean")]
    assert steps == [4, 8, 8]  # analysis_every=4 as a time series, then the end-of-run analysis

    end_of_run = {a.path for a in mlflow_client.list_artifacts(result.run_id, "analysis")}
    assert {"analysis/analysis.json", "analysis/long_context.png", LAYER_TABLE} <= end_of_run
    # The per-layer metrics as one table: a row per layer, the same values as the metrics.
    table = json.loads(Path(mlflow_client.download_artifacts(result.run_id, LAYER_TABLE,
                                                             str(tmp_path))).read_text())
    assert [row[0] for row in table["data"]] == [0, 1]
    assert "sink/first_token_attn" in table["columns"] and "gate/mean" in table["columns"]
    layers = {k: v for k, v in result.metrics.items()
              if k.startswith("layers/") and math.isfinite(v)}
    assert layer_metrics(table) == pytest.approx(layers)
    # ... and not as metrics: only the analysis_every time series has them (no end-of-run
    # point at step 8 after the interval's).
    history = mlflow_client.get_metric_history(result.run_id, "layers/gate/mean/layer_1")
    assert [m.step for m in history] == [4, 8]
    assert main(["analyze", result.run_id, "--windows", "2", "--long-context", ""]) == 0
    logged = {a.path for a in mlflow_client.list_artifacts(result.run_id, "analysis")}
    assert {"analysis/first_token_attn.png", "analysis/max_activation.png",
            "analysis/gate_scores.png", "analysis/attention_maps.png"} <= logged
    assert main(["analyze", "no-such-run"]) == 2
    # An 8-character prefix of the run id, as MLflow's UI and git users type it.
    assert main(["analyze", result.run_id[:8], "--windows", "1", "--long-context", ""]) == 0


def test_the_layer_table_holds_the_per_layer_metrics_and_reads_back_as_them():
    metrics = {"sink/first_token_attn": 0.5, "act/max_mean": 3.0}
    for layer in range(12):
        metrics[layer_metric("sink/first_token_attn", layer, 12)] = layer / 10
        metrics[layer_metric("act/max", layer, 12)] = 10.0 ** layer
    metrics[layer_metric("gate/mean", 3, 12)] = float("nan")  # left out of MLflow, null here
    table = layer_table(metrics)
    assert table["columns"] == ["layer", "act/max", "gate/mean", "sink/first_token_attn"]
    assert [row[0] for row in table["data"]] == list(range(12))
    assert table["data"][3] == [3, 1000.0, None, 0.3]
    assert table["data"][0][2] is None  # a layer without the metric
    json.dumps(table, allow_nan=False)  # plain JSON: no NaN
    expected = {k: v for k, v in metrics.items() if k.startswith("layers/") and math.isfinite(v)}
    assert layer_metrics(table) == expected
    assert "layers/act/max/layer_07" in layer_metrics(table)  # zero-padded as the metrics


@pytest.mark.parametrize("bos_prefix", [True, False])
def test_long_context_windows_open_with_bos_at_every_factor_when_training_did(tmp_path,
                                                                              monkeypatch,
                                                                              bos_prefix):
    from lab.analysis import perplexity

    store = tiny_store(tmp_path / "store")
    seen = {}

    def record_windows(model, data, batch, device, autocast_dtype):
        seen[data.shape[1] - 1] = data.clone()
        return 1.0

    monkeypatch.setattr(perplexity, "mean_loss", record_windows)
    model = Decoder(ModelConfig(**TINY))
    result = perplexity.long_context_perplexity(model, store, 16, [1, 2, 4], windows=8,
                                                bos_prefix=bos_prefix)
    assert set(result) == {"long/ppl_1x", "long/ppl_2x", "long/ppl_2x_yarn", "long/ppl_4x",
                           "long/ppl_4x_yarn"}
    assert sorted(seen) == [16, 32, 64]
    # The same tokens at every factor: 4 x 2 windows of 16, 2 x 2 of 32, 2 of 64.
    assert [len(seen[n]) for n in (16, 32, 64)] == [8, 4, 2]
    first_tokens = torch.cat([seen[n][:, 0] for n in seen])
    if bos_prefix:
        assert (first_tokens == store.eos_id).all()
        # Rows are cut-major (span 0 and 1 at offset 0, then at offset 16, ...); only the
        # first token changes.
        torch.testing.assert_close(seen[16][2, 1:], seen[64][0, 17:33])
    else:
        assert (seen[16][:, 0] != store.eos_id).any()


def test_bos_reliance_compares_the_same_targets_with_and_without_bos(tmp_path, monkeypatch):
    from lab.analysis import perplexity

    store = tiny_store(tmp_path / "store")
    seen = []

    def fake_loss(model, data, batch, device, autocast_dtype, skip_first=0):
        seen.append((data.clone(), skip_first))
        return 2.0 if len(seen) == 1 else 2.5  # with BOS first, then without

    monkeypatch.setattr(perplexity, "mean_loss", fake_loss)
    metrics = perplexity.bos_reliance(Decoder(ModelConfig(**TINY)), store, 16, windows=5)
    (with_bos, skip_with), (without_bos, skip_without) = seen
    assert skip_with == skip_without == 1
    assert with_bos.shape == without_bos.shape == (5, 17)
    assert (with_bos[:, 0] == store.eos_id).all()
    torch.testing.assert_close(with_bos[:, 1:], without_bos[:, 1:])
    assert metrics == pytest.approx({"sink/ppl_with_bos": math.exp(2.0),
                                     "sink/ppl_without_bos": math.exp(2.5),
                                     "sink/bos_reliance": math.exp(0.5)})


def test_mean_loss_can_leave_out_the_first_predictions():
    from lab.analysis import perplexity

    torch.manual_seed(0)
    model = Decoder(ModelConfig(**TINY)).eval()
    data = torch.randint(0, 32, (3, 17))
    with torch.no_grad():
        logits = model(data[:, :-1])
        expected = F.cross_entropy(logits[:, 2:].flatten(0, 1), data[:, 3:].flatten()).item()
        got = perplexity.mean_loss(model, data, 2, torch.device("cpu"), None, skip_first=2)
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bos_prefix", [True, False])
def test_analyze_measures_bos_reliance_only_for_models_trained_with_bos(tmp_path, bos_prefix):
    store = tiny_store(tmp_path / "store")
    config = resolve("baseline", "tiny", {"model.vocab_size": "32", "model.context": "16",
                                          "data.bos_prefix": str(bos_prefix).lower(),
                                          "train.long_context_factors": ""})
    metrics = analyze(Decoder(config.model), store, config, windows=2, maps=False).metrics
    assert ("sink/bos_reliance" in metrics) is bos_prefix
    if bos_prefix:
        assert metrics["sink/bos_reliance"] == pytest.approx(
            metrics["sink/ppl_without_bos"] / metrics["sink/ppl_with_bos"], rel=1e-6)


def test_mean_loss_leaves_out_the_first_predictions_of_each_window():
    from lab.analysis.perplexity import mean_loss
    from lab.model.decoder import Decoder

    torch.manual_seed(0)
    model = Decoder(resolve("baseline", "tiny").model).eval()
    data = torch.randint(0, model.cfg.vocab_size, (3, 9))
    with torch.no_grad():
        logits = model(data[:, :-1])[:, 2:]
        expected = F.cross_entropy(logits.flatten(0, 1), data[:, 3:].flatten()).item()
        got = mean_loss(model, data, batch=2, device=torch.device("cpu"), autocast_dtype=None,
                         skip_first=2)
    assert abs(got - expected) < 1e-5


def test_layer_metric_names_split_back_into_prefix_and_layer():
    from lab.analysis.names import layer_metric, split_layer_metric

    name = layer_metric("sink/first_token_attn", 7, 12)
    assert name == "layers/sink/first_token_attn/layer_07"
    assert split_layer_metric(name) == ("layers/sink/first_token_attn", 7)
    assert split_layer_metric("val/ppl") is None and split_layer_metric("gate/layer_x") is None


def test_sink_only_recorder_keeps_the_same_sink_sums_and_nothing_else():
    torch.manual_seed(0)
    model = Decoder(ModelConfig(**{**TINY, "gate": GateSpec()})).eval()
    tokens = torch.randint(0, 32, (3, 16))
    full = record(model, tokens, ProbeRecorder(2, GateSpec()))
    sink = record(model, tokens, ProbeRecorder(2, GateSpec(), sink_only=True))
    assert set(sink.sums) == {key for key in full.sums if key[0] == "first_token_attn"}
    for key, total in sink.sums.items():
        torch.testing.assert_close(total, full.sums[key])
    assert not sink.gate_samples and not sink.position_max and full.gate_samples


@pytest.mark.parametrize("argv, expected", [
    (["analyze", "nothing.ckpt"], "error: analyze: no checkpoint at"),
    (["analyze", "nothing.ckpt", "--windows", "-1"], "error: analyze --windows: must be a "
                                                     "non-negative integer, got -1"),
])
def test_analyze_refuses_bad_input_before_it_creates_a_store(tmp_path, monkeypatch, capsys,
                                                             argv, expected):
    from lab.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "mlruns"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(expected)
    assert not (tmp_path / "mlruns").exists()
