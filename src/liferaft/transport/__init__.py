"""Peer links: the CBOR wire codec for Raft messages and the mutual-TLS WebSocket transport
that carries them, with bounded queues, reconnects with jittered backoff and one WebSocket
message per batch (docs/transport.md)."""
