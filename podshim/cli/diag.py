"""The CLI's side of ``podshim.diag.v1.Diag``: calls to one shim, a survey of all of them, and
finding the shim an operator means by what they typed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message

from podshim.api import diag_pb2 as D
from podshim.cli.discovery import ShimProcess, find_shims
from podshim.errdefs import Code, ShimError
from podshim.ttrpc.client import Client

SERVICE = "podshim.diag.v1.Diag"
CALL_TIMEOUT = 5.0

R = TypeVar("R", bound=Message)


class DiagUnavailable(Exception):
    """The shim did not answer (gone, stopped, or too slow)."""


async def call(
    shim: ShimProcess, method: str, req: Message, resp_type: type[R], timeout: float | None = CALL_TIMEOUT
) -> R:
    try:
        async with asyncio.timeout(timeout):
            client = await Client.connect(shim.connect_path())
    except (OSError, TimeoutError) as e:
        raise DiagUnavailable(
            f"cannot connect to shim {shim.pid} at {shim.socket}: {e or 'timed out'}"
        ) from e
    try:
        return await client.call(SERVICE, method, req, resp_type, timeout=timeout)
    except ShimError as e:
        if "deadline" in str(e).lower():
            raise DiagUnavailable(f"shim {shim.pid} did not answer {method} within {timeout} s") from e
        raise
    finally:
        await client.close()


@dataclass
class ShimView:
    shim: ShimProcess
    tasks: D.TasksResponse | None
    error: str = ""

    @property
    def pod(self) -> D.PodInfo:
        return self.tasks.pod if self.tasks is not None else D.PodInfo(id=self.shim.id)

    def label(self) -> str:
        pod = self.pod
        name = f"{pod.namespace}/{pod.name}" if pod.name else pod.id
        shim = self.shim
        return f"{name} (pod {pod.id[:12]}, shim pid {shim.pid}, containerd namespace {shim.namespace})"


async def survey(shims: list[ShimProcess] | None = None, timeout: float = CALL_TIMEOUT) -> list[ShimView]:
    shims = find_shims() if shims is None else shims

    async def one(shim: ShimProcess) -> ShimView:
        try:
            return ShimView(shim, await call(shim, "Tasks", D.TasksRequest(), D.TasksResponse, timeout))
        except ShimError as e:
            if e.code == Code.UNIMPLEMENTED:
                return ShimView(shim, None, "no Diag service: an older podshim")
            return ShimView(shim, None, str(e))
        except DiagUnavailable as e:
            return ShimView(shim, None, str(e))

    return list(await asyncio.gather(*(one(s) for s in shims)))


class NotFoundError(Exception):
    pass


class AmbiguousError(Exception):
    pass


def _where(views: list[ShimView]) -> str:
    if not views:
        return "no podshim process is running on this node"
    addresses = sorted({v.shim.containerd_address for v in views})
    namespaces = sorted({v.shim.namespace for v in views})
    pids = ", ".join(str(v.shim.pid) for v in views)
    return (
        f"looked at {len(views)} podshim process(es) (pids {pids}) of containerd "
        f"{', '.join(addresses)} in namespace(s) {', '.join(namespaces)}"
    )


def resolve(views: list[ShimView], query: str) -> tuple[ShimView, str]:
    """The shim meant by ``query`` (a pod name prefix, pod id prefix or container id), and the
    container id when the query named one.  Exact matches win over prefixes."""
    if not query:
        raise NotFoundError("name a pod (name or id prefix) or a container id")
    exact: list[tuple[ShimView, str]] = []
    prefix: list[tuple[ShimView, str]] = []
    for v in views:
        pod = v.pod
        containers = [t.id for t in v.tasks.tasks] if v.tasks is not None else []
        if query in containers:
            exact.append((v, query))
        elif query in (pod.id, pod.name, v.shim.id):
            exact.append((v, ""))
        elif any(s.startswith(query) for s in (pod.id, pod.name, v.shim.id) if s):
            prefix.append((v, ""))
    matches = exact or prefix
    if not matches:
        raise NotFoundError(f"no pod or container matches {query!r}: {_where(views)}")
    if len(matches) > 1:
        listing = "\n".join(f"  {v.label()}" for v, _ in matches)
        raise AmbiguousError(f"{query!r} matches {len(matches)} pods; say which:\n{listing}")
    return matches[0]
