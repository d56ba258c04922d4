"""Config: defaults, the documented example, and clear errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapshotter.config import Config, deprecation_warnings, load
from snapshotter.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "config.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_documented_example_equals_the_defaults() -> None:
    assert load(EXAMPLE) == Config()


def test_overrides_from_flags_win(tmp_path: Path) -> None:
    cfg = load(
        write(tmp_path, 'root = "/srv/a"\n[log]\nlevel = "debug"\n'), root=Path("/srv/b"), address=None
    )
    assert cfg.root == Path("/srv/b") and cfg.log.level == "debug"
    assert cfg.address == Config().address


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rot = '/x'\n", "unknown key 'rot'"),
        ("[log]\nlevle = 'info'\n", "unknown key 'log.levle'"),
        ("[log]\nlevel = 'loud'\n", "log.level: 'loud' is not one of"),
        ("[log]\nformat = 3\n", "log.format: expected a string"),
        ("root = 'relative/dir'\n", "root: 'relative/dir' must be an absolute path"),
        ("address = '/" + "a" * 120 + "'\n", "longer than a unix socket path"),
        ("log = 'x'\n", "log: expected a table"),
        ("[grpc]\nsocket_group = 7\n", "grpc.socket_group: expected a string"),
        ("root = \n", "not valid TOML"),
        ("[cache]\nmax_bytes = 0\n", "cache.max_bytes: must be greater than 0"),
        ("[read]\nreadahead_bytes = -1\n", "read.readahead_bytes: must not be negative"),
        ("[fetch]\nplain_http_hosts = 'a:5000'\n", "fetch.plain_http_hosts: expected a list"),
        ("[fetch]\nplain_http_hosts = [5000]\n", "fetch.plain_http_hosts[0]: expected a string"),
        ("[remote]\nenabled = 'yes'\n", "remote.enabled: expected true or false"),
        ("[fetch]\nidle_seconds = true\n", "idle_seconds: expected a number"),
        ('[fetch]\nrest = "sometimes"\n', "fetch.rest: 'sometimes' is not one of eager, idle-only, off"),
        ('[profile]\nshared = "no"\n', "profile.shared: expected true or false"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml")


def test_keys_of_earlier_versions_still_load_and_are_named(tmp_path: Path) -> None:
    """An upgrade must not stop a node's daemon over a config key that moved or went away."""
    path = tmp_path / "old.toml"
    path.write_text(
        "[prefetch]\nbackground = false\nbackground_rate_bytes = 1000\nfetch_whole_below_bytes = 5\n"
        "[read]\nsmall_file_readahead_bytes = 1\n"
    )
    config = load(path)
    assert config.fetch.rest == "off" and config.fetch.rate_bytes == 1000
    said = " | ".join(deprecation_warnings)
    assert "prefetch.background is deprecated; use fetch.rest" in said
    assert "prefetch.fetch_whole_below_bytes is no longer used" in said
    assert "read.small_file_readahead_bytes is no longer used" in said
    both = tmp_path / "both.toml"
    both.write_text('[prefetch]\nbackground = false\n[fetch]\nrest = "idle-only"\n')
    assert load(both).fetch.rest == "idle-only"  # the new key wins
