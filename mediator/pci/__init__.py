"""Pure PCI knowledge: registers, capability IDs and lengths, chains, BARs, dumps.

Nothing here knows about a device, a policy or the wire; every function takes
bytes and returns facts, and treats its input as untrusted.
"""
