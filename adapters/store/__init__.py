"""MongoDB: profiles, their per-target sync state (the outbox), quarantine, checkpoints, erasure receipts."""
