"""Shard reading with a sample count: a shard that ends early is an error, never silence.

Python's tarfile takes an invalid header for the end of the archive, so a damaged shard read as a
short one; every full read here counts its samples against dataset.json and raises DataError
naming the shard. A remote shard that fails is re-read with back-off (`urls.RETRIES`), skipping
what was delivered. docs/data.md, "Per-shard counts" (in "Loading") and "Remote shards".
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO

from webdataset import tariterators
from webdataset.handlers import reraise_exception

from scaling.data import urls as urllib_
from scaling.data.info import INFO_FILE, DataError


def describe(exn: Exception) -> str:
    """A short description of a read error in words (webdataset appends URLs and stream objects
    to the exception's args; a UrlFailed is already words)."""
    if isinstance(exn, urllib_.UrlFailed):
        return str(exn)
    text = exn.strerror if isinstance(exn, OSError) and exn.strerror else (
        str(exn.args[0]).split(" @ <")[0] if exn.args else "")
    return f"{type(exn).__name__}: {text}" if text else type(exn).__name__


def raw_samples(url: str, wrap: Callable[[IO[bytes]], IO[bytes]] | None = None
                ) -> Iterator[dict]:
    """The samples of one shard as webdataset groups them (`__key__`, `__url__`, one bytes
    entry per extension), unchecked; the stream is closed at the end, so that a `pipe:`
    command that failed raises here. `wrap` may wrap the opened stream (hashing)."""
    stream = urllib_.open_url(url)
    if wrap is not None:
        stream = wrap(stream)
    try:
        files = tariterators.tar_file_expander([{"url": url, "stream": stream}],
                                               handler=reraise_exception)
        yield from tariterators.group_by_keys(files, handler=reraise_exception)
    except GeneratorExit:  # the reader stopped early: a command's SIGPIPE is not an error
        with contextlib.suppress(OSError, ValueError):
            stream.close()
        raise
    except Exception as e:
        try:
            stream.close()
        except urllib_.UrlFailed as failed:  # the cause: a command that failed ("empty file")
            raise failed from e
        except (OSError, ValueError):
            pass  # the first error is the one to report
        raise
    stream.close()  # raises UrlFailed for a pipe: command that exited non-zero


def shard_samples(url: str, expected: int) -> Iterator[dict]:
    """The raw (undecoded) samples of one shard, checked against its listed count when the
    read reaches the shard's end (a reader that stops early checks nothing)."""
    n, attempt = 0, 0
    while True:
        try:
            for i, sample in enumerate(raw_samples(url)):
                if i < n:
                    continue  # delivered before a retry
                n += 1
                if n > expected:
                    raise DataError(f"shard {url} holds more than the {expected} samples "
                                    f"{INFO_FILE} lists (shards and dataset.json from different "
                                    "builds?)")
                yield sample
            break
        except DataError:
            raise
        except Exception as e:  # any open/tar/IO error: the shard cannot be read to its end
            attempt += 1
            final = getattr(e, "permanent", False)  # a 404, a command failing at once
            if urllib_.is_local(url) or attempt > urllib_.RETRIES or final:
                tries = "" if urllib_.is_local(url) or final else f" (tried {attempt} times)"
                raise DataError(f"unreadable shard: {url}: {describe(e)}, after {n} of the "
                                f"{expected} samples {INFO_FILE} lists{tries}") from e
            time.sleep(urllib_.RETRY_DELAY_S * 2 ** (attempt - 1))
    if n != expected:
        raise DataError(f"short shard: {url} ended after {n} of the {expected} samples "
                        f"{INFO_FILE} lists (a damaged tar header ends the read early; "
                        "re-create the shards)")


def checked_samples(urls: Iterable[str], counts: Mapping[str, int]) -> Iterator[dict]:
    """The samples of each shard in turn (urls may repeat: resampling), each read checked."""
    for url in urls:
        yield from shard_samples(url, counts[url])
