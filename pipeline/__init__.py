"""Shared core of blynk-bridge: stream contracts, Redis streams, configuration, Blynk client.

Nothing in this package imports from ``workers`` or ``emulators``.
"""
