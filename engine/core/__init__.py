"""Layer 0, imports nothing from the engine: what every other layer leans on.

errors (the EngineError family: messages meant for users), paths (the app data, runs and lock
folders), files (atomic writes, tolerant JSON reads, a file lock), device (which device trains, AMP,
seeding), faults (the test hook that kills or fills the disk at a named write point).
"""
