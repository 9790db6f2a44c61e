"""Which client family sent a request, from its ``User-Agent``: one declarative table.

The freeze's rollout question is *who* still uses the unauthenticated media endpoints,
so ``synapse_msc3916_unauthenticated_requests_total`` carries a ``client`` label. A raw
User-Agent would make that label unbounded; instead each request lands in one of a small,
fixed set of families (``FAMILIES``), whatever the header holds: no header is ``none``,
anything unrecognised, too long or containing control characters is ``other``.

The rules are tried in order, first match wins, each on at most ``MAX_LENGTH`` characters
of the header. Each rule names where its client builds its User-Agent, so a rule can be
checked against the client's own code when that changes. The same table is in the README
("Who still uses the legacy endpoints"); keep the two together.

Pure logic, no Synapse import: unit-tested and fuzzed on its own.
"""

from __future__ import annotations

import functools
import re

import attr

# Longer headers are not inspected at all: real clients send a few hundred bytes at most.
MAX_LENGTH = 512

NONE = "none"
OTHER = "other"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Rule:
    family: str
    # Searched (case-insensitive) in the first MAX_LENGTH characters of the header.
    pattern: re.Pattern[str]
    # One real User-Agent of that client, as its source builds it (also a unit test case).
    example: str
    # Where the client builds its User-Agent.
    source: str


def _rule(family: str, pattern: str, example: str, source: str) -> Rule:
    return Rule(family, re.compile(pattern, re.IGNORECASE), example, source)


