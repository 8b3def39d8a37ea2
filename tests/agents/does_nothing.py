"""An agent that exits 0 without doing anything."""
