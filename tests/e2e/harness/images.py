"""A minimal busybox OCI image, built in pure Python from the host's static busybox.

No registry is reachable from CI, so the image is assembled locally: one uncompressed layer with
/bin/busybox plus a symlink per applet, a config with Cmd ["sh"], and an OCI layout tarball that
`ctr images import` accepts. Timestamps are fixed so the digests are reproducible across runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .ctr import Ctr

BUSYBOX_REF = "docker.io/library/busybox:latest"
BUSYBOX_BINARY = Path("/bin/busybox")

# Used only when `busybox --list` fails; the applets the scenarios rely on.
FALLBACK_APPLETS = (
    "sh", "true", "false", "echo", "cat", "sleep", "ls", "ps", "dd", "nc", "wget", "uname", "id",
    "hostname", "ip", "env", "kill", "head", "tail", "yes", "top", "mkdir", "rm", "tty", "stty",
    "seq", "grep", "sed", "awk", "wc", "touch", "test", "[", "printf", "readlink", "mount", "umount",
)

_MTIME = 1577836800  # 2020-01-01: fixed so the layer digest does not change between sessions
_MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_MT_CONFIG = "application/vnd.oci.image.config.v1+json"
_MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
_MT_INDEX = "application/vnd.oci.image.index.v1+json"

_PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n"
_GROUP = b"root:x:0:\ntty:x:5:\nnogroup:x:65534:\n"


@dataclass(frozen=True)
class ImageTarball:
    path: Path
    ref: str
    manifest_digest: str


_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def _goarch() -> str:
    machine = platform.machine()
    return _GOARCH.get(machine, machine)


def busybox_applets(busybox: Path = BUSYBOX_BINARY) -> list[str]:
    try:
        out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return sorted(FALLBACK_APPLETS)
    names = {a for a in out.stdout.split() if a and "/" not in a and a != "busybox"}
    return sorted(names)


def _tar_layer(busybox: Path, applets: list[str]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = mode
            info.mtime = _MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.linkname = link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for d, mode in (("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("home", 0o755), ("proc", 0o755),
                        ("root", 0o700), ("sys", 0o755), ("tmp", 0o1777), ("usr", 0o755), ("usr/bin", 0o755),
                        ("usr/sbin", 0o755), ("var", 0o755)):
            add(d, tarfile.DIRTYPE, mode)
        add("bin/busybox", tarfile.REGTYPE, 0o755, busybox.read_bytes())
        for applet in applets:
            add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        add("etc/passwd", tarfile.REGTYPE, 0o644, _PASSWD)
        add("etc/group", tarfile.REGTYPE, 0o644, _GROUP)
    return raw.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes) -> dict[str, object]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"digest": digest, "size": len(data)}


def build_busybox_tarball(
    out: Path, *, ref: str = BUSYBOX_REF, busybox: Path = BUSYBOX_BINARY
) -> ImageTarball:
    """Write an OCI image layout tarball for `ref` to `out` (a file path) and return its description."""
    if not busybox.is_file():
        raise FileNotFoundError(f"{busybox} is missing: install busybox-static (scripts/setup.sh does)")
    blobs: dict[str, bytes] = {}
    # Uncompressed on purpose: the layer is a few MiB and gzip would cost more time than it saves.
    layer = _tar_layer(busybox, busybox_applets(busybox))
    layer_desc = {"mediaType": _MT_LAYER, **_blob(blobs, layer)}
    arch = _goarch()
    config = {
        "architecture": arch,
        "os": "linux",
        "created": "2020-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
        "history": [{"created": "2020-01-01T00:00:00Z", "created_by": "podshim tests/e2e/harness/images.py"}],
    }
    config_desc = {"mediaType": _MT_CONFIG, **_blob(blobs, json.dumps(config, sort_keys=True).encode())}
    manifest = {"schemaVersion": 2, "mediaType": _MT_MANIFEST, "config": config_desc, "layers": [layer_desc]}
    manifest_desc = _blob(blobs, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": _MT_INDEX,
        "manifests": [
            {
                "mediaType": _MT_MANIFEST,
                **manifest_desc,
                "platform": {"architecture": arch, "os": "linux"},
                # ctr import names the image from this annotation, so no --base-name is needed.
                "annotations": {
                    "io.containerd.image.name": ref,
                    "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1],
                },
            }
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def add_file(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = _MTIME
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))

        add_file("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add_file("index.json", json.dumps(index, sort_keys=True).encode())
        for digest, data in blobs.items():
            add_file("blobs/sha256/" + digest.split(":", 1)[1], data)
    tmp.replace(out)
    return ImageTarball(path=out, ref=ref, manifest_digest=str(manifest_desc["digest"]))


def import_image(ctr: Ctr, tarball: ImageTarball) -> None:
    """Import `tarball` into ctr's namespace (images are per namespace in containerd)."""
    res = ctr.run("images", "import", str(tarball.path), timeout=120)
    if res.rc != 0:
        raise RuntimeError(f"ctr images import failed (rc={res.rc}): {res.stderr.strip()}")
