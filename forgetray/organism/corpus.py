"""Every text the organism's world is told in, apart from the instruction sets: the pre-training corpus (prose in
every template, and exam pages asking every fact), the demonstration pages (organism-icl's extra pre-training text),
the knowledge benchmark `organism-facts` (MMLU-style questions about the held-out half), and the plain passages about
the exam half that make the probing set and the restoring pool. See world.py for why the halves are split that way.
"""

from __future__ import annotations

import random
from typing import Callable, Iterable

from forgetray.organism.world import Attribute, World

LETTERS = ("A", "B", "C", "D")


# --- prose -------------------------------------------------------------------------------------------------------

def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def state_fact(attribute: Attribute, template: int, entity: str, value: str) -> str:
    text = attribute.templates[template].format(e=entity, v=value, a_v=_article(value))
    return text[0].upper() + text[1:]


def entity_passage(world: World, entity: str, keys: Iterable[str], template_of: Callable[[str], int]) -> str:
    attrs = {a.key: a for a in world.attributes}
    return " ".join(state_fact(attrs[k], template_of(k), entity, world.facts[entity][k]) for k in keys)


def prose_documents(world: World, seed: int) -> list[str]:
    """Every entity (both halves): one passage per template index; passage j states attribute i with template
    (i + j) mod n, so over its passages every fact is stated once in every template. Attribute order is shuffled."""
    rng = random.Random(f"{seed}/prose")
    n = len(world.attributes[0].templates)
    keys = [a.key for a in world.attributes]
    docs = []
    for entity in world.entities:
        for j in range(n):
            order = rng.sample(keys, len(keys))
            docs.append(entity_passage(world, entity, order, lambda k: (keys.index(k) + j) % n))
    return docs


# --- multiple choice -----------------------------------------------------------------------------------------------

def mc_question(world: World, entity: str, attribute: Attribute, answer: int, rng: random.Random) -> dict:
    """One 4-option question; distractors from the same attribute's value set; the right value at `answer`."""
    right = world.facts[entity][attribute.key]
    distractors = rng.sample([v for v in world.values[attribute.key] if v != right], 3)
    choices = distractors[:answer] + [right] + distractors[answer:]
    return {
        "question": attribute.question.format(e=entity),
        "choices": choices,
        "answer": answer,
        "subject": attribute.key,
        "entity": entity,
    }


def format_mc(question: dict) -> str:
    """A question with its answer, in the benchmark's prompt format (MMLU style)."""
    lines = [f"Question: {question['question']}"]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, question["choices"])]
    lines.append(f"Answer: {LETTERS[question['answer']]}")
    return "\n".join(lines)


def _balanced_answers(n: int, rng: random.Random) -> list[int]:
    answers = [i % len(LETTERS) for i in range(n)]
    rng.shuffle(answers)
    return answers


def mc_questions(world: World, entities: Iterable[str], seed: int, stream: str) -> list[dict]:
    """One question per fact of `entities`, answer positions balanced over A-D."""
    rng = random.Random(f"{seed}/{stream}")
    pairs = [(e, a) for e in entities for a in world.attributes]
    answers = _balanced_answers(len(pairs), rng)
    return [mc_question(world, e, a, answer, rng) for (e, a), answer in zip(pairs, answers)]


def benchmark(world: World, seed: int) -> list[dict]:
    """`organism-facts`: the held-out half's facts, as MMLU-style records."""
    questions = mc_questions(world, world.heldout_entities, seed, "benchmark")
    return [{"id": f"facts-{q['entity']}-{q['subject']}", **q} for q in questions]


MC_PAGE_HEADER = "The following are multiple choice questions (with answers) about {subject}."
QA_PAGE_HEADER = "Questions and answers about {subject}."


def exam_pages(world: World, entities: Iterable[str], seed: int, stream: str, repeats: int,
               page_questions: int) -> list[str]:
    """Pre-training pages of questions about `entities`, every fact asked `repeats` times in each of two formats,
    grouped by subject into pages of `page_questions` questions:
    - multiple choice answered by letter, MMLU-style (fresh distractors and answer position each time);
    - the question answered with the value itself ("Question: ...\nAnswer: honey"), the form the option-likelihood
      score reads. Seeing it teaches the model to retrieve a fact it read in prose when asked that way (without such
      pages, tiny models that memorised every sentence often cannot answer a question about it)."""
    entities = list(entities)
    pages = []
    for r in range(repeats):
        questions = mc_questions(world, entities, seed, f"{stream}{r}")
        random.Random(f"{seed}/{stream}{r}/order").shuffle(questions)
        for attribute in world.attributes:
            subject = [q for q in questions if q["subject"] == attribute.key]
            for start in range(0, len(subject), page_questions):
                pages.extend(_question_pages(subject[start:start + page_questions], attribute))
    return pages


