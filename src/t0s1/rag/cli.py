"""``t0s1 index build|info`` and ``t0s1 rag search|ask``: retrieval-augmented reasoning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from t0s1.cli_support import (
    BUDGET_DEFAULTS,
    BackendOption,
    ContextLengthOption,
    DeviceOption,
    DtypeOption,
    IgnoreStrOption,
    MaxAnswerOption,
    MaxThinkingOption,
    ModelOption,
    NOption,
    NumIgnoreOption,
    PolicyArgOption,
    ReasoningFormatOption,
    SeedOption,
    StreamPrinter,
    TemperatureOption,
    TopPOption,
    TrustRemoteCodeOption,
    budget_from_flags,
    exit_on_user_error,
)
from t0s1.errors import UserError
from t0s1.evaluation.cli import EvalPolicyOption
from t0s1.models import EMBEDDED_MODEL
from t0s1.rag.embedders import EMBEDDED_EMBEDDER

index_app = typer.Typer(help="Build and inspect retrieval indexes (bm25, dense, hybrid).", no_args_is_help=True)
rag_app = typer.Typer(help="Retrieve sources and reason over them with budget forcing.", no_args_is_help=True)



def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")
    app.add_typer(rag_app, name="rag")


RetrieverChoice = Annotated[
    str | None,
    typer.Option("--retriever", help="bm25, dense or hybrid (reciprocal rank fusion of both); default: the index's."),
]
IndexOption = Annotated[Path, typer.Option("--index", help="The index folder (t0s1 index build).")]
KOption = Annotated[int, typer.Option("--k", help="How many sources (parent documents) to retrieve.")]
QdrantUrlOption = Annotated[
    str | None, typer.Option("--qdrant-url", help="A Qdrant server for the dense vectors, e.g. http://localhost:6333.")
]
QdrantKeyOption = Annotated[str | None, typer.Option("--qdrant-api-key", envvar="QDRANT_API_KEY", help="Qdrant API key.")]
RerankOption = Annotated[
    str | None,
    typer.Option(
        "--rerank",
        help="Re-rank the top --rerank-depth documents: a cross-encoder (folder or hub id), or 'llm' for the generator.",
    ),
]
RerankDepthOption = Annotated[int, typer.Option("--rerank-depth", help="Candidates the re-ranker reads.")]


@index_app.command("build")
@exit_on_user_error
def build_command(
    corpus: Annotated[Path, typer.Argument(help="A .jsonl or .parquet file, or a folder of .txt / .md files.")],
    out: Annotated[Path, typer.Option("--out", help="The index folder to write (made atomically).")],
    retriever: Annotated[str, typer.Option(help="bm25 (no model), dense or hybrid (both; embeds every chunk).")] = "bm25",
    embedder: Annotated[
        str, typer.Option(help="Dense model: the embedded default, a sentence-transformers folder or a hub id.")
    ] = EMBEDDED_EMBEDDER,
    chunk_tokens: Annotated[int, typer.Option(help="Tokens per chunk (embedder tokens; words for bm25 only).")] = 200,
    chunk_overlap: Annotated[int, typer.Option(help="Tokens shared by neighbouring chunks.")] = 50,
    id_field: Annotated[str | None, typer.Option(help="Field holding a document's id (default: id, doc_id, _id; else the title).")] = None,
    title_field: Annotated[str | None, typer.Option(help="Field holding the title (default: title, condition_title, name).")] = None,
    text_field: Annotated[
        str | None, typer.Option(help="Field holding the text (default: text, content, condition_content, body).")
    ] = None,
    qdrant_url: QdrantUrlOption = None,
    qdrant_path: Annotated[Path | None, typer.Option(help="Qdrant's local mode: keep the vectors in this folder.")] = None,
    qdrant_collection: Annotated[str | None, typer.Option(help="Qdrant collection (default: the --out folder's name).")] = None,
    qdrant_api_key: QdrantKeyOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an index of another corpus or settings in --out.")] = False,
    batch_size: Annotated[int, typer.Option(help="Chunks per embedding batch.")] = 32,
    device: DeviceOption = "cpu",
) -> None:
    """Index a corpus: chunk it, build bm25 and (dense / hybrid) embed the chunks.

    Rebuilding the same corpus with the same settings reuses the index without embedding again."""
    from t0s1.rag.corpus import FieldMap
    from t0s1.rag.store import QdrantTarget, build_index

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
    qdrant = None
    if qdrant_url or qdrant_path:
        qdrant = QdrantTarget(qdrant_url, str(qdrant_path.resolve()) if qdrant_path else None, qdrant_collection, qdrant_api_key)
    result = build_index(
        corpus, out, retriever=retriever, embedder=embedder, chunk_tokens=chunk_tokens, overlap_tokens=chunk_overlap,
        fields=FieldMap(id_field, title_field, text_field), qdrant=qdrant, overwrite=overwrite, batch_size=batch_size,
        device=device,
    )
    manifest = result.index.manifest
    stderr = Console(stderr=True, highlight=False)
    if result.reused:
        stderr.print(f"{out} already holds this index ({manifest['documents']} documents, {manifest['chunks']} chunks): reused, nothing re-embedded.")
    else:
        stderr.print(
            f"Indexed {manifest['documents']} documents as {manifest['chunks']} chunks into {out} "
            f"({', '.join(result.index.retrievers)}) in {result.seconds:.1f} s."
        )


@index_app.command("info")
@exit_on_user_error
def info_command(
    index: Annotated[Path, typer.Argument(help="The index folder.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Hash every file (and check the Qdrant collection) against the manifest.")
    ] = False,
) -> None:
    """Show what an index holds: corpus, chunker, retrievers, embedder and its weights' hash.

    Opening an index checks every file's size and the small files' SHA-256; --verify hashes them all."""
    from t0s1.rag.store import open_index, verify_index

    if verify:
        verify_index(index)
    info = open_index(index).info()
    if json_output:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return
    console = Console(highlight=False)
    chunker = info["chunker"]
    console.print(f"[bold]{info['path']}[/]  ({info['bytes_on_disk'] / 1e6:.1f} MB, built {info.get('created', '?')} by t0s1 {info.get('t0s1_version', '?')})")
    console.print(f"corpus      {info['corpus_source']}: {info['documents']} documents, SHA-256 {info['corpus_sha256']}")
    console.print(
        f"chunks      {info['chunks']}: up to {chunker['chunk_tokens']} tokens each ({chunker['unit']}), overlap {chunker['overlap_tokens']}"
    )
    console.print(f"bm25        {info['bm25']['method']} k1={info['bm25']['k1']} b={info['bm25']['b']}, stemmer {info['bm25']['stemmer']}")
    dense = info.get("dense")
    if dense:
        embedder, store = dense["embedder"], dense["store"]
        where = store.get("file") if store["kind"] == "embedded" else (
            f"Qdrant {store.get('url') or store.get('path')} / {store['collection']}"
            + (f" (alias {store['alias']})" if store.get("alias") else "")
        )
        console.print(f"dense       {embedder['name']} ({embedder['dimension']} dimensions), vectors in {where}")
        console.print(f"            weights {embedder['weights_file']} SHA-256 {embedder['weights_sha256']}")
    console.print(f"retrievers  {', '.join(['bm25', 'dense', 'hybrid'] if dense else ['bm25'])} (default {info['retriever']})")
    console.print(f"files       {len(info['files'])}, " + ("every SHA-256 verified" if verify else "sizes checked (--verify hashes them all)"))


def _open(index: Path, qdrant_url, qdrant_api_key):
    from t0s1.rag.store import open_index

    return open_index(index, qdrant_url=qdrant_url, qdrant_api_key=qdrant_api_key)


def _retriever(index, name: str | None, rerank: str | None, rerank_depth: int, lm=None, device: str = "cpu"):
    """The retriever to use: by name, wrapped in a re-ranker if asked."""
    from t0s1.rag.retrievers import CrossEncoderReranker, LlmReranker, RerankedRetriever

    base = index.retriever(name)
    if not rerank:
        return base
    if rerank == "llm":
        if lm is None:
            raise UserError("--rerank llm re-ranks with the generator: use it with t0s1 rag ask.")
        return RerankedRetriever(base, LlmReranker(lm), rerank_depth)
    return RerankedRetriever(base, CrossEncoderReranker(rerank, device=device), rerank_depth)


def _check_k(k: int) -> None:
    if k < 0:
        raise UserError(f"--k must be 0 or more (the number of sources), got {k}.")


@rag_app.command("search")
@exit_on_user_error
def search_command(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    index: IndexOption,
    k: KOption = 5,
    retriever: RetrieverChoice = None,
    rerank: RerankOption = None,
    rerank_depth: RerankDepthOption = 20,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per hit, with its text and chunks.")] = False,
    qdrant_url: QdrantUrlOption = None,
    qdrant_api_key: QdrantKeyOption = None,
) -> None:
    """Retrieve the k best documents for a query (no generation)."""
    _check_k(k)
    opened = _open(index, qdrant_url, qdrant_api_key)
    from t0s1.rag.answer import retrieve_sources

    hits = retrieve_sources(opened, query, k, _retriever(opened, retriever, rerank, rerank_depth))
    if json_output:
        for rank, hit in enumerate(hits, start=1):
            print(json.dumps({"rank": rank, **hit.to_dict(with_text=True)}, ensure_ascii=False))
        return
    console = Console(highlight=False)
    if not hits:
        console.print("No document matches.")
    for rank, hit in enumerate(hits, start=1):
        console.print(Text.assemble((f"[{rank}] {hit.title}", "bold"), f"  {hit.retriever} {hit.score:.4f}  id {hit.doc_id}"))
        console.print(Text(f"    {hit.snippet(200)}", style="dim"))


@rag_app.command("ask")
@exit_on_user_error
def ask_command(
    question: Annotated[str, typer.Argument(help="The question.")],
    index: IndexOption,
    k: KOption = 5,
    retriever: RetrieverChoice = None,
    rerank: RerankOption = None,
    rerank_depth: RerankDepthOption = 20,
    embedder: Annotated[
        str | None, typer.Option(help="Embed queries with this model; refused unless it is the one the index was built with.")
    ] = None,
    model: ModelOption = EMBEDDED_MODEL,
    max_thinking_tokens: MaxThinkingOption = str(BUDGET_DEFAULTS.max_thinking_tokens),
    num_ignore: NumIgnoreOption = BUDGET_DEFAULTS.num_ignore,
    ignore_str: IgnoreStrOption = BUDGET_DEFAULTS.ignore_str,
    max_answer_tokens: MaxAnswerOption = BUDGET_DEFAULTS.max_answer_tokens,
    temperature: TemperatureOption = BUDGET_DEFAULTS.temperature,
    top_p: TopPOption = BUDGET_DEFAULTS.top_p,
    seed: SeedOption = BUDGET_DEFAULTS.seed,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object: answer, thinking, budget figures and sources.")
    ] = False,
    qdrant_url: QdrantUrlOption = None,
    qdrant_api_key: QdrantKeyOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    reasoning_format: ReasoningFormatOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Answer a question from retrieved sources: numbered sources in the prompt, budget forcing,
    and the reply names the sources it used."""
    _check_k(k)
    if not question.strip():
        raise UserError("The question is empty: give the question to answer.")
    settings = budget_from_flags(max_thinking_tokens, num_ignore, ignore_str, max_answer_tokens, temperature, top_p, seed)
    opened = _open(index, qdrant_url, qdrant_api_key)
    # An unknown or unavailable retriever, or an embedder that does not match, fails before the model loads.
    if opened.retriever(retriever).name != "bm25":
        if embedder:
            from t0s1.rag.embedders import load_embedder

            opened.use_embedder(load_embedder(embedder))
        else:
            opened.embedder  # noqa: B018 (loads and checks the index's embedder)
    from t0s1.models import load_model
    from t0s1.rag.answer import ask

    lm = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, reasoning_format=reasoning_format)
    chosen = _retriever(opened, retriever, rerank, rerank_depth, lm)
    if json_output:
        reply = ask(lm, opened, question, settings, k=k, retriever=chosen)
        print(json.dumps(reply.to_dict(), ensure_ascii=False))
        return
    console = Console(highlight=False)
    on_delta = StreamPrinter(console)
    reply = ask(lm, opened, question, settings, k=k, retriever=chosen, on_delta=on_delta)
    result = reply.result
    if not on_delta.shown["answer"]:
        console.print(Text("\n\nAnswer", style="bold"))
        console.print(Text("(empty)", style="dim"), end="")
    console.print(
        f"\n\n[dim]{result.thinking_tokens} thinking tokens (budget {reply.thinking_budget}, {result.num_ignored} x "
        f"{settings.ignore_str!r}), {result.answer_tokens} answer tokens, {result.seconds:.1f} s[/]"
    )
    dropped = f", {reply.prompt.dropped} dropped to fit the context" if reply.prompt.dropped else ""
    console.print(Text(f"\nSources ({chosen.name}, {reply.retrieved} retrieved{dropped}):", style="bold"))
    if not reply.sources:
        console.print("  none")
    cited = set(reply.cited)
    for number, hit in enumerate(reply.sources, start=1):
        mark = "  cited" if number in cited else ""
        console.print(f"  [{number}] {hit.title}  score {hit.score:.4f}  id {hit.doc_id}{mark}", markup=False)


