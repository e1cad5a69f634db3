"""Delivery decisions as plain data structures and functions.

Nothing here touches sockets, clocks, threads or the disk: time is passed in,
effects are returned. The gateway and the chat service drive these objects;
tests (and a simulator) drive them directly.
"""
