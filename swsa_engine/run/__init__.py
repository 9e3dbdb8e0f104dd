"""The only engine layer that opens a store: inputs, task groups, cube I/O, the scoring passes."""