RULES: tuple[Rule, ...] = (
    # SchildiChat forks Element (Android, Desktop) and Element X (Next) and keeps their
    # User-Agent builders with its own application name, so it must come before them.
    # SchildiChat/schildichat-android-next libraries/network/src/main/kotlin/io/element/
    # android/libraries/network/useragent/DefaultUserAgentProvider.kt: Element X's builder,
    # "$appName/..." with BuildMeta.applicationName (SchildiChat's); SchildiChat/schildichat-desktop
    # is Element Desktop's Electron UA with its own app name.
    _rule(
        "schildichat",
        r"schildi",
        "SchildiChat Next/0.10.3 (Google Pixel 8; Android 15; AP4A.250105.002; Sdk 3a2e1c0)",
        "SchildiChat/schildichat-android-next .../useragent/DefaultUserAgentProvider.kt;"
        " SchildiChat/schildichat-desktop",
    ),
    # element-hq/element-x-android libraries/network/src/main/kotlin/io/element/android/
    # libraries/network/useragent/DefaultUserAgentProvider.kt:
    # "$appName/$version ($manufacturer $model; Android $release; $buildId; Sdk $sdkSha)"
    _rule(
        "element-x-android",
        r"^element x[^/]*/[^(]*\(.*; android ",
        "Element X/25.04.1 (Xiaomi Mi 9T; Android 11; RKQ1.200826.002; Sdk c344b155c)",
        "element-hq/element-x-android libraries/network/.../useragent/DefaultUserAgentProvider.kt",
    ),
    # element-hq/element-x-ios ElementX/Sources/Other/UserAgentBuilder.swift:
    # "%@/%@ (%@; iOS %@; Scale/%0.2f)" with the bundle display name "Element X"
    # (or "(Mac; macOS ...)" when the iOS app runs on a Mac).
    _rule(
        "element-x-ios",
        r"^element x[^/]*/[^(]*\((?:.*; ios |mac; macos )",
        "Element X/25.04.2 (iPhone 15 Pro; iOS 18.4.1; Scale/3.00)",
        "element-hq/element-x-ios ElementX/Sources/Other/UserAgentBuilder.swift",
    ),
    # element-hq/element-android matrix-sdk-android/src/main/java/org/matrix/android/sdk/
    # internal/network/ComputeUserAgentUseCase.kt: "$appName/$appVersion ($manufacturer $model;
    # Android $version; $buildId; Flavour $flavour; MatrixAndroidSdk2 $sdkVersion)", e.g.
    # "Element/1.5.0 (Samsung SM-G960F; Android 6.0.1; ...; Flavour FDroid; MatrixAndroidSdk2 1.5.2)"
    # (the app is now named "Element Classic");
    # the same strings are the test cases of element-hq/element-web
    # test/unit-tests/utils/device/parseUserAgent-test.ts, whose parser keys on "; MatrixAndroidSdk2".
    _rule(
        "element-android",
        r"; matrixandroidsdk2 ",
        "Element/1.6.10 (Google Pixel 6 Pro; Android 14; AP1A.240305.019; Flavour GooglePlay;"
        " MatrixAndroidSdk2 1.6.10)",
        "element-hq/element-android .../internal/network/ComputeUserAgentUseCase.kt;"
        " element-web src/utils/device/parseUserAgent.ts",
    ),
    # element-hq/element-ios through matrix-org/matrix-ios-sdk MatrixSDK/Utils/MXHTTPClient.m,
    # an AFHTTPSessionManager whose serializer sends AFNetworking's default User-Agent
    # "%@/%@ (%@; iOS %@; Scale/%0.2f)" (bundle name, version, device model, iOS version):
    # "Element/1.8.21 (iPhone XS Max; iOS 15.2; Scale/3.00)" (Riot/ before the rename);
    # element-web's parseUserAgent.ts recognises it by "; iOS ".
    _rule(
        "element-ios",
        r"^(?:element|riot)[^/ ]*/[^(]*\(.*; ios ",
        "Element/1.11.8 (iPhone 14 Pro Max; iOS 17.4.1; Scale/3.00)",
        "matrix-org/matrix-ios-sdk MatrixSDK/Utils/MXHTTPClient.m (AFNetworking default UA);"
        " element-web parseUserAgent.ts",
    ),
    # element-hq/element-desktop: Electron's Chrome UA with the app name and " Electron/"
    # (element-web parseUserAgent.ts: DESKTOP_KEYWORD = " Electron/"). Element Web in a
    # browser sends the browser's own User-Agent and is counted as "browser".
    _rule(
        "element-desktop",
        r"\b(?:element|riot)[a-z]*/\S+ .*\belectron/",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Element/1.11.100"
        " Chrome/134.0.6998.205 Electron/35.2.1 Safari/537.36",
        "element-hq/element-desktop (Electron); element-web src/utils/device/parseUserAgent.ts",
    ),
    # krille-chan/fluffychat lib/utils/custom_http_client_native.dart: on Android the
    # Cronet engine's default User-Agent, which starts with the package name
    # chat.fluffy.fluffychat; on iOS and desktop Dart's own "Dart/x (dart:io)" (see "dart").
    _rule(
        "fluffychat",
        r"fluffychat",
        "chat.fluffy.fluffychat/1.25.1 (Linux; U; Android 14; en_US; Pixel 7; Build/UQ1A.240205.004;"
        " Cronet/128.0.6613.40)",
        "krille-chan/fluffychat lib/utils/custom_http_client_native.dart (Cronet default UA)",
    ),
    # Nheko-Reborn/mtxclient lib/http/client.cpp, Client::prepare_headers:
    # headers["User-Agent"] = "mtxclient v0.9.2" (Nheko's HTTP library).
    _rule(
        "nheko",
        r"^mtxclient v|nheko",
        "mtxclient v0.9.2",
        "Nheko-Reborn/mtxclient lib/http/client.cpp (prepare_headers)",
    ),
    # mautrix/python mautrix/api.py, HTTPAPI.default_ua:
    # "mautrix-python/{version} aiohttp/{version} Python/{version}", prefixed by the bridge.
    _rule(
        "mautrix-python",
        r"mautrix-python/",
        "mautrix-telegram/0.15.2 mautrix-python/0.20.6 aiohttp/3.9.5 Python/3.11.9",
        "mautrix/python mautrix/api.py (HTTPAPI.default_ua)",
    ),
    # mautrix/go version.go: DefaultUserAgent = "mautrix-go/" + Version + " go/" + ...,
    # prefixed by bridgev2 bridges with their own name.
    _rule(
        "mautrix-go",
        r"mautrix-go/",
        "mautrix-whatsapp/v0.12.1 mautrix-go/v0.23.3 go/1.24.2",
        "mautrix/go version.go (DefaultUserAgent)",
    ),
    # matrix-org/matrix-rust-sdk crates/matrix-sdk/src/http_client/native.rs,
    # HttpSettings::make_client: unwrap_or_else(|| "matrix-rust-sdk") when the app sets none.
    _rule(
        "matrix-rust-sdk",
        r"matrix-rust-sdk",
        "matrix-rust-sdk",
        "matrix-org/matrix-rust-sdk crates/matrix-sdk/src/http_client/native.rs (make_client)",
    ),
    # element-hq/synapse synapse/server.py: self.version_string = f"Synapse/{SYNAPSE_VERSION}",
    # the User-Agent of its federation and simple HTTP clients (legacy media fetches).
    _rule(
        "synapse",
        r"^synapse/",
        "Synapse/1.163.2",
        "element-hq/synapse synapse/server.py (version_string)",
    ),
    # matrix-org/dendrite setup/base/base.go, CreateClient:
    # client.SetUserAgent(fmt.Sprintf("Dendrite/%s", internal.VersionString())).
    _rule(
        "dendrite",
        r"^dendrite/",
        "Dendrite/0.15.2",
        "matrix-org/dendrite setup/base/base.go (CreateClient)",
    ),
    # The Conduit family. conduwuit, continuwuity and tuwunel build it in
    # src/core/info/version.rs: init_user_agent() = format!("{}/{}", name(), version())
    # (continuwuity adds " (bot; +https://continuwuity.org)"). Conduit itself
    # (timokoesters/conduit src/service/globals/mod.rs, reqwest_client_builder) sets no
    # User-Agent, so its requests are counted as "none".
    _rule(
        "conduit",
        r"^(?:conduit|conduwuit|continuwuity|tuwunel)/",
        "continuwuity/0.5.0 (bot; +https://continuwuity.org)",
        "girlbossceo/conduwuit, continuwuity/continuwuity, matrix-construct/tuwunel"
        " src/core/info/version.rs (init_user_agent)",
    ),
    # dart-lang/sdk sdk/lib/_http/http_impl.dart (_getHttpVersion): Dart's HttpClient
    # default "Dart/<major>.<minor> (dart:io)", which FluffyChat sends on iOS and desktop, as
    # do other matrix-dart-sdk clients and bots. Its own family, not "cli": these are the
    # users a freeze date breaks.
    _rule(
        "dart",
        r"^dart/",
        "Dart/3.5 (dart:io)",
        "dart-lang/sdk sdk/lib/_http/http_impl.dart (_getHttpVersion); FluffyChat on iOS/desktop",
    ),
    # Any other browser-like User-Agent (Element Web, Cinny, a pasted media URL...).
    _rule(
        "browser",
        r"^mozilla/\d|^opera/",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:137.0) Gecko/20100101 Firefox/137.0",
        "RFC 9110 section 10.1.5; every browser engine's default",
    ),
    # Command-line tools and HTTP libraries with their default User-Agent: scripts,
    # bots and bridges that did not name themselves.
    _rule(
        "cli",
        r"^(?:curl|wget|python-requests|python-urllib|python-httpx|python/[\d.]+ aiohttp|aiohttp"
        r"|go-http-client|okhttp|axios|node-fetch|node|undici|java|apache-httpclient"
        r"|libwww-perl|httpie|powershell|ruby|faraday|guzzlehttp|reqwest)[/ ]",
        "curl/8.5.0",
        "each tool's default (curl, Wget, python-requests, aiohttp, Go-http-client, okhttp, Java...)",
    ),
)

FAMILIES: tuple[str, ...] = tuple(dict.fromkeys([rule.family for rule in RULES] + [OTHER, NONE]))


def classify(user_agent: str | bytes | None) -> str:
    """The client family of a ``User-Agent`` value (``None`` or empty: no header)."""
    if user_agent is None:
        return NONE
    if len(user_agent) > MAX_LENGTH:
        return OTHER
    return _classify(user_agent)


# Clients send the same few User-Agents over and over: remember the latest answers
# (keys are at most MAX_LENGTH long, so the cache stays small).
@functools.lru_cache(maxsize=4096)
def _classify(user_agent: str | bytes) -> str:
    if isinstance(user_agent, bytes):
        user_agent = user_agent.decode("latin-1")
    if not user_agent.strip():
        return NONE
    if _CONTROL.search(user_agent):
        return OTHER
    for rule in RULES:
        if rule.pattern.search(user_agent):
            return rule.family
    return OTHER
