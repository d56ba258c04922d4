"""The Kubernetes path: CRI ``runtime.v1.ImageService/PullImage`` into lazysnap.

containerd runs with its CRI plugin (``snapshotter = "lazysnap"``, snapshot annotations on,
registry hosts from a certs.d directory) and the tests speak CRI to it with the stubs generated from
our own ``proto/runtime/v1/api.proto``, as the kubelet would. Images land in namespace ``k8s.io``,
where ``ctr run`` can start them too.

Private images: containerd never hands a pull secret to a snapshotter. Through lazysnap's CRI proxy
(``[cri] enable``) the kubelet's ``auth`` reaches both containerd (the request is forwarded
unchanged) and lazysnap's registry client, so the layers are lazy; straight to containerd, lazysnap
has no credentials and containerd pulls every layer itself (``auth-failed``).
"""

from __future__ import annotations

import hashlib
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from snapshotter.api.runtime.v1 import api_pb2 as cri
from snapshotter.api.runtime.v1 import api_pb2_grpc as cri_grpc
from tests.e2e.conftest import AUTH_PASSWORD, AUTH_USER
from tests.support.daemon import SNAPSHOTTER, LazysnapDaemon, write_config
from tests.support.lazy import wait_until
from tests.support.mounts import lazy_layer_mounts
from tests.support.oci import PushedImage
from tests.support.proxy import CountingProxy
from tests.support.scratch import make_tmpdir, remove_tmpdir, tmpdir
from tests.support.services import (
    Containerd,
    EstargzImage,
    Registry,
    build_estargz_image,
    require_privileges,
    run_in_container,
    unique_id,
    verify_container_fs,
)

K8S_NAMESPACE = "k8s.io"
LAYERS = 4


@dataclass(frozen=True)
class Images:
    public: EstargzImage  # in the session registry (no auth)
    private: EstargzImage  # in auth_registry (Basic auth)


@pytest.fixture(scope="module")
def images(registry: Registry, auth_registry: Registry) -> Iterator[Images]:
    with tmpdir() as workdir:
        public = build_estargz_image(workdir / "public", registry, registry.host, "lztest/cri:esgz")
        private = build_estargz_image(
            workdir / "private",
            registry,
            auth_registry.host,
            "lztest/cri-private:esgz",
            push_user=f"{AUTH_USER}:{AUTH_PASSWORD}",
        )
        yield Images(public, private)


@dataclass
class CriStack:
    daemon: LazysnapDaemon
    containerd: Containerd
    channels: list[grpc.Channel]

    def image_service(self, socket: str | Path) -> cri_grpc.ImageServiceStub:
        channel = grpc.insecure_channel(f"unix:{socket}")
        self.channels.append(channel)
        return cri_grpc.ImageServiceStub(channel)

    @property
    def containerd_cri(self) -> cri_grpc.ImageServiceStub:
        """Straight to containerd's CRI plugin."""
        return self.image_service(self.containerd.address)

    @property
    def proxy_cri(self) -> cri_grpc.ImageServiceStub:
        """Through lazysnap's CRI proxy."""
        return self.image_service(self.daemon.workdir / "cri.sock")

    def wait_connected(self) -> None:
        """Until containerd reaches lazysnap again after a restart (its connection backs off for up
        to 3 s). ``ctr snapshots ls`` would not tell: containerd answers it from its own metadata;
        a Prepare reaches the snapshotter."""
        cd = self.containerd
        key = unique_id("probe")

        def prepared() -> bool:
            args = ("snapshots", "--snapshotter", SNAPSHOTTER)
            if cd.ctr(*args, "prepare", key, check=False).returncode != 0:
                return False
            cd.ctr(*args, "rm", key)
            return True

        assert wait_until(prepared), cd.log_tail()

    def lazy_mounts(self) -> list[str]:
        return lazy_layer_mounts(self.daemon.root)


MakeStack = Callable[..., CriStack]


