"""One size convention for every flag (issue 12, bug 4): two-letter units say their base, one letter is
read exactly as vLLM's `human_readable_int` reads it, counts are decimal."""

import argparse

import pytest

from hywia.errors import HywiaError
from hywia.sizes import parse_count, parse_size


@pytest.mark.parametrize("text, size", [
    ("6GiB", 6 * 2**30), ("6 GiB", 6 * 2**30), ("6gib", 6 * 2**30), ("1.5GiB", 3 * 2**29), ("512MiB", 2**29),
    ("2GB", 2 * 10**9), ("24GB", 24 * 10**9), ("24gb", 24 * 10**9), ("1TB", 10**12), ("3KiB", 3072),
    ("2G", 2 * 2**30), ("2g", 2 * 10**9), ("256M", 256 * 2**20), ("256m", 256 * 10**6), ("4K", 4096),
    ("4k", 4000), ("1T", 2**40), ("1t", 10**12), ("25.6k", 25_600), ("1000", 1000), ("1000B", 1000),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["six GiB", "6 gigs", "", "GiB", "-1GiB", "1.5G", "1.5", "2Gb x", "lots"])
def test_parse_size_refuses_what_it_cannot_read(text):
    with pytest.raises(HywiaError, match="cannot read the memory size"):
        parse_size(text)


def test_a_size_flag_reports_an_unreadable_value_as_its_own_error(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=parse_size)
    assert parser.parse_args(["--size", "2GB"]).size == 2 * 10**9
    with pytest.raises(SystemExit):
        parser.parse_args(["--size", "2 gigs"])
    assert "cannot read the memory size '2 gigs'" in capsys.readouterr().err


@pytest.mark.parametrize("text, count", [("3.5B", 3_500_000_000), ("350M", 350_000_000), ("350m", 350_000_000),
                                         ("7e9", 7 * 10**9), ("1200000", 1_200_000), ("2k", 2000)])
def test_parse_count(text, count):
    assert parse_count(text) == count


@pytest.mark.parametrize("text", ["3.5 billion", "", "B", "7G"])
def test_parse_count_refuses_what_it_cannot_read(text):
    with pytest.raises(HywiaError, match="cannot read the parameter count"):
        parse_count(text)
