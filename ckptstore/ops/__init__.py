"""Operations on stored checkpoints: verify, diff, copy, reshard, garbage collection, bounded-memory regions."""
