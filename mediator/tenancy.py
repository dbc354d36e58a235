"""Who owns what: the policy context of each device, from the daemon's config.

A link is allowed only when both its ends belong to the same tenant: the
peer it leads to (named by device name, BDF or serial number) is a device of
this config whose tenant equals this device's. Everything else (a peer
nobody here owns, a peer of another tenant, a device with no tenant) is
foreign and gets disabled after every reset. Ownership changes when the
config does; nothing here is decided by a client.
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


def device_context(settings: Settings, device: DeviceSpec) -> DeviceContext:
    return DeviceContext(
        tenant=device.tenant,
        allowed_links=allowed_links(settings, device),
        gpudirect_clique=device.gpudirect_clique,
    )
