"""``pagedserve serve --http-port``: on at 8000 by default, 0 turns it off."""

from __future__ import annotations

import pytest

from pagedserve.backend.cli import build_parser
from pagedserve.backend.server.cli import server_config_from_args


def _http_port(*flags: str) -> int | None:
    return server_config_from_args(build_parser().parse_args(["serve", *flags])).http_port


def test_the_http_api_is_on_by_default_and_0_turns_it_off() -> None:
    assert _http_port() == 8000
    assert _http_port("--http-port", "9000") == 9000
    assert _http_port("--http-port", "0") is None


@pytest.mark.parametrize("value", ["-1", "65536", "http"])
def test_a_bad_http_port_is_a_usage_error(value: str) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "--http-port", value])
    assert info.value.code == 2
