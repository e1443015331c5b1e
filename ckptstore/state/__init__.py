"""What a state_dict is made of: flattening nested dicts, DTensors, Sharded and PerRank leaves into named leaves with boxes; tensors as bytes."""
