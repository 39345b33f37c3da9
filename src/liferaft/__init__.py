"""liferaft: a Raft consensus cluster serving a transactional key-value store."""

__version__ = "0.1.0"
