"""The Trio runtime of one liferaft node: it wires the core, storage, transport and the
state machine together (docs/architecture.md). Import ``liferaft.node.node`` for
``Node``."""
