"""The ``podshim`` command: install, vm-image, and the diagnostics (ps, tasks, stacks, exec,
share, top, logs, monitor) over each shim's Diag service."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import click
from rich.console import Console

from podshim.cli import install as installing

if TYPE_CHECKING:
    from podshim.cli.diag import ShimView
    from podshim.vm.image import Image
    from podshim.vm.layer import Layer

console = Console()


@click.group()
def cli() -> None:
    """podshim: a pod-aware containerd runtime v2 shim."""


@cli.command()
@click.option("--print", "print_only", is_flag=True, help="Only print the config stanzas and RuntimeClasses.")
@click.option("--config", "config_path", default="/etc/containerd/config.toml", show_default=True)
@click.option("--bin-dir", default="/usr/local/bin", show_default=True, help="Where to link the shim binary.")
@click.option(
    "--options-dir", default=installing.OPTIONS_DIR, show_default=True, help="Where handler options files go."
)
@click.option("--handler", default="podshim", show_default=True, help="CRI runtime handler name.")
@click.option(
    "--host-handler",
    default="podshim-host",
    show_default=True,
    help="Handler for host-process pods (root on the node); an empty name adds none.",
)
def install(
    print_only: bool, config_path: str, bin_dir: str, options_dir: str, handler: str, host_handler: str
) -> None:
    """Register podshim with containerd as CRI runtime handlers."""
    handlers = [installing.default_handler(handler)]
    if host_handler:
        handlers.append(installing.host_handler(host_handler))
    if print_only:
        for h in handlers:
            path = installing.options_path(h.name, options_dir)
            click.echo(f"# containerd config.toml: runtime handler {h.name}")
            click.echo(installing.handler_stanza(h.name, path))
            click.echo(f"# {path}")
            click.echo(h.options)
            click.echo("# Kubernetes RuntimeClass selecting it:")
            click.echo(installing.runtime_class(h))
        return
    target = installing.link_binary(bin_dir)
    console.print(f"linked [bold]{target}[/] -> {installing.shim_executable()}")
    for h in handlers:
        path = installing.options_path(h.name, options_dir)
        if installing.write_options(path, h.options):
            console.print(f"wrote the options of [bold]{h.name}[/] to {path}")
        else:
            console.print(f"kept the existing options file {path}")
        if installing.add_to_config(config_path, h.name, path):
            console.print(f"added runtime handler [bold]{h.name}[/] to {config_path}; restart containerd")
        else:
            console.print(f"{config_path} already has runtime handler [bold]{h.name}[/]")


@cli.command("vm-image")
@click.option(
    "--dir", "directory", default="", help="Cache dir [default: $PODSHIM_VM_DIR or /var/lib/podshim/vm]."
)
@click.option("--force", is_flag=True, help="Rebuild even when the cache is up to date.")
@click.option(
    "--template/--no-template",
    default=True,
    help="Also build the VM template of the default shape (256 MiB, 1 vCPU), as the first VM pod would.",
)
def vm_image(directory: str, force: bool, template: bool) -> None:
    """Prepare the pod VM's kernel and initramfs (Debian's kernel, our guest layer) and the
    default VM template (cached, idempotent)."""
    from podshim.vm import image, layer

    def say(msg: str) -> None:
        console.print(msg, highlight=False)

    try:
        img = image.prepare(directory, force=force, log=say)
        guest = layer.prepare(img, force=force, log=say)
    except image.ImageError as e:
        raise click.ClickException(str(e)) from e
    from podshim.vm import template as vmtemplate

    for old in vmtemplate.prune(vmtemplate.root(img.dir)):
        say(f"removed a VM template no shape keys to any more (kernel, guest layer or qemu changed): {old}")
    if template:
        _default_template(img, guest, say)


def _default_template(img: Image, guest: Layer, say: Callable[[str], None]) -> None:
    from podshim.backends.vm.spec import DEFAULT_MEMORY_MIB, DEFAULT_VCPUS
    from podshim.system.reaper import REAPER
    from podshim.vm import template

    shape = template.Shape(DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, img.kernel, guest.initrd)

    async def run() -> template.Template:
        REAPER.install(asyncio.get_running_loop())
        try:
            return await template.ensure(shape, template.root(img.dir))
        finally:
            REAPER.uninstall()

    try:
        t = asyncio.run(run())
    except template.TemplateUnavailable as e:
        # Not fatal: pods boot cold and say why.
        say(f"no VM template: {e}")
        return
    say(f"VM template ready: {t.dir}")


# -- diagnostics ----------------------------------------------------------------------------------


def _pick(query: str) -> tuple[ShimView, str]:
    from podshim.cli.diag import AmbiguousError, NotFoundError, resolve, survey

    views = asyncio.run(survey())
    try:
        return resolve(views, query)
    except (NotFoundError, AmbiguousError) as e:
        raise click.ClickException(str(e)) from e


def _diag(view: ShimView, method: str, req: object, resp_type: type, timeout: float | None = 10.0) -> object:
    from podshim.cli.diag import DiagUnavailable, call
    from podshim.errdefs import ShimError

    try:
        return asyncio.run(call(view.shim, method, req, resp_type, timeout))  # type: ignore[arg-type]
    except (DiagUnavailable, ShimError) as e:
        raise click.ClickException(f"{method} on {view.label()}: {e}") from e


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="The same, as JSON.")
def ps(as_json: bool) -> None:
    """Every podshim on this node: shim, pod, tasks and execs."""
    from podshim.cli import render
    from podshim.cli.diag import survey

    views = asyncio.run(survey())
    if as_json:
        click.echo(json.dumps(render.as_json(views), indent=2))
    else:
        console.print(render.ps_tree(views))


@cli.command()
@click.argument("pod")
@click.option("--json", "as_json", is_flag=True, help="The same, as JSON.")
def tasks(pod: str, as_json: bool) -> None:
    """The tasks and execs of one pod (name prefix, id prefix or a container id)."""
    from podshim.cli import render

    view, _ = _pick(pod)
    if view.tasks is None:
        raise click.ClickException(f"{view.label()} is not answering: {view.error}")
    if as_json:
        click.echo(json.dumps(render.as_json([view])[0], indent=2))
    else:
        console.print(render.tasks_table(view))


@cli.command()
@click.argument("pod")
def stacks(pod: str) -> None:
    """Every thread's and asyncio task's stack in the pod's shim (and its VM's guest agent)."""
    from podshim.api import diag_pb2 as D

    view, _ = _pick(pod)
    resp = _diag(view, "Stacks", D.StacksRequest(), D.StacksResponse)
    assert isinstance(resp, D.StacksResponse)
    click.echo(f"=== shim {view.shim.pid} ===\n{resp.shim}")
    if resp.guest or resp.guest_error:
        click.echo(f"=== guest agent ===\n{resp.guest or resp.guest_error}")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("pod")
@click.option("-t", "--tty", is_flag=True, help="Allocate a terminal.")
@click.option("-e", "--env", multiple=True, help="KEY=VALUE for the command's environment.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec(pod: str, tty: bool, env: tuple[str, ...], command: tuple[str, ...]) -> None:
    """Run COMMAND in the pod's VM guest (VM pods) or in its shim's namespaces (others).

    podshim exec POD [-t] -- CMD ARGS...
    """
    from podshim.cli.diag import DiagUnavailable
    from podshim.cli.execio import run_exec
    from podshim.errdefs import ShimError

    view, _ = _pick(pod)
    try:
        resp = asyncio.run(run_exec(view.shim, list(command), tty, list(env)))
    except (DiagUnavailable, ShimError) as e:
        raise click.ClickException(f"exec in {view.label()}: {e}") from e
    sys.stdout.flush()
    sys.exit(resp.exit_code)


@cli.command()
@click.argument("pod")
@click.argument("host_path")
@click.argument("guest_path")
@click.option("--writable", is_flag=True, help="Let the guest write (read-only by default).")
def share(pod: str, host_path: str, guest_path: str, writable: bool) -> None:
    """Share HOST_PATH into a VM pod's guest at GUEST_PATH."""
    import os

    from podshim.api import diag_pb2 as D

    view, _ = _pick(pod)
    req = D.ShareRequest(host_path=os.path.abspath(host_path), guest_path=guest_path, writable=writable)
    _diag(view, "Share", req, D.ShareResponse, timeout=60.0)
    mode = "read-write" if writable else "read-only"
    console.print(f"shared {req.host_path} at {guest_path} in {view.label()} ({mode})")


