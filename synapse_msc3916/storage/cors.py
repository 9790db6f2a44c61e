"""The bucket's CORS rules, as browsers following a redirect need them.

A web client on its own origin (Element Web on app.example) fetches media from the
homeserver (matrix.example) with ``Authorization``; with ``redirect.enabled`` the answer is
a 307 to a presigned URL on a third origin. The Fetch standard calls that redirect
*tainted* (a cross-origin request redirected by a cross-origin server to another origin):
the browser drops ``Authorization`` and sends ``Origin: null`` to S3, and throws S3's
answer away unless it carries ``Access-Control-Allow-Origin: *`` (or ``null``). A rule
that allows only the web client's origin therefore loses every redirected image; the
rule that works allows every origin, which is safe here: the URL's signature is the
access control, and the browser sends no credentials with it.

``synapse-msc3916 s3 cors`` reports and fixes this; the provider checks the rules once at
start-up (``startup_check``). AWS S3 applies the *first* rule that matches a request's
origin and method, so the fix is appended after the bucket's own rules, which keep
answering their origins as before.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import attr

from synapse_msc3916 import homeserver_config as hc

logger = logging.getLogger(__name__)

COMMAND = "synapse-msc3916 s3 cors -c homeserver.yaml --apply"

# What a browser reading a redirected answer may need: GET and HEAD from any origin (the
# tainted ``null`` one included), the headers a media player or downloader reads
# (Content-Type and Content-Length are readable anyway; Content-Disposition, ETag and the
# range headers are not unless exposed), and preflights cached for an hour.
RULE = {
    "AllowedOrigins": ["*"],
    "AllowedMethods": ["GET", "HEAD"],
    "AllowedHeaders": ["*"],
    "ExposeHeaders": [
        "Content-Length", "Content-Type", "Content-Disposition", "Content-Range",
        "Accept-Ranges", "ETag", "Last-Modified",
    ],
    "MaxAgeSeconds": 3600,
}

TAINTED = "null"  # the Origin a browser sends after a cross-origin redirect


def origin_matches(pattern: str, origin: str) -> bool:
    """An S3 ``AllowedOrigin`` (at most one ``*`` wildcard) against an Origin header."""
    if pattern == "*":
        return True
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, origin, re.IGNORECASE) is not None


def rule_allows(rule: dict[str, Any], origin: str, method: str = "GET") -> bool:
    methods = [m.upper() for m in rule.get("AllowedMethods") or []]
    return method in methods and any(
        origin_matches(p, origin) for p in rule.get("AllowedOrigins") or []
    )


def serves_redirected_browsers(rules: list[dict[str, Any]]) -> bool:
    """Whether a browser's GET after the homeserver's redirect (Origin: null) is allowed."""
    return any(rule_allows(rule, TAINTED) for rule in rules)


def merged(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The bucket's rules with ``RULE`` appended, unless they already serve browsers."""
    if serves_redirected_browsers(rules):
        return list(rules)
    return [*rules, dict(RULE)]


class CorsUnreadable(Exception):
    """GetBucketCors failed for another reason than "no rules" (e.g. AccessDenied)."""


def read_rules(store: Any) -> list[dict[str, Any]]:
    """The bucket's CORS rules; ``[]`` when it has none."""
    try:
        answer = store.client.get_bucket_cors(Bucket=store.bucket)
    except Exception as e:
        code = str((getattr(e, "response", None) or {}).get("Error", {}).get("Code", ""))
        if code == "NoSuchCORSConfiguration":
            return []
        raise CorsUnreadable(f"GetBucketCors on bucket {store.bucket!r} failed: {e}") from e
    return [dict(rule) for rule in answer.get("CORSRules", [])]


def write_rules(store: Any, rules: list[dict[str, Any]]) -> None:
    store.client.put_bucket_cors(Bucket=store.bucket, CORSConfiguration={"CORSRules": rules})


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Probe:
    """What the redirect target answered a browser-like GET (Origin: null, no token)."""

    host: str
    status: int | None
    allow_origin: str | None
    error: str | None = None

    @property
    def served(self) -> bool:
        return self.status is not None and self.status < 400 and self.allow_origin in ("*", TAINTED)


