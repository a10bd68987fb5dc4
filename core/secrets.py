"""Credentials out of everything the pipeline writes: one scrubber for configs, command lines and log text.

A secret is recognised by where it sits, never by guessing at every long string:

- a key whose *name* says so, matched on whole segments of the name (`api_key`, `hf_token`, `password`,
  `client_secret`, `X-Amz-Security-Token`; not `num_tokens`, `max_tokens`, `tokenizer`, `pad_token`);
- inside a value: URL userinfo (`https://user:***@host`), signed query parameters (`sig=`, `token=`,
  `X-Amz-Signature=`, ...), `Authorization:` / `Bearer` headers, `curl -u user:***`, `--token ***` flags,
  `key=value` / `key: value` text whose key is a secret name, and well-known token shapes (GitHub, Hugging
  Face, AWS access key ids, Slack, GitLab, OpenAI-style `sk-`, JWTs);
- the value of any environment variable whose name is a secret name (so a `${oc.env:HF_TOKEN}` resolved
  under an innocent key is caught too).

Only the secret part is replaced by `***`: a scrubbed URL or command line stays readable. Free of Lightning,
Hydra and W&B (docs/ARCHITECTURE.md, "Layers"); `python -m core.secrets ARG...` prints the arguments scrubbed
(the Slurm job scripts echo their command line through it).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["MASK", "ScrubbingFilter", "is_secret_key", "scrub", "scrub_argv", "scrub_text", "secret_env_values"]

MASK = "***"
# A key is secret when its last segment is one of these words ...
_SECRET_WORDS = frozenset({"password", "passwd", "passphrase", "secret", "secrets", "token", "credential",
                           "credentials", "apikey", "authorization", "auth", "cookie"})  # fmt: skip
# ... or its last two segments are one of these pairs.
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"),
                           ("signing", "key"), ("account", "key"), ("auth", "key"), ("master", "key"),
                           ("session", "key"), ("encryption", "key")})  # fmt: skip
# Tokenizer vocabulary: `pad_token: "<pad>"` is no credential.
_SPECIAL_TOKENS = frozenset({"pad", "bos", "eos", "unk", "mask", "cls", "sep", "start", "end", "sot", "eot",
                             "special", "begin", "null", "image", "video", "audio", "sos"})  # fmt: skip
# Query parameters that sign or authenticate a URL besides the secret key names (Azure SAS `sig`, AWS SigV4,
# GCS V4, Google API `key`).
_QUERY_NAMES = frozenset({"sig", "signature", "key", "x-amz-signature", "x-amz-credential",
                          "x-goog-signature", "x-goog-credential"})  # fmt: skip
_AUTH_SCHEMES = frozenset({"bearer", "basic", "digest", "token", "bot", "negotiate"})
MIN_ENV_SECRET_LEN = 8  # shorter values of secret-named variables ("1", "true") would mask ordinary text

_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_SPLIT = re.compile(r"[^a-z0-9]+")
_URL_USERINFO = re.compile(r"(?P<pre>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^\s/?#@:'\"]*)"
                           r"(?::(?P<pw>[^\s/?#'\"]*))?@")  # fmt: skip
_QUERY = re.compile(r"(?P<pre>[?&](?P<name>[A-Za-z0-9_.\-]+)=)(?P<value>[^&#\s'\"]+)")
_AUTH_HEADER = re.compile(r"(?i)(?P<pre>\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?"
                          r"(?:(?:bearer|basic|digest|token|bot|negotiate)\s+)?)(?P<value>[^\s\"',;]+)")  # fmt: skip
_BEARER = re.compile(r"(?i)(?P<pre>\bbearer\s+)(?P<value>[A-Za-z0-9._~+/=\-]{8,})")
_CURL_USER = re.compile(r"(?P<pre>(?:^|\s)(?:-u|--user|--proxy-user)\s*[\"']?[^\s:\"']*:)(?P<value>[^\s\"']+)")
_FLAG = re.compile(r"(?P<pre>(?:^|\s)--?(?P<name>[A-Za-z][A-Za-z0-9_\-]*)\s+[\"']?)(?P<value>[^\s\"'-][^\s\"']*)")
_ASSIGN = re.compile(r"(?P<pre>(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)[\"']?\s*[:=]\s*[\"']?)"
                     r"(?P<value>[^\s\"'&,;}\])]+)")  # fmt: skip
_TOKEN_SHAPES = re.compile(
    r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,}|hf_[A-Za-z0-9]{30,}|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|AIza[0-9A-Za-z_\-]{35}|xox[abprs]-[A-Za-z0-9\-]{10,}|glpat-[A-Za-z0-9_\-]{20,}|sk-(?:proj-)?[A-Za-z0-9_\-]{20,}"
    r"|eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,})"
)


def _segments(name: str) -> list[str]:
    """Lower-case words of a key: the last part of a dotted path, split at `_`, `-`, camelCase."""
    last = name.rsplit(".", 1)[-1]
    return [s for s in _SPLIT.split(_CAMEL.sub(r"\1_\2", last).lower()) if s]


def is_secret_key(name: str) -> bool:
    """Whether a config key, query parameter, header or environment variable name holds a credential.

    Whole segments only: `hf_token`, `WANDB_API_KEY`, `apiKey`, `client_secret` are secret;
    `num_tokens`, `tokenizer`, `token_dropout`, `pad_token`, `sort_key`, `__key__` are not.
    """
    seg = _segments(str(name))
    if not seg:
        return False
    if seg[-1] in _SECRET_WORDS:
        return not (seg[-1] == "token" and len(seg) > 1 and seg[-2] in _SPECIAL_TOKENS)
    return len(seg) > 1 and (seg[-2], seg[-1]) in _SECRET_PAIRS


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment variables with a secret name (longest first), at least MIN_ENV_SECRET_LEN long."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if is_secret_key(k) and len(v) >= MIN_ENV_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def _masked(m: re.Match) -> str:
    return m.group("pre") + MASK


def _userinfo(m: re.Match) -> str:
    user, pw = m.group("user"), m.group("pw")
    if pw is not None:  # user:password@ -> user:***@
        return f"{m.group('pre')}{user}:{MASK if pw else ''}@"
    # A bare user name (`ssh://git@host`) stays; a long bare userinfo is a token (`https://<token>@github.com`).
    return f"{m.group('pre')}{MASK if len(user) >= 20 else user}@"


def _query(m: re.Match) -> str:
    name = m.group("name")
    return _masked(m) if name.lower() in _QUERY_NAMES or is_secret_key(name) else m.group(0)


def _named(m: re.Match) -> str:
    value = m.group("value")
    if value == MASK or value.lower() in _AUTH_SCHEMES or not is_secret_key(m.group("name")):
        return m.group(0)
    return _masked(m)


def scrub_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    """`text` with every credential found by value replaced by `***`, the rest kept as it was."""
    if not text:
        return text
    for value in secret_env_values(environ):
        text = text.replace(value, MASK)
    text = _URL_USERINFO.sub(_userinfo, text)
    text = _QUERY.sub(_query, text)
    text = _AUTH_HEADER.sub(_masked, text)
    text = _BEARER.sub(_masked, text)
    text = _CURL_USER.sub(_masked, text)
    text = _FLAG.sub(_named, text)
    text = _ASSIGN.sub(_named, text)
    return _TOKEN_SHAPES.sub(MASK, text)


def _mask_all(obj: Any) -> Any:
    """Everything under a secret key: strings and numbers masked, structure, None, booleans and "" kept."""
    if isinstance(obj, Mapping):
        return {k: _mask_all(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_mask_all(v) for v in obj]
    if obj is None or isinstance(obj, bool) or obj == "":
        return obj
    return MASK


def scrub(obj: Any, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of a config container (dicts, lists, scalars) with credentials masked: the values of secret keys
    entirely, strings by `scrub_text`. Non-string keys and scalars other than strings are kept."""
    if isinstance(obj, Mapping):
        return {k: (_mask_all(v) if is_secret_key(str(k)) else scrub(v, environ)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [scrub(v, environ) for v in obj]
    if isinstance(obj, str):
        return scrub_text(obj, environ)
    return obj


def scrub_argv(argv: Iterable[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """A command line with credentials masked in each argument (`data.urls.train=https://u:***@host/...`)."""
    return [scrub_text(str(a), environ) for a in argv]


class ScrubbingFilter(logging.Filter):
    """Masks credentials in every record a handler emits (attach it to handlers: a logger's own filters do
    not see the records its children propagate)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub_text(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


if __name__ == "__main__":
    print(" ".join(scrub_argv(sys.argv[1:])))