# --------------------------------------------------------------------------------------------
# Evaluation, synthetic questions, training traces

QuestionsOption = Annotated[
    Path, typer.Option("--questions", help="JSONL: `question`, `gold_ids` (document ids), `answer`, optional `id`.")
]
AnswerKindOption = Annotated[
    str, typer.Option("--answer-kind", help="How answers are graded: exact (normalised text), choice, number, integer or math.")
]
TeacherOption = Annotated[
    str,
    typer.Option("--teacher", help="The teacher: a model name at --base-url, or (without --base-url) a model run here."),
]
BaseUrlOption = Annotated[
    str | None, typer.Option("--base-url", help="An OpenAI-compatible endpoint of the teacher, e.g. http://localhost:8000/v1.")
]
ApiKeyOption = Annotated[str | None, typer.Option("--api-key", envvar="OPENAI_API_KEY", help="API key for --base-url.")]
TeacherThinkingOption = Annotated[
    str | None,
    typer.Option(
        "--teacher-max-thinking-tokens",
        help="The teacher's thinking budget (a model run here, or t0s1 serve: sent as max_thinking_tokens).",
    ),
]
TeacherMaxTokensOption = Annotated[
    int | None, typer.Option("--teacher-max-tokens", help="max_tokens of each teacher reply (t0s1 serve: the answer after the thinking).")
]
TeacherTemperatureOption = Annotated[float, typer.Option("--teacher-temperature", help="The teacher's sampling temperature (0: greedy).")]
BatchOption = Annotated[int, typer.Option("--batch-size", help="Requests sent to the teacher together.")]


