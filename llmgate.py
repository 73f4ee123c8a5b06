#!/usr/bin/env python3
"""llmgate: share one LLM provider account through internal keys.

What it does
    Every developer, IDE, agent and CI job gets an internal key.  llmgate
    checks that key, reserves an estimate against the user's token quota,
    swaps in the real provider key, forwards the request byte for byte,
    streams the answer back event by event, and charges the tokens the
    provider reports.  Revoking a person is deleting one line of config.

    It speaks to OpenAI, Anthropic, Azure OpenAI and any OpenAI-compatible
    server (vLLM, Ollama, OpenRouter, ...).  Codex, Claude Code, the OpenAI
    and Anthropic SDKs and curl work through it unmodified.

What it deliberately does not do
    It terminates no TLS (put it on loopback or behind a TLS proxy), keeps
    no database (usage lives in a lock-protected table, optionally saved to
    a JSON state file), translates no API into another, and contacts no
    host but the configured providers.

Run
    python3 llmgate.py --config config.json          # serve
    python3 llmgate.py --config config.json --check  # validate, show routes
    python3 llmgate.py usage --config config.json    # usage table
    python3 llmgate.py keygen alice                  # a new hashed key

Security
    Internal keys are compared as SHA-256 digests with hmac.compare_digest
    and never logged, returned or forwarded.  The provider key is only ever
    sent to its provider.  Prompts are never logged.  Every read, wait and
    buffer is bounded by a named limit below.

Known limitations (each marked XXX where it lives)
    - Only the usage a provider reports is exact; when none is reported the
      charge is an estimate (4 characters a token).
    - A client that hangs up is noticed at once only on Linux (epoll);
      elsewhere it is noticed at the next event written to it.
    - Responses compressed with an encoding other than gzip or deflate
      cannot be read for usage; they are charged by estimate.

The life of a streamed request, as this file handles it:

    client --head--> [auth, quota precheck] --body--> [parse, route,
    reserve] --request--> provider --head--> client gets head (chunked)
        |                                         |
        |   events: read1 -> cut into SSE events -> meter -> client
        |                                         |
        +-- client hangs up: watcher shuts the provider socket
        +-- provider breaks: error event to client, stream ends
    settle reservation -> wait for state file -> final chunk -> log line
"""

import argparse
import collections
import datetime
import fnmatch
import gc
import hashlib
import hmac
import http
import http.client
import http.server
import io
import json
import math
import os
import re
import secrets
import select
import signal
import socket
import socketserver
import ssl
import stat
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import zlib

__version__ = "1.0.0"


# Limits and timeouts #########################################################
# Every read, wait and buffer below is bounded by one of these.

MAX_REQUEST_LINE_BYTES = 16 * 1024  # longer request targets get 414
MAX_HEADER_BYTES = 64 * 1024        # the whole header block; more gets 431
MAX_HEADER_COUNT = 100              # header lines per request; more gets 431
MAX_CHUNK_LINE_BYTES = 4096         # one chunk-size line of a chunked body
MAX_BODY_CHUNKS = 1 << 17           # pieces of one chunked body: parsing
#                                     each costs, whatever its size
MAX_BODY_BYTES = 64 * 1024 * 1024   # default body cap: images, audio uploads
FIRST_BYTE_TIMEOUT_S = 10.0    # a new connection's wait for its first byte
HEADER_TIMEOUT_S = 10.0        # first byte to end of headers: stops dribblers
CLIENT_IDLE_TIMEOUT_S = 60.0   # a client silent between requests, or not
#                                reading its answer, is dropped
BODY_TIMEOUT_S = 300.0         # whole request body, once authenticated
TIMEOUT_SLACK_S = 1.0          # a wait may overrun its deadline this much
#                                rather than pay a syscall to shorten it
CONNECT_TIMEOUT_S = 10.0       # TCP and TLS set-up with a provider
PROVIDER_TIMEOUT_S = 600.0     # default wait for each provider read
MAX_CONNECTIONS = 4096         # client connections at once; more are closed
LISTEN_BACKLOG = 1024          # accept queue, for bursts of new streams
POOL_IDLE_MAX = 64             # idle provider connections kept per provider
POOL_IDLE_TIMEOUT_S = 30.0     # idle provider connections older are closed
STALE_RETRY_S = 0.1            # a reused connection that fails this soon
#                                after the request went out was stale
RECV_BYTES = 65536             # one socket read
HOLD_BODY_BYTES = 8 * 1024 * 1024   # plain answers up to this are billed
#                                     before they are sent, whole
MAX_EVENT_BYTES = 16 * 1024 * 1024  # one SSE event (response.completed
#                                     repeats the whole answer)
USAGE_TAIL_BYTES = 1024 * 1024      # tail kept of larger answers for usage
MAX_DECODED_BYTES = 64 * 1024 * 1024  # gzip bodies inflated for billing
CHARS_PER_TOKEN = 4            # the estimate's rate, for text of any kind
RESERVE_OUTPUT_TOKENS = 4096   # default output reserve when none is asked
BUSY_RETRY_AFTER_S = 2         # Retry-After when others' reservations block
PARALLEL_RETRY_AFTER_S = 1     # Retry-After when maxParallel is reached
RPM_WINDOW_S = 60              # the window of the rpm limit
SHUTDOWN_GRACE_S = 30.0        # SIGTERM waits this long for requests
CONFIG_POLL_S = 1.0            # how often the config file is looked at
STATE_SYNC_TIMEOUT_S = 5.0     # a request waits this long for its save
STATE_RETRY_S = 1.0            # a failed save is tried again after this
WATCH_POLL_S = 1.0             # the disconnect watcher's wake-up period
MAX_LOG_FIELD_CHARS = 120      # a model name or path in the log is cut here
MAX_FORM_PARTS = 1000          # parts of a multipart body; uploads have few

ANTHROPIC_VERSION = "2023-06-01"  # sent when the client names none
USAGE_PATH = "/llmgate/usage"
HEALTH_PATH = "/healthz"
STATE_FORMAT = "llmgate-usage/1"
REASONS = {s.value: s.phrase for s in http.HTTPStatus}   # 200 -> "OK"

# RFC 9110 section 7.6.1: never forwarded, whatever the Connection header says
HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-connection", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-authenticate"))
# a client's credentials are its own business with us, never the provider's
CLIENT_CREDENTIALS = frozenset((
    "authorization", "x-api-key", "api-key", "cookie",
    "proxy-authorization"))
# request headers the gateway sets itself
REQUEST_REPLACED = frozenset((
    "host", "content-length", "accept-encoding", "expect"))
REQUEST_DROPPED = HOP_BY_HOP | CLIENT_CREDENTIALS | REQUEST_REPLACED
# answer headers that would name the shared account or set its cookies
RESPONSE_DROPPED = frozenset((
    "content-length", "set-cookie", "openai-organization",
    "openai-project"))

