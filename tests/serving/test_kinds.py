"""The list-kind registry: one spec per kind, each naming a real output-topic setting."""

from __future__ import annotations

import pytest

from serving.kinds import CONTENT_KINDS, LIST_KINDS, Kind, ListKindSpec, spec_of


def test_every_kind_has_exactly_one_spec_in_enum_order() -> None:
    assert [spec.kind for spec in LIST_KINDS] == list(Kind)
    for kind in Kind:
        assert spec_of(kind).kind is kind
        assert spec_of(kind.value) is spec_of(kind)
    with pytest.raises(ValueError):
        spec_of("bundles")


def test_topic_settings_name_settings_attributes() -> None:
    from streams.settings import Settings

    fields = Settings.model_fields
    names = [spec.topic_setting for spec in LIST_KINDS]
    assert len(set(names)) == len(names)
    for spec in LIST_KINDS:
        assert spec.topic_setting in fields, spec
        assert fields[spec.topic_setting].annotation is str


def test_content_kinds_follow_the_flags() -> None:
    assert tuple(spec.kind for spec in LIST_KINDS if spec.content) == CONTENT_KINDS
    assert CONTENT_KINDS == (Kind.SIMILAR, Kind.SUBSTITUTES, Kind.DUPLICATES)
    assert not spec_of(Kind.COMPLEMENTS).content


def test_specs_are_frozen_and_described() -> None:
    spec = LIST_KINDS[0]
    assert isinstance(spec, ListKindSpec) and all(s.description for s in LIST_KINDS)
    with pytest.raises(AttributeError):
        spec.content = False  # type: ignore[misc]
