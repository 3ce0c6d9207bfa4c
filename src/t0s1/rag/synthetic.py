"""A synthetic corpus of fictional medical conditions, with queries whose answer is known.

Shaped like t0's NHS condition pages (``condition_title`` / ``condition_content``): each page names
a made-up condition, the part of the body it affects, three symptoms in clinical words, onset,
who gets it and the treatment. Each condition has its own set of symptoms, so a description of
the three symptoms points to one page. Queries come in two styles, as users write them:

- ``named``: asks about the condition by name ("How is Velkorin fever treated?"): a name the
  embedder has never seen, which bm25 matches exactly;
- ``described``: describes the symptoms in lay words that share no word stem with the page
  ("I keep throwing up" for "persistent vomiting"), a paraphrase only a dense model bridges, and
  adds one fact in the page's own words (when it began, or who the patient is), which bm25 matches.

For tests, benchmarks and demos of retrieval; nothing in it is medical advice.
"""

from __future__ import annotations

import itertools
from collections import Counter
import random
from dataclasses import dataclass

from t0s1.errors import UserError
from t0s1.rag.corpus import Document
from t0s1.rag.prompt import INCONCLUSIVE

# (clinical wording on the page, lay wording in a query): no shared word stems.
SYMPTOMS = [
    ("persistent vomiting", "I keep throwing up"),
    ("extreme fatigue", "I am exhausted and worn out all day"),
    ("itching", "I cannot stop scratching"),
    ("high fever", "I am burning up with a temperature"),
    ("breathlessness", "I cannot catch my breath"),
    ("insomnia", "I lie awake every night"),
    ("diarrhoea", "my poo is loose and watery"),
    ("headaches", "my head is pounding"),
    ("vertigo", "the room spins around me"),
    ("nausea", "I feel sick and queasy"),
    ("hair loss", "I am going bald"),
    ("blurred vision", "everything looks fuzzy"),
    ("tinnitus", "there is ringing in my ears"),
    ("swollen ankles", "my feet have puffed up"),
    ("a persistent cough", "I have had a tickly chest for weeks and keep hacking"),
    ("unexplained weight loss", "I am getting thinner without trying"),
    ("palpitations", "my heart is racing"),
    ("numbness in the hands", "I cannot feel my fingers"),
    ("night sweats", "I wake up drenched"),
    ("a red rash", "blotches appeared all over me"),
    ("muscle cramps", "painful spasms grip my calves"),
    ("memory problems", "I cannot remember names or dates"),
    ("a sore throat", "it hurts when I swallow"),
    ("nosebleeds", "my nose keeps bleeding"),
    ("constipation", "I struggle to poo"),
    ("loss of appetite", "I never feel hungry"),
    ("lower back pain", "my spine aches"),
    ("a dry mouth", "I have no spit and my tongue is sticky"),
    ("frequent urination", "I need to pee all the time"),
    ("chills", "I keep shivering"),
    ("easy bruising", "I get black and blue marks"),
    ("joint stiffness", "my knees and elbows are stiff"),
]

BODY_PARTS = ["skin", "lungs", "stomach", "liver", "kidneys", "heart", "brain", "bones", "blood", "eyes",
              "ears", "bowel", "bladder", "nerves", "muscles", "glands"]
KINDS = ["fever", "syndrome", "disease", "disorder", "palsy", "infection"]
ONSETS = ["suddenly, over a few hours", "gradually, over several weeks", "after a viral illness",
          "in the spring", "after long flights", "during pregnancy"]
GROUPS = ["children under 5", "adults over 60", "young adults", "people who work outdoors",
          "people with diabetes", "swimmers", "smokers", "office workers"]
TREATMENTS = ["rest and fluids", "a short course of antibiotics", "antiviral tablets", "a steroid cream",
              "physiotherapy", "an inhaler", "iron supplements", "a change in diet"]
DURATIONS = ["a week", "two weeks", "a month", "three months", "a few days"]
FILLER = [
    "A GP can usually tell what it is from the symptoms, and a blood test may confirm it.",
    "It is not passed from person to person.",
    "Call 111 if the symptoms get worse or do not improve with treatment.",
    "Most people make a full recovery and it rarely comes back.",
    "Keeping a diary of the symptoms can help a doctor find what triggers it.",
    "Pharmacists can give advice about medicines that ease the symptoms.",
]

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]


