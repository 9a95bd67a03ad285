"""The ``podshim`` command."""

from __future__ import annotations

import click
from rich.console import Console

from podshim.cli import install as installing

console = Console()


@click.group()
def cli() -> None:
    """podshim: a pod-aware containerd runtime v2 shim."""


@cli.command()
@click.option("--print", "print_only", is_flag=True, help="Only print the config stanza and RuntimeClass.")
@click.option("--config", "config_path", default="/etc/containerd/config.toml", show_default=True)
@click.option("--bin-dir", default="/usr/local/bin", show_default=True, help="Where to link the shim binary.")
@click.option("--handler", default="podshim", show_default=True, help="CRI runtime handler name.")
def install(print_only: bool, config_path: str, bin_dir: str, handler: str) -> None:
    """Register podshim with containerd as a CRI runtime handler."""
    stanza = installing.handler_stanza(handler)
    if print_only:
        click.echo(stanza, nl=False)
        click.echo("\n# Kubernetes RuntimeClass selecting it:")
        click.echo(installing.RUNTIME_CLASS.replace("handler: podshim", f"handler: {handler}"), nl=False)
        return
    target = installing.link_binary(bin_dir)
    console.print(f"linked [bold]{target}[/] -> {installing.shim_executable()}")
    if installing.add_to_config(config_path, handler):
        console.print(f"added runtime handler [bold]{handler}[/] to {config_path}; restart containerd")
    else:
        console.print(f"{config_path} already has runtime handler [bold]{handler}[/]")


@cli.command("vm-image")
@click.option(
    "--dir", "directory", default="", help="Cache dir [default: $PODSHIM_VM_DIR or /var/lib/podshim/vm]."
)
@click.option("--force", is_flag=True, help="Rebuild even when the cache is up to date.")
def vm_image(directory: str, force: bool) -> None:
    """Prepare the pod VM's kernel and initramfs from Debian packages (cached, idempotent)."""
    from podshim.vm import image

    try:
        image.prepare(directory, force=force, log=lambda msg: console.print(msg, highlight=False))
    except image.ImageError as e:
        raise click.ClickException(str(e)) from e


def main() -> None:
    cli()
