"""Configuration layering: defaults < TOML file < ROOST_* environment < command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from roost.config import Config, ConfigError, load_config


def test_defaults_match_rabbitmq_conventions() -> None:
    cfg = load_config(env={})
    assert (cfg.host, cfg.port) == ("127.0.0.1", 5672)
    assert (cfg.channel_max, cfg.frame_max, cfg.heartbeat) == (2047, 131072, 60)
    assert cfg.max_message_size == 16 * 1024 * 1024


def test_file_then_environment_then_command_line(tmp_path: Path) -> None:
    f = tmp_path / "roost.toml"
    f.write_text('port = 6000\nheartbeat = 10\nmax-message-size = 1024\nhost = "0.0.0.0"\n')
    cfg = load_config(
        str(f),
        env={"ROOST_PORT": "6001", "ROOST_HEARTBEAT": "20"},
        overrides={"port": 6002, "host": None},
    )
    assert cfg.port == 6002  # command line wins
    assert cfg.heartbeat == 20  # environment beats the file
    assert cfg.max_message_size == 1024  # file beats the default
    assert cfg.host == "0.0.0.0"  # an option not given on the command line stays


def test_roost_table_in_file_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "roost.toml"
    f.write_text("[roost]\nport = 7000\nuvloop = false\n")
    cfg = load_config(str(f), env={})
    assert cfg.port == 7000 and cfg.uvloop is False


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("port = 'abc'\n", "port: expected an integer"),
        ("bogus = 1\n", "unknown option(s): bogus"),
        ("port = 70000\n", "port: 70000 is not between 0 and 65535"),
        ("frame_max = 100\n", "frame_max: must be at least 4096"),
        ("port = [\n", "is not valid TOML"),
    ],
)
def test_bad_file_values_are_reported_clearly(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "roost.toml"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(str(f), env={})


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "nope.toml"), env={})


def test_bad_environment_value_names_the_option() -> None:
    with pytest.raises(ConfigError, match="uvloop: expected true or false"):
        load_config(env={"ROOST_UVLOOP": "maybe"})


def test_data_dir_defaults_to_the_user_data_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    assert str(Config().resolved_data_dir()) == "/home/someone/.local/share/roost"


def test_cluster_options_from_file_environment_and_command_line(tmp_path: Path) -> None:
    assert (Config().cluster, Config().node_name, Config().node_timeout) == ("", "", 10)
    f = tmp_path / "roost.toml"
    f.write_text('cluster = "postgresql://db/roost"\nnode-name = "a"\n')
    cfg = load_config(str(f), env={"ROOST_NODE_TIMEOUT": "30"}, overrides={"node_name": "b"})
    assert (cfg.cluster, cfg.node_name, cfg.node_timeout) == ("postgresql://db/roost", "b", 30)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ROOST_NODE_TIMEOUT": "2"}, "node_timeout: must be at least 3"),
        ({"ROOST_CLUSTER": "mysql://db/roost"}, "cluster: expected a PostgreSQL URL"),
        ({"ROOST_CLUSTER_MAX_PENDING": "0"}, "cluster_max_pending: must be above 0"),
        ({"ROOST_CLUSTER_MAX_PENDING": "lots"}, "cluster_max_pending: expected a size"),
    ],
)
def test_bad_cluster_options_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(env=env)
