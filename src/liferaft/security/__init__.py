"""Everything that decides whom to trust: the cluster CA and node certificates (identity is
the DNS SAN equal to the node id), and the client tokens that carry roles and key prefixes.

Kept free of Trio and storage so that the CLI, the transport, the API server and the client
library can all share it, and so that it can be tested with plain function calls.
"""
