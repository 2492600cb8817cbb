"""``python -m xenemu`` is the ``xenemu`` command."""

from xenemu.cli import main

main()