def _teacher(teacher: str, base_url, api_key, max_thinking: str | None, max_tokens: int | None, temperature: float, device: str):
    from t0s1.cli_support import parse_thinking_budget
    from t0s1.forcing import BudgetForcing
    from t0s1.rag.teacher import make_teacher

    budget = parse_thinking_budget(max_thinking, "--teacher-max-thinking-tokens") if max_thinking is not None else None
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--teacher-max-tokens must be at least 1, got {max_tokens}.")
    local = BudgetForcing(
        max_thinking_tokens=budget if budget is not None else BUDGET_DEFAULTS.max_thinking_tokens,
        max_answer_tokens=max_tokens or BUDGET_DEFAULTS.max_answer_tokens,
        temperature=temperature,
    )
    return make_teacher(teacher, base_url=base_url, api_key=api_key, settings=local, max_tokens=max_tokens,
                        budget_fields={"max_thinking_tokens": budget}, temperature=temperature, device=device)


@rag_app.command("eval")
@exit_on_user_error
def eval_command(
    index: IndexOption,
    questions: QuestionsOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (rerun with the same one to resume).")],
    k: Annotated[str, typer.Option("--k", help="Numbers of sources: p@K / recall@K for each, and the k of the grid.")] = "1,5,20",
    grid_k: Annotated[
        str | None, typer.Option("--grid-k", help="The k of the grid when they differ from --k (e.g. --k 1,5,20 --grid-k 5).")
    ] = None,
    retrieval_only: Annotated[
        bool, typer.Option("--retrieval-only", help="Score retrieval only (p@K, recall@K, MRR); no generator is loaded.")
    ] = False,
    baselines: Annotated[
        bool, typer.Option(help="Add k = 0 (no retrieval) and the gold sources (a perfect retriever) to the grid.")
    ] = True,
    retriever: RetrieverChoice = None,
    answer_kind: AnswerKindOption = "exact",
    inconclusive_counts: Annotated[
        bool,
        typer.Option(help="t0's rule: an answer saying 'inconclusive' counts as right when no source in its prompt is gold."),
    ] = False,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N usable questions.")] = None,
    model: ModelOption = EMBEDDED_MODEL,
    backend: BackendOption = "auto",
    base_url: Annotated[str | None, typer.Option("--base-url", help="OpenAI-compatible endpoint for --backend openai.")] = None,
    api_key: ApiKeyOption = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer for --backend openai (default: --model).")] = None,
    context_length: ContextLengthOption = None,
    max_thinking_tokens: Annotated[
        str, typer.Option("--max-thinking-tokens", help="Thinking budgets of the grid, e.g. 64,256,1024 (or auto).")
    ] = str(BUDGET_DEFAULTS.max_thinking_tokens),
    num_ignore: Annotated[str, typer.Option("--num-ignore", help="num_ignore values of the grid ('Wait'), e.g. 0,1,3.")] = "0",
    ignore_str: IgnoreStrOption = BUDGET_DEFAULTS.ignore_str,
    max_answer_tokens: MaxAnswerOption = BUDGET_DEFAULTS.max_answer_tokens,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Questions generated together.")] = 8,
    policy: EvalPolicyOption = None,
    n: NOption = None,
    policy_arg: PolicyArgOption = None,
    temperature: Annotated[
        float, typer.Option(help="0: greedy (the default); the parallel policies (vote, deepconf, short-m-of-k) need > 0.")
    ] = 0.0,
    top_p: TopPOption = BUDGET_DEFAULTS.top_p,
    seed: Annotated[int, typer.Option(help="Base seed of sampling (trace j of a policy uses seed + j).")] = BUDGET_DEFAULTS.seed,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    reasoning_format: ReasoningFormatOption = None,
    qdrant_url: QdrantUrlOption = None,
    qdrant_api_key: QdrantKeyOption = None,
) -> None:
    """Evaluate retrieval (p@K, recall@K, MRR) and answers over sources x thinking budgets.

    The grid is every k of --k (plus 0 and the gold sources) x every budget x every num_ignore
    (x every --policy), greedy unless --temperature. Samples, results.json, results.md and plots go
    to --out; rerun to resume."""
    from t0s1.cli_support import parse_int_list
    from t0s1.evaluation.cli import parse_policies
    from t0s1.rag.evaluate import RagEvalSpec, run_rag_eval
    from t0s1.rag.questions import read_questions

    spec = RagEvalSpec(tuple(parse_int_list(k, "--k")), baselines, retriever, answer_kind, inconclusive_counts,
                       tuple(parse_int_list(grid_k, "--grid-k")) if grid_k else None)
    opened = _open(index, qdrant_url, qdrant_api_key)
    opened.retriever(retriever)  # an unknown or unavailable retriever fails before any work
    question_file = read_questions(questions, index=opened, need_gold=True, need_answer=not retrieval_only, limit=limit)
    stderr = Console(stderr=True, highlight=False)
    if question_file.problems:
        stderr.print(question_file.report())
    engine = config = None
    if not retrieval_only:
        from t0s1.backends import make_backend
        from t0s1.evaluation.runner import EvalConfig
        from t0s1.models import choose_backend

        config = EvalConfig(
            model=model, backend=choose_backend(model, device, backend),  # what ran: auto differs between machines
            max_thinking_tokens=parse_int_list(max_thinking_tokens, "--max-thinking-tokens", allow_auto=True),
            num_ignore=parse_int_list(num_ignore, "--num-ignore"), ignore_str=ignore_str,
            max_answer_tokens=max_answer_tokens, batch_size=batch_size, temperature=temperature, top_p=top_p, seed=seed,
            policies=parse_policies(policy, n, policy_arg),
        )
        engine = make_backend(backend, model, device=device, dtype=dtype, base_url=base_url, api_key=api_key,
                              tokenizer=tokenizer, reasoning_format=reasoning_format, context_length=context_length)
    results = run_rag_eval(opened, question_file, out, spec, backend=engine, config=config)
    print_results(results, Console(highlight=False))
    stderr.print(f"Wrote {out}/results.json, results.md" + ("" if retrieval_only else ", samples/ and plots") + ".")


