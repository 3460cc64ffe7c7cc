"""Prompt templates of the official LoFiT setup (github.com/fc2869/lo-fit, utils/dataloaders.py) and how each
task's answer is appended to its prompt.

Where the completion starts, per task:
- TruthfulQA: prompt `Q: {question} A:`, completion ` {answer}` (with a space). The official MC evaluation
  (TruthfulQA / ITI code) scores `... A: {answer}`; the official DPO data concatenates prompt and answer with no
  space in between. Training here uses the evaluation's form, so DPO optimises exactly the sequences the MC
  metrics score.
- MQuAKE: prompt `Q: Imagine that {edit}. {question} A:`, completion `{new_answer}` with no space, as the
  official code builds its training text (`prompt + answer`).
- CLUTRR: the prompt ends in ` 's` and a newline, the completion is the relation (`father`): the official
  training text is `{prompt}\\n{relation}` and its test prompts end in that newline.
"""
from __future__ import annotations

import ast
from typing import Tuple

TRUTHFULQA_TEMPLATE = "Q: {question} A:"
# The official template, and the one most QA evaluations use (lm-eval's truthfulqa_mc, a newline before "A:").
TRUTHFULQA_TEMPLATES = {"official": TRUTHFULQA_TEMPLATE, "newline": "Q: {question}\nA:"}
MQUAKE_TEMPLATE = "Q: Imagine that {edit}. {question} A:"
CLUTRR_TEMPLATE = (
    'Read the following story about a family. "{story}" Assume the relations described in the story are all '
    "true. Based on relations between the fictional characters in the story (assume the relations are all "
    "true) and your commonsense knowledge about family relationship, how is {second} related to {first}? "
    "Answer: {second} is {first} 's\n"
)


def truthfulqa_prompt(question: str, style: str = "official") -> str:
    if style not in TRUTHFULQA_TEMPLATES:
        raise ValueError(f"unknown TruthfulQA prompt style {style!r}; expected one of {', '.join(TRUTHFULQA_TEMPLATES)}")
    return TRUTHFULQA_TEMPLATES[style].format(question=question.strip())


def truthfulqa_completion(answer: str) -> str:
    return " " + answer.strip()


def mquake_edit(template: str, subject: str, target: str) -> str:
    """The edit sentence: the rewrite's cloze template filled with the subject, then the new target, e.g.
    `"{} was created in the country of"` → `SMAP was created in the country of Trinidad and Tobago`."""
    if "{}" not in template:
        raise ValueError(f"the rewrite prompt {template!r} has no '{{}}' slot for the subject")
    return template.replace("{}", subject) + " " + target


def mquake_prompt(edit: str, question: str) -> str:
    return MQUAKE_TEMPLATE.format(edit=edit, question=question)


def mquake_completion(answer: str) -> str:
    return answer


def parse_clutrr_query(query: str) -> Tuple[str, str]:
    """`"('Ernest', 'Roy')"` → `("Ernest", "Roy")`. (The official code splits the string by hand and leaves a
    leading space on the second name; the names here are stripped.)"""
    try:
        value = ast.literal_eval(query)
    except (ValueError, SyntaxError):
        value = None
    if not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) and v.strip() for v in value)):
        raise ValueError(f"query {query!r} is not a pair of names like \"('Ann', 'Bob')\"")
    return value[0].strip(), value[1].strip()


def clutrr_prompt(story: str, query: str) -> str:
    """The official CLUTRR prompt for the query (first, second): the answer is second's relation to first,
    read as `{second} is {first} 's {relation}`. The story's [name] brackets are removed."""
    first, second = parse_clutrr_query(query)
    story = story.replace("[", "").replace("]", "")
    return CLUTRR_TEMPLATE.format(story=story, first=first, second=second)


def clutrr_completion(relation: str) -> str:
    return relation.strip()
