"""Shard reading with a sample count: a shard that ends early is an error, never silence.

Python's tarfile treats an invalid header after the first as the end of the archive, so a shard
damaged in place (size and mtime kept, so the sha256 cache once trusted it) read as a shorter
one: a run trained on 38 % of its data reported `skipped_samples: 0`. Every full read of a shard
here counts its samples and compares them with the count dataset.json lists; fewer (or more), or
a tar error part-way, raises DataError naming the shard and both counts. Corrupt images inside
an intact tar are the loaders' business (skipped and counted, or DataError when strict).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import webdataset as wds

from scaling.data.info import INFO_FILE, DataError


def _reason(exn: Exception) -> str:
    """A short description of a read error (webdataset appends URLs and stream objects to
    the exception's args)."""
    text = exn.strerror if isinstance(exn, OSError) and exn.strerror else (
        str(exn.args[0]).split(" @ <")[0] if exn.args else "")
    return f"{type(exn).__name__}: {text}" if text else type(exn).__name__


def shard_samples(url: str, expected: int) -> Iterator[dict]:
    """The raw (undecoded) samples of one shard, checked against its listed count when the
    read reaches the shard's end (a reader that stops early checks nothing)."""
    samples = iter(wds.tarfile_to_samples(handler=wds.reraise_exception)([{"url": url}]))
    n = 0
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            break
        except Exception as e:  # any tar/IO error: the shard cannot be read to its end
            raise DataError(f"unreadable shard: {url}: {_reason(e)}, after {n} of the "
                            f"{expected} samples {INFO_FILE} lists") from e
        n += 1
        if n > expected:
            raise DataError(f"shard {url} holds more than the {expected} samples {INFO_FILE} "
                            "lists (shards and dataset.json from different builds?)")
        yield sample
    if n != expected:
        raise DataError(f"short shard: {url} ended after {n} of the {expected} samples "
                        f"{INFO_FILE} lists (a damaged tar header ends the read early; "
                        "re-create the shards)")


def checked_samples(urls: Iterable[str], counts: Mapping[str, int]) -> Iterator[dict]:
    """The samples of each shard in turn (urls may repeat: resampling), each read checked."""
    for url in urls:
        yield from shard_samples(url, counts[url])
