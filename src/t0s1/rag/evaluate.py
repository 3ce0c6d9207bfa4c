"""``t0s1 rag eval``: retrieval quality and end-to-end accuracy of reasoning over retrieved sources.

1. **Retrieval.** Each question is searched once, ``depth`` = max(30, the largest K) documents deep,
   with the chosen retriever; the ranking is scored against the question's gold ids: ``p@K`` and
   ``recall@K`` for every K, and ``mrr`` (``t0s1.rag.metrics``). ``retrieval.jsonl`` keeps each
   question's ranking and the ranks of its gold documents.
2. **End to end.** A grid of k x thinking budgets x ``num_ignore``, run by the evaluation runner
   (``t0s1.evaluation.runner.run_eval``): each k is a task whose examples are the questions with
   their sources packed into the prompt (``build_rag_messages``, room kept for the largest
   budget), so samples, resuming, results.json / results.md, the s1 metrics and the per-task
   plot are the runner's. k is the first k documents of the ranking above, 0 (no retrieval) and
   ``gold`` (the gold documents themselves: the ceiling of a perfect retriever).

Answers are graded per dataset (``--answer-kind``: exact, choice, number, integer, math). t0's
rule is an option: an answer that says "inconclusive" counts as right when none of the sources in
its prompt is gold.

Files in the output folder, besides the runner's (``samples/rag-k<k>.jsonl``, ``config.json``,
``timings.json``, ``rag-k<k>.png``): ``rag.json`` (what the prompts depend on: a rerun must match
it), ``retrieval.jsonl``, ``accuracy_vs_k.png`` (one curve per budget) and
``accuracy_vs_thinking.png`` (one curve per k). results.json adds ``retrieval`` (``p@K``,
``recall@K``, ``mrr``), ``rag`` (grid, skipped rows) and ``accuracy_by_k``.

With test-time policies (``EvalConfig.policies``, ``--policy``) every policy is one more dimension
of the grid: ``accuracy_by_k`` rows carry the ``policy`` label and ``total_tokens``, the tables have
a column per (policy, budget, num_ignore), and ``accuracy_vs_thinking.png`` becomes accuracy
against average total generated tokens, one curve per (k, policy).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from t0s1.errors import UserError
from t0s1.evaluation import grading
from t0s1.evaluation.tasks import Example
from t0s1.files import atomic_path, write_text_atomic
from t0s1.rag.metrics import DEPTH, RetrievalScores, score_rankings
from t0s1.rag.prompt import build_rag_messages, is_inconclusive
from t0s1.rag.questions import QuestionFile, RagQuestion
from t0s1.rag.retrievers import Hit

GOLD = "gold"
"""The k of the gold-sources ceiling: the prompt holds exactly the question's gold documents."""

RAG_CONFIG = "rag.json"
RETRIEVAL_LOG = "retrieval.jsonl"


def task_name(k: int | str) -> str:
    return f"rag-k{k}" if k != GOLD else "rag-gold"


def k_label(k: int | str) -> str:
    return "gold sources" if k == GOLD else "k=0 (no sources)" if k == 0 else f"k={k}"


@dataclass(frozen=True)
class RagEvalSpec:
    """What is evaluated besides the generation settings (``EvalConfig``).

    ``ks``: the K of ``p@K`` / ``recall@K``, and the k of the grid unless ``grid_ks`` is given;
    ``baselines`` adds k = 0 and the gold sources to the grid.
    """

    ks: tuple[int, ...] = (1, 5, 20)
    baselines: bool = True
    retriever: str | None = None
    answer_kind: str = "exact"
    inconclusive_counts: bool = False
    grid_ks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name, values in (("--k", self.ks), ("--grid-k", self.grid_ks)):
            if values is not None and (not values or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in values)):
                raise UserError(f"{name} takes positive numbers of sources, e.g. 1,5,20; got {list(values)}.")
        grading.extract_answer("", self.answer_kind)  # a UserError for an unknown kind

    @property
    def grid(self) -> list[int | str]:
        ks = sorted(set(self.ks if self.grid_ks is None else self.grid_ks))
        return [0, *ks, GOLD] if self.baselines else ks

    @property
    def depth(self) -> int:
        return max(DEPTH, *self.ks, *(self.grid_ks or ()))


