"""xl.cfg syntax as xl reads it: strings, numbers, lists over lines, ``+=``, comments, ``;``, and
one error naming the line; and the keys ``create`` takes from it."""

from __future__ import annotations

import pytest

from xenemu.cli.xlcfg import ConfigError, domain_spec, parse


def test_values() -> None:
    text = (
        "# comment\n"
        'name = "web" # trailing comment\n'
        "kernel='/boot/x'; memory = 0x10\n"
        "vcpus=2\n"
        "pci = [\n"
        "  '00:03.0',  # first\n"
        '  "00:04.0",\n'
        "]\n"
        "pci += ['00:05.0']\n"
        "empty = []\n"
        'name = "last-wins"\n'
    )
    assert parse(text) == {
        "name": "last-wins",
        "kernel": "/boot/x",
        "memory": 16,
        "vcpus": 2,
        "pci": ["00:03.0", "00:04.0", "00:05.0"],
        "empty": [],
    }


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("name\n", "f:1: expected '='"),
        ("a = 1\nb = \n", "f:2: expected a value"),
        ("a = 1 2\n", "f:1: expected end of line"),
        ("a = [1 2]\n", "f:1: expected ',' or ']'"),
        ("a = [1,\n\n", "f:3: expected a list item"),
        ("a = 'open\n", "f:1: unexpected"),
        ("a = 1\n= 2\n", "f:2: expected a setting name"),
        ("a += 1\n", "f:1: '+=' needs a list"),
        ("a = 12abc\n", "f:1:"),
    ],
)
def test_syntax_errors_name_the_line(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse(text, "f")
    assert str(error.value).startswith(where), str(error.value)
    assert "\n" not in str(error.value)


def test_domain_keys() -> None:
    spec = domain_spec(
        parse(
            'name="g"\ntype="pvh"\nmemory=4\nmaxmem=8\nvcpus=2\ncpus="3"\ntarget="dm-of"\nmax_mappings=100\n'
            'pci=["0000:00:03.0@5,its_devid=64,its_events=2,pits=1,rmrr=0x100:4,rmrr=0x200", "01:1f.7"]\nvif=[]\n'
        )
    )
    assert (spec.name, spec.kind, spec.frames, spec.max_pages, spec.vcpus) == ("g", "hvm", 1024, 2048, 2)
    assert spec.pin == [3, 3] and spec.target == "dm-of" and spec.max_mappings == 100
    first, second = spec.devices
    assert (first.bdf, first.its_devid, first.its_events, first.pits) == ("0000:00:03.0", 64, 2, 1)
    assert first.rmrr == [(0x100, 4), (0x200, 1)]
    assert second.bdf == "0000:01:1f.7" and second.its_devid is None
    assert spec.ignored == ["vif"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("memory = 0", "memory"),
        ('memory = "lots"', "memory"),
        ('type = "arm"', "type"),
        ('pci = "00:03.0"', "pci must be a list"),
        ('pci = ["00:20.0"]', "out of range"),
        ('pci = ["00:03.0,its_devid=x"]', "integer"),
        ('pci = ["00:03.0,its_events=-1"]', "negative"),
        ("target = [1]", "target"),
        ("vcpus = 0", "vcpus"),
    ],
)
def test_bad_keys(text: str, words: str) -> None:
    with pytest.raises(ValueError) as error:
        domain_spec(parse(text))
    assert words in str(error.value)
