"""`[do-provisioner] api-url`: the token goes in clear text over http://, so only to this
machine unless `allow-insecure-api-url = true`."""

from __future__ import annotations

from pathlib import Path

import pytest

from doproxy.config import load_settings
from doproxy.errors import ConfigError

pytestmark = pytest.mark.timeout(30)


def settings_with(tmp_path: Path, body: str) -> Path:
    cfg = tmp_path / "doproxy.toml"
    cfg.write_text(f"[do-provisioner]\n{body}\n")
    return cfg


@pytest.mark.parametrize(
    "url",
    [
        "http://api.example.com",
        "http://10.0.0.5:8080",
        "http://[2001:db8::1]/v2",
        "http://localhost.example.com",
        "http://127.0.0.1.nip.io",
    ],
)
def test_plain_http_to_another_host_is_refused_naming_the_key(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(settings_with(tmp_path, f'api-url = "{url}"'))
    (problem,) = e.value.problems
    assert "do-provisioner.api-url" in str(problem)
    assert "allow-insecure-api-url" in str(problem)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.digitalocean.com",
        "https://10.0.0.5:8443",
        "http://127.0.0.1:8080",
        "http://127.1.2.3",
        "http://localhost:9000/",
        "http://[::1]:8080",
    ],
)
def test_https_anywhere_and_http_to_this_machine_are_allowed(tmp_path: Path, url: str) -> None:
    s = load_settings(settings_with(tmp_path, f'api-url = "{url}"'))
    assert s.do_provisioner.api_url == url


def test_allow_insecure_api_url_lets_plain_http_through(tmp_path: Path) -> None:
    body = 'allow-insecure-api-url = true\napi-url = "http://mock.internal:8080"'
    s = load_settings(settings_with(tmp_path, body))
    assert s.do_provisioner.api_url == "http://mock.internal:8080"
    # Wherever the key stands in the section.
    body = 'api-url = "http://mock.internal:8080"\nallow-insecure-api-url = true'
    assert load_settings(settings_with(tmp_path, body)).do_provisioner.allow_insecure_api_url


def test_not_a_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(settings_with(tmp_path, 'api-url = "api.digitalocean.com"'))
    assert "do-provisioner.api-url" in str(e.value.problems[0])
