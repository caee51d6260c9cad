"""The analysis as figures: the per-layer curves of the paper's Figs. 2, 3, 6 and 7
(docs/paper.md §9.8), the demo's attention maps and the long-context curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lab.analysis.metrics import Analysis
from lab.analysis.probes import ACTIVATION_CURVES


def write_plots(analysis: Analysis, folder: Path) -> list[Path]:
    """The per-layer figures of the paper's Figs. 2, 3, 6 and 7, the demo's attention maps
    and the long-context curve, as PNGs in `folder`."""
    # Imported here, not at the top: pyplot costs about a second at start-up (0.95 s measured
    # on the 2-core CPU machine), and most commands that import this package never draw.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    written: list[Path] = []
    per_layer, m = analysis.per_layer, analysis.metrics

    def save(fig, name: str) -> None:
        path = folder / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if "first_token_attn" in per_layer:  # Fig. 2 / Fig. 6 right panel
        layers = np.arange(len(per_layer["first_token_attn"]))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(layers, per_layer["first_token_attn"], "o-",
                label=f"BOS windows (mean {m['sink/first_token_attn']:.3f})")
        ax.plot(layers, per_layer["first_token_attn_random"], "s--",
                label=f"random windows (mean {m['sink/first_token_attn_random']:.3f})")
        for layer, position in zip(layers, per_layer["top_key_position"]):
            if position != 0:
                ax.annotate(f"top key {position}", (layer, per_layer["first_token_attn"][layer]),
                            fontsize=7, textcoords="offset points", xytext=(2, 6))
        ax.set(xlabel="layer", ylabel="attention on position 0", ylim=(0, 1.02),
               title="First-token attention per layer", xticks=layers)
        ax.legend(fontsize=8)
        save(fig, "first_token_attn.png")

    if "max_ffn_residual" in per_layer:  # Fig. 6 left panel
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for curve in ACTIVATION_CURVES:
            ax.plot(per_layer[f"max_{curve}"], "o-", label=curve, markersize=3)
        ax.set(xlabel="layer", ylabel="max |activation|", yscale="log",
               xticks=range(len(per_layer["max_ffn_residual"])),
               title=f"Max activation per layer (M-Act {m['act/max_mean']:.3g})")
        ax.legend(fontsize=8)
        save(fig, "max_activation.png")

    if analysis.gate_samples is not None:  # Fig. 3 histogram, Fig. 7 per-layer statistics
        fig, (hist, stats) = plt.subplots(1, 2, figsize=(10, 3.5))
        hist.hist(analysis.gate_samples, bins=50, density=True)
        hist.set(xlabel="gate score", ylabel="density",
                 title=f"Gate scores, all layers (mean {m['gate/mean']:.3f})")
        layers = np.arange(len(per_layer["gate_mean"]))
        mean, std = np.array(per_layer["gate_mean"]), np.array(per_layer["gate_std"])
        stats.plot(layers, mean, "o-", label="mean")
        stats.fill_between(layers, mean - std, mean + std, alpha=0.3, label="mean ± std")
        stats.plot(layers, per_layer["gate_min"], "v:", label="min")
        stats.plot(layers, per_layer["gate_max"], "^:", label="max")
        stats.set(xlabel="layer", ylabel="gate score", title="Gate scores per layer",
                  xticks=layers)
        stats.legend(fontsize=8)
        save(fig, "gate_scores.png")

    if analysis.attention_maps:  # the paper's demo: head-averaged maps of a few layers
        layers = sorted(analysis.attention_maps)
        fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers) + 1, 3.6),
                                 squeeze=False, layout="constrained")
        for ax, layer in zip(axes[0], layers):
            attention = np.asarray(analysis.attention_maps[layer])
            causal = np.tril(np.ones_like(attention, dtype=bool))
            shown = np.ma.masked_where(~causal, np.clip(attention, 1e-4, 1))  # future: blank
            image = ax.imshow(shown, norm=LogNorm(1e-4, 1), cmap="viridis")
            ax.set(title=f"layer {layer}: F-Attn {per_layer['first_token_attn'][layer]:.2f}",
                   xlabel="key position", ylabel="query position")
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="attention (log)")
        fig.savefig(folder / "attention_maps.png", dpi=110)
        plt.close(fig)
        written.append(folder / "attention_maps.png")

    long = {k: v for k, v in m.items() if k.startswith("long/")}
    if long:  # Table 5 at our scale
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for yarn, style in ((False, "o-"), (True, "s--")):
            points = sorted((int(k.split("_")[1][:-1]), v) for k, v in long.items()
                            if k.endswith("_yarn") == yarn)
            if yarn and "long/ppl_1x" in long:
                points = [(1, long["long/ppl_1x"])] + points
            if points:
                ax.plot(*zip(*points), style, label="YaRN" if yarn else "RoPE as trained")
        factors = sorted({int(k.split("_")[1][:-1]) for k in long})
        ax.set(xscale="log", xlabel="context, multiple of the training length",
               ylabel="validation perplexity", title="Long-context extrapolation")
        ax.set_xticks(factors, [f"{f}x" for f in factors])
        ax.minorticks_off()
        ax.legend(fontsize=8)
        save(fig, "long_context.png")
    return written
