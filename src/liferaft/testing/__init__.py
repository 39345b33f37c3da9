"""Tools to prove a Raft cluster correct: a deterministic simulator (``sim``), a
faulty network (``network``), Raft's safety checks (``checker``) and seeded random runs
(``chaos``). Shipped with the package so users can test their own changes with them."""
