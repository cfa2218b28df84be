"""Probes and search at scale: 1M synthetic 1024-d features on this machine.

Each measurement runs in its own process (its peak RSS is its own) on the same synthetic set: 1M training /
database vectors of width 1024 in 100 classes, each class 10 clusters, each cluster a 64-d subspace plus
isotropic noise (image embeddings have a low intrinsic dimension; pure Gaussian noise would make every ANN
index look bad and every probe trivial). Queries and evaluation rows are fresh draws from the same model.

    - knn: `probe.knn_scores` (DINOv2's weighted vote, k = 10/20/100/200) of Q evaluation rows against the 1M:
      time, peak RSS, top-1;
    - linear: `probe.linear_probe_fit` (C picked on held-out TRAIN rows, then refitted on all 1M): time, peak RSS;
    - exact: `index.top_k` of the queries against the 1M (k = 10): queries/s, peak RSS; its answers are the truth;
    - ann: faiss HNSW32-Flat as `internvit index --kind ann` builds it: build time, queries/s, recall@10 against
      exact, peak RSS;
    - compare (at --compare-n, default 100k): the ANN candidates that were measured to pick the library: faiss
      HNSW32-Flat, faiss IVF-Flat, usearch HNSW (f32 and f16), same data, same queries, 2 threads each.
Writes benchmarks/results/analysis_<cpu>_<date>.{json,md}.

    python benchmarks/bench_analysis.py                          # everything (about 40 minutes on 2 cores)
    python benchmarks/bench_analysis.py --n 100000 --skip compare  # quicker

Needs the `analysis` extra (faiss-cpu, matplotlib) and, for the comparison, usearch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SECTIONS = ("knn", "linear", "exact", "ann", "compare")


def make_data(n: int, dim: int, classes: int, seed: int, sub: int = 10, rank: int = 64):
    """n vectors [n, dim] float32 and their class labels; the structure (centres, subspaces) is shared by every
    seed, the draws differ."""
    shared = np.random.default_rng(1000)
    centers = shared.standard_normal((classes * sub, dim), dtype=np.float32)
    bases = shared.standard_normal((classes * sub, rank, dim), dtype=np.float32) / np.sqrt(rank)
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, classes * sub, n)
    x = np.empty((n, dim), np.float32)
    for c in range(classes * sub):  # cluster by cluster: one [m, rank] @ [rank, dim] product each
        idx = np.nonzero(cluster == c)[0]
        z = rng.standard_normal((len(idx), rank), dtype=np.float32)
        x[idx] = centers[c] + 1.2 * (z @ bases[c]) + 0.3 * rng.standard_normal((len(idx), dim), dtype=np.float32)
    return x, cluster // sub


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- workers (one per process) ---------------------------------------------------------------------------


def write_data(folder: Path, args) -> None:
    """The synthetic sets, written once as .npy (each section loads them instead of drawing them again)."""
    for name, n, seed in (("train", args.n, 1), ("eval", args.eval_rows, 2), ("queries", args.queries, 3)):
        x, y = make_data(n, args.dim, args.classes, seed=seed)
        np.save(folder / f"{name}_x.npy", x)
        np.save(folder / f"{name}_y.npy", y)
        del x, y


def load(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(folder / f"{name}_x.npy"), np.load(folder / f"{name}_y.npy")


def work(section: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    t = time.perf_counter()
    x, y = load(data, "train")
    out: dict = {"section": section, "n": args.n, "dim": args.dim, "load_seconds": round(time.perf_counter() - t, 1)}
    if section == "knn":
        from internvit.probe import knn_scores, topk_accuracy

        q, yq = load(data, "eval")
        t = time.perf_counter()
        scores = knn_scores(x, y, q, args.classes)
        out["seconds"] = time.perf_counter() - t
        out["eval_rows"] = args.eval_rows
        out["queries_per_s"] = args.eval_rows / out["seconds"]
        out["top1"] = {str(k): topk_accuracy(s, yq, 1) for k, s in scores.items()}
    elif section == "linear":
        from internvit.probe import linear_probe_fit, topk_accuracy

        q, yq = load(data, "eval")
        t = time.perf_counter()
        # copy=False as `internvit probe linear` calls it: the features are standardised in place
        model, search = linear_probe_fit(x, y, args.classes, max_iter=args.linear_max_iter, copy=False)
        out["seconds"] = time.perf_counter() - t
        out["max_iter"] = args.linear_max_iter
        out["search"] = search
        out["top1"] = topk_accuracy(model.logits(q), yq, 1)
    elif section in ("exact", "ann"):
        from internvit.index import HNSWParams, build_ann, normalize, top_k

        xn = normalize(x)
        q = normalize(load(data, "queries")[0])
        t = time.perf_counter()
        _, truth = top_k(q, xn, 10)
        exact_s = time.perf_counter() - t
        if section == "exact":
            out.update(seconds=exact_s, queries=args.queries, queries_per_s=args.queries / exact_s)
        else:
            import faiss

            faiss.omp_set_num_threads(args.threads)
            params = HNSWParams()
            t = time.perf_counter()
            index = build_ann(xn, params)
            out["build_seconds"] = time.perf_counter() - t
            out["index"] = f"faiss {faiss.__version__} HNSW{params.m},Flat efConstruction {params.ef_construction}"
            out["ef_search"] = {}
            for ef in (64, 128, 256):
                index.hnsw.efSearch = ef
                t = time.perf_counter()
                _, ids = index.search(q, 10)
                s = time.perf_counter() - t
                out["ef_search"][str(ef)] = {"queries_per_s": args.queries / s, "recall_at_10": recall(ids, truth)}
            out["queries"] = args.queries
    elif section == "compare":
        out.update(compare(x, args))
    elif section == "data":
        write_data(data, args)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(ids, truth)]))


def compare(x: np.ndarray, args) -> dict:
    """The ANN libraries on the first --compare-n vectors: build time, queries/s and recall@10."""
    import faiss

    from internvit.index import normalize, top_k

    faiss.omp_set_num_threads(args.threads)
    n = min(args.compare_n, len(x))
    xn = normalize(x[:n].copy())
    del x
    q = normalize(load(Path(args.data), "queries")[0])
    _, truth = top_k(q, xn, 10)
    rows = []

    def measure(name, build, search):
        t = time.perf_counter()
        index = build()
        b = time.perf_counter() - t
        t = time.perf_counter()
        ids = search(index)
        s = time.perf_counter() - t
        rows.append({"index": name, "build_seconds": b, "queries_per_s": len(q) / s, "recall_at_10": recall(ids, truth)})
        print(f"[bench]   {rows[-1]}", file=sys.stderr, flush=True)

    def hnsw():
        ix = faiss.IndexHNSWFlat(xn.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        ix.hnsw.efConstruction = 64
        ix.add(xn)
        ix.hnsw.efSearch = 128
        return ix

    nlist = int(4 * np.sqrt(n))

    def ivf():
        ix = faiss.index_factory(xn.shape[1], f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        ix.train(xn[np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False)])
        ix.add(xn)
        ix.nprobe = 32
        return ix

    measure(f"faiss {faiss.__version__} HNSW32,Flat (efConstruction 64, efSearch 128)", hnsw,
            lambda ix: ix.search(q, 10)[1])
    measure(f"faiss IVF{nlist},Flat (nprobe 32)", ivf, lambda ix: ix.search(q, 10)[1])
    try:
        import usearch
        from usearch.index import Index
    except ImportError:
        return {"compare_n": n, "compare": rows, "usearch": "not installed"}
    for dtype in ("f32", "f16"):
        def build(dtype=dtype):
            ix = Index(ndim=xn.shape[1], metric="ip", dtype=dtype, connectivity=32, expansion_add=64,
                       expansion_search=128)
            ix.add(np.arange(n), xn, threads=args.threads)
            return ix

        measure(f"usearch {usearch.__version__} HNSW {dtype} (connectivity 32, expansion 64/128)", build,
                lambda ix: ix.search(q, 10, threads=args.threads).keys)
    return {"compare_n": n, "compare": rows}


# ---- the driver ------------------------------------------------------------------------------------------


def run_child(section: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--_worker", section, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {section} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    m, r, a = report["machine"], report["results"], report["args"]
    n = f"{a['n']:,}"
    lines = [
        f"# Probes and search on {n} synthetic {a['dim']}-d features, {m['cpu']} (family {m['cpu_family']}), "
        f"{report['date']}",
        "",
        f"{m['cores']} cores, {a['threads']} threads; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f". {n} vectors in {a['classes']} classes (10 clusters each, 64-d subspaces plus noise); each section in "
        "its own process, its data (4 GB at 1M x 1024 float32) included in its peak RSS. The machine was shared "
        f"with other work: load average {report['load_average_before']:.2f} before, "
        f"{report['load_average_after']:.2f} after.",
        "",
        "| what | size | time | rate | quality | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    if "knn" in r:
        k = r["knn"]
        lines.append(f"| k-NN probe (k = 10/20/100/200, T = 0.07, blocked top-k) | {n} train, {k['eval_rows']:,} eval "
                     f"| {k['seconds']:.0f} s | {k['queries_per_s']:.0f} eval rows/s | top-1 "
                     + ", ".join(f"{v:.3f} (k={kk})" for kk, v in k["top1"].items()) + f" | {k['peak_rss_mb']:,.0f} MB |")
    if "linear" in r:
        li = r["linear"]
        s = li["search"]
        lines.append(f"| linear probe (C on {s['held_out_rows']:,} held-out of {s['sweep_rows'] + s['held_out_rows']:,} "
                     f"TRAIN rows, {len(s['held_out_top1'])} values, then all {n}; L-BFGS <= {li['max_iter']} "
                     f"iterations per fit) | {n} train, {a['eval_rows']:,} eval | {li['seconds']:.0f} s | | top-1 "
                     f"{li['top1']:.3f}, C = {s['C']:g} | {li['peak_rss_mb']:,.0f} MB |")
    if "exact" in r:
        e = r["exact"]
        lines.append(f"| exact search, k = 10 (`--kind exact`) | {n} x {e['queries']:,} queries | {e['seconds']:.1f} s "
                     f"| {e['queries_per_s']:.0f} queries/s | exact | {e['peak_rss_mb']:,.0f} MB |")
    if "ann" in r:
        an = r["ann"]
        from internvit.index import HNSWParams

        for ef, v in an["ef_search"].items():
            used = " (`--kind ann`)" if int(ef) == HNSWParams.ef_search else ""
            lines.append(f"| ANN search, {an['index']}, efSearch {ef}{used} | {n} x {an['queries']:,} "
                         f"queries | build {an['build_seconds']:.0f} s | {v['queries_per_s']:.0f} queries/s | "
                         f"recall@10 {v['recall_at_10']:.3f} | {an['peak_rss_mb']:,.0f} MB |")
    if "compare" in r:
        c = r["compare"]
        lines += ["", f"ANN libraries on the first {c['compare_n']:,} vectors ({a['queries']:,} queries, recall@10 "
                  "against exact search), measured to pick the one `internvit index --kind ann` uses:", "",
                  "| index | build | queries/s | recall@10 |", "|---|---|---|---|"]
        for row in c["compare"]:
            lines.append(f"| {row['index']} | {row['build_seconds']:.1f} s | {row['queries_per_s']:.0f} | "
                         f"{row['recall_at_10']:.3f} |")
    lines += ["", "The synthetic classes are well separated, so the probes' top-1 of ~1.0 says nothing about their "
              "quality (the tests compare them with independent computations); these rows measure time and memory. "
              "Recall@10 of an HNSW graph depends on the data: here each cluster is ~1,000 vectors spread over a 64-d "
              "subspace, which a graph navigates worse than the 100k subset (~100 per cluster)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--eval-rows", type=int, default=10_000, help="k-NN and linear probe evaluation rows")
    ap.add_argument("--queries", type=int, default=1000, help="search queries")
    ap.add_argument("--linear-max-iter", type=int, default=30)
    ap.add_argument("--compare-n", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip", default="", help=f"comma-separated sections to skip: {', '.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--markdown", type=Path, help="only rewrite the markdown of an existing results JSON")
    args = ap.parse_args()
    if args.markdown:
        args.markdown.with_suffix(".md").write_text(markdown(json.loads(args.markdown.read_text())))
        return
    if args._worker == "data":
        write_data(Path(args.data), args)
        print("{}")
        return
    if args._worker:
        print(json.dumps(work(args._worker, args)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from common import machine, write_results

    argv = [f"--n={args.n}", f"--dim={args.dim}", f"--classes={args.classes}", f"--eval-rows={args.eval_rows}",
            f"--queries={args.queries}", f"--linear-max-iter={args.linear_max_iter}", f"--compare-n={args.compare_n}",
            f"--threads={args.threads}"]
    report = {"date": dt.date.today().isoformat(), "machine": machine(), "args": {
        k: getattr(args, k) for k in ("n", "dim", "classes", "eval_rows", "queries", "linear_max_iter", "compare_n",
                                      "threads")}, "results": {}}
    import faiss

    report["machine"]["versions"]["faiss"] = faiss.__version__
    report["load_average_before"] = os.getloadavg()[0]  # other work on the machine skews every figure
    skip = {s for s in args.skip.split(",") if s}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-analysis-") as tmp:
        argv.append(f"--data={tmp}")
        t = time.perf_counter()
        run_child("data", argv)
        report["data_seconds"] = time.perf_counter() - t
        print(f"[bench] synthetic data in {report['data_seconds']:.0f} s", file=sys.stderr, flush=True)
        for section in SECTIONS:
            if section in skip:
                continue
            print(f"[bench] {section} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            report["results"][section] = run_child(section, argv)
            print(f"[bench]   done in {time.perf_counter() - t:.0f} s: {report['results'][section]}",
                  file=sys.stderr, flush=True)
    report["load_average_after"] = os.getloadavg()[0]
    stem = write_results(args.out, "analysis", report, markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json, .md", file=sys.stderr)


if __name__ == "__main__":
    main()