def probe(store: Any) -> Probe | None:
    """GET the first byte of one stored object through a presigned URL, as a browser
    following a redirect would; None when the bucket has no object to try.

    The URL is signed exactly as redirects are (for ``public_endpoint_url`` when set), so
    this sees what browsers will see, whoever answers CORS there: the bucket, a proxy or
    a CDN (SeaweedFS, for one, answers a bucket without rules by its global default).
    """
    first = next(iter(store.list_blobs()), None)
    if first is None:
        return None
    sha256 = first.name.rsplit("/", 1)[-1]
    url = store.presign_get(sha256, 60, None, None)
    host = urllib.parse.urlsplit(url).netloc
    request = urllib.request.Request(url, headers={"Origin": TAINTED, "Range": "bytes=0-0"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return Probe(host, resp.status, resp.headers.get("Access-Control-Allow-Origin"))
    except urllib.error.HTTPError as e:
        return Probe(host, e.code, e.headers.get("Access-Control-Allow-Origin"))
    except Exception as e:
        return Probe(host, None, None, str(e))


def startup_check(store: Any) -> None:
    """Log one WARNING when the bucket's rules refuse redirected browsers (blocking).

    Never fatal: a proxy in front of the bucket may answer CORS itself, and an S3 that
    refuses GetBucketCors is only reported.
    """
    try:
        rules = read_rules(store)
    except CorsUnreadable as e:
        logger.warning(
            "synapse_msc3916: redirect.enabled: cannot read the bucket's CORS rules (%s); "
            "browsers following a redirect need S3 to allow Origin: null, see `%s`",
            e, COMMAND,
        )
        return
    if not serves_redirected_browsers(rules):
        logger.warning(
            "synapse_msc3916: redirect.enabled: the CORS rules of bucket %r do not allow "
            "GET from Origin: null, which browsers send to S3 after the homeserver's "
            "cross-origin redirect (tainted origin): web clients such as Element Web will "
            "not display redirected media. Run `%s` to add a rule allowing every origin.",
            store.bucket, COMMAND,
        )


# --- the command -----------------------------------------------------------------------


def cmd_cors(args: argparse.Namespace) -> int:
    from synapse_msc3916.storage.blobstore import S3BlobStore
    from synapse_msc3916.storage.tools import Context

    ctx = Context(args.config)
    store = ctx.store
    if not isinstance(store, S3BlobStore):
        raise hc.ToolError("backend: file has no bucket and no redirects: nothing to check")
    cdn = ctx.storage.redirect.public_endpoint_url
    try:
        rules = read_rules(store)
        to_add = None if serves_redirected_browsers(rules) else RULE
        applied = False
        if args.apply and to_add is not None:
            write_rules(store, merged(rules))
            rules = read_rules(store)
            applied = True
    except CorsUnreadable as e:
        raise hc.ToolError(str(e)) from None
    except Exception as e:
        raise hc.ToolError(f"PutBucketCors on bucket {store.bucket!r} failed: {e}") from None
    rules_ok = serves_redirected_browsers(rules)
    tried = probe(store)
    served = tried.served if tried is not None else rules_ok
    report = {
        "bucket": store.bucket,
        "endpoint_url": ctx.storage.endpoint_url,
        "public_endpoint_url": cdn,
        "redirect_enabled": ctx.storage.redirect.enabled,
        "rules": rules,
        "rules_serve_redirected_browsers": rules_ok,
        "probe": attr.asdict(tried) if tried is not None else None,
        "browsers_served": served,
        "rule_to_add": None if rules_ok else RULE,
        "applied": applied,
    }
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_report(report, tried)
    return 0 if served else 1


def _print_report(report: dict[str, Any], tried: Probe | None) -> None:
    out = sys.stdout
    print(f"bucket {report['bucket']} at {report['endpoint_url'] or 'AWS'}", file=out)
    if not report["redirect_enabled"]:
        print("  (redirect.enabled is false: nothing is redirected yet)", file=out)
    if report["applied"]:
        print("  applied: appended the rule below; the bucket's other rules are kept", file=out)
    print("current CORS rules:" if report["rules"] else "current CORS rules: none", file=out)
    for rule in report["rules"]:
        print(f"  {json.dumps(rule, sort_keys=True)}", file=out)
    verdict = "allow" if report["rules_serve_redirected_browsers"] else "DO NOT allow"
    print(f"these rules {verdict} a GET with Origin: null, which browsers send to S3 after the "
          "homeserver's cross-origin redirect (tainted origin)", file=out)
    if tried is not None:
        answer = (f"{tried.status}, Access-Control-Allow-Origin: {tried.allow_origin or '(none)'}"
                  if tried.error is None else f"no answer ({tried.error})")
        print(f"probe: a presigned GET on {tried.host} with Origin: null got {answer}", file=out)
        if tried.served and not report["rules_serve_redirected_browsers"]:
            print("  (served although the rules do not allow it: a default of the S3 server, such "
                  "as SeaweedFS's -s3.allowedOrigins, or a proxy answers CORS; AWS S3 would refuse)",
                  file=out)
    else:
        print("probe: no stored object to try; the verdict is the rules'", file=out)
    if report["public_endpoint_url"]:
        print(f"redirects point at {report['public_endpoint_url']}: CORS is that CDN's job. It "
              "must answer a GET with Origin: null (and any web client's origin) with "
              "Access-Control-Allow-Origin: * (or pass through the answer of a bucket with "
              "the rule below)", file=out)
    if report["rule_to_add"] is not None:
        print("rule to add (--apply appends it, keeping the other rules):", file=out)
        print(f"  {json.dumps(report['rule_to_add'], sort_keys=True)}", file=out)
    if report["browsers_served"]:
        print("browsers following a redirect will be served", file=out)
    else:
        print("browsers following a redirect will be REFUSED (Element Web shows no image)",
              file=out)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("s3", help="the S3 bucket's settings for the provider")
    sub = p.add_subparsers(dest="s3_command", required=True, metavar="COMMAND")
    c = sub.add_parser(
        "cors",
        help="check (and with --apply fix) the bucket's CORS rules for browsers following redirects",
    )
    c.add_argument("-c", "--config", required=True, help="Synapse's homeserver.yaml")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--apply", action="store_true",
                   help="append the rule browsers need to the bucket's rules (others are kept)")
    c.set_defaults(func=cmd_cors)


__all__ = ["register", "startup_check"]