@pytest.fixture
def cri_stack() -> Iterator[MakeStack]:
    """``cri_stack([registry hosts], persist_credentials=False)``: containerd with the CRI plugin
    using lazysnap, a certs.d directory sending those hosts plain HTTP (for both), and lazysnap
    with its CRI proxy in front of containerd and no credentials of its own. lazysnap starts
    first, so containerd's first dial finds it."""
    started: list[tuple[CriStack, Path, Path]] = []

    def make(hosts: list[str], *, persist_credentials: bool = False, fallback: str = "off") -> CriStack:
        require_privileges()
        workdir, cd_workdir = make_tmpdir(), make_tmpdir()  # its own name: it names a cgroup parent
        certs_d = workdir / "certs.d"
        for host in hosts:
            (certs_d / host).mkdir(parents=True)
            (certs_d / host / "hosts.toml").write_text(
                f'server = "http://{host}"\n\n[host."http://{host}"]\n  capabilities = ["pull", "resolve"]\n'
            )
        daemon = LazysnapDaemon(workdir)
        cd = Containerd(
            cd_workdir,
            {SNAPSHOTTER: str(daemon.address)},
            namespace=K8S_NAMESPACE,
            cri=True,
            cri_snapshotter=SNAPSHOTTER,
            cri_registry_config_path=certs_d,
        )
        daemon.config = write_config(
            workdir / "config.toml",
            {
                "fetch": {
                    "rest": "off",
                    "hosts_dir": str(certs_d),
                    "docker_config": str(workdir / "no-config.json"),
                },
                "cri": {
                    "enable": True,
                    "listen": str(workdir / "cri.sock"),
                    "containerd_socket": cd.address,
                    "persist_credentials": persist_credentials,
                },
                "fallback": {"mode": fallback},
            },
        )
        stack = CriStack(daemon, cd, [])
        started.append((stack, workdir, cd_workdir))
        daemon.start()
        cd.start()
        return stack

    yield make
    problems = []
    for stack, workdir, cd_workdir in started:  # containerd first: it holds mounts of lazysnap's layers
        for channel in stack.channels:
            channel.close()
        try:
            left = stack.containerd.stop()
            if left:
                problems.append(f"mounts left under {cd_workdir}: {[m.target for m in left]}")
        finally:
            stack.daemon.stop()
            remove_tmpdir(cd_workdir)
            remove_tmpdir(workdir)
    assert not problems, problems


def pull(stub: cri_grpc.ImageServiceStub, ref: str, auth: cri.AuthConfig | None = None) -> str:
    request = cri.PullImageRequest(image=cri.ImageSpec(image=ref))
    request.sandbox_config.metadata.name = "lz-pod"
    request.sandbox_config.metadata.namespace = "default"
    if auth is not None:
        request.auth.CopyFrom(auth)
    response: cri.PullImageResponse = stub.PullImage(request, timeout=120)
    return str(response.image_ref)


def read_range(stack: CriStack, ref: str, image: EstargzImage, mib: int = 2) -> None:
    """Read 1 MiB at ``mib`` MiB of the large file in a container of the CRI-pulled image."""
    skip, count = mib * 16, 16  # 64 KiB blocks
    script = f"/bin/busybox dd if=/data/large.bin bs=65536 skip={skip} count={count} 2>/dev/null"
    out = run_in_container(
        stack.containerd, ref, "/bin/sh", "-c", script + " | /bin/busybox sha256sum", snapshotter=SNAPSHOTTER
    )
    piece = image.large[skip * 65536 : (skip + count) * 65536]
    assert out.split()[0] == hashlib.sha256(piece).hexdigest()


def test_cri_pull_image_is_lazy_and_the_image_service_works(
    images: Images, proxy: CountingProxy, cri_stack: MakeStack
) -> None:
    stack = cri_stack([proxy.host])
    ref = f"{proxy.host}/{images.public.repo_tag}"
    cri_api = stack.containerd_cri
    started = time.monotonic()
    image_id = pull(cri_api, ref)
    pull_seconds = time.monotonic() - started
    pulled = proxy.reset()
    total = images.public.total_size
    print(f"\nCRI PullImage: {pull_seconds:.2f}s, {pulled} of {total} bytes from the registry")
    assert image_id.startswith("sha256:")
    assert pulled < total * 0.1, f"PullImage fetched {pulled} of {total} bytes"
    st = stack.daemon.stats()
    assert st["lazy_mounts"] == LAYERS and not st["not_lazy"], st
    assert len(stack.lazy_mounts()) == LAYERS

    status = cri_api.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)), timeout=30)
    assert status.HasField("image"), status
    assert status.image.id == image_id
    assert ref in status.image.repo_tags
    assert status.image.size >= total  # manifest, config and layer sizes, though layers were not fetched
    listed = cri_api.ListImages(cri.ListImagesRequest(), timeout=30)
    assert image_id in [i.id for i in listed.images]
    fs_info = cri_api.ImageFsInfo(cri.ImageFsInfoRequest(), timeout=30)
    assert fs_info.image_filesystems, fs_info

    # The image runs from lazysnap's FUSE layers, reading only what it touches.
    read_range(stack, ref, images.public)
    assert verify_container_fs(stack.containerd, ref, images.public.expected, snapshotter=SNAPSHOTTER) == []

    cri_api.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=ref)), timeout=30)
    gone = cri_api.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)), timeout=30)
    assert not gone.HasField("image")
    assert image_id not in [i.id for i in cri_api.ListImages(cri.ListImagesRequest(), timeout=30).images]
    # containerd's garbage collector removes the snapshots; lazysnap unmounts their layers.
    assert wait_until(lambda: stack.lazy_mounts() == [], timeout=30), stack.lazy_mounts()


