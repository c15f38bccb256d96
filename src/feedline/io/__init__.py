"""File formats: text lines (and file listing).

- ``files.py``: datasets read from files.
- ``text.py``: text files, one element per line.
- ``paths.py``: file-name matching with tf.data's rules, for ``Dataset.list_files``.
"""
