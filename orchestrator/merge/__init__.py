"""The merge queue: candidates, speculation, and the gate runner."""
