"""``t0s1 lm-eval``: lm-evaluation-harness's own command line, with the ``t0s1`` model registered
and the ``t0s1_*`` tasks on its task path. Every argument but ``--data-dir`` goes to the harness
unchanged; ``--model`` defaults to ``t0s1``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from t0s1.cli_support import exit_on_user_error
from t0s1.errors import UserError
from t0s1.evaluation.tasks import DATA_DIR_ENV, resolve_data_dir

HELP = "\n\n".join(
    (
        "Run lm-evaluation-harness with budget forcing: the t0s1 model and the t0s1_* tasks.",
        "Every option but --data-dir is the harness's own (list them with: t0s1 lm-eval run -h). The model is t0s1 "
        "unless --model says otherwise. --model_args takes pretrained= (anything t0s1 loads, the embedded default's "
        "name too), backend=transformers|vllm|openai, and the generation settings under s1's names or ours: "
        "max_tokens_thinking / max_thinking_tokens (a number or auto), thinking_n_ignore / num_ignore, "
        "thinking_n_ignore_str / ignore_str, max_gen_toks / max_answer_tokens (the answer's cap), temperature, "
        "top_p, seed. --gen_kwargs overrides them. An argument the t0s1 model does not know is an error.",
        "Tasks: t0s1_aime24, t0s1_aime24_nofigures, t0s1_aime25, t0s1_math500, t0s1_gpqa_diamond, t0s1_gsm8k (tag "
        "t0s1_s1: the three s1 reports), asked and graded as t0s1 eval does, and every task of the harness. Their "
        f"data: --data-dir, else ${DATA_DIR_ENV}, else the hub.",
        "Example: t0s1 lm-eval --model_args pretrained=DIR,max_tokens_thinking=1024,thinking_n_ignore=1 "
        "--tasks t0s1_s1 --data-dir data --apply_chat_template --batch_size 8 --log_samples --output_path runs/lm-eval",
    )
)


def register(app: typer.Typer) -> None:
    app.command(
        "lm-eval",
        help=HELP,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(lm_eval_command)


@exit_on_user_error
def lm_eval_command(
    ctx: typer.Context,
    data_dir: Path = typer.Option(None, "--data-dir", help=f"Folder with the benchmark JSONL files for the t0s1_* tasks (default: ${DATA_DIR_ENV}; else the hub)."),
) -> None:
    if data_dir is not None:
        os.environ[DATA_DIR_ENV] = str(resolve_data_dir(data_dir))
    run_harness(list(ctx.args))


def run_harness(argv: list[str]) -> None:
    """The harness's command line on ``argv``, with the t0s1 model and tasks known to it."""
    try:
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging
    except ImportError:
        raise UserError("t0s1 lm-eval needs lm-evaluation-harness: pip install 't0s1[lm-eval]'.") from None
    from t0s1.lm_eval import TASKS_DIR
    from t0s1.lm_eval.model import DEFAULT_BATCH_SIZE, check_model_args, policy_from_model_args

    setup_logging()
    saved, sys.argv = sys.argv, ["lm-eval", *argv]
    try:
        harness = HarnessCLI()
        args = harness.parse_args()
    finally:
        sys.argv = saved
    if hasattr(args, "include_path"):  # run, ls and validate: our tasks first, the user's after
        args.include_path = [str(TASKS_DIR), *([args.include_path] if args.include_path else [])]
    if getattr(args, "command", None) == "run":
        args.model = args.model or "t0s1"
        if args.model == "t0s1":
            model_args = args.model_args or {}
            # The harness passes these to the model itself: moved out of --model_args, one
            # source each (the harness would pass them twice).
            for option in ("batch_size", "max_batch_size", "device"):
                if option in model_args:
                    if getattr(args, option, None) is not None:
                        raise UserError(f"{option} is given twice, in --model_args and as --{option}; give one.")
                    setattr(args, option, model_args.pop(option))
            # The harness's defaults are for its hf model (batch 1, cuda:0); the t0s1 model's
            # are t0s1 eval's (batch 8, the GPU if there is one).
            if getattr(args, "batch_size", None) is None:
                args.batch_size = str(DEFAULT_BATCH_SIZE)
            args.device = args.device or "auto"
            # Bad generation arguments fail now, not after indexing tasks and loading the model.
            generation = dict(model_args)
            policy_from_model_args(generation)  # takes policy, n and policy_* out (and checks them)
            defaults = check_model_args(generation)
            _check_gen_kwargs(args.gen_kwargs or {}, defaults)
    harness.execute(args)


def _check_gen_kwargs(gen_kwargs: dict, defaults) -> None:
    from t0s1.lm_eval import arguments

    arguments.stop_strings(gen_kwargs)
    arguments.budget_from_arguments({k: v for k, v in gen_kwargs.items() if k != "until"}, defaults, requests=True)
