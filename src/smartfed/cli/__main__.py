"""``python -m smartfed.cli``: the ``smartfed`` command."""

from . import main

main()