class RagTask:
    """The questions with k sources each, as the evaluation runner's task (a ``Task`` in all the
    runner reads: ``name``, ``load``, ``grade_example``, ``answer_kind``)."""

    multiple_choice = False

    def __init__(self, k: int | str, examples: list[Example], answer_kind: str, inconclusive_counts: bool):
        self.k, self.name = k, task_name(k)
        self.examples, self.answer_kind, self.inconclusive_counts = examples, answer_kind, inconclusive_counts

    def load(self, data_dir=None, limit: int | None = None) -> list[Example]:
        return self.examples if limit is None else self.examples[:limit]

    @property
    def grader(self) -> str:
        """How the samples are graded (recorded per row: a rerun with other rules re-grades them)."""
        rule = ", inconclusive counts without a gold source" if self.inconclusive_counts else ""
        return f"rules ({self.answer_kind}{rule})"

    def grade(self, output: str, gold: str) -> grading.Verdict:
        return grading.grade(output, gold, self.answer_kind)

    def grade_example(self, example: Example, output: str) -> grading.Verdict:
        verdict = self.grade(output, example.gold)
        if (self.inconclusive_counts and not verdict.correct and not example.meta["gold_in_prompt"]
                and is_inconclusive(grading.answer_part(output or ""))):
            return grading.Verdict(verdict.extracted, verdict.gold, True)
        return verdict


@dataclass
class Retrieval:
    """Each question's ranking (best first, ``depth`` deep) and its scores."""

    rankings: dict[str, list[Hit]]
    scores: RetrievalScores
    retriever: str
    rows: list[dict] = field(default_factory=list)


def retrieve_all(index, questions: list[RagQuestion], spec: RagEvalSpec, progress: bool = False) -> Retrieval:
    """Search every question once and score the rankings (p@K, recall@K, MRR)."""
    from t0s1.progress import ProgressBar

    retriever = index.retriever(spec.retriever)
    rankings = {}
    with ProgressBar(progress, len(questions), "retrieving") as bar:
        for question in questions:
            rankings[question.id] = retriever.search(question.question, spec.depth)
            bar.advance(1)
    ids = [[hit.doc_id for hit in rankings[q.id]] for q in questions]
    scores = score_rankings(ids, [set(q.gold_ids) for q in questions], sorted(set(spec.ks)), spec.depth)
    rows = []
    for question, ranking in zip(questions, ids, strict=True):
        ranks = {doc: (ranking.index(doc) + 1 if doc in ranking else None) for doc in question.gold_ids}
        rows.append({"id": question.id, "gold_ids": list(question.gold_ids), "gold_ranks": ranks, "ranking": ranking})
    return Retrieval(rankings, scores, retriever.name, rows)


def build_tasks(index, questions: list[RagQuestion], retrieval: Retrieval, spec: RagEvalSpec, *, tokenizer,
                context_length: int, reserved_tokens: int) -> list[RagTask]:
    """One ``RagTask`` per k of the grid, the prompts packed to leave ``reserved_tokens`` free."""
    tasks = []
    for k in spec.grid:
        examples = []
        for question in questions:
            hits = index.document_hits(list(question.gold_ids)) if k == GOLD else retrieval.rankings[question.id][:k]
            prompt = build_rag_messages(tokenizer, question.question, hits, context_length=context_length, reserved=reserved_tokens)
            sources = [hit.doc_id for hit in prompt.sources]
            meta = {"k": k, "sources": sources, "dropped": prompt.dropped, "gold_in_prompt": bool(set(sources) & set(question.gold_ids))}
            examples.append(Example(question.id, question.question, prompt.messages[-1]["content"],
                                    grading.normalize_gold(question.answer or "", spec.answer_kind), meta))
        tasks.append(RagTask(k, examples, spec.answer_kind, spec.inconclusive_counts))
    return tasks


