"""2-D embeddings of feature vectors (PCA or t-SNE, scikit-learn) drawn as a PNG scatter plot coloured by label."""

from __future__ import annotations

import numpy as np
from torch import Tensor

METHODS = ("pca", "tsne")
_TITLES = {"pca": "PCA", "tsne": "t-SNE"}


def subsample(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_points`` of ``n`` rows, drawn without replacement with ``seed``."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def embed_2d(features: Tensor | np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """Project features [N, D] to [N, 2].

    ``pca``: the first two principal components of the centred features. ``tsne``: features are standardised,
    reduced to at most 50 principal components, then embedded by t-SNE (perplexity min(30, (N − 1)/3), PCA
    initialisation, ``random_state=seed``)."""
    from sklearn.decomposition import PCA

    x = features.detach().double().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features, np.float64)
    if method not in METHODS:
        raise ValueError(f"unknown embedding method {method!r} (known: {', '.join(METHODS)})")
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"need features [N >= 3, D], got shape {x.shape}")
    if method == "pca":
        out = PCA(n_components=min(2, x.shape[1]), random_state=seed).fit_transform(x)
        return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))  # D = 1: a flat second axis
    from sklearn.manifold import TSNE

    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    if x.shape[1] > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, (x.shape[0] - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def plot_embedding(features: Tensor | np.ndarray, labels: np.ndarray, uri: str, *, method: str = "pca",
                   max_points: int = 5000, seed: int = 0, title: str | None = None) -> str:
    """Scatter plot of a 2-D embedding (:func:`embed_2d`) of at most ``max_points`` rows (seeded subset),
    coloured by label (one colour when labels are missing, i.e. negative), written atomically as PNG to ``uri``
    (local path or object-storage URI); returns ``uri``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from excb.evaluation.report import save_figure

    labels = np.asarray(labels)
    idx = subsample(len(labels), max_points, seed)
    feats = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    xy = embed_2d(feats[idx], method, seed)
    y = labels[idx]
    fig, ax = plt.subplots(figsize=(6.5, 6))
    if y.size and y.min() >= 0:
        classes = np.unique(y)
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        for i, c in enumerate(classes):
            m = y == c
            ax.scatter(xy[m, 0], xy[m, 1], s=3, alpha=0.6, color=cmap(i % cmap.N), label=str(c), rasterized=True)
        ax.legend(markerscale=4, fontsize=7, title="label", loc="best", ncols=1 if len(classes) <= 10 else 2)
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=3, alpha=0.6, rasterized=True)
    ax.set_title(title or f"{_TITLES[method]} of {len(idx)} test features")
    ax.set_xticks([])
    ax.set_yticks([])
    return save_figure(fig, uri, integer_x=False)
