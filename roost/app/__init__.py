"""``roost app``: the graphical chat, served to a browser from this machine.

The app runs one SDK ``Client`` on the user's state (keys, outbox, message
database) and serves a small UI on 127.0.0.1 only. The browser talks only to
this process, over one WebSocket (``roost.app.bridge`` relays commands and SDK
events); every request must carry the run's secret (``roost.app.guard``).
"""
