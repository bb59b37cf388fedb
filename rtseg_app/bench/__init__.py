"""Measurements behind ``rtseg bench``: inference, RTSTRUCT build, one federated round, the machine.

Each function measures one thing and returns plain values (JSON-ready dicts);
the DICOM node's own figures (receive throughput, turnaround) live with the
node in ``rtseg_app.bench.node``, and ``rtseg bench`` composes both.
"""
