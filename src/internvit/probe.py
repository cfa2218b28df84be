"""How well do the features separate a labelled set of images: DINOv2's k-NN probe and a linear probe.

References:
    - DINOv2 `dinov2/eval/knn.py` (Oquab et al., 2023; Wu et al., 2018 for the weighted vote): L2-normalised
      features, cosine similarity, the max(k) nearest training features per query, weights softmax(s / T) with
      T = 0.07, class scores = the sum of the weights of the first k neighbours of each class, k in 10/20/100/200.
    - scikit-learn `LogisticRegression(C=...)` (multinomial, lbfgs): minimise
      C * sum_i CE(W x_i + b, y_i) + ||W||^2 / 2, the bias not penalised. The linear probe minimises the same
      objective (divided by C * n, which does not move the minimum) with torch's L-BFGS, so it equals sklearn at
      the same C (tested) and runs on 1M x 1024 in bounded memory (the loss is summed over blocks of rows).

Differs from DINOv2's linear evaluation:
    - a logistic regression on standardised features (mean/std of TRAIN) instead of SGD on a linear layer, and
      the regularisation C picked on a held-out 10% of TRAIN (then refitted on all of TRAIN), as in the
      CLIP paper's linear probes, not learning rates picked on the evaluation set.
    - the k-NN search is blocked (`index.top_k`): a block of queries against a block of training rows at a time.

Shapes: N training rows, Q evaluation rows, C feature width, K classes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from internvit.feature_table import folder_labels, read_features, settings_mismatch
from internvit.index import top_k

KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
MAX_ITER = 100  # L-BFGS iterations per fit: 1M x 1024 rows, 100 classes take ~5 s an iteration on 2 cores


# ---- k-NN ------------------------------------------------------------------------------------------------


def knn_scores(train: np.ndarray, train_labels: np.ndarray, queries: np.ndarray, num_classes: int, *,
               ks=KNN_KS, temperature: float = KNN_TEMPERATURE, query_block: int = 1024) -> dict[int, np.ndarray]:
    """DINOv2's weighted k-NN vote: per k, class scores [Q, K] of each query.

    Args:
        train: [N, C] features (not modified; cosine similarity needs no normalised copy).
        train_labels: [N] class indices in 0..K-1.
        queries: [Q, C] features.
        num_classes: K.
        ks: neighbour counts; each is capped at N.
        temperature: T in exp(s / T).
    """
    ks = sorted({min(k, len(train)) for k in ks})
    max_k = ks[-1]
    labels = torch.as_tensor(train_labels, dtype=torch.int64)
    out = {k: np.empty((len(queries), num_classes), np.float32) for k in ks}
    for q0 in range(0, len(queries), query_block):
        # cosine=True: norms per block, so 1M x 1024 training features are not copied to be normalised
        s_qk, i_qk = top_k(queries[q0:q0 + query_block], train, max_k, cosine=True)
        w_qk = torch.softmax(torch.from_numpy(s_qk) / temperature, dim=1)  # as DINOv2: over the max_k neighbours
        neighbour_labels = labels[torch.from_numpy(i_qk)]
        for k in ks:
            votes = torch.zeros(len(s_qk), num_classes)
            votes.scatter_add_(1, neighbour_labels[:, :k], w_qk[:, :k])
            out[k][q0:q0 + len(s_qk)] = votes.numpy()
    return out


# ---- linear probe ----------------------------------------------------------------------------------------


@dataclass
class LinearModel:
    """A multinomial logistic regression on standardised features: logits = ((x - mean) / std) @ coef.T + bias."""

    coef: np.ndarray  # [K, C]
    bias: np.ndarray  # [K]
    mean: np.ndarray  # [C]
    std: np.ndarray  # [C]
    C: float

    def logits(self, x: np.ndarray, block: int = 65536) -> np.ndarray:
        out = np.empty((len(x), len(self.bias)), np.float32)
        for i in range(0, len(x), block):
            out[i:i + block] = ((x[i:i + block] - self.mean) / self.std) @ self.coef.T + self.bias
        return out


def standardize_stats(x: np.ndarray, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per column (float64 sums over blocks; a constant column gets std 1)."""
    s = np.zeros(x.shape[1])
    ss = np.zeros(x.shape[1])
    for i in range(0, len(x), block):
        b = x[i:i + block].astype(np.float64)
        s += b.sum(0)
        ss += (b * b).sum(0)
    mean = s / len(x)
    std = np.sqrt(np.maximum(ss / len(x) - mean * mean, 0.0))
    std[std < 1e-6] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def fit_logistic(z: np.ndarray, y: np.ndarray, num_classes: int, C: float, *, max_iter: int = MAX_ITER,
                 tol: float = 1e-6, init: tuple[np.ndarray, np.ndarray] | None = None,
                 block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Minimise sum_i CE(W z_i + b, y_i) / n + ||W||^2 / (2 C n) with L-BFGS (scikit-learn's objective / (C n)).

    Args:
        z: [n, C] standardised features, float32.
        y: [n] class indices.
        num_classes: K.
        C: inverse regularisation strength, as scikit-learn's.
        max_iter: L-BFGS iterations.
        tol: stop when the largest gradient entry falls below this.
        init: (coef [K, C], bias [K]) to start from (a warm start along the C path).
        block: rows per block of the loss (bounds the [rows, K] logits in memory).

    Returns:
        coef [K, C] and bias [K].
    """
    n, width = z.shape
    W = torch.zeros(num_classes, width, dtype=torch.float32)
    b = torch.zeros(num_classes, dtype=torch.float32)
    if init is not None:
        W.copy_(torch.from_numpy(init[0]))
        b.copy_(torch.from_numpy(init[1]))
    W.requires_grad_(True)
    b.requires_grad_(True)
    z_t = torch.from_numpy(np.ascontiguousarray(z, np.float32))
    y_t = torch.as_tensor(y, dtype=torch.int64)
    lam = 1.0 / (C * n)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        total = 0.0
        for i in range(0, n, block):  # sum of block losses; backward per block keeps one block of logits
            loss = torch.nn.functional.cross_entropy(z_t[i:i + block] @ W.T + b, y_t[i:i + block],
                                                     reduction="sum") / n
            loss.backward()
            total += loss.item()
        reg = 0.5 * lam * (W * W).sum()
        reg.backward()
        return torch.tensor(total + reg.item())

    opt.step(closure)
    return W.detach().numpy().copy(), b.detach().numpy().copy()


def linear_probe_fit(train: np.ndarray, y: np.ndarray, num_classes: int, *, c_grid=C_GRID,
                     held_out: float = 0.1, sweep_rows: int = 100_000, seed: int = 0,
                     max_iter: int = MAX_ITER, copy: bool = True) -> tuple[LinearModel, dict]:
    """Standardise, pick C on a held-out split of TRAIN by top-1 accuracy, refit on all of TRAIN at that C.

    The C path runs from the strongest regularisation to the weakest, each fit starting from the previous one.
    When TRAIN has more than `sweep_rows` rows, the sweep uses a random `sweep_rows` of them (the held-out part
    is `held_out` of those); C keeps its meaning (the weight of the summed loss against ||W||^2 / 2), so the
    refit on all rows regularises less per row, as more data should.

    `copy=False` standardises `train` in place (no second [N, C] array: 4 GB at 1M x 1024).

    Returns:
        The model and a record of the search: {"C": chosen, "held_out_rows", "sweep_rows",
        "held_out_top1": {C: accuracy}}.
    """
    mean, std = standardize_stats(train)
    z = np.array(train, np.float32) if copy else np.asarray(train, np.float32)
    for i in range(0, len(z), 65536):
        z[i:i + 65536] -= mean
        z[i:i + 65536] /= std
    del train
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(z))[:sweep_rows]
    n_val = max(1, int(round(held_out * len(order)))) if len(c_grid) > 1 else 0
    val, fit = np.sort(order[:n_val]), np.sort(order[n_val:])
    search: dict = {"held_out_rows": int(n_val), "sweep_rows": int(len(fit)), "held_out_top1": {}}
    init = None
    if n_val:
        z_fit, y_fit, z_val, y_val = z[fit], y[fit], z[val], y[val]
        best = (-1.0, None, None)
        for C in sorted(c_grid):
            init = fit_logistic(z_fit, y_fit, num_classes, C, max_iter=max_iter, init=init)
            acc = float(np.mean(np.argmax(z_val @ init[0].T + init[1], 1) == y_val))
            search["held_out_top1"][repr(float(C))] = acc
            if acc > best[0]:
                best = (acc, float(C), init)
        _, C, init = best
        del z_fit, z_val
    else:
        C = float(c_grid[0])
    coef, bias = fit_logistic(z, y, num_classes, C, max_iter=max_iter, init=init)
    search["C"] = C
    return LinearModel(coef, bias, mean, std, C), search


# ---- reports ---------------------------------------------------------------------------------------------


def topk_accuracy(scores: np.ndarray, y: np.ndarray, k: int) -> float:
    """Fraction of rows whose true class is among the k highest scores (ties broken by torch.topk)."""
    if len(y) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = torch.from_numpy(scores).topk(k, dim=1).indices.numpy()
    return float(np.mean((top == y[:, None]).any(1)))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] counts: row = true class, column = predicted class."""
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def save_confusion_png(matrix: np.ndarray, classes: list[str], path: str | os.PathLike, title: str) -> None:
    """A row-normalised confusion matrix as a PNG (matplotlib, the `analysis` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the confusion-matrix picture needs matplotlib: pip install 'internvit[analysis]'") from None
    K = len(classes)
    rows = matrix.sum(1, keepdims=True)
    norm = matrix / np.maximum(rows, 1)
    size = min(4 + 0.35 * K, 40)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if K <= 50:
        ax.set_xticks(range(K), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(K), classes, fontsize=8)
        if K <= 20:
            for i in range(K):
                for j in range(K):
                    if matrix[i, j]:
                        ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class ProbeReport:
    """What `probe` measured; `to_dict()` is `report.json`."""

    method: str
    feature: str
    classes: list[str]
    train: dict
    eval: dict
    results: dict  # top-1/top-5 per k (knn) or for the fitted model (linear)
    per_class: dict  # class -> {"accuracy", "count"} for the headline setting
    headline: str  # which setting per_class and the confusion matrix show
    details: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"method": self.method, "feature": self.feature, "headline": self.headline, "results": self.results,
                "per_class": self.per_class, "classes": self.classes, "train": self.train, "eval": self.eval,
                "details": self.details, "seconds": round(self.seconds, 3)}


def _labels(table, spec: str, source: str) -> list[str]:
    if spec == "folder":
        return folder_labels(table.paths)
    values = table.extra[spec]
    if any(v is None for v in values):
        raise ValueError(f"{source}: label column {spec!r} has null values in {sum(v is None for v in values)} rows")
    return [str(v) for v in values]


def probe(method: str, train_file, eval_file, *, labels: str = "folder", feature: str = "cls",
          out: str | os.PathLike | None = None, ks=KNN_KS, temperature: float = KNN_TEMPERATURE,
          c_grid=C_GRID, max_iter: int = MAX_ITER) -> ProbeReport:
    """Probe the features of TRAIN/EVAL feature files with labels; optionally write `report.json` and
    `confusion.png` to `out`.

    Args:
        method: "knn" (DINOv2's weighted k-NN) or "linear" (logistic regression, C chosen on held-out TRAIN).
        train_file, eval_file: Parquet files from `internvit extract` (same model and settings).
        labels: "folder" (each row's parent folder names its class) or the name of a column holding the label.
        feature: "cls", "mean", "cls+mean" or any feature column(s).
        out: report folder, or None for no files.
        ks, temperature: the k-NN settings.
        c_grid, max_iter: the linear probe's candidate C values and L-BFGS iterations.
    """
    if method not in ("knn", "linear"):
        raise ValueError(f"method must be 'knn' or 'linear', got {method!r}")
    start = time.perf_counter()
    columns = () if labels == "folder" else (labels,)
    train = read_features(train_file, feature=feature, columns=columns)
    ev = read_features(eval_file, feature=feature, columns=columns)
    diff = settings_mismatch(train.metadata, ev.metadata)
    if diff:
        raise ValueError(f"{eval_file} was extracted with other settings than {train_file} ({'; '.join(diff)})")
    for t, f in ((train, train_file), (ev, eval_file)):
        if not len(t):
            raise ValueError(f"{f}: no rows with features ({t.skipped} error rows skipped)")
    y_train_s = _labels(train, labels, str(train_file))
    y_eval_s = _labels(ev, labels, str(eval_file))
    classes = sorted(set(y_train_s) | set(y_eval_s))
    if len(set(y_train_s)) < 2:
        raise ValueError(f"{train_file}: labels ({labels}) give {len(set(y_train_s))} class; a probe needs 2 or more")
    to_id = {c: i for i, c in enumerate(classes)}
    y_train = np.array([to_id[c] for c in y_train_s], np.int64)
    y_eval = np.array([to_id[c] for c in y_eval_s], np.int64)
    K = len(classes)
    details: dict = {"unseen_eval_classes": sorted(set(y_eval_s) - set(y_train_s))}
    if method == "knn":
        scores = knn_scores(train.vectors, y_train, ev.vectors, K, ks=ks, temperature=temperature)
        results = {f"k={k}": {"top1": topk_accuracy(s, y_eval, 1), "top5": topk_accuracy(s, y_eval, 5)}
                   for k, s in scores.items()}
        k_head = 20 if 20 in scores else max(scores)
        headline, head_scores = f"k={k_head}", scores[k_head]
        details.update(temperature=temperature, ks=sorted(scores))
    else:
        # The train labels must be 0..K'-1 for the fit; classes seen only in EVAL get no column.
        seen = sorted(set(y_train.tolist()))
        remap = {c: i for i, c in enumerate(seen)}
        model, search = linear_probe_fit(train.vectors, np.array([remap[c] for c in y_train]), len(seen),
                                         c_grid=c_grid, max_iter=max_iter, copy=False)  # the table is ours
        logits = model.logits(ev.vectors)
        head_scores = np.full((len(ev), K), -np.inf, np.float32)
        head_scores[:, seen] = logits
        results = {"linear": {"top1": topk_accuracy(head_scores, y_eval, 1),
                              "top5": topk_accuracy(head_scores, y_eval, 5)}}
        headline = "linear"
        details.update(search)
    pred = head_scores.argmax(1)
    matrix = confusion_matrix(y_eval, pred, K)
    per_class = {}
    for i, c in enumerate(classes):
        count = int(matrix[i].sum())
        if count:
            per_class[c] = {"accuracy": float(matrix[i, i] / count), "count": count}
    report = ProbeReport(
        method=method, feature=feature, classes=classes,
        train={"file": str(train_file), "rows": len(train), "skipped": train.skipped},
        eval={"file": str(eval_file), "rows": len(ev), "skipped": ev.skipped},
        results=results, per_class=per_class, headline=headline, details=details,
        seconds=time.perf_counter() - start)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_confusion_png(matrix, classes, out / "confusion.png",
                           f"{method} probe ({headline}), {feature}: top-1 {results[headline]['top1']:.3f}")
        (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
