"""``python -m liferaft`` is the ``liferaft`` command."""

from liferaft.cli import main

main()
