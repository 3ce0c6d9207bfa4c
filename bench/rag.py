"""Speed of retrieval: bm25 index build, embedding throughput, query latency at 10,000 documents.

    python bench/rag.py [--docs 10000] [--cache runs/bench-rag] [--queries 200] [--threads N]

On the synthetic condition pages of ``t0s1.rag.synthetic`` (about 470 characters each):

1. bm25 index build: ``build_index(..., retriever="bm25")`` into a fresh folder (chunking,
   bm25s analysis and index, writing the folder); documents/s. Goal >= 5,000.
2. Embedding throughput of the embedded all-MiniLM-L6-v2: chunks/s over ``--embed-sample`` chunks.
3. Query latency p50 / p95 for bm25, dense and hybrid (the query embedded each time) on a hybrid
   index of ``--docs`` documents. Embedding 10,000 chunks takes minutes on two cores, so that
   index is built once in ``--cache`` and reused on later runs (the manifest matches).
   Goals: bm25 p50 <= 10 ms; hybrid p50 <= 50 ms.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from t0s1.rag.embedders import load_embedder
from t0s1.rag.store import build_index
from t0s1.rag.synthetic import make_corpus

GOALS = {"bm25 build docs/s": 5000.0, "bm25 p50 ms": 10.0, "hybrid p50 ms": 50.0}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--cache", default="runs/bench-rag", help="where the hybrid index is built once and reused")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--embed-sample", type=int, default=512, help="chunks embedded to measure throughput")
    parser.add_argument("--repeats", type=int, default=3, help="bm25 builds timed (the best counts)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    documents, queries = make_corpus(args.docs, seed=0, filler_sentences=3)
    chars = sum(len(d.text) for d in documents) / len(documents)
    print(f"{len(documents)} documents of {chars:.0f} characters on average; torch threads: {torch.get_num_threads()}")

    # 1. bm25 build
    times = []
    for _ in range(args.repeats):
        folder = Path(tempfile.mkdtemp())
        started = time.perf_counter()
        build_index(documents, folder / "index", retriever="bm25", progress=False)
        times.append(time.perf_counter() - started)
        shutil.rmtree(folder)
    build_rate = len(documents) / min(times)
    print(f"bm25 build: {min(times):.2f} s best of {args.repeats} -> {build_rate:,.0f} documents/s")

    # 2. embedding throughput
    embedder = load_embedder()
    sample = [f"{d.title}\n{d.text}" for d in documents[: args.embed_sample]]
    embedder.encode(sample[:32])  # warm-up
    started = time.perf_counter()
    embedder.encode(sample)
    seconds = time.perf_counter() - started
    tokens = sum(len(embedder.tokenizer(text, add_special_tokens=True).input_ids) for text in sample)
    print(f"embedding: {len(sample)} chunks ({tokens / len(sample):.0f} tokens each) in {seconds:.1f} s "
          f"-> {len(sample) / seconds:,.1f} chunks/s, {tokens / seconds:,.0f} tokens/s")

    # 3. query latency on the hybrid index (built once, then reused)
    started = time.perf_counter()
    result = build_index(documents, Path(args.cache) / f"hybrid-{args.docs}", retriever="hybrid", embedder=embedder)
    state = "reused" if result.reused else f"built in {time.perf_counter() - started:.0f} s"
    index = result.index
    index.use_embedder(embedder)
    print(f"hybrid index of {len(index)} documents / {len(index.chunks)} chunks: {state}")
    asked = [q.text for q in queries[: args.queries]]
    latencies = {}
    for name in ("bm25", "dense", "hybrid"):
        retriever = index.retriever(name)
        for query in asked[:10]:  # warm-up: page in the memory-mapped files
            retriever.search(query, 5)
        samples = []
        for query in asked:
            started = time.perf_counter()
            retriever.search(query, 5)
            samples.append((time.perf_counter() - started) * 1000)
        latencies[name] = (statistics.median(samples), percentile(samples, 0.95))
        print(f"{name:7s} query (k=5, {len(asked)} queries): p50 {latencies[name][0]:.1f} ms, p95 {latencies[name][1]:.1f} ms")

    print("\nagainst the goals:")
    print(f"  bm25 build     {build_rate:8,.0f} docs/s  goal >= {GOALS['bm25 build docs/s']:,.0f}  ratio {build_rate / GOALS['bm25 build docs/s']:.2f}x")
    for name in ("bm25", "hybrid"):
        goal = GOALS[f"{name} p50 ms"]
        print(f"  {name:6s} p50    {latencies[name][0]:8.1f} ms      goal <= {goal:.0f} ms  ratio {goal / latencies[name][0]:.2f}x")


if __name__ == "__main__":
    main()
