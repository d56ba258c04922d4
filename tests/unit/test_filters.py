"""containerd's filter syntax, checked against the cases containerd's own filter tests use."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from snapshotter.filters import FilterSyntaxError, parse_all


def adaptor(obj: dict[str, object]):  # type: ignore[no-untyped-def]
    def field(path: Sequence[str]) -> tuple[str, bool]:
        value: object = obj
        for part in path:
            if not isinstance(value, dict) or part not in value:
                return "", False
            value = value[part]
        return (value, True) if isinstance(value, str) else ("", False)

    return field


SNAP = {
    "name": "sha256:abc",
    "parent": "sha256:def",
    "kind": "committed",
    "labels": {"containerd.io/snapshot.ref": "sha256:abc", "foo": "bar", "dotted.key": "x.y"},
}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ([], True),
        ([""], True),
        (["name==sha256:abc"], True),
        (["name==sha256:zzz"], False),
        (["name!=sha256:zzz"], True),
        (["kind==committed,parent==sha256:def"], True),
        (["kind==committed,parent==other"], False),
        (["kind==active", "kind==committed"], True),  # several filters: any
        (['labels."containerd.io/snapshot.ref"==sha256:abc,parent==sha256:def'], True),
        (['labels."containerd.io/snapshot.ref"==sha256:abd'], False),
        (["labels.foo"], True),  # presence
        (["labels.missing"], False),
        (["labels.missing!=x"], True),  # != matches absent fields, as in containerd
        (["labels.foo~=^b.r$"], True),
        (["labels.foo~=/^b/"], True),  # alternative regex quotes
        (["labels.foo~=|z|"], False),
        (['labels."dotted.key"==x.y'], True),  # dots inside a value stay in the value
        (['name=="sha256:abc"'], True),
        (['labels.foo=="b\\x61r"'], True),  # Go escapes in quoted values
        (["  name == sha256:abc "], True),
    ],
)
def test_filter_matches(filters: list[str], expected: bool) -> None:
    assert parse_all(filters).matches(adaptor(SNAP)) is expected


@pytest.mark.parametrize(
    "text",
    [
        "name==",
        "==x",
        "name=x",
        "name===x",
        'labels."unterminated==x',
        "name==a,",
        "labels.foo~=(",
        "name==/x/",
        "labels.foo~=(b)\\1",  # a backreference: Python's re has them, RE2 (and containerd) not
        "labels.foo~=" + "a" * 4097,  # longer than any label
    ],
)
def test_bad_filters_are_invalid_argument(text: str) -> None:
    with pytest.raises(FilterSyntaxError) as info:
        parse_all([text])
    assert repr(text) in str(info.value)


def test_a_pattern_that_backtracks_exponentially_in_python_re_matches_at_once() -> None:
    """``(a+)+$`` against 4,000 a's and a b takes Python's re longer than the universe's age; RE2
    (as containerd's Go regexp) answers in linear time. A List call must never spin on it."""
    snap = {"labels": {"foo": "a" * 4000 + "b"}}
    assert parse_all(["labels.foo~=(a+)+$"]).matches(adaptor(snap)) is False
    assert parse_all(["labels.foo~=(a+)+b$"]).matches(adaptor(snap)) is True