def run_rag_eval(
    index,
    questions: QuestionFile,
    out: str | Path,
    spec: RagEvalSpec,
    *,
    backend=None,
    config=None,
    progress: bool = True,
) -> dict:
    """Score retrieval and, given a ``backend`` and an ``EvalConfig``, run (or resume) the grid;
    write every file and return results.json's content."""
    from t0s1.evaluation.runner import check_run_key, markdown_report, run_eval
    from t0s1.forcing import BudgetForcing
    from t0s1.rag.prompt import reserve_tokens

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = questions.questions
    if backend is not None:
        missing = [q for q in chosen if not q.answer]
        if missing:
            raise UserError(f"{len(missing)} questions have no reference answer (field `answer`), e.g. line {missing[0].line}; "
                            "grading needs one (or use --retrieval-only).")
    retrieval = retrieve_all(index, chosen, spec, progress)
    summary = {
        "index": str(index.path),
        "questions_file": str(questions.path),
        "questions": len(chosen),
        "skipped": [problem.to_dict() for problem in questions.problems],
        "retriever": retrieval.retriever,
        "grid": [str(k) for k in spec.grid],
        "answer_kind": spec.answer_kind,
        "inconclusive_counts": spec.inconclusive_counts,
    }
    retrieval_summary = {"retriever": retrieval.retriever, **retrieval.scores.to_dict()}
    if backend is None:
        if (out / RAG_CONFIG).exists():
            raise UserError(f"{out} holds a full evaluation (answers and their accuracy), which --retrieval-only would "
                            "replace with retrieval scores alone: choose another --out.")
        _write_jsonl_atomic(out / RETRIEVAL_LOG, retrieval.rows)
        results = {"retrieval": retrieval_summary, "rag": summary}
        _write_results(out, results, "")
        return results

    tokenizer, context_length = backend_tokenizer(backend)
    largest = "auto" if "auto" in config.max_thinking_tokens else max(config.max_thinking_tokens)
    reserved = reserve_tokens(BudgetForcing(largest, max_answer_tokens=config.max_answer_tokens), context_length)
    # The grading rules (answer kind, inconclusive rule) are not part of the key: the runner
    # re-grades logged rows that other rules graded.
    check_run_key(out / RAG_CONFIG, holds="samples of other prompts (index, questions or packing)", key={
        "index_corpus_sha256": index.manifest.get("corpus_sha256"),
        # the build: the same corpus chunked or embedded otherwise ranks otherwise
        "index_build_id": index.manifest.get("build_id"),
        "retriever": retrieval.retriever,
        "questions_sha256": _file_sha256(questions.path),
        "reserved_tokens": reserved,
    }, retired=("answer_kind", "inconclusive_counts"), later=("index_build_id",))
    _write_jsonl_atomic(out / RETRIEVAL_LOG, retrieval.rows)  # after the key: a refused rerun changes nothing
    tasks = build_tasks(index, chosen, retrieval, spec, tokenizer=tokenizer, context_length=context_length, reserved_tokens=reserved)
    results = run_eval(backend, tasks, config, out, progress=progress)
    for task in tasks:
        entry = results["tasks"][task.name]
        entry["k"] = str(task.k)
        entry["prompt"] = ("the gold documents as numbered sources, and the question" if task.k == GOLD else
                           "no sources (the instructions and the question)" if task.k == 0 else
                           f"the first {task.k} documents of the {retrieval.retriever} ranking as numbered sources, and the question")
        entry["dropped_sources"] = sum(example.meta["dropped"] for example in task.examples)
    results["retrieval"] = retrieval_summary
    results["rag"] = summary
    results["accuracy_by_k"] = accuracy_by_k(results, spec.grid)
    results["plots"] = plot_grid(results, out)
    _write_results(out, results, markdown_report(results))
    return results


def accuracy_by_k(results: dict, grid: list) -> list[dict]:
    """One row per (k, budget, num_ignore): accuracy and average thinking tokens."""
    rows = []
    for k in grid:
        for setting in results["tasks"][task_name(k)]["settings"]:
            row = {"k": str(k), "max_thinking_tokens": setting["max_thinking_tokens"], "num_ignore": setting["num_ignore"],
                   "accuracy": setting["accuracy"], "avg_thinking_tokens": setting["avg_thinking_tokens"]}
            if "policy" in setting:
                row.update(policy=setting["policy"], total_tokens=setting["total_tokens"], avg_total_tokens=setting["avg_total_tokens"])
            rows.append(row)
    return rows


def setting_label(budget, num_ignore: int, policy: str | None = None) -> str:
    label = f"budget {budget}"
    label += f", {num_ignore} Wait{'s' if num_ignore > 1 else ''}" if num_ignore else ""
    return label if policy is None else f"{policy}, {label}"


def row_setting(row: dict) -> tuple:
    """(budget, num_ignore, policy or None): the column of an ``accuracy_by_k`` row."""
    return row["max_thinking_tokens"], row["num_ignore"], row.get("policy")