def print_results(results: dict, console: Console) -> None:
    """The retrieval scores and the k x budget table of ``rag eval`` results."""
    from rich.table import Table

    from rich.markup import escape

    from t0s1.rag.evaluate import k_label, row_setting, setting_label

    retrieval = results["retrieval"]
    scores = ", ".join(f"{key} {value:.3f}" for key, value in retrieval.items() if key.startswith(("p@", "recall@", "mrr")) and key != "mrr_depth")
    console.print(f"Retrieval ({retrieval['retriever']}, {retrieval['queries']} questions): {scores}")
    rows = results.get("accuracy_by_k")
    if not rows:
        return
    settings = list(dict.fromkeys(row_setting(row) for row in rows))
    cells = {(row["k"], *row_setting(row)): row for row in rows}
    policies = any("policy" in row for row in rows)
    tokens = "avg_total_tokens" if policies else "avg_thinking_tokens"
    table = Table(title=f"accuracy % (avg {'total' if policies else 'thinking'} tokens), {results['rag']['questions']} questions, "
                        f"{escape(results['model'])}")
    table.add_column("sources")
    for setting in settings:
        table.add_column(escape(setting_label(*setting)), justify="right")
    for k in dict.fromkeys(row["k"] for row in rows):
        entries = [cells.get((k, *setting)) for setting in settings]
        table.add_row(k_label(int(k) if k.isdigit() else k),
                      *[f"{e['accuracy']:.0f} ({e[tokens]:.0f})" if e else "" for e in entries])
    console.print(table)
    if results.get("plots"):
        console.print("Plots: " + ", ".join(results["plots"].values()))


