"""The CRI suite's sandbox ("pause") image: tests/cri/pause.c, built static, in an OCI tarball.

No registry is reachable, so CRI must find `sandbox_image` locally: the tests build it here and
import it into containerd's `k8s.io` namespace under exactly that name (see conftest.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import subprocess
import tarfile
from pathlib import Path

from harness.images import ImageTarball

PAUSE_SOURCE = Path(__file__).with_name("pause.c")
# Our own name, so that a missing import fails fast instead of pulling some registry's pause image.
PAUSE_REF = "podshim.test/pause:3.6"

_MTIME = 1577836800
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def compile_pause(out: Path) -> bytes:
    """`gcc -static` tests/cri/pause.c into `out`; returns the binary."""
    out.parent.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["gcc", "-static", "-Os", "-s", "-Wall", "-Werror", "-o", str(out), str(PAUSE_SOURCE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if res.returncode != 0:
        raise RuntimeError(f"gcc -static {PAUSE_SOURCE} failed (gcc and libc6-dev needed):\n{res.stderr}")
    return out.read_bytes()


def _tar(entries: list[tuple[str, bytes | None, int]]) -> bytes:
    """An uncompressed tar of (name, data or None for a directory, mode), with fixed metadata."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.mtime = _MTIME
            info.mode = mode
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def write_oci_tarball(out: Path, ref: str, layer: bytes, config: dict[str, object]) -> ImageTarball:
    """A one-layer OCI image layout tarball that `ctr images import` names `ref`."""
    blobs: dict[str, bytes] = {}

    def blob(media_type: str, data: bytes) -> dict[str, object]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    arch = _GOARCH.get(platform.machine(), platform.machine())
    layer_desc = blob("application/vnd.oci.image.layer.v1.tar", layer)
    image_config = {
        "architecture": arch,
        "os": "linux",
        "created": "2020-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    }
    config_desc = blob("application/vnd.oci.image.config.v1+json", json.dumps(image_config).encode())
    manifest = {
        "schemaVersion": 2,
        "config": config_desc,
        "layers": [layer_desc],
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
    }
    manifest_desc = blob("application/vnd.oci.image.manifest.v1+json", json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                **manifest_desc,
                "platform": {"architecture": arch, "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": ref,
                    "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1],
                },
            }
        ],
    }
    files: list[tuple[str, bytes | None, int]] = [
        ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode(), 0o644),
        ("index.json", json.dumps(index).encode(), 0o644),
        ("blobs", None, 0o755),
        ("blobs/sha256", None, 0o755),
        *((f"blobs/sha256/{d.split(':', 1)[1]}", data, 0o644) for d, data in blobs.items()),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(_tar(files))
    return ImageTarball(path=out, ref=ref, manifest_digest=str(manifest_desc["digest"]))


def build_pause_tarball(workdir: Path, ref: str = PAUSE_REF) -> ImageTarball:
    """Compile pause.c and wrap it as image `ref` (rootfs: /pause only; Entrypoint ["/pause"])."""
    binary = compile_pause(workdir / "pause")
    layer = _tar([("pause", binary, 0o755)])
    return write_oci_tarball(workdir / "pause.tar", ref, layer, {"Entrypoint": ["/pause"]})