def test_cri_pull_of_a_plain_image_is_unpacked_by_the_eager_fallback(
    base_image: PushedImage, registry: Registry, cri_stack: MakeStack
) -> None:
    """A plain gzip image nobody converted, pulled through CRI PullImage (the labels the CRI
    plugin sends name the manifest by digest): every layer unpacked by lazysnap."""
    stack = cri_stack([registry.host], fallback="eager")
    ref = base_image.ref
    assert pull(stack.containerd_cri, ref).startswith("sha256:")
    st = stack.daemon.stats()
    layers = len(base_image.image.layers)
    assert st["eager"]["fills"] == layers and st["lazy_mounts"] == 0 and not st["not_lazy"], st
    assert verify_container_fs(stack.containerd, ref, base_image.expected, snapshotter=SNAPSHOTTER) == []


def test_pull_secret_through_the_cri_proxy_makes_private_layers_lazy(
    images: Images, auth_proxy: CountingProxy, cri_stack: MakeStack
) -> None:
    stack = cri_stack([auth_proxy.host])
    ref = f"{auth_proxy.host}/{images.private.repo_tag}"
    api = stack.proxy_cri
    auth = cri.AuthConfig(
        username=AUTH_USER, password=AUTH_PASSWORD, server_address=f"http://{auth_proxy.host}"
    )
    image_id = pull(api, ref, auth)
    pulled = auth_proxy.reset()
    st = stack.daemon.stats()
    assert st["lazy_mounts"] == LAYERS and not st["not_lazy"], st
    assert len(stack.lazy_mounts()) == LAYERS
    assert pulled < images.private.total_size * 0.1
    # Everything else goes through the proxy unchanged.
    status = api.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)), timeout=30)
    assert status.image.id == image_id and ref in status.image.repo_tags
    # containerd's errors come back as they are: the same code and message as without the proxy.
    absent = cri.PullImageRequest(image=cri.ImageSpec(image=f"{auth_proxy.host}/lztest/absent:1"), auth=auth)
    answers = []
    for stub in (api, stack.containerd_cri):
        with pytest.raises(grpc.RpcError) as info:
            stub.PullImage(absent, timeout=60)
        answers.append((info.value.code(), info.value.details()))  # type: ignore[attr-defined]
    assert answers[0] == answers[1] and answers[0][0] != grpc.StatusCode.OK, answers
    # Chunks are fetched later, on reads, with the credentials the proxy captured.
    read_range(stack, ref, images.private)
    layers = stack.daemon.stats()["layers"]
    assert sum(layer["bytes"]["on_demand"] for layer in layers.values()) > 0
    log = stack.daemon.log_path.read_text(errors="replace")
    assert "CRI pull" in log and AUTH_PASSWORD not in log


def test_pull_secret_straight_to_containerd_is_not_seen_by_lazysnap(
    images: Images, auth_proxy: CountingProxy, cri_stack: MakeStack
) -> None:
    stack = cri_stack([auth_proxy.host])
    ref = f"{auth_proxy.host}/{images.private.repo_tag}"
    pull(stack.containerd_cri, ref, cri.AuthConfig(username=AUTH_USER, password=AUTH_PASSWORD))
    st = stack.daemon.stats()
    assert st["lazy_mounts"] == 0 and st["not_lazy"] == {"auth-failed": LAYERS}, st
    assert stack.lazy_mounts() == []
    assert auth_proxy.reset() >= images.private.total_size  # containerd downloaded every layer
    read_range(stack, ref, images.private)


def test_persisted_pull_secret_lets_a_restarted_daemon_keep_fetching(
    images: Images, auth_proxy: CountingProxy, cri_stack: MakeStack
) -> None:
    stack = cri_stack([auth_proxy.host], persist_credentials=True)
    ref = f"{auth_proxy.host}/{images.private.repo_tag}"
    auth = cri.AuthConfig(
        username=AUTH_USER, password=AUTH_PASSWORD, server_address=f"http://{auth_proxy.host}"
    )
    pull(stack.proxy_cri, ref, auth)
    saved = stack.daemon.root / "cri" / "credentials.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    cri_socket = stack.daemon.workdir / "cri.sock"
    assert stat.S_IMODE(cri_socket.stat().st_mode) == 0o600  # root only, like the snapshotter's
    stack.daemon.stop()
    assert not cri_socket.exists()  # removed on a clean stop
    stack.daemon.start()  # mounts the lazy layers again; the secret comes back from the file
    assert stack.daemon.stats()["lazy_mounts"] == LAYERS
    stack.wait_connected()
    read_range(stack, ref, images.private, mib=5)  # chunks never fetched before the restart
    layers = stack.daemon.stats()["layers"]
    assert sum(layer["bytes"]["on_demand"] for layer in layers.values()) > 0
    assert AUTH_PASSWORD not in stack.daemon.log_path.read_text(errors="replace")
