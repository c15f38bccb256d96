"""How a dataset description runs: node iterators, cursors, the public iterator."""
