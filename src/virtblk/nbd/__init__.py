"""The NBD protocol (NetworkBlockDevice/nbd ``doc/proto.md``), sans-IO, both ends.

``wire`` holds the constants and the fixed-size structs. The server (``virtblk nbd``,
which exports any vhost-user-blk device) and the client (``virtblk serve --nbd``, whose
data lives on an NBD server) build on it. Nothing here touches a socket or knows virtio.
"""
