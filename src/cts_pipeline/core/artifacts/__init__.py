"""What a run writes and reads back: stable digests, file records and per-epoch checkpoints."""
