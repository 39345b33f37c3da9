"""The client API: ``wss://<client.listen>/v1`` with a JWT checked before the upgrade,
CBOR requests answered by id. See docs/client-protocol.md."""