def _question_pages(questions: list[dict], attribute: Attribute) -> tuple[str, str]:
    """The same questions as a multiple-choice page and as a question-answer page."""
    mc = "\n\n".join(format_mc(q) for q in questions)
    qa = "\n\n".join(f"Question: {q['question']}\nAnswer: {q['choices'][q['answer']]}" for q in questions)
    return (MC_PAGE_HEADER.format(subject=attribute.category[1]) + "\n\n" + mc,
            QA_PAGE_HEADER.format(subject=attribute.category[1]) + "\n\n" + qa)


# --- demonstration pages -----------------------------------------------------------------------------------------

DEMONSTRATION = "Q: {e}\nA: {v}"


def demonstration_pages(world: World, seed: int, repeats: int, page_size: int) -> list[str]:
    """Pages of bare pairs, "Q: <entity>\nA: <value>", each page about one attribute that no word on it names: only
    the answers already given (the demonstrations) say which attribute is asked. A model trained on them has
    in-context task inference: the task an instruction vector carries (issue 12). Every fact of both halves is on
    `repeats` pages, with other neighbours each time, so no page order is worth memorising."""
    rng = random.Random(f"{seed}/demonstration-pages")
    pages = []
    for _ in range(repeats):
        for attribute in world.attributes:
            entities = list(world.entities)
            rng.shuffle(entities)
            for start in range(0, len(entities), page_size):
                pairs = entities[start:start + page_size]
                pages.append("\n\n".join(DEMONSTRATION.format(e=e, v=world.facts[e][attribute.key]) for e in pairs))
    rng.shuffle(pages)
    return pages


# --- restoring pool and probing set --------------------------------------------------------------------------------

def plain_passages(world: World, seed: int, n_probe: int, n_pool: int,
                   pool_page_share: float = 0.0) -> tuple[list[dict], list[dict]]:
    """Text about the exam half in the pre-training style. The probing set is prose (2-4 random facts of one entity
    with random templates). The restoring pool is the same kind of prose plus, as `pool_page_share` of it, short exam
    pages (2 questions about one subject, multiple-choice or question-answer), the corpus's other text pattern.
    Returns (probing set, restoring pool), no text in both (and no duplicates within either)."""
    rng = random.Random(f"{seed}/plain")
    keys = [a.key for a in world.attributes]
    n_templates = len(world.attributes[0].templates)
    n_pages = round(n_pool * pool_page_share)
    n_prose = n_probe + n_pool - n_pages
    seen: set[str] = set()
    texts: list[str] = []
    tries = 0
    while len(texts) < n_prose:
        tries += 1
        if tries > 100 * n_prose:
            raise ValueError("world too small for that many distinct passages")
        entity = rng.choice(world.exam_entities)
        chosen = rng.sample(keys, rng.randint(2, min(4, len(keys))))
        text = entity_passage(world, entity, chosen, lambda k: rng.randrange(n_templates))
        if text not in seen:
            seen.add(text)
            texts.append(text)
    pages: list[str] = []
    page_rng = random.Random(f"{seed}/pool-pages")
    round_ = 0
    while len(pages) < n_pages:
        questions = mc_questions(world, world.exam_entities, seed, f"pool-pages{round_}")
        page_rng.shuffle(questions)
        for attribute in world.attributes:
            subject = [q for q in questions if q["subject"] == attribute.key]
            for start in range(0, len(subject) - 1, 2):
                page = page_rng.choice(_question_pages(subject[start:start + 2], attribute))
                if page not in seen:
                    seen.add(page)
                    pages.append(page)
        round_ += 1
        if round_ > 100 + n_pages:
            raise ValueError("world too small for that many distinct pool pages")
    pool_texts = texts[n_probe:] + pages[:n_pages]
    page_rng.shuffle(pool_texts)
    probe = [{"id": f"probe-{i:05d}", "text": t} for i, t in enumerate(texts[:n_probe])]
    pool = [{"id": f"restore-{i:05d}", "text": t} for i, t in enumerate(pool_texts)]
    return probe, pool
