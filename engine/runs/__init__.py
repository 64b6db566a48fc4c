"""Layer 4, may import: core, models, anatomy, freeze, data, config. A run as files on disk.

store (RunDir, create/open/list, describe), events (what a run says while it trains), recorder (the
emit sink that writes them), checkpoint_file (safetensors with meta inside), process (pid, start time,
heartbeat), health (why a run folder is damaged), locks (one training per device per machine),
background (a run in its own process), load (a run's trained model).
"""
