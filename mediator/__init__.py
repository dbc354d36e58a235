"""vfio-mediator: serve a VFIO PCI device to a vfio-user VMM through a policed view.

The guest sees a virtual PCI function whose config space and BARs are decided,
byte by byte, by a quirk table applied to the physical device (see
``mediator.virt``). ``mediator.pci`` holds pure PCI knowledge, ``mediator.quirks``
the policy as data, and ``mediator.backends`` the devices the view is built on.
"""

__version__ = "0.1.0"
