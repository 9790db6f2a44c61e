"""The client-family table (``synapse_msc3916.clients``): real User-Agents and adversarial ones."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse_msc3916 import clients
from synapse_msc3916.clients import FAMILIES, MAX_LENGTH, RULES, classify

# Real User-Agents, as each client's own source builds them (see the rule's `source`),
# plus variants: an app name that is not the rule's example, older release formats.
REAL = [
    *[(rule.example, rule.family) for rule in RULES],
    # the Android and iOS cases of element-web's tests for src/utils/device/parseUserAgent.ts
    ("Element dbg/1.5.0-dev (Xiaomi Mi 9T; Android 11; RKQ1.200826.002 test-keys; Flavour GooglePlay;"
     " MatrixAndroidSdk2 1.5.2)", "element-android"),
    ("Element/1.0.0 (Linux; U; Android 6.0.1; SM-A510F Build/MMB29; Flavour GPlay; MatrixAndroidSdk2 1.0)",
     "element-android"),
    ("Element/1.8.21 (iPhone XS Max; iOS 15.2; Scale/3.00)", "element-ios"),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko)"
     " ElementNightly/2022091301 Chrome/104.0.5112.102 Electron/20.1.1 Safari/537.36", "element-desktop"),
    ("Element Classic/1.6.56 (samsung SM-S721B; Android 16; Flavour GooglePlay; MatrixAndroidSdk2 1.6.56)",
     "element-android"),
    # element-x-ios UserAgentBuilder, the iOS app running on a Mac
    ("Element X/1.9.0 (Mac; macOS Version 14.5 (Build 23F79); Scale/2.00)", "element-x-ios"),
    ("Element X/1.5.0 (Xiaomi Mi 9T; Android 11; RKQ1.200826.002; Sdk c344b155c)", "element-x-android"),
    ("mautrix-python/0.20.6 aiohttp/3.9.5 Python/3.11.9", "mautrix-python"),
    ("mautrix-go/v0.26.0 go/1.24.1", "mautrix-go"),
    ("gomuks/0.4.0 mautrix-go/v0.22.0 go/1.23.4", "mautrix-go"),
    ("conduwuit/0.4.6", "conduit"),
    ("Tuwunel/1.4.0", "conduit"),
    ("Synapse/1.120.2", "synapse"),
    ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/135.0.0.0 Safari/537.36",
     "browser"),
    ("Wget/1.21.4", "cli"),
    ("python-requests/2.32.3", "cli"),
    ("Python/3.11 aiohttp/3.9.5", "cli"),
    ("Go-http-client/1.1", "cli"),
    ("Go-http-client/2.0", "cli"),
    ("okhttp/4.12.0", "cli"),
    # Dart's own HttpClient default (FluffyChat on iOS and desktop, matrix-dart-sdk bots): was
    # counted as "cli" with curl before issue 19 (failed: assert 'cli' == 'dart').
    ("Dart/3.5 (dart:io)", "dart"),
    ("Dart/2.19 (dart:io)", "dart"),
    ("curl/7.88.1", "cli"),
    ("Python/3.11 aiohttp/3.14.0", "cli"),
    ("Java/17.0.2", "cli"),
    ("SchildiChat/1.11.30-sc.2 (Google Pixel 7; Android 14; UQ1A; Flavour Fdroid; MatrixAndroidSdk2 1.6.10)",
     "schildichat"),
]


@pytest.mark.parametrize("user_agent,family", REAL)
def test_real_user_agents(user_agent: str, family: str) -> None:
    assert classify(user_agent) == family
    assert classify(user_agent.encode("latin-1")) == family


def test_table_is_small_and_closed() -> None:
    assert len(FAMILIES) == len(set(FAMILIES)) <= 25
    assert {"other", "none"} <= set(FAMILIES)
    assert all(rule.source and rule.example for rule in RULES)
    for family in ("element-desktop", "element-android", "element-ios", "element-x-android",
                   "element-x-ios", "fluffychat", "nheko", "schildichat", "matrix-rust-sdk",
                   "mautrix-go", "mautrix-python", "synapse", "dendrite", "conduit", "browser", "dart", "cli"):
        assert family in FAMILIES


def test_adversarial_user_agents() -> None:
    assert classify(None) == "none"
    assert classify("") == "none"
    assert classify(b"") == "none"
    assert classify("   ") == "none"
    # Too long to inspect, whatever it starts with.
    assert classify("curl/8.5.0 " + "x" * 10_000) == "other"
    assert classify(b"Synapse/1.0 " + b"A" * (MAX_LENGTH + 1)) == "other"
    assert classify("Synapse/1.0" + "\x00") == "other"
    assert classify("curl/8.5.0\x1b[31m") == "other"
    assert classify("Element X/1.0 (x; Android 1; y; Sdk z)\x7f") == "other"
    assert classify(bytes(range(128, 256))) == "other"
    assert classify("not a client I know") == "other"
    assert classify("curlish/1.0") == "other"  # a prefix, not the tool


@settings(max_examples=2000)
@given(st.one_of(st.none(), st.text(max_size=2 * MAX_LENGTH), st.binary(max_size=2 * MAX_LENGTH)))
def test_classify_is_total_and_bounded(value: str | bytes | None) -> None:
    assert classify(value) in FAMILIES


def test_families_match_the_readme() -> None:
    """The README's table lists every family and every rule's source."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for family in clients.FAMILIES:
        assert f"`{family}`" in readme, family
