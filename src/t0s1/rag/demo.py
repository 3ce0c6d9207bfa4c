"""``t0s1 quickstart --rag``: retrieval-augmented reasoning end to end, offline, on a CPU.

1. A knowledge base the package generates (``t0s1.rag.synthetic.KnowledgeBase``): made-up people,
   each with a town and a number of goats, one short document each, so the base model cannot know
   any answer. Questions need one fact ("Where does Kobur Mopak live?") or two combined ("How
   many goats do Kobur Mopak and Vadon Gunas keep together?"). Training questions are about one
   set of people, held-out questions about others.
2. A bm25 index of the documents (``build_index``).
3. Traces (``write_traces``, as ``t0s1 rag traces``) over the retrieved sources, written by
   ``KnowledgeBaseTeacher``: the package's own template, which knows the facts and cites the
   sources by number, in place of a large teacher model (as the arithmetic quickstart writes its
   traces).
4. ``t0s1 prepare`` and a LoRA SFT of the embedded SmolLM2-135M (recipe ``quickstart-rag``).
5. ``t0s1 rag eval`` of the trained model on the held-out questions: retrieval scores and the
   grid of k (0, the retrieved k, the gold sources) x thinking budgets.

Each step is skipped when its output exists, so a rerun goes on where an interrupted one stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from t0s1.models import EMBEDDED_MODEL
from t0s1.rag.synthetic import KnowledgeBase
from t0s1.rag.teacher import Teacher, TeacherReply, TeacherRequest

RECIPE = "quickstart-rag"
"""The training recipe of the demo (``recipes/quickstart-rag.yaml``)."""


class KnowledgeBaseTeacher(Teacher):
    """A scripted teacher that knows the knowledge base: for each request it writes the facts of
    the people the question names, citing the numbers of their sources in the prompt, the sum
    when there are two, and the answer (``KnowledgeBase.reasoning``)."""

    name = "t0s1 knowledge-base template"

    def __init__(self, knowledge_base: KnowledgeBase):
        self.knowledge_base = knowledge_base

    def reply(self, requests: list[TeacherRequest]) -> list[TeacherReply]:
        replies = []
        for request in requests:
            question = request.question
            thinking, answer = self.knowledge_base.reasoning(
                question.meta["kind"], list(question.gold_ids), [hit.doc_id for hit in request.sources]
            )
            replies.append(TeacherReply(thinking, answer))
        return replies


@dataclass
class RagDemoSettings:
    out: Path = Path("runs/quickstart-rag")
    num_people: int = 400
    num_train: int = 400  # training questions written (the recipe's steps x batch are seen)
    num_test: int = 100
    train_k: int = 3
    ks: list = field(default_factory=lambda: [1, 3, 5])  # p@K and recall@K
    grid_ks: list = field(default_factory=lambda: [1, 3])  # generation, besides k = 0 and the gold sources
    budgets: list = field(default_factory=lambda: [0, 16, 32, 64])
    max_answer_tokens: int = 16
    steps: int | None = None  # None: the recipe's max_steps
    batch_size: int = 25
    seed: int = 0

    @property
    def held_out_people(self) -> int:
        return self.num_people // 4


def run_rag_demo(settings: RagDemoSettings, console: Console | None = None) -> dict:
    """Run every step (skipping those whose output exists) and return ``rag eval``'s results with
    ``seconds`` per step added."""
    from t0s1.backends import make_backend
    from t0s1.data.prepare import load_tokenizer, prepare
    from t0s1.evaluation.runner import EvalConfig, check_run_key
    from t0s1.forcing import BudgetForcing
    from t0s1.quickstart.stages import Stages, library_progress_bars_off, recipe_max_length, train_unless_done
    from t0s1.rag.evaluate import RagEvalSpec, run_rag_eval
    from t0s1.rag.prompt import reserve_tokens
    from t0s1.rag.questions import read_questions
    from t0s1.rag.store import build_index
    from t0s1.rag.traces import model_context_length, write_traces

    console = console or Console()
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    # What the traces and the model a rerun reuses were made from: other steps would keep the model trained before.
    check_run_key(out / "quickstart-rag.json", {"num_people": settings.num_people, "num_train": settings.num_train,
                                                "train_k": settings.train_k, "seed": settings.seed, "steps": settings.steps},
                  holds="a RAG demo run made with other settings")
    stages = Stages(console)
    with library_progress_bars_off():
        stages.start("data", "1/5  Knowledge base: made-up people, questions needing one or two facts")
        data = out / "data"
        knowledge_base = write_knowledge_base(data, settings)
        console.print(f"{settings.num_people} documents in {data / 'corpus.jsonl'}; {settings.num_train} training and "
                      f"{settings.num_test} held-out questions (about {settings.held_out_people} people never trained on)")
        stages.stop("data")

        stages.start("index", "2/5  Index: bm25 over the documents (t0s1 index build)")
        index = build_index(data / "corpus.jsonl", out / "index", retriever="bm25", progress=False).index
        stages.stop("index")

        stages.start("traces", f"3/5  Traces over the top {settings.train_k} sources, written by the knowledge-base template (t0s1 rag traces)")
        traces = data / "traces.jsonl"
        max_length = recipe_max_length(RECIPE)
        budget = BudgetForcing(max(settings.budgets), max_answer_tokens=settings.max_answer_tokens)
        tokenizer = load_tokenizer(EMBEDDED_MODEL)
        questions = read_questions(data / "train.jsonl", index=index).questions
        teacher = KnowledgeBaseTeacher(knowledge_base)
        context_length = model_context_length(EMBEDDED_MODEL)
        report = write_traces(  # packed as rag eval packs them: the prompts it evaluates at k = train_k
            questions, index, teacher, traces, tokenizer=tokenizer, context_length=context_length,
            reserved_tokens=reserve_tokens(budget, context_length), k=settings.train_k, progress=False,
        )
        console.print(report.summary())
        stages.stop("traces")

        stages.start("prepare", "4/5  Prepare and LoRA SFT of the embedded SmolLM2-135M (t0s1 prepare, t0s1 train quickstart-rag)")
        prepared, model_dir = out / "prepared", out / "model"
        if not (prepared / "prepare_report.json").exists():
            console.print(prepare(str(traces), EMBEDDED_MODEL, prepared, block_size=max_length).summary())
        stages.stop("prepare")
        stages.start("train")
        train_unless_done(RECIPE, prepared, model_dir, settings.steps, console)
        stages.stop("train")

        stages.start("eval", "5/5  Held-out questions: retrieval scores and the grid of k x thinking budgets (t0s1 rag eval)")
        questions = read_questions(data / "test.jsonl", index=index, need_gold=True, need_answer=True)
        config = EvalConfig(model=str(model_dir), max_thinking_tokens=list(settings.budgets), num_ignore=[0],
                            max_answer_tokens=settings.max_answer_tokens, batch_size=settings.batch_size)
        backend = make_backend("transformers", str(model_dir))
        spec = RagEvalSpec(tuple(settings.ks), baselines=True, answer_kind="exact", grid_ks=tuple(settings.grid_ks))
        results = run_rag_eval(index, questions, out / "eval", spec, backend=backend, config=config)
        stages.stop("eval")
    results["seconds"] = seconds = stages.seconds
    (out / "summary.json").write_text(json.dumps({"seconds": seconds, "accuracy_by_k": results["accuracy_by_k"],
                                                  "retrieval": results["retrieval"]}, indent=2) + "\n", encoding="utf-8")
    return results


def write_knowledge_base(data: Path, settings: RagDemoSettings) -> KnowledgeBase:
    """``corpus.jsonl`` (id, title, text), ``train.jsonl`` and ``test.jsonl`` (question files) in
    ``data``; the same settings always write the same files."""
    knowledge_base = KnowledgeBase(settings.num_people, seed=settings.seed)
    held_out = settings.held_out_people
    train_people, test_people = knowledge_base.people[:-held_out], knowledge_base.people[-held_out:]
    files = {
        "corpus.jsonl": [{"id": d.id, "title": d.title, "text": d.text} for d in knowledge_base.documents],
        "train.jsonl": [q.to_row() for q in knowledge_base.questions(train_people, settings.num_train, seed=settings.seed + 1, prefix="train-")],
        "test.jsonl": [q.to_row() for q in knowledge_base.questions(test_people, settings.num_test, seed=settings.seed + 2, prefix="test-")],
    }
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        path = data / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    return knowledge_base


def quickstart_rag(*, out: Path | None = None, steps: int | None = None, num_test: int = 100, budgets: list[int] | None = None,
                   console: Console | None = None) -> dict:
    """``t0s1 quickstart --rag`` (the flags checked by the command): run the demo, print the table
    and the plots. ``None``: the demo's default."""
    settings = RagDemoSettings(num_test=num_test, steps=steps)
    if out is not None:
        settings.out = out
    if budgets is not None:
        settings.budgets = list(budgets)
    console = console or Console()
    results = run_rag_demo(settings, console)
    print_demo(results, console, settings.out)
    return results


