"""The Trio runtime of one liferaft node: it wires the core, storage, transport and the
state machine together (DESIGN.md §4). Import ``liferaft.node.node`` for ``Node``."""