@dataclass(frozen=True)
class Query:
    """A question with the id of the one document that answers it."""

    text: str
    doc_id: str
    style: str  # "named" or "described"


def invented_word(rng: random.Random, *, syllables: int = 3, endings: str = "nlrsx") -> str:
    """A made-up word: consonant-vowel syllables and an ending letter ("Velkorin")."""
    return ("".join(rng.choice(_SYLLABLES) for _ in range(syllables)) + rng.choice(endings)).capitalize()


def invented_words(count: int, rng: random.Random, *, syllables: int = 3, endings: str = "nlrsx") -> list[str]:
    """``count`` distinct made-up words."""
    words: dict[str, None] = {}
    while len(words) < count:
        words[invented_word(rng, syllables=syllables, endings=endings)] = None
    return list(words)


def condition_names(count: int, rng: random.Random) -> list[str]:
    """Unique made-up condition names: three syllables and a kind ("Velkorin fever")."""
    stems: set[str] = set()
    result = []
    while len(result) < count:
        stem = invented_word(rng)
        name = f"{stem} {rng.choice(KINDS)}"
        if stem not in stems:
            stems.add(stem)
            result.append(name)
    return result


def make_corpus(num_documents: int, *, seed: int = 0, filler_sentences: int = 2) -> tuple[list[Document], list[Query]]:
    """``num_documents`` condition pages and two queries per page (one ``named``, one
    ``described``). ``filler_sentences`` lengthens each page (2 gives about 500 characters)."""
    rng = random.Random(seed)
    triples = list(itertools.combinations(range(len(SYMPTOMS)), 3))
    rng.shuffle(triples)
    # Past len(triples) (4,960) documents the symptom sets repeat, and a description may fit several.
    symptom_sets = itertools.islice(itertools.cycle(triples), num_documents)
    documents, queries = [], []
    for name, symptoms in zip(condition_names(num_documents, rng), symptom_sets):
        doc_id = name  # t0's pages are named by their title
        clinical = [SYMPTOMS[i][0] for i in symptoms]
        lay = [SYMPTOMS[i][1] for i in symptoms]
        onset, group = rng.choice(ONSETS), rng.choice(GROUPS)
        text = (
            f"{name} is a condition of the {rng.choice(BODY_PARTS)}. "
            f"The main symptoms are {clinical[0]}, {clinical[1]} and {clinical[2]}. "
            f"It usually starts {onset} and is most common in {group}. "
            f"It is treated with {rng.choice(TREATMENTS)}, and symptoms usually settle within {rng.choice(DURATIONS)}. "
            + " ".join(rng.sample(FILLER, k=min(filler_sentences, len(FILLER))))
        )
        documents.append(Document(doc_id, name, text))
        queries.append(Query(rng.choice([f"How is {name} treated?", f"Who usually gets {name}?",
                                         f"What are the symptoms of {name}?"]), doc_id, "named"))
        first, second, third = rng.sample(lay, k=3)
        context = rng.choice([f"It began {onset}.", f"I am one of the {group}."])
        queries.append(Query(f"{first}, {second} and {third}. {context} What could be wrong with me?", doc_id, "described"))
    return documents, queries


def to_t0_rows(documents: list[Document]) -> list[dict]:
    """The documents as t0's JSONL rows (``condition_title``, ``condition_content``)."""
    return [{"condition_title": d.title, "condition_content": d.text} for d in documents]


# --------------------------------------------------------------------------------------------
# A knowledge base of fictional people, with questions that need one or two facts


TOWN_ENDINGS = ["ra", "ton", "dale", "mere", "by", "wick"]
QUESTION_KINDS = ("town", "goats", "sum")
"""``town``: where one person lives; ``goats``: how many goats one person keeps; ``sum``: how many
goats two people keep together (two facts, combined by an addition)."""


@dataclass(frozen=True)
class Person:
    """One document of the knowledge base: a made-up person with a town and some goats."""

    name: str
    town: str
    goats: int

    @property
    def text(self) -> str:
        return f"{self.name} lives in {self.town} and keeps {self.goats} goats."