@cli.command()
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--iterations", default=0, help="Stop after this many refreshes (0: until Ctrl-C).")
def top(interval: float, iterations: int) -> None:
    """A live view of every shim: tasks, memory, CPU."""
    from rich.live import Live

    from podshim.cli import render
    from podshim.cli.diag import survey

    last: dict[int, tuple[float, float]] = {}

    def frame() -> object:
        views = asyncio.run(survey(timeout=max(0.5, interval / 2)))
        now = time.monotonic()
        rates = {}
        for v in views:
            if v.tasks is None:
                continue
            cpu = v.tasks.shim.cpu_seconds
            prev = last.get(v.shim.pid)
            if prev is not None and now > prev[0]:
                rates[v.shim.pid] = (cpu - prev[1]) / (now - prev[0])
            last[v.shim.pid] = (now, cpu)
        return render.top_table(views, rates)

    n = 0
    with Live(frame(), console=console, auto_refresh=False) as live:  # type: ignore[arg-type]
        try:
            while iterations == 0 or n < iterations:
                n += 1
                if n > 1:
                    live.update(frame(), refresh=True)  # type: ignore[arg-type]
                else:
                    live.refresh()
                if iterations == 0 or n < iterations:
                    time.sleep(interval)
        except KeyboardInterrupt:
            pass


@cli.command()
@click.argument("pod")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
def logs(pod: str, follow: bool) -> None:
    """The shim's own log lines (the last ones it keeps in memory), without restarting containerd."""
    from podshim.api import diag_pb2 as D
    from podshim.cli.diag import DiagUnavailable, call
    from podshim.errdefs import ShimError

    view, _ = _pick(pod)
    after = 0
    try:
        while True:
            try:
                resp = asyncio.run(call(view.shim, "Logs", D.LogsRequest(after=after), D.LogsResponse))
            except (DiagUnavailable, ShimError) as e:
                if after and follow:
                    click.echo(f"# the shim stopped answering: {e}", err=True)
                    return
                raise click.ClickException(f"Logs of {view.label()}: {e}") from e
            if resp.dropped and after:
                click.echo(f"# {resp.dropped} line(s) fell out of the shim's buffer", err=True)
            for line in resp.lines:
                click.echo(line.text)
                after = line.seq
            if not follow:
                return
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


@cli.command()
@click.option("--listen", default="127.0.0.1:9309", show_default=True, help="HOST:PORT for /metrics.")
@click.option("--timeout", default=2.0, show_default=True, help="Seconds each shim has to answer a scrape.")
def monitor(listen: str, timeout: float) -> None:
    """A node-level Prometheus exporter: every shim's metrics at http://LISTEN/metrics."""
    from podshim.cli import monitor as mon

    server, thread = mon.serve(listen, timeout)
    console.print(f"serving http://{listen}/metrics", highlight=False)
    try:
        thread.join()
    except KeyboardInterrupt:
        server.shutdown()


def main() -> None:
    cli()
