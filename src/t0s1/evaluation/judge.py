"""An optional LLM judge over any OpenAI-compatible chat endpoint (s1 used gpt-4o-mini for MATH).

The rule-based verdict is always recorded; with a judge, ``correct`` is the judge's verdict and
``rule_correct`` keeps the rule's, so the two can be compared.
"""

from __future__ import annotations

import os

from t0s1.errors import UserError

JUDGE_PROMPT = (
    "You are grading the final answer of a solution against a reference answer.\n"
    "Problem:\n{question}\n\nReference answer:\n{gold}\n\nAnswer to grade (the end of the solution):\n{output}\n\n"
    "Is the answer to grade mathematically equivalent to the reference answer? "
    "Ignore formatting differences. Reply with exactly one word: Yes or No."
)


class LLMJudge:
    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None, client=None):
        self.model = model
        if client is None:
            import openai

            client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY")
        self.client = client

    def judge(self, question: str, output: str, gold: str) -> bool:
        """The judge's verdict on ``output`` (only its last 2,000 characters are sent)."""
        prompt = JUDGE_PROMPT.format(question=question, gold=gold, output=output[-2000:])
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=4
            )
        except Exception as error:
            raise UserError(f"The judge endpoint failed for model {self.model!r}: {type(error).__name__}: {error}") from None
        reply = (response.choices[0].message.content or "").strip().lower()
        return reply.startswith("yes")
