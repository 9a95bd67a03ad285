"""The ``podshim`` command."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import click
from rich.console import Console

from podshim.cli import install as installing

if TYPE_CHECKING:
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
    if template:
        _default_template(img, guest, say)


def _default_template(img: Image, guest: Layer, say: Callable[[str], None]) -> None:
    import asyncio

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


def main() -> None:
    cli()
