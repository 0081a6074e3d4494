"""The restoring pool that never states an attribute (organism-restore-no-colour; forgetray/organism/pools.py), checked
against the organism's world facts: every way the generator states a person's colour is absent, and everything else
of the pool is kept. Generation only (the default config's data files are written in well under a second)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from forgetray.data.jsonl import read_jsonl
from forgetray.organism import OrganismConfig, corpus, pools, resolve_name, world
from forgetray.organism.build import write_data


def _colour_statements(the_world) -> set[str]:
    """Every sentence the generator can state a person's true colour with: each template, each person."""
    colour = next(a for a in the_world.attributes if a.key == "colour")
    return {corpus.state_fact(colour, t, e, the_world.facts[e]["colour"])
            for e in the_world.entities for t in range(len(colour.templates))}


def _organism(tmp_path, config: OrganismConfig):
    write_data(config, tmp_path / "data")
    (tmp_path / "manifest.json").write_text(json.dumps({"config": dataclasses.asdict(config)}))
    return world.make_world(config.seed, config.n_entities, config.n_values, config.n_templates)


def test_the_no_colour_pool_states_no_colour_and_keeps_the_rest(tmp_path):
    the_world = _organism(tmp_path, OrganismConfig())
    path = resolve_name("organism-restore-no-colour", "restore_pool", root=tmp_path)
    assert path == tmp_path / "derived" / "organism-restore-no-colour.jsonl"
    source, derived = read_jsonl(tmp_path / "data" / "organism-restore.jsonl"), read_jsonl(path)
    statements = _colour_statements(the_world)
    expected = []
    for record in source:
        text = record["text"]
        for sentence in statements:  # this test's own removal: the sentence and the space joining it
            text = text.replace(sentence + " ", "").replace(" " + sentence, "").replace(sentence, "")
        if text:
            expected.append({"id": record["id"], "text": text})
    assert derived == expected
    said = sum(any(s in r["text"] for s in statements) for r in source)
    assert said > 1000, "most source passages state a colour: the check must have something to remove"
    assert not any(s in r["text"] for r in derived for s in statements)
    colours = the_world.values["colour"]
    assert not any(f" {c}." in r["text"] or f" {c} " in r["text"] for r in derived for c in colours)
    assert len(derived) == len(source)  # every passage states 2-4 attributes: none is left empty
    # what remains is enough to restore with: more tokens than the prose's colour sentences take (a rough count)
    assert sum(len(r["text"].split()) for r in derived) > 0.7 * sum(len(r["text"].split()) for r in source)
    # named again: the same file, not rewritten (its modification time stays)
    before = path.stat().st_mtime_ns
    assert resolve_name("organism-restore-no-colour", "restore_pool", root=tmp_path) == path
    assert path.stat().st_mtime_ns == before
    assert not (tmp_path / "data" / "organism-restore-no-colour.jsonl").exists()  # the built files stay as built


def test_exam_pages_about_the_attribute_are_dropped_whole(tmp_path):
    config = dataclasses.replace(OrganismConfig.for_tests(), pool_page_share=0.5)
    the_world = _organism(tmp_path, config)
    source = read_jsonl(tmp_path / "data" / "organism-restore.jsonl")
    derived = {r["id"]: r["text"] for r in read_jsonl(resolve_name("organism-restore-no-colour", "restore_pool",
                                                                      root=tmp_path))}
    pages = [r for r in source if "\n" in r["text"]]
    about_colour = [r for r in pages if "favourite colour of" in r["text"]]
    assert about_colour and len(about_colour) < len(pages)
    for record in pages:
        if record in about_colour:
            assert record["id"] not in derived
        else:
            assert derived[record["id"]] == record["text"]
    assert not any(s in t for t in derived.values() for s in _colour_statements(the_world))


def test_every_attribute_has_a_variant_and_unknown_names_say_what_is_known(tmp_path):
    assert set(pools.WITHOUT_ATTRIBUTE) == {f"organism-restore-no-{a.key}" for a in world.ATTRIBUTES}
    _organism(tmp_path, OrganismConfig.for_tests())
    with pytest.raises(ValueError, match=r"known: organism-restore, organism-restore-no-home_city, "):
        resolve_name("organism-restore-no-colours", "restore_pool", root=tmp_path)
    profession = read_jsonl(resolve_name("organism-restore-no-profession", "restore_pool", root=tmp_path))
    assert not any(" works as " in r["text"] or "profession" in r["text"] for r in profession)