@dataclass(frozen=True)
class KnowledgeQuestion:
    """A question about one or two people, its answer and the ids of the documents it needs."""

    id: str
    question: str
    answer: str
    gold_ids: tuple[str, ...]
    kind: str

    def to_row(self) -> dict:
        """A row of a questions file (``t0s1 rag eval`` / ``rag traces``)."""
        return {"id": self.id, "question": self.question, "answer": self.answer, "gold_ids": list(self.gold_ids), "kind": self.kind}


class KnowledgeBase:
    """Made-up people, one short document each (id = title = the person's name).

    Names come from shared pools of first and last names, so a document that shares a first or a
    last name with the question is a near miss among the retrieved sources. The facts are
    invented, so a model can answer only from the sources.
    """

    def __init__(self, num_people: int, *, seed: int = 0):
        rng = random.Random(seed)
        pool = max(8, int(num_people**0.5) * 3)
        first_names = invented_words(pool, rng, syllables=2, endings="nlrm")
        last_names = invented_words(pool, rng, syllables=2, endings="sk")
        towns = [word + rng.choice(TOWN_ENDINGS) for word in invented_words(max(6, num_people // 12), rng, syllables=1, endings="lnrv")]
        pairs = [(first, last) for first in first_names for last in last_names]
        rng.shuffle(pairs)
        self.people = [
            Person(f"{first} {last}", rng.choice(towns), rng.randint(1, 9))
            for first, last in pairs[:num_people]
        ]
        self.by_id = {person.name: person for person in self.people}

    @property
    def documents(self) -> list[Document]:
        return [Document(person.name, person.name, person.text) for person in self.people]

    def questions(self, people: list[Person], count: int, *, seed: int = 0, prefix: str = "q") -> list[KnowledgeQuestion]:
        """``count`` distinct questions about ``people``: a quarter ``town``, a quarter ``goats``,
        half ``sum`` (two people)."""
        rng = random.Random(seed)
        seen: set[str] = set()
        result: list[KnowledgeQuestion] = []
        kinds = ["town", "goats", "sum", "sum"]
        needed = Counter(kinds[i % len(kinds)] for i in range(count))
        possible = {"town": len(people), "goats": len(people), "sum": len(people) * (len(people) - 1)}
        short = [kind for kind in needed if needed[kind] > possible[kind]]
        if short:
            raise UserError(f"{count} questions need {needed[short[0]]} distinct {short[0]!r} questions, but {len(people)} "
                            f"people give {possible[short[0]]}: ask for at most {4 * len(people)} questions or use more people.")
        while len(result) < count:
            kind = kinds[len(result) % len(kinds)]
            if kind == "sum":
                first, second = rng.sample(people, 2)
                question = f"How many goats do {first.name} and {second.name} keep together?"
                answer, gold = str(first.goats + second.goats), (first.name, second.name)
            else:
                person = rng.choice(people)
                question = f"Where does {person.name} live?" if kind == "town" else f"How many goats does {person.name} keep?"
                answer, gold = (person.town if kind == "town" else str(person.goats)), (person.name,)
            if question in seen:
                continue
            seen.add(question)
            result.append(KnowledgeQuestion(f"{prefix}{len(result)}", question, answer, gold, kind))
        return result

    def reasoning(self, kind: str, gold_ids: list[str], source_ids: list[str]) -> tuple[str, str]:
        """(thinking, answer) of a reader that knows the facts, for a question of ``kind`` about
        the people ``gold_ids`` over the sources ``source_ids`` (numbered from 1): one line per
        fact it uses, citing its source, the sum written out, and the answer with its citations;
        "inconclusive" when a person the question needs has no source."""
        numbers = {doc_id: number for number, doc_id in enumerate(source_ids, start=1)}
        people = [self.by_id[doc_id] for doc_id in gold_ids]
        missing = [person.name for person in people if person.name not in numbers]
        if missing:
            names = " or ".join(missing)
            return f"No source is about {names}.", f"{INCONCLUSIVE.capitalize()}: no source is about {names}."
        lines = [f"[{numbers[person.name]}] {person.text}" for person in people]
        citations = "".join(f"[{numbers[person.name]}]" for person in people)
        if kind == "town":
            answer = people[0].town
        else:
            answer = str(sum(person.goats for person in people))
            if kind == "sum":
                lines.append(f"{' + '.join(str(person.goats) for person in people)} = {answer}.")
        return "\n".join(lines), f"{answer} {citations}"
