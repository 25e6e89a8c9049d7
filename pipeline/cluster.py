"""Where Dask runs the chunked work: local threads, a LocalCluster, or a running cluster.

``--scheduler`` of ``runoff ingest|predict|evaluate`` takes

* nothing: this machine, without a cluster (the default): Dask's threads, and for a
  local ingest on Linux forked worker processes (see :mod:`pipeline.ingest`);
* ``local:N``: a ``distributed.LocalCluster`` of N worker processes, started and
  stopped with the command;
* ``ADDRESS`` (``tcp://host:8786``): a running ``dask.distributed`` scheduler. Its
  workers need this package installed and must see the same paths or URLs.

While the context is open the client is Dask's default scheduler, so every
``.compute()`` and every read of a dask-backed cube runs on the cluster.

Example
-------
>>> with dask_client("local:2") as client:                  # doctest: +SKIP
...     ingest("data/input", "stores/qs.zarr", client=client)
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import TYPE_CHECKING, Iterator

from .errors import RunoffError

if TYPE_CHECKING:
    from distributed import Client


def _parse(spec: str) -> tuple[str, int | str]:
    local = re.fullmatch(r"local(?::(\d+))?", spec.strip())
    if local:
        workers = int(local.group(1) or 2)
        if workers < 1:
            raise RunoffError(f"--scheduler {spec!r}: local:N needs N >= 1 worker processes")
        return "local", workers
    if re.fullmatch(r"(tcp|tls|ucx|inproc|ws|wss)://\S+|[\w.\-]+:\d+", spec.strip()):
        return "address", spec.strip()
    raise RunoffError(f"--scheduler {spec!r}: expected local:N or a scheduler address such as tcp://host:8786")


@contextlib.contextmanager
def dask_client(spec: str | None) -> Iterator["Client | None"]:
    """A ``distributed.Client`` for ``spec`` (see the module docstring), or None when no
    cluster is asked for."""
    if not spec:
        yield None
        return
    kind, value = _parse(spec)
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise RunoffError(f"--scheduler {spec}: needs the 'distributed' package (pip install distributed)") from None
    with contextlib.ExitStack() as stack:
        if kind == "local":
            # processes, one thread each: GDAL reads and zarr encoding hold the GIL in places. A task's
            # error reaches the client, which raises it (a bad file: one line); the workers' own log of
            # it would print its traceback first
            cluster = stack.enter_context(LocalCluster(n_workers=value, threads_per_worker=1, processes=True,
                                                       dashboard_address=None, silence_logs=logging.CRITICAL))
            address = cluster
        else:
            address = value
        try:
            client = stack.enter_context(Client(address, timeout="5s"))
        except OSError as exc:
            raise RunoffError(f"--scheduler {spec}: cannot reach the scheduler ({exc})") from None
        yield client