# methods forwarded; TRACE would echo the provider key back, CONNECT
# would make a tunnel
ALLOWED_METHODS = frozenset((
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
# only these create work a provider charges for; a GET that retrieves a
# stored response repeats its usage, which was charged when it was made
WRITE_METHODS = frozenset(("POST", "PUT", "PATCH"))

# the last path segment of the APIs that generate text and cost output
GENERATION_SUFFIXES = ("/chat/completions", "/completions", "/responses",
                       "/messages", "/embeddings")
FREE_SUFFIXES = ("/count_tokens",)   # never charged, never reserved
OUTPUT_FIELDS = ("max_output_tokens", "max_completion_tokens", "max_tokens")

SAFE_FIELD_RE = re.compile(r"[\x21-\x7e]+\Z")
UNSAFE_CHAR_RE = re.compile(r"[^\x21-\x7e]")
CONTROL_RE = re.compile(r"[\x00-\x20\x7f]")
TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
# every header line of a request head at once: a token, a colon, then no
# CR, LF or NUL (RFC 9112 section 5; obsolete line folding is refused)
HEADER_LINES_RE = re.compile(
    r"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n\x00]*"
    r"(?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n\x00]*)*\Z")
ENV_RE = re.compile(r"\$\{([^}]*)\}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
HEX64_RE = re.compile(r"[0-9a-fA-F]{64}\Z")
DEPLOYMENT_RE = re.compile(r"^/openai/deployments/([^/]+)/")
JSON_START_RE = re.compile(rb"\s*\{")
MULTI_SLASH_RE = re.compile(r"/{2,}")
DIGITS_RE = re.compile(r"[0-9]{1,18}\Z")
THREE_DIGITS_RE = re.compile(r"[1-9][0-9]{2}\Z")   # a status code
# an ISO 8601 date, or date and time with optional fraction and zone
EXPIRY_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})(?:[Tt ]([0-9]{2})(?::([0-9]{2})"
    r"(?::([0-9]{2})(?:[.,]([0-9]{1,9}))?)?)?)?"
    r"(Z|z|[+-][0-9]{2}(?::?[0-9]{2})?)?\Z")
# the end of a server-sent event: a line ending, then an empty line; a CR
# is one unless an LF follows it
EVENT_END_RE = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")
# a chunk-size line: hex size, optional extensions, no bare CR or LF
CHUNK_LINE_RE = re.compile(rb"[0-9A-Fa-f]{1,15}(?:[ \t]*;[^\r\n]*)?\Z")


# Errors ######################################################################

# code -> (status, OpenAI error type, Anthropic error type)
ERRORS = {
    "missing_api_key": (401, "authentication_error", "authentication_error"),
    "invalid_api_key": (401, "authentication_error", "authentication_error"),
    "key_expired": (401, "authentication_error", "authentication_error"),
    "key_disabled": (401, "authentication_error", "authentication_error"),
    "model_not_allowed": (403, "permission_error", "permission_error"),
    "not_admin": (403, "permission_error", "permission_error"),
    "not_found": (404, "invalid_request_error", "not_found_error"),
    "method_not_allowed": (405, "invalid_request_error",
                           "invalid_request_error"),
    "invalid_request": (400, "invalid_request_error",
                        "invalid_request_error"),
    "invalid_path": (400, "invalid_request_error", "invalid_request_error"),
    "invalid_json": (400, "invalid_request_error", "invalid_request_error"),
    "bad_framing": (400, "invalid_request_error", "invalid_request_error"),
    "request_timeout": (408, "invalid_request_error",
                        "invalid_request_error"),
    "body_too_large": (413, "invalid_request_error", "request_too_large"),
    "uri_too_long": (414, "invalid_request_error", "invalid_request_error"),
    "websocket_unsupported": (426, "invalid_request_error",
                              "invalid_request_error"),
    "headers_too_large": (431, "invalid_request_error",
                          "invalid_request_error"),
    "quota_exceeded": (429, "insufficient_quota", "rate_limit_error"),
    "quota_busy": (429, "rate_limit_error", "rate_limit_error"),
    "rate_limit_exceeded": (429, "rate_limit_error", "rate_limit_error"),
    "too_many_parallel_requests": (429, "rate_limit_error",
                                   "rate_limit_error"),
    "internal_error": (500, "api_error", "api_error"),
    "version_not_supported": (505, "invalid_request_error",
                              "invalid_request_error"),
    "upstream_unreachable": (502, "api_error", "api_error"),
    "upstream_auth_failed": (502, "api_error", "api_error"),
    "upstream_stream_broken": (502, "api_error", "api_error"),
    "shutting_down": (503, "api_error", "overloaded_error"),
    "upstream_timeout": (504, "api_error", "api_error"),
}


class ConfigError(Exception):
    """A config or state file that cannot be used; the message names the
    field and says what is wrong."""


class Refusal(Exception):
    """A request the gateway answers itself, with an error in the shape of
    the API the client called.  `close` drops the connection after it,
    for requests whose body was not read or whose framing is broken."""

    def __init__(self, code, message, retry_after=None, close=False):
        Exception.__init__(self, message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.close = close


class ClientGone(Exception):
    """The client hung up or stopped reading; nothing more can be sent."""


def error_body(family, code, message):
    """The JSON error a client of `family` ("openai" or "anthropic")
    expects, as bytes."""
    _, openai_type, anthropic_type = ERRORS[code]
    if family == "anthropic":
        doc = {"type": "error",
               "error": {"type": anthropic_type, "message": message}}
    else:
        doc = {"error": {"message": message, "type": openai_type,
                         "param": None, "code": code}}
    return json.dumps(doc).encode()


# Logging #####################################################################

_log_lock = threading.Lock()


def log(message):
    """Write one line to stderr.  Every log line goes through here."""
    line = "%s %s\n" % (iso_time(time.time(), millis=True), message)
    with _log_lock:
        try:
            sys.stderr.write(line)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


_second_texts = {}   # whole second -> its text; a small memo


def iso_time(ts, millis=False):
    """A Unix time as UTC ISO 8601 with a Z.  Seconds already formatted
    are remembered (a few dozen at most): every log line and quota header
    asks for one of the same few."""
    second = int(ts)
    text = _second_texts.get(second)
    if text is None:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        if len(_second_texts) >= 64:
            _second_texts.clear()
        _second_texts[second] = text
    if millis:
        text += ".%03d" % (int(ts * 1000) % 1000)
    return text + "Z"


def clean_field(value):
    """A client-supplied string made safe for one log line: no control
    characters, no spaces, at most MAX_LOG_FIELD_CHARS."""
    if value is None:
        return "-"
    text = str(value)[:MAX_LOG_FIELD_CHARS]
    if SAFE_FIELD_RE.match(text):
        return text
    return UNSAFE_CHAR_RE.sub("?", text) or "-"


# Configuration ###############################################################

PROVIDER_TYPES = ("openai", "anthropic", "azure")
RESERVED_PREFIXES = ("/v1", "/openai", "/llmgate", HEALTH_PATH)
TOP_FIELDS = ("listen", "providers", "limitResetPeriod", "users",
              "stateFile", "reserveOutputTokens", "maxBodyBytes")
PROVIDER_FIELDS = ("type", "url", "apiKey", "prefix", "models", "timeout")
USER_FIELDS = ("name", "apiKey", "apiKeys", "apiKeySha256", "apiKeySha256s",
               "tokens", "models", "maxOutputTokens", "rpm", "maxParallel",
               "expires", "disabled", "admin")
_MISSING = object()


class Provider:
    """One configured provider and its pool of kept-alive connections."""

    def __init__(self, name, kind, url, api_key, prefix, models, timeout):
        self.name = name
        self.type = kind
        self.family = "anthropic" if kind == "anthropic" else "openai"
        self.url = url
        parts = urllib.parse.urlsplit(url)
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = parts.port is None
        bracketed = "[%s]" % self.host if ":" in self.host else self.host
        self.host_header = bracketed if default_port else "%s:%d" % (
            bracketed, self.port)
        self.base_path = parts.path.rstrip("/")
        self.api_key = api_key
        self.prefix = prefix
        self.models = models or []
        self.timeout = timeout
        self.pool = ConnectionPool(self)

    def auth_headers(self):
        """The provider's own credentials, in the header its API reads."""
        if not self.api_key:
            return []
        if self.type == "anthropic":
            return [("x-api-key", self.api_key)]
        if self.type == "azure":
            return [("api-key", self.api_key)]
        return [("Authorization", "Bearer " + self.api_key)]

    def model_rank(self, model):
        """0 when `model` is listed exactly, 1 when a pattern matches, None
        otherwise.  Lower ranks win a tie between providers."""
        if model in self.models:
            return 0
        for pattern in self.models:
            if fnmatch.fnmatchcase(model, pattern):
                return 1
        return None

    def same_endpoint(self, other):
        return (self.url, self.api_key, self.type, self.timeout) == (
            other.url, other.api_key, other.type, other.timeout)


class User:
    """One configured user: who they are, their keys' digests, limits."""

    def __init__(self, name):
        self.name = name
        self.digests = []
        self.plaintext_keys = 0
        self.tokens = 0
        self.models = None
        self.max_output_tokens = None
        self.rpm = None
        self.max_parallel = None
        self.expires = None
        self.disabled = False
        self.admin = False

    def allows_model(self, model):
        if self.models is None or model is None:
            return True
        return any(fnmatch.fnmatchcase(model, p) for p in self.models)


class Config:
    """A validated configuration.  Immutable once built: a reload builds a
    new one and swaps the reference, so a request sees one consistent
    config from start to end."""

    def __init__(self):
        self.path = None
        self.host = "127.0.0.1"
        self.port = 2000
        self.providers = []
        self.period = 3600
        self.users = []
        self.by_digest = {}
        self.state_path = None
        self.reserve_output = RESERVE_OUTPUT_TOKENS
        self.max_body_bytes = MAX_BODY_BYTES
        self.prefixed = []
        self.defaults = {}
        self.model_routed = []

    # routing: see README "Routing"

    def match(self, path):
        """(provider or None, upstream path, family) for a request path, or
        None when no route serves it.  A None provider means the provider
        is chosen by `resolve` once the body's model is known."""
        for p in self.prefixed:
            if path == p.prefix or path.startswith(p.prefix + "/"):
                return p, path[len(p.prefix):] or "/", p.family
        if path == "/v1" or path.startswith("/v1/"):
            if path == "/v1/messages" or path.startswith("/v1/messages/"):
                return None, path, "anthropic"
            return None, path, "openai"
        if path == "/openai" or path.startswith("/openai/"):
            azure = self.defaults.get("azure")
            if azure is not None:
                return azure, path, "openai"
        return None

    def resolve(self, family, path, model):
        """(provider, upstream path) for an unprefixed /v1 request, or None.
        A provider whose `models` names the model exactly wins over one
        whose pattern matches it; among equals the first in the config
        wins; with no match the path decides."""
        if model is not None and self.model_routed:
            best, best_rank = None, None
            for p in self.model_routed:
                if p.family != family:
                    continue
                rank = p.model_rank(model)
                if rank is not None and (best_rank is None or
                                         rank < best_rank):
                    best, best_rank = p, rank
            if best is not None:
                if best.type == "azure":
                    return best, "/openai" + path
                return best, path
        default = self.defaults.get(
            "anthropic" if family == "anthropic" else "openai")
        if default is None:
            return None
        return default, path

    def routes(self):
        """Human-readable routing table lines, for --check."""
        lines = []
        for p in self.prefixed:
            lines.append("%s/...  ->  %s" % (p.prefix, describe(p)))
        for fam, pattern in (("anthropic", "/v1/messages..."),
                             ("openai", "/v1/..."), ("azure", "/openai/...")):
            p = self.defaults.get(fam)
            if p is not None:
                lines.append("%s  ->  %s" % (pattern, describe(p)))
        for p in self.model_routed:
            lines.append("model %s  ->  %s" % (
                ", ".join(p.models), describe(p)))
        return lines or ["(no routes)"]


def describe(provider):
    return "%s (%s, %s)" % (provider.name, provider.type, provider.url)


def expand_env(value, where, environ):
    """Replace every ${NAME} in a string from the environment."""
    def lookup(match):
        name = match.group(1)
        if not ENV_NAME_RE.match(name):
            raise ConfigError("%s: ${%s} is not a valid variable name"
                              % (where, name))
        if name not in environ:
            raise ConfigError("%s: environment variable %s is not set"
                              % (where, name))
        return environ[name]
    return ENV_RE.sub(lookup, value)


def expand_all(node, where, environ):
    """A copy of a JSON value with ${NAME} expanded in every string."""
    if isinstance(node, str):
        return expand_env(node, where, environ)
    if isinstance(node, list):
        return [expand_all(v, "%s[%d]" % (where, i), environ)
                for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {k: expand_all(v, "%s.%s" % (where, k) if where else k,
                              environ)
                for k, v in node.items()}
    return node


def check_fields(obj, where, allowed):
    if not isinstance(obj, dict):
        raise ConfigError("%s must be an object" % where)
    for key in obj:
        if key not in allowed:
            raise ConfigError("%s: unknown field %r (known: %s)"
                              % (where, key, ", ".join(allowed)))


def get_int(obj, key, where, default=_MISSING, minimum=0):
    value = obj.get(key, default)
    if value is _MISSING:
        raise ConfigError("%s.%s is required" % (where, key))
    if value is default:
        return value
    if isinstance(value, bool) or not isinstance(value, int) \
            or value < minimum:
        kind = "non-negative" if minimum == 0 else "positive"
        raise ConfigError("%s.%s must be a %s integer" % (where, key, kind))
    return value


def get_str(obj, key, where, default=_MISSING):
    value = obj.get(key, default)
    if value is _MISSING:
        raise ConfigError("%s.%s is required" % (where, key))
    if value is default:
        return value
    if not isinstance(value, str) or not value:
        raise ConfigError("%s.%s must be a non-empty string" % (where, key))
    return value


def get_bool(obj, key, where):
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError("%s.%s must be true or false" % (where, key))
    return value


def get_patterns(obj, key, where):
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v for v in value):
        raise ConfigError("%s.%s must be a non-empty list of model names "
                          "or patterns" % (where, key))
    return list(value)


def parse_expiry(value, where):
    """An ISO date or date-time as a Unix time.  A bare date means the key
    stops working at 00:00 UTC that day."""
    bad = ConfigError("%s must be an ISO date such as 2027-01-31 or "
                      "2027-01-31T18:00:00Z" % where)
    # read here, not by fromisoformat, which reads less before 3.11
    match = EXPIRY_RE.match(value.strip()) if isinstance(value, str) \
        else None
    if not match:
        raise bad
    y, mo, d, h, mi, s, frac, zone = match.groups()
    try:
        moment = datetime.datetime(
            int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(s or 0),
            int((frac or "0")[:6].ljust(6, "0")),
            tzinfo=datetime.timezone.utc)
    except ValueError:   # 2027-02-30, 25:00
        raise bad
    offset = 0
    if zone and zone.upper() != "Z":
        digits = zone[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:] or 0)
        if hours > 23 or minutes > 59:
            raise bad
        offset = (hours * 3600 + minutes * 60) * (-1 if zone[0] == "-"
                                                  else 1)
    return moment.timestamp() - offset


def key_digest(data):
    """The SHA-256 by which a key is looked up, of the key's bytes."""
    return hashlib.sha256(data).digest()


def parse_provider(name, raw, where):
    check_fields(raw, where, PROVIDER_FIELDS)
    kind = raw.get("type", "openai")
    if kind not in PROVIDER_TYPES:
        raise ConfigError("%s.type must be one of %s"
                          % (where, ", ".join(PROVIDER_TYPES)))
    url = get_str(raw, "url", where)
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        parts = urllib.parse.urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("%s.url must be an http:// or https:// URL with a "
                          "host" % where)
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError("%s.url must not carry a query, fragment or "
                          "credentials" % where)
    try:
        parts.port
    except ValueError:
        raise ConfigError("%s.url has a bad port" % where)
    api_key = raw.get("apiKey")
    if api_key is not None and (not isinstance(api_key, str) or not api_key
                                or CONTROL_RE.search(api_key)):
        raise ConfigError("%s.apiKey must be a non-empty string without "
                          "spaces or control characters; leave it out for a "
                          "provider that takes none" % where)
    prefix = raw.get("prefix")
    if prefix is not None:
        if not isinstance(prefix, str) or not re.match(
                r"^(/[A-Za-z0-9._~-]+)+$", prefix) or has_dot_segment(prefix):
            raise ConfigError("%s.prefix must look like /name" % where)
        for reserved in RESERVED_PREFIXES:
            if overlaps(prefix, reserved):
                raise ConfigError("%s.prefix %s collides with %s, which "
                                  "llmgate serves itself"
                                  % (where, prefix, reserved))
    models = get_patterns(raw, "models", where)
    timeout = raw.get("timeout", PROVIDER_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not 0 < timeout <= 86400:
        raise ConfigError("%s.timeout must be seconds between 0 and 86400"
                          % where)
    return Provider(name, kind, url, api_key, prefix, models, float(timeout))


def overlaps(a, b):
    """True when one path prefix equals or contains the other."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def parse_user(raw, where):
    check_fields(raw, where, USER_FIELDS)
    name = get_str(raw, "name", where)
    user = User(name)
    user.tokens = get_int(raw, "tokens", where)
    keys = []
    if "apiKey" in raw:
        keys.append(("%s.apiKey" % where, raw["apiKey"]))
    if "apiKeys" in raw:
        if not isinstance(raw["apiKeys"], list) or not raw["apiKeys"]:
            raise ConfigError("%s.apiKeys must be a non-empty list" % where)
        keys.extend(("%s.apiKeys[%d]" % (where, i), k)
                    for i, k in enumerate(raw["apiKeys"]))
    hashes = []
    if "apiKeySha256" in raw:
        hashes.append(("%s.apiKeySha256" % where, raw["apiKeySha256"]))
    if "apiKeySha256s" in raw:
        if not isinstance(raw["apiKeySha256s"], list) \
                or not raw["apiKeySha256s"]:
            raise ConfigError("%s.apiKeySha256s must be a non-empty list"
                              % where)
        hashes.extend(("%s.apiKeySha256s[%d]" % (where, i), h)
                      for i, h in enumerate(raw["apiKeySha256s"]))
    for field, key in keys:
        if not isinstance(key, str) or len(key) < 8:
            raise ConfigError("%s must be a string of at least 8 characters"
                              % field)
        user.digests.append((field, key_digest(key.encode("utf-8"))))
        user.plaintext_keys += 1
    for field, digest in hashes:
        if not isinstance(digest, str) or not HEX64_RE.match(digest):
            raise ConfigError("%s must be 64 hex digits (a SHA-256 of the "
                              "key)" % field)
        user.digests.append((field, bytes.fromhex(digest)))
    if not user.digests:
        raise ConfigError("%s needs a key: apiKey, apiKeys, apiKeySha256 or "
                          "apiKeySha256s" % where)
    user.models = get_patterns(raw, "models", where)
    user.max_output_tokens = get_int(raw, "maxOutputTokens", where, None, 1)
    user.rpm = get_int(raw, "rpm", where, None, 1)
    user.max_parallel = get_int(raw, "maxParallel", where, None, 1)
    if raw.get("expires") is not None:
        user.expires = parse_expiry(raw["expires"], where + ".expires")
    user.disabled = get_bool(raw, "disabled", where)
    user.admin = get_bool(raw, "admin", where)
    return user


def parse_config(data, base_dir, environ):
    """Build a Config from parsed JSON.  Raises ConfigError naming the
    first bad field."""
    check_fields(data, "config", TOP_FIELDS)
    data = expand_all(data, "", environ)
    config = Config()

    listen = data.get("listen", {})
    check_fields(listen, "listen", ("host", "port"))
    config.host = get_str(listen, "host", "listen", "127.0.0.1")
    config.port = get_int(listen, "port", "listen", 2000)
    if config.port > 65535:
        raise ConfigError("listen.port must be between 0 and 65535")

    config.period = get_int(data, "limitResetPeriod", "config", 3600, 1)
    config.reserve_output = get_int(data, "reserveOutputTokens", "config",
                                    RESERVE_OUTPUT_TOKENS)
    config.max_body_bytes = get_int(data, "maxBodyBytes", "config",
                                    MAX_BODY_BYTES, 1)
    state = data.get("stateFile")
    if state is not None:
        if not isinstance(state, str) or not state:
            raise ConfigError("stateFile must be a non-empty path")
        config.state_path = os.path.join(base_dir, state)

    providers = data.get("providers")
    if not isinstance(providers, dict) or not providers:
        raise ConfigError("providers must be an object naming at least one "
                          "provider")
    seen_prefix = {}
    for name, raw in providers.items():
        where = "providers.%s" % name
        p = parse_provider(name, raw, where)
        config.providers.append(p)
        if p.prefix is not None:
            for other, other_where in seen_prefix.items():
                if overlaps(p.prefix, other):
                    raise ConfigError("%s.prefix %s collides with %s.prefix"
                                      % (where, p.prefix, other_where))
            seen_prefix[p.prefix] = where
            config.prefixed.append(p)
        else:
            if p.type in config.defaults:
                raise ConfigError(
                    "%s collides with providers.%s: both are of type %s "
                    "without a prefix; give one a prefix"
                    % (where, config.defaults[p.type].name, p.type))
            config.defaults[p.type] = p
        if p.models:
            config.model_routed.append(p)
    config.prefixed.sort(key=lambda p: -len(p.prefix))

    users = data.get("users")
    if not isinstance(users, list):
        raise ConfigError("users must be a list")
    names = {}   # name -> index
    for i, raw in enumerate(users):
        where = "users[%d]" % i
        user = parse_user(raw, where)
        if user.name in names:
            raise ConfigError("%s.name repeats the name of users[%d]"
                              % (where, names[user.name]))
        names[user.name] = i
        for field, digest in user.digests:
            if digest in config.by_digest:
                raise ConfigError("%s: the same key is configured twice"
                                  % field)
            config.by_digest[digest] = user
        config.users.append(user)
    return config


def load_config(path, environ=None):
    """Read, parse and validate a config file.  Raises ConfigError."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError("cannot read %s: %s" % (path, exc.strerror))
    base = os.path.dirname(os.path.abspath(path))
    try:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError("%s is not valid JSON: %s" % (path, exc))
        config = parse_config(data, base, os.environ if environ is None
                              else environ)
    except RecursionError:   # reading or walking it
        raise ConfigError("%s is nested too deeply" % path)
    config.path = path
    return config


def config_warnings(config, host=None):
    """What an admin should fix, as sentences; `host` is the address
    really listened on when the command line overrides the config."""
    host = config.host if host is None else host
    out = []
    plain = [u.name for u in config.users if u.plaintext_keys]
    if plain:
        out.append("%d user(s) have plaintext keys in the config (%s); "
                   "`llmgate.py keygen NAME` makes a hashed one"
                   % (len(plain), ", ".join(plain[:5])))
    if config.path and os.name == "posix":
        try:
            mode = os.stat(config.path).st_mode
            if mode & (stat.S_IRGRP | stat.S_IROTH):
                out.append("%s is readable by other users (mode %o); "
                           "chmod 600 it" % (config.path, mode & 0o777))
        except OSError:
            pass
    if host not in ("localhost", "::1") and not host.startswith("127."):
        out.append("listening on %s without TLS: keys cross the network in "
                   "clear; listen on 127.0.0.1 or put a TLS proxy in front"
                   % host)
    return out


# Keys and quotas #############################################################

class Account:
    """One user's figures in the usage table."""
    __slots__ = ("window", "used", "reserved", "in_flight", "recent")

    def __init__(self, window):
        self.window = window
        self.used = 0
        self.reserved = 0
        self.in_flight = 0
        self.recent = collections.deque()


class Reservation:
    """Tokens held for one admitted request until it is settled."""
    __slots__ = ("name", "amount", "settled")

    def __init__(self, name, amount):
        self.name = name
        self.amount = amount
        self.settled = False


class Ledger:
    """The usage table: tokens used per user in the current window, tokens
    reserved by requests in flight, and the optional state file.

    Every method takes `lock`; none blocks while holding it.  Windows are
    aligned to the Unix epoch: [k*P, (k+1)*P)."""

    def __init__(self, period, state_path=None):
        self.period = period
        self.state_path = state_path
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.accounts = {}
        self.version = 0        # bumped by every charge
        self.saved_version = 0  # the version the state file holds
        self.stopping = False
        self.writer = None
        self.save_error = None   # why the last save failed, or None
        self.clock = time.time   # tests move time forward through this

    def window_of(self, now):
        return int(now) // self.period * self.period

    def _account(self, name, now):
        start = self.window_of(now)
        acct = self.accounts.get(name)
        if acct is None:
            acct = self.accounts[name] = Account(start)
        elif acct.window != start:
            acct.window, acct.used = start, 0
        return acct

    def admit(self, user, estimate, now=None):
        """Reserve `estimate` tokens for a request of `user`, or raise a
        429 Refusal saying why and when to retry."""
        now = self.clock() if now is None else now
        with self.lock:
            acct = self._account(user.name, now)
            reset = acct.window + self.period
            if user.max_parallel is not None \
                    and acct.in_flight >= user.max_parallel:
                raise Refusal(
                    "too_many_parallel_requests",
                    "You already have %d requests in flight, your limit; "
                    "retry when one finishes." % acct.in_flight,
                    PARALLEL_RETRY_AFTER_S)
            if user.rpm is not None:
                while acct.recent and acct.recent[0] <= now - RPM_WINDOW_S:
                    acct.recent.popleft()
                if len(acct.recent) >= user.rpm:
                    wait = acct.recent[0] + RPM_WINDOW_S - now
                    raise Refusal(
                        "rate_limit_exceeded",
                        "You have sent %d requests in the last minute, your "
                        "limit; retry in %d s." % (user.rpm, ceil_s(wait)),
                        ceil_s(wait))
            # usage only grows until the reset: what cannot fit now
            # beside the usage alone cannot fit before the reset
            if acct.used >= user.tokens or acct.used + estimate > user.tokens:
                raise Refusal("quota_exceeded", quota_message(
                    user, acct, estimate, reset, now), ceil_s(reset - now))
            if acct.used + acct.reserved + estimate > user.tokens:
                raise Refusal(
                    "quota_busy",
                    "Your other requests in flight hold the rest of your "
                    "token quota; retry in a moment.", BUSY_RETRY_AFTER_S)
            acct.reserved += estimate
            acct.in_flight += 1
            if user.rpm is not None:
                acct.recent.append(now)
            return Reservation(user.name, estimate)

    def check(self, user, now=None):
        """Raise the quota 429 if `user` has nothing left; reserves
        nothing.  Used before a body is read."""
        now = self.clock() if now is None else now
        with self.lock:
            acct = self._account(user.name, now)
            if acct.used >= user.tokens:
                reset = acct.window + self.period
                raise Refusal("quota_exceeded", quota_message(
                    user, acct, 0, reset, now), ceil_s(reset - now))

    def settle(self, reservation, tokens, now=None):
        """Release a reservation and charge `tokens` instead, once.  Returns
        the ledger version a state-file save must reach to hold it."""
        now = self.clock() if now is None else now
        with self.lock:
            if reservation.settled:
                return self.version
            reservation.settled = True
            acct = self._account(reservation.name, now)
            acct.reserved -= reservation.amount
            acct.in_flight -= 1
            if tokens:
                acct.used += tokens
                self.version += 1
                self.changed.notify_all()
            return self.version

    def remaining(self, user, now=None):
        """(limit, remaining, reset time text) of a user, for headers."""
        now = self.clock() if now is None else now
        with self.lock:
            acct = self._account(user.name, now)
            used, reset = acct.used, acct.window + self.period
        return user.tokens, max(0, user.tokens - used), iso_time(reset)

    def figures(self, user, now=None):
        """A user's usage as the /llmgate/usage document."""
        now = self.clock() if now is None else now
        with self.lock:
            acct = self._account(user.name, now)
            used, reserved, window = acct.used, acct.reserved, acct.window
        return {"user": user.name, "limit": user.tokens, "used": used,
                "remaining": max(0, user.tokens - used),
                "reserved": reserved, "window_seconds": self.period,
                "resets_at": iso_time(window + self.period)}

    # the state file

    def load(self):
        """Read the state file, if there is one.  A missing file starts
        empty; a corrupt or unreadable one raises ConfigError."""
        if not self.state_path:
            return
        try:
            with open(self.state_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ConfigError("cannot read state file %s: %s"
                              % (self.state_path, exc.strerror))
        users = parse_state(raw, self.state_path)
        with self.lock:
            for name, (window, used) in users.items():
                acct = Account(window)
                acct.used = used
                self.accounts[name] = acct

    def check_folder(self):
        """Raise ConfigError unless the state file's folder can be written:
        every save would fail.  For a server, not for a reader."""
        if not self.state_path:
            return
        folder = os.path.dirname(os.path.abspath(self.state_path))
        if not os.path.isdir(folder):
            raise ConfigError("the folder of state file %s does not exist"
                              % self.state_path)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError("the folder of state file %s is not "
                              "writable" % self.state_path)

    def snapshot(self):
        """The state file's document, as bytes.  Takes the lock."""
        with self.lock:
            users = {name: {"window_start": a.window, "used": a.used}
                     for name, a in self.accounts.items() if a.used}
            version = self.version
        doc = {"format": STATE_FORMAT, "saved_at": iso_time(time.time()),
               "window_seconds": self.period, "users": users}
        return version, (json.dumps(doc, indent=1, sort_keys=True) + "\n"
                         ).encode()

    def save(self):
        """Write the state file atomically: a temporary file in the same
        folder, fsync, rename.  A crash leaves the old file or the new."""
        version, data = self.snapshot()
        folder = os.path.dirname(os.path.abspath(self.state_path))
        fd, tmp = tempfile.mkstemp(prefix=".llmgate-state-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        with self.lock:
            self.saved_version = max(self.saved_version, version)
            self.changed.notify_all()

    def start_writer(self):
        if self.state_path and self.writer is None:
            self.writer = threading.Thread(target=self._write_loop,
                                           name="state-writer", daemon=True)
            self.writer.start()

    def _write_loop(self):
        """Save whenever a charge is newer than the file.  Saves coalesce:
        one write holds every charge made while the previous one ran."""
        while True:
            with self.lock:
                while self.version == self.saved_version \
                        and not self.stopping:
                    self.changed.wait()
                if self.stopping and self.version == self.saved_version:
                    return
            try:
                self.save()
            except OSError as exc:
                self.save_error = exc.strerror or str(exc)
                if self.stopping:
                    return   # stop() reports it
                log("error: cannot save state file %s: %s; retrying in "
                    "%g s" % (self.state_path, self.save_error,
                              STATE_RETRY_S))
                retry = time.monotonic() + STATE_RETRY_S
                with self.lock:   # charges notify; they do not hurry this
                    while not self.stopping:
                        left = retry - time.monotonic()
                        if left <= 0:
                            break
                        self.changed.wait(left)
            else:
                self.save_error = None

    def wait_saved(self, version, timeout=STATE_SYNC_TIMEOUT_S):
        """Block until the state file holds `version`, at most `timeout`
        seconds.  Returns at once without a state file."""
        if not self.state_path or self.writer is None:
            return True
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.saved_version < version:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
        return True

    def stop(self):
        """Have the writer make its final save and wait for it, at most
        STATE_SYNC_TIMEOUT_S.  Returns why the usage could not be saved,
        or None."""
        with self.lock:
            self.stopping = True
            self.changed.notify_all()
        if self.writer is None:
            return None
        self.writer.join(STATE_SYNC_TIMEOUT_S)
        if self.writer.is_alive():
            return "the last save did not finish within %g s" % \
                STATE_SYNC_TIMEOUT_S
        return self.save_error


def parse_state(raw, path):
    """{name: (window_start, used)} from a state file's bytes."""
    def bad(why):
        return ConfigError("state file %s is corrupt (%s); fix or move it "
                           "away, llmgate will not reset usage silently"
                           % (path, why))
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise bad("not JSON")
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise bad("format is not %s" % STATE_FORMAT)
    users = doc.get("users")
    if not isinstance(users, dict):
        raise bad("users is not an object")
    out = {}
    for name, entry in users.items():
        if not isinstance(entry, dict):
            raise bad("users.%s is not an object" % name)
        window, used = entry.get("window_start"), entry.get("used")
        for value in (window, used):
            if isinstance(value, bool) or not isinstance(value, int) \
                    or value < 0:
                raise bad("users.%s has a bad number" % name)
        out[name] = (window, used)
    return out


def quota_message(user, acct, estimate, reset, now):
    left = max(0, user.tokens - acct.used)
    text = ("You have used %d of your %d-token quota for this %d-second "
            "window." % (acct.used, user.tokens, acct_period(reset, acct)))
    if left and estimate > left:
        text += (" This request needs an estimated %d tokens (its input "
                 "plus its output cap) and %d remain; ask for fewer output "
                 "tokens." % (estimate, left))
    return text + " Your quota resets at %s, in %d s." % (
        iso_time(reset), ceil_s(reset - now))


def acct_period(reset, acct):
    return reset - acct.window


def ceil_s(seconds):
    return max(1, int(math.ceil(seconds)))


# Estimates and request rewriting #############################################

def text_chars(doc):
    """Characters of text in a JSON request, for the input estimate.
    Inline media (data: URLs, base64 sources) is not text and is skipped.
    Iterative, so a deep document cannot exhaust the stack."""
    total = 0
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if not node.startswith("data:"):
                total += len(node)
        elif isinstance(node, dict):
            base64 = node.get("type") == "base64"
            for key, value in node.items():
                if base64 and key == "data":
                    continue
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    return total


def tokens_for_chars(chars):
    return int(math.ceil(chars / float(CHARS_PER_TOKEN)))


def output_cap(doc):
    """The output limit a request asks for, or None.  When it names
    several, the largest: which one a provider reads varies."""
    cap = None
    for field in OUTPUT_FIELDS:
        value = doc.get(field)
        if isinstance(value, int) and not isinstance(value, bool) \
                and value >= 0 and (cap is None or value > cap):
            cap = value
    return cap


def estimate(doc, path, config):
    """(input estimate, reservation) for a request, in tokens.  See README
    "Estimates"."""
    if path.endswith(FREE_SUFFIXES):
        return 0, 0
    if doc is None:
        return 0, config.reserve_output if is_generation(path) else 0
    tokens_in = tokens_for_chars(text_chars(doc))
    if path.endswith("/embeddings") or not is_generation(path):
        return tokens_in, tokens_in
    cap = output_cap(doc)
    out = config.reserve_output if cap is None else cap
    # legacy completions generate best_of candidates, n of them shown
    copies = 1
    for key in ("n", "best_of"):
        value = doc.get(key)
        if type(value) is int and value > copies:   # a bool is no count
            copies = value
    return tokens_in, tokens_in + out * copies


def is_generation(path):
    return path.endswith(GENERATION_SUFFIXES)


def cap_output(doc, path, family, limit):
    """Cap or insert the output limit of a request at `limit`, in the field
    its API reads.  Returns True when `doc` was changed."""
    if path.endswith("/responses"):
        fields, insert = ("max_output_tokens",), "max_output_tokens"
    elif family == "anthropic" and path.endswith("/messages"):
        fields, insert = ("max_tokens",), "max_tokens"
    elif path.endswith("/chat/completions"):
        fields = ("max_completion_tokens", "max_tokens")
        insert = "max_completion_tokens"
    elif path.endswith("/completions"):
        fields, insert = ("max_tokens",), "max_tokens"
    else:
        return False
    changed, present = False, False
    for field in fields:
        value = doc.get(field)
        if isinstance(value, int) and not isinstance(value, bool):
            present = True
            if value > limit:
                doc[field] = limit
                changed = True
    if not present:
        doc[insert] = limit
        changed = True
    return changed


def ask_for_usage(doc, path):
    """Make a streamed (chat) completion report its usage.  Returns True
    when the client had not asked, so the usage chunk must be hidden."""
    if doc.get("stream") is not True or not (
            path.endswith("/chat/completions") or
            path.endswith("/completions")):
        return False
    options = doc.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    options = dict(options) if isinstance(options, dict) else {}
    options["include_usage"] = True
    doc["stream_options"] = options
    return True


def request_model(doc, body, content_type, path):
    """The model a request names: the JSON `model`, a multipart `model`
    field, or else an Azure deployment in the path."""
    if doc is not None:
        model = doc.get("model")
        if isinstance(model, str):
            return model
    elif content_type.lower().startswith("multipart/form-data"):
        model = multipart_field(body, content_type, b"model")
        if model is not None:
            return model
    match = DEPLOYMENT_RE.match(path)
    return urllib.parse.unquote(match.group(1)) if match else None


def multipart_field(body, content_type, name):
    """The text of the form field `name` in a multipart/form-data body
    (RFC 7578), or None.  Walks the parts by their boundary and reads only
    each part's head, so it runs in time linear in the body.  A field given
    twice is a 400 (llmgate and the provider could read different ones),
    and so is a part whose head cannot be read, a boundary found anywhere
    but as a delimiter, or a form of more than MAX_FORM_PARTS parts."""
    unsafe = Refusal("invalid_request", "The form's Content-Type cannot "
                     "be read safely.")
    try:
        params = header_params(content_type)
    except ValueError:
        raise unsafe
    boundaries = [v for k, v in params if k == "boundary"]
    if len(boundaries) > 1 or any(k.startswith("boundary*")
                                  for k, _ in params):
        raise unsafe   # which one a provider takes is anyone's guess
    if not boundaries or not boundaries[0]:
        return None
    delimiter = b"\r\n--" + boundaries[0].encode("latin-1", "replace")
    # the first delimiter may open the body, without the CRLF before it
    if body.startswith(delimiter[2:]):
        pos, start = 0, len(delimiter) - 2
    else:
        pos = body.find(delimiter)
        start = pos + len(delimiter)
    delimiters = 1 if pos >= 0 else 0
    found = None
    parts = 0
    while pos >= 0 and body[start:start + 2] != b"--":
        parts += 1
        if parts > MAX_FORM_PARTS:
            raise Refusal("invalid_request", "The form has more than %d "
                          "parts." % MAX_FORM_PARTS)
        nxt = body.find(delimiter, start)
        delimiters += nxt >= 0
        end = len(body) if nxt < 0 else nxt
        head_end = body.find(b"\r\n\r\n", start,
                             min(end, start + MAX_HEADER_BYTES))
        if head_end < 0:
            # a part llmgate cannot read could hold a field it missed
            raise Refusal("invalid_request", "A part of the form has no "
                          "head llmgate can read (at most %d bytes, ended "
                          "by an empty line)." % MAX_HEADER_BYTES)
        if part_name(body[start:head_end]) == name:
            if found is not None:
                raise Refusal("invalid_request", "The form names its %s "
                              "more than once." % name.decode())
            found = body[head_end + 4:end]
        pos = nxt
        start = nxt + len(delimiter)
    if body.count(delimiter[2:]) != delimiters:
        # "--boundary" after a bare LF, say, where a laxer parser upstream
        # could see a part, and a field, that llmgate did not
        raise Refusal("invalid_request", "The form's boundary appears "
                      "where it does not delimit a part.")
    if found is None:
        return None
    return found.decode("utf-8", "replace").strip() or None


def part_name(head):
    """The `name` of a form part's Content-Disposition, as bytes.  Raises
    a 400 for a head that parsers could read differently: two
    Content-Disposition lines or `name`s, a `name*`, bad quoting."""
    unsafe = Refusal("invalid_request", "A part of the form has a "
                     "Content-Disposition llmgate cannot read safely.")
    names = None
    for line in head.decode("latin-1").split("\r\n"):
        field, _, value = line.partition(":")
        if field.strip().lower() != "content-disposition":
            continue
        if names is not None:
            raise unsafe
        try:
            params = header_params(value)
        except ValueError:
            raise unsafe
        names = [v for k, v in params if k == "name"]
        if len(names) > 1 or any(k.startswith("name*") for k, _ in params):
            raise unsafe
    if not names or names[0] is None:
        return None
    return names[0].encode("latin-1")


def header_params(value):
    """The parameters of a header value such as `form-data; name="a;b"`
    as (lower-case key, value or None) pairs, quoted strings read as
    RFC 9110 section 5.6.4 has them.  Raises ValueError where it cannot
    be read."""
    params = []
    i, n = value.find(";"), len(value)
    while 0 <= i < n:   # at a ';'
        j = i + 1
        while j < n and value[j] not in "=;":
            j += 1
        key = value[i + 1:j].strip().lower()
        text = None
        if j < n and value[j] == "=":
            j += 1
            while j < n and value[j] in " \t":
                j += 1
            if j < n and value[j] == '"':
                out = []
                j += 1
                while j < n and value[j] != '"':
                    if value[j] == "\\":
                        j += 1
                    out.append(value[j:j + 1])
                    j += 1
                if j >= n:
                    raise ValueError("a quoted string does not end")
                text = "".join(out)
                j += 1
                while j < n and value[j] in " \t":
                    j += 1
                if j < n and value[j] != ";":
                    raise ValueError("text after a quoted string")
            else:
                k = value.find(";", j)
                k = n if k < 0 else k
                text = value[j:k].strip()
                j = k
        if key:
            params.append((key, text))
        i = j
    return params


def encode_json(doc):
    """A rewritten request body: UTF-8 as clients send it, or ASCII
    escapes when the text holds a lone surrogate ("\\ud800" is valid
    JSON but not encodable UTF-8)."""
    try:
        return json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(doc).encode("ascii")


def api_path(path):
    """A path as a provider's router sees it, for deciding what a request
    is (a generation, a stream to meter, a free count): percent-escapes
    decoded, repeated and trailing slashes dropped.  The path forwarded
    stays the client's."""
    if "%" in path or "//" in path:
        path = MULTI_SLASH_RE.sub("/", urllib.parse.unquote(path))
    return path.rstrip("/") or "/"


def has_dot_segment(path):
    """True for a path with . or .. segments, plain or percent-encoded
    (also behind an encoded slash or backslash)."""
    if "." not in path and "%" not in path:
        return False   # nothing a dot could be decoded from
    decoded = urllib.parse.unquote(urllib.parse.unquote(path))
    for segment in re.split(r"[/\\]", decoded):
        if segment in (".", ".."):
            return True
    return False


# Upstream connections ########################################################

_ssl_context = None
_ssl_lock = threading.Lock()


def ssl_context():
    """The one verifying TLS context, made on first use."""
    global _ssl_context
    with _ssl_lock:
        if _ssl_context is None:
            _ssl_context = ssl.create_default_context()
        return _ssl_context


class UpstreamError(Exception):
    """A provider could not be reached or answered too slowly; `code` is
    an ERRORS key."""

    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code


class Headers:
    """A response's headers: the (name, value) pairs in order, looked up
    without regard to case.  Stands in for the email.message.Message that
    http.client builds, offering what HTTPResponse uses of it."""

    def __init__(self, pairs):
        self.pairs = pairs
        self.by_name = {}
        for name, value in pairs:
            self.by_name.setdefault(name.lower(), []).append(value)

    def get(self, name, default=None):
        values = self.by_name.get(name.lower())
        return values[0] if values else default

    def get_all(self, name, default=None):
        values = self.by_name.get(name.lower())
        return list(values) if values else default

    def items(self):
        return list(self.pairs)

    def __contains__(self, name):
        return name.lower() in self.by_name


def read_answer(sock, method):
    """Read a provider's answer head off `sock` with llmgate's own bounded
    parser, skipping any 1xx.  A plain answer whose whole body came with
    the head, as most do in one read, is returned as an Answer; any other
    (chunked, streamed, larger) as an UpstreamResponse, whose body
    http.client reads from what is left.  http.client's own head parser
    runs every header block through the email package, which costs more
    than all the rest the gateway does to a request.  Raises OSError or
    http.client.HTTPException."""
    buf = bytearray()
    interim = 0   # bytes of 1xx heads: bounded like one head
    while True:
        head = read_head(sock, buf)
        interim += len(head)
        if interim > MAX_HEADER_BYTES:
            raise http.client.LineTooLong("1xx answer heads")
        version, status, reason, pairs = parse_answer_head(head)
        if status == http.client.SWITCHING_PROTOCOLS:
            raise http.client.HTTPException("the provider switched "
                                            "protocols")
        if not 100 <= status < 200:
            break   # 100 Continue, 103 Early Hints: not the answer
    headers = Headers(pairs)
    te = headers.get("transfer-encoding")
    chunked = bool(te and te.lower() == "chunked")
    version = 10 if version in ("HTTP/1.0", "HTTP/0.9") else 11
    connection = (headers.get("connection") or "").lower()
    if version == 11:
        will_close = "close" in connection
    else:   # HTTP/1.0 closes unless it says otherwise, as http.client reads
        will_close = not (headers.get("keep-alive") or "keep-alive" in
                          connection or "keep-alive" in (headers.get(
                              "proxy-connection") or "").lower())
    length = None
    declared = headers.get("content-length")
    if declared and not chunked and DIGITS_RE.match(declared):
        length = int(declared)
    if status in (204, 304) or method == "HEAD":
        length = 0
    if not chunked and length is None:
        will_close = True   # the body ends where the connection does
    if length is not None and len(buf) >= length:
        # more than declared is nobody's answer: the connection goes
        return Answer(status, reason, headers, bytes(buf[:length]),
                      will_close or len(buf) > length)
    resp = UpstreamResponse(FileOf(io.BufferedReader(Leftover(sock, buf))),
                            method=method)
    resp.code = resp.status = status
    resp.reason = reason
    resp.version = version
    resp.headers = resp.msg = headers
    resp.chunked = chunked
    resp.chunk_left = None
    resp.length = length
    resp.will_close = will_close
    return resp


class UpstreamResponse(http.client.HTTPResponse):
    """An answer whose body http.client reads; its head was read by
    read_answer, so begin() has nothing left to do."""

    def begin(self):
        pass


class FileOf:
    """Stands in for the socket HTTPResponse asks for a file object."""

    def __init__(self, fp):
        self.fp = fp

    def makefile(self, mode):
        return self.fp


class Answer:
    """A plain answer that came whole with its head: what the relays use of
    an HTTPResponse, with no file object behind it."""

    chunked = False

    def __init__(self, status, reason, headers, body, will_close):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.held = body
        self.length = len(body)   # what is left to read, as http.client's
        self.will_close = will_close

    def read(self, amt=None):
        if self.held is None:
            return b""
        if amt is None or amt >= len(self.held):
            data, self.held = self.held, None
        else:
            data, self.held = self.held[:amt], self.held[amt:]
        self.length -= len(data)
        return data

    def read1(self, n=-1):
        return self.read(None if n is None or n < 0 else n)

    def isclosed(self):
        return self.held is None

    def close(self):
        self.held = None


def read_head(sock, buf):
    """The next head in `buf`, receiving until it is whole; what follows it
    stays in `buf`.  Bounded by MAX_HEADER_BYTES in all."""
    while True:
        end = head_end(buf)
        if end > MAX_HEADER_BYTES or (end < 0 and
                                      len(buf) > MAX_HEADER_BYTES):
            raise http.client.LineTooLong("answer head")
        if end >= 0:
            head = bytes(buf[:end])
            del buf[:end]
            return head
        data = sock.recv(RECV_BYTES)
        if not data:
            if buf:
                raise http.client.IncompleteRead(bytes(buf))
            raise http.client.RemoteDisconnected("no answer")
        buf += data


class Leftover(io.RawIOBase):
    """The socket under an answer's body, behind the bytes of it that were
    received with the head."""

    def __init__(self, sock, buf):
        self.sock = sock
        self.buf = buf

    def readable(self):
        return True

    def readinto(self, b):
        if self.buf:
            n = min(len(b), len(self.buf))
            b[:n] = self.buf[:n]
            del self.buf[:n]
            return n
        return self.sock.recv_into(b)


def head_end(buf):
    """Where the head at the start of `buf` ends (after its empty line),
    or -1.  As http.client reads heads, a line ends with LF, CR before it
    or not."""
    ends = [i + n for i, n in ((buf.find(b"\n\r\n"), 3),
                               (buf.find(b"\n\n"), 2)) if i >= 0]
    return min(ends) if ends else -1


def parse_answer_head(head):
    """(version, status, reason, header pairs) of a provider's answer
    head, as bytes ending in its empty line; at most MAX_HEADER_COUNT
    headers.  Raises http.client.HTTPException."""
    lines = head.decode("latin-1").split("\n")
    status_line = lines[0].rstrip("\r")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.strip().partition(" ")
    if not version.startswith("HTTP/") or not THREE_DIGITS_RE.match(code):
        raise http.client.BadStatusLine(status_line[:100])
    pairs = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            continue   # the empty lines at the end, or no header at all
        if len(pairs) >= MAX_HEADER_COUNT:
            raise http.client.HTTPException("too many headers")
        pairs.append((name.strip(), value.strip()))
    return version, int(code), reason.strip(), pairs


class ConnectionPool:
    """Kept-alive connections to one provider, newest first.  `lock`
    guards `idle`; no I/O happens under it."""

    def __init__(self, provider):
        self.provider = provider
        self.lock = threading.Lock()
        self.idle = []
        self.closed = False

    def acquire(self):
        """(connection, reused).  A pooled connection the provider has
        closed is thrown away; a new one is connected (UpstreamError)."""
        now = time.monotonic()
        while True:
            with self.lock:
                if not self.idle:
                    break
                conn, since = self.idle.pop()
            if now - since < POOL_IDLE_TIMEOUT_S and conn.sock is not None:
                # an idle connection has nothing to say: readable, it was
                # closed by the provider, or holds bytes nobody asked for
                # that would pass for the next answer
                try:
                    readable = select.select([conn.sock], [], [], 0)[0]
                except (OSError, ValueError):
                    readable = True
                if not readable:
                    return conn, True
            conn.close()
        return self.connect(), False

    def connect(self):
        p = self.provider
        if p.scheme == "https":
            conn = http.client.HTTPSConnection(
                p.host, p.port, timeout=CONNECT_TIMEOUT_S,
                context=ssl_context())
        else:
            conn = http.client.HTTPConnection(
                p.host, p.port, timeout=CONNECT_TIMEOUT_S)
        try:
            conn.connect()
        except socket.timeout:
            conn.close()
            raise UpstreamError("upstream_timeout",
                                "The provider did not accept a connection "
                                "within %d s." % CONNECT_TIMEOUT_S)
        except ssl.SSLError as exc:
            conn.close()
            raise UpstreamError("upstream_unreachable",
                                "TLS with the provider failed (%s)."
                                % exc.__class__.__name__)
        except OSError as exc:
            conn.close()
            raise UpstreamError("upstream_unreachable",
                                "The provider cannot be reached (%s)."
                                % (exc.strerror or exc.__class__.__name__))
        conn.sock.settimeout(p.timeout)
        return conn

    def release(self, conn):
        """Keep a connection whose answer was read to the end."""
        with self.lock:
            if not self.closed and len(self.idle) < POOL_IDLE_MAX:
                self.idle.append((conn, time.monotonic()))
                return
        conn.close()

    def close(self):
        with self.lock:
            self.closed = True
            idle, self.idle = self.idle, []
        for conn, _ in idle:
            conn.close()


# Streaming and usage #########################################################

class EventSplitter:
    """Cuts a byte stream into whole server-sent events, each with its
    blank line.  A line may end in CRLF, LF or CR alone (the SSE spec).
    A read that ends between the CR and LF of an event's last CRLF hands
    that LF on with the next event, where it is an empty line that
    clients skip.  Each byte is searched once, however an event is cut
    into reads.  Holds at most MAX_EVENT_BYTES of an unfinished event;
    past that the bytes are handed on whole, unparsed."""

    def __init__(self):
        self.pending = bytearray()

    def feed(self, data):
        pending = self.pending
        if pending:
            # an event's end is at most 4 bytes: search from just before
            # the bytes that are new
            pos = max(0, len(pending) - 3)
            pending += data
            buf = pending
        else:
            pos, buf = 0, data   # the common case: no copy
        events = []
        start = 0
        plain = b"\r" not in buf   # LF alone, as most providers send
        while True:
            if plain:
                end = buf.find(b"\n\n", pos)
                if end < 0:
                    break
                end += 2
            else:
                match = EVENT_END_RE.search(buf, pos)
                if match is None:
                    break
                end = match.end()
            events.append(bytes(buf[start:end]))
            start = pos = end
        if buf is pending:
            del pending[:start]
        else:
            pending += buf[start:]
        if len(pending) > MAX_EVENT_BYTES:
            events.append(bytes(pending))
            del pending[:]
        return events

    def flush(self):
        rest = bytes(self.pending)
        del self.pending[:]
        return rest


class Meter:
    """Reads the usage a provider reports, from a JSON answer or stream
    events, and counts the streamed output text for estimates.

    Usage fields merge: the latest value of each wins, so Anthropic's
    running output total and OpenAI's single usage chunk both come out
    right."""

    def __init__(self, hide_usage_chunk=False):
        self.hide_usage_chunk = hide_usage_chunk
        self.fields = {}
        self.output_chars = 0
        self.error_event = False

    def take_usage(self, usage):
        for key, value in usage.items():
            if isinstance(value, int) and not isinstance(value, bool) \
                    and value >= 0:
                self.fields[key] = value

    def reported(self):
        return bool(self.fields)

    def tokens(self):
        """(input, output) tokens reported.  Anthropic's cache figures are
        not part of its input_tokens, so they are added; OpenAI-style
        usage (LiteLLM's, say) that has them too counts them already in
        its prompt_tokens."""
        f = self.fields
        if "prompt_tokens" in f:
            tokens_in = f["prompt_tokens"]
        else:
            tokens_in = f.get("input_tokens", 0) + \
                f.get("cache_creation_input_tokens", 0) + \
                f.get("cache_read_input_tokens", 0)
        tokens_out = f.get("completion_tokens", f.get("output_tokens", 0))
        total = f.get("total_tokens", 0)
        if not tokens_out and total > tokens_in:
            tokens_out = total - tokens_in
        return tokens_in, tokens_out

    def has_input(self):
        return any(k in self.fields for k in ("prompt_tokens",
                                              "input_tokens"))

    def answer(self, body):
        """Read usage from a whole JSON answer; ignore anything else."""
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return
        if isinstance(doc, dict):
            usage = find_usage(doc)
            if usage is not None:
                self.take_usage(usage)

    def tail(self, tail):
        """Read usage from the end of an answer too large to keep whole:
        the last `"usage":` object in it."""
        at = tail.rfind(b'"usage"')
        if at < 0:
            return
        brace = tail.find(b"{", at)
        if brace < 0:
            return
        try:
            usage, _ = json.JSONDecoder().raw_decode(
                tail[brace:].decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            return
        if isinstance(usage, dict):
            self.take_usage(usage)

    def event(self, raw):
        """Look at one SSE event; return False if it must not reach the
        client (the usage chunk a client did not ask for)."""
        name, data = None, []
        for line in raw.splitlines():
            if line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
            elif line.startswith(b"event:"):
                name = line[6:].strip()
        if not data:
            return True
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        if payload == b"[DONE]":
            return True
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return True
        if not isinstance(doc, dict):
            return True
        self.output_chars += delta_chars(doc)
        if name == b"error" or doc.get("type") == "error" or (
                name is None and "error" in doc and "choices" not in doc):
            self.error_event = True
        usage = find_usage(doc)
        if usage is not None:
            self.take_usage(usage)
            if self.hide_usage_chunk and doc.get("choices") == []:
                return False
        return True


def find_usage(doc):
    """The usage object of an answer or event: top-level (chat, embeddings,
    Anthropic message_delta), under `response` (Responses API events) or
    under `message` (Anthropic message_start)."""
    usage = doc.get("usage")
    if isinstance(usage, dict):
        return usage
    for key in ("response", "message"):
        inner = doc.get(key)
        if isinstance(inner, dict):
            usage = inner.get("usage")
            if isinstance(usage, dict):
                return usage
    return None


def delta_chars(doc):
    """Characters of generated text in one stream event, of any API."""
    delta = doc.get("delta")
    if isinstance(delta, str):
        return len(delta)
    total = 0
    if isinstance(delta, dict):
        total += sum(len(v) for k, v in delta.items()
                     if isinstance(v, str) and k != "type")
    choices = doc.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if isinstance(choice.get("text"), str):   # legacy completions
                total += len(choice["text"])
            d = choice.get("delta")
            if not isinstance(d, dict):
                continue
            total += sum(len(v) for k, v in d.items()
                         if isinstance(v, str) and k != "role")
            calls = d.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(
                        fn.get("arguments"), str):
                    total += len(fn["arguments"])
    return total


GZIP_MAGIC = b"\x1f\x8b"


def decoder_for(encoding):
    """An Inflater for a Content-Encoding, None for identity, or False for
    one the standard library cannot read."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return Inflater(encoding != "deflate")
    return False


class Inflater:
    """Inflates a gzip or deflate body fed in pieces, like a zlib
    decompressobj, and also as clients read what zlib alone does not: a
    gzip body of several members one after another (each event
    compressed on its own), and "deflate" sent raw, without the zlib
    wrapper RFC 9110 asks for.  Raises zlib.error on bytes it cannot
    read."""

    def __init__(self, gzip):
        self.gzip = gzip
        self.obj = None
        self.start = b""   # bytes held until the wrapper or magic shows
        self.members = 0
        self.done = False  # what follows the last member is not one

    def decompress(self, data, limit):
        """What `data` inflates to, at most `limit` bytes; the rest of an
        answer that inflates to more is dropped."""
        out = []
        while data and limit > 0 and not self.done:
            if self.obj is None:
                data = self.start + data
                if len(data) < 2:
                    self.start = data
                    break
                self.start = b""
                if self.gzip:
                    if self.members and not data.startswith(GZIP_MAGIC):
                        self.done = True   # padding, say: gzip skips it
                        break
                    wbits = 16 + zlib.MAX_WBITS
                else:
                    cmf, flg = data[0], data[1]
                    wrapped = cmf & 0x0F == 8 and cmf >> 4 <= 7 and \
                        (cmf * 256 + flg) % 31 == 0
                    wbits = zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS
                self.obj = zlib.decompressobj(wbits)
            piece = self.obj.decompress(data, limit)
            out.append(piece)
            limit -= len(piece)
            data = b""
            if self.obj.eof and self.gzip:
                data = self.obj.unused_data   # the next member, if any
                self.obj = None
                self.members += 1
        return b"".join(out)


def inflate(data, encoding):
    """A compressed answer inflated for billing, at most MAX_DECODED_BYTES,
    or None when it cannot be read."""
    decoder = decoder_for(encoding)
    if decoder is None:
        return data
    if decoder is False:
        return None
    try:
        return decoder.decompress(data, MAX_DECODED_BYTES)
    except zlib.error:
        return None


def stream_error_event(kind, message):
    """An error event in the stream format of `kind`, to end a stream the
    provider broke off."""
    if kind == "anthropic":
        doc = {"type": "error",
               "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(doc).encode() + b"\n\n"
    if kind == "responses":
        doc = {"type": "error", "code": "upstream_stream_broken",
               "message": message, "param": None}
        return b"event: error\ndata: " + json.dumps(doc).encode() + b"\n\n"
    doc = {"error": {"message": message, "type": "api_error", "param": None,
                     "code": "upstream_stream_broken"}}
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


# Disconnect watcher ##########################################################

WATCH_EVENTS = getattr(select, "EPOLLRDHUP", 0) | getattr(
    select, "EPOLLONESHOT", 0)


class DisconnectWatcher:
    """One thread that notices clients hanging up while their request waits
    on the provider, so the provider connection is closed at once and no
    more tokens are spent.

    Handlers register a client socket with a callback; the callback runs
    on this thread, once, when the client's side of the connection closes.
    XXX: Linux only (epoll with EPOLLRDHUP); elsewhere a client that hangs
    up is noticed at the next write to it."""

    def __init__(self):
        self.epoll = None
        if hasattr(select, "epoll") and hasattr(select, "EPOLLRDHUP") \
                and hasattr(select, "POLLRDHUP"):
            self.epoll = select.epoll()
        self.lock = threading.Lock()
        self.callbacks = {}   # fd -> (client socket, callback)
        self.running = self.epoll is not None
        if self.running:
            threading.Thread(target=self._run, name="disconnect-watcher",
                             daemon=True).start()

    def watch(self, sock, callback):
        if not self.running:
            return
        fd = sock.fileno()
        with self.lock:
            self.callbacks[fd] = (sock, callback)
            try:
                self.epoll.register(fd, WATCH_EVENTS)
            except OSError:
                self.callbacks.pop(fd, None)

    def unwatch(self, sock):
        """Stop watching; safe to call twice, and after close().  Call
        before closing the socket."""
        if self.epoll is None:
            return
        try:
            fd = sock.fileno()
        except OSError:
            return
        with self.lock:
            entry = self.callbacks.get(fd)
            if entry is not None and entry[0] is sock:
                del self.callbacks[fd]
                try:
                    self.epoll.unregister(fd)
                except OSError:
                    pass

    def _run(self):
        while self.running:
            try:
                events = self.epoll.poll(WATCH_POLL_S)
            except OSError:
                continue
            for fd, _ in events:
                callback = self._confirm(fd)
                if callback is not None:
                    callback()

    def _confirm(self, fd):
        """The callback to run if the connection now registered on `fd`
        really was shut by its client, else None.  An event can be stale:
        collected for a connection that has since closed, its fd already
        reused by the next one.  So the current owner is asked again,
        without waiting, whether its peer has shut its side (POLLRDHUP
        tells that apart from bytes merely waiting to be read)."""
        with self.lock:
            entry = self.callbacks.get(fd)
            if entry is None:
                return None
            sock, callback = entry
            probe = select.poll()
            try:
                probe.register(sock, select.POLLRDHUP)
            except (OSError, ValueError):   # closed meanwhile: forget it
                del self.callbacks[fd]
                return None
            if not probe.poll(0):
                try:   # alive: the event was stale; watch again
                    self.epoll.modify(fd, WATCH_EVENTS)
                except OSError:
                    pass
                return None
            del self.callbacks[fd]
            try:
                self.epoll.unregister(fd)
            except OSError:
                pass
            return callback

    def close(self):
        self.running = False


class Exchange:
    """What the handler knows of one proxied request, shared with the
    disconnect watcher under `lock`."""

    def __init__(self, user, family, provider, path, kind, method):
        self.user = user
        self.family = family
        self.provider = provider
        self.path = path               # as forwarded
        # `kind` is api_path(path): what the request is
        if family == "anthropic":
            self.kind = "anthropic"
        elif kind.endswith("/responses"):
            self.kind = "responses"
        else:
            self.kind = "chat"
        self.generation = is_generation(kind)
        # free only if free however the path is read: decoded
        # (/v1/chat/completions%2Fcount_tokens) it may be a count to
        # llmgate and a generation to a provider
        self.free = (kind.endswith(FREE_SUFFIXES) and path.rstrip(
            "/").endswith(FREE_SUFFIXES)) or method not in WRITE_METHODS
        self.meter = Meter()
        self.estimate_in = 0
        self.reservation = None
        self.sent = False
        self.conn = self.resp = None   # the provider connection, until
        #                                handed back to its pool
        self.lock = threading.Lock()
        self.upstream_sock = None
        self.detached = False
        self.client_gone = False

    def hang_up(self):
        """Watcher callback: the client left; stop the provider at once.
        Once detached, a hang-up is the next write's business."""
        with self.lock:
            if self.detached:
                return
            self.client_gone = True
            if self.upstream_sock is not None:
                try:
                    self.upstream_sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def attach(self, sock):
        with self.lock:
            self.upstream_sock = sock
            return not self.client_gone

    def detach(self):
        """After this the watcher leaves the provider socket alone.
        Returns False if the client had already gone."""
        with self.lock:
            self.detached = True
            return not self.client_gone


# The request handler #########################################################

class Handler(http.server.BaseHTTPRequestHandler):
    """One client connection: reads requests with its own bounded parser,
    answers llmgate's own paths, and proxies the rest.

    Contract of every `_answer*`/`_relay*` method: when it returns, the
    response has been written in full or the connection is marked to be
    closed."""

    protocol_version = "HTTP/1.1"
    server_version = "llmgate/" + __version__
    disable_nagle_algorithm = True

    def setup(self):
        http.server.BaseHTTPRequestHandler.setup(self)
        self.inbuf = bytearray()
        self.served = 0
        self.sock_timeout = None
        self.exchange = None   # the request now waiting on a provider
        self.client_closed = False   # the watcher saw the client shut
        # watched once per connection, not per request: two syscalls less
        self.server.gateway.watcher.watch(self.connection, self._hung_up)

    def finish(self):
        self.server.gateway.watcher.unwatch(self.connection)
        http.server.BaseHTTPRequestHandler.finish(self)

    def _hung_up(self):
        """Watcher callback: the client shut its connection.  Remembered,
        so a request whose body was still being read is not forwarded."""
        self.client_closed = True
        ex = self.exchange
        if ex is not None:
            ex.hang_up()

    def _set_timeout(self, seconds):
        """Give the client socket this timeout; every change is a syscall,
        so it is made only when the value differs."""
        if seconds != self.sock_timeout:
            self.connection.settimeout(seconds)
            self.sock_timeout = seconds

    # reading requests

    def handle_one_request(self):
        self.close_connection = True
        self.started = False
        self.status = None
        self.family = "openai"
        self.log_user = self.log_model = None
        self.tokens = None
        self.aborted = False
        self.first_byte = None
        self.t0 = None
        self.command = self.path = None
        self.quota_user = None    # whose quota headers the answer carries
        self.body_pending = False
        self.in_flight = False
        try:
            self._handle_one()
        finally:
            if self.in_flight:
                self.server.gateway.leave()

    def _arrived(self):
        """A request's first byte is here: from now until its log line is
        written it is in flight, and shutdown waits for it."""
        if not self.in_flight:
            self.in_flight = True
            self.server.gateway.enter()

    def _handle_one(self):
        refusal = None
        try:
            if not self._read_head():
                return
        except ClientGone:
            return
        except Refusal as exc:
            refusal = exc
        try:
            if refusal is not None:
                self._refuse(refusal)
                return
            self.served += 1
            self.close_connection = not self.keep_alive
            self._dispatch()
        except ClientGone:
            self.close_connection = True
            self.aborted = True
        except Refusal as exc:
            self._refuse(exc)
        except Exception:
            self.close_connection = True
            log("error: unexpected failure on %s %s:\n%s" % (
                clean_field(self.command),
                clean_field((self.path or "").split("?", 1)[0]),
                traceback.format_exc().rstrip()))
            if not self.started:
                self._refuse(Refusal("internal_error",
                                     "The gateway failed; the error is in "
                                     "its log.", close=True))
        finally:
            self._log_request()

    def _recv(self, deadline):
        """Receive into `inbuf` until `deadline`; False at end of stream."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            if self.sock_timeout is None or abs(
                    left - self.sock_timeout) > TIMEOUT_SLACK_S:
                self._set_timeout(left)
            try:
                data = self.connection.recv(RECV_BYTES)
                break
            except socket.timeout:
                continue   # the socket's timeout, not yet the deadline
            except OSError:
                raise ClientGone()
        if not data:
            return False
        self.inbuf += data
        return True

    def _read_head(self):
        """Read and parse one request head.  False when the connection is
        done (closed, idle too long, or a dribbler dropped)."""
        buf = self.inbuf
        while buf[:2] == b"\r\n":
            del buf[:2]
        try:
            if not buf:
                wait = CLIENT_IDLE_TIMEOUT_S if self.served else \
                    FIRST_BYTE_TIMEOUT_S
                if not self._recv(time.monotonic() + wait):
                    return False
                while buf[:2] == b"\r\n":
                    del buf[:2]
            self._arrived()
            deadline = time.monotonic() + HEADER_TIMEOUT_S
            while True:
                end = buf.find(b"\r\n\r\n")
                if end >= 0 and end <= MAX_HEADER_BYTES:
                    break
                if len(buf) > MAX_HEADER_BYTES:
                    self.t0 = time.monotonic()
                    self.family = self._route_family(buf)
                    line_end = buf.find(b"\r\n")
                    if line_end < 0 or line_end > MAX_REQUEST_LINE_BYTES:
                        raise Refusal("uri_too_long", "The request line is "
                                      "longer than %d bytes."
                                      % MAX_REQUEST_LINE_BYTES, close=True)
                    raise Refusal("headers_too_large", "The request headers "
                                  "are larger than %d bytes."
                                  % MAX_HEADER_BYTES, close=True)
                if not self._recv(deadline):
                    return False
        except socket.timeout:
            if buf:
                self.t0 = time.monotonic()
                self.close_connection = True
                self.family = self._route_family(buf)
                self._refuse(Refusal("request_timeout", "The request head "
                                     "did not arrive within %d s."
                                     % HEADER_TIMEOUT_S, close=True))
                self._log_request()
            return False
        head = bytes(buf[:end])
        del buf[:end + 4]
        self.t0 = time.monotonic()
        try:
            self._parse_head(head)
        except Refusal:
            self.family = self._route_family(head)
            raise
        return True

    def _route_family(self, head):
        """The API family ("openai" or "anthropic") of the route a request
        head names, read from its first line however malformed the rest,
        so that a refusal made while the head is parsed has the shape of
        the API the client called."""
        line = bytes(head[:MAX_REQUEST_LINE_BYTES]).split(b"\r\n", 1)[0]
        parts = line.decode("latin-1").split(" ")
        return self._target_family(parts[1]) if len(parts) > 1 else "openai"

    def _target_family(self, target):
        """The API family of the route a request target names."""
        path = target.partition("?")[0].partition("#")[0]
        if not path.startswith("/"):   # absolute-form: refused, but shaped
            try:
                path = urllib.parse.urlsplit(path).path
            except ValueError:
                return "openai"
        route = self.server.gateway.config.match(path)
        return "openai" if route is None else route[2]

    def _parse_head(self, head):
        """Fill command, path, request_version, header_list and `h`
        (lower-case name -> value), or raise a closing Refusal."""
        head = head.decode("latin-1")
        lines = head.split("\r\n")
        line = lines[0]
        if len(line) > MAX_REQUEST_LINE_BYTES:
            raise Refusal("uri_too_long", "The request line is longer than "
                          "%d bytes." % MAX_REQUEST_LINE_BYTES, close=True)
        parts = line.split(" ")
        if len(parts) != 3 or not TOKEN_RE.match(parts[0]):
            raise Refusal("invalid_request", "The request line is not "
                          "METHOD TARGET HTTP/1.1.", close=True)
        self.command, self.path, self.request_version = parts
        self.requestline = line
        if CONTROL_RE.search(self.path):
            raise Refusal("invalid_path", "The request target has control "
                          "characters.", close=True)
        if self.request_version not in ("HTTP/1.1", "HTTP/1.0"):
            if not self.request_version.startswith("HTTP/"):
                raise Refusal("invalid_request", "The request line is not "
                              "METHOD TARGET HTTP/1.1.", close=True)
            raise Refusal("version_not_supported", "Only HTTP/1.1 and "
                          "HTTP/1.0 are served.", close=True)
        if len(lines) - 1 > MAX_HEADER_COUNT:
            raise Refusal("headers_too_large", "More than %d request "
                          "headers." % MAX_HEADER_COUNT, close=True)
        header_list = []
        h = {}
        if len(lines) > 1 and not HEADER_LINES_RE.match(head, len(line) + 2):
            raise Refusal("invalid_request", "A request header is "
                          "malformed.", close=True)
        for raw in lines[1:]:
            name, _, value = raw.partition(":")
            value = value.strip(" \t")
            header_list.append((name, value))
            key = name.lower()
            if key in h:
                if key in ("content-length", "host", "authorization",
                           "x-api-key", "api-key"):
                    if h[key] != value:
                        raise Refusal("bad_framing", "Conflicting %s "
                                      "headers." % name, close=True)
                    continue
                h[key] = h[key] + ", " + value
            else:
                h[key] = value
        self.header_list = header_list
        self.h = h
        connection = h.get("connection", "").lower()
        if self.request_version == "HTTP/1.0":
            self.keep_alive = "keep-alive" in connection
        else:
            self.keep_alive = "close" not in connection

    def _body_length(self):
        """The declared body: ("length", n), ("chunked", None) or None.
        Raises a closing 400 for bad or conflicting framing."""
        te = self.h.get("transfer-encoding")
        cl = self.h.get("content-length")
        if te is not None:
            if cl is not None:
                raise Refusal("bad_framing", "Content-Length and "
                              "Transfer-Encoding together are refused.",
                              close=True)
            if te.strip().lower() != "chunked" \
                    or self.request_version == "HTTP/1.0":
                raise Refusal("bad_framing", "Only Transfer-Encoding: "
                              "chunked is accepted.", close=True)
            return "chunked", None
        if cl is not None:
            if not DIGITS_RE.match(cl):
                raise Refusal("bad_framing", "Content-Length is not a "
                              "number.", close=True)
            n = int(cl)
            return ("length", n) if n else None
        return None

    def _read_body(self, framing, limit):
        """The whole request body, within BODY_TIMEOUT_S and `limit`."""
        if framing is None:
            return b""
        self.body_pending = False   # from here on it is read or we close
        self.close_connection = True
        if "100-continue" in self.h.get("expect", "").lower() \
                and self.request_version == "HTTP/1.1":
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n", interim=True)
        deadline = time.monotonic() + BODY_TIMEOUT_S
        kind, length = framing
        try:
            if kind == "length":
                while len(self.inbuf) < length:
                    if not self._recv(deadline):
                        raise ClientGone()
                body = bytes(self.inbuf[:length])
                del self.inbuf[:length]
            else:
                body = self._read_chunked(deadline, limit)
            self.close_connection = not self.keep_alive
            return body
        except socket.timeout:
            raise Refusal("request_timeout", "The request body did not "
                          "arrive within %d s." % BODY_TIMEOUT_S, close=True)

    def _read_chunked(self, deadline, limit):
        """A chunked request body (RFC 9112 section 7.1), read strictly: a
        bare CR or LF in a size or trailer line is refused, since lenient
        parsing is what request smuggling behind a proxy feeds on."""
        buf = self.inbuf
        body = bytearray()
        pos = 0
        chunks = 0

        def line(limit, refusal):
            """The next CRLF-ended line; `refusal` past `limit` bytes."""
            nonlocal pos
            while True:
                end = buf.find(b"\r\n", pos)
                if end >= 0:
                    text = bytes(buf[pos:end])
                    pos = end + 2
                    if len(text) > limit:
                        raise refusal
                    return text
                if len(buf) - pos > limit:
                    raise refusal
                del buf[:pos]
                pos = 0
                if not self._recv(deadline):
                    raise ClientGone()

        long_size = Refusal("bad_framing", "A chunk-size line is too "
                            "long.", close=True)
        long_trailer = Refusal("headers_too_large", "The chunked trailers "
                               "are too large.", close=True)
        while True:
            size_line = line(MAX_CHUNK_LINE_BYTES, long_size)
            if not CHUNK_LINE_RE.match(size_line):
                raise Refusal("bad_framing", "A chunk-size line is "
                              "malformed.", close=True)
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                break
            chunks += 1
            if chunks > MAX_BODY_CHUNKS:
                raise Refusal("bad_framing", "The body comes in more than "
                              "%d chunks." % MAX_BODY_CHUNKS, close=True)
            if len(body) + size > limit:
                raise Refusal("body_too_large", "The request body is larger "
                              "than %d bytes." % limit, close=True)
            while len(buf) - pos < size + 2:
                del buf[:pos]
                pos = 0
                if not self._recv(deadline):
                    raise ClientGone()
            if buf[pos + size:pos + size + 2] != b"\r\n":
                raise Refusal("bad_framing", "A chunk does not end with "
                              "CRLF.", close=True)
            body += buf[pos:pos + size]
            pos += size + 2
        trailers = 0
        while True:   # the trailer section, checked and dropped
            trailer = line(MAX_HEADER_BYTES, long_trailer)
            if not trailer:
                del buf[:pos]
                return bytes(body)
            trailers += 1
            if trailers > MAX_HEADER_COUNT or \
                    not HEADER_LINES_RE.match(trailer.decode("latin-1")):
                raise Refusal("bad_framing", "A chunked trailer is "
                              "malformed.", close=True)

    # writing answers

    def _write(self, data, interim=False):
        """Send bytes to the client or raise ClientGone.  The first write
        of the answer itself, not an `interim` 100 Continue, is the time
        to first byte."""
        try:
            self._set_timeout(CLIENT_IDLE_TIMEOUT_S)
            self.connection.sendall(data)
        except OSError:
            raise ClientGone()
        if self.first_byte is None and not interim:
            self.first_byte = time.monotonic()

    def _head(self, status, headers):
        """A response head as bytes; marks the response as started."""
        self.started = True
        self.status = status
        lines = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "Unknown"))]
        lines.extend("%s: %s" % kv for kv in headers)
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _answer(self, status, body, content_type="application/json",
                headers=()):
        """Send a whole answer with a Content-Length."""
        head = list(headers)
        head.append(("Content-Type", content_type))
        head.append(("Content-Length", str(len(body))))
        data = self._head(status, head)
        if self.command != "HEAD":
            data += body
        self._write(data)

    def _answer_json(self, status, doc, headers=()):
        self._answer(status, json.dumps(doc).encode(), headers=headers)

    def _refuse(self, refusal):
        """Send a Refusal in the caller's API shape, or just close when a
        response is already under way."""
        if refusal.close or self.body_pending:
            self.close_connection = True
        if self.started:
            self.close_connection = True
            return
        status = ERRORS[refusal.code][0]
        headers = []
        if refusal.retry_after is not None:
            headers.append(("Retry-After", str(refusal.retry_after)))
        headers.extend(self._quota_headers())
        try:
            self._answer(status, error_body(self.family, refusal.code,
                                            refusal.message), headers=headers)
        except ClientGone:
            self.close_connection = True
            self.aborted = True

    def _log_request(self):
        """The one line per request: time, client, user, method, path,
        model, status, tokens in/out, total ms, ms to first byte."""
        now = time.monotonic()
        path = (self.path or "").split("?", 1)[0]
        tokens_in, tokens_out = self.tokens or (0, 0)
        ttfb = "-" if self.first_byte is None else "%.1f" % (
            (self.first_byte - self.t0) * 1000)
        log("%s %s %s %s model=%s status=%s in=%d out=%d ms=%.1f ttfb=%s%s"
            % (self.client_address[0], clean_field(self.log_user),
               clean_field(self.command), clean_field(path),
               clean_field(self.log_model), self.status or "-", tokens_in,
               tokens_out, (now - self.t0) * 1000, ttfb,
               " aborted" if self.aborted else ""))

    # routing

    def _dispatch(self):
        gateway = self.server.gateway
        config = gateway.config
        target = self.path
        path, _, query = target.partition("?")
        route = config.match(path) if target.startswith("/") else None
        # the shape of every refusal from here on
        self.family = route[2] if route is not None and "#" not in target \
            else self._target_family(target)
        framing = self._body_length()
        # a body left unread makes the connection unusable: see _refuse
        self.body_pending = framing is not None
        if not target.startswith("/"):
            raise Refusal("invalid_path", "The request target must be a path "
                          "(origin-form), not an absolute URL.", close=True)
        if "#" in target:
            # RFC 9112 section 3.2: no fragment in a request target; a
            # server that cut it off would route what llmgate did not
            raise Refusal("invalid_path", "The request target must not "
                          "contain a fragment (#).", close=True)
        if has_dot_segment(path):
            raise Refusal("invalid_path", "The path must not contain . or "
                          ".. segments.", close=True)
        if gateway.draining:
            raise Refusal("shutting_down", "The gateway is shutting down; "
                          "retry shortly.", close=True)
        if path == HEALTH_PATH or (path == "/" and self.command in (
                "GET", "HEAD")):
            self.close_connection |= self.body_pending  # we read no body
            return self._answer_json(200, {"status": "ok"})
        if path == USAGE_PATH:
            self.close_connection |= self.body_pending
            return self._usage(config, query)
        if self.command not in ALLOWED_METHODS:
            raise Refusal("method_not_allowed", "%s is not forwarded."
                          % clean_field(self.command))
        if route is None:
            raise Refusal("not_found", "No route for %s; llmgate serves /v1/"
                          "..., provider prefixes and %s."
                          % (clean_field(path), USAGE_PATH))
        self._proxy(config, route, query, framing)

    def _authenticate(self, config):
        """The user whose key the request carries, or a 401 Refusal.  The
        key is looked up by its SHA-256 digest and confirmed with
        hmac.compare_digest."""
        h = self.h
        key = None
        auth = h.get("authorization")
        if auth and auth[:7].lower() == "bearer ":
            key = auth[7:].strip(" \t")   # not str.strip: 0xA0 is a byte
        if not key:
            key = h.get("x-api-key") or h.get("api-key")
        if not key:
            raise Refusal("missing_api_key", "No API key: send your llmgate "
                          "key as Authorization: Bearer KEY, x-api-key or "
                          "api-key.")
        # a header value is latin-1 text of the bytes sent: a UTF-8 key
        # from the config hashes the same only as those bytes
        digest = key_digest(key.encode("latin-1"))
        user = config.by_digest.get(digest)
        confirmed = False
        for _, known in (user.digests if user is not None else ()):
            confirmed |= hmac.compare_digest(digest, known)
        if not confirmed:
            raise Refusal("invalid_api_key", "The API key is not valid for "
                          "this gateway.")
        self.log_user = user.name
        if user.disabled:
            raise Refusal("key_disabled", "This user is disabled; ask the "
                          "gateway's admin.")
        if user.expires is not None and time.time() >= user.expires:
            raise Refusal("key_expired", "This key expired at %s; ask the "
                          "gateway's admin for a new one."
                          % iso_time(user.expires))
        return user

    def _usage(self, config, query):
        user = self._authenticate(config)
        if self.command not in ("GET", "HEAD"):
            raise Refusal("method_not_allowed", "Use GET %s." % USAGE_PATH)
        ledger = self.server.gateway.ledger
        params = urllib.parse.parse_qs(query)
        if params.get("all", ["0"])[-1].lower() not in ("", "0", "false"):
            if not user.admin:
                raise Refusal("not_admin", "Only an admin may see every "
                              "user's usage.")
            return self._answer_json(200, {"users": [
                ledger.figures(u) for u in config.users]})
        return self._answer_json(200, ledger.figures(user))

    # proxying

    def _proxy(self, config, route, query, framing):
        gateway = self.server.gateway
        provider, upstream_path, family = route
        user = self._authenticate(config)
        self.quota_user = user
        # an h2c offer may be ignored (RFC 9110 section 7.8); a websocket
        # cannot, and Codex falls back to plain HTTP on a 426
        if "websocket" in self.h.get("upgrade", "").lower():
            raise Refusal("websocket_unsupported", "llmgate does not relay "
                          "websockets; use plain HTTP (SSE) instead.")
        limit = config.max_body_bytes
        if framing is not None and framing[0] == "length" \
                and framing[1] > limit:
            raise Refusal("body_too_large", "The request body is %d bytes; "
                          "the limit is %d." % (framing[1], limit))
        if user.models is not None and DEPLOYMENT_RE.match(upstream_path):
            self._check_model(user, request_model(None, b"", "",
                                                  upstream_path))
        gateway.ledger.check(user)
        body = self._read_body(framing, limit)

        raw_type = self.h.get("content-type", "")   # a boundary keeps case
        content_type = raw_type.lower()
        doc = None
        # providers read JSON whatever the label says (vLLM, Ollama), so
        # limits must too: anything that looks like a JSON object is one
        if body and ("json" in content_type or JSON_START_RE.match(body)):
            try:
                doc = json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                if "json" in content_type:
                    raise Refusal("invalid_json", "The request body is not "
                                  "valid JSON.")
            if not isinstance(doc, dict):
                doc = None
        model = request_model(doc, body, raw_type, upstream_path)
        self.log_model = model
        if provider is None:
            found = config.resolve(family, upstream_path, model)
            if found is None:
                raise Refusal("not_found", "No provider is configured for %s."
                              % clean_field(upstream_path))
            provider, upstream_path = found
        self._check_model(user, model)
        kind = api_path(upstream_path)
        # a form the gateway cannot read a model from may still name one
        # to a laxer parser upstream, so a limited key must name it plainly
        if user.models is not None and model is None and body and (
                is_generation(kind) or content_type.startswith(
                    "multipart/form-data")):
            raise Refusal("model_not_allowed", "Your key is limited to some "
                          "models, and llmgate cannot tell which model this "
                          "request is for; name it in a \"model\" field.")

        ex = Exchange(user, family, provider, upstream_path, kind,
                      self.command)
        if doc is not None:
            changed = False
            if user.max_output_tokens is not None:
                changed = cap_output(doc, kind, family,
                                     user.max_output_tokens)
            if ask_for_usage(doc, kind):
                ex.meter.hide_usage_chunk = changed = True
            if changed:
                try:
                    body = encode_json(doc)
                except RecursionError:   # json reads a level deeper
                    raise Refusal("invalid_json", "The request body is "
                                  "nested too deeply.")
        ex.estimate_in, amount = estimate(doc, kind, config)
        if ex.free and not kind.endswith(FREE_SUFFIXES):
            amount = 0    # a read: nothing to reserve
        ex.reservation = gateway.ledger.admit(user, amount)
        try:
            self._exchange(ex, query, body)
        finally:
            if not ex.reservation.settled:
                # every path that got an answer settles itself; this is a
                # client gone or a failure mid-way: bill what was seen
                self._settle(ex, "aborted" if ex.sent else "error")

    def _check_model(self, user, model):
        if not user.allows_model(model):
            raise Refusal("model_not_allowed", "You may not use the model "
                          "%s through this gateway." % clean_field(model))

    def _upstream_headers(self, provider, body):
        listed = connection_tokens(self.h.get("connection"))
        headers = []
        for name, value in self.header_list:
            key = name.lower()
            if key in REQUEST_DROPPED or key in listed:
                continue
            headers.append((name, value))
        headers.append(("Host", provider.host_header))
        headers.append(("Accept-Encoding", "identity"))
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers.append(("Content-Length", str(len(body))))
        if provider.type == "anthropic" and \
                "anthropic-version" not in self.h:
            headers.append(("anthropic-version", ANTHROPIC_VERSION))
        headers.extend(provider.auth_headers())
        return headers

    def _send_upstream(self, ex, target, headers, body):
        """Send the request and return (connection, response).  A pooled
        connection the provider closed meanwhile is retried once on a
        fresh one.  Raises UpstreamError, or ClientGone."""
        pool = ex.provider.pool
        lines = ["%s %s HTTP/1.1" % (self.command, target)]
        lines.extend("%s: %s" % kv for kv in headers)
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        for attempt in (0, 1):
            conn, reused = pool.acquire()
            if not ex.attach(conn.sock):
                conn.close()
                raise ClientGone()
            try:
                # one write for head and body: no Nagle wait between them;
                # names and values were checked when the request was read
                conn.sock.sendall(head + body)
                ex.sent = True
                sent_at = time.monotonic()
                resp = read_answer(conn.sock, self.command)
                return conn, resp
            except socket.timeout:
                conn.close()
                if ex.client_gone:
                    raise ClientGone()
                raise UpstreamError("upstream_timeout", "The provider did "
                                    "not answer within %g s."
                                    % ex.provider.timeout)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if ex.client_gone:
                    raise ClientGone()
                # a connection the provider had closed while it idled
                # fails at once, without a byte of answer: the request
                # goes again on a new one.  Later, the provider may have
                # worked on it, and a second generation would be paid
                # twice: the client gets a 502 and decides
                if reused and attempt == 0 and isinstance(exc, (
                        ConnectionError, http.client.RemoteDisconnected)) \
                        and (not ex.sent or time.monotonic() - sent_at <
                             STALE_RETRY_S):
                    ex.sent = False
                    continue
                raise UpstreamError("upstream_unreachable", "The provider "
                                    "closed the connection without an "
                                    "answer.")
        raise AssertionError("the loop above returns or raises")

    def _exchange(self, ex, query, body):
        """Forward the request, relay the answer, and give the provider
        connection back to its pool if it was read to the end."""
        gateway = self.server.gateway
        provider = ex.provider
        target = provider.base_path + ex.path + ("?" + query if query else "")
        headers = self._upstream_headers(provider, body)
        self.exchange = ex
        try:
            if self.client_closed:
                raise ClientGone()   # shut while its body was read
            try:
                ex.conn, ex.resp = self._send_upstream(ex, target, headers,
                                                       body)
            except UpstreamError as exc:
                log("warning: provider %s: %s" % (provider.name, exc))
                if exc.code == "upstream_timeout" and ex.sent:
                    # it had the request and may still be working on it
                    self._settle(ex, "aborted")
                else:
                    gateway.ledger.settle(ex.reservation, 0)
                raise Refusal(exc.code, str(exc))
            self._relay(ex, ex.resp)
        finally:
            self.exchange = None
            ex.detach()
            if ex.conn is not None:   # not handed back: not reusable
                ex.resp.close()
                ex.conn.close()

    def _quota_headers(self):
        """X-LLMGate-* headers: the user's limit, what remains and when the
        window resets, as of now; none before a user is known."""
        if self.quota_user is None:
            return []
        limit, remaining, reset = self.server.gateway.ledger.remaining(
            self.quota_user)
        return [("X-LLMGate-Tokens-Limit", str(limit)),
                ("X-LLMGate-Tokens-Remaining", str(remaining)),
                ("X-LLMGate-Tokens-Reset", reset)]

    def _response_headers(self, resp, drop=()):
        """The provider's answer headers less hop-by-hop ones, those that
        name the shared account, and `drop`; plus the quota headers."""
        listed = connection_tokens(resp.headers.get("connection"))
        out = []
        for name, value in resp.headers.pairs:
            key = name.lower()
            if key in HOP_BY_HOP or key in RESPONSE_DROPPED or key in listed \
                    or key in drop:
                continue
            out.append((name, value))
        return out + self._quota_headers()

    def _upstream_done(self, ex):
        """The provider is done with this request: detach the watcher and,
        when the answer was read to its end on a connection that stays
        open, hand the connection back to its pool.  Both happen before
        the last bytes go to the client, so a client that closes at once
        cannot shut the connection, and its next request finds it."""
        self.exchange = None
        conn, resp = ex.conn, ex.resp
        # http.client's read1 leaves a response open at the end of its
        # Content-Length: none of it is left all the same
        ended = resp.isclosed() or (not resp.chunked and resp.length == 0)
        if ex.detach() and ended and not resp.will_close \
                and conn.sock is not None:
            ex.conn = None
            ex.provider.pool.release(conn)

    def _settle(self, ex, outcome):
        """Charge the request once and wait for the state file to hold the
        charge.  `outcome` is "done" (answer complete), "error" (the
        provider refused, or sent an error event) or "aborted" (client
        gone, stream broken).  See README "Billing".  Settles once: later
        calls do nothing.
        XXX: where the provider reports nothing, the charge is an estimate
        at CHARS_PER_TOKEN; only reported usage is exact."""
        if ex.reservation.settled:
            return
        meter = ex.meter
        tokens_in, tokens_out = meter.tokens()
        if ex.free:
            tokens_in = tokens_out = 0
        elif outcome == "aborted":
            self.aborted = True
            if not meter.has_input():
                tokens_in = ex.estimate_in
            tokens_out = max(tokens_out, tokens_for_chars(meter.output_chars))
        elif not meter.reported():
            if outcome == "done" and ex.generation:
                tokens_in = ex.estimate_in
                tokens_out = tokens_for_chars(meter.output_chars)
            else:
                tokens_in = tokens_out = 0
        self.tokens = (tokens_in, tokens_out)
        ledger = self.server.gateway.ledger
        version = ledger.settle(ex.reservation, tokens_in + tokens_out)
        if tokens_in + tokens_out:
            ledger.wait_saved(version)

    def _relay(self, ex, resp):
        """Send the provider's answer on, bill it, and hand the provider
        connection back (`_upstream_done`) when it was read to its end."""
        status = resp.status
        if status == 401 and ex.provider.api_key:
            # the client's key was ours and fine: the provider refused the
            # gateway's own key, which is the admin's problem, not theirs
            log("error: provider %s refused the configured provider key "
                "(401)" % ex.provider.name)
            self._settle(ex, "error")
            raise Refusal("upstream_auth_failed", "The provider refused the "
                          "gateway's provider key; tell the gateway's admin.")
        content_type = resp.headers.get("content-type", "").lower()
        if self.command == "HEAD" or status in (204, 304):
            resp.read()   # no body: this closes the response at once
            self._upstream_done(ex)
            self._settle(ex, "error" if status >= 400 else "done")
            headers = self._response_headers(resp)
            length = resp.headers.get("content-length")
            if self.command == "HEAD" and length is not None:
                headers.append(("Content-Length", length))
            self._write(self._head(status, headers))
            return
        if "text/event-stream" in content_type:
            return self._relay_events(ex, resp)
        return self._relay_body(ex, resp)

    def _relay_body(self, ex, resp):
        """A plain answer.  Up to HOLD_BODY_BYTES it is read whole, billed,
        then sent with a Content-Length, so the charge is saved before the
        client has the answer; a larger one is passed on as it comes and
        billed from its tail."""
        encoding = resp.headers.get("content-encoding")
        billable = "json" in resp.headers.get("content-type", "").lower()
        parts, size = [], 0
        ended = False
        try:
            if resp.length is not None and resp.length <= HOLD_BODY_BYTES:
                parts.append(resp.read())
                ended = True
            else:
                while size <= HOLD_BODY_BYTES:
                    data = resp.read1(RECV_BYTES)
                    if not data:
                        ended = True
                        break
                    parts.append(data)
                    size += len(data)
        except (OSError, http.client.HTTPException) as exc:
            if ex.client_gone:
                raise ClientGone()
            self._settle(ex, "aborted")
            if isinstance(exc, socket.timeout):
                raise Refusal("upstream_timeout", "The provider stopped "
                              "sending its answer for %g s."
                              % ex.provider.timeout)
            raise Refusal("upstream_unreachable", "The provider broke off "
                          "its answer.")
        if not ended:
            return self._pass_through(ex, resp, parts, billable, encoding)
        self._upstream_done(ex)
        body = b"".join(parts)
        text = inflate(body, encoding) if billable else None
        if text is not None:
            ex.meter.answer(text)
        if ex.generation:
            ex.meter.output_chars = len(body)
        outcome = "error" if resp.status >= 400 else "done"
        if text is None and billable and ex.generation:
            outcome = "aborted"   # XXX: an encoding zlib cannot read
        self._settle(ex, outcome)
        headers = self._response_headers(resp)
        headers.append(("Content-Length", str(len(body))))
        self._write(self._head(resp.status, headers) + body)

    def _pass_through(self, ex, resp, parts, billable, encoding):
        """Pass an answer on as it comes, after `parts` already read; keep
        its tail to read usage from when `billable`.  Without a
        Content-Length it goes out chunked (HTTP/1.1) or close-delimited
        (HTTP/1.0)."""
        headers = self._response_headers(resp)
        chunked = False
        if resp.length is not None:
            headers.append(("Content-Length", str(
                resp.length + sum(len(p) for p in parts))))
        elif self.request_version == "HTTP/1.1":
            headers.append(("Transfer-Encoding", "chunked"))
            chunked = True
        else:
            self.close_connection = True
        frame = chunk if chunked else bytes
        decoder = decoder_for(encoding) if billable else False
        tail = b""
        self._write(self._head(resp.status, headers) +
                    b"".join(frame(p) for p in parts))
        for p in parts:
            tail = keep_tail(tail, p, decoder)
        try:
            while True:
                data = resp.read1(RECV_BYTES)
                if not data:
                    break
                self._write(frame(data))
                tail = keep_tail(tail, data, decoder)
            if resp.length:   # closed short of its Content-Length
                raise http.client.IncompleteRead(b"", resp.length)
        except (OSError, http.client.HTTPException):
            # the provider broke off after the head went out: all that is
            # left is to close, so the client sees a short answer
            self.close_connection = True
            if not ex.client_gone:
                log("warning: provider %s broke off an answer"
                    % ex.provider.name)
            self._settle(ex, "aborted")
            return
        self._upstream_done(ex)
        outcome = "error" if resp.status >= 400 else "done"
        if decoder is not False:
            ex.meter.tail(tail)
        elif ex.generation:
            # XXX: not JSON, or an encoding zlib cannot read: the usage
            # is out of reach, so this is billed like a hung-up client
            outcome = "aborted"
        self._settle(ex, outcome)
        if chunked:
            self._write(b"0\r\n\r\n")

    def _relay_events(self, ex, resp):
        """A server-sent event stream: each whole event is metered and
        written to the client at once, as one chunk.  A stream the
        provider breaks off ends with an error event of the client's API
        and a proper last chunk."""
        decoder = decoder_for(resp.headers.get("content-encoding"))
        if decoder is False:   # unreadable: passed on as it is, estimated
            return self._pass_through(ex, resp, [], False, None)
        drop = ("content-encoding",) if decoder else ()
        headers = self._response_headers(resp, drop)
        chunked = self.request_version == "HTTP/1.1"
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        else:
            self.close_connection = True
        frame = chunk if chunked else bytes
        self._write(self._head(resp.status, headers))
        meter = ex.meter
        splitter = EventSplitter()
        outcome = "error" if resp.status >= 400 else "done"
        broken = None

        def ended():
            # an error event ends the stream, but the Responses API's
            # `error` may be followed by response.failed and its usage
            return meter.error_event and ex.kind != "responses"
        try:
            while True:
                data = resp.read1(RECV_BYTES)
                if not data:
                    break
                if decoder:
                    data = decoder.decompress(data, MAX_DECODED_BYTES)
                out = []
                for event in splitter.feed(data):
                    if meter.event(event):
                        out.append(event)
                    if ended():
                        break
                if out:
                    self._write(frame(b"".join(out)))
                if ended():
                    # text streamed before an error is charged at least
                    # at its estimate: Anthropic's message_start reports
                    # an output of 1 whatever follows
                    outcome = "aborted" if meter.output_chars else "error"
                    break
            if resp.length and not ended():
                broken = "The provider broke off the stream."  # cut short
        except socket.timeout:
            broken = "The provider sent nothing for %g s." % \
                ex.provider.timeout
        except (OSError, http.client.HTTPException, zlib.error):
            broken = "The provider broke off the stream."
        if ex.client_gone:
            raise ClientGone()
        if broken is None:
            self._upstream_done(ex)
        rest = b"" if ended() else splitter.flush()
        # a last event with no blank line after it is still metered: its
        # usage counts, and a usage chunk llmgate asked for stays hidden
        shown = rest and meter.event(rest)
        if meter.error_event and outcome == "done":   # a Responses error
            outcome = "aborted" if meter.output_chars and not \
                meter.reported() else "error"
        if broken is None and shown:
            self._write(frame(rest))
        elif broken is not None:
            log("warning: provider %s: %s" % (ex.provider.name, broken))
            outcome = "aborted"
            self._write(frame(stream_error_event(ex.kind, broken)))
        self._settle(ex, outcome)
        if chunked:
            self._write(b"0\r\n\r\n")


def connection_tokens(value):
    """The header names a Connection header lists, lower-cased (RFC 9110
    section 7.6.1): hop-by-hop too, never forwarded."""
    if not value:
        return ()
    return set(t.strip().lower() for t in value.split(","))


def chunk(data):
    """One piece of a chunked body (RFC 9112 section 7.1)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def keep_tail(tail, data, decoder):
    """The last USAGE_TAIL_BYTES of an answer, inflated when needed."""
    if decoder is False:
        return b""
    if decoder is not None:
        try:
            data = decoder.decompress(data, MAX_DECODED_BYTES)
        except zlib.error:
            return b""
    tail += data
    return tail[-USAGE_TAIL_BYTES:]


# The server ##################################################################

class GatewayServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with a deep accept queue and a cap on open
    connections: past MAX_CONNECTIONS a new one is closed at once."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, gateway):
        self.gateway = gateway
        self.open_lock = threading.Lock()
        self.open = set()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        http.server.ThreadingHTTPServer.__init__(self, address, Handler)

    def server_bind(self):
        # skip HTTPServer.server_bind's reverse DNS lookup of the address
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def verify_request(self, request, client_address):
        with self.open_lock:
            if len(self.open) >= MAX_CONNECTIONS:
                return False
            self.open.add(request)
        return True

    def shutdown_request(self, request):
        with self.open_lock:
            self.open.discard(request)
        http.server.ThreadingHTTPServer.shutdown_request(self, request)

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], OSError):
            return   # a client that reset its connection: nothing to fix
        log("error: connection from %s failed:\n%s" % (
            client_address[0], traceback.format_exc().rstrip()))


class Gateway:
    """The running gateway: its config, usage table, server and threads."""

    def __init__(self, config):
        self.config = config
        self.ledger = Ledger(config.period, config.state_path)
        self.watcher = DisconnectWatcher()
        self.draining = False
        self.busy_lock = threading.Condition()
        self.busy = 0
        self.server = None
        self.host = None
        self.reload_wanted = threading.Event()
        self.reloaded = threading.Condition()
        self.reload_lock = threading.Lock()
        self.reloads = 0   # reload attempts, good or bad, for waiters
        self.stopped = threading.Event()
        self.config_stamp = config_stamp(config.path)
        self.save_error = None   # why the final save failed, if it did

    def enter(self):
        with self.busy_lock:
            self.busy += 1

    def leave(self):
        with self.busy_lock:
            self.busy -= 1
            self.busy_lock.notify_all()

    def start(self, host=None, port=None, poll_interval=0.5):
        """Bind and start serving on a thread; returns (host, port).
        `poll_interval` is how long stop() may wait for the accept loop."""
        self.ledger.check_folder()
        self.ledger.load()
        self.ledger.start_writer()
        host = self.config.host if host is None else host
        port = self.config.port if port is None else port
        self.server = GatewayServer((host, port), self)
        self.host = host   # as bound, for the warnings of later reloads
        threading.Thread(target=self.server.serve_forever,
                         args=(poll_interval,), name="server",
                         daemon=True).start()
        threading.Thread(target=self._watch_config, name="config-watcher",
                         daemon=True).start()
        return self.server.server_address[:2]

    def reload(self):
        """Load the config file again; keep the old one if it is bad.
        Returns True when the new config is in force.  One reload runs at
        a time; the file's stamp is taken before it is read, so the
        watcher reloads a file written meanwhile, and only that."""
        try:
            with self.reload_lock:
                self.config_stamp = config_stamp(self.config.path)
                return self._reload()
        finally:
            with self.reloaded:
                self.reloads += 1
                self.reloaded.notify_all()

    def wait_reload(self, count, timeout):
        """Block until `count` reloads were attempted, at most `timeout`
        seconds; returns whether they were."""
        deadline = time.monotonic() + timeout
        with self.reloaded:
            while self.reloads < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.reloaded.wait(left)
        return True

    def _reload(self):
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            log("error: config reload failed, keeping the last good config: "
                "%s" % exc)
            return False
        old = self.config
        if (new.host, new.port) != (old.host, old.port):
            log("warning: listen changes take effect at the next restart")
        if new.state_path != old.state_path:
            log("warning: stateFile changes take effect at the next restart")
        kept = {p.name: p for p in old.providers}
        for i, p in enumerate(new.providers):
            same = kept.get(p.name)
            if same is not None and same.same_endpoint(p):
                p.pool = same.pool      # keep warm connections
                kept.pop(p.name)
        for p in kept.values():
            p.pool.close()
        self.ledger.period = new.period
        self.config = new
        log("config reloaded: %d providers, %d users"
            % (len(new.providers), len(new.users)))
        for warning in config_warnings(new, self.host):
            log("warning: " + warning)
        return True

    def _watch_config(self):
        while not self.stopped.is_set():
            forced = self.reload_wanted.wait(CONFIG_POLL_S)
            if self.stopped.is_set():
                return
            if forced or config_stamp(self.config.path) != self.config_stamp:
                self.reload_wanted.clear()
                self.reload()

    def stop(self, grace=SHUTDOWN_GRACE_S):
        """Stop accepting, let requests in flight finish for up to `grace`
        seconds, save the usage.  Returns the requests still running."""
        self.draining = True
        self.stopped.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        deadline = time.monotonic() + grace
        with self.busy_lock:
            while self.busy and time.monotonic() < deadline:
                self.busy_lock.wait(max(0.01, deadline - time.monotonic()))
            left = self.busy
        self.save_error = self.ledger.stop()
        self.watcher.close()
        for p in self.config.providers:
            p.pool.close()
        return left


def config_stamp(path):
    if not path:
        return None
    try:
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        return None


# Command line ################################################################

EXAMPLES = """examples:
  python3 llmgate.py --config config.json            serve
  python3 llmgate.py --config config.json --check    validate, show routes
  python3 llmgate.py --config config.json --port 0   serve on a free port
  python3 llmgate.py usage --config config.json      per-user usage table
  python3 llmgate.py keygen alice                    a key and its entry

signals: SIGHUP reloads the config; SIGINT and SIGTERM stop after the
requests in flight finish (at most %d s) and the usage is saved.
""" % SHUTDOWN_GRACE_S


def raise_fd_limit():
    """Lift the soft open-file limit to the hard one: each stream holds
    two sockets."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (
                hard if hard != resource.RLIM_INFINITY else max(soft, 65536),
                hard))
    except (ImportError, ValueError, OSError):
        pass


def serve(args):
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print("llmgate: config error: %s" % exc, file=sys.stderr)
        return 2
    if args.check:
        try:
            ledger = Ledger(config.period, config.state_path)
            ledger.check_folder()
            ledger.load()
        except ConfigError as exc:
            print("llmgate: %s" % exc, file=sys.stderr)
            return 2
        print("config OK: %d providers, %d users" % (
            len(config.providers), len(config.users)))
        print("routes:")
        for line in config.routes():
            print("  " + line)
        for warning in config_warnings(config, args.host):
            print("warning: " + warning)
        return 0
    raise_fd_limit()
    gateway = Gateway(config)

    # handlers first: a signal that comes while the server starts must
    # still stop it cleanly
    stop = threading.Event()

    def on_stop(signum, frame):
        stop.set()

    def on_hup(signum, frame):
        gateway.reload_wanted.set()

    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hup)
    try:
        host, port = gateway.start(args.host, args.port)
    except ConfigError as exc:
        print("llmgate: %s" % exc, file=sys.stderr)
        return 2
    except OSError as exc:
        print("llmgate: cannot listen on %s:%s: %s" % (
            args.host or config.host, config.port if args.port is None
            else args.port, exc.strerror), file=sys.stderr)
        return 2
    for warning in config_warnings(config, host):
        log("warning: " + warning)
    # what start-up made lives as long as the process: keep the cyclic
    # collector from rescanning it, which shows as tail latency
    if hasattr(gc, "freeze"):
        gc.freeze()
    log("llmgate %s listening on http://%s:%d (providers: %s; %d users%s)"
        % (__version__, host if ":" not in host else "[%s]" % host, port,
           ", ".join("%s=%s" % (p.name, p.type) for p in config.providers),
           len(config.users), "; state file %s" % config.state_path
           if config.state_path else ""))
    while not stop.wait(3600):
        pass
    log("stopping: waiting up to %d s for requests in flight"
        % SHUTDOWN_GRACE_S)
    left = gateway.stop()
    if gateway.save_error:
        log("error: usage not saved to %s: %s" % (config.state_path,
                                                 gateway.save_error))
    log("stopped%s" % (" with %d requests cut off" % left if left else ""))
    return 1 if gateway.save_error else 0


def usage_table(args):
    try:
        config = load_config(args.config)
        ledger = Ledger(config.period, config.state_path)
        ledger.load()
    except ConfigError as exc:
        print("llmgate: %s" % exc, file=sys.stderr)
        return 2
    if not config.state_path:
        print("llmgate: the config has no stateFile, so usage lives only in "
              "the running server (GET %s)" % USAGE_PATH, file=sys.stderr)
        return 2
    rows = [("user", "limit", "used", "remaining", "resets_at")]
    for user in config.users:
        fig = ledger.figures(user)
        rows.append((fig["user"], str(fig["limit"]), str(fig["used"]),
                     str(fig["remaining"]), fig["resets_at"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def keygen(args):
    key = "lg-" + secrets.token_urlsafe(32)
    digest = key_digest(key.encode("utf-8")).hex()
    entry = {"name": args.name, "apiKeySha256": digest,
             "tokens": args.tokens}
    print("key (give it to %s; it is not stored anywhere):" % args.name)
    print("  " + key)
    print("config entry for \"users\":")
    print("  " + json.dumps(entry))
    return 0


def build_parsers():
    serve_parser = argparse.ArgumentParser(
        prog="llmgate.py", description="An LLM gateway: internal keys and "
        "token quotas in front of one provider account.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_parser.add_argument("--config", metavar="FILE",
                              help="the JSON config file")
    serve_parser.add_argument("--check", action="store_true",
                              help="validate the config, print the routes, "
                              "exit 0 or 2")
    serve_parser.add_argument("--host", help="listen on this address")
    serve_parser.add_argument("--port", type=int,
                              help="listen on this port (0: any free one)")
    serve_parser.add_argument("--version", action="version",
                              version="llmgate " + __version__)
    usage_parser = argparse.ArgumentParser(
        prog="llmgate.py usage", description="Print each user's usage "
        "from the state file, without a running server.")
    usage_parser.add_argument("--config", metavar="FILE", required=True)
    keygen_parser = argparse.ArgumentParser(
        prog="llmgate.py keygen", description="Print a new random key and "
        "the config entry that holds its SHA-256.")
    keygen_parser.add_argument("name")
    keygen_parser.add_argument("--tokens", type=int, default=100000,
                               help="the quota in the printed entry")
    return serve_parser, usage_parser, keygen_parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    serve_parser, usage_parser, keygen_parser = build_parsers()
    if argv and argv[0] == "usage":
        return usage_table(usage_parser.parse_args(argv[1:]))
    if argv and argv[0] == "keygen":
        return keygen(keygen_parser.parse_args(argv[1:]))
    args = serve_parser.parse_args(argv)
    if not args.config:
        serve_parser.error("--config FILE is required")
    if args.port is not None and not 0 <= args.port <= 65535:
        serve_parser.error("--port must be between 0 and 65535")
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
