"""Shard URLs: patterns, opening, sizes; local paths, `pipe:` commands and remote objects.

`pipe:` and http(s) shards are opened here so that a failure says what failed (`UrlFailed`) and
is retried only when trying again can help; other schemes go through webdataset's `gopen` or
fsspec. URLs and patterns: docs/data.md, "Remote shards: `pipe:`, http(s), fsspec".
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from typing import IO
from urllib.parse import urlparse

import webdataset as wds
from webdataset.gopen import gopen, gopen_schemes

from scaling.data.errors import DataError

HTTP_TIMEOUT_S = 30
RETRIES = 3  # extra attempts for a remote open / read / size query that failed
RETRY_DELAY_S = 1.0  # before retry k: RETRY_DELAY_S * 2**(k-1)
WILDCARDS = "*?["


def scheme(url: str) -> str:
    """The URL scheme, "" for a local path (a Windows-style drive letter is not a scheme)."""
    s = urlparse(url).scheme
    return "" if len(s) <= 1 else s.lower()


def is_local(url: str) -> bool:
    """Whether the URL names a local file (a plain path or file://)."""
    return scheme(url) in ("", "file")


def local_path(url: str) -> str:
    """The file system path of a local URL."""
    return urlparse(url).path if scheme(url) == "file" else url


def normalize(url: str) -> str:
    """Local paths absolute (so that dataset.json does not depend on the working directory);
    other URLs unchanged."""
    return os.path.abspath(os.path.expanduser(local_path(url))) if is_local(url) else url


def expand(pattern: str) -> list[str]:
    """All URLs of a pattern, in order; local wildcards are globbed (sorted). DataError when
    nothing matches or a local file is missing."""
    urls = []
    for url in wds.shardlists.expand_urls(pattern):
        if is_local(url) and any(c in url for c in WILDCARDS):
            found = sorted(glob.glob(os.path.expanduser(local_path(url))))
            if not found:
                raise DataError(f"pattern {url!r} matches no file")
            urls += found
        else:
            urls.append(url)
    urls = [normalize(u) for u in urls]
    missing = [u for u in urls if is_local(u) and not os.path.isfile(u)]
    if missing:
        raise DataError(f"{len(missing)} of the {len(urls)} shards of {pattern!r} are missing "
                        f"(e.g. {missing[0]})")
    if len(set(urls)) != len(urls):
        raise DataError(f"pattern {pattern!r} names some shards twice")
    return urls


def _fsspec_protocol(name: str) -> bool:
    """Whether fsspec can open this protocol here (its backend package imports)."""
    try:
        import fsspec
        fsspec.get_filesystem_class(name)
    except (ImportError, ValueError):
        return False
    return True


def _use_fsspec(url: str) -> bool:
    """fsspec for schemes webdataset does not open itself, and for gs:// when gcsfs exists."""
    s = scheme(url)
    if s in ("pipe", "http", "https"):
        return False
    return (s not in gopen_schemes or s == "gs") and _fsspec_protocol(s)


class UrlFailed(OSError):
    """A remote open or read that failed, said in words ("HTTP 404 Not Found", "command exited
    1"); `permanent` when trying again cannot help (with_retries does not)."""

    def __init__(self, text: str, *, permanent: bool):
        super().__init__(text)
        self.text, self.permanent = text, permanent

    def __str__(self) -> str:  # webdataset appends the stream and URL to a read error's args
        return self.text


def http_failure(e: urllib.error.URLError) -> UrlFailed:
    """An HTTP error in words; a client error (4xx but 408 timeout, 429 too many requests) is
    permanent, a server error or a failed connection may pass."""
    if isinstance(e, urllib.error.HTTPError):
        return UrlFailed(f"HTTP {e.code} {e.reason}",
                         permanent=400 <= e.code < 500 and e.code not in (408, 429))
    return UrlFailed(f"cannot connect ({getattr(e.reason, 'strerror', None) or e.reason})",
                     permanent=False)


class _Command:
    """The stdout of a `pipe:` command (run by the shell, as webdataset does); its exit status
    is checked at the end of the output, or when closed early (SIGPIPE then is ours)."""

    def __init__(self, command: str):
        self.command, self.bytes = command, 0
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)  # a pipe: URL is a shell command

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        self.bytes += len(data)
        if not data and n != 0:
            self._check(self.proc.wait(), at_end=True)
        return data

    def close(self) -> None:
        if self.proc.stdout.closed:
            return
        self.proc.stdout.close()
        self._check(self.proc.wait(), at_end=False)

    def _check(self, status: int, *, at_end: bool) -> None:
        if status == 0 or (not at_end and status in (141, -signal.SIGPIPE)):
            return
        what = f"killed by signal {-status}" if status < 0 else f"exited {status}"
        # a command that fails before any output (a missing file, a typo) fails every time
        raise UrlFailed(f"command {what} after {self.bytes} bytes of output: {self.command}",
                        permanent=self.bytes == 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _http_open(url: str) -> IO[bytes]:
    """An HTTP(S) response stream (urllib: its errors carry the status, which curl's -f hides)."""
    try:
        return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
    except urllib.error.URLError as e:
        raise http_failure(e) from None


def open_url(url: str) -> IO[bytes]:
    """A binary stream of the URL's bytes; a failed pipe: command or HTTP request raises
    UrlFailed."""
    if is_local(url):
        return open(local_path(url), "rb")
    if _use_fsspec(url):
        import fsspec
        return fsspec.open(url, "rb").open()
    s = scheme(url)
    if s == "pipe":
        return _Command(url[len("pipe:"):])
    if s in ("http", "https"):
        return _http_open(url)
    if s not in gopen_schemes:
        raise DataError(f"cannot open {url}: no reader for {s}:// URLs (install the fsspec "
                        f"backend for it: s3fs for s3://, gcsfs for gs://, adlfs for az://)")
    return gopen(url, "rb")


def with_retries(what: str, fn, url: str):
    """fn(), retried RETRIES times with exponential back-off for a remote URL; the last error
    re-raised. FileNotFoundError, DataError and a permanent UrlFailed are not retried."""
    for attempt in range(RETRIES + 1):
        try:
            return fn()
        except (FileNotFoundError, DataError):
            raise
        except Exception as e:
            if is_local(url) or attempt == RETRIES or getattr(e, "permanent", False):
                raise
            time.sleep(RETRY_DELAY_S * 2**attempt)
    raise AssertionError(what)


def _http_size(url: str) -> int | None:
    """Content-Length of a HEAD request; FileNotFoundError for 404/410."""
    req = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            length = r.headers.get("Content-Length")
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise FileNotFoundError(f"HTTP {e.code} {e.reason}") from None
        if e.code in (405, 501):  # no HEAD here: the size stays unknown (counts still checked)
            return None
        raise http_failure(e) from None
    except urllib.error.URLError as e:
        raise http_failure(e) from None
    return int(length) if length is not None else None


def url_size(url: str) -> int | None:
    """The byte size of the object at URL; None when it cannot be known without reading it
    (pipe:, a server that sends no length). FileNotFoundError when it is absent."""
    if is_local(url):
        return os.stat(local_path(url)).st_size
    s = scheme(url)
    if s in ("http", "https"):
        return with_retries("size", lambda: _http_size(url), url)
    if _use_fsspec(url):
        import fsspec
        fs, path = fsspec.core.url_to_fs(url)
        return int(with_retries("size", lambda: fs.size(path), url))
    return None


def sibling(url: str, name: str) -> str | None:
    """The URL of file `name` in the directory of `url`; None for pipe: URLs (no directory)."""
    if scheme(url) == "pipe":
        return None
    head, sep, _ = url.rpartition("/")
    return f"{head}{sep}{name}" if sep else name


def read_optional(url: str) -> bytes | None:
    """The bytes at URL, or None when it does not exist (or cannot be read: an optional file)."""
    if is_local(url):
        try:
            with open(local_path(url), "rb") as f:
                return f.read()
        except OSError:
            return None
    if scheme(url) in ("http", "https"):
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as r:
                return r.read()
        except (OSError, ValueError):
            return None
    if _use_fsspec(url):
        try:
            with open_url(url) as f:
                return f.read()
        except (OSError, ValueError):
            return None
    return None
