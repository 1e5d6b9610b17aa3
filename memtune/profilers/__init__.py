"""Observers used by `memtune profile`: memory, timing and hardware."""