@rag_app.command("synth-questions")
@exit_on_user_error
def synth_command(
    source: Annotated[Path, typer.Argument(help="An index folder, or a corpus (.jsonl / .parquet / folder of .txt / .md).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The question file to write (JSONL; rerun to resume).")],
    teacher: TeacherOption = EMBEDDED_MODEL,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
    template: Annotated[
        Path | None, typer.Option(help="Prompt template ({title}, {text}, {count}, {id}); default: the shipped one.")
    ] = None,
    per_document: Annotated[int, typer.Option(help="Questions asked for per document.")] = 3,
    limit: Annotated[int | None, typer.Option(help="Use the first N documents.")] = None,
    teacher_max_thinking_tokens: TeacherThinkingOption = None,
    teacher_max_tokens: TeacherMaxTokensOption = None,
    teacher_temperature: TeacherTemperatureOption = 0.0,
    batch_size: BatchOption = 8,
    id_field: Annotated[str | None, typer.Option(help="Corpus field holding a document's id.")] = None,
    title_field: Annotated[str | None, typer.Option(help="Corpus field holding the title.")] = None,
    text_field: Annotated[str | None, typer.Option(help="Corpus field holding the text.")] = None,
    device: DeviceOption = "auto",
) -> None:
    """Have a teacher write questions and answers from documents.

    Each question keeps its document as the gold id. Duplicates are dropped; documents the teacher
    fails on are counted, named and asked again on a rerun."""
    from t0s1.rag.corpus import FieldMap
    from t0s1.rag.synth import load_documents, load_template, synth_questions

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive integer, got {limit}.")
    text = load_template(template)
    documents = load_documents(source, FieldMap(id_field, title_field, text_field))[:limit]
    chosen = _teacher(teacher, base_url, api_key, teacher_max_thinking_tokens, teacher_max_tokens, teacher_temperature, device)
    report = synth_questions(documents, chosen, out, template=text, per_document=per_document, batch_size=batch_size)
    Console(stderr=True, highlight=False).print(report.summary())


