"""s1 budget forcing inside ``vllm serve``: a logits processor and a reasoning parser.

``pip install 't0s1[vllm]'`` registers both with vLLM through entry points (pyproject.toml):

- ``vllm.logits_processors``: ``logits_processor.BudgetForcingLogitsProcessor``, loaded by every
  vLLM engine in the environment; it acts only on requests that carry budget fields
  (``max_thinking_tokens``, ``num_ignore``, ``ignore_str``, ``max_answer_tokens`` in ``vllm_xargs``,
  or vLLM's ``thinking_token_budget`` on a server started with ``--reasoning-parser t0s1``);
- ``vllm.general_plugins``: ``register``, which makes ``--reasoning-parser t0s1`` known
  (``reasoning.T0S1ReasoningParser``).

The s1 decisions stay in ``t0s1.forcing_rules``; this package only keeps them in step with vLLM's
batch (``rows``). vLLM is imported only inside this package. docs/vllm.md shows how to serve.
"""

PARSER_NAME = "t0s1"


def register() -> None:
    """vLLM's general plugin hook (run in every vLLM process): register the ``t0s1`` reasoning
    parser, lazily, so that nothing heavy is imported until a server asks for it."""
    from vllm.reasoning import ReasoningParserManager

    ReasoningParserManager.register_lazy_module(PARSER_NAME, "t0s1.vllm_plugin.reasoning", "T0S1ReasoningParser")
