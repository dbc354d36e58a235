"""Devices the virtual device is built on.

``base`` defines what a backend offers (config space, regions, reset);
``sim`` serves a device profile (``profile``) from memory, for tests, demos
and users without the hardware. A backend knows neither the wire nor the
policy: it is the "hardware" under the quirk table.
"""