def plot_grid(results: dict, out: Path) -> dict:
    """``accuracy_vs_k.png`` (one curve per budget and num_ignore) and ``accuracy_vs_thinking.png``
    (accuracy against average thinking tokens, one curve per k, without Wait)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from t0s1.evaluation.plots import plot_task

    rows = results["accuracy_by_k"]
    grid = list(dict.fromkeys(row["k"] for row in rows))
    settings = list(dict.fromkeys(row_setting(row) for row in rows))
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for setting in settings:
        points = {row["k"]: row["accuracy"] for row in rows if row_setting(row) == setting}
        axes.plot(range(len(grid)), [points.get(k) for k in grid], marker="o", label=setting_label(*setting))
    axes.set_xticks(range(len(grid)), [k_label(int(k) if k.isdigit() else k) for k in grid])
    axes.set_xlabel("sources in the prompt")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"accuracy vs retrieved sources - {results['model']}", fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    by_k_path = out / "accuracy_vs_k.png"
    with atomic_path(by_k_path) as temporary:
        figure.savefig(temporary)
    plt.close(figure)

    base_ignore = min(ignore for _, ignore, _ in settings)
    policies = list(dict.fromkeys(policy for _, _, policy in settings))
    curves = {}
    for k in grid:
        for policy in policies:
            points = [(row["avg_total_tokens" if policy else "avg_thinking_tokens"], row["accuracy"]) for row in rows
                      if row["k"] == k and row["num_ignore"] == base_ignore and row.get("policy") == policy]
            name = k_label(int(k) if k.isdigit() else k)
            curves[name if policy is None else f"{name}, {policy}"] = {"points": sorted(points)}
    thinking_path = out / "accuracy_vs_thinking.png"
    with atomic_path(thinking_path) as temporary:
        if policies != [None]:
            from t0s1.evaluation.plots import TOTAL_TOKENS_LABEL

            plot_task("accuracy vs total tokens", curves, temporary, model=results["model"], x_label=TOTAL_TOKENS_LABEL,
                      labels={})
        else:
            plot_task("accuracy vs thinking tokens", curves, temporary, model=results["model"])
    return {"accuracy_vs_k": by_k_path.name, "accuracy_vs_thinking": thinking_path.name}


def markdown_tables(results: dict) -> str:
    """The retrieval scores and the k x budget accuracy table, in markdown."""
    retrieval = results["retrieval"]
    keys = [key for key in retrieval if key.startswith(("p@", "recall@"))] + ["mrr"]
    lines = [f"## Retrieval ({retrieval['retriever']}, {retrieval['queries']} questions)", "",
             "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys),
             "| " + " | ".join(f"{retrieval[key]:.3f}" for key in keys) + " |", ""]
    skipped = results["rag"]["skipped"]
    if skipped:
        lines += [f"{len(skipped)} question rows skipped: " + "; ".join(f"line {s['line']}: {s['reason']}" for s in skipped[:5]), ""]
    rows = results.get("accuracy_by_k")
    if rows:
        settings = list(dict.fromkeys(row_setting(row) for row in rows))
        cells = {(row["k"], *row_setting(row)): row for row in rows}
        policies = any("policy" in row for row in rows)
        tokens = "avg_total_tokens" if policies else "avg_thinking_tokens"
        lines += [f"## Accuracy (%) by sources and {'policy and ' if policies else ''}thinking budget "
                  f"(average {'total generated' if policies else 'thinking'} tokens)", "",
                  "| sources | " + " | ".join(setting_label(*setting) for setting in settings) + " |",
                  "| --- |" + " --- |" * len(settings)]
        for k in dict.fromkeys(row["k"] for row in rows):
            row_cells = [cells.get((k, *setting)) for setting in settings]
            lines.append(f"| {k_label(int(k) if k.isdigit() else k)} | "
                         + " | ".join(f"{c['accuracy']:.1f} ({c[tokens]:.0f})" if c else "" for c in row_cells) + " |")
        lines.append("")
    return "\n".join(lines)


def backend_tokenizer(backend) -> tuple[object, int]:
    """The tokenizer and context length prompts are packed for: the loaded model's, else the
    client-side backend's (context 32,768 tokens when the backend does not know it)."""
    lm = getattr(backend, "lm", None)
    if lm is not None:
        return lm.tokenizer, lm.context_length
    forcing = getattr(backend, "forcing", None)
    if forcing is None:
        raise UserError(f"The {getattr(backend, 'name', 'given')} backend exposes no tokenizer to pack the sources with.")
    return forcing.tokenizer, forcing.context_length or 32_768


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _write_results(out: Path, results: dict, runner_markdown: str) -> None:
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    model = f" of {results['model']}" if "model" in results else ""
    title = f"# Retrieval-augmented evaluation{model}\n\n"
    runner_body = runner_markdown.split("\n", 2)[2] if runner_markdown.count("\n") >= 2 else ""
    write_text_atomic(out / "results.md", title + markdown_tables(results) + "\n" + runner_body)


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
