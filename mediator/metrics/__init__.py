"""Metrics: what the daemon counts, in the Prometheus text format, and how it is exported.

``registry`` holds counters, gauges and histograms with labels and renders
them; ``series`` is what the daemon records (the process series and one
``DeviceMetrics`` per device, which implements the device's and the server's
event protocols); ``exporters`` writes them to a textfile for
node_exporter or answers HTTP on a UNIX socket.

Written here rather than taken from prometheus_client: that is a dependency
for about 150 lines, and it takes a mutex on every increment, where the hot
path (every vfio-user request; a config read round trip is ~15 µs) must stay
lock- and allocation-light.
"""
