"""Who owns what: the policy context of each device, from the daemon's config.

A link is allowed only when both its ends belong to the same tenant: the
peer it leads to (named by device name, BDF or serial number) is a device of
this config whose tenant equals this device's. Everything else (a peer
nobody here owns, a peer of another tenant, a device with no tenant) is
foreign and gets disabled after every reset. Ownership changes when the
config does; nothing here is decided by a client.

A GPUDirect clique tells the guest's driver that peer-to-peer DMA to the
clique's other GPUs works, so it is given only where it can: the peers are
devices of this config in the same clique and of the same tenant (one VM
gets them), every one of them lets QEMU mmap its BARs (the fd-less maps
that the VM's IOMMU space resolves to peer BARs come only from mmapped
BARs: docs/vm-space.md), and the device's IOMMU API can map device memory.
"""

from __future__ import annotations

from mediator.settings import DeviceSpec, Settings
from mediator.virt.plan import DeviceContext


def allowed_links(settings: Settings, device: DeviceSpec) -> frozenset[int]:
    if device.tenant is None:
        return frozenset()
    allowed = set()
    for link, peer_name in device.links.items():
        peer = settings.find(peer_name)
        if peer is not None and peer.name != device.name and peer.tenant == device.tenant:
            allowed.add(int(link))
    return frozenset(allowed)


def gpudirect_peers(settings: Settings, device: DeviceSpec) -> tuple[str, ...]:
    """The devices P2P DMA can reach from ``device`` in its clique."""
    return tuple(
        peer.name
        for peer in settings.devices
        if peer.name != device.name
        and peer.gpudirect_clique == device.gpudirect_clique
        and peer.tenant == device.tenant
        and peer.bar_access == "mmap"
    )


def device_context(settings: Settings, device: DeviceSpec, peer_dma: str | None) -> DeviceContext:
    """``peer_dma``: why the device's backend cannot map peers' BARs, or None when it can."""
    clique, peers = device.gpudirect_clique, gpudirect_peers(settings, device)
    withheld = None
    if clique is not None:
        if device.bar_access != "mmap":
            withheld = 'bar_access = "trap": QEMU maps none of its BARs, so no peer DMA can be resolved'
        elif not peers:
            withheld = (
                f'no other device of the config is in clique {clique} with its tenant and bar_access = "mmap"'
            )
        elif peer_dma is not None:
            withheld = peer_dma
    return DeviceContext(
        tenant=device.tenant,
        allowed_links=allowed_links(settings, device),
        gpudirect_clique=None if withheld else clique,
        gpudirect_peers=() if withheld else peers,
        gpudirect_withheld=withheld,
    )
