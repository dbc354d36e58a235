"""The guest's view of a device, decided by the quirk table.

``plan`` applies the matching quirks to a physical function once and fixes
every decision (segments and rules, shadow, BAR sizes, traps, post-reset
writes); ``config_view`` serves config accesses segment by segment;
``device`` serves every region, trap windows and padding included, and
resets. Nothing here knows the wire: the vfio-user server calls in.
"""
