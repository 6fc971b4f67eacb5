"""axctl: status, a live view and task control for an axfs tree, all through its files.

Every subcommand is plain file operations on the mount (``tree.py``), so the tree
stays the one interface: what axctl does, a shell script can do with ``cat`` and ``echo``.
"""
