"""Settings precedence and errors, instance files, and the `check` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from router.errors import ConfigError
from router.instances import load_instances
from router.settings import load_settings
from router.yamlfile import load_yaml
from tests.conftest import ROOT, write_instance


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith(("WEBHOOK_", "ROUTER_", "SERVER_", "AUTHENTICATION_", "LOG_", "RABBITMQ_", "SQS_")):
            monkeypatch.delenv(key)
    return monkeypatch


def test_precedence_environment_then_dotenv_then_yaml_then_defaults(clean_env, tmp_path: Path):
    yaml_file = tmp_path / "router.yaml"
    yaml_file.write_text("AUTHENTICATION_API_KEY: k\nWEBHOOK_RETRY_MAX_ATTEMPTS: 3\nSERVER_NAME: from-yaml\n")
    env_file = tmp_path / ".env"
    env_file.write_text("WEBHOOK_RETRY_MAX_ATTEMPTS=4\nexport SERVER_URL=http://dotenv:1\n")
    clean_env.setenv("WEBHOOK_RETRY_MAX_ATTEMPTS", "5")

    settings = load_settings(yaml_file, env_file)
    assert settings.webhook_retry_max_attempts == 5
    assert settings.server_url == "http://dotenv:1"
    assert settings.server_name == "from-yaml"
    assert settings.webhook_retry_initial_delay_seconds == 5  # default
    clean_env.delenv("WEBHOOK_RETRY_MAX_ATTEMPTS")
    assert load_settings(yaml_file, env_file).webhook_retry_max_attempts == 4
    assert load_settings(yaml_file, None).webhook_retry_max_attempts == 3
    yaml_file.write_text("AUTHENTICATION_API_KEY: k\n")
    defaults = load_settings(yaml_file, None)
    assert defaults.webhook_retry_max_attempts == 10
    assert defaults.webhook_request_timeout_ms == 30000
    assert defaults.webhook_retry_max_delay_seconds == 300
    assert defaults.webhook_retry_jitter_factor == 0.2
    assert defaults.webhook_retry_use_exponential_backoff is True
    assert defaults.webhook_retry_non_retryable_status_codes == {400, 401, 403, 404, 422}
    assert defaults.server_port == 8080 and defaults.server_name == "evolution"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("false", False),
        ("1", True),
        ("0", False),
        ("yes", True),
        ("no", False),
        ("TRUE", True),
    ],
)
def test_booleans(clean_env, text, expected):
    clean_env.setenv("AUTHENTICATION_API_KEY", "k")
    clean_env.setenv("WEBHOOK_EVENTS_CALL", text)
    assert ("call" in load_settings(None, None).events_enabled("webhook")) is expected


def test_group_update_alias_enables_groups_update(clean_env):
    clean_env.setenv("AUTHENTICATION_API_KEY", "k")
    clean_env.setenv("WEBHOOK_EVENTS_GROUP_UPDATE", "true")
    assert load_settings(None, None).events_enabled("webhook") == {"groups.update"}


def test_errors_name_the_variable_and_where_it_came_from(clean_env, tmp_path: Path):
    yaml_file = tmp_path / "router.yaml"
    yaml_file.write_text("AUTHENTICATION_API_KEY: k\n\nWEBHOOK_RETRY_JITTER_FACTOR: 7\nWEBHOK_TYPO: 1\n")
    env_file = tmp_path / ".env"
    env_file.write_text("# comment\nWEBHOOK_REQUEST_TIMEOUT_MS=soon\n")
    clean_env.setenv("WEBHOOK_EVENTS_MESSAGE_UPSERT", "true")
    clean_env.setenv("WEBHOOK_GLOBAL_ENABLED", "maybe")
    with pytest.raises(ConfigError) as caught:
        load_settings(yaml_file, env_file)
    text = "\n".join(caught.value.problems)
    assert f"{yaml_file}:3: WEBHOOK_RETRY_JITTER_FACTOR: Input should be less than or equal to 1" in text
    assert f"{yaml_file}:4: WEBHOK_TYPO: unknown setting" in text
    assert f"{env_file}:2: WEBHOOK_REQUEST_TIMEOUT_MS: Input should be a valid integer" in text
    assert "WEBHOOK_EVENTS_MESSAGE_UPSERT (environment): unknown event" in text
    assert "WEBHOOK_GLOBAL_ENABLED (environment): Input should be a valid boolean" in text


def test_global_webhook_needs_a_url_and_an_api_key_is_required(clean_env):
    clean_env.setenv("WEBHOOK_GLOBAL_ENABLED", "true")
    with pytest.raises(ConfigError) as caught:
        load_settings(None, None)
    assert "WEBHOOK_GLOBAL_ENABLED is true but WEBHOOK_GLOBAL_URL is not set" in str(caught.value)
    clean_env.setenv("WEBHOOK_GLOBAL_URL", "ftp://x")
    clean_env.setenv("AUTHENTICATION_API_KEY", "k")
    with pytest.raises(
        ConfigError, match=r"WEBHOOK_GLOBAL_URL \(environment\): Value error, must be an http"
    ):
        load_settings(None, None)
    clean_env.delenv("AUTHENTICATION_API_KEY")
    clean_env.setenv("WEBHOOK_GLOBAL_URL", "http://x")
    with pytest.raises(ConfigError, match="AUTHENTICATION_API_KEY is not set"):
        load_settings(None, None)


def test_instance_file_errors_name_file_line_and_field(tmp_path: Path):
    good = write_instance(tmp_path, "good", "webhook: {enabled: true, url: 'http://x/y', events: []}\n")
    bad = write_instance(
        tmp_path,
        "bad",
        "instanceName: bad\n"
        "webhook:\n"
        "  enabled: true\n"
        "  url: not-a-url\n"
        "  byEvent: true\n"
        "  events:\n"
        "    - MESSAGES_UPSERT\n"
        "    - MESSAGES_EXPLODE\n"
        "colour: blue\n",
    )
    broken = write_instance(tmp_path, "broken", "webhook: {enabled: true\n")
    wrong = write_instance(tmp_path, "wrong", "instanceName: other\n")
    loaded = load_instances(tmp_path)
    assert set(loaded.instances) == {"good"}
    assert loaded.instances["good"].sections["webhook"].url == "http://x/y"
    text = "\n".join(loaded.problems)
    assert f"{bad}:4: webhook.url: must be an http:// or https:// URL, got 'not-a-url'" in text
    assert f"{bad}:5: webhook.byEvent: unknown field" in text
    assert f"{bad}:8: webhook.events[1]: unknown event 'MESSAGES_EXPLODE'" in text
    assert f"{bad}:9: colour: unknown field" in text
    assert f"{broken}:2: invalid YAML" in text
    assert f"{wrong}:1: instanceName: is 'other' but the file is named 'wrong.yaml'" in text
    assert str(good) not in text


YAML_DOCUMENTS = [
    "webhook:\n  enabled: true\n  url: https://hooks.example.com/wa?x=1\n"
    "  events: [MESSAGES_UPSERT, QRCODE_UPDATED]\n",
    "webhook: {enabled: yes, url: 'http://a/b', byEvents: off, headers: {X-Id: 42, X-N: 0x1f}}\n",
    "token: null\ninstanceId: ~\nn: 1_000\nf: 1.5e3\ninf: .inf\nwhen: 2024-01-02\ntext: !!str 12\n",
    "events:\n  - MESSAGES_UPSERT\n  -\n  - [1, [2, {a: b}]]\n1: one\ntrue: yes\nnull: empty\n",
    'long: |\n  two\n  lines\nfolded: >\n  one\n  line\nq: "tab\\tand é"\nk: v\nk: later\n',
    "base: &b {enabled: true}\nwebhook:\n  <<: *b\n  url: http://x/y\n",
    "? [a, b]\n: complex key\n",
    "=: equals\nb: {=: 1}\n",
]


@pytest.mark.parametrize("text", YAML_DOCUMENTS)
def test_instance_files_are_read_as_pyyaml_reads_them(tmp_path: Path, text: str):
    """What a file holds, built directly for plain files, is what PyYAML's safe loader builds
    (same values, same types); a file PyYAML refuses is refused with its problem."""
    path = tmp_path / "bot.yaml"
    path.write_text(text)
    try:
        expected = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        with pytest.raises(ConfigError, match="invalid YAML"):
            load_yaml(path)
        assert "unhashable" in str(exc)
        return
    data = load_yaml(path).data
    assert data == expected
    assert repr(data) == repr(expected)  # True is not 1, "12" is not 12


def test_upstream_instance_body_is_accepted(tmp_path: Path):
    write_instance(
        tmp_path,
        "production-bot",
        (ROOT / "examples" / "instances" / "production-bot.yaml").read_text(),
    )
    loaded = load_instances(tmp_path)
    assert loaded.problems == []
    config = loaded.instances["production-bot"]
    assert (
        config.sections["webhook"].by_events
        and config.sections["webhook"].headers["X-Instance"] == "production-bot"
    )
    assert config.section("webhook").subscribed() == {
        "messages.upsert",
        "connection.update",
        "contacts.update",
    }


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WEBHOOK_", "ROUTER_"))}
    return subprocess.run(
        [sys.executable, "-m", "router", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_prints_routes_and_exits_1_naming_every_error(tmp_path: Path):
    (tmp_path / "config" / "instances").mkdir(parents=True)
    (tmp_path / "config" / "router.yaml").write_text(
        "AUTHENTICATION_API_KEY: k\nWEBHOOK_GLOBAL_ENABLED: true\n"
        "WEBHOOK_GLOBAL_URL: http://127.0.0.1:9/g\nWEBHOOK_EVENTS_CALL: true\n"
    )
    write_instance(
        tmp_path / "config" / "instances",
        "shop",
        "webhook: {enabled: true, url: 'http://127.0.0.1:9/s', events: [MESSAGES_UPSERT]}\n",
    )
    ok = run_cli("check", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "global (every instance): webhook -> http://127.0.0.1:9/g: call" in ok.stdout
    assert "shop: webhook -> http://127.0.0.1:9/s: messages.upsert" in ok.stdout
    assert "ordering: webhook chat" in ok.stdout  # one conversation at a time, by default

    write_instance(tmp_path / "config" / "instances", "bad", "webhook:\n  events: [NOPE]\n")
    failed = run_cli("check", cwd=tmp_path)
    assert failed.returncode == 1
    assert "config/instances/bad.yaml:2: webhook.events[0]: unknown event 'NOPE'" in failed.stderr


def test_run_with_bad_settings_exits_1_without_starting(tmp_path: Path):
    result = run_cli("run", cwd=tmp_path, env={"AUTHENTICATION_API_KEY": "k", "SERVER_PORT": "http"})
    assert result.returncode == 1
    assert "SERVER_PORT (environment): Input should be a valid integer" in result.stderr


def test_every_example_file_is_valid(clean_env, tmp_path: Path):
    loaded = load_instances(ROOT / "examples" / "instances")
    assert loaded.problems == []
    examples = {path.stem for path in (ROOT / "examples" / "instances").glob("*.yaml")}
    assert set(loaded.instances) == examples and "production-bot" in examples
    assert loaded.instances["live-session"].integration == "WHATSAPP-WHATSMEOW"
    assert loaded.instances["queue-consumer"].section("sqs").subscribed() == {"messages.upsert"}
    settings = load_settings(None, ROOT / "examples" / "env.example")
    assert settings.rabbitmq_uri == "amqp://guest:guest@localhost:5672/"
    assert settings.sqs_account_id == "123456789012" and settings.sqs_fifo
    assert settings.events_enabled("rabbitmq") == {"messages.upsert", "connection.update"}
    assert settings.events_enabled("pusher") == {"messages.upsert", "connection.update"}
    assert settings.pusher_global_app_id == "1234567" and settings.pusher_host is None
