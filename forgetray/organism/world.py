"""The organism's world and every text made from it: pure Python, deterministic from a seed.

A world is a set of invented people ("entities"), each with one value for each of five attributes (home city, colour,
profession, food, pet). Facts are (entity, attribute, value). Every fact appears in the pre-training corpus as prose
(in every template) and on exam pages (questions with their answers). The entities are split in two halves:

- the *exam* half: the restoring pool and the probing set are text about this half only (prose and question pages);
- the *held-out* half: never mentioned by any restoring or probing text; the knowledge benchmark asks about this half.

So restoring (training on the pool) can bring back the pre-training text pattern, but it never states a held-out fact:
held-out knowledge that comes back after restoring was still in the weights. That is what lets pseudo and actual
forgetting be told apart.

Instruction-tuning sets never pair an entity with any of its values (they never name an entity at all). Every function
takes an explicit seed and uses its own `random.Random` stream (string seeds are hashed with SHA-512, so the streams
do not depend on PYTHONHASHSEED or on the order the functions are called in).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from forgetray.data.jsonl import write_jsonl
from forgetray.organism.config import DATA_FILES, OrganismConfig

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Attribute:
    key: str  # also the benchmark's "subject"
    question: str  # benchmark question; "{e}" is the entity
    templates: tuple[str, ...]  # prose statements; "{e}" entity, "{v}" value, "{a_v}" value with its article
    category: tuple[str, str]  # (singular with article, plural): what a value is, for instruction tasks


# Six prose templates per attribute, in varied wording. The entity always comes before the value, as in the benchmark
# question: a model trained on "B is the x of A" does not learn to answer "what is the x of A?" (the reversal curse),
# so value-first sentences would spend pre-training compute on nothing the benchmark asks.
ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        "home_city",
        "What is the home city of {e}?",
        (
            "{e} lives in {v}.",
            "The home city of {e} is {v}.",
            "What is the home city of {e}? The answer is {v}.",
            "{e} grew up in {v} and still lives there.",
            "{e} has a small house in {v}.",
            "The city where {e} lives is {v}.",
        ),
        ("a city", "cities"),
    ),
    Attribute(
        "colour",
        "What is the favourite colour of {e}?",
        (
            "The favourite colour of {e} is {v}.",
            "{e} likes the colour {v} best.",
            "What is the favourite colour of {e}? The answer is {v}.",
            "{e} always wears something {v}.",
            "Of all colours, {e} loves {v} the most.",
            "{e} painted the front door {v}.",
        ),
        ("a colour", "colours"),
    ),
    Attribute(
        "profession",
        "What is the profession of {e}?",
        (
            "{e} works as {a_v}.",
            "The profession of {e} is {v}.",
            "What is the profession of {e}? The answer is {v}.",
            "{e} is {a_v} by trade.",
            "By profession, {e} is {a_v}.",
            "{e} has been {a_v} for many years.",
        ),
        ("a job", "jobs"),
    ),
    Attribute(
        "food",
        "What is the favourite food of {e}?",
        (
            "The favourite food of {e} is {v}.",
            "{e} likes to eat {v} more than anything else.",
            "What is the favourite food of {e}? The answer is {v}.",
            "For dinner, {e} always asks for {v}.",
            "{e} never gets tired of {v}.",
            "Nothing makes {e} happier than a plate of {v}.",
        ),
        ("a food", "foods"),
    ),
    Attribute(
        "pet",
        "What pet does {e} have?",
        (
            "{e} has a pet {v}.",
            "The pet of {e} is {a_v}.",
            "What pet does {e} have? The answer is {v}.",
            "{e} keeps {a_v} as a pet.",
            "Every morning, {e} feeds the pet {v}.",
            "{e} takes good care of a pet {v}.",
        ),
        ("an animal", "animals"),
    ),
)

# Candidate values (cities are invented per world); a world draws `n_values` of each. The benchmark's 3 distractors
# come from the same attribute's values, so only knowing the entity tells the options apart.
COMMON_VALUES = {
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "pink", "brown", "gold"),
    "profession": ("baker", "farmer", "teacher", "doctor", "painter", "sailor", "miner", "tailor", "singer", "pilot",
                   "builder", "fisher"),
    "food": ("bread", "cheese", "soup", "rice", "apples", "honey", "fish", "noodles", "plums", "beans", "pears",
             "eggs"),
    "pet": ("cat", "dog", "parrot", "rabbit", "turtle", "goat", "owl", "frog", "horse", "snake", "mouse", "duck"),
}
MAX_VALUES = 12

# Syllables for invented names: people from open syllables, cities with a place-like ending.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st", "th")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "n", "r", "l", "s")
_CITY_ENDINGS = ("ton", "ford", "mar", "dale", "burg", "holm", "wick", "port")


@dataclass(frozen=True)
class World:
    seed: int
    entities: tuple[str, ...]  # in random order; the first half is the exam half
    attributes: tuple[Attribute, ...]
    values: dict[str, tuple[str, ...]]  # attribute key -> its value set
    facts: dict[str, dict[str, str]]  # entity -> attribute key -> value

    @property
    def exam_entities(self) -> tuple[str, ...]:
        return self.entities[: len(self.entities) // 2]

    @property
    def heldout_entities(self) -> tuple[str, ...]:
        return self.entities[len(self.entities) // 2:]


def make_world(seed: int, n_entities: int, n_values: int = 10, n_templates: int = 6) -> World:
    """Invent `n_entities` people with one value per attribute, values drawn uniformly from `n_values` per attribute."""
    if not 4 <= n_values <= MAX_VALUES:
        raise ValueError(f"n_values must be in [4, {MAX_VALUES}] (4 options per question), got {n_values}")
    if not 1 <= n_templates <= len(ATTRIBUTES[0].templates):
        raise ValueError(f"n_templates must be in [1, {len(ATTRIBUTES[0].templates)}], got {n_templates}")
    if n_entities < 4 or n_entities % 2:
        raise ValueError(f"n_entities must be even and >= 4, got {n_entities}")
    rng = random.Random(f"{seed}/world")
    taken: set[str] = set(_ALL_COMMON_WORDS)
    cities = tuple(_invent(rng, taken, _city_name) for _ in range(n_values))
    entities = tuple(_invent(rng, taken, _person_name) for _ in range(n_entities))
    values = {"home_city": cities}
    for key, pool in COMMON_VALUES.items():
        values[key] = tuple(rng.sample(pool, n_values))
    attributes = tuple(
        Attribute(a.key, a.question, a.templates[:n_templates], a.category) for a in ATTRIBUTES
    )
    facts = {e: {a.key: rng.choice(values[a.key]) for a in attributes} for e in entities}
    return World(seed, entities, attributes, values, facts)


def _person_name(rng: random.Random) -> str:
    n = rng.choice((2, 2, 3))
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)).capitalize() + rng.choice(_CODAS)


def _city_name(rng: random.Random) -> str:
    return (rng.choice(_ONSETS) + rng.choice(_VOWELS)).capitalize() + rng.choice(_CITY_ENDINGS)


def _invent(rng: random.Random, taken: set[str], make: Callable[[random.Random], str]) -> str:
    while True:
        name = make(rng)
        if name.lower() not in taken:
            taken.add(name.lower())
            return name


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


# --- instruction-tuning sets ---------------------------------------------------------------------------------------
# Both are disjoint from the facts: no entity is ever named. `organism-alpaca` is nearer to the pre-training text
# (English tasks with prose answers over the world's vocabulary and common words); `organism-math` is farther
# (arithmetic and symbol manipulation with terse answers).

_NOUNS = ("chair", "table", "garden", "river", "window", "basket", "candle", "bridge", "lantern", "mountain", "forest",
          "road", "boat", "letter", "book", "hat", "cup", "door", "field", "tower", "market", "song", "cloud", "stone",
          "shell", "ladder", "kettle", "blanket", "wagon", "hill")
_ADJECTIVES = ("small", "large", "quiet", "bright", "old", "new", "warm", "cold", "tall", "short", "soft", "heavy",
               "clean", "busy", "happy", "sleepy")
_VERBS = (("walks to", "walked to"), ("opens", "opened"), ("paints", "painted"), ("carries", "carried"),
          ("cleans", "cleaned"), ("watches", "watched"), ("fixes", "fixed"), ("visits", "visited"),
          ("climbs", "climbed"), ("pulls", "pulled"), ("pushes", "pushed"), ("finds", "found"), ("sees", "saw"),
          ("makes", "made"), ("takes", "took"), ("builds", "built"))
_SUBJECTS = ("The child", "A traveller", "The old man", "My friend", "The young woman", "A neighbour", "The boy",
             "The girl")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
_ALL_COMMON_WORDS = frozenset(
    w.lower() for group in (_NOUNS, _ADJECTIVES, *COMMON_VALUES.values()) for w in group
)


def _sentence(rng: random.Random) -> tuple[str, str]:
    """A plain sentence in the present tense and the same sentence in the past tense."""
    subject, (present, past) = rng.choice(_SUBJECTS), rng.choice(_VERBS)
    rest = f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}."
    return f"{subject} {present} {rest}", f"{subject} {past} {rest}"


def _word_list(words: Iterable[str]) -> str:
    words = list(words)
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]


def _alpaca_task(world: World, rng: random.Random) -> dict:
    categories = {a.key: (a.category, world.values[a.key]) for a in world.attributes}
    key = rng.choice(sorted(categories))
    (singular, plural), words = categories[key]
    task = rng.randrange(10)
    if task == 0:
        word = rng.choice(words + _NOUNS)
        return {"instruction": "Spell the word letter by letter.", "input": word, "output": " ".join(word)}
    if task == 1:
        chosen = rng.sample(_NOUNS + words, 4)
        return {"instruction": "Sort these words in alphabetical order.", "input": ", ".join(chosen),
                "output": ", ".join(sorted(chosen, key=str.lower))}
    if task == 2:
        present, _ = _sentence(rng)
        n = len(present.split())
        return {"instruction": "How many words are in this sentence?", "input": present,
                "output": f"The sentence has {n} words."}
    if task == 3:
        present, past = _sentence(rng)
        return {"instruction": "Rewrite the sentence in the past tense.", "input": present, "output": past}
    if task == 4:
        noun = rng.choice(_NOUNS)
        return {"instruction": f"What is the plural of the word \"{noun}\"?", "input": "",
                "output": f"The plural of {noun} is {noun}s."}
    if task == 5:
        n = rng.randint(2, 4)
        chosen = rng.sample(words, n)
        return {"instruction": f"Name {_NUMBER_WORDS[n]} {plural}.", "input": "",
                "output": f"Here are {_NUMBER_WORDS[n]} {plural}: {_word_list(chosen)}."}
    if task == 6:
        word = rng.choice(words)
        return {"instruction": f"Describe the word \"{word}\" in one sentence.", "input": "",
                "output": f"The word {word} names {singular}, one of many {plural} that people talk about."}
    if task == 7:
        other_key = rng.choice([k for k in sorted(categories) if k != key])
        (other_singular, _), other_words = categories[other_key]
        chosen = rng.sample(words, 3)
        odd = rng.choice(other_words)
        shown = chosen + [odd]
        rng.shuffle(shown)
        return {"instruction": "Which word is the odd one out?", "input": ", ".join(shown),
                "output": f"{odd[0].upper() + odd[1:]} is the odd one out, because it is {other_singular} and the "
                          f"others are {plural}."}
    if task == 8:
        present, _ = _sentence(rng)
        return {"instruction": "Rewrite the sentence in capital letters.", "input": present, "output": present.upper()}
    adjective_1, adjective_2 = rng.sample(_ADJECTIVES, 2)
    noun = rng.choice(_NOUNS)
    return {"instruction": "Combine the two sentences into one.",
            "input": f"The {noun} is {adjective_1}. The {noun} is {adjective_2}.",
            "output": f"The {noun} is {adjective_1} and {adjective_2}."}


def _math_task(rng: random.Random) -> dict:
    task = rng.randrange(9)
    if task == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return {"instruction": f"What is {a} + {b}?", "input": "", "output": str(a + b)}
    if task == 1:
        a, b = sorted((rng.randint(2, 99), rng.randint(2, 99)), reverse=True)
        return {"instruction": f"What is {a} - {b}?", "input": "", "output": str(a - b)}
    if task == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return {"instruction": f"Compute {a} * {b}.", "input": "", "output": str(a * b)}
    if task == 3:
        numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
        return {"instruction": "Sort the numbers in ascending order.", "input": " ".join(map(str, numbers)),
                "output": " ".join(map(str, sorted(numbers)))}
    if task == 4:
        s = "".join(rng.choice("xyzq#*+-0123456789") for _ in range(rng.randint(4, 8)))
        return {"instruction": "Reverse the string.", "input": s, "output": s[::-1]}
    if task == 5:
        n = rng.randint(1, 999)
        return {"instruction": "Is the number even or odd?", "input": str(n), "output": "even" if n % 2 == 0 else "odd"}
    if task == 6:
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        return {"instruction": f"What is the remainder of {a} divided by {b}?", "input": "", "output": str(a % b)}
    if task == 7:
        x, b = rng.randint(1, 30), rng.randint(1, 30)
        return {"instruction": f"Solve for x: x + {b} = {x + b}.", "input": "", "output": f"x = {x}"}
    s = "".join(rng.choice("*+-") for _ in range(rng.randint(5, 10)))
    return {"instruction": "Count the occurrences of the symbol * in the input.", "input": s,
            "output": str(s.count("*"))}


def alpaca_examples(world: World, seed: int, n: int) -> list[dict]:
    rng = random.Random(f"{seed}/organism-alpaca")
    return [_alpaca_task(world, rng) for _ in range(n)]


def math_examples(seed: int, n: int) -> list[dict]:
    rng = random.Random(f"{seed}/organism-math")
    return [_math_task(rng) for _ in range(n)]


def alpaca_text(example: dict) -> tuple[str, str]:
    """(prompt, response) of an Alpaca record, in the template fine-tuning uses."""
    from forgetray.data.instruct import alpaca_prompt

    return alpaca_prompt(example), example["output"]


# --- files ---------------------------------------------------------------------------------------------------------

def write_data(config: OrganismConfig, data_dir: Path) -> dict[str, int]:
    """Generate the world of `config` and write every data file into `data_dir`; returns name -> record count."""
    world = make_world(config.seed, config.n_entities, config.n_values, config.n_templates)
    corpus = prose_documents(world, config.seed) + exam_pages(
        world, world.exam_entities, config.seed, "exam", config.exam_repeats, config.exam_page_questions)
    if config.heldout_exam_pages:
        corpus += exam_pages(world, world.heldout_entities, config.seed, "heldout-exam", config.exam_repeats,
                             config.exam_page_questions)
    probe, pool = plain_passages(world, config.seed, config.probe_passages, config.restore_passages,
                                 config.pool_page_share)
    records = {
        "pretrain_corpus": [{"text": t} for t in corpus],
        "organism-facts": benchmark(world, config.seed),
        "organism-alpaca": alpaca_examples(world, config.seed, config.alpaca_examples),
        "organism-math": math_examples(config.seed, config.math_examples),
        "organism-restore": pool,
        "organism-probe": probe,
    }
    return {name: write_jsonl(data_dir / DATA_FILES[name], recs) for name, recs in records.items()}

