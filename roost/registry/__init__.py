"""Session registry and router: where is a user connected, and push to it there.

Embedded mode uses ``MemoryRegistry`` (one process). A push is best effort by
design: when it cannot reach a session, the message simply stays in the
store's inbox and the next drain delivers it.
"""
