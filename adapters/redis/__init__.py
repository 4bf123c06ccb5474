"""Redis helpers: de-duplication of deliveries and coalescing of syncs (both safe to lose: the store is the truth)."""