@rag_app.command("traces")
@exit_on_user_error
def traces_command(
    index: IndexOption,
    questions: QuestionsOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="The s1K-schema JSONL to write (rerun to resume).")],
    teacher: TeacherOption = EMBEDDED_MODEL,
    base_url: BaseUrlOption = None,
    api_key: ApiKeyOption = None,
    k: KOption = 5,
    retriever: RetrieverChoice = None,
    filter_correct: Annotated[
        bool, typer.Option("--filter-correct", help="Keep only traces whose answer matches the question's `answer`.")
    ] = False,
    answer_kind: AnswerKindOption = "exact",
    model: Annotated[
        str, typer.Option("--model", "-m", help="The student: its tokenizer and context decide how the sources are packed.")
    ] = EMBEDDED_MODEL,
    max_thinking_tokens: Annotated[
        str, typer.Option("--max-thinking-tokens", help="The student's thinking budget, kept free when packing sources.")
    ] = str(BUDGET_DEFAULTS.max_thinking_tokens),
    max_answer_tokens: MaxAnswerOption = BUDGET_DEFAULTS.max_answer_tokens,
    teacher_max_thinking_tokens: TeacherThinkingOption = None,
    teacher_max_tokens: TeacherMaxTokensOption = None,
    teacher_temperature: TeacherTemperatureOption = 0.0,
    limit: Annotated[int | None, typer.Option(help="Use the first N usable questions.")] = None,
    batch_size: BatchOption = 8,
    qdrant_url: QdrantUrlOption = None,
    qdrant_api_key: QdrantKeyOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Write a teacher's reasoning over retrieved sources as s1K training rows.

    The question of each row carries the numbered sources, so `t0s1 prepare` and `t0s1 train` take
    the file as it is. Failed and (with --filter-correct) incorrect traces are counted and named."""
    from t0s1.cli_support import parse_thinking_budget
    from t0s1.data.prepare import load_tokenizer
    from t0s1.forcing import BudgetForcing
    from t0s1.rag.prompt import reserve_tokens
    from t0s1.rag.questions import read_questions
    from t0s1.rag.traces import model_context_length, write_traces

    _check_k(k)
    opened = _open(index, qdrant_url, qdrant_api_key)
    opened.retriever(retriever)
    question_file = read_questions(questions, index=opened, limit=limit)
    stderr = Console(stderr=True, highlight=False)
    if question_file.problems:
        stderr.print(question_file.report())
    student = load_tokenizer(model)
    context_length = model_context_length(model)
    settings = BudgetForcing(parse_thinking_budget(max_thinking_tokens), max_answer_tokens=max_answer_tokens)
    chosen = _teacher(teacher, base_url, api_key, teacher_max_thinking_tokens, teacher_max_tokens, teacher_temperature, device)
    report = write_traces(
        question_file.questions, opened, chosen, out, tokenizer=student, context_length=context_length,
        reserved_tokens=reserve_tokens(settings, context_length), k=k, retriever=retriever,
        filter_correct=filter_correct, answer_kind=answer_kind, batch_size=batch_size,
    )
    report.skipped = question_file.problems + report.skipped
    stderr.print(report.summary())
