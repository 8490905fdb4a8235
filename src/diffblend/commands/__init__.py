"""Subcommands of the ``diffblend`` CLI; each module defines ``add_parser`` and ``run``.

Modules here hold no logic of their own: they parse arguments and call the library.
"""