def print_demo(results: dict, console: Console, out: Path) -> None:
    """The k x budget table, what retrieval and thinking add, the time of each step, the plots."""
    from t0s1.rag.cli import print_results

    print_results(results, console)
    rows = results["accuracy_by_k"]
    accuracy = {(row["k"], row["max_thinking_tokens"]): row["accuracy"] for row in rows}
    budgets = sorted({row["max_thinking_tokens"] for row in rows})
    retrieved = [row for row in rows if row["k"] not in ("0", "gold")]
    best = max(retrieved, key=lambda row: row["accuracy"])
    k, largest, smallest = best["k"], budgets[-1], budgets[0]
    console.print(
        f"Retrieval: k={k} at budget {best['max_thinking_tokens']} gets {best['accuracy']:.0f}% against "
        f"{accuracy[('0', best['max_thinking_tokens'])]:.0f}% without sources; thinking: at k={k}, budget {largest} gets "
        f"{accuracy[(k, largest)]:.0f}% against {accuracy[(k, smallest)]:.0f}% at budget {smallest}.",
        highlight=False,
    )
    console.print("Steps: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in results["seconds"].items()) + ".")
    console.print(f"Results: {out / 'eval' / 'results.md'}; plots: "
                  + ", ".join(str(out / "eval" / name) for name in results["plots"].values()), highlight=False)
