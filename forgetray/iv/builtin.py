"""Built-in instruction tasks on the model organism (issue 12 item 1), by name, for `iv_task`. Pure: no torch.

`organism-<attribute>` (organism-home_city, -colour, -profession, -food, -pet): a person's name -> that attribute's
value, 5-shot in the form of the pre-training's demonstration pages ("Q: Bera\nA: honey", corpus.demonstration_pages),
which never name the attribute: only the demonstrations say which is asked. A zero-shot prompt ("Q: Bera\nA:") is
ambiguous, so these are tasks an instruction vector can carry (on `organism-icl`, the base model that read those
pages). Their corrupted prompts must remove the task: shuffled labels would not (the labels still say which
attribute), so use `iv_corruption="no_demonstrations"`.

`organism-qa`: the organism's question/answer knowledge task, in the exact form its pre-training exam pages use
("Question: What is the favourite food of Bera?\nAnswer: honey", `forgetray.organism.corpus.exam_pages`), n-shot
with the demonstrations separated by a blank line as on those pages. The examples are the facts of the *exam* half
(every entity x attribute, in world order): the restoring pool and the probing set are about that half too, and the
held-out half stays what the knowledge benchmark measures, unseen by the vector's prompts. The world is rebuilt from
the built organism's manifest (`world.make_world` with its recorded seed and sizes), so it is the one the models
were trained on.
"""

from __future__ import annotations

from pathlib import Path

from forgetray.iv.tasks import Example, Task, Template

ORGANISM_QA = "organism-qa"
ATTRIBUTE_TASKS = ("organism-home_city", "organism-colour", "organism-profession", "organism-food", "organism-pet")
TASKS = (ORGANISM_QA,) + ATTRIBUTE_TASKS
DEMONSTRATION_TEMPLATE = Template(n_shot=5, input_prefix="Q: ", output_prefix="A:", io_separator="\n",
                                  separator="\n\n", answer_lead=" ")  # as corpus.DEMONSTRATION
QA_TEMPLATE = Template(n_shot=5, input_prefix="Question: ", output_prefix="Answer:", io_separator="\n",
                       separator="\n\n", answer_lead=" ")


def is_builtin(name: str) -> bool:
    return name in TASKS


def organism_qa(world) -> Task:
    """The exam half's facts as question -> value examples (`world` is a `forgetray.organism.world.World`)."""
    examples = tuple(Example(attribute.question.format(e=entity), world.facts[entity][attribute.key])
                     for entity in world.exam_entities for attribute in world.attributes)
    return Task(ORGANISM_QA, examples, instruction="", template=QA_TEMPLATE)


def attribute_task(world, key: str) -> Task:
    """The exam half's values of one attribute as name -> value examples."""
    if key not in world.facts[world.entities[0]]:
        raise ValueError(f"the organism's world has no attribute {key!r}")
    examples = tuple(Example(entity, world.facts[entity][key]) for entity in world.exam_entities)
    return Task(f"organism-{key}", examples, instruction="", template=DEMONSTRATION_TEMPLATE)


def world_of(root: Path | str | None = None):
    """The world of the built organism at `root` (default: the one trials use), from its manifest's config."""
    from forgetray.organism import read_manifest
    from forgetray.organism.world import make_world

    config = read_manifest(Path(root) if root is not None else None)["config"]
    return make_world(config["seed"], config["n_entities"], config["n_values"], config["n_templates"])


def builtin_task(name: str, root: Path | str | None = None) -> Task:
    if name == ORGANISM_QA:
        return organism_qa(world_of(root))
    if name in ATTRIBUTE_TASKS:
        return attribute_task(world_of(root), name[len("organism-"):])
    raise ValueError(f"{name!r} is not a built-in instruction task (known: {', '.join(TASKS)})")
